"""backends/hooks.py: whole models through score_pool(backend="hooks") against the loop."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnorm_engine import rank_unlabeled, register_norm_rule, score_pool
from gradnorm_engine.backends import resolve_backend
from gradnorm_engine.backends.graph import Graph
from gradnorm_engine.backends.hooks import HooksBackend, HooksFallbackWarning
from gradnorm_engine.backends.loop import LoopBackend
from gradnorm_engine.job import eval_mode, make_job
from gradnorm_engine.norms import NORM_RULES
from gradnorm_engine.reduction import reduce_sqnorms
from tests.architectures import ARCHITECTURES

NORMS = ("frobenius", "tensor_sum")

# The self-check against the loop must never fire on models the rules read correctly.
pytestmark = pytest.mark.filterwarnings("error::gradnorm_engine.backends.hooks.HooksFallbackWarning")


def _batches(x, sizes=(2, 3)):
    """The pool as uneven loader batches."""
    out, i = [], 0
    while i < len(x):
        n = sizes[len(out) % len(sizes)]
        out.append(x[i : i + n])
        i += n
    return out


def _pool(name, n=5, dtype=torch.float64):
    factory, make_input = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = factory().to(dtype)
    x = make_input(n)
    return model, (x.to(dtype) if x.is_floating_point() else x)


def _scores(model, x, backend, **kw):
    return score_pool(model, _batches(x), backend=backend, progress=False, **kw)


def _loop_sqnorms(model, x, **kw):
    job = make_job(model, score=kw.get("score", "entropy"), params=kw.get("params"), logits_fn=None,
                   device=None, autocast=kw.get("autocast"), max_memory=None)
    with eval_mode(model), torch.enable_grad():
        return LoopBackend(job).sqnorms(x)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_matches_the_loop_in_float64(name):
    model, x = _pool(name, n=3 if name in ("tiny_resnet18", "tiny_mobilenet_v3") else 5)
    loop = _loop_sqnorms(model, x)  # [N, P], reduced below by each norm convention
    for norm in NORMS:
        hooks = _scores(model, x, "hooks", norm=norm)
        torch.testing.assert_close(hooks, reduce_sqnorms(loop, norm), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_auto_chooses_hooks(name):
    model, x = _pool(name, n=2, dtype=torch.float32)
    assert rank_unlabeled(model, [x], k=1, progress=False).backend == "hooks"


def _engine(model, **kw):
    return HooksBackend(make_job(model, score=kw.get("score", "entropy"), params=kw.get("params"),
                                 logits_fn=None, device=None, autocast=kw.get("autocast"), max_memory=None))


def _fallback_names(model, x, **kw):
    engine = _engine(model, **kw)
    with eval_mode(model), torch.enable_grad():
        engine.sqnorms(x)
    return set(engine.last_fallback)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_is_scored_by_rules_without_the_fallback(name):
    """Position parameters (x + pos), tied weights (an Embedding and a Linear), a layer applied
    twice and bare parameters are all scored by op rules: none go to the exact fallback."""
    model, x = _pool(name, n=3)
    assert _fallback_names(model, x) == set()


class FunctionalTiedHead(nn.Module):
    """The embedding matrix is read again by F.linear outside the Embedding module."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, tokens):
        return F.linear(torch.tanh(self.mix(self.embed(tokens))).mean(1), self.embed.weight)


class InPlaceAfterLayers(nn.Module):
    """In-place ops on every layer output (the hooks must see the values the layers returned)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2).relu_()
        out = self.b(h)
        out += 1
        return out


class WithAttention(nn.Module):
    """nn.TransformerEncoderLayer: MultiheadAttention reads out_proj.weight without calling out_proj."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.enc(self.embed(tokens)).mean(1))


class PadsItself(nn.Conv2d):
    """A Conv2d subclass with its own forward (asymmetric padding before the conv)."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class KeepsForward(nn.Linear):
    pass


class Subclasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = PadsItself(2, 3, 2)
        self.lin = KeepsForward(3, 4)
        self.normed = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))

    def forward(self, x):
        return self.normed(torch.tanh(self.lin(self.conv(x).mean(dim=(2, 3)))))


class OnlyBare(nn.Module):
    """No layer with a rule at all: everything goes to the fallback."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        return torch.tanh(x) @ self.w


class VmapCannotRun(nn.Module):
    """Data-dependent control flow (a finiteness guard, true for every sample alike): vmap
    refuses it, so the loop scores the bare parameter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.lin(x)
        if not bool(torch.isfinite(h).all()):
            raise ValueError("non-finite activations")
        return h * self.scale


@pytest.mark.parametrize("model_cls, make_x", [
    (VmapCannotRun, lambda: torch.randn(5, 6, dtype=torch.float64)),
    (OnlyBare, lambda: torch.randn(5, 6, dtype=torch.float64)),
    (Subclasses, lambda: torch.randn(5, 2, 5, 5, dtype=torch.float64)),
    (FunctionalTiedHead, lambda: torch.randint(0, 11, (5, 4))),
    (InPlaceAfterLayers, lambda: torch.randn(5, 6, dtype=torch.float64)),
    (WithAttention, lambda: torch.randint(0, 11, (5, 4))),
])
def test_hard_models_match_the_loop(model_cls, make_x):
    torch.manual_seed(0)
    model, x = model_cls().double(), make_x()
    for norm in NORMS:
        torch.testing.assert_close(_scores(model, x, "hooks", norm=norm), _scores(model, x, "loop", norm=norm),
                                   rtol=1e-9, atol=1e-12)


def test_subclasses_and_parametrizations_are_scored_op_by_op():
    """A Conv2d subclass with its own forward (F.pad, then the conv) and weight_norm's computed
    weight are recorded op by op: the rules score them, exactly (test_hard_models_match_the_loop)."""
    torch.manual_seed(0)
    assert _fallback_names(Subclasses().double(), torch.randn(3, 2, 5, 5, dtype=torch.float64)) == set()


def test_weights_read_outside_their_module_are_scored_by_rules():
    """The embedding matrix read again by F.linear (summed per-sample gradients of both uses) and
    nn.MultiheadAttention's projections (its functional body is recorded) need no fallback."""
    torch.manual_seed(0)
    assert _fallback_names(FunctionalTiedHead().double(), torch.randint(0, 11, (3, 4))) == set()
    assert _fallback_names(WithAttention().double(), torch.randint(0, 11, (3, 4))) == set()


def test_float32_channels_last_matches_the_loop():
    model, x = _pool("tiny_resnet18", n=4, dtype=torch.float32)
    loop = _scores(model, x, "loop")
    model = model.to(memory_format=torch.channels_last)
    hooks = _scores(model, x.to(memory_format=torch.channels_last), "hooks")
    assert hooks.dtype == torch.float32
    torch.testing.assert_close(hooks, loop, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name, autocast", [("tiny_resnet18", "bf16"), ("token_transformer", "bf16"),
                                            ("layer_applied_twice", "bf16"), ("bn_dropout_residual_cnn", "fp16")])
def test_autocast_accumulates_in_float32_and_matches_the_loop(name, autocast):
    # (channels_last is left out here: torch's CPU bf16 channels_last conv backward corrupts memory)
    model, x = _pool(name, n=4, dtype=torch.float32)
    engine = _engine(model, autocast=autocast)
    with eval_mode(model), torch.enable_grad():
        sq = engine.sqnorms(x)
    assert sq.dtype == torch.float32
    hooks = _scores(model, x, "hooks", autocast=autocast)
    loop = _scores(model, x, "loop", autocast=autocast)
    torch.testing.assert_close(hooks, loop, rtol=5e-2, atol=1e-6)


def test_parameter_subset_and_frozen_parameters():
    model, x = _pool("tiny_resnet18", n=2)
    chosen = ["linear.weight", "layer1.0.conv1.weight", "layer2.0.bn1.bias"]
    torch.testing.assert_close(_scores(model, x, "hooks", params=chosen), _scores(model, x, "loop", params=chosen),
                               rtol=1e-9, atol=1e-12)
    model.conv1.weight.requires_grad_(False)
    torch.testing.assert_close(_scores(model, x, "hooks"), _scores(model, x, "loop"), rtol=1e-9, atol=1e-12)
    assert not model.conv1.weight.requires_grad  # restored


def test_other_scores_match_the_loop():
    model, x = _pool("bn_dropout_residual_cnn", n=3)
    for score in ("pseudo_label_ce", "categorical_entropy", lambda logits: logits.logsumexp(-1)):
        torch.testing.assert_close(_scores(model, x, "hooks", score=score), _scores(model, x, "loop", score=score),
                                   rtol=1e-9, atol=1e-12)


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_model_state_is_left_untouched():
    model, x = _pool("bn_dropout_residual_cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    _scores(model, x, "hooks")
    assert _hook_counts(model) == 0
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class FailsMidway(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        self.a(x)
        raise RuntimeError("boom")


def test_hooks_are_removed_when_the_model_raises():
    model = FailsMidway()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        score_pool(model, [torch.randn(2, 3)], backend="hooks", progress=False)
    assert _hook_counts(model) == 0
    assert [p.requires_grad for p in model.parameters()] == flags


def test_batch_statistics_make_auto_choose_another_backend():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3))
    job = make_job(model, score="entropy", params=None, logits_fn=None, device=None, autocast=None, max_memory=None)
    with eval_mode(model):
        assert not HooksBackend.supports(job)
        assert resolve_backend("auto", job).name != "hooks"


def test_unused_head_scores_zero_without_fallback():
    model, x = _pool("dict_output_mlp", n=3)
    engine = _engine(model)
    with eval_mode(model), torch.enable_grad():
        sq = engine.sqnorms(x)
    names = [n for n, _ in engine.job.params]
    assert engine.last_fallback == ()
    assert torch.all(sq[:, names.index("aux.weight")] == 0)


def test_graph_use_counting():
    w = torch.randn(3, 3, requires_grad=True)
    v = torch.randn(3, requires_grad=True)
    x = torch.randn(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cached cast of w feeds two matmuls
        h = x @ w
        y = (h @ w).float().sum() + (x * v).float().sum()
    uses = Graph(y.grad_fn).uses(set())
    assert uses[id(w)] == 2 and uses[id(v)] == 1


def test_chunk_size_is_positive_and_respects_the_option():
    model, x = _pool("tiny_resnet18", n=1, dtype=torch.float32)
    assert _engine(model).chunk_size(x) >= 1
    job = make_job(model, score="entropy", params=None, logits_fn=None, device=None, autocast=None,
                   max_memory=None, options={"chunk_size": 7})
    assert HooksBackend(job).chunk_size(x) == 7


class SequenceFirst(nn.Module):
    """Layers see token ids [T, B] and hidden states [T, B, d]: dim 0 is not the sample."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):                      # tokens [B, T]
        h = torch.tanh(self.mix(self.embed(tokens.t())))
        return self.head(h.mean(0))


class ExpandedToTheSequence(SequenceFirst):
    """Sequence-first, with a [1, 1, d] offset expanded along the sequence: when T equals the batch
    size, the recording takes the expanded dim 0 for the batch (a constant or parameter expanded to
    B rows is given to every sample). The add of [T, B, d] and that offset then disagrees on where
    the samples are, and everything below it in the graph (the embedding, the offset) goes to the
    fallback with the layers above: no rule reads a gradient that mixes samples."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.randn(1, 1, 6))

    def forward(self, tokens):                      # tokens [B, T]
        h = self.embed(tokens.t())                  # [T, B, d]
        h = torch.tanh(self.mix(h + self.offset.expand(h.shape[0], 1, 6)))
        return self.head(h.mean(0))


class ReadsTheBatchSize(SequenceFirst):
    """Sequence-first; an offset switched on when the batch size (a Python number, which no
    recording of tensor ops sees) equals the sequence length T. A sample alone (batch size 1) never
    gets it, the batch does when B == T: only the check against the loop can catch that."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.randn(6))

    def forward(self, tokens):                      # tokens [B, T]
        h = self.embed(tokens.t())                  # [T, B, d]
        if tokens.shape[0] == tokens.shape[1]:
            h = h + self.offset
        return self.head(torch.tanh(self.mix(h)).mean(0))


def test_sequence_first_layers_are_tracked_and_scored_by_rules():
    """The recording tracks the batch to dim 1 of [T, B, d], whether or not T equals B."""
    torch.manual_seed(0)
    model = SequenceFirst().double()
    for x in (torch.randint(0, 11, (3, 4)), torch.randint(0, 11, (3, 3))):
        assert _fallback_names(model, x) == set()
        torch.testing.assert_close(_scores(model, x, "hooks"), _scores(model, x, "loop"), rtol=1e-9, atol=1e-12)


def test_a_wrong_guess_of_the_batch_dim_is_caught_by_the_check_and_scored_exactly():
    torch.manual_seed(0)
    model = ExpandedToTheSequence().double()
    # T != B: the expand cannot be to the batch; the rules score everything
    x = torch.randint(0, 11, (3, 4))
    assert _fallback_names(model, x) == set()
    torch.testing.assert_close(_scores(model, x, "hooks"), _scores(model, x, "loop"), rtol=1e-9, atol=1e-12)
    # T == B: the shapes cannot tell; the add's operands disagree on where the samples are, and every
    # parameter (those below the add included: their gradient there mixes samples) goes to the fallback,
    # exactly, before any rule runs: also with the check against the loop out of the way
    x = torch.randint(0, 11, (3, 3))
    engine = _engine(model)
    engine._agrees_with_loop = lambda *args: True          # the check against the loop out of the way
    with eval_mode(model), torch.enable_grad(), pytest.warns(HooksFallbackWarning, match="mixes samples"):
        got = engine.sqnorms(x)
    assert set(engine.last_fallback) == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(got, _loop_sqnorms(model, x), rtol=1e-9, atol=1e-12)


def test_a_model_that_reads_the_batch_size_is_caught_by_the_check_and_scored_exactly():
    torch.manual_seed(0)
    model = ReadsTheBatchSize().double()
    # T != B: the batched forward is the per-sample one; the rules score everything
    x = torch.randint(0, 11, (3, 4))
    assert _fallback_names(model, x) == set()
    torch.testing.assert_close(_scores(model, x, "hooks"), _scores(model, x, "loop"), rtol=1e-9, atol=1e-12)
    # T == B: the check against the loop catches it, and the job moves to the fallback
    x = torch.randint(0, 11, (3, 3))
    with pytest.warns(HooksFallbackWarning, match="disagree with the per-sample loop"):
        hooks = score_pool(model, [x], backend="hooks", progress=False)
    torch.testing.assert_close(hooks, score_pool(model, [x], backend="loop", progress=False), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_a_wrong_guess_is_caught_in_float32_too(seed):
    """float32's looser check (batched and single-sample forwards may differ by ~1e-3 on an
    ill-conditioned sample) still catches rules that read the wrong dim as the sample."""
    torch.manual_seed(seed)
    model = ReadsTheBatchSize()
    x = torch.randint(0, 11, (3, 3))
    with pytest.warns(HooksFallbackWarning, match="disagree with the per-sample loop"):
        hooks = score_pool(model, [x], backend="hooks", progress=False)
    torch.testing.assert_close(hooks, score_pool(model, [x], backend="loop", progress=False), rtol=1e-5, atol=1e-8)


class VmapCannotRunFlipped(VmapCannotRun):
    """As VmapCannotRun, with the scale applied to samples in reverse order: its op reads data
    whose sample layout is lost, so the scale goes to the fallback, and vmap cannot run the model."""

    def forward(self, x):
        h = self.lin(x)
        if not bool(torch.isfinite(h).all()):
            raise ValueError("non-finite activations")
        return (h.flip(0) * self.scale).flip(0)


def test_fallback_turns_to_the_loop_when_vmap_cannot_run_the_model():
    torch.manual_seed(0)
    model = VmapCannotRunFlipped().double()
    engine = _engine(model)
    x = torch.randn(3, 6, dtype=torch.float64)
    with eval_mode(model), torch.enable_grad(), pytest.warns(HooksFallbackWarning, match="scale"):
        got = engine.sqnorms(x)
    # the lin layer below the flips goes too: the recording cannot tell a permutation of the batch
    # (undone by the second flip) from a mixing of samples, and leaves nothing below either to a rule
    assert set(engine.last_fallback) == {"lin.weight", "lin.bias", "scale"} and "flip" in engine.last_reasons["scale"]
    assert "mixes samples" in engine.last_reasons["lin.weight"]
    assert [type(f.engine).__name__ for f in engine._fallbacks.values()] == ["LoopBackend"]
    torch.testing.assert_close(got, _loop_sqnorms(model, x), rtol=1e-9, atol=1e-12)


def test_leading_one_parameters_are_scored_by_rules_from_the_first_chunk():
    """The transformer's position parameter [1, T, d] (x + pos) is scored by its op rule on every
    chunk: no first-chunk trial, no fallback."""
    model, x = _pool("token_transformer", n=7)
    engine = _engine(model)
    with eval_mode(model), torch.enable_grad():
        first = engine.sqnorms(x[:3])
        assert engine.last_fallback == ()
        second = engine.sqnorms(x[3:])
        assert engine.last_fallback == ()
    torch.testing.assert_close(torch.cat([first, second]), _loop_sqnorms(model, x), rtol=1e-9, atol=1e-12)


class LeadingOneInAMatmul(nn.Module):
    """A [1, k] parameter whose leading 1 is not a batch dim: read as h @ w.t() ([B, k] @ [k, 1])."""

    def __init__(self, k: int):
        super().__init__()
        self.lin = nn.Linear(6, k)
        self.w = nn.Parameter(torch.randn(1, k))

    def forward(self, x):
        h = self.lin(x)
        return h + h @ self.w.t()          # [B, k] + [B, 1]


@pytest.mark.parametrize("k", [2, 4])
def test_a_leading_one_parameter_in_a_matmul_is_scored_through_its_transpose(k):
    torch.manual_seed(0)
    model = LeadingOneInAMatmul(k).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    engine = _engine(model)
    with eval_mode(model), torch.enable_grad():
        got = torch.cat([engine.sqnorms(part) for part in x.split([3, 4])])
        assert engine.last_fallback == ()
    torch.testing.assert_close(got, _loop_sqnorms(model, x), rtol=1e-9, atol=1e-12)


def test_nothing_of_a_chunk_outlives_the_call():
    """The tensor hooks on layer outputs must not keep a chunk's autograd graph (and so its inputs
    and activations) alive after the call: memory would grow with the pool."""
    import gc

    def live_tensor_bytes() -> int:
        gc.collect()
        return sum(t.numel() * t.element_size() for t in gc.get_objects()
                   if type(t) in (torch.Tensor, nn.Parameter))   # no isinstance on every object: deprecated ones warn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    pool = torch.randn(64, 3, 8, 8)
    score_pool(model, [pool[:8]], backend="hooks", chunk_size=8, progress=False)  # warm-up: checks, caches
    before = live_tensor_bytes()
    score_pool(model, [pool], backend="hooks", chunk_size=8, progress=False)
    assert live_tensor_bytes() - before < pool.numel() * pool.element_size() // 8   # < one chunk's input


def test_a_user_forward_hook_that_replaces_the_output_does_not_change_the_scores():
    """The rule reads d loss / d (the layer's own output), also when a user's hook masks it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    features = torch.arange(8) < 5

    def mask_padded(_module, inputs, out):   # samples whose first entry is "padding" lose features 5..7
        padded = inputs[0][:, :1] < 0
        return torch.where(padded & ~features, torch.zeros_like(out), out)

    model[0].register_forward_hook(mask_padded)
    x = torch.randn(8, 6, dtype=torch.float64)
    x[:2, 0] = x[:2, 0].abs()        # the self-check's two samples are not padded
    x[2:, 0] = -x[2:, 0].abs()
    want = score_pool(model, [x], backend="loop", progress=False)
    got = score_pool(model, [x], backend="hooks", progress=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


class SelfPaddingConv(nn.Conv2d):
    """Keeps Conv2d's forward but pads inside _conv_forward: the Conv rule cannot read it."""

    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias)


def test_a_subclass_that_overrides_a_method_the_rule_relies_on_goes_to_the_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(SelfPaddingConv(2, 3, 3), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    want = score_pool(model, [x], backend="loop", progress=False)
    for backend in ("auto", "hooks"):
        torch.testing.assert_close(score_pool(model, [x], backend=backend, progress=False), want, rtol=1e-10, atol=0)


def test_a_rule_that_fails_on_a_layer_sends_it_to_the_fallback_with_a_warning():
    from gradnorm_engine.backends.hooks import HooksFallbackWarning

    class Odd(nn.Linear):
        pass

    def broken(layer, inputs, grad_outputs):
        raise RuntimeError("cannot read this layer")

    torch.manual_seed(0)
    model = nn.Sequential(Odd(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    want = score_pool(model, [x], backend="loop", progress=False)
    register_norm_rule(Odd)(broken)
    try:
        # (the failed layer holds most of the parameters: the fallback's share is warned about too)
        with pytest.warns(HooksFallbackWarning) as record:
            got = score_pool(model, [x], backend="hooks", progress=False)
    finally:
        NORM_RULES.pop(Odd)
    assert any(re.search("broken.*Odd.*cannot read this layer", str(w.message)) for w in record)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("returned, message", [
    (lambda layer, b: {layer.weight: torch.zeros(())}, r"returned \(\) .* shape \[6\]"),
    (lambda layer, b: {layer.weight: torch.zeros(b, 1)}, r"returned \(6, 1\)"),
    (lambda layer, b: {layer.weight: 0.0}, "returned a float"),
    (lambda layer, b: None, "returned a NoneType"),
])
def test_a_rule_returning_the_wrong_thing_is_named(returned, message):
    class Mine(nn.Linear):
        pass

    register_norm_rule(Mine)(lambda layer, inputs, grad_outputs: returned(layer, inputs[0].shape[0]))
    try:
        model = nn.Sequential(Mine(4, 5), nn.Tanh(), nn.Linear(5, 3))
        with pytest.raises((TypeError, ValueError), match=message):
            score_pool(model, [torch.randn(6, 4)], backend="hooks", progress=False)
    finally:
        NORM_RULES.pop(Mine)

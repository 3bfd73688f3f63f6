"""gradnorm_engine.explain: per parameter, how backend="hooks" scores it (rule / summed / derived /
layer rule / fallback / unused) and why; its report; that it changes nothing in the model and
takes score_pool's batches and options. And FallbackShareWarning: once per job when the exact
fallback holds a large part of the parameters, naming them, and not for a tiny share."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from gradnorm_engine import explain, register_norm_rule, score_pool
from gradnorm_engine.backends.hooks import FALLBACK_SHARE, FallbackShareWarning
from gradnorm_engine.explain import HEADINGS, KINDS
from gradnorm_engine.norms import NORM_RULES
from tests.architectures import ARCHITECTURES
from tests.token_models import MaskedBag, TokenPool, pad_collate

pytestmark = pytest.mark.usefixtures("one_thread")


class Scaler(nn.Module):
    """x * weight; the op rule for `mul` scores it unless a layer rule is registered for it."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        return x * self.weight


def scaler_norms(layer, inputs, grad_outputs):
    """The layer rule of Scaler: sample b's gradient is x_b * g_b."""
    return {layer.weight: (inputs[0] * grad_outputs[0]).pow(2).sum(dim=1)}


class OwnBackward(torch.autograd.Function):
    """x * p, or x @ p, with a backward of its own: the recording sees the forward's op run without
    a graph, so p goes to the exact fallback (the loop: vmap cannot run such a Function), and
    nothing else does (the op keeps each sample's rows apart)."""

    @staticmethod
    def forward(ctx, x, p, matmul: bool):
        ctx.save_for_backward(x, p)
        ctx.matmul = matmul
        return x @ p if matmul else x * p

    @staticmethod
    def backward(ctx, g):
        x, p = ctx.saved_tensors
        if ctx.matmul:
            return g @ p.t(), x.t() @ g, None
        return g * p, (g * x).sum_to_size(p.shape), None


NO_GRAPH = "`mul`: its output takes no gradient (computed under no_grad, or inside a custom autograd.Function"


class EveryKind(nn.Module):
    """One parameter for every way explain can say it is scored."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)                                      # rule
        self.shared = nn.Linear(8, 8)                                     # summed: applied twice
        self.normed = parametrizations.weight_norm(nn.Linear(8, 8))       # derived
        self.scaler = Scaler(8)                                           # layer rule, once registered
        self.unused = nn.Linear(8, 8)                                     # unused
        self.head = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))                      # fallback: in a custom Function

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        h = self.scaler(torch.tanh(self.normed(h)))
        return OwnBackward.apply(self.head(h), self.scale, False)


EXPECTED = {"first.weight": "rule", "first.bias": "rule", "shared.weight": "summed", "shared.bias": "summed",
            "normed.bias": "rule", "normed.parametrizations.weight.original0": "derived",
            "normed.parametrizations.weight.original1": "derived", "scaler.weight": "layer rule",
            "unused.weight": "unused", "unused.bias": "unused", "head.weight": "rule", "head.bias": "rule",
            "scale": "fallback"}


def _every_kind():
    torch.manual_seed(0)
    return EveryKind().double(), torch.randn(5, 6, dtype=torch.float64)


def _with_scaler_rule(fn):
    register_norm_rule(Scaler)(scaler_norms)
    try:
        return fn()
    finally:
        NORM_RULES.pop(Scaler)


def _groups(report: str) -> dict[str, list[str]]:
    """The report's parameter lines under each heading: {heading: [line, ...]}."""
    groups, heading = {}, None
    for line in report.splitlines()[1:]:
        if line.startswith("  "):
            groups[heading].append(line.strip())
        elif line.endswith(":") and not line.startswith("note:"):
            heading = line[:-1]
            groups[heading] = []
    return groups


def test_every_kind_is_named_with_its_uses_and_reasons():
    model, x = _every_kind()
    report = _with_scaler_rule(lambda: explain(model, x))
    assert {p.name: p.scored_by for p in report.parameters} == EXPECTED, str(report)
    assert [p.name for p in report.parameters] == [n for n, _ in model.named_parameters()]
    assert report.batch == 5 and report.supported and report.notes == []
    assert len(report["shared.weight"].uses) == 2 and all("linear" in u for u in report["shared.weight"].uses)
    assert "batched VJP" in report["normed.parametrizations.weight.original1"].uses[0]
    assert report["scaler.weight"].uses == ("the norm rule scaler_norms of scaler",)
    assert report["first.weight"].uses == ("`linear`: rank one (T=1, p=8, d=6)",)
    assert report["scale"].reason.startswith(NO_GRAPH), report["scale"].reason
    assert report["unused.weight"].uses == () and report["unused.weight"].reason == ""
    assert [p.name for p in report.fallback] == ["scale"]
    assert [p.name for p in report.by("summed")] == ["shared.weight", "shared.bias"]


def test_without_its_layer_rule_the_scaler_is_scored_by_the_mul_rule():
    """The layer rule is what makes "layer rule": unregistered, the op rule scores the same parameter."""
    model, x = _every_kind()
    report = explain(model, x)
    assert report["scaler.weight"].scored_by == "rule", str(report)
    assert "`mul`" in report["scaler.weight"].uses[0]


def test_the_kinds_explain_reports_score_as_the_loop():
    """What explain describes is what score_pool runs: every kind together matches the loop."""
    model, x = _every_kind()
    hooks = _with_scaler_rule(lambda: score_pool(model, [x], backend="hooks", progress=False))
    torch.testing.assert_close(hooks, score_pool(model, [x], backend="loop", progress=False), rtol=1e-9, atol=1e-12)


def test_report_lines():
    model, x = _every_kind()
    report = _with_scaler_rule(lambda: explain(model, x))
    text = report.report()
    assert str(report) == text
    total = sum(p.numel() for p in model.parameters())
    first = text.splitlines()[0]
    assert first == (f"hooks backend, one batch of 5: {len(EXPECTED)} parameter tensors ({total:,} entries): "
                     f"5 rule, 2 summed, 2 derived, 1 layer rule, 1 fallback, 2 unused; "
                     f"the exact fallback scores {1 / total:.1%} of the entries")
    groups = _groups(text)
    assert list(groups) == [HEADINGS[k] for k in KINDS]      # every kind present, in KINDS order
    for kind in KINDS:            # each parameter under its kind's heading, in model order
        assert [line.split(" [")[0] for line in groups[HEADINGS[kind]]] == \
            [n for n, _ in model.named_parameters() if EXPECTED[n] == kind], kind
    assert groups[HEADINGS["fallback"]][0].startswith("scale []: " + NO_GRAPH)
    assert "unused.weight [8, 8]" in groups[HEADINGS["unused"]]            # no uses: the bare name and shape
    assert "shared.weight [8, 8]: `linear`: per-sample gradients; `linear`: per-sample gradients" in \
        groups[HEADINGS["summed"]]


def test_getitem_and_fallback_share():
    model, x = _every_kind()
    report = explain(model, x)
    assert report["head.weight"].shape == (3, 8) and report["head.weight"].numel == 24
    with pytest.raises(KeyError, match="no.such.parameter"):
        report["no.such.parameter"]
    assert report.fallback_share == 1 / sum(p.numel() for p in model.parameters())
    assert _rules_only_share() == 0.0


def _rules_only_share() -> float:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return explain(model, torch.randn(4, 6, dtype=torch.float64)).fallback_share


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_explain_leaves_the_model_unchanged():
    model, x = _every_kind()
    model.train()
    model.normed.eval()                                  # a mixed set of flags, restored one by one
    flags = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    model.first.weight.requires_grad_(False)             # frozen: not measured, and still frozen after
    report = _with_scaler_rule(lambda: explain(model, x))
    assert "first.weight" not in [p.name for p in report.parameters]
    assert not model.first.weight.requires_grad
    model.first.weight.requires_grad_(True)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert _hook_counts(model) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert Scaler not in NORM_RULES


def test_a_mapping_batch_of_token_ids_and_masks():
    """A tokenizer collate's batch: input_ids and attention_mask passed by name, labels left out."""
    torch.manual_seed(0)
    model = MaskedBag().double()
    pool = TokenPool(6)
    batch = pad_collate([pool[i] for i in range(6)])
    report = explain(model, batch)
    assert report.batch == 6 and report.fallback == [], str(report)
    assert {p.scored_by for p in report.parameters} == {"rule"}, str(report)
    assert report["emb.weight"].uses == ("`embedding`: rows per distinct id",)
    # labels read where the score needs them
    assert explain(model, batch, score="cross_entropy").fallback == []


def test_score_pool_options_are_taken():
    torch.manual_seed(0)
    factory, make_input = ARCHITECTURES["dict_output_mlp"]
    model = factory().double()
    x = make_input(4).double()
    report = explain(model, x, params=["head.weight", "body.0.bias"])
    assert [p.name for p in report.parameters] == ["body.0.bias", "head.weight"]
    on_logits = explain(model, x, logits_fn=lambda out: out["logits"])
    assert {p.name for p in on_logits.by("unused")} == {"aux.weight", "aux.bias"}, str(on_logits)
    on_aux = explain(model, x, logits_fn=lambda out: out["aux"])
    assert {p.name for p in on_aux.by("unused")} == {"head.weight", "head.bias"}, str(on_aux)
    with pytest.raises(ValueError, match="unknown score 'nonsense'"):
        explain(model, x, score="nonsense", logits_fn=lambda out: out["logits"])
    with pytest.raises(ValueError, match="hold no labels"):
        explain(model, x, score="cross_entropy", logits_fn=lambda out: out["logits"])
    labelled = explain(model, (x, torch.tensor([0, 1, 2, 3])), score="cross_entropy",
                       logits_fn=lambda out: out["logits"])
    assert labelled.fallback == [] and labelled["head.weight"].scored_by == "rule", str(labelled)


def test_a_model_the_hooks_backend_refuses_is_noted():
    """A BatchNorm without running statistics normalises with the batch's even in eval mode:
    backend='hooks' refuses the model, and explain says so in a note (its parameters and every
    one after it have lost the sample layout). A BatchNorm in training mode with running
    statistics is scored in eval mode, as score_pool scores it: no note."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3))
    report = explain(model, x)
    assert not report.supported
    assert len(report.notes) == 1 and "refuses" in report.notes[0]
    assert report.report().splitlines()[1] == f"note: {report.notes[0]}"
    assert "batch statistics" in report["1.weight"].reason, str(report)
    trained = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    report = explain(trained, x)
    assert report.supported and report.notes == [] and report.fallback == [], str(report)
    assert trained.training and trained[1].training


# ---------------------------------------------------------------- FallbackShareWarning
class OpaqueScale(nn.Module):
    """A Linear, then a per-class scale applied inside a custom autograd.Function: the recording
    cannot see the scale's use, so it goes to the exact fallback."""

    def __init__(self, scale_shape=(4,)):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(scale_shape))

    def forward(self, x):
        return OwnBackward.apply(self.lin(x), self.scale, False)


class ManyLayersOpaqueScalar(nn.Module):
    """Linear layers with a scalar scale inside a custom Function: the fallback holds 1 of 156 entries and
    none of the 5 largest tensors."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return OwnBackward.apply(h, self.scale, False)


class LargestInTheFallback(nn.Module):
    """The fallback's one tensor (the logits' matrix, inside a custom Function) is the largest, but holds
    under FALLBACK_SHARE of the entries."""

    def __init__(self):
        super().__init__()
        self.chain = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(12)])
        self.head = nn.Linear(8, 8)
        self.w = nn.Parameter(0.3 * torch.randn(8, 10))

    def forward(self, x):
        h = torch.tanh(self.head(torch.tanh(self.chain(x))))
        return OwnBackward.apply(h, self.w, True)


def _share_warnings(model, x, **kw):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = score_pool(model, [x[:4], x[4:]], backend="hooks", progress=False, **kw)
    torch.testing.assert_close(got, score_pool(model, [x], backend="loop", progress=False), rtol=1e-9, atol=1e-12)
    assert not any("disagree" in str(w.message) for w in record)     # the fallback is per parameter, not the job's
    return [w for w in record if issubclass(w.category, FallbackShareWarning)]


def test_the_fallback_share_is_warned_once_per_job_naming_the_parameters():
    torch.manual_seed(0)
    model, x = OpaqueScale().double(), torch.randn(9, 6, dtype=torch.float64)
    assert [p.name for p in explain(model, x).fallback] == ["scale"]
    found = _share_warnings(model, x, chunk_size=2)          # 5 chunks, over two loader batches
    assert len(found) == 1
    assert found[0].filename == __file__          # attributed to the user's call, not the engine
    message = str(found[0].message)
    assert "scale (" + NO_GRAPH in message
    assert "explain(model, batch)" in message and "among them the largest: scale" in message
    assert len(_share_warnings(model, x, chunk_size=2)) == 1   # a new job: warned again, once


def test_a_large_tensor_in_the_fallback_is_warned_under_the_share():
    torch.manual_seed(0)
    model, x = LargestInTheFallback().double(), torch.randn(6, 8, dtype=torch.float64)
    report = explain(model, x)
    assert [p.name for p in report.fallback] == ["w"] and report.fallback_share < FALLBACK_SHARE, str(report)
    found = _share_warnings(model, x, chunk_size=3)
    assert len(found) == 1 and "among them the largest: w" in str(found[0].message)


def test_a_tiny_share_outside_the_largest_tensors_is_not_warned():
    torch.manual_seed(0)
    model, x = ManyLayersOpaqueScalar().double(), torch.randn(7, 6, dtype=torch.float64)
    report = explain(model, x)
    assert [p.name for p in report.fallback] == ["scale"], str(report)
    assert report.fallback_share == 1 / 156
    assert _share_warnings(model, x, chunk_size=2) == []


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_explain_refuses_another_backend_in_one_line(backend):
    model, x = _every_kind()
    with pytest.raises(ValueError, match=f"explain describes the hooks backend, but backend='{backend}'") as info:
        explain(model, x, backend=backend)
    assert "\n" not in str(info.value)
    assert explain(model, x, backend="hooks").parameters == explain(model, x, backend="auto").parameters


def test_explain_names_an_unknown_backend_as_unknown():
    model, x = _every_kind()
    with pytest.raises(ValueError, match="nope") as info:
        explain(model, x, backend="nope")
    assert "explain describes the hooks backend" not in str(info.value)

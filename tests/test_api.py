"""score_pool / rank_unlabeled: exactness of every backend, options, ranking and bookkeeping."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, RandomSampler, SubsetRandomSampler,
                              TensorDataset, WeightedRandomSampler)

from gradnorm_engine import rank_unlabeled, score_pool
from gradnorm_engine.backends import BACKENDS

from tests.architectures import ARCHITECTURES
from tests.reference import max_rel_err, reference_scores

FAST_BACKENDS = [name for name in BACKENDS if name != "loop"]

# fp32 run vs float64 loop. MobileNetV3 (15 BatchNorm-scaled blocks, scores ~100) is the one
# model where fp32 rounding alone reaches 6e-6 even in the fp32 per-sample loop.
RTOL = {"tiny_mobilenet_v3": 3e-5}


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, make_input = ARCHITECTURES[name]
    torch.manual_seed(1)
    model = factory()
    model.train()  # a model left in train mode: the engine must score it in eval mode
    return model, make_input(9)


# A hooks rule that disagreed with the loop would hand the job to the exact fallback with a
# warning, and the scores would still match: here that warning fails the test instead.
@pytest.mark.filterwarnings("error::gradnorm_engine.backends.hooks.HooksFallbackWarning")
@pytest.mark.parametrize("backend", FAST_BACKENDS + ["loop"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_backend_matches_float64_loop(name, backend):
    model, x = _model(name)
    for norm in ("frobenius", "tensor_sum"):
        want = reference_scores(model, x, norm=norm)
        got = score_pool(model, [x[:4], x[4:]], backend=backend, norm=norm, progress=False)
        assert got.shape == (9,)
        assert got.dtype == torch.float32
        assert max_rel_err(got, want) <= RTOL.get(name, 1e-5), (name, backend, norm)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_result_identical_for_any_loader_batch_size(backend):
    model, _ = _model("bn_dropout_residual_cnn")
    x = torch.randn(23, 3, 8, 8)
    runs = [score_pool(model, DataLoader(TensorDataset(x), batch_size=bs), backend=backend,
                       chunk_size=8, progress=False) for bs in (1, 5, 23)]
    for r in runs[1:]:
        assert torch.equal(r, runs[0])


def test_model_state_untouched_and_restored():
    model, x = _model("bn_dropout_residual_cnn")
    model.eval()
    model.drop.train()  # mixed flags must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    for backend in BACKENDS:
        score_pool(model, [x], backend=backend, progress=False)
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_train_flags_restored_when_scoring_raises():
    model, x = _model("bn_dropout_residual_cnn")
    model.train()
    bad = torch.randn(4, 3, 5)  # wrong rank for a Conv2d: the forward raises
    with pytest.raises(Exception):
        score_pool(model, [bad], backend="vmap", progress=False)
    assert all(m.training for m in model.modules())


def test_rank_unlabeled_orders_by_score_and_breaks_ties_by_position():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3))
    base = torch.randn(5, 4)
    x = torch.cat([base, base])  # every score appears twice: positions i and i + 5
    res = rank_unlabeled(model, [x], k=10, progress=False)
    scores = score_pool(model, [x], progress=False)
    assert torch.equal(res.scores, scores[res.indices])
    assert (res.scores[:-1] >= res.scores[1:]).all()
    assert sorted(res.indices.tolist()) == list(range(10))
    for i in range(0, 10, 2):  # each tied pair: lower position first
        a, b = res.indices[i].item(), res.indices[i + 1].item()
        assert res.scores[i] == res.scores[i + 1] and a < b and b == a + 5
    assert res.pool_size == 10 and res.norm == "frobenius" and res.backend in BACKENDS


def test_rank_unlabeled_top_k_equals_sorted_scores():
    model, x = _model("tiny_resnet18")
    scores = score_pool(model, [x], progress=False)
    res = rank_unlabeled(model, [x], k=4, progress=False)
    assert res.indices.dtype == torch.int64
    assert res.indices.tolist() == torch.argsort(scores, descending=True)[:4].tolist()


@pytest.mark.parametrize("score", ["pseudo_label_ce", "categorical_entropy", "callable"])
def test_other_scores_match_loop(score):
    model, x = _model("bn_dropout_residual_cnn")
    if score == "callable":
        score = lambda logits: torch.logsumexp(logits, dim=-1)  # noqa: E731
    want = reference_scores(model, x, score=score)
    for backend in FAST_BACKENDS:
        got = score_pool(model, [x], score=score, backend=backend, progress=False)
        assert max_rel_err(got, want) <= 1e-5


def test_params_subset_measures_only_those():
    model, x = _model("bn_dropout_residual_cnn")
    subset = [model.head.weight, "stem.bias"]
    want = reference_scores(model, x, params=["head.weight", "stem.bias"])
    for backend in FAST_BACKENDS:
        got = score_pool(model, [x], params=subset, backend=backend, progress=False)
        assert max_rel_err(got, want) <= 1e-5
    # head.weight alone has a closed form: d H / d W = (dH/dz) h^T, with h the pooled features.
    only_head = score_pool(model, [x], params=[model.head.weight], progress=False)
    model.eval()
    h = model.drop(model.relu(model.bn(model.stem(x))))
    h = model.relu(h + model.bn2(model.conv(h))).mean(dim=(2, 3))
    z = model.head(h).detach().requires_grad_()
    p = z.softmax(-1)
    H = -(p * p.log()).sum()
    (dz,) = torch.autograd.grad(H, z)
    closed = dz.norm(dim=1) * h.detach().norm(dim=1)
    assert torch.allclose(only_head, closed, rtol=1e-4, atol=1e-7)


def test_custom_logits_fn():
    torch.manual_seed(0)
    model = nn.Linear(6, 8)
    x = torch.randn(5, 6)
    got = score_pool(model, [x], logits_fn=lambda out: out[:, :3], progress=False)
    want = reference_scores(model, x, logits_fn=lambda out: out[:, :3])
    assert max_rel_err(got, want) <= 1e-5


def test_parameters_that_do_not_reach_the_logits_score_zero():
    model, x = _model("dict_output_mlp")
    for backend in BACKENDS:
        got = score_pool(model, [x], params=[model.aux.weight, model.aux.bias], backend=backend, progress=False)
        assert torch.equal(got, torch.zeros(9)), backend


def test_mapping_batches_and_input_key():
    model, x = _model("tuple_output_mlp")
    want = score_pool(model, [x], progress=False)
    assert torch.equal(score_pool(model, [{"image": x, "label": torch.zeros(9)}], progress=False), want)
    assert torch.equal(score_pool(model, [{"feats": x}], input_key="feats", progress=False), want)
    assert torch.equal(score_pool(model, [(x, torch.zeros(9))], progress=False), want)
    with pytest.raises(TypeError, match="input_key"):
        score_pool(model, [{"feats": x}], progress=False)
    with pytest.raises(TypeError, match="received|type"):
        score_pool(model, [42], progress=False)


def test_bad_k_and_empty_pool():
    model, x = _model("tuple_output_mlp")
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be at least 1"):
            rank_unlabeled(model, [x], k=k, progress=False)
    with pytest.raises(ValueError, match="larger than the pool"):
        rank_unlabeled(model, [x], k=10, progress=False)
    with pytest.raises(ValueError, match="empty"):
        score_pool(model, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        score_pool(model, DataLoader(TensorDataset(torch.randn(0, 6)), batch_size=4), progress=False)


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["loop"])
def test_non_finite_samples_are_named(backend):
    model, x = _model("bn_dropout_residual_cnn")
    x[2, 0, 0, 0] = float("nan")
    x[7, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"positions 2, 7"):
        score_pool(model, [x[:5], x[5:]], backend=backend, progress=False)


def test_loader_that_drops_or_shuffles_is_refused():
    model, x = _model("tuple_output_mlp")
    ds = TensorDataset(x)
    with pytest.raises(ValueError, match="drop_last"):
        score_pool(model, DataLoader(ds, batch_size=4, drop_last=True), progress=False)
    with pytest.raises(ValueError, match="shuffle"):
        score_pool(model, DataLoader(ds, batch_size=4, shuffle=True), progress=False)
    # Random orders and dropped samples hidden in samplers: refused too, also by rank_unlabeled.
    with pytest.raises(ValueError, match="SubsetRandomSampler.*sampler=indices"):
        rank_unlabeled(model, DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(9))), 3, progress=False)
    with pytest.raises(ValueError, match="WeightedRandomSampler"):
        score_pool(model, DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * 9, 9)), progress=False)
    with pytest.raises(ValueError, match="batch sampler drops"):
        score_pool(model, DataLoader(ds, batch_sampler=BatchSampler(range(9), 4, drop_last=True)), progress=False)
    with pytest.raises(ValueError, match="shuffle"):
        score_pool(model, DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, False)), progress=False)
    with pytest.raises(ValueError, match="DistributedSampler"):
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=False)
        score_pool(model, DataLoader(ds, batch_size=4, sampler=sampler), progress=False)


def test_a_fixed_index_sampler_scores_those_samples_in_its_order():
    model, x = _model("tuple_output_mlp")
    order = [7, 2, 5, 0]
    want = score_pool(model, [x[order]], progress=False)
    got = score_pool(model, DataLoader(TensorDataset(x), batch_size=3, sampler=order), progress=False)
    assert torch.equal(got, want)


def test_the_progress_bar_counts_the_samples_the_loader_yields(capsys):
    model, x = _model("tuple_output_mlp")
    score_pool(model, DataLoader(TensorDataset(x), batch_size=2, sampler=[1, 2, 3]), progress=True)
    bar = capsys.readouterr().err
    assert "3.00/3.00" in bar and "/9" not in bar


def test_k_may_be_a_numpy_or_torch_integer():
    np = pytest.importorskip("numpy")
    model, x = _model("tuple_output_mlp")
    want = rank_unlabeled(model, [x], 3, progress=False).indices
    for k in (np.int64(3), torch.tensor(3)):
        assert torch.equal(rank_unlabeled(model, [x], k, progress=False).indices, want)
    for k in (True, 3.0, np.float32(3), torch.tensor(3.0)):
        with pytest.raises(TypeError, match="k must be an int"):
            rank_unlabeled(model, [x], k, progress=False)


def test_frozen_parameters_named_in_params_are_measured_by_every_backend():
    model, x = _model("bn_dropout_residual_cnn")
    want = reference_scores(model, x, params=["head.weight", "stem.weight"])   # before any is frozen
    want_all = reference_scores(model, x)
    model.head.weight.requires_grad_(False)
    for backend in BACKENDS:
        got = score_pool(model, [x], params=["head.weight", "stem.weight"], backend=backend, progress=False)
        assert max_rel_err(got, want) <= 1e-5, backend
        assert not model.head.weight.requires_grad
    for p in model.parameters():
        p.requires_grad_(False)
    for backend in BACKENDS:
        got = score_pool(model, [x], params=list(model.parameters()), backend=backend, progress=False)
        assert max_rel_err(got, want_all) <= 1e-5, backend
    assert not any(p.requires_grad for p in model.parameters())


def test_items_taken_as_batches_get_a_note_about_batch_size():
    model, x = _model("tuple_output_mlp")
    with pytest.raises(RuntimeError) as raised:
        score_pool(model, DataLoader(x, batch_size=None), progress=False)   # items are single samples
    assert "batch_size=None" in "".join(raised.value.__notes__)


def test_one_logit_is_refused_with_the_two_class_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 6)
    for score in ("entropy", "categorical_entropy", "pseudo_label_ce"):
        with pytest.raises(ValueError, match="1 logit per sample"):
            score_pool(model, [x], score=score, progress=False)
    two = lambda out: torch.cat([torch.zeros_like(out), out], dim=1)  # noqa: E731 - the fix the message names
    got = score_pool(model, [x], logits_fn=two, progress=False)
    assert max_rel_err(got, reference_scores(model, x, logits_fn=two)) <= 1e-5
    assert bool((got > 0).all())


def test_params_and_max_memory_mistakes_name_the_fix():
    model, x = _model("tuple_output_mlp")
    name = next(n for n, _ in model.named_parameters())
    with pytest.raises(TypeError, match=r"params=\['"):
        score_pool(model, [x], params=name, progress=False)
    with pytest.raises(ValueError, match="finite"):
        score_pool(model, [x], max_memory=float("inf"), progress=False)


def test_a_wrapper_passed_as_the_model_points_to_the_module_inside():
    x = torch.randn(4, 3)

    class ModelWrapper:   # baal's keeps the module at .model, DeepAL's Net at .clf, skorch at .module_
        def __init__(self):
            self.model = nn.Linear(3, 2)

    with pytest.raises(TypeError, match=r"got ModelWrapper; it holds one at \.model: pass its \.model"):
        score_pool(ModelWrapper(), [x], progress=False)
    with pytest.raises(TypeError, match=r"must be a torch.nn.Module, got object$"):
        score_pool(object(), [x], progress=False)


def test_unknown_names_are_refused():
    model, x = _model("tuple_output_mlp")
    with pytest.raises(ValueError, match="unknown norm"):
        score_pool(model, [x], norm="l1", progress=False)
    with pytest.raises(ValueError, match="unknown backend"):
        score_pool(model, [x], backend="magic", progress=False)
    with pytest.raises(ValueError, match="unknown score"):
        score_pool(model, [x], score="margin", progress=False)
    with pytest.raises(ValueError, match="not a parameter"):
        score_pool(model, [x], params=["nope"], progress=False)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        score_pool(frozen, [x], progress=False)


def test_mismatched_sample_shapes_are_named():
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="same shape"):
        score_pool(model, [torch.randn(2, 4), torch.randn(2, 5)], backend="loop", chunk_size=3, progress=False)


def test_small_memory_budget_still_exact():
    model, x = _model("tiny_resnet18")
    want = score_pool(model, [x], backend="vmap", chunk_size=9, progress=False)
    got = score_pool(model, [x], backend="vmap", max_memory=1, progress=False)  # chunk of 1
    assert max_rel_err(got, want) <= 1e-5


def test_out_of_memory_halves_the_chunk_and_loses_nothing(monkeypatch):
    model, x = _model("tuple_output_mlp")
    want = score_pool(model, [x], backend="vmap", progress=False)
    backend_cls = BACKENDS["vmap"]
    real = backend_cls.sqnorms
    sizes = []

    def flaky(self, chunk):
        sizes.append(len(chunk))
        if len(chunk) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, chunk)

    monkeypatch.setattr(backend_cls, "sqnorms", flaky)
    got = score_pool(model, [x], backend="vmap", chunk_size=8, progress=False)
    assert max_rel_err(got, want) <= 1e-6
    assert sizes[0] == 8 and max(sizes[1:]) <= 4 and sizes[-1] <= 2


def test_no_grad_context_does_not_break_scoring():
    model, x = _model("tuple_output_mlp")
    want = score_pool(model, [x], progress=False)
    with torch.no_grad():
        for backend in BACKENDS:
            assert max_rel_err(score_pool(model, [x], backend=backend, progress=False), want) <= 1e-5


def test_device_option_and_ddp_style_wrapper():
    model, x = _model("tuple_output_mlp")
    want = score_pool(model, [x], progress=False)
    assert torch.equal(score_pool(model, [x], device="cpu", progress=False), want)
    wrapped = nn.DataParallel(model)  # scored through .module
    assert torch.equal(score_pool(wrapped, [x], progress=False), want)


def test_vmap_refuses_autocast_with_batchnorm_and_auto_still_scores():
    model, x = _model("tiny_resnet18")
    with pytest.raises(ValueError, match="autocast"):
        score_pool(model, [x], backend="vmap", autocast="bf16", progress=False)
    got = score_pool(model, [x], backend="auto", autocast="bf16", progress=False)
    want = reference_scores(model, x)
    assert got.dtype == torch.float32
    assert max_rel_err(got, want) <= 0.05  # bf16 forward and backward: about 2-3 significant digits


def test_a_cpu_allocation_failure_counts_as_out_of_memory():
    from gradnorm_engine.memory import is_out_of_memory

    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't "
                                         "allocate memory: you tried to allocate 123 bytes."))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_tensor_sum_is_the_reference_codes_sum_of_per_tensor_norms():
    """Independent of the engine's reduction: one backward per sample, then sum over parameter
    tensors of each gradient's L2 norm, as the public LPLgrad code computes it."""
    model, x = _model("bn_dropout_residual_cnn")
    model.eval()
    want = []
    for i in range(x.shape[0]):
        model.zero_grad()
        p = torch.softmax(model(x[i : i + 1]), dim=-1)
        (-(p * p.log()).sum()).backward()
        want.append(sum(float(q.grad.double().norm()) for q in model.parameters() if q.grad is not None))
    model.zero_grad(set_to_none=True)
    for backend in BACKENDS:
        got = score_pool(model, [x], norm="tensor_sum", backend=backend, progress=False)
        assert max_rel_err(got, torch.tensor(want)) <= 1e-5, backend


def test_a_batch_holding_an_attention_mask_warns_that_the_mask_is_not_passed():
    from gradnorm_engine.inputs import IgnoredInputWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    ids = torch.randint(0, 10, (5, 3))
    batch = {"input_ids": ids, "attention_mask": torch.ones(5, 3), "labels": torch.zeros(5)}
    with pytest.warns(IgnoredInputWarning, match="attention_mask"):
        got = score_pool(model, [batch], input_key="input_ids", progress=False)
    assert torch.equal(got, score_pool(model, [ids], progress=False))


def test_a_model_that_squeezes_a_one_sample_chunk_gets_a_hint():
    class Squeezing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).squeeze()

    with pytest.raises(ValueError, match="squeeze the batch dim"):
        score_pool(Squeezing(), [torch.randn(5, 4)], chunk_size=4, backend="hooks", progress=False)


def test_a_tied_weights_alias_names_the_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    x = torch.randn(3, 4)
    assert torch.equal(score_pool(model, [x], params=["2.weight"], progress=False),
                       score_pool(model, [x], params=["0.weight"], progress=False))


def test_hooks_with_autocast_on_a_batchnorm_model_that_needs_the_fallback():
    """vmap refuses BatchNorm under autocast; the hooks backend's exact fallback then runs the loop."""
    torch.manual_seed(0)

    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
            self.temperature = nn.Parameter(torch.tensor([1.5]))   # bare: the fallback scores it

        def forward(self, x):
            return self.body(x) / self.temperature

    model = Tempered().eval()
    x = torch.randn(4, 3, 6, 6)
    for backend in ("hooks", "auto"):
        got = score_pool(model, [x], backend=backend, autocast="bf16", progress=False)
        assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
        want = score_pool(model, [x], backend="loop", autocast="bf16", progress=False)
        assert max_rel_err(got, want) <= 0.05


def test_vmap_names_a_forward_that_updates_a_buffer():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.lin(x)

    model, x = Counting(), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="updates a buffer .* backend='hooks'"):
        score_pool(model, [x], backend="vmap", progress=False)
    assert max_rel_err(score_pool(model, [x], backend="hooks", progress=False),
                       score_pool(model, [x], backend="loop", progress=False)) <= 1e-6


def test_a_model_on_the_meta_device_is_refused_in_one_line():
    """Weights never loaded (built under torch.device("meta")): torch's internal error before."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    for kw in ({}, {"device": "cpu"}, {"backend": "loop"}):
        with pytest.raises(ValueError, match=r"^the model's parameters 0.weight, 0.bias, 2.weight, 2.bias are on the "
                                             r"meta device .*to_empty.*assign=True") as info:
            score_pool(model, [torch.randn(3, 6)], progress=False, **kw)
        assert "\n" not in str(info.value)


# --- the device option ------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the message shown where no GPU is visible")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_device_cuda_without_cuda_is_one_line_with_the_fix(device):
    """device='cuda' on a machine without CUDA used to raise torch's "Found no NVIDIA driver on your
    system" from deep inside the model's move."""
    from gradnorm_engine import explain
    from gradnorm_engine.errors import UsageError

    name = str(device)
    want = (rf"^device='{name}' but CUDA is not available on this machine \(torch.cuda.is_available\(\) is "
            r"False\); pass device='cpu' or leave device unset$")
    model, x = nn.Linear(5, 3), torch.randn(4, 5)
    for call in (lambda: score_pool(model, [x], device=device, progress=False),
                 lambda: rank_unlabeled(model, [x], k=2, device=device, progress=False),
                 lambda: explain(model, x, device=device)):
        with pytest.raises(UsageError, match=want):
            call()
    assert model.weight.device.type == "cpu"


@pytest.mark.parametrize("device", ["gpu", "tpu9", "cuda:x", ""])
def test_an_unknown_device_name_lists_the_valid_forms(device):
    """device='gpu' used to raise torch's "Expected one of cpu, cuda, ipu, xpu, mkldnn, ... device type
    at start of device string: gpu"."""
    from gradnorm_engine.errors import UsageError

    with pytest.raises(UsageError, match=rf"^unknown device device='{device}'; use 'cpu', 'cuda', 'cuda:N' "
                                         r"\(N a GPU index\), 'mps', or a torch.device, or leave device unset$"):
        score_pool(nn.Linear(5, 3), [torch.randn(4, 5)], device=device, progress=False)


def test_the_meta_device_is_refused_before_the_model_is_moved():
    """device='meta' moved the model there and could not move it back: its weights were gone."""
    from gradnorm_engine.errors import UsageError

    model = nn.Linear(5, 3)
    weight = model.weight.detach().clone()
    with pytest.raises(UsageError, match="device='meta' holds no data"):
        score_pool(model, [torch.randn(4, 5)], device="meta", progress=False)
    assert model.weight.device.type == "cpu" and torch.equal(model.weight.detach(), weight)


@pytest.mark.skipif(not hasattr(torch, "xpu") or torch.xpu.is_available(), reason="needs torch.xpu without an XPU")
def test_a_device_type_this_machine_lacks_is_refused_in_one_line():
    """device='xpu' failed deep inside with 'Torch not compiled with XPU enabled'."""
    from gradnorm_engine.errors import UsageError

    with pytest.raises(UsageError, match=r"^device='xpu' but xpu is not available on this machine"):
        score_pool(nn.Linear(5, 3), [torch.randn(4, 5)], device="xpu", progress=False)


def test_the_command_line_device_is_checked_by_the_same_rule():
    from gradnorm_engine.devices import resolve_device
    from gradnorm_engine.errors import UsageError

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match=r"^unknown device --device gpu; use cpu, cuda, cuda:N \(N a GPU index\) "
                                         r"or mps, or leave --device unset$"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match=r"^--device cuda but CUDA is not available on this machine .* pass "
                                             r"--device cpu or leave --device unset$"):
            resolve_device("cuda")


# --- a model that fails on the pool's inputs ------------------------------------------------------

def test_an_error_of_the_model_in_the_one_sample_probe_says_where_it_came_from():
    """The engine's one-sample memory probe ran a model fed the wrong width and let torch's "mat1 and
    mat2 shapes cannot be multiplied (1x7 and 5x3)" through with nothing saying that the 1 is one sample
    the engine chose, not the user's batch of 4. The model's own exception stays, with a note."""
    from gradnorm_engine.inputs import ModelInputs
    from gradnorm_engine.memory import activation_elems

    model = nn.Linear(5, 3)
    with pytest.raises(RuntimeError, match=r"1x7 and 5x3") as caught:
        activation_elems(model, torch.randn(1, 7))
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == 1 and "one sample of the pool, inputs (1, 7)" in notes[0] and "to size its chunks" in notes[0]

    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, input_ids, attention_mask):
            raise KeyError("no such token")

    with pytest.raises(KeyError) as caught:   # its own type, whatever it is
        ids = torch.zeros(1, 6, dtype=torch.long)
        activation_elems(Picky(), ModelInputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    assert "input_ids=(1, 6), attention_mask=(1, 6)" in caught.value.__notes__[0]
    assert activation_elems(model, torch.randn(1, 5)) == 5   # a model that runs: as before (max of 3 out, 5 in)

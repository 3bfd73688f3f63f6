"""The hooks backend's rules against the per-sample loop on every sample, in float64, with the
self-check against the loop out of the way: models built to make the recording misjudge where the
samples are. Each must come out exact from the rules or from the exact fallback, never from a
rule that read a gradient mixing samples."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnorm_engine import score_pool
from gradnorm_engine.backends.hooks import HooksBackend
from gradnorm_engine.backends.loop import LoopBackend
from gradnorm_engine.job import eval_mode, make_job

B = 4


def _job(model, **kw):
    return make_job(model, score=kw.get("score", "entropy"), params=None, logits_fn=None, device=None,
                    autocast=None, max_memory=None)


def unchecked_hooks(model, x, objective=None, **kw):
    """[B, K, P] from the hooks backend, the self-check against the loop disabled; and the engine."""
    engine = HooksBackend(_job(model, **kw))
    engine._agrees_with_loop = lambda *args: True
    with eval_mode(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine.sqnorms_per_loss(x, objective)[0], engine


def loop(model, x, objective=None, **kw):
    with eval_mode(model), torch.enable_grad():
        return LoopBackend(_job(model, **kw)).sqnorms_per_loss(x, objective)[0]


def assert_exact(model, x, objective=None, **kw):
    got, engine = unchecked_hooks(model, x, objective, **kw)
    want = loop(model, x, objective, **kw)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    return engine


class TwoLayers(nn.Module):
    """a -> tanh -> ``mix`` (a torch function of the batch) -> b."""

    def __init__(self, mix):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.mix = mix

    def forward(self, x):
        return self.b(self.mix(torch.tanh(self.a(x)), x))


def _flipped(n):
    return torch.arange(n).flip(0)


def _written(h, write):
    h = h.clone()
    write(h)
    return h


# Each mixes several samples' values into one sample's row after the parameter op `a`.
MIXING = {
    "minus the batch mean": lambda h, x: h - h.mean(0, keepdim=True),
    "sort along the batch": lambda h, x: h.sort(0).values,
    "cumsum along the batch": lambda h, x: h.cumsum(0),
    "softmax along the batch": lambda h, x: torch.softmax(h, 0),
    "normalize along the batch": lambda h, x: F.normalize(h, dim=0),
    "times the total": lambda h, x: h * h.sum(),
    "x @ x.T @ x": lambda h, x: h @ h.T @ h,
    "attention across the batch": lambda h, x: torch.softmax(h @ h.T, -1) @ h,
    "sdpa with the batch as the sequence": lambda h, x: F.scaled_dot_product_attention(h[None], h[None], h[None])[0],
    "einsum over the batch": lambda h, x: torch.einsum("bd,cd,ce->be", h, h, h),
    "times a permuted copy (index_select)": lambda h, x: h * h.index_select(0, _flipped(len(h))),
    "times a permuted copy (indexing)": lambda h, x: h * h[_flipped(len(h))],
    "times the first row (repeated index)": lambda h, x: h * h[torch.zeros(len(h), dtype=torch.long)],
    "times the first row (expand)": lambda h, x: h * h[:1].expand(len(h), -1),
    "times a gathered copy": lambda h, x: h * h.gather(0, _flipped(len(h))[:, None].expand(-1, h.shape[1])),
    "times a take_along_dim copy": lambda h, x: h * torch.take_along_dim(h, _flipped(len(h))[:, None], 0),
    "times a rolled copy (cat)": lambda h, x: h * torch.cat([h[1:], h[:1]]),
    "times a reversed copy (unbind, stack)": lambda h, x: h * torch.stack(list(h.unbind(0))[::-1]),
    "times a transposed reshape": lambda h, x: h * h.t().reshape(len(h), -1),
    "times a permuted reshape": lambda h, x: h * h.reshape(len(h), 2, 3).permute(1, 0, 2).reshape(len(h), 6),
    "where with a flipped copy": lambda h, x: torch.where(x[:, :1] > 0, h, h * h.flip(0)),
    "layer_norm over the batch": lambda h, x: F.layer_norm(h.t(), (len(h),)).t(),
    "cdist to the batch": lambda h, x: h * torch.cdist(h, h).sum(1, keepdim=True),
    "the last row written into the first": lambda h, x: _written(h, lambda t: t.__setitem__(0, t[-1] * 2)),
    "index_put_ of the last row": lambda h, x: _written(
        h, lambda t: t.index_put_((torch.tensor([0]),), t[-1:] * 3)),
}


@pytest.mark.parametrize("name", sorted(MIXING))
def test_parameters_below_a_mixing_op_go_to_the_fallback(name):
    """The gradient at `a`'s output holds several samples' losses: `a` must not be scored by its rule."""
    torch.manual_seed(0)
    model = TwoLayers(MIXING[name]).double()
    x = torch.randn(B, 4, dtype=torch.float64)
    engine = assert_exact(model, x)
    assert {"a.weight", "a.bias"} <= set(engine.last_fallback)


def test_a_mixing_model_is_scored_exactly_by_score_pool():
    torch.manual_seed(0)
    model = TwoLayers(MIXING["minus the batch mean"]).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    want = score_pool(model, [x], backend="loop", progress=False)
    for chunk in (7, 3):        # the self-check sees the first chunk only
        got = score_pool(model, [x], backend="hooks", chunk_size=chunk, progress=False)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_a_score_that_mixes_samples_sends_everything_to_the_fallback():
    """A user score whose row b reads other samples' logits: no rule may read its gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(B, 4, dtype=torch.float64)
    engine = assert_exact(model, x, score=lambda logits: (logits - logits.mean(0)).logsumexp(-1))
    assert set(engine.last_fallback) == {n for n, _ in model.named_parameters()}


def test_rowwise_losses_keep_the_rules():
    """cross_entropy and friends with reduction='none' keep each sample's loss in its row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(B, 4, dtype=torch.float64)
    for score in ("pseudo_label_ce",
                  lambda z: F.binary_cross_entropy_with_logits(z, torch.sigmoid(z).detach(), reduction="none").sum(1),
                  lambda z: F.mse_loss(z, torch.zeros_like(z), reduction="none").sum(1)):
        engine = assert_exact(model, x, score=score)
        assert engine.last_fallback == ()


def test_parameters_used_after_the_mixing_op_also_go():
    """`b` reads the mixed tensor (its layout is lost), `a` is below it: both to the fallback, exactly."""
    torch.manual_seed(0)
    model = TwoLayers(MIXING["minus the batch mean"]).double()
    engine = assert_exact(model, torch.randn(B, 4, dtype=torch.float64))
    assert set(engine.last_fallback) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert "mixes samples" in engine.last_reasons["a.weight"]


class CopiesIntoASlice(nn.Module):
    """h[:1].copy_(2 * h[-1:]): the write goes through a view of the batch dim that is already
    Unknown (a slice of the batch), into h, which `b` then reads as if each row were its sample's."""

    def __init__(self, write):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.write = write

    def forward(self, x):
        h = torch.tanh(self.a(x)).clone()
        self.write(h)
        return self.b(h)


WRITES_INTO_BATCH_SLICES = {
    "copy_ of another row into a slice": lambda h: h[:1].copy_(h[-1:] * 2),
    "mul_ of a slice of the batch": lambda h: h[1:].mul_(2),
    "in-place add into a slice of the batch": lambda h: h[1:].add_(h[:-1].clone()),
    "a constant into a slice of the batch": lambda h: h.__setitem__(slice(1, None), 0.5),
    "a constant into a slice of a slice": lambda h: h[1:].__setitem__((slice(None), 0), 0.5),
    "fill_ of a slice of the batch": lambda h: h[1:].fill_(0.5),
    "zero_ of one sample": lambda h: h[0].zero_() if len(h) > 1 else None,
}


@pytest.mark.parametrize("name", sorted(WRITES_INTO_BATCH_SLICES))
def test_writes_into_a_slice_of_the_batch_lose_the_layout(name):
    """The batched forward treats rows by their position in the batch, which a sample alone does not."""
    torch.manual_seed(0)
    model = CopiesIntoASlice(WRITES_INTO_BATCH_SLICES[name]).double()
    engine = assert_exact(model, torch.randn(B, 4, dtype=torch.float64))
    assert {"b.weight", "b.bias"} <= set(engine.last_fallback)


def _stale_view(write):
    def mix(h, x):
        h = h.clone()
        view = h.view(len(h), 2, 3)               # made before the write: its layout says (0, 1)
        write(h)
        return view.reshape(len(h), 6)
    return mix


STALE_VIEWS = {
    "zero_ of a slice of the batch through another view": lambda h: h.view(len(h), 2, 3)[1:].zero_(),
    "a constant into a slice of the batch": lambda h: h.__setitem__(slice(1, None), 0.5),
    "mul_ of a slice of the batch": lambda h: h[1:].mul_(3),
    "mul_ through a transposed view": lambda h: h.t()[:, 1:].mul_(3),
}


@pytest.mark.parametrize("name", sorted(STALE_VIEWS))
def test_a_view_made_before_a_write_into_its_memory_loses_its_layout(name):
    """`b` reads a view of h made before h's rows were treated by their position in the batch."""
    torch.manual_seed(0)
    model = TwoLayers(_stale_view(STALE_VIEWS[name])).double()
    engine = assert_exact(model, torch.randn(B, 4, dtype=torch.float64))
    assert {"b.weight", "b.bias"} <= set(engine.last_fallback)


class FeatureWrites(nn.Module):
    """Writes that keep each sample's row its own (a feature slice, an in-place activation, a
    sibling view scaled in place): the rules keep every parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x)).clone()
        q, k = h.view(len(h), 2, 3)[:, 0], h.view(len(h), 2, 3)[:, 1]
        q.mul_(2)                                  # a sibling view written: k's memory is h's too
        h[:, :2] = 0.5
        torch.relu_(h[:, 4:])
        return self.b(torch.cat([k, h[:, 3:]], 1))


def test_writes_that_keep_the_samples_apart_keep_the_rules():
    torch.manual_seed(0)
    engine = assert_exact(FeatureWrites().double(), torch.randn(B, 4, dtype=torch.float64))
    assert engine.last_fallback == ()


class OffsetFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.randn(4))
        self.b = nn.Linear(4, 3)

    def forward(self, x):                          # (x + offset saves no inference tensor for backward)
        return self.b(torch.tanh(x + self.offset))


def test_inputs_made_in_inference_mode():
    """Inference tensors have no version counter: the recording reads their layout all the same."""
    torch.manual_seed(0)
    model = OffsetFirst().double()
    with torch.inference_mode():
        x = torch.randn(B, 4, dtype=torch.float64)
    engine = assert_exact(model, x)
    assert engine.last_fallback == ()


class LooksUpATable(nn.Module):
    """A parameter table [6, 6] read with each sample's ids: gather, index_select, indexing."""

    def __init__(self, how):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.table = nn.Parameter(torch.randn(6, 6))
        self.how = how

    def forward(self, x):
        ids = (x[:, 0].abs() * 3).long().clamp(0, 5)                  # [B]
        return self.b(torch.tanh(self.a(x)) * self.how(self.table, ids))


TABLE_LOOKUPS = {
    "gather": lambda table, ids: table.gather(0, ids[:, None].expand(-1, 6)),
    "index_select": lambda table, ids: table.index_select(0, ids),
    "indexing": lambda table, ids: table[ids],
}


@pytest.mark.parametrize("name", sorted(TABLE_LOOKUPS))
def test_a_table_looked_up_with_each_samples_ids_keeps_the_rules(name):
    """The lookup keeps each sample's row its own: nothing below it needs the fallback."""
    torch.manual_seed(0)
    engine = assert_exact(LooksUpATable(TABLE_LOOKUPS[name]).double(), torch.randn(B, 4, dtype=torch.float64))
    assert engine.last_fallback == ()

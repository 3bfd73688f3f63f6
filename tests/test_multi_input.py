"""Models of several inputs: mapping batches passed by keyword, tuple batches by position, every
tensor of a sample kept together through chunks and backends, and scores that do not depend on
how much padding a sample's batch got."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from gradnorm_engine import rank_unlabeled, score_pool
from gradnorm_engine.backends import BACKENDS
from gradnorm_engine.inputs import IgnoredInputWarning
from tests.reference import max_rel_err
from tests.token_models import MaskedBag, TokenPool, pad_collate

pytestmark = pytest.mark.usefixtures("one_thread")


def loop_reference(model: nn.Module, pool: TokenPool) -> torch.Tensor:
    """Each sample alone, unpadded, one backward each, in float64: || d H / d theta ||."""
    out = []
    for i in range(len(pool)):
        item = pool[i]
        logits = model(item["input_ids"][None], item["attention_mask"][None])
        p = logits.log_softmax(-1)
        h = -(p.exp() * p).sum()
        grads = torch.autograd.grad(h, [q for q in model.parameters()], allow_unused=True)
        out.append(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
    return torch.stack(out).detach()


@pytest.fixture(scope="module")
def bag():
    torch.manual_seed(0)
    return MaskedBag().double()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("batch_size, chunk_size", [(1, None), (4, None), (5, 2), (13, 3)])
def test_mapping_batches_of_any_padding_match_each_sample_alone(bag, backend, batch_size, chunk_size):
    pool = TokenPool()
    want = loop_reference(bag, pool)
    loader = DataLoader(pool, batch_size=batch_size, collate_fn=pad_collate)
    got = score_pool(bag, loader, backend=backend, chunk_size=chunk_size, progress=False)
    assert got.dtype == torch.float64 and max_rel_err(got, want) <= 1e-10, backend


def test_padding_to_a_fixed_length_changes_no_score(bag):
    pool = TokenPool()
    dynamic = score_pool(bag, DataLoader(pool, batch_size=4, collate_fn=pad_collate), progress=False)
    fixed = score_pool(bag, DataLoader(pool, batch_size=4, collate_fn=lambda b: pad_collate(b, to=16)),
                       progress=False)
    assert max_rel_err(fixed, dynamic) <= 1e-12


def test_tuple_batches_pass_num_inputs_positional_inputs(bag):
    pool = TokenPool()
    batch = pad_collate([pool[i] for i in range(len(pool))])
    as_tuple = [(batch["input_ids"], batch["attention_mask"], batch["labels"])]
    got = score_pool(bag, as_tuple, num_inputs=2, progress=False)
    assert max_rel_err(got, loop_reference(bag, pool)) <= 1e-10
    with pytest.raises(TypeError, match="num_inputs=3"):
        score_pool(bag, [(batch["input_ids"], batch["attention_mask"])], num_inputs=3, progress=False)


def test_labels_are_never_passed_and_keys_can_be_named_or_excluded(bag):
    pool = TokenPool()
    batch = pad_collate([pool[i] for i in range(6)])
    want = score_pool(bag, [batch], progress=False)   # MaskedBag raises if labels reach it
    named = score_pool(bag, [batch], input_keys=["input_ids", "attention_mask"], progress=False)
    assert torch.equal(named, want)
    with pytest.raises(ValueError, match="labels are never passed"):
        score_pool(bag, [batch], input_keys=["input_ids", "labels"], progress=False)
    with pytest.raises(TypeError, match="does not hold"):
        score_pool(bag, [batch], input_keys=["input_ids", "token_type_ids"], progress=False)
    with pytest.raises(TypeError, match="attention_mask"):   # the forward needs it: torch's own error
        score_pool(bag, [batch], exclude_keys=["attention_mask"], progress=False)


def test_an_input_the_forward_does_not_take_warns_that_it_is_not_passed():
    class IdsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(30, 4), nn.Linear(4, 3)

        def forward(self, input_ids):
            return self.head(self.emb(input_ids).mean(dim=1))

    model = IdsOnly()
    ids = torch.randint(0, 30, (5, 7))
    with pytest.warns(IgnoredInputWarning, match="attention_mask"):
        got = score_pool(model, [{"input_ids": ids, "attention_mask": torch.ones(5, 7)}], progress=False)
    assert torch.equal(got, score_pool(model, [ids], progress=False))


def test_a_single_input_pool_of_different_shapes_is_still_refused():
    from gradnorm_engine.errors import SampleShapeError

    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4))
    with pytest.raises(SampleShapeError, match="same shape"):
        score_pool(model, [torch.randn(3, 4), torch.randn(3, 5)], progress=False)


def test_rank_unlabeled_on_a_padded_pool_ranks_as_the_reference(bag):
    pool = TokenPool()
    want = loop_reference(bag, pool)
    res = rank_unlabeled(bag, DataLoader(pool, batch_size=3, collate_fn=pad_collate), k=5, progress=False)
    assert torch.equal(res.indices, torch.argsort(want, descending=True, stable=True)[:5])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("mask_rows", [2, 6])
@pytest.mark.parametrize("padded", [False, True])
def test_tensors_of_one_batch_with_other_leading_sizes_are_refused_by_name(bag, backend, mask_rows, padded):
    """An attention mask of 2 (or 6) rows next to input ids of 4 used to score 4 samples silently
    (the mask's missing or extra rows never looked at), or, padded, raise an IndexError deep in the
    hooks recording; every tensor passed must hold one row per sample."""
    ids = torch.randint(1, 30, (4, 11))
    mask = torch.ones(mask_rows, 11, dtype=torch.long)
    if padded:
        mask[:, 8:] = 0
    for chunk_size in (None, 2):
        with pytest.raises(ValueError, match=r"'input_ids' has 4, 'attention_mask' has "
                                             rf"{mask_rows}; every tensor of a batch must hold one row per sample"):
            score_pool(bag, [{"input_ids": ids, "attention_mask": mask}], backend=backend, chunk_size=chunk_size,
                       progress=False)
    with pytest.raises(ValueError, match=rf"element 0 has 4, element 1 has {mask_rows}; every tensor"):
        score_pool(bag, [(ids, mask)], num_inputs=2, progress=False)
    # the same in rank_unlabeled, and in a later batch of the pool (not only the first)
    good = {"input_ids": ids, "attention_mask": torch.ones(4, 11, dtype=torch.long)}
    with pytest.raises(ValueError, match="one row per sample"):
        rank_unlabeled(bag, [good, {"input_ids": ids, "attention_mask": mask}], k=2, progress=False)


def test_labels_of_another_leading_size_are_refused_with_the_fix(bag):
    pool = TokenPool()
    batch = pad_collate([pool[i] for i in range(4)])
    batch["labels"] = batch["labels"][:3]
    with pytest.raises(ValueError, match="4 inputs but 3 labels.*one row per sample, its labels included"):
        score_pool(bag, [batch], score="cross_entropy", progress=False)


def test_entries_that_are_not_passed_need_no_row_per_sample(bag):
    """What is not passed to the model (a 0-d index, a list of strings, an unused tensor of other rows)
    is not checked: only the model's inputs (and the labels a label-aware score reads) must agree."""
    pool = TokenPool()
    batch = pad_collate([pool[i] for i in range(4)])
    want = score_pool(bag, [batch], progress=False)
    extra = dict(batch, idx=torch.tensor(3), text=["a", "b"], other=torch.zeros(7))
    assert torch.equal(score_pool(bag, [extra], progress=False), want)

"""loaders.py: what the engine accepts as a pool, what it refuses, what it warns about."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset, get_worker_info

from gradnorm_engine import rank_unlabeled, score_pool


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def make_images(n: int = 10) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(1))


# --- a Dataset given as the pool ---------------------------------------------------------------

def test_a_map_style_dataset_is_a_pool_read_in_order():
    """A Dataset where a DataLoader is expected used to reach the model one unbatched sample at a
    time ("expected 4D input (got 3D input)"); it is read in order, batched by the engine."""
    model, x = make_model(), make_images(70)   # more than one engine batch
    dataset = TensorDataset(x, torch.zeros(70, dtype=torch.long))
    want = score_pool(model, DataLoader(dataset, batch_size=7), progress=False)
    assert torch.equal(score_pool(model, dataset, progress=False), want)
    res = rank_unlabeled(model, dataset, k=5, progress=False)
    assert torch.equal(res.indices, torch.argsort(want, descending=True, stable=True)[:5])
    assert torch.equal(score_pool(model, Subset(dataset, [3, 1, 2]), progress=False), want[[3, 1, 2]])


class NoLength(Dataset):
    def __getitem__(self, i):
        return torch.zeros(1, 6, 6)


def test_what_cannot_be_a_pool_is_named():
    with pytest.raises(TypeError, match="without __len__.*DataLoader"):
        score_pool(make_model(), NoLength(), progress=False)
    with pytest.raises(TypeError, match="pool must be a DataLoader, a Dataset or an iterable of batches, got int"):
        score_pool(make_model(), 3, progress=False)


# --- an IterableDataset read by several workers ----------------------------------------------

STREAM = 40


class Stream(IterableDataset):
    """Yields the whole stream from every worker: read by 2 workers, every sample comes twice."""

    def __init__(self):
        self.start, self.stop = 0, STREAM

    def __iter__(self):
        return iter(make_images(STREAM)[self.start:self.stop])


class SplitStream(IterableDataset):
    """Splits the stream between the workers itself (torch's documented pattern)."""

    def __iter__(self):
        info = get_worker_info()
        x = make_images(STREAM)
        return iter(x if info is None else x[info.id::info.num_workers])


def split_by_worker(_worker_id):
    info = get_worker_info()
    per = STREAM // info.num_workers
    info.dataset.start, info.dataset.stop = info.id * per, (info.id + 1) * per


def test_an_iterable_dataset_read_by_several_workers_is_refused_unless_it_is_split():
    """num_workers=2 over an IterableDataset gave 80 scores for 40 samples, silently."""
    model = make_model()
    with pytest.raises(ValueError, match=r"num_workers=2.*scored 2 times.*get_worker_info.*num_workers=0"):
        score_pool(model, DataLoader(Stream(), batch_size=8, num_workers=2), progress=False)
    single = score_pool(model, DataLoader(Stream(), batch_size=8), progress=False)
    assert single.numel() == STREAM
    for loader in (DataLoader(SplitStream(), batch_size=5, num_workers=2),
                   DataLoader(Stream(), batch_size=5, num_workers=2, worker_init_fn=split_by_worker)):
        order = torch.cat(list(loader))   # what the loader yields, in its order
        got = score_pool(model, loader, progress=False)
        assert got.numel() == STREAM
        assert torch.equal(got, score_pool(model, [order], progress=False))

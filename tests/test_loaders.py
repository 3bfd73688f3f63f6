"""loaders.py: what the engine accepts as a pool, what it refuses, what it warns about."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import (ConcatDataset, DataLoader, Dataset, IterableDataset, Subset, TensorDataset,
                              get_worker_info)

from gradnorm_engine import rank_unlabeled, score_pool
from gradnorm_engine.loaders import RandomTransformWarning


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


# --- random transforms in the pool's dataset ---------------------------------------------------

class RandomCrop:            # named like torchvision's: detected by class name, torchvision is not imported
    def __call__(self, x):
        return x


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, x):
        return x


class Normalize:
    def __call__(self, x):
        return x


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class StandardTransform:
    def __init__(self, transform):
        self.transform, self.target_transform = transform, None


class Images(Dataset):
    def __init__(self, transform=None, transforms=None, n=10):
        self.x, self.transform, self.transforms = make_images(n), transform, transforms

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] if self.transform is None else self.transform(self.x[i])


def _warnings_of(dataset):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score_pool(make_model(), DataLoader(dataset, batch_size=4), progress=False)
    return [w for w in caught if issubclass(w.category, RandomTransformWarning)]


@pytest.mark.parametrize("where", ["transform", "transforms", "subset", "concat", "pool_is_dataset"])
def test_random_transforms_in_the_pool_warn_once_with_the_fix(where):
    """DeepAL+ scores its pool with its training transform (RandomCrop + flip): scores that change
    on every pass, and nothing said so."""
    train = Compose([RandomCrop(), RandomHorizontalFlip(), Normalize()])
    dataset = {"transform": Images(transform=train),
               "transforms": Images(transforms=StandardTransform(train)),
               "subset": Subset(Images(transform=train), [0, 2, 4]),
               "concat": ConcatDataset([Images(), Subset(Images(transform=train), [1])]),
               "pool_is_dataset": Images(transform=train)}[where]
    if where == "pool_is_dataset":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            score_pool(make_model(), dataset, progress=False)
        found = [w for w in caught if issubclass(w.category, RandomTransformWarning)]
    else:
        found = _warnings_of(dataset)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert "RandomCrop, RandomHorizontalFlip" in message and "deterministic" in message and "\n" not in message
    assert found[0].filename == __file__   # attributed to the caller's line, not the engine's


def test_deterministic_transforms_do_not_warn():
    assert _warnings_of(Images(transform=Compose([Normalize(), RandomHorizontalFlip(p=0.0)]))) == []
    assert _warnings_of(Images()) == []


def test_torchvision_training_transforms_are_recognised():
    transforms = pytest.importorskip("torchvision.transforms")
    v2 = pytest.importorskip("torchvision.transforms.v2")

    class Tensors(Dataset):
        def __init__(self, transform):
            self.x, self.transform = make_images(6), transform

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.transform(self.x[i])

    for train in (transforms.Compose([transforms.RandomCrop(6, padding=1), transforms.RandomHorizontalFlip()]),
                  v2.Compose([v2.RandomResizedCrop(6, antialias=True), v2.ColorJitter(0.1)])):
        assert len(_warnings_of(Tensors(train))) == 1
    assert _warnings_of(Tensors(transforms.Compose([transforms.Normalize((0.5,), (0.25,))]))) == []


# --- a tensor given as the pool ----------------------------------------------------------------

def test_a_tensor_is_a_pool_of_its_rows():
    """A tensor given as the pool used to be iterated row by row, each sample [1, 6, 6] taken as a
    whole batch ("mat1 and mat2 shapes cannot be multiplied"); it is a pool of its rows, as [x]."""
    from gradnorm_engine import expected_gradient_length, per_parameter_sqnorms

    model, x = make_model(), make_images(70)   # more than one of the engine's reading batches
    want = score_pool(model, [x], progress=False)
    assert want.shape == (70,)
    assert torch.equal(score_pool(model, x, progress=False), want)
    assert torch.equal(score_pool(model, DataLoader(TensorDataset(x), batch_size=9), progress=False), want)
    assert torch.equal(score_pool(model, x, chunk_size=4, progress=False),
                       score_pool(model, [x], chunk_size=4, progress=False))
    res = rank_unlabeled(model, x, k=5, progress=False)
    assert torch.equal(res.indices, torch.argsort(want, descending=True, stable=True)[:5]) and res.pool_size == 70
    assert torch.equal(per_parameter_sqnorms(model, x, progress=False)[0],
                       per_parameter_sqnorms(model, [x], progress=False)[0])
    assert torch.equal(expected_gradient_length(model, x, progress=False),
                       expected_gradient_length(model, [x], progress=False))
    flat = nn.Linear(5, 3)   # a 2-D pool [N, D]: N samples, not N batches of D
    x2 = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(score_pool(flat, x2, progress=False), score_pool(flat, [x2], progress=False))


def test_a_tensor_pool_shards_into_the_blocks_of_its_rows():
    """Under torch.distributed each rank scores its block of the rows (the DataLoader the engine makes
    for the tensor is sharded like any other): the blocks' scores put together are the pool's."""
    from gradnorm_engine.distributed.sharding import check_shardable, loader_order, shard_loader
    from gradnorm_engine.loaders import as_pool

    model, x = make_model(), make_images(23)
    want = score_pool(model, x, progress=False)
    loader = as_pool(x)
    check_shardable(loader)
    for world in (2, 3):
        blocks = [shard_loader(loader, rank, world, loader_order(loader)) for rank in range(world)]
        assert [(start, stop) for _, start, stop in blocks] == [
            (r * (23 // world) + min(r, 23 % world), (r + 1) * (23 // world) + min(r + 1, 23 % world))
            for r in range(world)]
        got = torch.cat([score_pool(model, block, progress=False) for block, _, _ in blocks])
        assert torch.equal(got, want)


def test_a_0d_tensor_is_not_a_pool():
    with pytest.raises(TypeError, match="pool is a 0-d tensor; a tensor pool holds one sample per row"):
        score_pool(make_model(), torch.tensor(1.0), progress=False)

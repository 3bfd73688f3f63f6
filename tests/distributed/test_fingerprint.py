"""distributed/fingerprint.py: what the ranks compare about the pool's content, in this process."""
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from gradnorm_engine.distributed.fingerprint import SPREAD_ROWS, content_digest, spread


class Folder(Dataset):
    def __init__(self, root, names, labels):
        self.root, self.transform = root, object()   # neither is content
        self.samples = [(f"{root}/{n}", y) for n, y in zip(names, labels)]
        self.targets = list(labels)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        raise AssertionError("the fingerprint never reads a sample")


class Lazy(Dataset):
    def __init__(self, n):
        self.n, self.cache = n, {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raise AssertionError("the fingerprint never reads a sample")


def test_spread_rows_take_the_first_the_last_and_every_row_of_a_small_pool():
    assert spread(5) == [0, 1, 2, 3, 4]
    rows = spread(10_000)
    assert rows[0] == 0 and rows[-1] == 9_999 and len(rows) == SPREAD_ROWS


def test_tensor_content_is_compared():
    x = torch.randn(1000, 3)
    same = content_digest(TensorDataset(x.clone(), torch.arange(1000)))
    assert same.startswith("content ") and same == content_digest(TensorDataset(x, torch.arange(1000)))
    for row in (0, 999, spread(1000)[100]):
        changed = x.clone()
        changed[row, 1] += 1
        assert content_digest(TensorDataset(changed, torch.arange(1000))) != same, row
    assert content_digest(TensorDataset(x.double(), torch.arange(1000))) != same
    assert content_digest(x) != content_digest(x + 1)                                  # a tensor as the dataset
    assert content_digest(list(x[:5])) == content_digest(list(x[:5].clone()))          # a list of tensors
    assert content_digest(torch.zeros(3, dtype=torch.bfloat16)) != content_digest(torch.ones(3, dtype=torch.bfloat16))


def test_wrappers_and_indices_are_followed():
    base = TensorDataset(torch.randn(20, 2))
    assert content_digest(Subset(base, [1, 2, 3])) != content_digest(Subset(base, [3, 2, 1]))
    other = TensorDataset(torch.randn(20, 2))
    assert content_digest(ConcatDataset([base, other])) != content_digest(ConcatDataset([other, base]))
    assert content_digest(list(range(10))) != content_digest(list(range(1, 11)))       # an index list (the AL pool)


def test_file_lists_are_compared_relative_to_their_common_folder():
    names, labels = [f"c{i % 3}/img{i}.png" for i in range(30)], [i % 3 for i in range(30)]
    here = content_digest(Folder("/data/pool", names, labels))
    assert here == content_digest(Folder("/mnt/node7/scratch/pool", names, labels))   # mounted elsewhere
    assert here != content_digest(Folder("/data/pool", names[::-1], labels[::-1]))    # listed in another order
    assert here != content_digest(Folder("/data/pool", names, [0] * 30))              # other labels


def test_arrays_and_datasets_that_show_nothing():
    class Arrays(Dataset):
        def __init__(self, data):
            self.data, self.targets = data, [0, 1, 2, 3]

    a = np.arange(4 * 8, dtype=np.uint8).reshape(4, 8)
    assert content_digest(Arrays(a)) == content_digest(Arrays(a.copy()))
    assert content_digest(Arrays(a)) != content_digest(Arrays(a[::-1]))
    assert content_digest(Lazy(5)) == content_digest(Lazy(5)) == "content not shown"

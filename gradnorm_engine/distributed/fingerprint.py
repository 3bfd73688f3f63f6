"""What the ranks compare about the pool's content before scoring: what its dataset holds in memory.

    content_digest(dataset)   # -> "content 3f2a9c..." or "content not shown"

Every rank reads only its own block, so no rank can compare another rank's samples with its own.
What every rank can compare cheaply is what the dataset holds as plain attributes, without
calling ``__getitem__``: a TensorDataset's tensors; a tensor or list given as the dataset;
torchvision-style ``samples`` / ``imgs`` / ``files`` / ``paths`` / ``filenames`` (paths taken
relative to their common folder, so nodes may mount the data at different places), ``data``,
``targets`` / ``labels`` and ``indices``; a Hugging Face dataset's ``_fingerprint``; through
Subset, ConcatDataset and other wrappers (``.dataset``, ``.datasets``). Tensors and arrays are
compared at ``SPREAD_ROWS`` rows spread evenly over dim 0 (the first and the last included; every
row of a smaller one); lists of paths, labels and indices in full. A dataset that holds none of
these (it reads its samples lazily in ``__getitem__``) is "content not shown": then only the
length and the order are compared.
"""
from __future__ import annotations

import hashlib
from pathlib import PurePath

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

SPREAD_ROWS = 257
# Attributes that hold what a dataset is made of (never transforms, roots, caches or handles).
CONTENT_ATTRIBUTES = ("tensors", "samples", "imgs", "files", "paths", "filenames", "data", "targets", "labels",
                      "indices", "_fingerprint")
PLAIN = (str, bytes, int, float, bool, type(None), PurePath)
MAX_DEPTH = 6


def content_digest(dataset) -> str:
    """A short fingerprint of what ``dataset`` holds, to compare across ranks (module docstring)."""
    digest = _Digest()
    digest.dataset(dataset, 0)
    return f"content {digest.hash.hexdigest()}" if digest.shown else "content not shown"


def spread(n: int) -> list[int]:
    """Up to SPREAD_ROWS positions in 0..n-1, evenly spread, first and last included."""
    if n <= SPREAD_ROWS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (SPREAD_ROWS - 1)) for i in range(SPREAD_ROWS)})


class _Digest:
    def __init__(self):
        self.hash = hashlib.blake2b(digest_size=16)
        self.shown = False   # whether any content went in (not only type names)

    def add(self, text: str) -> None:
        self.hash.update(text.encode("utf-8", "surrogatepass") + b"\0")

    def dataset(self, ds, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        self.add(type(ds).__qualname__)
        if isinstance(ds, (torch.Tensor, list, tuple)) or _is_array(ds):
            self.value(ds)
        elif isinstance(ds, TensorDataset):
            for t in ds.tensors:
                self.value(t)
        elif isinstance(ds, Subset):
            self.value(ds.indices)
            self.dataset(ds.dataset, depth + 1)
        elif isinstance(ds, ConcatDataset):
            for part in ds.datasets:
                self.dataset(part, depth + 1)
        else:
            own = getattr(ds, "__dict__", {})
            for name in CONTENT_ATTRIBUTES:
                if name in own:
                    self.add(name)
                    self.value(own[name])
            inner = own.get("dataset")
            if isinstance(inner, Dataset):
                self.dataset(inner, depth + 1)
            for part in own.get("datasets") or ():
                if isinstance(part, Dataset):
                    self.dataset(part, depth + 1)

    def value(self, v) -> None:
        """Content of one attribute: tensors and arrays at spread rows, plain lists in full."""
        if isinstance(v, torch.Tensor):
            self._tensor(v)
        elif _is_array(v):
            self._array(v)
        elif isinstance(v, PLAIN):
            self.add(repr(v))
            self.shown = True
        elif isinstance(v, (list, tuple)):
            self.add(f"{type(v).__name__} of {len(v)}")
            leaves = _plain_leaves(v)
            if leaves is not None:
                self._plain(leaves)
            else:
                for i in spread(len(v)):
                    self.add(str(i))
                    self._element(v[i])
            self.shown = True
        else:
            self.add(type(v).__qualname__)

    def _element(self, v) -> None:
        if isinstance(v, (torch.Tensor, list, tuple, *PLAIN)) or _is_array(v):
            self.value(v)
        elif callable(getattr(v, "tobytes", None)):   # e.g. a PIL image: its pixels
            self.add(type(v).__qualname__)
            try:
                self.hash.update(v.tobytes())
                self.shown = True
            except Exception:  # noqa: BLE001 - what cannot be read is left out
                pass
        else:
            self.add(type(v).__qualname__)

    def _tensor(self, t: torch.Tensor) -> None:
        self.add(f"tensor {t.dtype} {tuple(t.shape)}")
        try:
            rows = t.detach()
            if rows.dim():
                rows = rows[spread(rows.shape[0])]
            rows = rows.cpu().contiguous().reshape(-1)
            self.hash.update(rows.view(torch.uint8).numpy().tobytes())
            self.shown = True
        except Exception:  # noqa: BLE001 - sparse, nested or meta tensors: shape and dtype only
            pass

    def _array(self, a) -> None:
        self.add(f"array {a.dtype} {tuple(a.shape)}")
        rows = a[spread(a.shape[0])] if a.ndim else a
        if a.dtype.kind == "O":   # Python objects: element by element
            for item in (rows.tolist() if rows.ndim else [rows.item()]):
                self._element(item)
        else:
            self.hash.update(rows.copy(order="C").tobytes())
        self.shown = True

    def _plain(self, leaves: list) -> None:
        """Plain values in full; paths relative to the folder all of them share."""
        paths = [x for x in leaves if isinstance(x, (str, PurePath)) and ("/" in str(x) or "\\" in str(x))]
        cut = 0
        if paths:
            low, high = min(map(str, paths)), max(map(str, paths))
            common = 0
            while common < min(len(low), len(high)) and low[common] == high[common]:
                common += 1
            cut = max(low.rfind("/", 0, common), low.rfind("\\", 0, common)) + 1
        for x in leaves:
            self.add(str(x)[cut:] if cut and isinstance(x, (str, PurePath)) and str(x)[:cut] == str(paths[0])[:cut]
                     else repr(x))


def _is_array(v) -> bool:
    """A numpy array (recognised without importing numpy)."""
    return type(v).__module__ == "numpy" and hasattr(v, "dtype") and hasattr(v, "shape") and hasattr(v, "tobytes")


def _plain_leaves(seq) -> list | None:
    """The leaves of a list of plain values or tuples of them ((path, label) pairs), or None."""
    leaves: list = []
    for item in seq:
        if isinstance(item, PLAIN):
            leaves.append(item)
        elif isinstance(item, (tuple, list)) and all(isinstance(x, PLAIN) for x in item):
            leaves.extend(item)
            leaves.append("\0")   # where an item ends
        else:
            return None
    return leaves

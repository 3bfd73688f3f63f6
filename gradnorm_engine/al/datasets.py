"""The datasets the active-learning loop runs on, each loaded once into uint8 image tensors.

    data = load_dataset("digits")                      # no download, 1,437 train / 360 test
    data = load_dataset("cifar10", root="data", download=True)
    data = load_dataset("folder", path="cifar10-jpeg.zip", train_root="cifar10/train",
                        test_root="cifar10/test")
    x, y = data.train.batch(indices, device, augment=True)   # x float [B, C, H, W], normalised

Every split becomes an ``ImageTensors``: images uint8 [N, C, H, W] plus labels int64 [N], so the
trainer can keep a whole split on the GPU and augment there (random crop with zero padding,
horizontal flip) without a DataLoader. Pool indices used by the loop are positions in
``data.train``.

Names:
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, 1 channel),
  values 0..16 rescaled to 0..255 and bilinearly upsampled to 16x16; fixed stratified split
  (``random_state=0``): 1,437 train, 360 test. Augmentation: crop with padding 2, no flip
  (a flipped digit is another symbol).
- ``cifar10``, ``cifar100``, ``svhn``: torchvision datasets under ``root`` (``download=True``
  fetches them). SVHN is not flipped.
- ``caltech101``, ``cdd``, ``folder``: ImageFolder layouts (a directory or a zip) read through
  ``gradnorm_engine.al.image_folders.open_image_folder``, resized to ``image_size`` (default 32).
  The test split is ``test_root`` / ``test_path`` when given, else a fixed stratified 20 % of
  the train folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..errors import UsageError
from ..extras import require

# Per-channel statistics used by the reference code for CIFAR; other datasets use their own
# train split's statistics.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

DIGITS_SIZE = 16
DIGITS_TEST = 360


@dataclass
class ImageTensors:
    """One split held as tensors.  images: uint8 [N, C, H, W]; labels: int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor      # float [C], in 0..1 units
    std: torch.Tensor       # float [C]
    pad: int = 4            # random-crop zero padding in pixels (0: no crop)
    flip: bool = True       # random horizontal flip

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> "ImageTensors":
        return ImageTensors(self.images.to(device), self.labels.to(device), self.mean, self.std, self.pad, self.flip)

    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.labels.numel() * 8

    def loader(self, indices: torch.Tensor, device: torch.device | str, batch_size: int = 256) -> DataLoader:
        """A DataLoader of normalised inputs [b, C, H, W] for ``indices``, in order, on ``device``
        (no labels, no augmentation): the pool a query or a check scores."""
        return DataLoader(indices.tolist(), batch_size=batch_size, shuffle=False,
                          collate_fn=lambda idx: self.batch(torch.tensor(idx), device)[0])

    def batch(self, indices: torch.Tensor, device: torch.device | str, *, augment: bool = False,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at ``indices`` as normalised float [B, C, H, W] on ``device``, and labels [B].

        With ``augment``: each image is shifted by a random crop of the zero-padded image
        (offsets uniform in 0..2*pad) and flipped with probability 1/2 (when ``flip``). The
        random numbers come from ``generator`` (a CPU generator), so a run is reproducible
        wherever the data lives.
        """
        idx = indices.to(self.images.device)
        x = self.images[idx].to(device, non_blocking=True).float().div_(255)
        y = self.labels[idx].to(device, non_blocking=True)
        if augment:
            x = _augment(x, self.pad, self.flip, generator)
        mean = self.mean.to(x.device).view(1, -1, 1, 1)
        std = self.std.to(x.device).view(1, -1, 1, 1)
        return (x - mean) / std, y


def _augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, per sample, as tensor ops."""
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        rows = (dy.view(b, 1) + torch.arange(h, device=x.device).view(1, h))  # (B, H)
        cols = (dx.view(b, 1) + torch.arange(w, device=x.device).view(1, w))  # (B, W)
        x = padded[torch.arange(b, device=x.device).view(b, 1, 1, 1),
                   torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1),
                   rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(b, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x


@dataclass
class ALDataset:
    """A train split (the pool the loop labels) and a test split."""

    name: str
    train: ImageTensors
    test: ImageTensors
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


def content_fingerprint(split: ImageTensors) -> str:
    """A cheap fingerprint of a split's content: BLAKE2b of its uint8 images and its labels, with
    their dtypes and shapes (CIFAR-10's train split: a fraction of a second)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (split.images, split.labels):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().data)
    return digest.hexdigest()


def _stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.float().div(255)
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def _stratified_split(labels: np.ndarray, test_size: int | float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    train_test_split = require("sklearn.model_selection", extra="al", feature="a stratified split",
                               distribution="scikit-learn").train_test_split
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_size, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def load_digits() -> ALDataset:
    """scikit-learn's 8x8 digits, upsampled to 16x16, fixed stratified 1,437 / 360 split."""
    sk_datasets = require("sklearn.datasets", extra="al", feature="the digits dataset", distribution="scikit-learn")
    bunch = sk_datasets.load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8), 0..1
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = _stratified_split(bunch.target, DIGITS_TEST)
    mean, std = _stats(images[train_idx])
    train = ImageTensors(images[train_idx], labels[train_idx], mean, std, pad=2, flip=False)
    test = ImageTensors(images[test_idx], labels[test_idx], mean, std, pad=2, flip=False)
    return ALDataset("digits", train, test, [str(i) for i in range(10)])


def _from_arrays(data: np.ndarray, labels, *, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(data))
    if channels_last:
        images = images.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    return images, torch.as_tensor(np.asarray(labels), dtype=torch.int64)


# Seconds a download may wait on a silent server before it gives up (torchvision sets none).
DOWNLOAD_TIMEOUT_S = 60.0


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision(name: str, root: str, download: bool) -> ALDataset:
    if download and os.path.exists(root) and not os.path.isdir(root):
        raise UsageError(f"--data-root {root} is a file; point it at a folder to download {name} into")
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return _read_torchvision(name, root, download)
    except RuntimeError as err:
        raise UsageError(f"{name} is not under {root} ({err}); pass --download to fetch it, "
                         f"or --data-root to point at the folder that holds it") from None
    except OSError as err:  # includes URLError and timeouts: offline, or the mirror is unreachable
        raise UsageError(f"could not download {name} into {root} ({err}); fetch it elsewhere and "
                         f"point --data-root at it") from None


def _read_torchvision(name: str, root: str, download: bool) -> ALDataset:
    tvd = require("torchvision.datasets", extra="al", feature=f"the {name} dataset")
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr = cls(root, train=True, download=download)
        te = cls(root, train=False, download=download)
        train = _from_arrays(tr.data, tr.targets, channels_last=True)
        test = _from_arrays(te.data, te.targets, channels_last=True)
        classes, mean, std, flip = list(tr.classes), torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD), True
    else:  # svhn
        tr = tvd.SVHN(root, split="train", download=download)
        te = tvd.SVHN(root, split="test", download=download)
        train = _from_arrays(tr.data, tr.labels, channels_last=False)
        test = _from_arrays(te.data, te.labels, channels_last=False)
        classes, flip = [str(i) for i in range(10)], False
        mean, std = _stats(train[0])
    return ALDataset(name, ImageTensors(*train, mean, std, 4, flip), ImageTensors(*test, mean, std, 4, flip), classes)


def _decode_folder(dataset, image_size: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an ImageFolder-like dataset, RGB, resized to image_size x image_size."""
    pil = require("PIL", extra="al", feature="image folders", distribution="Pillow")
    UnidentifiedImageError = pil.UnidentifiedImageError
    pil_to_tensor = require("torchvision.transforms.functional", extra="al", feature="image folders").pil_to_tensor
    n = len(dataset)
    if n == 0:
        raise UsageError(f"{where}: holds no images; expected <class>/<image> files")
    images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    for i in range(n):
        try:
            image, _ = dataset[i]
        except (UnidentifiedImageError, OSError) as err:
            raise UsageError(f"{where}: sample {i} is not a readable image ({err}); remove it or fix the folder") from None
        images[i] = pil_to_tensor(image.convert("RGB").resize((image_size, image_size)))
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


def _held_out_fifth(labels: np.ndarray, classes: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified 80/20 split of a folder without a test folder; too few images -> UsageError."""
    fix = "add images, or give a separate test folder with --test-root / --test-data (test_root= / test_path=)"
    counts = np.bincount(labels, minlength=len(classes))
    few = [f"{c} ({int(k)})" for c, k in zip(classes, counts) if k < 2]
    if few:
        raise UsageError(f"{where}: class(es) {', '.join(few[:5])}{' ...' if len(few) > 5 else ''} have fewer "
                         f"than 2 images, too few to hold out a stratified test fifth; {fix}")
    try:
        return _stratified_split(labels, 0.2)
    except ValueError as err:  # e.g. a fifth of the images is fewer than the classes
        reason = " ".join(str(err).split())
        raise UsageError(f"{where}: {len(labels)} images in {len(classes)} classes are too few to hold out "
                         f"a stratified test fifth ({reason}); {fix}") from None


def _folder(name: str, path: str | None, *, train_root: str | None, test_path: str | None,
            test_root: str | None, image_size: int) -> ALDataset:
    from .image_folders import open_image_folder
    if path is None:
        raise UsageError(f"dataset {name} is read from an image folder: pass --data PATH "
                         "(a folder in <class>/<image> layout, or a zip of one)")
    train_ds = open_image_folder(path, root=train_root, root_option="train_root= / --train-root")
    where = f"{path}{':' + train_root if train_root else ''}"
    images, labels = _decode_folder(train_ds, image_size, where)
    classes = list(train_ds.classes)
    if test_path is not None or test_root is not None:
        test_ds = open_image_folder(test_path or path, root=test_root, root_option="test_root= / --test-root")
        if list(test_ds.classes) != classes:
            raise UsageError(f"the test folder's classes ({len(test_ds.classes)}) differ from the train "
                             f"folder's ({len(classes)}); both need the same class folders")
        test_images, test_labels = _decode_folder(test_ds, image_size, f"{test_path or path}:{test_root or ''}")
    else:
        tr, te = _held_out_fifth(labels.numpy(), classes, where)
        tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
        images, labels, test_images, test_labels = images[tr_t], labels[tr_t], images[te_t], labels[te_t]
    mean, std = _stats(images)
    return ALDataset(name, ImageTensors(images, labels, mean, std, 4, True),
                     ImageTensors(test_images, test_labels, mean, std, 4, True), classes)


LOADERS: dict[str, Callable[..., ALDataset]] = {
    "digits": lambda **kw: load_digits(),
    "cifar10": lambda root, download, **kw: _torchvision("cifar10", root, download),
    "cifar100": lambda root, download, **kw: _torchvision("cifar100", root, download),
    "svhn": lambda root, download, **kw: _torchvision("svhn", root, download),
    "caltech101": lambda **kw: _folder("caltech101", **_folder_options(kw)),
    "cdd": lambda **kw: _folder("cdd", **_folder_options(kw)),
    "folder": lambda **kw: _folder("folder", **_folder_options(kw)),
}


def _folder_options(kw: dict) -> dict:
    return {k: kw.get(k) for k in ("path", "train_root", "test_path", "test_root")} | {
        "image_size": kw.get("image_size") or 32}


def dataset_names() -> list[str]:
    return list(LOADERS)


def load_dataset(name: str, *, root: str = "data", download: bool = False, path: str | None = None,
                 train_root: str | None = None, test_path: str | None = None, test_root: str | None = None,
                 image_size: int | None = None) -> ALDataset:
    """Load dataset ``name`` (see ``dataset_names()``) into tensors; bad names or paths -> UsageError."""
    if name not in LOADERS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}")
    if path is not None and not os.path.exists(path):
        raise UsageError(f"data path {path} does not exist; give a folder in <class>/<image> layout or a zip of one")
    if image_size is not None and image_size < 8:
        raise UsageError(f"--image-size {image_size} is too small; use at least 8 pixels")
    return LOADERS[name](root=root, download=download, path=path, train_root=train_root,
                         test_path=test_path, test_root=test_root, image_size=image_size)

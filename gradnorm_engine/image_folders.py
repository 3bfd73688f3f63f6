"""Image-classification folders (``root/<class>/<image>``), on disk or inside a zip.

    ds = open_image_folder("cifar10-jpeg.zip", root="cifar10/train", transform=ToTensor())
    ds = open_image_folder("data/pool")            # a plain directory

Both give ``classes``, ``class_to_idx``, ``samples`` [(name, label)], ``targets`` and
``__getitem__ -> (image, label)``, sorted by class then file name, like torchvision's
ImageFolder. A zip is read in place (no extraction); each worker process opens its own handle.
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import PurePosixPath
from typing import Callable

from PIL import Image
from torch.utils.data import Dataset

from .errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class ZipImageFolder(Dataset):
    def __init__(self, zip_path: str, root: str | None = None, transform: Callable | None = None):
        self.zip_path = os.fspath(zip_path)
        self.transform = transform
        with zipfile.ZipFile(self.zip_path) as zf:
            names = [n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTENSIONS)]
        self.root = _find_root(names, root, self.zip_path)
        prefix = self.root + "/" if self.root else ""
        by_class: dict[str, list[str]] = {}
        for n in names:
            if not n.startswith(prefix):
                continue
            parts = PurePosixPath(n[len(prefix):]).parts
            if len(parts) >= 2:
                by_class.setdefault(parts[0], []).append(n)
        if not by_class:
            raise UsageError(f"{self.zip_path}: no images in class folders under '{self.root or '/'}'; "
                             "expected <root>/<class>/<image> (pass root= / --root to name the folder)")
        self.classes = sorted(by_class)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(n, self.class_to_idx[c]) for c in self.classes for n in sorted(by_class[c])]
        self.targets = [label for _, label in self.samples]
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = os.getpid()
        with Image.open(io.BytesIO(self._zip.read(self.samples[index][0]))) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None  # each process opens its own handle
        return state


def _find_root(names: list[str], root: str | None, where: str) -> str:
    if root is not None:
        return root.strip("/")
    # The shallowest folder whose children are class folders holding images directly.
    parents = sorted({str(PurePosixPath(n).parent.parent) for n in names}, key=lambda p: (p.count("/"), p))
    if not parents:
        raise UsageError(f"{where}: holds no images in class folders")
    candidates = [p for p in parents if p.count("/") == parents[0].count("/")]
    if len(candidates) > 1:
        raise UsageError(f"{where}: several image folders could be meant ({', '.join(candidates[:5])}); "
                         "pass root= / --root to choose one")
    return "" if candidates[0] == "." else candidates[0]


def open_image_folder(path: str, root: str | None = None, transform: Callable | None = None) -> Dataset:
    """An ImageFolder-layout dataset from a directory or a zip file."""
    if not os.path.exists(path):
        raise UsageError(f"data path {path} does not exist; give a folder in ImageFolder layout "
                         "(<class>/<image>) or a zip of one")
    if zipfile.is_zipfile(path):
        return ZipImageFolder(path, root=root, transform=transform)
    if os.path.isdir(path):
        from torchvision.datasets import ImageFolder
        folder = os.path.join(path, root) if root else path
        try:
            return ImageFolder(folder, transform=transform)
        except (FileNotFoundError, RuntimeError) as err:
            raise UsageError(f"{folder}: not an image folder ({err}); expected <class>/<image> files") from None
    raise UsageError(f"data path {path} is neither a folder nor a zip file")

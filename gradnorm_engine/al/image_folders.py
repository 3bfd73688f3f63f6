"""Image-classification folders (``root/<class>/<image>``), on disk or inside a zip.

    ds = open_image_folder("cifar10-jpeg.zip", root="cifar10/train", transform=ToTensor())
    ds = open_image_folder("data/pool")            # a plain directory

Both give ``classes``, ``class_to_idx``, ``samples`` [(name, label)], ``targets`` and
``__getitem__ -> (image, label)``, sorted by class then file name, like torchvision's
ImageFolder. A zip is read in place (no extraction); each worker process opens its own handle.

A directory and a zip of it read the same way: hidden entries (names starting with ``.``, such as
macOS's ``._name.jpg`` resource forks) and ``__MACOSX/`` folders are skipped; a class folder
without images is refused; with no ``root`` the shallowest folder whose subfolders hold images is
used (``"."`` or ``""`` names the top level).
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import PurePosixPath
from typing import Callable

from torch.utils.data import Dataset

from ..errors import UsageError
from ..extras import require

Image = require("PIL.Image", extra="al", feature="gradnorm_engine.al.image_folders", distribution="Pillow")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
ROOT_OPTION = "root= / --root"


def _hidden(part: str) -> bool:
    """Entries every reader skips: hidden names (``.DS_Store``, ``._x.jpg``) and ``__MACOSX``."""
    return part.startswith(".") or part == "__MACOSX"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _clean_root(root: str | None) -> str | None:
    """``None`` (find it), or a relative posix folder; ``"."``, ``""`` and ``"/"`` are the top level."""
    if root is None:
        return None
    return "/".join(p for p in PurePosixPath(root.replace(os.sep, "/")).parts if p not in ("/", "."))


class _IndexedFolder(Dataset):
    """Shared indexing of ``entries`` (relative posix paths; folders end with ``/``)."""

    def _index(self, entries: list[str], root: str | None, where: str, root_option: str) -> None:
        skip = len(PurePosixPath(root).parts) if root else 0  # a hidden root the caller names is kept
        entries = [n for n in entries if not any(_hidden(p) for p in PurePosixPath(n).parts[skip:])]
        self.root = _find_root([n for n in entries if not n.endswith("/") and _is_image(n)], root, where, root_option)
        prefix = self.root + "/" if self.root else ""
        folders: set[str] = set()
        by_class: dict[str, list[str]] = {}
        for n in entries:
            if not n.startswith(prefix):
                continue
            parts = PurePosixPath(n[len(prefix):]).parts
            if n.endswith("/") and parts:
                folders.add(parts[0])          # an explicit folder entry, maybe empty
            elif len(parts) >= 2:
                folders.add(parts[0])
                if _is_image(n):
                    by_class.setdefault(parts[0], []).append(n)
        if not by_class:
            raise UsageError(f"{where}: not an image folder (no images in class folders under "
                             f"'{self.root or '.'}'); expected <root>/<class>/<image> (pass {root_option} "
                             "to name the folder that holds the class folders)")
        empty = sorted(folders - set(by_class))
        if empty:
            raise UsageError(f"{where}: class folder(s) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} "
                             f"under '{self.root or '.'}' hold no images; add images to them or remove them")
        self.classes = sorted(by_class)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        # Within a class: folder by folder, then file names, as torchvision's ImageFolder orders them.
        self._names = [n for c in self.classes
                       for n in sorted(by_class[c], key=lambda n: (str(PurePosixPath(n).parent), PurePosixPath(n).name))]
        self.targets = [self.class_to_idx[PurePosixPath(n[len(prefix):]).parts[0]] for n in self._names]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]


class ZipImageFolder(_IndexedFolder):
    def __init__(self, zip_path: str, root: str | None = None, transform: Callable | None = None,
                 *, root_option: str = ROOT_OPTION):
        self.zip_path = os.fspath(zip_path)
        self.transform = transform
        with zipfile.ZipFile(self.zip_path) as zf:
            names = zf.namelist()
        self._index(names, _clean_root(root), self.zip_path, root_option)
        self.samples = list(zip(self._names, self.targets))
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None

    def load(self, index: int) -> Image.Image:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = os.getpid()
        with Image.open(io.BytesIO(self._zip.read(self.samples[index][0]))) as im:
            return im.convert("RGB")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None  # each process opens its own handle
        return state


class DirImageFolder(_IndexedFolder):
    """A directory in ImageFolder layout; ``samples`` hold file paths (``folder/<class>/<image>``)."""

    def __init__(self, path: str, root: str | None = None, transform: Callable | None = None,
                 *, root_option: str = ROOT_OPTION):
        self.path = os.fspath(path)
        self.transform = transform
        root = _clean_root(root)
        top = os.path.join(self.path, *root.split("/")) if root else self.path  # walk only what is read
        entries = []
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            rel = os.path.relpath(dirpath, self.path).replace(os.sep, "/")
            rel = "" if rel == "." else rel + "/"
            if rel:
                entries.append(rel)
            entries.extend(rel + f for f in filenames)
        self._index(entries, root, self.path, root_option)
        self.samples = [(os.path.join(self.path, *n.split("/")), t) for n, t in zip(self._names, self.targets)]

    def load(self, index: int) -> Image.Image:
        with Image.open(self.samples[index][0]) as im:
            return im.convert("RGB")


def _find_root(names: list[str], root: str | None, where: str, root_option: str = ROOT_OPTION) -> str:
    if root is not None:
        return root
    # The shallowest folder whose children are class folders holding images directly (the top
    # folder "." is the shallowest of all; images deeper inside a class folder belong to it).
    def depth(folder: str) -> int:
        return len(PurePosixPath(folder).parts)   # "." has none

    parents = sorted({str(PurePosixPath(n).parent.parent) for n in names}, key=lambda p: (depth(p), p))
    if not parents:
        raise UsageError(f"{where}: not an image folder (holds no images in class folders); "
                         "expected <class>/<image> files")
    candidates = [p for p in parents if depth(p) == depth(parents[0])]
    if len(candidates) > 1:
        raise UsageError(f"{where}: several image folders could be meant ({', '.join(candidates[:5])}); "
                         f"pass the folder that holds the class folders with {root_option} ('.' for the top "
                         "folder, when the class folders hold their images in subfolders)")
    return "" if candidates[0] == "." else candidates[0]


def open_image_folder(path: str, root: str | None = None, transform: Callable | None = None,
                      *, root_option: str = ROOT_OPTION) -> Dataset:
    """An ImageFolder-layout dataset from a directory or a zip file.

    ``root``: the folder inside ``path`` that holds the class folders (``None``: find it; ``"."``:
    the top level). ``root_option``: how error messages name that setting to the caller's user.
    """
    if not os.path.exists(path):
        raise UsageError(f"data path {path} does not exist; give a folder in ImageFolder layout "
                         "(<class>/<image>) or a zip of one")
    if zipfile.is_zipfile(path):
        return ZipImageFolder(path, root=root, transform=transform, root_option=root_option)
    if os.path.isdir(path):
        clean = _clean_root(root)
        if clean and not os.path.isdir(os.path.join(path, clean)):
            raise UsageError(f"{path}: has no folder {root}; pass the folder that holds the class folders "
                             f"with {root_option}")
        return DirImageFolder(path, root=clean, transform=transform, root_option=root_option)
    raise UsageError(f"data path {path} is neither a folder nor a zip file")

import zipfile

import numpy as np
import pytest
from PIL import Image

from gradnorm_engine.errors import UsageError
from gradnorm_engine.image_folders import ZipImageFolder, open_image_folder


def make_folder(root, classes=("cat", "dog"), per_class=3, size=8):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def zip_folder(folder, zip_path, prefix="data/train"):
    with zipfile.ZipFile(zip_path, "w") as z:
        for p in sorted(folder.rglob("*.png")):
            z.write(p, f"{prefix}/{p.relative_to(folder)}")
    return zip_path


def test_zip_and_directory_agree(tmp_path):
    folder = make_folder(tmp_path / "pool")
    zpath = zip_folder(folder, tmp_path / "pool.zip")
    on_disk = open_image_folder(str(folder))
    zipped = open_image_folder(str(zpath))
    assert isinstance(zipped, ZipImageFolder) and zipped.root == "data/train"
    assert zipped.classes == on_disk.classes == ["cat", "dog"]
    assert zipped.targets == on_disk.targets == [0, 0, 0, 1, 1, 1]
    for i in range(len(on_disk)):
        assert np.array_equal(np.asarray(zipped[i][0]), np.asarray(on_disk[i][0]))


def test_zip_with_several_roots_asks_for_one(tmp_path):
    folder = make_folder(tmp_path / "pool")
    zpath = tmp_path / "two.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for split in ("train", "test"):
            for p in sorted(folder.rglob("*.png")):
                z.write(p, f"c/{split}/{p.relative_to(folder)}")
    with pytest.raises(UsageError, match="root"):
        open_image_folder(str(zpath))
    assert len(open_image_folder(str(zpath), root="c/test")) == 6


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        open_image_folder(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(UsageError, match="neither a folder nor a zip"):
        open_image_folder(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not an image folder"):
        open_image_folder(str(tmp_path / "empty"))

import zipfile

import numpy as np
import pytest
from PIL import Image

from gradnorm_engine.errors import UsageError
from gradnorm_engine.al.image_folders import ZipImageFolder, open_image_folder


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


def two_split_zip(folder, zip_path, prefix=""):
    """The class folders of ``folder`` twice, under <prefix>train/ and <prefix>test/."""
    with zipfile.ZipFile(zip_path, "w") as z:
        for split in ("train", "test"):
            for p in sorted(folder.rglob("*.png")):
                z.write(p, f"{prefix}{split}/{p.relative_to(folder)}")
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
    zpath = two_split_zip(make_folder(tmp_path / "pool"), tmp_path / "two.zip", "c/")
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


def test_macos_resource_forks_and_hidden_entries_are_skipped_in_zips_and_folders(tmp_path):
    folder = make_folder(tmp_path / "pool")
    zpath = tmp_path / "mac.zip"
    with zipfile.ZipFile(zpath, "w") as z:  # what macOS Finder's "Compress" writes
        for p in sorted(folder.rglob("*.png")):
            rel = p.relative_to(folder).as_posix()
            z.write(p, rel)
            z.writestr(f"__MACOSX/{p.parent.name}/._{p.name}", b"\x00\x05\x16\x07 fork")
        z.writestr("cat/.DS_Store", b"junk")
    # the same junk on disk
    (folder / "__MACOSX" / "cat").mkdir(parents=True)
    (folder / "__MACOSX" / "cat" / "._0.png").write_bytes(b"fork")
    (folder / "dog" / "._0.png").write_bytes(b"fork")
    (folder / ".thumbnails" / "x").mkdir(parents=True)
    (folder / ".thumbnails" / "x" / "0.png").write_bytes((folder / "cat" / "0.png").read_bytes())
    for ds in (open_image_folder(str(zpath)), open_image_folder(str(folder))):
        assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 0, 1, 1, 1]
        assert ds.root == "" and all(ds[i][0].size == (8, 8) for i in range(len(ds)))
    for root in (".", "", "./"):  # the top level, named explicitly
        assert open_image_folder(str(zpath), root=root).classes == ["cat", "dog"]
        assert open_image_folder(str(folder), root=root).classes == ["cat", "dog"]


def test_several_roots_message_names_the_callers_option(tmp_path):
    zpath = two_split_zip(make_folder(tmp_path / "pool"), tmp_path / "two.zip")
    with pytest.raises(UsageError, match=r"\(test, train\).*--root") as err:
        open_image_folder(str(zpath))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="--train-root") as err:
        open_image_folder(str(zpath), root_option="--train-root")
    assert "--root" not in str(err.value)


def test_empty_class_folder_is_refused_in_a_zip_as_in_a_directory(tmp_path):
    folder = make_folder(tmp_path / "pool")
    (folder / "empty").mkdir()
    zpath = tmp_path / "pool.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("empty/", b"")  # an empty folder exists in a zip only as an explicit entry
        for p in sorted(folder.rglob("*.png")):
            z.write(p, p.relative_to(folder).as_posix())
    for path in (folder, zpath):
        with pytest.raises(UsageError, match=r"class folder\(s\) empty .*hold no images; add images"):
            open_image_folder(str(path))
    # a zip without folder entries (the usual kind) still reads
    assert open_image_folder(str(zip_folder(folder, tmp_path / "plain.zip"))).classes == ["cat", "dog"]


def test_class_folders_with_subfolders_read_as_torchvision_reads_them(tmp_path):
    """Images inside subfolders of a class folder belong to the class, in torchvision's order
    (folder by folder, then file name), from a directory and from a zip of it."""
    import os

    from torchvision.datasets import ImageFolder

    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)

    top = tmp_path / "pool"
    for name in ("cat/2020/a.png", "cat/b.png", "cat/2019/z.png", "dog/c.png"):
        image(top / name)
    want = [os.path.relpath(p, top) for p, _ in ImageFolder(str(top)).samples]
    got = open_image_folder(str(top))
    assert got.classes == ["cat", "dog"]
    assert [os.path.relpath(p, top) for p, _ in got.samples] == want
    zip_path = tmp_path / "pool.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name in want:
            zf.write(top / name, name)
    assert [n for n, _ in open_image_folder(str(zip_path)).samples] == want
    # every image one level down in its class: ambiguous without a root, '.' says it
    deep = tmp_path / "deep"
    image(deep / "cat/x/a.png")
    image(deep / "dog/y/c.png")
    with pytest.raises(UsageError, match="'.' for the top"):
        open_image_folder(str(deep))
    assert open_image_folder(str(deep), root=".").classes == ["cat", "dog"]

"""Datasets: digits (embedded), image folders in a dir or zip, augmentation, bad input."""
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from gradnorm_engine.al.datasets import ImageTensors, _augment, load_dataset, load_digits
from gradnorm_engine.errors import UsageError


def test_digits_is_a_fixed_stratified_upsampled_split():
    a, b = load_digits(), load_digits()
    assert a.train.images.shape == (1437, 1, 16, 16) and a.test.images.shape == (360, 1, 16, 16)
    assert a.train.images.dtype == torch.uint8 and a.num_classes == 10 and a.in_channels == 1
    assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.test.images, b.test.images)
    # stratified: every class has 35 or 36 test samples
    assert set(torch.bincount(a.test.labels).tolist()) <= {35, 36, 37}
    # the 8x8 originals survive upsampling: downsampling back is close to them
    from sklearn.datasets import load_digits as sk
    raw = torch.tensor(sk().images, dtype=torch.float32) / 16
    x = a.train.images.float() / 255
    small = torch.nn.functional.avg_pool2d(x, 2)
    assert small.shape[-1] == 8
    assert (small.mean() - raw.mean()).abs() < 0.05


def test_batch_normalises_and_augments_on_request():
    data = load_digits()
    x, y = data.train.batch(torch.arange(64), "cpu")
    assert x.shape == (64, 1, 16, 16) and y.shape == (64,)
    # normalised with the train statistics: mean ~0, std ~1 over a large batch
    full, _ = data.train.batch(torch.arange(len(data.train)), "cpu")
    assert abs(full.mean().item()) < 1e-3 and abs(full.std().item() - 1) < 1e-2
    g = torch.Generator().manual_seed(0)
    xa, ya = data.train.batch(torch.arange(64), "cpu", augment=True, generator=g)
    assert xa.shape == x.shape and torch.equal(ya, y) and not torch.equal(xa, x)


def test_augment_is_a_shifted_crop_of_the_padded_image_and_a_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    g = torch.Generator().manual_seed(0)
    out = _augment(x, pad=1, flip=True, generator=g)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 3, (2,), generator=g), torch.randint(0, 3, (2,), generator=g)
    flips = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        crop = padded[i, :, dy[i]:dy[i] + 4, dx[i]:dx[i] + 4]
        torch.testing.assert_close(out[i], crop.flip(2) if flips[i] else crop)


def _write_folder(root, classes=("cat", "dog"), per_class=5, size=(12, 10)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_dir_and_zip(tmp_path):
    _write_folder(tmp_path / "pool" / "train")
    _write_folder(tmp_path / "pool" / "test", per_class=2)
    data = load_dataset("folder", path=str(tmp_path / "pool"), train_root="train", test_root="test", image_size=8)
    assert data.train.images.shape == (10, 3, 8, 8) and data.test.images.shape == (4, 3, 8, 8)
    assert data.classes == ["cat", "dog"]
    archive = tmp_path / "pool.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in (tmp_path / "pool").rglob("*.png"):
            zf.write(p, p.relative_to(tmp_path).as_posix())
    zipped = load_dataset("caltech101", path=str(archive), train_root="pool/train", test_root="pool/test", image_size=8)
    assert torch.equal(zipped.train.images, data.train.images)
    assert torch.equal(zipped.test.labels, data.test.labels)


def test_image_folder_without_test_split_holds_out_a_stratified_fifth(tmp_path):
    _write_folder(tmp_path / "cdd", per_class=10)
    data = load_dataset("cdd", path=str(tmp_path / "cdd"))
    assert len(data.train) == 16 and len(data.test) == 4
    assert data.image_size == 32
    assert torch.bincount(data.test.labels).tolist() == [2, 2]


def test_bad_dataset_input_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset("caltech101", path=str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="--data"):
        load_dataset("cdd")
    notes = tmp_path / "notes"
    (notes / "a").mkdir(parents=True)
    (notes / "a" / "readme.txt").write_text("not an image")
    with pytest.raises(UsageError):
        load_dataset("folder", path=str(notes))
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="not a readable image"):
        load_dataset("folder", path=str(broken))
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(UsageError):
        load_dataset("folder", path=str(csv))


def test_missing_torchvision_dataset_says_download(tmp_path):
    with pytest.raises(UsageError, match="--download"):
        load_dataset("cifar10", root=str(tmp_path))


def test_image_tensors_to_keeps_settings():
    t = ImageTensors(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), torch.zeros(1), torch.ones(1),
                     pad=2, flip=False)
    moved = t.to("cpu")
    assert (moved.pad, moved.flip, len(moved)) == (2, False, 2)


def test_folder_too_small_for_the_held_out_fifth_is_a_usage_error(tmp_path):
    _write_folder(tmp_path / "few", classes=("cat", "dog"), per_class=6)
    _write_folder(tmp_path / "few", classes=("bird",), per_class=1)
    with pytest.raises(UsageError, match=r"bird \(1\) have fewer than 2 images.*--test-root"):
        load_dataset("folder", path=str(tmp_path / "few"))
    _write_folder(tmp_path / "tiny", classes=("a", "b", "c"), per_class=2)  # 6 images: a fifth is 2 < 3 classes
    with pytest.raises(UsageError, match="too few to hold out a stratified test fifth.*--test-root"):
        load_dataset("folder", path=str(tmp_path / "tiny"))
    # with a separate test folder a single image per class is fine
    _write_folder(tmp_path / "test", classes=("bird", "cat", "dog"), per_class=1)
    data = load_dataset("folder", path=str(tmp_path / "few"), test_path=str(tmp_path / "test"), image_size=8)
    assert (len(data.train), len(data.test), data.classes) == (13, 3, ["bird", "cat", "dog"])


def test_folder_with_two_splits_and_no_root_names_train_root(tmp_path):
    _write_folder(tmp_path / "pool" / "train")
    _write_folder(tmp_path / "pool" / "test", per_class=2)
    with pytest.raises(UsageError, match="--train-root") as err:
        load_dataset("folder", path=str(tmp_path / "pool"))
    assert "--root " not in str(err.value)


def test_a_download_from_a_silent_server_gives_up_with_one_line(tmp_path, monkeypatch):
    """A server that accepts and never answers (here through a proxy): bounded, not a hang."""
    import socket
    import threading
    import time

    import gradnorm_engine.al.datasets as datasets

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True).start()
    proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(datasets, "DOWNLOAD_TIMEOUT_S", 0.5)
    start = time.monotonic()
    try:
        with pytest.raises(UsageError, match="could not download cifar10"):
            datasets.load_dataset("cifar10", root=str(tmp_path / "data"), download=True)
    finally:
        server.close()
    assert time.monotonic() - start < 30


def test_the_padding_of_an_augmented_image_is_black_before_it_is_normalised():
    """Augmenting pads with black (0) and normalising follows: the border is (0 - mean) / std."""
    mean, std = torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.1, 0.2, 0.3])
    images = torch.full((16, 3, 6, 6), 200, dtype=torch.uint8)
    split = ImageTensors(images, torch.zeros(16, dtype=torch.int64), mean, std, pad=2, flip=False)
    x, _ = split.batch(torch.arange(16), "cpu", augment=True, generator=torch.Generator().manual_seed(0))
    black = (-mean / std).view(1, 3, 1, 1).expand_as(x)
    image = ((200 / 255 - mean) / std).view(1, 3, 1, 1).expand_as(x)
    is_black, is_image = torch.isclose(x, black), torch.isclose(x, image)
    assert bool((is_black | is_image).all())
    assert int(is_black[:, 0].sum()) > 16   # some samples were shifted: their border rows / columns


def test_the_statistics_are_per_channel(tmp_path):
    """A folder whose red, green and blue channels have different spreads: each channel is
    normalised by its own mean and std (every other statistics test has one channel)."""
    rng = np.random.default_rng(0)
    spreads = [(120, 136), (0, 255), (60, 100)]
    for c in ("cat", "dog"):
        (tmp_path / "pool" / c).mkdir(parents=True)
        for i in range(10):
            pixels = np.stack([rng.integers(lo, hi, (8, 8)) for lo, hi in spreads], axis=-1).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "pool" / c / f"{i}.png")
    data = load_dataset("folder", path=str(tmp_path / "pool"), image_size=8)
    x = data.train.images.float() / 255
    torch.testing.assert_close(data.train.mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(data.train.std, x.std(dim=(0, 2, 3)))
    assert data.train.std[1] > 4 * data.train.std[0]
    full, _ = data.train.batch(torch.arange(len(data.train)), "cpu")
    torch.testing.assert_close(full.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)

import csv

import torch

from gradnorm_engine import rank_unlabeled
from gradnorm_engine.cli import main
from gradnorm_engine.al.image_folders import open_image_folder
from gradnorm_engine.al.models import small_cnn

from tests.al.test_image_folders import make_folder, zip_folder


def tiny_model(num_classes=2):
    return small_cnn(num_classes=num_classes, in_channels=3, width=4)


def test_rank_writes_the_same_picks_as_the_library(tmp_path):
    folder = make_folder(tmp_path / "pool", per_class=5)
    zpath = zip_folder(folder, tmp_path / "pool.zip")
    torch.manual_seed(0)
    model = tiny_model()
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "picks.csv"
    rc = main(["rank", "tests.commands.test_rank:tiny_model", "--checkpoint", str(ckpt), "--data", str(zpath),
               "--k", "4", "--out", str(out), "--normalize", "none", "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]

    import torchvision.transforms as T
    ds = open_image_folder(str(zpath), transform=T.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    res = rank_unlabeled(model, loader, 4, progress=False)
    assert [int(r["position"]) for r in rows] == res.indices.tolist()
    assert [r["file"] for r in rows] == [ds.samples[i][0] for i in res.indices.tolist()]
    assert torch.allclose(torch.tensor([float(r["score"]) for r in rows]), res.scores, rtol=1e-6)


def test_rank_errors_exit_2(tmp_path, capsys):
    assert main(["rank", "resnet18", "--data", str(tmp_path / "missing"), "--k", "3"]) == 2
    assert "does not exist" in capsys.readouterr().err
    folder = make_folder(tmp_path / "pool")
    assert main(["rank", "not_a_model", "--data", str(folder), "--k", "3"]) == 2
    assert "unknown torchvision model" in capsys.readouterr().err
    assert main(["rank", "resnet18", "--data", str(folder), "--k", "99"]) == 2
    assert "larger than the pool" in capsys.readouterr().err
    torch.save(tiny_model(num_classes=5).state_dict(), tmp_path / "wrong.pt")
    assert main(["rank", "tests.commands.test_rank:tiny_model", "--checkpoint", str(tmp_path / "wrong.pt"),
                 "--data", str(folder), "--k", "2"]) == 2
    assert "does not fit the model" in capsys.readouterr().err


# --- user-fixable failures exit 2 with one line, before the pool is scored ---

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

FACTORY_CALLS = []


def needs_depth(depth):
    return tiny_model()


def takes_nothing():
    return tiny_model(num_classes=2)


def broken_inside(num_classes=2):
    FACTORY_CALLS.append(num_classes)
    raise TypeError("bug inside the factory")


def returns_none(num_classes=2):
    return None


def _rank(folder, *extra):
    return main(["rank", "tests.commands.test_rank:tiny_model", "--data", str(folder), "--k", "2", "--normalize", "none",
                 "--no-progress", *extra])


def _one_line_error(capsys):
    # the notice about a missing --checkpoint aside (the tests' tiny models have none)
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "no --checkpoint given" not in line]
    assert len(lines) == 1 and lines[0].startswith("gradnorm-engine rank: error: "), lines
    return lines[0]


@pytest.fixture
def no_scoring(monkeypatch):
    """Fail the test if the pool gets scored: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the pool was scored before the options were checked")
    monkeypatch.setattr("gradnorm_engine.commands.rank.rank_unlabeled", refuse)


def test_rank_images_of_different_sizes_ask_for_image_size(tmp_path, capsys):
    folder = make_folder(tmp_path / "pool", per_class=2, size=8)
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(folder / "cat" / "big.png")
    assert _rank(folder, "--out", str(tmp_path / "a.csv")) == 2
    err = _one_line_error(capsys)
    assert "different sizes" in err and "--image-size" in err
    # the odd size alone in its batch: caught where the engine joins the batches
    assert _rank(folder, "--out", str(tmp_path / "c.csv"), "--batch-size", "1") == 2
    err = _one_line_error(capsys)
    assert "different sizes" in err and "--image-size" in err
    assert _rank(folder, "--out", str(tmp_path / "b.csv"), "--image-size", "8") == 0


@pytest.mark.parametrize("where", ["missing/picks.csv", "afile/picks.csv", "adir"])
def test_rank_checks_the_out_folder_before_scoring(tmp_path, capsys, no_scoring, where):
    folder = make_folder(tmp_path / "pool")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    assert _rank(folder, "--out", str(tmp_path / where)) == 2
    assert "--out" in _one_line_error(capsys)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_rank_names_an_unreadable_image(tmp_path, capsys, workers):
    folder = make_folder(tmp_path / "pool")
    (folder / "dog" / "broken.png").write_bytes(b"this is not a png")
    assert _rank(folder, "--out", str(tmp_path / "p.csv"), "--workers", workers) == 2
    err = _one_line_error(capsys)
    assert "broken.png" in err and "not a readable image" in err


@pytest.mark.parametrize("content", ["whole model", b"junk bytes, not a checkpoint", b""])
def test_rank_refuses_a_checkpoint_that_is_not_a_state_dict(tmp_path, capsys, no_scoring, content):
    folder = make_folder(tmp_path / "pool")
    ckpt = tmp_path / "model.pt"
    if content == "whole model":
        torch.save(tiny_model(), ckpt)
    else:
        ckpt.write_bytes(content)
    assert _rank(folder, "--checkpoint", str(ckpt), "--out", str(tmp_path / "p.csv")) == 2
    err = _one_line_error(capsys)
    assert "cannot read checkpoint" in err and "state_dict" in err


def test_rank_checks_the_device_before_scoring(tmp_path, capsys, no_scoring):
    folder = make_folder(tmp_path / "pool")
    assert _rank(folder, "--device", "tpu", "--out", str(tmp_path / "p.csv")) == 2
    assert "unknown device" in _one_line_error(capsys)
    if not torch.cuda.is_available():
        assert _rank(folder, "--device", "cuda", "--out", str(tmp_path / "p.csv")) == 2
        assert "CUDA is not available" in _one_line_error(capsys)


@pytest.mark.parametrize("option", ["--batch-size", "--workers", "--num-classes", "--image-size"])
def test_rank_refuses_non_positive_sizes(tmp_path, capsys, no_scoring, option):
    folder = make_folder(tmp_path / "pool")
    value = "-1" if option == "--workers" else "0"
    assert _rank(folder, option, value, "--out", str(tmp_path / "p.csv")) == 2
    assert option in _one_line_error(capsys)


def test_rank_model_factory_calls(tmp_path, capsys):
    folder = make_folder(tmp_path / "pool")
    out = str(tmp_path / "p.csv")
    args = ["--data", str(folder), "--k", "2", "--normalize", "none", "--no-progress", "--out", out]
    assert main(["rank", "tests.commands.test_rank:needs_depth", *args]) == 2
    err = _one_line_error(capsys)
    assert "tests.commands.test_rank:needs_depth" in err and "depth" in err
    assert main(["rank", "tests.commands.test_rank:returns_none", *args]) == 2
    assert "nn.Module" in _one_line_error(capsys)
    assert main(["rank", "tests.commands.test_rank:takes_nothing", *args]) == 0
    # A TypeError raised inside the factory is the factory's own bug: it propagates, after one call.
    FACTORY_CALLS.clear()
    with pytest.raises(TypeError, match="bug inside the factory"):
        main(["rank", "tests.commands.test_rank:broken_inside", *args])
    assert FACTORY_CALLS == [2]


def test_rank_under_torchrun_reports_a_ranks_bad_image_in_one_line(tmp_path):
    """Two gloo ranks: the unreadable image sits in rank 1's block; a rank exits 2 with one line."""
    import os
    import subprocess
    import sys

    folder = make_folder(tmp_path / "pool")
    (folder / "dog" / "zz-broken.png").write_bytes(b"this is not a png")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # holds tests/
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gradnorm_engine.cli",
         "rank", "tests.commands.test_rank:tiny_model", "--data", str(folder), "--k", "2", "--normalize", "none", "--no-progress",
         "--device", "cpu", "--out", str(tmp_path / "p.csv")],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("gradnorm-engine rank: error:")]
    # torchrun stops the other rank as soon as one exits, so one or both print the line
    assert errors and all("zz-broken.png" in e and "not a readable image" in e for e in errors), done.stderr
    assert "exitcode  : 2" in done.stderr   # torchrun's report of the ranks (its own traceback aside)


def test_rank_finds_a_factory_of_the_working_folder_and_warns_without_checkpoint(tmp_path, capsys, monkeypatch):
    import sys

    (tmp_path / "mynets_for_rank_test.py").write_text(
        "from gradnorm_engine.al.models import small_cnn\n"
        "def make(num_classes):\n    return small_cnn(num_classes=num_classes, in_channels=3, width=2)\n")
    folder = make_folder(tmp_path / "pool")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["rank", "mynets_for_rank_test:make", "--data", str(folder), "--k", "2", "--normalize", "none",
                 "--no-progress", "--out", str(tmp_path / "p.csv")]) == 0
    assert "no --checkpoint given" in capsys.readouterr().err


class NanLogits(torch.nn.Module):
    def __init__(self, num_classes=2):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3))) * float("nan")


def nan_logits(num_classes=2):
    return NanLogits(num_classes)


@pytest.mark.parametrize("model, extra, named, advice", [
    ("nan_logits", [], "NaN", "--checkpoint"),
    ("tiny_model", ["--num-classes", "1"], "single logit", "--num-classes"),
])
def test_rank_refuses_a_model_it_cannot_score_in_one_line(tmp_path, capsys, model, extra, named, advice):
    folder = make_folder(tmp_path / "pool")
    assert main(["rank", f"tests.commands.test_rank:{model}", "--data", str(folder), "--k", "2", "--no-progress",
                 "--out", str(tmp_path / "p.csv"), *extra]) == 2
    err = _one_line_error(capsys)
    assert named in err and advice in err
    assert "logits_fn" not in err and "score=" not in err   # the library's options, not the command's
    assert not (tmp_path / "p.csv").exists()


def _damaged_checkpoint(path, damage):
    import io
    import zipfile

    state = tiny_model().state_dict()
    if damage == "a list":
        torch.save([state], path)
        return
    if damage == "legacy format, truncated":
        buf = io.BytesIO()
        torch.save(state, buf, _use_new_zipfile_serialization=False)
        path.write_bytes(buf.getvalue()[:300])
        return
    buf = io.BytesIO()
    torch.save(state, buf)
    source, out = zipfile.ZipFile(buf), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:   # the archive intact, its pickle damaged
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = b"\x80\x02junkjunkjunk" if damage == "pickle replaced" else data.replace(b"weight", b"w\xffight")
            z.writestr(info.filename, data)
    path.write_bytes(out.getvalue())


@pytest.mark.parametrize("damage", ["a list", "legacy format, truncated", "pickle replaced", "bad utf-8 in the pickle"])
def test_rank_names_a_damaged_checkpoint_in_one_line(tmp_path, capsys, no_scoring, damage):
    folder = make_folder(tmp_path / "pool")
    ckpt = tmp_path / "model.pt"
    _damaged_checkpoint(ckpt, damage)
    assert _rank(folder, "--checkpoint", str(ckpt), "--out", str(tmp_path / "p.csv")) == 2
    err = _one_line_error(capsys)
    assert str(ckpt) in err and "torch.save(model.state_dict(), path)" in err
    assert not err.rstrip().endswith(":")


def test_the_engines_refusals_of_a_model_travel_between_ranks_whole():
    """Under torchrun a rank's error reaches the others pickled; rank names files by its positions."""
    import pickle

    from gradnorm_engine.commands.image_pool import unrankable_outputs
    from gradnorm_engine.distributed.exchange import picklable
    from gradnorm_engine.errors import NonFiniteScoreError, SingleLogitError

    err = NonFiniteScoreError("2 sample(s) got a non-finite score", [3, 5])
    back = pickle.loads(pickle.dumps(err))
    assert picklable(err) is err and type(back) is NonFiniteScoreError
    assert (str(back), back.positions) == (str(err), (3, 5))
    message = str(unrankable_outputs(back, [f"img{i}.png" for i in range(6)]))
    assert "2 image(s)" in message and "img3.png, img5.png" in message
    assert "--num-classes" in str(unrankable_outputs(pickle.loads(pickle.dumps(SingleLogitError("one"))), None))

"""gradnorm-engine score: every image's score with its file and class, as the library computes
it; the TracIn form sums lr_i x squared norms over checkpoints; mistakes are one line, exit 2."""
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradnorm_engine.al.image_folders import open_image_folder
from gradnorm_engine.al.models import small_cnn
from gradnorm_engine.cli import main
from tests.al.test_image_folders import make_folder


def tiny_model(num_classes=2):
    return small_cnn(num_classes=num_classes, in_channels=3, width=4)


SPEC = "tests.commands.test_score:tiny_model"


def folder_tensors(folder):
    import torchvision.transforms as T

    ds = open_image_folder(str(folder), transform=T.ToTensor())
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    return ds, x, y


def loop_sqnorm(model, x, y, params=None) -> torch.Tensor:
    """|| d CE(f(x_b), y_b) / d theta ||^2 by one backward per image (eval mode)."""
    model.eval()
    named = dict(model.named_parameters())
    chosen = [named[n] for n in params] if params else list(model.parameters())
    out = []
    for b in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[b:b + 1]), y[b:b + 1]), chosen)
        out.append(sum(g.double().pow(2).sum() for g in grads))
    return torch.stack(out).detach()


def test_score_writes_grand_scores_with_file_names_and_labels(tmp_path):
    folder = make_folder(tmp_path / "pool", per_class=4)
    torch.manual_seed(0)
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "scores.csv"
    assert main(["score", SPEC, "--checkpoint", str(tmp_path / "m.pt"), "--data", str(folder), "--normalize", "none",
                 "--score", "cross_entropy", "--batch-size", "3", "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    ds, x, y = folder_tensors(folder)
    assert [r["file"] for r in rows] == [name for name, _ in ds.samples]
    assert [r["label"] for r in rows] == [ds.classes[label] for _, label in ds.samples]
    assert [int(r["position"]) for r in rows] == list(range(8))
    want = loop_sqnorm(model, x, y).sqrt()
    np.testing.assert_allclose([float(r["score"]) for r in rows], want.numpy(), rtol=1e-4)


def test_tracin_self_influence_sums_lr_times_squared_norms_over_checkpoints(tmp_path):
    folder = make_folder(tmp_path / "pool", per_class=3)
    ds, x, y = folder_tensors(folder)
    models, paths = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(tiny_model())
        paths.append(str(tmp_path / f"c{seed}.pt"))
        torch.save(models[-1].state_dict(), paths[-1])
    chosen = [n for n, _ in models[0].named_parameters() if n.startswith("head")]
    out = tmp_path / "tracin.npz"
    assert main(["score", SPEC, "--checkpoints", ",".join(paths), "--lrs", "0.1,0.01", "--params", "head",
                 "--score", "cross_entropy", "--data", str(folder), "--normalize", "none", "--no-progress",
                 "--out", str(out)]) == 0
    saved = np.load(out)
    want = 0.1 * loop_sqnorm(models[0], x, y, chosen) + 0.01 * loop_sqnorm(models[1], x, y, chosen)
    np.testing.assert_allclose(saved["scores"], want.numpy(), rtol=1e-4)
    assert list(saved["files"]) == [name for name, _ in ds.samples] and list(saved["positions"]) == list(range(6))


@pytest.mark.parametrize("extra, words", [
    (["--lrs", "0.1"], "--lrs goes with --checkpoints"),
    (["--checkpoints", "a.pt,b.pt"], "--checkpoints needs --lrs"),
    (["--checkpoints", "a.pt,b.pt", "--lrs", "0.1"], "lists 2 file(s) but --lrs 1 rate(s)"),
    (["--checkpoints", "a.pt", "--lrs", "-1"], "--lrs must be positive"),
    (["--params", "layer9"], "--params layer9 names no parameter"),
    (["--checkpoints", "missing.pt", "--lrs", "1"], "missing.pt"),
])
def test_mistakes_are_one_line_and_exit_2(tmp_path, capsys, extra, words):
    folder = make_folder(tmp_path / "pool")
    assert main(["score", SPEC, "--data", str(folder), "--no-progress", "--out", str(tmp_path / "s.csv"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_classes_beyond_the_models_logits_are_one_line_and_exit_2(tmp_path, capsys):
    """A folder of 3 classes scored by a 2-logit model against its labels: torch's 'Target 2 is out of
    bounds' traceback before; now one line naming the counts and --num-classes."""
    folder = make_folder(tmp_path / "pool", classes=("cat", "dog", "emu"))
    torch.save(tiny_model().state_dict(), tmp_path / "m.pt")
    assert main(["score", SPEC, "--data", str(folder), "--num-classes", "2", "--score", "cross_entropy",
                 "--checkpoint", str(tmp_path / "m.pt"), "--no-progress", "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 class folders" in err[0] and "2 logits" in err[0] and "--num-classes" in err[0], err

import csv

import torch

from gradnorm_engine import rank_unlabeled
from gradnorm_engine.cli import main
from gradnorm_engine.image_folders import open_image_folder
from gradnorm_engine.models import small_cnn

from test_image_folders import make_folder, zip_folder


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
    rc = main(["rank", "test_cli_rank:tiny_model", "--checkpoint", str(ckpt), "--data", str(zpath),
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
    assert main(["rank", "test_cli_rank:tiny_model", "--checkpoint", str(tmp_path / "wrong.pt"),
                 "--data", str(folder), "--k", "2"]) == 2
    assert "does not fit the model" in capsys.readouterr().err

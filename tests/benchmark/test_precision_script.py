"""Smoke of bench/precision_fp32.py on a tiny model: every row and line is printed, and the
engine agrees with the batched reference (what the script is for); no precision is asserted
beyond that."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "precision_fp32.py"


@pytest.fixture(scope="module")
def precision_script():
    pytest.importorskip("sklearn.datasets")
    spec = importlib.util.spec_from_file_location("precision_fp32", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_precision_script_prints_every_backend(precision_script, capsys):
    threads = torch.get_num_threads()
    try:
        precision_script.main(["--model", "cifar", "--width", "2", "--size", "8", "--pool", "6", "--train", "12",
                               "--epochs", "1", "--chunk", "4", "--where", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if re.match(r"\| (hooks|vmap|loop) \|", line)}
    assert set(rows) == {"hooks", "vmap", "loop"}
    engine_vs_batched = float(rows["hooks"].split("|")[5].split("/")[2])   # its max
    assert engine_vs_batched < 1e-5
    for line in ("backend in float64", "Logits, max", "hooks: parameters where", "vmap: parameters where"):
        assert line in out

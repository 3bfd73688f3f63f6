"""The core install needs torch, numpy and tqdm only; what an extra brings is imported where it
is used, and a missing one raises an ImportError that names the extra."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from gradnorm_engine.extras import MissingExtraError, install_hint, require

REPO = Path(__file__).resolve().parents[1]

# Blocks the optional packages in a fresh interpreter, as on a machine with the core install only.
BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"torchvision", "PIL", "matplotlib", "sklearn", "pytest_benchmark"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
    sys.meta_path.insert(0, Block())
""")


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=180)


def test_the_engine_scores_and_the_command_line_starts_without_any_extra():
    done = run_without_extras("""
        import torch
        from gradnorm_engine import rank_unlabeled, score_pool
        from gradnorm_engine.cli import build_parser
        import gradnorm_engine.al.loop, gradnorm_engine.benchmark.runner   # import; need an extra only when used
        model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        scores = score_pool(model, [torch.randn(5, 4)], progress=False)
        assert scores.shape == (5,) and rank_unlabeled(model, [torch.randn(5, 4)], 2, progress=False).indices.numel() == 2
        build_parser()
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_what_needs_an_extra_names_it():
    done = run_without_extras("""
        from gradnorm_engine.extras import MissingExtraError
        from gradnorm_engine.al.datasets import load_digits
        from gradnorm_engine.al.report import plot_curves
        from gradnorm_engine.cli import main
        for attempt in (load_digits, lambda: plot_curves([], "x.png"), lambda: __import__("gradnorm_engine.al.image_folders")):
            try:
                attempt()
            except MissingExtraError as err:
                assert 'pip install -e ".[al]"' in str(err), err
            else:
                raise SystemExit("no error")
        assert main(["demo", "--skip-engine-check", "--out", "/nonexistent/x"]) == 2
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert 'gradnorm-engine demo: error: ' in done.stderr and '".[al]"' in done.stderr


def test_require_returns_the_module_or_names_the_extra():
    assert require("json", extra="al", feature="x").__name__ == "json"
    with pytest.raises(MissingExtraError, match=r'the thing needs no-such-package .* pip install -e "\.\[bench\]"'):
        require("no_such_module_xyz", extra="bench", feature="the thing", distribution="no-such-package")
    assert install_hint("al") == 'pip install -e ".[al]" (from the gradnorm-engine checkout)'


def test_every_package_of_the_source_tree_is_installed():
    """A package missing from pyproject.toml works in an editable install and is absent from a wheel."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "gradnorm_engine").rglob("__init__.py")}
    assert found | {"gradnorm_engine.kernels"} == listed

"""What a source checkout imports: its own tests package and its own kernels/, whatever else is installed."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHOW = ("import sys, gradnorm_engine, gradnorm_engine.kernels, gradnorm_engine.kernels.per_sample_sumsq; "
        "print(gradnorm_engine.__file__); print(sys.modules['gradnorm_engine.kernels'].__file__); "
        "print(sys.modules['gradnorm_engine.kernels.per_sample_sumsq'].__file__); "
        "print(list(gradnorm_engine.__path__))")


def _run(code: str, cwd: Path, pythonpath: str | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_an_installed_top_level_tests_package_does_not_shadow_the_repositorys(tmp_path):
    """small-text installs a top-level ``tests`` package into site-packages; tests/ is a regular
    package (tests/__init__.py), so the repository's wins wherever the other one lies on the path."""
    fake = tmp_path / "site" / "tests"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "architectures.py").write_text("raise ImportError('the installed tests package shadows the repository')")
    out = _run("import tests.architectures as a; print(a.__file__)", REPO, pythonpath=str(tmp_path / "site"))
    assert out == [str(REPO / "tests" / "architectures.py")]


def _copy_checkout(to: Path, *, wheel_layout: bool = False) -> Path:
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "gradnorm_engine", to / "gradnorm_engine", ignore=ignore)
    shutil.copytree(REPO / "kernels", to / ("gradnorm_engine/kernels" if wheel_layout else "kernels"), ignore=ignore)
    if not wheel_layout:
        shutil.copy(REPO / "pyproject.toml", to / "pyproject.toml")
        (to / "bench").mkdir()   # another top-level folder: must not become gradnorm_engine.bench
        (to / "bench" / "__init__.py").write_text("")
    return to


def test_a_checkout_imports_the_kernels_beside_its_own_package(tmp_path):
    """The editable install maps gradnorm_engine.kernels to one checkout's kernels/: a second
    checkout on the same venv used to test the first one's kernels."""
    copy = _copy_checkout(tmp_path / "checkout").resolve()
    package, kernels, submodule, path = _run(SHOW, copy)
    assert package == str(copy / "gradnorm_engine" / "__init__.py")
    assert kernels == str(copy / "kernels" / "__init__.py")
    assert submodule == str(copy / "kernels" / "per_sample_sumsq.py")
    assert path == str([str(copy / "gradnorm_engine")])   # nothing else mapped under the package
    out = _run("import importlib.util; print(importlib.util.find_spec('gradnorm_engine.bench'))", copy)
    assert out == ["None"]


def test_a_wheel_layout_keeps_its_own_kernels_folder(tmp_path):
    copy = _copy_checkout(tmp_path / "wheel", wheel_layout=True).resolve()
    _, kernels, submodule, _ = _run(SHOW, copy)
    assert kernels == str(copy / "gradnorm_engine" / "kernels" / "__init__.py")
    assert submodule == str(copy / "gradnorm_engine" / "kernels" / "per_sample_sumsq.py")

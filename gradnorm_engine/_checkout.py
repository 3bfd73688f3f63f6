"""``gradnorm_engine.kernels`` in a source checkout: the kernels/ folder beside this package.

pyproject.toml installs the top-level kernels/ as ``gradnorm_engine.kernels``. In a wheel it is a
real folder, gradnorm_engine/kernels/, and nothing here applies. An editable install maps the name
to the kernels/ of the checkout it was made from, so a second checkout run on the same virtual
environment would import the first one's kernels. ``load_checkout_kernels`` loads the kernels/
beside the imported gradnorm_engine instead, when that is a checkout of this project (a
pyproject.toml naming gradnorm-engine next to it). Only that one folder is mapped: the package's
``__path__`` is untouched, so no other top-level folder becomes importable under it.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PROJECT = 'name = "gradnorm-engine"'


def load_checkout_kernels(package: str, package_dir: str) -> None:
    here = Path(package_dir)
    name = f"{package}.kernels"
    if (here / "kernels" / "__init__.py").is_file() or name in sys.modules:
        return   # a wheel (or an installed copy) has the real folder; or someone loaded it already
    root = here.parent
    source = root / "kernels" / "__init__.py"
    try:
        is_checkout = source.is_file() and PROJECT in (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        is_checkout = False
    if not is_checkout:
        return
    spec = importlib.util.spec_from_file_location(name, source, submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    setattr(sys.modules[package], "kernels", module)

"""Optional dependencies, by the extra that installs them.

``pip install gradnorm-engine`` brings what the engine needs (torch, numpy, tqdm). The layers
above it import the rest only where it is used, through ``require``, so that a missing package
raises one ImportError naming the extra to install:

    al            torchvision, Pillow, matplotlib, scikit-learn: datasets, image folders, figures
    bench         torchvision, matplotlib, pytest-benchmark: the benchmark suite's models and plots
    integrations  baal, modAL, scikit-activeml, skorch, small-text: the adapters' libraries
    dev           the test tools
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = ("al", "bench", "dev", "integrations")


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
    return f'pip install -e ".[{extra}]" (from the gradnorm-engine checkout)'


def require(module: str, *, extra: str, feature: str, distribution: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or a MissingExtraError that names the fix.

    ``feature`` says what needs the module (a module path or a command), ``distribution`` the
    name pip knows the package by when it differs from the module's (``Pillow`` for ``PIL``).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; one of {EXTRAS}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = distribution or module.partition(".")[0]
        raise MissingExtraError(
            f"{feature} needs {package} (module {module!r}), which could not be imported ({err}); "
            f"install the {extra} extra: {install_hint(extra)}") from err

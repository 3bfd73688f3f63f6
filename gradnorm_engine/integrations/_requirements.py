"""Import an active-learning library for an adapter, or say which extra installs it.

The adapters import their library only when the adapter module itself is imported, so
``import gradnorm_engine`` never needs baal, modAL, scikit-activeml or skorch.
"""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = 'pip install -e ".[integrations]" (from the gradnorm-engine checkout)'


def require(module: str, *, distribution: str, adapter: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError that names the fix.

    ``distribution`` is the name pip knows the library by (``modAL-python`` for ``modAL``),
    ``adapter`` the gradnorm_engine module that needs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"gradnorm_engine.integrations.{adapter} needs {distribution} (module {module!r}), "
            f"which could not be imported ({err}); install the integrations extra: {INSTALL_HINT}"
        ) from err

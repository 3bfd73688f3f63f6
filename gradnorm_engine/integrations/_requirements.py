"""Import an active-learning library for an adapter, or say which extra installs it.

The adapters import their library only when the adapter module itself is imported, so
``import gradnorm_engine`` never needs baal, modAL, scikit-activeml or skorch.
"""
from __future__ import annotations

from types import ModuleType

from ..extras import install_hint, require as require_extra

INSTALL_HINT = install_hint("integrations")


def require(module: str, *, distribution: str, adapter: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError that names the fix.

    ``distribution`` is the name pip knows the library by (``modAL-python`` for ``modAL``),
    ``adapter`` the gradnorm_engine module that needs it.
    """
    return require_extra(module, extra="integrations", feature=f"gradnorm_engine.integrations.{adapter}",
                         distribution=distribution)

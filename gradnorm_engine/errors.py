"""Errors the user can fix; the command line prints them as one line and exits 2. And warnings,
attributed to the user's call."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


class UsageError(ValueError):
    """A bad option, name or path; the message says what is wrong and how to fix it."""


class SingleLogitError(ValueError):
    """The model gives fewer than two logits per sample: a softmax over one class is constant, so
    every entropy score would be 0."""


class LabelError(ValueError):
    """The labels a label-aware score reads are not what it takes (cross_entropy: one class index
    0..C-1 per sample)."""


class NonFiniteScoreError(ValueError):
    """Samples got a NaN or infinite score; ``positions`` are their pool positions."""

    def __init__(self, message: str, positions: tuple[int, ...] = ()):
        super().__init__(message)
        self.positions = tuple(positions)

    def __reduce__(self):   # pickled with its positions (errors travel between ranks)
        return type(self), (str(self), self.positions)


class SampleShapeError(ValueError):
    """Samples of one pool have different shapes, so they cannot be scored in one batch."""


class ZeroScoreWarning(UserWarning):
    """No measured parameter reaches the score: every sample scores 0, and a ranking of them is
    the pool order."""


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside gradnorm_engine: the user's call."""
    frame, level = sys._getframe(0), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

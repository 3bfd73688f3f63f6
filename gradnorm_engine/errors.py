"""Errors the user can fix; the command line prints them as one line and exits 2."""


class UsageError(ValueError):
    """A bad option, name or path; the message says what is wrong and how to fix it."""


class SingleLogitError(ValueError):
    """The model gives fewer than two logits per sample: a softmax over one class is constant, so
    every entropy score would be 0."""


class NonFiniteScoreError(ValueError):
    """Samples got a NaN or infinite score; ``positions`` are their pool positions."""

    def __init__(self, message: str, positions: tuple[int, ...] = ()):
        super().__init__(message)
        self.positions = tuple(positions)

    def __reduce__(self):   # pickled with its positions (errors travel between ranks)
        return type(self), (str(self), self.positions)


class SampleShapeError(ValueError):
    """Samples of one pool have different shapes, so they cannot be scored in one batch."""

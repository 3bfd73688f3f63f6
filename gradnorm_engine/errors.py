"""Errors the user can fix; the command line prints them as one line and exits 2."""


class UsageError(ValueError):
    """A bad option, name or path; the message says what is wrong and how to fix it."""


class SampleShapeError(ValueError):
    """Samples of one pool have different shapes, so they cannot be scored in one batch."""

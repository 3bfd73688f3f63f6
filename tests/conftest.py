"""Shared test setup.

Triton kernels run on the CPU through Triton's interpreter; the variable must be set before
triton is first imported, hence here.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

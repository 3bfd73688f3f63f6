"""Shared test setup.

Triton kernels run on the CPU through Triton's interpreter; the variable must be set before
triton is first imported, hence here.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# OpenMP threads that sleep instead of spinning while they wait: on a busy 2-core machine
# spinning threads made the suite several times slower. Read when torch loads, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: about as fast as two on an idle machine and
    far faster when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Test configuration.

Triton kernels run on CPU tensors through the interpreter; the variable must be set before triton
is first imported, so it is set here, before any test module imports specdiff_kernels.
"""
import os

import pytest

if not os.environ.get("SPECDIFF_TEST_GPU"):
    # On a CUDA machine set SPECDIFF_TEST_GPU=1 to run the Triton kernels compiled, not interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running statistical test")


@pytest.fixture
def gen():
    """A fixed-seed CPU generator: tests are deterministic."""
    return torch.Generator().manual_seed(1234)

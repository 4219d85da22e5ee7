"""Test configuration.

Triton kernels run on CPU tensors through the interpreter; the variable must be set before triton
is first imported, so it is set here, before any test module imports specdiff_kernels.
"""

import os

import pytest

if not os.environ.get("SPECDIFF_TEST_GPU"):
    # On a CUDA machine set SPECDIFF_TEST_GPU=1 to run the Triton kernels compiled, not interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One default config per kernel (no autotune benchmarking at every new size): the GPU tests
    # check every config explicitly (test_gpu.py::test_every_config) and the autotuned set once.
    os.environ.setdefault("SPECDIFF_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

from specdiff_kernels.ops.backends import CPU_CAPABILITIES  # noqa: E402  (after TRITON_INTERPRET is set)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running statistical test")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests (statistical sampler tests): extra
    threads only add synchronisation, which is very slow on a loaded 2-core machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(params=CPU_CAPABILITIES)
def cpu_capability(request):
    """Runs the test with the C++ kernels' `request.param` instruction-set variant (see
    csrc/cpu_isa.h), then restores the one in use. A variant this CPU cannot run is skipped."""
    from specdiff_kernels.ops import backends

    if not backends.HAS_CPP:
        pytest.skip("the C++ extension is not built")
    if request.param not in backends.cpu_capabilities():
        pytest.skip(f"this CPU does not support {request.param}")
    before = backends._C.set_cpu_capability(request.param)
    assert backends._C.cpu_capability() == request.param
    yield request.param
    backends._C.set_cpu_capability(before)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A tiny random DDPM pipeline folder (tiny_diffusers.tiny_pipeline), once per test module."""
    pytest.importorskip("diffusers")
    from tiny_diffusers import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("pipe"))


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Loading weights (a UNet, a network) or sampling fails the test: the CLI must refuse
    before any of it."""
    from specdiff_kernels.cli import sample as sample_cmd
    from specdiff_kernels.sampling.ancestral import AncestralSampler
    from specdiff_kernels.sampling.sampler import SpeculativeSampler

    def refuse(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(sample_cmd, "load_unet", refuse)
    monkeypatch.setattr(sample_cmd, "load_network", refuse)
    monkeypatch.setattr(AncestralSampler, "sample", refuse)
    monkeypatch.setattr(SpeculativeSampler, "sample", refuse)

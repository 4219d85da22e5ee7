"""What many test modules share while they are imported: the training schedule, seeded
generators, the single-thread marker, the ``specdiff`` command line, and the GPU-only modules'
skip. (The tiny diffusers components are in tiny_diffusers.py, which imports diffusers.)

Fixtures live in conftest.py; this module holds the plain functions and constants a test module
needs at import time (module constants, parametrisation lists, its ``pytestmark``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from specdiff_kernels.sampling.transitions import alphas_cumprod_from_betas, make_betas

# The training schedule of the toy models: linear betas 1e-4..0.02 over 1000 steps (float64).
ABAR = alphas_cumprod_from_betas(make_betas())

# tiny tensors: intra-op threads only add synchronisation (see conftest.single_thread)
SINGLE_THREAD = pytest.mark.usefixtures("single_thread")


def gen(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def cli_args(command: str, *args, out) -> list[str]:
    """A ``specdiff`` argument list for a run: ``command``'s words (flags and values without
    spaces), ``args`` as given (paths, a parametrised tail), then ``--no-progress --out out``."""
    return [*command.split(), *map(str, args), "--no-progress", "--out", str(out)]


def run_specdiff(*args: str, timeout: float, env: dict | None = None):
    """``python -m specdiff_kernels *args`` in a subprocess: the installed command as a user runs
    it; returns the CompletedProcess with its text output."""
    return subprocess.run(
        [sys.executable, "-m", "specdiff_kernels", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def skip_unless_compiled_triton(module: str, on_cpu: str) -> None:
    """Skips the calling GPU-only test module ``module`` (with the reason) without a CUDA device,
    or when conftest.py made Triton interpret (SPECDIFF_TEST_GPU unset); ``on_cpu`` names the
    module that tests the same code on CPU."""
    if not torch.cuda.is_available():
        pytest.skip(
            f"no CUDA device: {module} runs the compiled Triton kernels, only on a GPU machine "
            f"(on CPU: {on_cpu})",
            allow_module_level=True,
        )
    pytest.importorskip("triton")
    from specdiff_kernels.ops.triton import verify as tk

    if tk.INTERPRET:
        pytest.skip(
            "TRITON_INTERPRET=1 is set (conftest.py sets it unless SPECDIFF_TEST_GPU is set): "
            f"run `SPECDIFF_TEST_GPU=1 pytest python_tests/{module}` to test compiled kernels",
            allow_module_level=True,
        )

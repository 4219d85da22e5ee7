"""The Triton backend: ``torch.ops.specdiff.triton_*`` ops, the CUDA kernels of ``specdiff::*``, and
registration as backend ``"triton"`` of ``specdiff_kernels.ops.verify``.

Design
------
* Four ops ``specdiff::triton_gaussian_log_ratio``, ``triton_first_rejection``,
  ``triton_reflect_resample`` and ``triton_speculative_verify`` run the kernels of
  :mod:`specdiff_kernels.ops.triton.verify`. Each takes a trailing ``strategy: str = "auto"``
  ("per_chain" | "split" | "auto") so tests and benchmarks can force a launch strategy.
* Compiled (GPU) mode: they are ``torch.library.triton_op``s whose bodies launch the kernels through
  ``torch.library.wrap_triton``, so ``torch.compile``/Inductor sees the kernels (no opaque call) and
  the body doubles as the fake (meta) implementation. The CUDA kernels of the C++-defined
  ``specdiff::gaussian_log_ratio`` / ``first_rejection`` / ``reflect_resample`` /
  ``speculative_verify`` are registered to call them, so ``torch.ops.specdiff.speculative_verify``
  on CUDA tensors runs Triton. Nothing synchronises with the host (num_steps is clamped
  in-kernel), so the ops are CUDA-graph capturable once autotuning has run (warm up first).
* Interpreted mode (``TRITON_INTERPRET=1`` set before triton is imported: CPU tensors):
  ``wrap_triton`` refuses interpreted kernels, so the same names are defined as opaque
  ``torch.library.custom_op``s that launch the kernels directly, with explicit fake impls:
  ``torch.compile(fullgraph=True)`` keeps them as one node, no graph break. The backend is then
  registered for ("cpu", "cuda") tensors; otherwise for ("cuda",) only.

Importing this module registers backend ``"triton"`` (``ops.get_backend`` imports it lazily).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import verify as ops
from ..backends import REGISTRY, Backend
from .verify import INTERPRET, STRATEGIES, choose_strategy  # noqa: F401 (re-exported)
from .verify import first_rejection as _tk_first_rejection
from .verify import gaussian_log_ratio as _tk_gaussian_log_ratio
from .verify import reflect_resample as _tk_reflect_resample
from .verify import speculative_verify as _tk_speculative_verify

DEVICES: tuple[str, ...] = ("cpu", "cuda") if INTERPRET else ("cuda",)


def _define(name: str, impl, fake):
    """triton_op (visible to Inductor) when compiled; opaque custom_op + fake when interpreting."""
    if INTERPRET:
        op = torch.library.custom_op(name, impl, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, impl, mutates_args=())


def _strategy(strategy: str) -> Optional[str]:
    if strategy == "auto":
        return None
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'auto', 'per_chain' or 'split', got {strategy!r}")
    return strategy


# ---------------------------------------------------------------- implementations
def _speculative_verify_impl(draft_states: Tensor, draft_means: Tensor, target_means: Tensor,
                             sigma: Tensor, uniforms: Tensor, num_steps: Optional[Tensor] = None,
                             strategy: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    return _tk_speculative_verify(draft_states, draft_means, target_means, sigma, uniforms,
                                  num_steps, _strategy(strategy))


def _gaussian_log_ratio_impl(draft_states: Tensor, draft_means: Tensor, target_means: Tensor,
                             sigma: Tensor, strategy: str = "auto") -> Tensor:
    return _tk_gaussian_log_ratio(draft_states, draft_means, target_means, sigma,
                                  _strategy(strategy))


def _reflect_resample_impl(draft_state: Tensor, draft_mean: Tensor, target_mean: Tensor,
                           strategy: str = "auto") -> Tensor:
    return _tk_reflect_resample(draft_state, draft_mean, target_mean, _strategy(strategy))


def _first_rejection_impl(log_ratio: Tensor, uniforms: Tensor,
                          num_steps: Optional[Tensor] = None) -> Tensor:
    return _tk_first_rejection(log_ratio, uniforms, num_steps)


# fake impls (interpreted mode): the ones of the C++-defined ops (ops.py)
triton_speculative_verify = _define("specdiff::triton_speculative_verify",
                                    _speculative_verify_impl, ops.fake_speculative_verify)
triton_gaussian_log_ratio = _define("specdiff::triton_gaussian_log_ratio",
                                    _gaussian_log_ratio_impl, ops.fake_gaussian_log_ratio)
triton_reflect_resample = _define("specdiff::triton_reflect_resample",
                                  _reflect_resample_impl, ops.fake_reflect_resample)
triton_first_rejection = _define("specdiff::triton_first_rejection",
                                 _first_rejection_impl, ops.fake_first_rejection)


# ---------------------------------------------------------------- forwarding to the Triton ops
# (the CUDA kernels of specdiff::* and the "triton" backend entry)
def _fwd_speculative_verify(draft_states, draft_means, target_means, sigma, uniforms,
                             num_steps=None):
    return torch.ops.specdiff.triton_speculative_verify(draft_states, draft_means, target_means,
                                                        sigma, uniforms, num_steps)


def _fwd_gaussian_log_ratio(draft_states, draft_means, target_means, sigma):
    return torch.ops.specdiff.triton_gaussian_log_ratio(draft_states, draft_means, target_means,
                                                        sigma)


def _fwd_reflect_resample(draft_state, draft_mean, target_mean):
    return torch.ops.specdiff.triton_reflect_resample(draft_state, draft_mean, target_mean)


def _fwd_first_rejection(log_ratio, uniforms, num_steps=None):
    return torch.ops.specdiff.triton_first_rejection(log_ratio, uniforms, num_steps)


_CUDA_LIB: Optional[torch.library.Library] = None
if ops.HAS_CPP:  # the schemas come from the C++ extension (csrc/registration.cpp)
    _CUDA_LIB = torch.library.Library("specdiff", "IMPL")
    for _name, _fn in (("speculative_verify", _fwd_speculative_verify),
                       ("gaussian_log_ratio", _fwd_gaussian_log_ratio),
                       ("reflect_resample", _fwd_reflect_resample),
                       ("first_rejection", _fwd_first_rejection)):
        torch.library.register_kernel(f"specdiff::{_name}", "cuda", _fn, lib=_CUDA_LIB)


# ---------------------------------------------------------------- backend "triton"
# The same forwarding functions serve the backend entry (any device the kernels run on).
REGISTRY.register(Backend("verify", "triton", {"gaussian_log_ratio": _fwd_gaussian_log_ratio,
                                              "first_rejection": _fwd_first_rejection,
                                              "reflect_resample": _fwd_reflect_resample,
                                              "speculative_verify": _fwd_speculative_verify},
                         devices=DEVICES))

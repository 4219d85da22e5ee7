"""What the Triton op families (:mod:`.verify`, :mod:`.round`) share: the interpreter switch, op
definition and CUDA registration, launch helpers, and the device functions of the accept rule.

Two modes, fixed when triton is imported:

* compiled (GPU): ops are ``torch.library.triton_op``s that launch through ``wrap_triton``, so
  ``torch.compile``/Inductor sees the kernels (the body doubles as the fake implementation);
* interpreted (``TRITON_INTERPRET=1``, CPU tensors): ``wrap_triton`` refuses interpreted kernels, so
  ops are opaque ``torch.library.custom_op``s with explicit fakes that launch the kernels directly.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # wrap_triton lets make_fx / Inductor see the kernels inside a triton_op
    from torch.library import wrap_triton
except ImportError:  # pragma: no cover - torch < 2.6
    from torch._library.triton import wrap_triton  # type: ignore


# ---------------------------------------------------------------- device functions
@triton.jit
def accept(lr, u):
    """Step accepted iff its log ratio is finite and log(u) <= log ratio (u = 0 always accepts)."""
    return (tl.abs(lr) < float("inf")) & (tl.log(u) <= lr)


@triton.jit
def reflect_coef(a, b):
    """1 - 2a/b, or 1 where b = 0 (p = q: the reflection is the identity); never divides by 0."""
    pos = b > 0
    return tl.where(pos, 1.0 - 2.0 * a / tl.where(pos, b, 1.0), 1.0)


# ---------------------------------------------------------------- mode
INTERPRET = type(accept).__name__ == "InterpretedFunction"
DEVICES: tuple[str, ...] = ("cpu", "cuda") if INTERPRET else ("cuda",)
_INTERP_NUM_SMS = 4  # the nominal device size under the interpreter


def define(name: str, impl: Callable, fake: Callable):
    """Op ``name`` running ``impl``: a triton_op (visible to Inductor) when compiled; an opaque
    custom_op with ``fake`` when interpreting. The schema is inferred from ``impl``'s signature."""
    if INTERPRET:
        op = torch.library.custom_op(name, impl, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, impl, mutates_args=())


def register_cuda(kernels: dict[str, Callable]) -> torch.library.Library:
    """Register ``kernels`` (op name -> function) as the CUDA kernels of the C++-defined
    ``specdiff::*`` schemas. Keep the returned library alive: it holds the registrations."""
    lib = torch.library.Library("specdiff", "IMPL")
    for name, fn in kernels.items():
        torch.library.register_kernel(f"specdiff::{name}", "cuda", fn, lib=lib)
    return lib


def launchable(kernel):
    """The kernel as a launch inside an op body: wrapped for Inductor when compiled."""
    return kernel if INTERPRET else wrap_triton(kernel)


def quiet():
    """The interpreter evaluates kernels with numpy, which warns on log(0) (u = 0 accepts) and on
    inf - inf in non-finite inputs; compiled kernels do not warn. Silence numpy while
    interpreting."""
    if INTERPRET:
        import numpy as np

        return np.errstate(divide="ignore", invalid="ignore", over="ignore")
    return contextlib.nullcontext()


def contig(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms_of(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda" and not INTERPRET:
        return torch.cuda.get_device_properties(index).multi_processor_count
    return _INTERP_NUM_SMS


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a nominal 4 under the interpreter); cached, and
    no host synchronisation (safe during CUDA-graph capture)."""
    index = device.index
    if device.type == "cuda" and index is None and not INTERPRET:
        index = torch.cuda.current_device()
    return _num_sms_of(device.type, index)

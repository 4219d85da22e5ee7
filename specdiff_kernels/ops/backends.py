"""The backends of the ops, in one registry for both families (``verify`` and ``round``).

A backend is a name (``reference``, ``cpp``, ``triton``), the implementations of one family's ops,
and the devices it runs on. By default the backend follows the device: CPU -> ``cpp``, CUDA ->
``triton``, else ``reference``. Backends that live in optional modules are imported on first use
(keeps ``import triton`` lazy): importing such a module registers its backend.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

try:  # the compiled CPU backend; registers torch.ops.specdiff.* schemas and CPU kernels
    from .. import _C

    HAS_CPP = True
except ImportError as _err:  # pragma: no cover - exercised only on broken installs
    _C = None
    HAS_CPP = False
    _CPP_IMPORT_ERROR = _err

# the C++ kernels' instruction-set variants (csrc/cpu_isa.h), narrowest first
CPU_CAPABILITIES = ("default", "avx2", "avx512")
_capability_checked = False


def check_cpu_capability() -> None:
    """Raises a one-line ValueError if SPECDIFF_CPU_CAPABILITY names no variant.

    Checked at the first use of the C++ backend (and up front by the CLI), not at import: an
    import error cannot be caught by the command line that imports the package, so it would print
    a traceback. A bad value is never a silent fallback to another backend; the C++ kernels
    called directly refuse it too."""
    global _capability_checked
    # traced code does not call into _C (a graph break); the C++ kernels refuse a bad value anyway
    if torch.compiler.is_compiling() or _capability_checked or not HAS_CPP:
        return
    try:
        _C.cpu_capability()  # reads the variable once; the kernels use what it read
    except ValueError as err:
        raise ValueError(str(err)) from None
    _capability_checked = True


# the ops of each family, by the names every backend implements them under
FAMILIES = {
    "verify": ("gaussian_log_ratio", "first_rejection", "reflect_resample", "speculative_verify"),
    "round": ("chain_noise", "frozen_draft", "verify_frozen"),
}


def cpu_capabilities() -> list[str]:
    """The variants of CPU_CAPABILITIES this CPU can run (none without the C++ extension)."""
    if not HAS_CPP:
        return []
    check_cpu_capability()
    return list(CPU_CAPABILITIES[: CPU_CAPABILITIES.index(_C.supported_cpu_capability()) + 1])


@dataclass(frozen=True)
class Backend:
    """One backend of one family: ``ops[name]`` is its implementation of op ``name``."""

    family: str
    name: str
    ops: Mapping[str, Callable]
    devices: Optional[tuple[str, ...]] = None  # None: any device

    def __post_init__(self):
        if sorted(self.ops) != sorted(FAMILIES[self.family]):
            raise ValueError(
                f"backend {self.name!r} of family {self.family!r} must implement "
                f"{FAMILIES[self.family]}, got {tuple(self.ops)}"
            )

    def supports(self, device: torch.device) -> bool:
        return self.devices is None or device.type in self.devices


def default_backend(device: torch.device) -> str:
    if device.type == "cpu" and HAS_CPP:
        return "cpp"
    if device.type == "cuda":
        return "triton"
    return "reference"


class BackendRegistry:
    """Backends by (family, name), and the modules that register the optional ones."""

    def __init__(self, lazy: dict[tuple[str, str], str]):
        self._backends: dict[tuple[str, str], Backend] = {}
        self._lazy = dict(lazy)  # (family, name) -> module whose import registers that backend

    def register(self, backend: Backend) -> None:
        self._backends[backend.family, backend.name] = backend

    def available(self, family: str) -> list[str]:
        """Names of the family's backends that can run in this process."""
        names = [name for fam, name in self._backends if fam == family]
        for (fam, name), module in self._lazy.items():
            if fam == family and name not in names:
                try:
                    importlib.import_module(module)
                    names.append(name)
                except ImportError:
                    pass
        return names

    def get(self, family: str, name: Optional[str], device: torch.device) -> Backend:
        name = default_backend(device) if name is None else name
        key = (family, name)
        if key not in self._backends and key in self._lazy:
            try:
                importlib.import_module(self._lazy[key])
            except ImportError as err:
                raise RuntimeError(f"backend {name!r} is not available: {err}") from err
        if key not in self._backends:
            if name == "cpp" and not HAS_CPP:
                raise RuntimeError(
                    f"backend 'cpp' is not available: specdiff_kernels._C failed to "
                    f"import ({_CPP_IMPORT_ERROR}); rebuild with "
                    f"`pip install --no-build-isolation .`"
                )
            known = {n for fam, n in self._backends if fam == family}
            known |= {n for fam, n in self._lazy if fam == family}
            raise ValueError(f"backend must be one of {sorted(known)}, got {name!r}")
        backend = self._backends[key]
        if name == "cpp":
            check_cpu_capability()
        if not backend.supports(device):
            raise ValueError(
                f"backend {name!r} runs on {list(backend.devices or ())} tensors, "
                f"got tensors on {device}"
            )
        return backend


REGISTRY = BackendRegistry(
    {
        ("verify", "triton"): "specdiff_kernels.ops.triton.verify",
        ("round", "triton"): "specdiff_kernels.ops.triton.round",
    }
)


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (those of the verify family: every
    backend implements both families)."""
    return REGISTRY.available("verify")

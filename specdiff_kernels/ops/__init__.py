"""The ops layer: fused kernels behind ``torch.ops.specdiff.*`` and their Python wrappers.

* :mod:`.verify`: the verify family (``speculative_verify`` and its parts ``gaussian_log_ratio``,
  ``first_rejection``, ``reflect_resample``) on explicit draft and target means;
* :mod:`.round`: the round family (``chain_noise``, ``frozen_draft``, ``verify_frozen``,
  ``round_stats``): counter-based noise and the fused frozen-draft round;
* :mod:`.reference`: the PyTorch oracles of both families; :mod:`.triton`: their Triton kernels,
  launchers and ops (shared launch helpers in :mod:`.triton._launch`);
* :mod:`.layout`: the constants and layouts every backend shares (table rows, freeze modes, the
  noise counters, the stats vector) and the accumulation-dtype rule;
* :mod:`.backends`: the one backend registry of both families; :mod:`._checks`: every op's
  argument checks.

Backends: ``reference`` (PyTorch), ``cpp`` (C++ CPU kernels), ``triton`` (GPU, or CPU tensors under
``TRITON_INTERPRET=1``); by default the backend follows the device. This layer imports nothing from
the sampling, integration, model or command-line layers.
"""

from .backends import HAS_CPP, available_backends, cpu_capabilities, default_backend
from .round import (
    FrozenVerifyResult,
    chain_noise,
    frozen_draft,
    round_stats,
    seed_tensor,
    verify_frozen,
)
from .verify import (
    VerifyResult,
    first_rejection,
    gaussian_log_ratio,
    reflect_resample,
    speculative_verify,
)

__all__ = [
    "HAS_CPP",
    "FrozenVerifyResult",
    "VerifyResult",
    "available_backends",
    "chain_noise",
    "cpu_capabilities",
    "default_backend",
    "first_rejection",
    "frozen_draft",
    "gaussian_log_ratio",
    "reflect_resample",
    "round_stats",
    "seed_tensor",
    "speculative_verify",
    "verify_frozen",
]

"""specdiff_kernels: exact speculative sampling for diffusion models.

The fused verify ops (SPEC §6) are exposed as plain functions with backend selection; the
samplers, drafts and models build on them.
"""
from .ops import (
    VerifyResult,
    available_backends,
    first_rejection,
    gaussian_log_ratio,
    reflect_resample,
    speculative_verify,
)

__version__ = "0.1.0"

__all__ = [
    "VerifyResult",
    "available_backends",
    "first_rejection",
    "gaussian_log_ratio",
    "reflect_resample",
    "speculative_verify",
    "__version__",
]

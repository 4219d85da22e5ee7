"""specdiff_kernels: exact speculative sampling for diffusion models.

* ops: the fused verify op (docs/design.md §4) and its parts, with backend selection
  (``reference`` | ``cpp`` | ``triton``);
* samplers: :class:`SpeculativeSampler` (ragged batches, exact) and the
  :class:`AncestralSampler` baseline, over :class:`GaussianTransitions` (DDPM, DDIM with eta > 0,
  Euler-ancestral, DPM-Solver++ 2M SDE (multistep), or your own tables);
* drafts: :class:`FrozenTargetDraft` (training-free) and :class:`DraftModelDraft`.
"""

from .ops.backends import available_backends
from .ops.verify import (
    VerifyResult,
    first_rejection,
    gaussian_log_ratio,
    reflect_resample,
    speculative_verify,
)
from .sampling.accounting import SamplerStats
from .sampling.ancestral import AncestralSampler
from .sampling.base import NonFiniteError, SamplingResult
from .sampling.drafts import DraftModelDraft, FrozenTargetDraft
from .sampling.sampler import SpeculativeSampler
from .sampling.transitions import (
    GaussianTransitions,
    ddim_transitions,
    ddpm_transitions,
    dpmsolver_sde_transitions,
    euler_ancestral_transitions,
)

__version__ = "0.1.0"

__all__ = [
    "AncestralSampler",
    "DraftModelDraft",
    "FrozenTargetDraft",
    "GaussianTransitions",
    "NonFiniteError",
    "SamplerStats",
    "SamplingResult",
    "SpeculativeSampler",
    "VerifyResult",
    "available_backends",
    "ddim_transitions",
    "ddpm_transitions",
    "dpmsolver_sde_transitions",
    "euler_ancestral_transitions",
    "first_rejection",
    "gaussian_log_ratio",
    "reflect_resample",
    "speculative_verify",
    "__version__",
]

"""Public speculative-verify ops (docs/design.md §4).

Three backends (:mod:`.backends`) compute the same functions:

* ``"reference"``: plain PyTorch (:mod:`.reference.verify`), the oracle; any device.
* ``"cpp"``: the C++ CPU kernels behind ``torch.ops.specdiff.*`` (``csrc/``).
* ``"triton"``: Triton kernels (GPU; on CPU only under ``TRITON_INTERPRET=1``).

By default the backend follows the device: CPU -> ``cpp``, CUDA -> ``triton``, else ``reference``.

Non-finite inputs are not scanned for (that would cost a pass and a host sync): a non-finite log
ratio counts as a rejection, and the state reflected at that step may be non-finite. Callers that
must not continue on bad values (the samplers) check ``log_ratio`` and raise.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks
from .backends import HAS_CPP, REGISTRY, Backend
from .reference import verify as reference


class VerifyResult(NamedTuple):
    """Output of :func:`speculative_verify`."""

    num_accepted: Tensor  # [B] int64: first rejected step, or the chain's length when all accepted
    next_state: Tensor  # [B, *E]: reflected sample at the first rejection, else y_n
    log_ratio: Tensor  # [B, L] float32: log p/q of every step of the window


def get_backend(name: Optional[str], device: torch.device) -> Backend:
    """The verify family's backend ``name`` (None: by device) for tensors on ``device``."""
    return REGISTRY.get("verify", name, device)


REGISTRY.register(
    Backend(
        "verify",
        "reference",
        {
            "gaussian_log_ratio": reference.gaussian_log_ratio,
            "first_rejection": reference.first_rejection,
            "reflect_resample": reference.reflect_resample,
            "speculative_verify": reference.speculative_verify,
        },
    )
)
if HAS_CPP:
    REGISTRY.register(
        Backend(
            "verify",
            "cpp",
            {
                "gaussian_log_ratio": torch.ops.specdiff.gaussian_log_ratio.default,
                "first_rejection": torch.ops.specdiff.first_rejection.default,
                "reflect_resample": torch.ops.specdiff.reflect_resample.default,
                "speculative_verify": torch.ops.specdiff.speculative_verify.default,
            },
            devices=("cpu",),
        )
    )


# ---------------------------------------------------------------- public functions
def gaussian_log_ratio(
    draft_states: Tensor,
    draft_means: Tensor,
    target_means: Tensor,
    sigma: Tensor | float,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Per-step log p(y_{j+1}|y_j) - log q(y_{j+1}|y_j) for Gaussians of equal std ``sigma``.

    Args:
        draft_states: ``[B, L, *E]`` drafted states y_1..y_L.
        draft_means: ``[B, L, *E]`` draft means mq_0..mq_{L-1}.
        target_means: ``[B, L, *E]`` target means mp_0..mp_{L-1}.
        sigma: step std, ``[B, L]``, ``[L]`` or scalar, > 0.
        backend: ``"reference"``, ``"cpp"``, ``"triton"`` or None (by device).

    Returns:
        ``[B, L]`` float32: ``(<d, r> - ||d||^2 / 2) / sigma^2`` with d = mp - mq, r = y - mq,
        summed over all event dims (accumulated in fp32, fp64 for fp64 inputs).
    """
    sigma = _checks.check_window_sigma(
        "gaussian_log_ratio", draft_states, draft_means, target_means, sigma
    )
    impl = get_backend(backend, draft_states.device)
    return impl.ops["gaussian_log_ratio"](draft_states, draft_means, target_means, sigma)


def first_rejection(
    log_ratio: Tensor,
    uniforms: Tensor,
    lengths: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Index of the first rejected step per chain, or its window length (``lengths``, default L)
    if none.

    Step j is accepted iff ``log_ratio[j]`` is finite and ``log(uniforms[j]) <= log_ratio[j]``
    (u = 0 accepts any finite ratio). Steps at or beyond ``lengths[b]`` are ignored.

    Args:
        log_ratio: ``[B, L]`` floating.
        uniforms: ``[B, L]`` in [0, 1).
        lengths: optional ``[B]`` integer in 1..L: each chain's window length.

    Returns:
        ``[B]`` int64.
    """
    op = "first_rejection"
    _checks.check_log_ratio(op, log_ratio)
    B, L = log_ratio.shape
    _checks.check_uniforms(op, uniforms, B, L, log_ratio)
    _checks.check_lengths(op, lengths, B, L, log_ratio)
    impl = get_backend(backend, log_ratio.device)
    return impl.ops["first_rejection"](log_ratio, uniforms, lengths)


def reflect_resample(
    draft_state: Tensor, draft_mean: Tensor, target_mean: Tensor, *, backend: Optional[str] = None
) -> Tensor:
    """Reflection-maximal-coupling sample ``y + (1 - 2<d, y - mq>/||d||^2) d``, d = mp - mq.

    Equals ``mp + (I - 2 e e^T)(y - mq)`` with e = d/||d||: distance-preserving, on the line through
    y along d. Returns y unchanged where d = 0. Inputs ``[B, *E]``; output in the input dtype.
    """
    op = "reflect_resample"
    _checks.check_state_triplet(op, draft_state, draft_mean, target_mean)
    impl = get_backend(backend, draft_state.device)
    return impl.ops["reflect_resample"](draft_state, draft_mean, target_mean)


def speculative_verify(
    draft_states: Tensor,
    draft_means: Tensor,
    target_means: Tensor,
    sigma: Tensor | float,
    uniforms: Tensor,
    lengths: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> VerifyResult:
    """Verify a window of drafted Gaussian steps against the target in one fused pass
    (docs/design.md §3).

    Computes the log ratios of all L steps, accepts in order while ``log(u_j) <= log_ratio_j``, and
    at the first rejection j returns the reflection-coupled resample of step j; if all
    ``lengths[b]`` steps are accepted returns y_n.

    Args:
        draft_states: ``[B, L, *E]`` y_1..y_L (fp16/bf16/fp32; fp64 on CPU).
        draft_means: ``[B, L, *E]`` mq_0..mq_{L-1}.
        target_means: ``[B, L, *E]`` mp_0..mp_{L-1}.
        sigma: ``[B, L]``, ``[L]`` or scalar step std, > 0.
        uniforms: ``[B, L]`` in [0, 1).
        lengths: optional ``[B]`` integer in 1..L, each chain's window length; steps beyond are
            ignored (end of schedule). Checked on CPU; on other devices out-of-range values are
            clamped into 1..L.
        backend: ``"reference"``, ``"cpp"``, ``"triton"`` or None (by device).

    Returns:
        :class:`VerifyResult` ``(num_accepted [B] int64, next_state [B, *E] input dtype,
        log_ratio [B, L] float32)``.
    """
    op = "speculative_verify"
    sigma = _checks.check_window_sigma(op, draft_states, draft_means, target_means, sigma)
    B, L = draft_states.shape[:2]
    _checks.check_uniforms(op, uniforms, B, L, draft_states)
    _checks.check_lengths(op, lengths, B, L, draft_states)
    impl = get_backend(backend, draft_states.device)
    return VerifyResult(
        *impl.ops["speculative_verify"](
            draft_states, draft_means, target_means, sigma, uniforms, lengths
        )
    )


# ---------------------------------------------------------------- fake (meta) kernels
# Output metadata of every verify op: registered here for the C++-defined ops and used by the Triton
# ops (ops/triton/verify.py) too, whose trailing launch ``strategy`` shapes nothing. A meta tensor
# among CPU tensors dispatches here, not to the CPU kernel: each fake checks devices and dtypes as
# the kernels do (else it would return uninitialised CPU tensors).
def fake_gaussian_log_ratio(draft_states, draft_means, target_means, sigma, strategy="auto"):
    _checks.entry_gaussian_log_ratio(
        "gaussian_log_ratio", draft_states, draft_means, target_means, sigma
    )
    return draft_states.new_empty(draft_states.shape[:2], dtype=torch.float32)


def fake_first_rejection(log_ratio, uniforms, lengths=None):
    _checks.entry_first_rejection("first_rejection", log_ratio, uniforms, lengths)
    return log_ratio.new_empty(log_ratio.shape[:1], dtype=torch.int64)


def fake_reflect_resample(draft_state, draft_mean, target_mean, strategy="auto"):
    _checks.entry_reflect_resample("reflect_resample", draft_state, draft_mean, target_mean)
    return draft_state.new_empty(draft_state.shape)


def fake_speculative_verify(
    draft_states, draft_means, target_means, sigma, uniforms, lengths=None, strategy="auto"
):
    _checks.entry_speculative_verify(
        "speculative_verify", draft_states, draft_means, target_means, sigma, uniforms, lengths
    )
    B, L = draft_states.shape[:2]
    return (
        draft_states.new_empty((B,), dtype=torch.int64),
        draft_states.new_empty((B, *draft_states.shape[2:])),
        draft_states.new_empty((B, L), dtype=torch.float32),
    )


if HAS_CPP:
    for _name, _fake in (
        ("gaussian_log_ratio", fake_gaussian_log_ratio),
        ("first_rejection", fake_first_rejection),
        ("reflect_resample", fake_reflect_resample),
        ("speculative_verify", fake_speculative_verify),
    ):
        torch.library.register_fake(f"specdiff::{_name}", _fake)

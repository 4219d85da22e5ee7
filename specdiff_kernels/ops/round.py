"""The round ops (docs/design.md §6): counter-based noise and the fused frozen-draft round.

* :func:`chain_noise`: the step noises xi(seed, chain, k) and acceptance uniforms u(seed, chain, k)
  of given chains and steps, as pure functions of (seed, chain id, step) (Philox4x32-10; see
  :mod:`specdiff_kernels.ops.reference.round` for the exact definition). One launch; no generator
  objects, no host loop over chains.
* :func:`frozen_draft`: the drafted states Y [B, L+1, *E] of a frozen-target window, noise drawn
  in-kernel. One pass.
* :func:`verify_frozen`: log ratios (d_j and r_j formed on the fly from Y, the network's x0-hat P
  at Y and the frozen value; u_j drawn in-kernel), the first rejection, the reflection and the
  round's commit per chain. The draft and target means never exist in memory.

Tables: the ops read a float64 ``[9, N]`` coefficient tensor (rows ``layout.ROW_*``:
affine mean ``A clip(p) + E p + G x`` of the network's x0-hat p, step std, x0/eps conversions,
and ``H``, the multistep term ``H p_prev`` read when ``prev`` is given);
:func:`specdiff_kernels.sampling.transitions.round_tables` builds it from a transition family.

Backends, as for the verify op: ``reference`` (PyTorch, the oracle), ``cpp`` (C++ CPU kernels
behind ``torch.ops.specdiff.*``) and ``triton`` (GPU; CPU tensors under ``TRITON_INTERPRET=1``).
Default by device: CPU -> cpp, CUDA -> triton. ``torch.ops.specdiff.chain_noise`` /
``frozen_draft`` / ``verify_frozen`` are the dispatcher entry points (CPU: C++, CUDA: Triton) with
fake kernels below, so ``torch.compile(fullgraph=True)`` traces them without a graph break. Nothing
reads values back to the host on CUDA: out-of-range steps and lengths are clamped in-kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _checks
from .backends import HAS_CPP, REGISTRY, Backend
from .layout import FREEZE_X0
from .reference import round as ref


class FrozenVerifyResult(NamedTuple):
    """Output of :func:`verify_frozen` (one round's commit per chain)."""

    num_accepted: Tensor  # [B] int64: first rejected window position, or n
    committed: Tensor  # [B] int64: sampling steps this round advances the chain by
    next_state: Tensor  # [B, *E]: the chain's state after the round (state dtype)
    next_frozen: Tensor  # [B, *E]: the frozen value for the next window
    root_exact: Tensor  # [B] bool: the target's x0-hat at next_state is next_frozen's source
    log_ratio: Tensor  # [B, L] float32 (0 at positions >= n)
    next_prev: Tensor  # [B, *E]: multistep: the target's x0-hat at next_state's parent ([0]: none)


def get_backend(name: Optional[str], device: torch.device) -> Backend:
    """The round family's backend ``name`` (None: by device) for tensors on ``device``."""
    return REGISTRY.get("round", name, device)


REGISTRY.register(
    Backend(
        "round",
        "reference",
        {
            "chain_noise": ref.chain_noise,
            "frozen_draft": ref.frozen_draft,
            "verify_frozen": ref.verify_frozen,
        },
    )
)
if HAS_CPP:
    REGISTRY.register(
        Backend(
            "round",
            "cpp",
            {
                "chain_noise": torch.ops.specdiff.chain_noise.default,
                "frozen_draft": torch.ops.specdiff.frozen_draft.default,
                "verify_frozen": torch.ops.specdiff.verify_frozen.default,
            },
            devices=("cpu",),
        )
    )


def seed_tensor(seed: int, device=None) -> Tensor:
    """A 64-bit seed as the int64 scalar tensor the ops take (raw bits: any int in
    [-2^63, 2^64) is accepted)."""
    s = int(seed)
    if not -(1 << 63) <= s < (1 << 64):
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    if s >= 1 << 63:
        s -= 1 << 64
    return torch.tensor(s, dtype=torch.int64, device=device)


# ---------------------------------------------------------------- public functions
def chain_noise(
    seed: Tensor,
    chain_ids: Tensor,
    steps: Tensor,
    window: int,
    event_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Step noises and acceptance uniforms of chains ``chain_ids`` at steps ``steps[b] + j``.

    Args:
        seed: int64 tensor with one element (the Philox key; :func:`seed_tensor`).
        chain_ids: ``[B]`` int64 in [0, 2^32).
        steps: ``[B]`` int64 first sampling step of each row (>= -1; -1 is the initial state).
        window: steps per row (>= 1).
        event_shape: shape of one state.
        dtype: dtype of xi (computed in fp32, fp64 for fp64).

    Returns:
        ``xi [B, window, *event_shape]`` (``dtype``) and ``u [B, window]`` (float32, in [0, 1)).
    """
    event_shape = _checks.check_chain_noise(seed, chain_ids, steps, window, event_shape, dtype)
    impl = get_backend(backend, chain_ids.device)
    xi, u = impl.ops["chain_noise"](seed, chain_ids, steps, window, math.prod(event_shape), dtype)
    return xi.reshape(chain_ids.shape[0], window, *event_shape), u


def frozen_draft(
    root: Tensor,
    frozen: Tensor,
    steps: Tensor,
    lengths: Tensor,
    coef: Tensor,
    seed: Tensor,
    chain_ids: Tensor,
    window: int,
    freeze: int = FREEZE_X0,
    clip: float = math.inf,
    prev: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Drafted states ``Y [B, window+1, *E]`` of a frozen-target window (docs/design.md §6), in one
    pass.

    ``Y[:, 0] = root``; for ``j < lengths[b]``: ``Y[b, j+1] = A clip(p) + E p + G Y[b, j] +
    std[k+j] xi(seed, chain_ids[b], k+j)`` with k = steps[b] and p the draft's x0-hat (``frozen``
    itself for ``freeze=FREEZE_X0``, ``X0_Y y - X0_F frozen`` for ``FREEZE_EPS``); positions past
    ``lengths[b]`` repeat the last state. ``coef``: :func:`round_tables`; ``clip``:
    :func:`clip_value`. ``prev`` ([B, *E], multistep chains): each chain's previous x0-hat; the
    mean then adds ``H[k+j]`` times ``prev`` at j = 0 and the draft's x0-hat at ``Y[b, j-1]`` after
    (docs/design.md §6.1).
    """
    _checks.check_frozen_draft(
        root, frozen, steps, lengths, coef, seed, chain_ids, window, freeze, clip, prev
    )
    impl = get_backend(backend, root.device)
    return impl.ops["frozen_draft"](
        root, frozen, steps, lengths, coef, seed, chain_ids, window, freeze, float(clip), prev
    )


def verify_frozen(
    states: Tensor,
    x0_hat: Tensor,
    frozen: Tensor,
    steps: Tensor,
    lengths: Tensor,
    coef: Tensor,
    seed: Tensor,
    chain_ids: Tensor,
    freeze: int = FREEZE_X0,
    clip: float = math.inf,
    prev: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> FrozenVerifyResult:
    """Verify a frozen-draft window and commit the round (docs/design.md §6; semantics:
    :func:`specdiff_kernels.ops.reference.round.verify_frozen`).

    Args:
        states: ``[B, L+1, *E]`` the drafted states (from :func:`frozen_draft`).
        x0_hat: ``[B, L+1, *E]`` the target network's raw x0-hat at ``states`` (positions
            ``0..n`` are read; others may hold anything).
        frozen, steps, lengths, coef, seed, chain_ids, freeze, clip, prev: as for
            :func:`frozen_draft` (``lengths`` in 0..L).
    """
    _checks.check_verify_frozen(
        states, x0_hat, frozen, steps, lengths, coef, seed, chain_ids, freeze, clip, prev
    )
    impl = get_backend(backend, states.device)
    return FrozenVerifyResult(
        *impl.ops["verify_frozen"](
            states,
            x0_hat,
            frozen,
            steps,
            lengths,
            coef,
            seed,
            chain_ids,
            freeze,
            float(clip),
            prev,
        )
    )


def round_stats(
    stats: Tensor,
    steps: Tensor,
    lengths: Tensor,
    num_accepted: Tensor,
    committed: Tensor,
    log_ratio: Tensor,
    output: Tensor,
    num_steps: int,
) -> Tensor:
    """The static round's counters after one round, as a new int64 vector (layout:
    :class:`~specdiff_kernels.ops.layout.StatsLayout`; semantics:
    :func:`specdiff_kernels.ops.reference.round.round_stats`). One launch on CPU (C++) and on CUDA
    (a composition of a few ops, replayed inside the round's CUDA graph)."""
    _checks.check_round_stats(
        stats, steps, lengths, num_accepted, committed, log_ratio, output, num_steps
    )
    return torch.ops.specdiff.round_stats(
        stats, steps, lengths, num_accepted, committed, log_ratio, output, num_steps
    )


# ---------------------------------------------------------------- fake (meta) kernels
# Output metadata of every round op: registered here for the C++-defined ops and used by the
# interpreted Triton ops (ops/triton/round.py) too. A meta tensor among CPU tensors dispatches here,
# not to the CPU kernel: each fake checks devices and dtypes as the kernels do.
def fake_chain_noise(seed, chain_ids, steps, window, event_numel, dtype):
    _checks.entry_chain_noise("chain_noise", seed, chain_ids, steps, dtype)
    B = chain_ids.shape[0]
    return (
        chain_ids.new_empty((B, window, event_numel), dtype=dtype),
        chain_ids.new_empty((B, window), dtype=torch.float32),
    )


def fake_frozen_draft(
    root, frozen, steps, lengths, coef, seed, chain_ids, window, freeze, clip, prev=None
):
    _checks.entry_frozen_draft(
        "frozen_draft", root, frozen, steps, lengths, coef, seed, chain_ids, prev
    )
    return root.new_empty((root.shape[0], window + 1, *root.shape[1:]))


def fake_verify_frozen(
    states, x0_hat, frozen, steps, lengths, coef, seed, chain_ids, freeze, clip, prev=None
):
    _checks.entry_verify_frozen(
        "verify_frozen", states, x0_hat, frozen, steps, lengths, coef, seed, chain_ids, prev
    )
    B, L1 = states.shape[:2]
    E = states.shape[2:]
    return (
        steps.new_empty((B,)),
        steps.new_empty((B,)),
        states.new_empty((B, *E)),
        states.new_empty((B, *E)),
        steps.new_empty((B,), dtype=torch.bool),
        states.new_empty((B, L1 - 1), dtype=torch.float32),
        states.new_empty((B, *E)) if prev is not None else states.new_empty((0,)),
    )


def fake_round_stats(stats, steps, lengths, num_accepted, committed, log_ratio, output, num_steps):
    _checks.entry_round_stats(
        "round_stats", stats, steps, lengths, num_accepted, committed, log_ratio, output
    )
    return torch.empty_like(stats)


def round_stats_cuda(stats, steps, lengths, num_accepted, committed, log_ratio, output, num_steps):
    """round_stats' CUDA kernel: the reference composition (inside a captured round its launches
    replay as one graph), after the entry checks (a CUDA tensor among CPU ones dispatches here)."""
    _checks.entry_round_stats(
        "round_stats", stats, steps, lengths, num_accepted, committed, log_ratio, output
    )
    return ref.round_stats(
        stats, steps, lengths, num_accepted, committed, log_ratio, output, num_steps
    )


if HAS_CPP:
    torch.library.register_kernel("specdiff::round_stats", "cuda", round_stats_cuda)
    for _name, _fake in (
        ("chain_noise", fake_chain_noise),
        ("frozen_draft", fake_frozen_draft),
        ("verify_frozen", fake_verify_frozen),
        ("round_stats", fake_round_stats),
    ):
        torch.library.register_fake(f"specdiff::{_name}", _fake)

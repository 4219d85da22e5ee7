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

Arguments: the run's constants as a :class:`~specdiff_kernels.ops.round_spec.RoundSpec` (the
float64 ``[9, N]`` coefficient table, rows ``layout.ROW_*``: affine mean ``A clip(p) + E p + G x``
of the network's x0-hat p, step std, x0/eps conversions, and ``H``, the multistep term
``H p_prev`` read when ``prev`` is given; the seed, the freeze mode, the clip bound), built by
:func:`specdiff_kernels.sampling.transitions.round_spec`, and each chain's place as a
:class:`~specdiff_kernels.ops.round_spec.RoundChains`. :func:`freeze_value`, :func:`draft_x0` and
:func:`affine_mean` are the same quantities in PyTorch, for the samplers' own code.

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
from .layout import ROW_H, acc_dtype
from .reference import round as ref
from .round_spec import (
    RoundChains,
    RoundSpec,
    draft_args,
    draft_parts,
    verify_args,
    verify_parts,
)


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


def schema_ops(prefix: str = "") -> dict:
    """The round family's backend functions (spec form) over the dispatcher ops
    ``torch.ops.specdiff.<prefix>chain_noise`` / ``frozen_draft`` / ``verify_frozen`` (flat
    arguments, :data:`~specdiff_kernels.ops.round_spec.SCHEMAS`)."""
    noise, draft, verify = (
        getattr(torch.ops.specdiff, prefix + name).default
        for name in ("chain_noise", "frozen_draft", "verify_frozen")
    )
    return {
        "chain_noise": noise,
        "frozen_draft": lambda root, chains, spec, window: draft(
            *draft_args(root, chains, spec, window)
        ),
        "verify_frozen": lambda states, x0_hat, chains, spec: verify(
            *verify_args(states, x0_hat, chains, spec)
        ),
    }


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
    REGISTRY.register(Backend("round", "cpp", schema_ops(), devices=("cpu",)))


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
    chains: RoundChains,
    spec: RoundSpec,
    window: int,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Drafted states ``Y [B, window+1, *E]`` of a frozen-target window (docs/design.md §6), in one
    pass.

    ``Y[:, 0] = root``; for ``j < lengths[b]``: ``Y[b, j+1] = A clip(p) + E p + G Y[b, j] +
    std[k+j] xi(seed, chain_ids[b], k+j)`` with k = steps[b] and p the draft's x0-hat (``frozen``
    itself for ``freeze=FREEZE_X0``, ``X0_Y y - X0_F frozen`` for ``FREEZE_EPS``); positions past
    ``lengths[b]`` repeat the last state. ``chains``: :class:`RoundChains`; ``spec``:
    :class:`RoundSpec` (``sampling.transitions.round_spec``). ``chains.prev`` ([B, *E], multistep
    chains): each chain's previous x0-hat; the mean then adds ``H[k+j]`` times ``prev`` at j = 0 and
    the draft's x0-hat at ``Y[b, j-1]`` after (docs/design.md §6.1).
    """
    _checks.check_frozen_draft(root, chains, spec, window)
    return get_backend(backend, root.device).ops["frozen_draft"](root, chains, spec, window)


def verify_frozen(
    states: Tensor,
    x0_hat: Tensor,
    chains: RoundChains,
    spec: RoundSpec,
    *,
    backend: Optional[str] = None,
) -> FrozenVerifyResult:
    """Verify a frozen-draft window and commit the round (docs/design.md §6; semantics:
    :func:`specdiff_kernels.ops.reference.round.verify_frozen`).

    Args:
        states: ``[B, L+1, *E]`` the drafted states (from :func:`frozen_draft`).
        x0_hat: ``[B, L+1, *E]`` the target network's raw x0-hat at ``states`` (positions
            ``0..n`` are read; others may hold anything).
        chains, spec: as for :func:`frozen_draft` (``lengths`` in 0..L).
    """
    _checks.check_verify_frozen(states, x0_hat, chains, spec)
    impl = get_backend(backend, states.device)
    return FrozenVerifyResult(*impl.ops["verify_frozen"](states, x0_hat, chains, spec))


def dispatch_frozen_draft(
    backend: Optional[str], root: Tensor, chains: RoundChains, spec: RoundSpec, window: int
) -> Tensor:
    """The samplers' ``frozen_draft``: the dispatcher op directly when no backend is named (no
    Python checks: the round is a hot path and its arguments are built right; traceable whole),
    else the checked wrapper."""
    if backend is None:
        return torch.ops.specdiff.frozen_draft(*draft_args(root, chains, spec, window))
    return frozen_draft(root, chains, spec, window, backend=backend)


def dispatch_verify_frozen(
    backend: Optional[str], states: Tensor, x0_hat: Tensor, chains: RoundChains, spec: RoundSpec
) -> FrozenVerifyResult:
    """The samplers' ``verify_frozen`` (as :func:`dispatch_frozen_draft`)."""
    if backend is None:
        out = torch.ops.specdiff.verify_frozen(*verify_args(states, x0_hat, chains, spec))
        return FrozenVerifyResult(*out)
    return verify_frozen(states, x0_hat, chains, spec, backend=backend)


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


# ---------------------------------------------------------------- the round's quantities
# One PyTorch definition of the frozen value, the draft's x0-hat and the affine mean (docs/design.md
# §6), the oracle's: the samplers' Python code (a chain's first frozen value, the ragged round's
# draft means) calls these; the kernels compute the same in-kernel. States ``y`` of shape
# ``[*k.shape, *E]`` at steps ``k`` (any shape), computed in the states' accumulation dtype and
# returned in theirs.
def step_rows(spec: RoundSpec, k: Tensor, like: Tensor) -> Tensor:
    """``coef[:, k]`` (k clamped into the table) in ``like``'s accumulation dtype, shaped
    ``[NUM_ROWS, *k.shape, 1, ...]`` to broadcast against ``like`` (``[*k.shape, *E]``)."""
    N = spec.coef.shape[1]
    c = spec.coef[:, k.clamp(0, N - 1)].to(acc_dtype(like.dtype))
    return c.reshape(*c.shape, *([1] * (like.dim() - k.dim())))


def freeze_value(spec: RoundSpec, y: Tensor, p: Tensor, k: Tensor) -> Tensor:
    """The frozen value of the target's x0-hat ``p`` at states ``y``: ``p`` itself (freeze x0) or
    its eps-hat (freeze eps)."""
    c, acc = step_rows(spec, k, y), acc_dtype(y.dtype)
    return ref.freeze_value(c, y.to(acc), p.to(acc), spec.freeze).to(y.dtype)


def draft_x0(spec: RoundSpec, y: Tensor, frozen: Tensor, k: Tensor) -> Tensor:
    """The frozen-target draft's x0-hat at drafted states ``y`` from the frozen value."""
    c, acc = step_rows(spec, k, y), acc_dtype(y.dtype)
    return ref.draft_x0(c, y.to(acc), frozen.to(acc), spec.freeze).to(y.dtype)


def affine_mean(
    spec: RoundSpec, y: Tensor, p: Tensor, k: Tensor, prev: Optional[Tensor] = None
) -> Tensor:
    """The step mean ``A clip(p) + E p + G y (+ H prev)`` of x0-hat ``p`` at states ``y``
    (``prev``: multistep chains' previous x0-hat)."""
    c, acc = step_rows(spec, k, y), acc_dtype(y.dtype)
    mean = ref.affine_mean(c, p.to(acc), y.to(acc), spec.clip)
    if prev is not None:
        mean = mean + c[ROW_H] * prev.to(acc)
    return mean.to(y.dtype)


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


def fake_frozen_draft(*args):
    root, chains, spec, window = draft_parts(*args)
    _checks.entry_frozen_draft("frozen_draft", root, chains, spec)
    return root.new_empty((root.shape[0], window + 1, *root.shape[1:]))


def fake_verify_frozen(*args):
    states, x0_hat, chains, spec = verify_parts(*args)
    _checks.entry_verify_frozen("verify_frozen", states, x0_hat, chains, spec)
    B, L1 = states.shape[:2]
    E = states.shape[2:]
    return (
        chains.steps.new_empty((B,)),
        chains.steps.new_empty((B,)),
        states.new_empty((B, *E)),
        states.new_empty((B, *E)),
        chains.steps.new_empty((B,), dtype=torch.bool),
        states.new_empty((B, L1 - 1), dtype=torch.float32),
        states.new_empty((B, *E)) if chains.prev is not None else states.new_empty((0,)),
    )


def fake_round_stats(stats, steps, lengths, num_accepted, committed, log_ratio, output, num_steps):
    _checks.entry_round_stats(
        "round_stats", stats, steps, lengths, num_accepted, committed, log_ratio, output
    )
    return torch.empty_like(stats)


def round_stats_cuda(*args):
    """round_stats' CUDA kernel: the reference composition (inside a captured round its launches
    replay as one graph), after the entry checks (a CUDA tensor among CPU ones dispatches here)."""
    _checks.entry_round_stats("round_stats", *args[:-1])  # (num_steps is no tensor)
    return ref.round_stats(*args)


if HAS_CPP:
    torch.library.register_kernel("specdiff::round_stats", "cuda", round_stats_cuda)
    for _name, _fake in (
        ("chain_noise", fake_chain_noise),
        ("frozen_draft", fake_frozen_draft),
        ("verify_frozen", fake_verify_frozen),
        ("round_stats", fake_round_stats),
    ):
        torch.library.register_fake(f"specdiff::{_name}", _fake)

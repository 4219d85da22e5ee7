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

Tables: the ops read a float64 ``[8, N]`` coefficient tensor (rows ``layout.ROW_*``:
affine mean ``A clip(p) + E p + G x`` of the network's x0-hat p, step std, x0/eps conversions);
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

from ._checks import _values_checkable
from .backends import HAS_CPP, REGISTRY, Backend
from .layout import (
    FLOAT_DTYPES,
    FREEZE_EPS,
    FREEZE_MODES,
    FREEZE_X0,
    NUM_ROWS,
    ROW_STD,
    StatsLayout,
)
from .reference import round as ref


class FrozenVerifyResult(NamedTuple):
    """Output of :func:`verify_frozen` (one round's commit per chain)."""

    num_accepted: Tensor  # [B] int64: first rejected window position, or n
    committed: Tensor     # [B] int64: sampling steps this round advances the chain by
    next_state: Tensor    # [B, *E]: the chain's state after the round (state dtype)
    next_frozen: Tensor   # [B, *E]: the frozen value for the next window
    root_exact: Tensor    # [B] bool: the target's x0-hat at next_state is next_frozen's source
    log_ratio: Tensor     # [B, L] float32 (0 at positions >= n)


def get_backend(name: Optional[str], device: torch.device) -> Backend:
    """The round family's backend ``name`` (None: by device) for tensors on ``device``."""
    return REGISTRY.get("round", name, device)


REGISTRY.register(Backend("round", "reference", {"chain_noise": ref.chain_noise,
                                                 "frozen_draft": ref.frozen_draft,
                                                 "verify_frozen": ref.verify_frozen}))
if HAS_CPP:
    REGISTRY.register(Backend("round", "cpp", {
        "chain_noise": torch.ops.specdiff.chain_noise.default,
        "frozen_draft": torch.ops.specdiff.frozen_draft.default,
        "verify_frozen": torch.ops.specdiff.verify_frozen.default,
    }, devices=("cpu",)))


def seed_tensor(seed: int, device=None) -> Tensor:
    """A 64-bit seed as the int64 scalar tensor the ops take (raw bits: any int in
    [-2^63, 2^64) is accepted)."""
    s = int(seed)
    if not -(1 << 63) <= s < (1 << 64):
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    if s >= 1 << 63:
        s -= 1 << 64
    return torch.tensor(s, dtype=torch.int64, device=device)


# ---------------------------------------------------------------- argument checks
def _check_int_vector(op: str, name: str, t: Tensor, B: int, like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise ValueError(f"{op}: {name} must be an int64 tensor, got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{op}: {name} must have shape [B] = [{B}], got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the states are on {like.device}")


def _check_seed(op: str, seed: Tensor, like: Tensor) -> None:
    if not isinstance(seed, Tensor):
        raise TypeError(f"{op}: seed must be an int64 tensor with one element "
                        f"(round_ops.seed_tensor(int)), got {type(seed).__name__}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"{op}: seed must be an int64 tensor with one element, got "
                         f"{seed.dtype} of shape {tuple(seed.shape)}")
    if seed.device != like.device:
        raise ValueError(f"{op}: seed is on {seed.device} but the states are on {like.device}")


def _check_ids_steps(op: str, chain_ids: Tensor, steps: Tensor, B: int, like: Tensor,
                     first_step: int) -> None:
    _check_int_vector(op, "chain_ids", chain_ids, B, like)
    _check_int_vector(op, "steps", steps, B, like)
    if _values_checkable(chain_ids) and B:
        if int(chain_ids.min()) < 0 or int(chain_ids.max()) >= 1 << 32:
            raise ValueError(f"{op}: chain_ids must lie in [0, 2^32), got min "
                             f"{int(chain_ids.min())}, max {int(chain_ids.max())}")
        if int(steps.min()) < first_step or int(steps.max()) >= (1 << 32) - 1 - (1 << 20):
            raise ValueError(f"{op}: steps must lie in [{first_step}, 2^32 - 2^20), got min "
                             f"{int(steps.min())}, max {int(steps.max())}")


def _check_states(op: str, name: str, x: Tensor, min_dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must have a floating dtype in "
                         f"{[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")
    if x.dim() < min_dim or any(s == 0 for s in x.shape[min_dim - 1:]):
        raise ValueError(f"{op}: {name} must have a non-empty event shape, got {tuple(x.shape)}")


def _check_round(op: str, root: Tensor, frozen: Tensor, steps: Tensor, lengths: Tensor,
                 coef: Tensor, seed: Tensor, chain_ids: Tensor, window: int, freeze: int,
                 clip: float, stochastic_only: bool) -> None:
    B = root.shape[0]
    _check_states(op, "frozen", frozen, 2)
    if frozen.shape != root.shape or frozen.dtype != root.dtype or frozen.device != root.device:
        raise ValueError(f"{op}: frozen must match the root states (shape {tuple(root.shape)}, "
                         f"{root.dtype}, {root.device}); got {tuple(frozen.shape)}, "
                         f"{frozen.dtype}, {frozen.device}")
    _check_seed(op, seed, root)
    _check_ids_steps(op, chain_ids, steps, B, root, 0)
    _check_int_vector(op, "lengths", lengths, B, root)
    if not isinstance(coef, Tensor) or coef.dtype != torch.float64 or coef.dim() != 2 \
            or coef.shape[0] != NUM_ROWS or coef.shape[1] < 1:
        raise ValueError(f"{op}: coef must be the float64 [{NUM_ROWS}, N] table of "
                         f"round_tables(transitions)")
    if coef.device != root.device:
        raise ValueError(f"{op}: coef is on {coef.device} but the states are on {root.device}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{op}: window must be an int >= 1, got {window!r}")
    if freeze not in FREEZE_MODES.values():
        raise ValueError(f"{op}: freeze must be {FREEZE_X0} (x0) or {FREEZE_EPS} (eps), got {freeze!r}")
    if not (clip > 0):
        raise ValueError(f"{op}: clip must be > 0 (math.inf: no clipping), got {clip!r}")
    if _values_checkable(lengths) and B:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > window:
            raise ValueError(f"{op}: lengths must lie in 0..window = 0..{window}, got min {lo}, "
                             f"max {hi}")
        N = coef.shape[1]
        if int(steps.max()) > N:
            raise ValueError(f"{op}: steps must lie in 0..N = 0..{N} (N: the table length), got "
                             f"max {int(steps.max())}")
        if not stochastic_only:   # a draft step with std 0 is the deterministic step itself
            return
        # a verified window covers stochastic steps only (std > 0, before the end of the schedule)
        idx = steps[:, None] + torch.arange(window)[None]
        live = torch.arange(window)[None] < lengths[:, None]
        std = coef[ROW_STD, idx.clamp(0, N - 1)]
        bad = live & ((idx >= N) | ~(std > 0))
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: lengths[{b}] = {int(lengths[b])} from step {int(steps[b])} "
                             f"reaches a deterministic step or the end of the schedule (N = {N}); "
                             f"windows must cover stochastic steps only")


# ---------------------------------------------------------------- public functions
def chain_noise(seed: Tensor, chain_ids: Tensor, steps: Tensor, window: int,
                event_shape: Sequence[int], dtype: torch.dtype = torch.float32, *,
                backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
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
    op = "chain_noise"
    if not isinstance(chain_ids, Tensor):
        raise TypeError(f"{op}: chain_ids must be a torch.Tensor, got {type(chain_ids).__name__}")
    _check_seed(op, seed, chain_ids)
    _check_ids_steps(op, chain_ids, steps, chain_ids.shape[0] if chain_ids.dim() == 1 else -1,
                     chain_ids, -1)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{op}: window must be an int >= 1, got {window!r}")
    event_shape = tuple(int(s) for s in event_shape)
    D = math.prod(event_shape)
    if not event_shape or D < 1:
        raise ValueError(f"{op}: event_shape must be non-empty with positive sizes, got {event_shape}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
    impl = get_backend(backend, chain_ids.device)
    xi, u = impl.ops["chain_noise"](seed, chain_ids, steps, window, D, dtype)
    return xi.reshape(chain_ids.shape[0], window, *event_shape), u


def frozen_draft(root: Tensor, frozen: Tensor, steps: Tensor, lengths: Tensor, coef: Tensor,
                 seed: Tensor, chain_ids: Tensor, window: int, freeze: int = FREEZE_X0,
                 clip: float = math.inf, *, backend: Optional[str] = None) -> Tensor:
    """Drafted states ``Y [B, window+1, *E]`` of a frozen-target window (docs/design.md §6), in one pass.

    ``Y[:, 0] = root``; for ``j < lengths[b]``: ``Y[b, j+1] = A clip(p) + E p + G Y[b, j] +
    std[k+j] xi(seed, chain_ids[b], k+j)`` with k = steps[b] and p the draft's x0-hat (``frozen``
    itself for ``freeze=FREEZE_X0``, ``X0_Y y - X0_F frozen`` for ``FREEZE_EPS``); positions past
    ``lengths[b]`` repeat the last state. ``coef``: :func:`round_tables`; ``clip``:
    :func:`clip_value`.
    """
    op = "frozen_draft"
    _check_states(op, "root", root, 2)
    _check_round(op, root, frozen, steps, lengths, coef, seed, chain_ids, window, freeze, clip,
                 stochastic_only=False)
    impl = get_backend(backend, root.device)
    return impl.ops["frozen_draft"](root, frozen, steps, lengths, coef, seed, chain_ids, window, freeze,
                             float(clip))


def verify_frozen(states: Tensor, x0_hat: Tensor, frozen: Tensor, steps: Tensor, lengths: Tensor,
                  coef: Tensor, seed: Tensor, chain_ids: Tensor, freeze: int = FREEZE_X0,
                  clip: float = math.inf, *, backend: Optional[str] = None) -> FrozenVerifyResult:
    """Verify a frozen-draft window and commit the round (docs/design.md §6; semantics:
    :func:`specdiff_kernels.ops.reference.round.verify_frozen`).

    Args:
        states: ``[B, L+1, *E]`` the drafted states (from :func:`frozen_draft`).
        x0_hat: ``[B, L+1, *E]`` the target network's raw x0-hat at ``states`` (positions
            ``0..n`` are read; others may hold anything).
        frozen, steps, lengths, coef, seed, chain_ids, freeze, clip: as for :func:`frozen_draft`
            (``lengths`` in 0..L).
    """
    op = "verify_frozen"
    _check_states(op, "states", states, 3)
    if not isinstance(x0_hat, Tensor) or x0_hat.shape != states.shape or \
            x0_hat.dtype != states.dtype or x0_hat.device != states.device:
        raise ValueError(f"{op}: x0_hat must match states (shape {tuple(states.shape)}, "
                         f"{states.dtype}, {states.device})")
    if states.shape[1] < 2:
        raise ValueError(f"{op}: states must hold L + 1 >= 2 positions, got {states.shape[1]}")
    root = states[:, 0]
    _check_round(op, root, frozen, steps, lengths, coef, seed, chain_ids, states.shape[1] - 1,
                 freeze, clip, stochastic_only=True)
    impl = get_backend(backend, states.device)
    return FrozenVerifyResult(*impl.ops["verify_frozen"](states, x0_hat, frozen, steps, lengths, coef,
                                                  seed, chain_ids, freeze, float(clip)))


def round_stats(stats: Tensor, steps: Tensor, lengths: Tensor, num_accepted: Tensor,
                committed: Tensor, log_ratio: Tensor, output: Tensor, num_steps: int) -> Tensor:
    """The static round's counters after one round, as a new int64 vector (layout:
    :class:`~specdiff_kernels.ops.layout.StatsLayout`; semantics:
    :func:`specdiff_kernels.ops.reference.round.round_stats`). One launch on CPU (C++) and on CUDA (a
    composition of a few ops, replayed inside the round's CUDA graph)."""
    op = "round_stats"
    if not isinstance(log_ratio, Tensor) or log_ratio.dim() != 2:
        raise ValueError(f"{op}: log_ratio must be a [B, L] tensor")
    B, L = log_ratio.shape
    for name, t in (("steps", steps), ("lengths", lengths), ("num_accepted", num_accepted),
                    ("committed", committed)):
        _check_int_vector(op, name, t, B, log_ratio)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{op}: num_steps must be an int >= 1, got {num_steps!r}")
    size = StatsLayout(L, num_steps, B).size
    if not isinstance(stats, Tensor) or stats.dtype != torch.int64 or tuple(stats.shape) != (size,):
        raise ValueError(f"{op}: stats must be the int64 [{size}] vector of StatsLayout(L={L}, "
                         f"N={num_steps}, B={B})")
    if not isinstance(output, Tensor) or output.dim() < 2 or tuple(output.shape[:2]) != (B, L + 1):
        raise ValueError(f"{op}: output must have shape [B, L+1, ...] = [{B}, {L + 1}, ...]")
    if output.device != log_ratio.device or stats.device != log_ratio.device:
        raise ValueError(f"{op}: stats, output and log_ratio must be on one device")
    return torch.ops.specdiff.round_stats(stats, steps, lengths, num_accepted, committed,
                                          log_ratio, output, num_steps)


# ---------------------------------------------------------------- fake (meta) kernels
# Output metadata of every round op: registered here for the C++-defined ops and used by the
# interpreted Triton ops (ops/triton/round.py) too.
def fake_chain_noise(seed, chain_ids, steps, window, event_numel, dtype):
    B = chain_ids.shape[0]
    return (chain_ids.new_empty((B, window, event_numel), dtype=dtype),
            chain_ids.new_empty((B, window), dtype=torch.float32))


def fake_frozen_draft(root, frozen, steps, lengths, coef, seed, chain_ids, window, freeze, clip):
    return root.new_empty((root.shape[0], window + 1, *root.shape[1:]))


def fake_verify_frozen(states, x0_hat, frozen, steps, lengths, coef, seed, chain_ids, freeze,
                       clip):
    B, L1 = states.shape[:2]
    E = states.shape[2:]
    return (steps.new_empty((B,)), steps.new_empty((B,)), states.new_empty((B, *E)),
            states.new_empty((B, *E)), steps.new_empty((B,), dtype=torch.bool),
            states.new_empty((B, L1 - 1), dtype=torch.float32))


def fake_round_stats(stats, steps, lengths, num_accepted, committed, log_ratio, output, num_steps):
    return torch.empty_like(stats)


if HAS_CPP:
    # CUDA: the reference composition; inside a captured round its launches replay as one graph
    torch.library.register_kernel("specdiff::round_stats", "cuda", ref.round_stats)
    for _name, _fake in (("chain_noise", fake_chain_noise), ("frozen_draft", fake_frozen_draft),
                         ("verify_frozen", fake_verify_frozen), ("round_stats", fake_round_stats)):
        torch.library.register_fake(f"specdiff::{_name}", _fake)

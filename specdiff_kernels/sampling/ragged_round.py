"""The ragged round: speculative sampling where every chain has its own step and window.

The general path of :class:`~specdiff_kernels.sampling.sampler.SpeculativeSampler` (any draft, adaptive
windows, a custom verify op). A round

1. takes, without any call, the deterministic steps (std 0) of chains whose target prediction at
   the current state is already known (prefetched);
2. plans (:func:`plan_round`): which chains take a deterministic step, which take a first ancestral
   step (nothing frozen yet) and which draft a window;
3. drafts the windows (:class:`FrozenProposer`: no call; :class:`ModelProposer`: n sequential
   draft calls) of n = min(L, stochastic steps left before the next deterministic step) steps;
4. makes ONE batched target call (:class:`TargetCall`) on everything the round needs, in named
   segments: the roots of deterministic-step chains, the roots of first-step chains, the window
   states the verify needs (the draft's ``needed_positions``);
5. verifies the windows with :func:`specdiff_kernels.speculative_verify` and commits each chain's
   accepted steps plus the reflected one; the draft keeps what it needs for the next round
   (``after_verify``). Finished chains leave the batch.

With ``FrozenTargetDraft(prefetch_root=False)`` a round first makes a separate call at the roots
(two sequential calls per round).

Per-chain state lives in :class:`RaggedChains`; what the target's prediction at a chain's root is
known to be is one enum, :class:`RootStatus`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import round as round_ops
from .noise import ChainNoise
from .drafts import DraftModelDraft, FrozenTargetDraft
from .static_round import draft_op
from .transitions import GaussianTransitions
from .transitions import clip_value, round_tables


class RootStatus(IntEnum):
    """What the sampler holds about the target at a chain's current state (frozen drafts)."""

    NONE = 0    # nothing frozen yet: the chain takes one ancestral step first
    STALE = 1   # a frozen value from an earlier state: the root must be evaluated again
    EXACT = 2   # the target's x0-hat at the current state is known (``root_x0``)


@dataclass
class RaggedChains:
    """Per-chain state of a ragged run: states on the device, bookkeeping on the CPU."""

    x: Tensor                    # [B, *E] states
    k: Tensor                    # [B] int64 sampling step (CPU; N: finished)
    root: Tensor                 # [B] int8 RootStatus (CPU)
    root_x0: Optional[Tensor]    # [B, *E] the target's x0-hat at x where root is EXACT
    frozen: Optional[Tensor]     # [B, *E] the frozen-target draft's frozen value
    finished_round: Tensor       # [B] int64 round of each chain's last step (CPU)

    def status(self, rows: Tensor, s: RootStatus) -> Tensor:
        return self.root[rows] == int(s)

    def set_status(self, rows: Tensor, s) -> None:
        self.root[rows] = s if isinstance(s, Tensor) else int(s)


@dataclass(frozen=True)
class RoundPlan:
    """Who does what in a round (disjoint rows of live chains)."""

    det: Tensor    # at a deterministic step, root not known: the target at the root, then the step
    boot: Tensor   # nothing frozen yet: one ancestral step from the target at the root
    spec: Tensor   # draft and verify a window


def plan_round(k: Tensor, root: Tensor, deterministic: Tensor, N: int, needs_frozen: bool) -> RoundPlan:
    """The round's plan from each chain's step and root status (a pure function)."""
    live = (k < N).nonzero().squeeze(1)
    is_det = deterministic[k[live]]
    det, spec = live[is_det], live[~is_det]
    if not needs_frozen:
        return RoundPlan(det, spec[:0], spec)
    has_frozen = root[spec] != int(RootStatus.NONE)
    return RoundPlan(det, spec[~has_frozen], spec[has_frozen])


@dataclass(frozen=True)
class DraftedWindows:
    """The drafted windows of chains ``rows`` (padded to L)."""

    rows: Tensor    # [w] chains (CPU)
    Y: Tensor       # [w, L+1, *E] y_0..y_L (positions past n repeat the state)
    MQ: Tensor      # [w, L, *E] draft means mq_0..mq_{L-1}
    n: Tensor       # [w] int64 steps drafted (CPU)
    k: Tensor       # [w] int64 step at the root (CPU)
    u: Tensor       # [w, L] acceptance uniforms
    exact: Tensor   # [w] bool: the target's x0-hat at the root is known (CPU)


@dataclass(frozen=True)
class WindowOutcome:
    """What verifying the windows did, per chain (CPU tensors)."""

    accepted: Tensor   # [w, L] bool: position accepted
    attempted: Tensor  # [w, L] bool: position verified (all earlier ones accepted)
    num_accepted: Tensor  # [w] int64
    advance: Tensor    # [w] int64 steps committed


class TargetCall:
    """One batched target call assembled from named segments of (states, steps, chains)."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []

    def add(self, name: str, x: Tensor, k: Tensor, rows: Tensor) -> None:
        self._names.append(name)
        self._parts.append((x, k, rows))

    def run(self, evaluate: Callable[[Tensor, Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
        """The target's x0-hat per segment, from one call ``evaluate(x, k, rows)`` (no call when
        every segment is empty)."""
        x = torch.cat([p[0] for p in self._parts])
        k = torch.cat([p[1] for p in self._parts])
        rows = torch.cat([p[2] for p in self._parts])
        x0 = evaluate(x, k.to(x.device), rows) if x.shape[0] else x
        out, start = {}, 0
        for name, (_, _, rows) in zip(self._names, self._parts):
            out[name] = x0[start:start + rows.numel()]
            start += rows.numel()
        return out


def affine_mean(transitions: GaussianTransitions, y: Tensor, p: Tensor, k: Tensor) -> Tensor:
    """``mean_from_x0`` of affine transitions from the round tables: ``A clip(p) + E p + G y``,
    three or five elementwise ops instead of the ~10 of the general formula (steps k of any
    shape; y, p of shape ``[*k.shape, *E]``)."""
    key = ("affine_rows", y.device, y.dtype)
    rows = transitions._cache.get(key)
    if rows is None:
        rows = round_tables(transitions, y.device)[:3].to(y.dtype)
        transitions._cache[key] = rows
    c = rows[:, k.clamp(0, transitions.num_steps - 1)]
    c = c.reshape(3, *k.shape, *([1] * (y.dim() - k.dim())))
    mean = torch.addcmul(c[1] * p, c[2], y)
    if transitions.clip_sample is not None:
        mean = torch.addcmul(mean, c[0], p.clamp(-transitions.clip_sample, transitions.clip_sample))
    return mean


# ------------------------------------------------------------------------- drafts on the ragged path
class FrozenProposer:
    """:class:`FrozenTargetDraft` on the ragged path: no call to draft; the frozen value is
    refreshed from the verify call (prefetching) or from a call at the roots."""

    needs_frozen = True

    def __init__(self, draft: FrozenTargetDraft, transitions: GaussianTransitions):
        self.draft = draft
        self.T = transitions
        self.prefetch = draft.prefetch_root

    def freeze(self, chains: RaggedChains, rows: Tensor, x: Tensor, x0: Tensor, k: Tensor) -> None:
        """Freeze the target's x0-hat ``x0`` at states x of chains ``rows`` (device rows)."""
        chains.frozen[rows] = self.draft.freeze_value(self.T, x, x0, k)

    @property
    def fused(self) -> bool:
        """Whether the window is drafted by the fused ``frozen_draft`` op (affine means)."""
        return self.T.affine

    def fused_draft(self, chains: RaggedChains, rows: Tensor, k: Tensor, n: Tensor,
                    noise: ChainNoise, window: int, backend: Optional[str]) -> tuple[Tensor, Tensor]:
        """``(Y, MQ)`` of chains ``rows`` in one pass of ``frozen_draft`` (noise drawn in-kernel:
        the same xi(seed, c, k) as ``noise``), the draft means recomputed from Y in a few
        vectorised ops. Positions past n repeat the state; their means are not used (the verify
        op ignores steps >= n)."""
        dev = chains.x.device
        rd = rows.to(dev)
        kd, nd = k.to(dev), n.to(dev)
        fr = chains.frozen[rd]
        Y = draft_op(backend, chains.x[rd], fr, kd, nd, round_tables(self.T, dev),
                     noise.seed, noise.chain_ids[rd], window,
                     round_ops.FREEZE_MODES[self.draft.freeze], clip_value(self.T))
        pos = torch.arange(window, device=dev)
        kw = kd[:, None] + pos[None]
        Yl = Y[:, :window]
        x0q = self.draft.x0_at(self.T, fr.unsqueeze(1), Yl, kw)
        return Y, affine_mean(self.T, Yl, x0q, kw)

    def draft_x0(self, chains: RaggedChains, rd: Tensor, exact0: Tensor, j: int, yj: Tensor,
                 kj: Tensor, active: Tensor, evaluate) -> Tensor:
        x0j = self.draft.x0_at(self.T, chains.frozen[rd], yj, kj)
        if j == 0:
            x0j = torch.where(exact0.view((-1,) + (1,) * (yj.dim() - 1)), chains.root_x0[rd], x0j)
        return x0j

    def needed_positions(self, win: DraftedWindows, N: int) -> Tensor:
        """[w, L+1] bool: window positions whose state the target must evaluate."""
        p = torch.arange(win.Y.shape[1])[None]
        n = win.n[:, None]
        need = (p >= 1) & (p < n)                          # y_1..y_{n-1}: means of steps 1..n-1
        if self.prefetch:
            need |= (p == 0) & ~win.exact[:, None]           # stale frozen value: the root too
            need |= (p == n) & ((win.k + win.n) < N)[:, None]  # prefetch the next root
        return need

    def root_x0(self, chains: RaggedChains, win: DraftedWindows, TP: Tensor) -> None:
        """Fill the target's x0-hat at the roots that are known without evaluation."""
        rd = win.rows.to(TP.device)
        exact0 = win.exact.to(TP.device).view((-1,) + (1,) * (TP.dim() - 2))
        TP[:, 0] = torch.where(exact0, chains.root_x0[rd], TP[:, 0])

    def after_verify(self, chains: RaggedChains, win: DraftedWindows, TP: Tensor,
                     out: WindowOutcome, N: int) -> None:
        """The next round's frozen value: prefetching, the target's x0-hat at the new root (an
        accepted window's y_n) or at the parent of the rejected step; else stale."""
        rows = win.rows
        if not self.prefetch:
            chains.set_status(rows, RootStatus.STALE)
            return
        dev = TP.device
        w = rows.numel()
        rd = rows.to(dev)
        na = out.num_accepted
        rejected = na < win.n
        src = torch.where(rejected, na, win.n)              # parent of the rejected step, or y_n
        exact = (~rejected) & ((win.k + out.advance) < N)
        usable = rejected | exact
        idx, srcd = torch.arange(w).to(dev), src.to(dev)
        ysrc, x0src = win.Y[idx, srcd], TP[idx, srcd]
        fz = self.draft.freeze_value(self.T, ysrc, x0src, (win.k + src).to(dev))
        ud = usable.to(dev).view((w,) + (1,) * (TP.dim() - 2))
        chains.frozen[rd] = torch.where(ud, fz, chains.frozen[rd])
        chains.root_x0[rd] = torch.where(ud, x0src, chains.root_x0[rd])
        chains.set_status(rows, torch.where(exact, int(RootStatus.EXACT), int(RootStatus.STALE))
                          .to(torch.int8))


class ModelProposer:
    """:class:`DraftModelDraft` on the ragged path: n sequential draft calls per window; the
    target evaluates every window's root."""

    needs_frozen = False
    prefetch = False
    fused = False

    def __init__(self, draft: DraftModelDraft, transitions: GaussianTransitions):
        self.draft = draft
        self.T = transitions

    def draft_x0(self, chains: RaggedChains, rd: Tensor, exact0: Tensor, j: int, yj: Tensor,
                 kj: Tensor, active: Tensor, evaluate) -> Tensor:
        act = active.nonzero().squeeze(1)
        x0j = torch.zeros_like(yj)
        x0j[act] = evaluate(yj[act], kj[act], act)
        return x0j

    def needed_positions(self, win: DraftedWindows, N: int) -> Tensor:
        p = torch.arange(win.Y.shape[1])[None]
        return (p < win.n[:, None])                        # the root and y_1..y_{n-1}

    def root_x0(self, chains, win, TP) -> None:
        pass

    def after_verify(self, chains, win, TP, out, N) -> None:
        pass


def proposer_for(draft, transitions: GaussianTransitions):
    if isinstance(draft, FrozenTargetDraft):
        return FrozenProposer(draft, transitions)
    if isinstance(draft, DraftModelDraft):
        return ModelProposer(draft, transitions)
    raise TypeError(f"draft must be a FrozenTargetDraft or DraftModelDraft, got {type(draft).__name__}")


# ------------------------------------------------------------------------- counters
class RaggedCounters:
    """Acceptance statistics of a ragged run (CPU int64 tensors, copied into SamplerStats once)."""

    def __init__(self, L: int, N: int):
        z = lambda n: torch.zeros(n, dtype=torch.int64)   # noqa: E731
        self.accepted_by_position, self.attempted_by_position = z(L), z(L)
        self.accepted_length_hist, self.window_length_hist = z(L + 1), z(L + 1)
        self.accepted_by_step, self.attempted_by_step = z(N), z(N)
        self.N = N

    def add(self, win: DraftedWindows, out: WindowOutcome) -> None:
        L, N = self.accepted_by_position.numel(), self.N
        kw = win.k[:, None] + torch.arange(L)[None]
        self.accepted_by_position += out.accepted.sum(0)
        self.attempted_by_position += out.attempted.sum(0)
        self.accepted_length_hist += torch.bincount(out.num_accepted, minlength=L + 1)
        self.window_length_hist += torch.bincount(win.n, minlength=L + 1)
        self.accepted_by_step += torch.bincount(kw[out.accepted], minlength=N)[:N]
        self.attempted_by_step += torch.bincount(kw[out.attempted], minlength=N)[:N]

    def fill(self, stats) -> None:
        for name in ("accepted_by_position", "attempted_by_position", "accepted_length_hist",
                     "window_length_hist", "accepted_by_step", "attempted_by_step"):
            setattr(stats, name, getattr(self, name).tolist())


__all__ = ["RootStatus", "RaggedChains", "RoundPlan", "plan_round", "DraftedWindows",
           "WindowOutcome", "TargetCall", "FrozenProposer", "ModelProposer", "proposer_for",
           "RaggedCounters"]

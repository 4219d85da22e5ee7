"""The ragged round: speculative sampling where every chain has its own step and window.

The general path of :class:`~specdiff_kernels.sampling.sampler.SpeculativeSampler`: it runs every
setting, and is the one taken where
:meth:`~specdiff_kernels.sampling.sampler.SpeculativeSampler.static_path_blockers` names a reason
the static round cannot run. A round

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

import functools
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import round as round_ops
from ..ops.layout import StatsLayout, acc_dtype
from ..ops.round_spec import RoundChains, RoundSpec
from .accounting import SamplerStats
from .base import Chains, NonFiniteError, SamplerBase, SamplingResult
from .checks import check_verify_result
from .drafts import DraftModelDraft, FrozenTargetDraft
from .noise import ChainNoise
from .transitions import (
    GaussianTransitions,
    round_spec,
    step_mean,
    stochastic_runs,
)


class RootStatus(IntEnum):
    """What the sampler holds about the target at a chain's current state (frozen drafts)."""

    NONE = 0  # nothing frozen yet: the chain takes one ancestral step first
    STALE = 1  # a frozen value from an earlier state: the root must be evaluated again
    EXACT = 2  # the target's x0-hat at the current state is known (``root_x0``)


@dataclass
class RaggedChains:
    """Per-chain state of a ragged run: states on the device, bookkeeping on the CPU."""

    x: Tensor  # [B, *E] states
    k: Tensor  # [B] int64 sampling step (CPU; N: finished)
    root: Tensor  # [B] int8 RootStatus (CPU)
    root_x0: Optional[Tensor]  # [B, *E] the target's x0-hat at x where root is EXACT
    frozen: Optional[Tensor]  # [B, *E] the frozen-target draft's frozen value
    finished_round: Tensor  # [B] int64 round of each chain's last step (CPU)
    prev: Optional[Tensor] = None  # [B, *E] multistep: the target's x0-hat at x's parent

    def status(self, rows: Tensor, s: RootStatus) -> Tensor:
        return self.root[rows] == int(s)

    def set_status(self, rows: Tensor, s) -> None:
        self.root[rows] = s if isinstance(s, Tensor) else int(s)


@dataclass(frozen=True)
class RoundPlan:
    """Who does what in a round (disjoint rows of live chains)."""

    det: Tensor  # at a deterministic step, root not known: target at the root, then the step
    first_step: Tensor  # nothing frozen yet: one ancestral step from the target at the root
    spec: Tensor  # draft and verify a window


def plan_round(
    k: Tensor, root: Tensor, deterministic: Tensor, N: int, first_steps: bool
) -> RoundPlan:
    """The round's plan from each chain's step and root status (a pure function).
    ``first_steps``: chains with nothing frozen take a first step (the prefetching frozen draft;
    without prefetch the round's call at the roots freezes the exact prediction instead, and a
    draft model freezes nothing)."""
    live = (k < N).nonzero().squeeze(1)
    is_det = deterministic[k[live]]
    det, spec = live[is_det], live[~is_det]
    if not first_steps:
        return RoundPlan(det, spec[:0], spec)
    has_frozen = root[spec] != int(RootStatus.NONE)
    return RoundPlan(det, spec[~has_frozen], spec[has_frozen])


@dataclass(frozen=True)
class DraftedWindows:
    """The drafted windows of chains ``rows`` (padded to L)."""

    rows: Tensor  # [w] chains (CPU)
    Y: Tensor  # [w, L+1, *E] y_0..y_L (positions past the window length repeat the state)
    MQ: Tensor  # [w, L, *E] draft means mq_0..mq_{L-1}
    lengths: Tensor  # [w] int64 per-chain window length n: steps drafted (CPU)
    k: Tensor  # [w] int64 step at the root (CPU)
    u: Tensor  # [w, L] acceptance uniforms
    exact: Tensor  # [w] bool: the target's x0-hat at the root is known (CPU)


@dataclass(frozen=True)
class WindowOutcome:
    """What verifying the windows did, per chain (CPU tensors)."""

    accepted: Tensor  # [w, L] bool: position accepted
    attempted: Tensor  # [w, L] bool: position verified (all earlier ones accepted)
    num_accepted: Tensor  # [w] int64
    advance: Tensor  # [w] int64 steps committed


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
            out[name] = x0[start : start + rows.numel()]
            start += rows.numel()
        return out


def window_prev(first: Tensor, x0: Tensor) -> Tensor:
    """The previous prediction at every window position: ``first`` ([w, *E], the chain's own) at
    position 0, then ``x0`` ([w, L', *E], a prediction by position) of the position before."""
    return torch.cat([first.unsqueeze(1), x0[:, :-1]], 1)


# --------------------------------------------------------------------- drafts on the ragged path
class FrozenProposer:
    """:class:`FrozenTargetDraft` on the ragged path: no call to draft; the frozen value is
    refreshed from the verify call (prefetching) or from a call at the roots."""

    needs_frozen = True

    def __init__(
        self, draft: FrozenTargetDraft, transitions: GaussianTransitions, spec: Optional[RoundSpec]
    ):
        self.draft = draft
        self.T = transitions
        self.prefetch = draft.prefetch_root
        self.spec = spec  # the round ops' constants (None: transitions not affine in x0-hat)

    def freeze_value(self, x: Tensor, x0: Tensor, k: Tensor) -> Tensor:
        """The frozen value of the target's x0-hat at states x: the ops' definition (the fused
        kernels' and the static round's), or the transitions' own conversions where there is no
        coefficient table (not affine)."""
        if self.spec is None:
            return self.draft.freeze_value(self.T, x, x0, k)
        return round_ops.freeze_value(self.spec, x, x0, k)

    def x0_at(self, frozen: Tensor, y: Tensor, k: Tensor) -> Tensor:
        """The draft's x0-hat at drafted states y (as :meth:`freeze_value`)."""
        if self.spec is None:
            return self.draft.x0_at(self.T, frozen, y, k)
        return round_ops.draft_x0(self.spec, y, frozen.expand(y.shape), k)

    def freeze(self, state: RaggedChains, rows: Tensor, x: Tensor, x0: Tensor, k: Tensor) -> None:
        """Freeze the target's x0-hat ``x0`` at states x of chains ``rows`` (device rows)."""
        state.frozen[rows] = self.freeze_value(x, x0, k)

    @property
    def fused(self) -> bool:
        """Whether the window is drafted by the fused ``frozen_draft`` op (affine means)."""
        return self.T.affine

    def fused_draft(
        self,
        state: RaggedChains,
        rows: Tensor,
        k: Tensor,
        lengths: Tensor,
        noise: ChainNoise,
        window: int,
        backend: Optional[str],
    ) -> tuple[Tensor, Tensor]:
        """``(Y, MQ)`` of chains ``rows`` in one pass of ``frozen_draft`` (noise drawn in-kernel:
        the same xi(seed, c, k) as ``noise``), the draft means recomputed from Y in a few
        vectorised ops. Positions past a chain's window length repeat the state; their means are
        not used (the verify op ignores them)."""
        dev = state.x.device
        rd = rows.to(dev)
        kd, nd = k.to(dev), lengths.to(dev)
        fr = state.frozen[rd]
        prev0 = state.prev[rd] if self.T.multistep else None
        chains = RoundChains(fr, kd, nd, noise.chain_ids[rd], prev0)
        Y = round_ops.dispatch_frozen_draft(backend, state.x[rd], chains, self.spec, window)
        pos = torch.arange(window, device=dev)
        kw = kd[:, None] + pos[None]
        Yl = Y[:, :window]
        x0q = self.x0_at(fr.unsqueeze(1), Yl, kw)
        prev = window_prev(state.prev[rd], x0q) if self.T.multistep else None
        return Y, round_ops.affine_mean(self.spec, Yl, x0q, kw, prev)

    def draft_x0(
        self,
        state: RaggedChains,
        rd: Tensor,
        exact0: Tensor,
        j: int,
        yj: Tensor,
        kj: Tensor,
        active: Tensor,
        evaluate,
    ) -> Tensor:
        x0j = self.x0_at(state.frozen[rd], yj, kj)
        if j == 0:
            x0j = torch.where(exact0.view((-1,) + (1,) * (yj.dim() - 1)), state.root_x0[rd], x0j)
        return x0j

    def needed_positions(self, win: DraftedWindows, N: int) -> Tensor:
        """[w, L+1] bool: window positions whose state the target must evaluate."""
        p = torch.arange(win.Y.shape[1])[None]
        lengths = win.lengths[:, None]
        need = (p >= 1) & (p < lengths)  # y_1..y_{n-1}: means of steps 1..n-1
        if self.prefetch:
            need |= (p == 0) & ~win.exact[:, None]  # stale frozen value: the root too
            need |= (p == lengths) & ((win.k + win.lengths) < N)[:, None]  # prefetch the next root
        return need

    def root_x0(self, state: RaggedChains, win: DraftedWindows, TP: Tensor) -> None:
        """Fill the target's x0-hat at the roots that are known without evaluation."""
        rd = win.rows.to(TP.device)
        exact0 = win.exact.to(TP.device).view((-1,) + (1,) * (TP.dim() - 2))
        TP[:, 0] = torch.where(exact0, state.root_x0[rd], TP[:, 0])

    def after_verify(
        self, state: RaggedChains, win: DraftedWindows, TP: Tensor, out: WindowOutcome, N: int
    ) -> None:
        """The next round's frozen value: prefetching, the target's x0-hat at the new root (an
        accepted window's y_n) or at the parent of the rejected step; else stale."""
        rows = win.rows
        if not self.prefetch:
            state.set_status(rows, RootStatus.STALE)
            return
        dev = TP.device
        w = rows.numel()
        rd = rows.to(dev)
        na = out.num_accepted
        rejected = na < win.lengths
        src = torch.where(rejected, na, win.lengths)  # parent of the rejected step, or y_n
        exact = (~rejected) & ((win.k + out.advance) < N)
        usable = rejected | exact
        idx, srcd = torch.arange(w).to(dev), src.to(dev)
        ysrc, x0src = win.Y[idx, srcd], TP[idx, srcd]
        fz = self.freeze_value(ysrc, x0src, (win.k + src).to(dev))
        ud = usable.to(dev).view((w,) + (1,) * (TP.dim() - 2))
        state.frozen[rd] = torch.where(ud, fz, state.frozen[rd])
        state.root_x0[rd] = torch.where(ud, x0src, state.root_x0[rd])
        state.set_status(
            rows, torch.where(exact, int(RootStatus.EXACT), int(RootStatus.STALE)).to(torch.int8)
        )


class ModelProposer:
    """:class:`DraftModelDraft` on the ragged path: n sequential draft calls per window; the
    target evaluates every window's root."""

    needs_frozen = False
    prefetch = False
    fused = False

    def __init__(self, draft: DraftModelDraft, transitions: GaussianTransitions):
        self.draft = draft
        self.T = transitions

    def draft_x0(
        self,
        state: RaggedChains,
        rd: Tensor,
        exact0: Tensor,
        j: int,
        yj: Tensor,
        kj: Tensor,
        active: Tensor,
        evaluate,
    ) -> Tensor:
        act = active.nonzero().squeeze(1)
        x0j = torch.zeros_like(yj)
        x0j[act] = evaluate(yj[act], kj[act], act)
        return x0j

    def needed_positions(self, win: DraftedWindows, N: int) -> Tensor:
        p = torch.arange(win.Y.shape[1])[None]
        return p < win.lengths[:, None]  # the root and y_1..y_{n-1}

    def root_x0(self, state, win, TP) -> None:
        pass

    def after_verify(self, state, win, TP, out, N) -> None:
        pass


def proposer_for(draft, transitions: GaussianTransitions, spec: Optional[RoundSpec]):
    if isinstance(draft, FrozenTargetDraft):
        return FrozenProposer(draft, transitions, spec)
    if isinstance(draft, DraftModelDraft):
        return ModelProposer(draft, transitions)
    raise TypeError(
        f"draft must be a FrozenTargetDraft or DraftModelDraft, got {type(draft).__name__}"
    )


# ------------------------------------------------------------------------- counters
class RaggedCounters:
    """Acceptance statistics of a ragged run, in the static round's container (an int64 vector
    laid out by :class:`~specdiff_kernels.ops.layout.StatsLayout`, on the CPU here; its head slots
    are unused: the ragged round counts rounds and steps on the host)."""

    def __init__(self, L: int, N: int, B: int):
        self.layout = StatsLayout(L, N, B)
        self.counts = torch.zeros(self.layout.size, dtype=torch.int64)

    def add(self, win: DraftedWindows, out: WindowOutcome) -> None:
        lay, c = self.layout, self.counts
        L, N = lay.L, lay.N
        kw = win.k[:, None] + torch.arange(L)[None]
        lay.view(c, "accepted_by_position").add_(out.accepted.sum(0))
        lay.view(c, "attempted_by_position").add_(out.attempted.sum(0))
        lay.view(c, "accepted_length_hist").add_(torch.bincount(out.num_accepted, minlength=L + 1))
        lay.view(c, "window_length_hist").add_(torch.bincount(win.lengths, minlength=L + 1))
        lay.view(c, "accepted_by_step").add_(torch.bincount(kw[out.accepted], minlength=N)[:N])
        lay.view(c, "attempted_by_step").add_(torch.bincount(kw[out.attempted], minlength=N)[:N])

    def fill(self, stats: SamplerStats, finished_round: Tensor) -> None:
        """Copy the counters, and each chain's last round, into ``stats``."""
        self.layout.view(self.counts, "chain_rounds").copy_(finished_round)
        self.layout.fill(stats, self.counts.tolist())


# ------------------------------------------------------------------------- the round
class RaggedRound:
    """The ragged rounds of one speculative run, from the initial states to the end of the
    schedule (see the module docstring): ``RaggedRound(sampler, x, noise, chains).run()``.

    The run's state lives on ``self``: ``state`` (:class:`RaggedChains`: states, steps, root
    status, frozen values), ``proposer`` (the draft as this path runs it), ``stats`` and
    ``counters`` (cost and acceptance), ``budget`` (the adaptive window's per-chain counts; None
    with a fixed window) and ``bar`` (progress; None without). ``sampler``, the
    :class:`~specdiff_kernels.sampling.sampler.SpeculativeSampler`, supplies the settings only
    (model, transitions, L, draft, window policy, verify op, backend, ``check_finite``) and the
    checked network evaluation.
    """

    def __init__(
        self,
        sampler: SamplerBase,
        x: Tensor,
        noise: ChainNoise,
        chains: Chains,
        warm: Optional[Tensor] = None,
    ):
        self.sampler = sampler
        self.T, self.L = sampler.transitions, sampler.window
        self.N = self.T.num_steps
        self.noise, self.chains = noise, chains
        # the round ops' constants (affine transitions): the fused draft and the means' table
        freeze = getattr(sampler.draft, "freeze", "x0")  # (a draft model freezes nothing)
        self.spec = round_spec(self.T, noise.seed, freeze) if self.T.affine else None
        self.proposer = proposer_for(sampler.draft, self.T, self.spec)
        self.policy = sampler.window_policy
        self.stochastic_ahead = stochastic_runs(self.T)  # by step: before a deterministic one
        B = x.shape[0]
        frozen = self.proposer.needs_frozen
        self.state = RaggedChains(
            x=x,
            k=torch.zeros(B, dtype=torch.int64),
            root=torch.zeros(B, dtype=torch.int8),
            root_x0=torch.zeros_like(x) if frozen else None,
            frozen=torch.zeros_like(x) if frozen else None,
            finished_round=torch.zeros(B, dtype=torch.int64),
            # the first step is first order (c_prev[0] = 0): zeros are never read
            prev=torch.zeros_like(x) if self.T.multistep else None,
        )
        if warm is not None:  # the guess is the first frozen value, at stale roots
            rows = torch.arange(B, device=x.device)
            self.proposer.freeze(self.state, rows, x, warm, self.state.k.to(x.device))
            self.state.set_status(torch.arange(B), RootStatus.STALE)
        self.stats = SamplerStats(sampler.name, B, self.N, self.L)
        self.counters = RaggedCounters(self.L, self.N, B)
        self.budget = None if self.policy is None else self.policy.init_state(B)
        self.bar = sampler.progress_bar(B * self.N)

    def run(self) -> SamplingResult:
        """Every round until every chain has finished; the samples and the run's stats
        (``wall_time`` is the caller's to set)."""
        while self._round():
            pass
        if self.bar is not None:
            self.bar.close()
        self.counters.fill(self.stats, self.state.finished_round)
        return SamplingResult(self.state.x, self.stats)

    def _round(self) -> bool:
        """One round (False: every chain had finished, nothing was done)."""
        state, prop = self.state, self.proposer
        self._free_deterministic_steps()
        plan = plan_round(state.k, state.root, self.T.deterministic, self.N, prop.prefetch)
        if plan.det.numel() + plan.first_step.numel() + plan.spec.numel() == 0:
            return False
        self.stats.rounds += 1
        if prop.needs_frozen and not prop.prefetch:
            plan = self._root_call(plan)
        win = None
        if plan.spec.numel():
            win = self._draft_windows(plan.spec, self._adaptive_lengths(plan.spec))
        dev = state.x.device
        call = TargetCall()
        call.add("det", state.x[plan.det.to(dev)], state.k[plan.det], plan.det)
        call.add(
            "first_step",
            state.x[plan.first_step.to(dev)],
            state.k[plan.first_step],
            plan.first_step,
        )
        evaluated = None
        if win is not None:
            evaluated = prop.needed_positions(win, self.N).nonzero(as_tuple=True)  # (window, pos)
            wi, pi = evaluated
            call.add("window", win.Y[wi.to(dev), pi.to(dev)], win.k[wi] + pi, win.rows[wi])
        x0 = call.run(self._target)
        if plan.det.numel():
            self._commit_deterministic_steps(plan.det, x0["det"])
        if plan.first_step.numel():
            self._commit_first_steps(plan.first_step, x0["first_step"])
        if win is not None:
            self._commit_windows(win, evaluated, x0["window"])
        return True

    # ------------------------------------------------------------------ calls and commits
    def _target(self, xs: Tensor, ks: Tensor, rows: Tensor) -> Tensor:
        """One sequential target call on states xs of chains rows."""
        x0 = self.sampler.evaluate(self.sampler.model, "target", xs, ks, rows, self.chains)
        self.stats.target_calls += 1
        self.stats.target_evals += rows.numel()
        if self.budget is not None:
            B = self.state.x.shape[0]
            self.budget["evals"] += torch.bincount(rows, minlength=B).to(torch.float64)
        return x0

    def _advance(self, rows: Tensor, by: Tensor | int) -> None:
        """Chains ``rows`` committed ``by`` steps this round."""
        state = self.state
        state.k[rows] += by
        if self.budget is not None:
            self.budget["steps"][rows] += by
        state.finished_round[rows] = self.stats.rounds
        if self.bar is not None:
            self.bar.update(int(by.sum()) if isinstance(by, Tensor) else by * rows.numel())

    def _free_deterministic_steps(self) -> None:
        """Deterministic steps whose root prediction is known (prefetched): no call."""
        state, N = self.state, self.N
        if not self.proposer.needs_frozen:
            return
        known = (
            (
                (state.k < N)
                & (state.root == int(RootStatus.EXACT))
                & self.T.deterministic[state.k.clamp(max=N - 1)]
            )
            .nonzero()
            .squeeze(1)
        )
        if known.numel():
            self._commit_deterministic_steps(known, state.root_x0[known.to(state.x.device)])

    def _root_call(self, plan: RoundPlan) -> RoundPlan:
        """FrozenTargetDraft(prefetch_root=False): a call at every root first (deterministic-step
        chains take their step; speculating chains freeze the exact prediction)."""
        state = self.state
        dev = state.x.device
        call = TargetCall()
        call.add("det", state.x[plan.det.to(dev)], state.k[plan.det], plan.det)
        call.add("spec", state.x[plan.spec.to(dev)], state.k[plan.spec], plan.spec)
        x0 = call.run(self._target)
        if plan.det.numel():
            self._commit_deterministic_steps(plan.det, x0["det"])
        sd = plan.spec.to(dev)
        state.root_x0[sd] = x0["spec"]
        self.proposer.freeze(state, sd, state.x[sd], x0["spec"], state.k[plan.spec].to(dev))
        state.set_status(plan.spec, RootStatus.EXACT)
        return RoundPlan(plan.det[:0], plan.first_step, plan.spec)

    def _commit_deterministic_steps(self, rows: Tensor, x0: Tensor) -> None:
        """Deterministic steps (std 0) of chains ``rows`` given the target's x0 at their roots."""
        state = self.state
        rd = rows.to(state.x.device)
        kr = state.k[rows].to(state.x.device)
        xr = state.x[rd]
        if self.proposer.needs_frozen:
            self.proposer.freeze(state, rd, xr, x0, kr)
            state.set_status(rows, RootStatus.STALE)
        state.x[rd] = step_mean(self.T, xr, x0, kr, self._prev(rd, x0))
        self.stats.deterministic_steps += rows.numel()
        self._advance(rows, 1)

    def _commit_first_steps(self, rows: Tensor, x0: Tensor) -> None:
        """The first step of chains with nothing frozen yet: one ancestral step, freezing the
        target's x0-hat."""
        state, T = self.state, self.T
        dev = state.x.device
        rd = rows.to(dev)
        kr = state.k[rows]
        kd = kr.to(dev)
        xi, _ = self.noise.window(rows, kr, 1)
        xr = state.x[rd]
        mean = step_mean(T, xr, x0, kd, self._prev(rd, x0))
        self.proposer.freeze(state, rd, xr, x0, kd)
        state.set_status(rows, RootStatus.STALE)
        state.x[rd] = mean + T.coef("std", kd, xr) * xi[:, 0].to(dev)
        self.stats.direct_steps += rows.numel()
        self._advance(rows, 1)

    def _prev(self, rd: Tensor, x0: Tensor) -> Optional[Tensor]:
        """Multistep: chains rd's previous prediction, which ``x0`` (the target's x0-hat at their
        current states, about to be stepped from) replaces. None otherwise."""
        if self.state.prev is None:
            return None
        prev = self.state.prev[rd]
        self.state.prev[rd] = x0
        return prev

    # ------------------------------------------------------------------ windows
    def _adaptive_lengths(self, rows: Tensor) -> Optional[Tensor]:
        """The adaptive window's choice of lengths for chains ``rows`` (None: fixed L)."""
        if self.policy is None:
            return None
        state, prop = self.state, self.proposer
        exact = (
            state.status(rows, RootStatus.EXACT)
            if prop.needs_frozen
            else torch.zeros(rows.shape, dtype=torch.bool)
        )
        # prefetching frozen draft: a stale root is evaluated in this round's call
        extra = (
            (~exact).to(torch.float64)
            if prop.prefetch
            else torch.zeros(exact.shape, dtype=torch.float64)
        )
        return self.policy.lengths(
            self.budget, rows, exact, extra, steps_left=self.N - state.k[rows]
        )

    def _draft_windows(self, rows: Tensor, chosen: Optional[Tensor]) -> DraftedWindows:
        """Draft y_1..y_n and mq_0..mq_{n-1} of chains ``rows`` (padded to L), where n, each
        chain's window length, is L or the adaptive window's ``chosen`` length, capped by the
        stochastic steps before the next deterministic step."""
        state, L, noise = self.state, self.L, self.noise
        kr = state.k[rows]
        cap = torch.full_like(kr, L) if chosen is None else chosen.clamp(1, L)
        lengths = torch.minimum(self.stochastic_ahead[kr], cap)  # [w] >= 1
        exact = (
            state.status(rows, RootStatus.EXACT)
            if self.proposer.needs_frozen
            else torch.zeros(rows.numel(), dtype=torch.bool)
        )
        if self.proposer.fused:
            Y, MQ = self.proposer.fused_draft(
                state, rows, kr, lengths, noise, L, self.sampler.backend
            )
            return DraftedWindows(rows, Y, MQ, lengths, kr, noise.uniforms(rows, kr, L), exact)
        xi, u = noise.window(rows, kr, L)
        Y, MQ = self._draft_sequential(rows, kr, lengths, exact, xi.to(state.x.device))
        return DraftedWindows(rows, Y, MQ, lengths, kr, u, exact)

    def _draft_sequential(
        self, rows: Tensor, kr: Tensor, lengths: Tensor, exact: Tensor, xi: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(Y, MQ)`` of chains ``rows`` one position at a time (the draft's x0-hat at each
        drafted state: a draft-model call, or the frozen value re-read at non-affine means)."""
        state, T = self.state, self.T
        dev = state.x.device
        rd = rows.to(dev)
        kd, nd, exact0 = kr.to(dev), lengths.to(dev), exact.to(dev)
        draft_eval = functools.partial(self._draft_call, rows)
        ys = [state.x[rd]]
        mqs = []
        shape1 = (rows.numel(),) + (1,) * (state.x.dim() - 1)
        max_n = int(lengths.max())
        prev = state.prev[rd] if T.multistep else None  # the draft's previous prediction
        for j in range(self.L):
            yj = ys[j]
            if j >= max_n:
                mqs.append(yj)
                ys.append(yj)
                continue
            kj = kd + j
            active = nd > j
            x0j = self.proposer.draft_x0(state, rd, exact0, j, yj, kj, active, draft_eval)
            mq = step_mean(T, yj, x0j, kj, prev)
            prev = x0j if T.multistep else None
            ynext = mq + T.coef("std", kj, yj) * xi[:, j]
            mask = active.view(shape1)
            mqs.append(torch.where(mask, mq, yj))
            ys.append(torch.where(mask, ynext, yj))
        return torch.stack(ys, 1), torch.stack(mqs, 1)

    def _draft_call(self, rows: Tensor, y: Tensor, k: Tensor, act: Tensor) -> Tensor:
        """One sequential draft-model call on states y of windows ``act`` of chains ``rows``."""
        self.stats.draft_calls += 1
        self.stats.draft_evals += act.numel()
        return self.sampler.evaluate(
            self.sampler.draft.model, "draft", y, k, rows[act.cpu()], self.chains
        )

    def _commit_windows(self, win: DraftedWindows, evaluated, x0_evals: Tensor) -> None:
        """Verify the windows given the target's x0-hat at the ``evaluated`` (window, position)
        states, commit each chain's accepted steps and the reflected one, count."""
        state, T, L = self.state, self.T, self.L
        dev = state.x.device
        rows, lengths, kr = win.rows, win.lengths, win.k
        TP = torch.zeros_like(win.Y)  # target raw x0 at y_0..y_L
        TP[evaluated[0].to(dev), evaluated[1].to(dev)] = x0_evals
        self.proposer.root_x0(state, win, TP)
        pos = torch.arange(L)
        kw = kr[:, None] + pos[None]  # [w, L] step of each position
        active = pos[None] < lengths[:, None]
        rd = rows.to(dev)
        # the target's previous prediction by position: the chain's own, then P_{j-1}
        prev = window_prev(state.prev[rd], TP[:, :L]) if T.multistep else None
        # positions past a chain's window length hold anything finite: the verify op ignores them
        args = (win.Y[:, :L], TP[:, :L], kw.to(dev), prev)
        MP = step_mean(T, *args) if self.spec is None else round_ops.affine_mean(self.spec, *args)
        sig_dtype = acc_dtype(state.x.dtype)
        sigma = torch.where(active, T.step_std(kw), torch.ones((), dtype=torch.float64))
        sigma = sigma.to(device=dev, dtype=sig_dtype)
        res = self.sampler.verify_fn(
            win.Y[:, 1:].contiguous(),
            win.MQ.contiguous(),
            MP.contiguous(),
            sigma,
            win.u.to(dev),
            lengths.to(dev),
            backend=self.sampler.backend,
        )
        check_verify_result(res)
        na = res.num_accepted.to("cpu", torch.int64)
        attempted = active & (pos[None] <= na[:, None])
        accepted = pos[None] < na[:, None]
        if self.sampler.check_finite:
            self._check_log_ratio(win, res.log_ratio, attempted)
        advance = na + (na < lengths).to(torch.int64)
        state.x[rd] = res.next_state.to(state.x.dtype)
        if T.multistep:  # P at the new state's parent: y_J after a rejection at J, else y_{n-1}
            parent = torch.where(na < lengths, na, lengths - 1).to(dev)
            state.prev[rd] = TP[torch.arange(rows.numel(), device=dev), parent]
        out = WindowOutcome(accepted, attempted, na, advance)
        self.counters.add(win, out)
        self.stats.windows += rows.numel()
        self.stats.speculative_steps += int(advance.sum())
        self.proposer.after_verify(state, win, TP, out, self.N)
        self._advance(rows, out.advance)
        if self.policy is not None:
            self.policy.update(self.budget, rows, win.exact, out.accepted, out.attempted)

    def _check_log_ratio(self, win: DraftedWindows, log_ratio: Tensor, attempted: Tensor) -> None:
        """Raise :class:`NonFiniteError` at the first attempted position whose log ratio is not
        finite."""
        lr = log_ratio.to("cpu")
        bad = attempted & ~torch.isfinite(lr)
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            step = int(win.k[i]) + j
            t = self.T.timesteps[step].item()
            raise NonFiniteError(
                f"non-finite log ratio ({float(lr[i, j])}) at sampling step "
                f"{step} (timestep t={t}, window position {j}) for chain "
                f"{self.chains.ids[int(win.rows[i])]}"
            )


__all__ = [
    "RootStatus",
    "RaggedChains",
    "RoundPlan",
    "plan_round",
    "DraftedWindows",
    "WindowOutcome",
    "TargetCall",
    "FrozenProposer",
    "ModelProposer",
    "proposer_for",
    "RaggedCounters",
    "RaggedRound",
]

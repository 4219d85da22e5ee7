"""Adaptive window length for the speculative sampler:
``SpeculativeSampler(..., window="adaptive")`` or
``window=AdaptiveWindow(max_window=..., max_evals_ratio=...)``.

The rule (per chain, before each of its rounds)
------------------------------------------------
Each chain keeps exponentially discounted counts (factor ``decay`` per window) of its OWN verified
steps, in two groups, because the first step of a window behaves differently from the others:

* position 0 of windows whose root prediction is NOT the target's own (after a rejection the
  prefetching frozen draft reuses the prediction at the rejected step's parent; a draft model never
  matches exactly): acceptance ``a0``. When the root prediction IS exact (frozen draft after a fully
  accepted window, or without prefetch), mq_0 == mp_0 and step 0 is always accepted: a0 = 1.
* positions 1.. of every window: acceptance ``a``.

Estimates: ``a = acc / att`` where the counts start at the prior pseudo-counts
(``prior_acceptance * prior_weight``, ``prior_weight``) and are discounted like the data, so the
prior (optimistic by default: 0.95) sets the first windows and fades after a few rounds;
``a0 = (acc0 + a * w) / (att0 + w)`` is shrunk towards the chain's own ``a`` (stale-root windows are
rarer). Accepted / attempted is the maximum-likelihood estimate of a geometric acceptance censored
at the window end (a step is attempted when every earlier step of its window was accepted). With
these acceptances a window of L drafted steps commits in expectation

    S(L) = 1 + a0 * (1 + a + ... + a^(L-2)) = 1 + a0 * (1 - a^(L-1)) / (1 - a)

steps in one round (one sequential target call with the prefetching frozen draft), and costs
E(L) = L + e target evaluations this round (e = 1 for the stale root the prefetching draft must
evaluate, else 0). The ancestral chain costs one evaluation per step. Sequential calls are
minimised by committing as many steps per round as possible, so the rule maximises S(L) over the
windows whose expected cost per committed step stays within the cap c = ``max_evals_ratio``:

    admissible = { L in [min_window, max_window] : E(L) / S(L) <= c }
    L = the shortest admissible L with S(L) >= max_{admissible} S - 0.01

(the 0.01-step tolerance, ``GAIN_TOL``, stops extending a window whose remaining expected gain is
negligible, e.g. at zero acceptance; if no L is admissible, the L with the smallest E(L)/S(L)).
Each round then costs in expectation at most c evaluations per committed step, so a chain's total
is about c x the ancestral chain's or less, up to the model's error. Two known limits: (1) the
model assumes i.i.d. acceptance within a window and lags acceptance that changes quickly along the
schedule (diffusion: near 1 for most steps, collapsing over the last ~10%), so realised totals can
exceed c by a few percent; (2) with the prefetching frozen draft every round after a rejection
costs the stale root's evaluation, so where acceptance collapses even L = 1 costs ~2 evaluations
per step and caps below ~1.6 cannot hold there. ``pacing=True`` lets a chain spend the budget it
has saved so far: the cap of its next round becomes max(c, (c N - spent) / steps left) (N: the
chain's steps in all), which helps when acceptance is high for most of the run and low at the end
(fixed long windows are then cheap overall) at the price of tighter cap adherence.

Why exactness is untouched
--------------------------
A round of the speculative sampler started at step k with ANY window length L commits steps whose
law, given the chain's past, is exactly the ancestral chain's (the verify step is a maximal
coupling per step; the round ends at a stopping time: the first rejection). Here L is a function
of the chain's OWN past verification outcomes and of whether its root prediction is exact, i.e.
of the noises xi and uniforms u of steps < k that it has already consumed: L is measurable with
respect to the chain's past at the start of the round, just like k itself. Conditioning on that
past, the round is an ordinary speculative round with a fixed L, so every committed step is drawn
from the target transition, and by induction over rounds (which end at stopping times: the strong
Markov property) the output law is the ancestral chain's. The noise re-read after a rejection is
still fresh: the round's outcome, hence the next L, depends only on the noise of the steps it
committed. What MUST NOT drive L is anything that looks ahead: the current round's uniforms or
log ratios before verification. Other chains' outcomes are not used either (that would keep
exactness but break the batch-independence of a chain's result). The sampler pads the windows of
a round to a common buffer length (``max_window``); each chain's own L is its per-chain window
length (``lengths``), past which the verify op ignores the buffer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..validate import as_flag, as_int, as_real


class AdaptiveWindow:
    """Per-chain window length from the chain's own past acceptance (see the module docstring).

    Args:
        max_window: the largest window (the sampler's buffer length).
        max_evals_ratio: cap c on target evaluations per committed step, i.e. on total evaluations
            relative to the ancestral chain's (expected, per chain, under the acceptance model).
            ``None``: no cap (always ``max_window``).
        min_window: the smallest window.
        prior_acceptance, prior_weight: prior pseudo-counts (acceptance p over w attempted steps),
            discounted like the data; also the weight w shrinking a0 towards a.
        decay: discount per window of the counts (1: running totals; smaller: faster tracking of
            acceptance that changes along the schedule).
        pacing: spend the evaluation budget saved so far (see the module docstring).
    """

    GAIN_TOL = 0.01  # expected committed steps: longer windows must gain more than this

    def __init__(
        self,
        max_window: int = 32,
        max_evals_ratio: Optional[float] = 2.0,
        *,
        min_window: int = 1,
        prior_acceptance: float = 0.95,
        prior_weight: float = 2.0,
        decay: float = 0.7,
        pacing: bool = False,
    ):
        self.max_window = as_int("max_window", max_window, 1)
        self.min_window = as_int("min_window", min_window, 1)
        if self.min_window > self.max_window:
            raise ValueError(
                f"min_window must be at most max_window={self.max_window}, got {self.min_window}"
            )
        # None: no cap; inf is a cap that never binds
        self.max_evals_ratio = (
            None
            if max_evals_ratio is None
            else as_real("max_evals_ratio", max_evals_ratio, 1.0, finite=False)
        )
        self.prior_acceptance = as_real("prior_acceptance", prior_acceptance, 0.0, 1.0)
        self.prior_weight = as_real("prior_weight", prior_weight, 0.0, open_low=True)
        self.decay = as_real("decay", decay, 0.0, 1.0, open_low=True)
        self.pacing = as_flag("pacing", pacing)

    def __repr__(self) -> str:
        return (
            f"AdaptiveWindow(max_window={self.max_window}, "
            f"max_evals_ratio={self.max_evals_ratio}, "
            f"min_window={self.min_window}, prior_acceptance={self.prior_acceptance}, "
            f"prior_weight={self.prior_weight}, decay={self.decay}, pacing={self.pacing})"
        )

    # ------------------------------------------------------------------ the model
    @staticmethod
    def expected_steps(a0: Tensor, a: Tensor, L: Tensor) -> Tensor:
        """S(L) = 1 + a0 (1 - a^(L-1)) / (1 - a): expected committed steps of a window of L
        (broadcasting; a = 1 gives 1 + a0 (L - 1))."""
        a0, a = a0.clamp(0.0, 1.0), a.clamp(0.0, 1.0)
        Lm1 = (L - 1).to(a.dtype)
        geo = torch.where(a >= 1.0, Lm1, (1 - a**Lm1) / (1 - a).clamp_min(1e-300))
        return 1 + a0 * torch.minimum(geo, Lm1)

    def estimates(self, state: dict, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(a0 for a stale root, a for positions >= 1) of chains ``rows``."""
        w = self.prior_weight
        a = state["acc"][rows] / state["att"][rows]  # prior counts decay with the data
        a0 = (state["acc0"][rows] + a * w) / (state["att0"][rows] + w)  # shrunk towards a
        return a0, a

    def choose(
        self,
        a0: Tensor,
        a: Tensor,
        extra_evals: Optional[Tensor] = None,
        cap: Optional[Tensor] = None,
    ) -> Tensor:
        """Window lengths (int64) for acceptances a0 (step 0), a (later steps), ``extra_evals``
        evaluations per round on top of L and per-chain caps ``cap`` (default
        ``max_evals_ratio``) on evaluations per committed step (all ``[w]``)."""
        a0 = torch.as_tensor(a0, dtype=torch.float64).reshape(-1)
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
        if self.max_evals_ratio is None:
            return torch.full(a.shape, self.max_window, dtype=torch.int64)
        e = (
            torch.zeros_like(a)
            if extra_evals is None
            else torch.as_tensor(extra_evals, dtype=torch.float64).reshape(-1)
        )
        Ls = torch.arange(self.min_window, self.max_window + 1, dtype=torch.float64)[None]
        S = self.expected_steps(a0[:, None], a[:, None], Ls)
        ratio = (Ls + e[:, None]) / S
        c = (
            torch.full_like(a, self.max_evals_ratio)
            if cap is None
            else torch.as_tensor(cap, dtype=torch.float64).reshape(-1)
        )
        ok = ratio <= c[:, None] * (1 + 1e-12)
        # the most expected steps among admissible L; of those within GAIN_TOL steps of it, the
        # shortest (an extra evaluation for a negligible expected gain is not worth it)
        best_S = torch.where(ok, S, torch.full_like(S, -1.0)).amax(1, keepdim=True)
        good = ok & (S >= best_S - self.GAIN_TOL)
        shortest = torch.where(good, Ls, torch.full_like(Ls, math.inf)).amin(1)
        cheapest = Ls[0, ratio.argmin(1)]
        return torch.where(ok.any(1), shortest, cheapest).to(torch.int64)

    def window_for_acceptance(
        self, a: float, a0: Optional[float] = None, extra_evals: float = 0.0
    ) -> int:
        """The window the rule picks for known acceptances (a0 defaults to a)."""
        a0 = a if a0 is None else a0
        chosen = self.choose(torch.tensor([a0]), torch.tensor([a]), torch.tensor([extra_evals]))
        return int(chosen[0])

    # ------------------------------------------------------------------ sampler hooks
    def init_state(self, num_chains: int) -> dict:
        """Per-chain discounted counts (float64 ``[B]``)."""
        st = {
            name: torch.zeros(num_chains, dtype=torch.float64)
            for name in ("acc0", "att0", "acc", "att", "evals", "steps")
        }
        st["acc"] += self.prior_acceptance * self.prior_weight  # the prior: pseudo-counts that
        st["att"] += self.prior_weight  # are discounted like the data
        return st

    def pacing_cap(self, state: dict, rows: Tensor, steps_left: Tensor) -> Tensor:
        """Evaluations per step the chains can still afford, max(c, (c * N - spent) / steps left),
        where N = steps done + steps left (the chain's whole budget is c * N); never below c."""
        done = state["steps"][rows]
        left = steps_left.to(torch.float64).clamp_min(1.0)
        c = self.max_evals_ratio
        return ((c * (done + left) - state["evals"][rows]) / left).clamp_min(c)

    def lengths(
        self,
        state: dict,
        rows: Tensor,
        exact_root: Tensor,
        extra_evals: Optional[Tensor] = None,
        steps_left: Optional[Tensor] = None,
    ) -> Tensor:
        """Next window length of chains ``rows``; ``exact_root[i]``: the draft's step-0 mean is the
        target's (step 0 always accepted); ``extra_evals``: evaluations this round beyond L;
        ``steps_left``: steps to the end of the chain (enables budget pacing)."""
        a0, a = self.estimates(state, rows)
        a0 = torch.where(exact_root.to(torch.bool), torch.ones_like(a0), a0)
        cap = None
        if self.pacing and steps_left is not None and self.max_evals_ratio is not None:
            cap = self.pacing_cap(state, rows, steps_left)
        return self.choose(a0, a, extra_evals, cap)

    def update(
        self, state: dict, rows: Tensor, exact_root: Tensor, accepted: Tensor, attempted: Tensor
    ) -> None:
        """Fold in verified windows of chains ``rows``: ``accepted`` / ``attempted`` ``[w, L]``
        bool by window position (position 0 counts only where the root was not exact)."""
        d = self.decay
        stale = (~exact_root.to(torch.bool)).to(torch.float64)
        acc, att = accepted.to(torch.float64), attempted.to(torch.float64)
        for name, new in (
            ("acc0", acc[:, 0] * stale),
            ("att0", att[:, 0] * stale),
            ("acc", acc[:, 1:].sum(1)),
            ("att", att[:, 1:].sum(1)),
        ):
            state[name][rows] = d * state[name][rows] + new


__all__ = ["AdaptiveWindow"]

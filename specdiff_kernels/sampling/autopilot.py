"""The cost-aware window controller: ``SpeculativeSampler(..., window="auto")`` (the default).

Speculation trades evaluations for sequential calls. It pays only where a network call on the
states of a window costs about as much as a call on the roots alone; where calls are
compute-bound (a CPU at a large batch, a big UNet) every extra state costs its full price and
plain ancestral steps are faster. The controller decides this per round, from measurements.

1. **Cost model** (:class:`CostModel`): the network's time for a call on b states, measured at the
   first ``sample()`` (:func:`calibrate`): b = B and 2B alternately, then 9B twice (a window of 8
   on B chains) unless the time already grows in proportion to b (compute-bound: larger calls are
   extrapolated linearly) or that one call would cost more than the budget (2% of the estimated
   ancestral run);
   piecewise linear in between, extended by the last measured slope. Plus the sampler's own cost
   per round: a fixed part per round and a part per drafted state, from one timed ``frozen_draft``
   (draft, verify and the window's gather cost about three such passes). Cached per sampler and
   (B, event shape, dtype, device); ``cost=`` replaces the measurement (a table ``{b: seconds}`` or
   a callable ``b -> seconds``).
2. **Acceptance**: discounted counts (factor ``decay`` per verified round) of this run's verified
   steps, pooled over the chains: a0 at window position 0, a at positions >= 1, starting from a
   prior (``prior_acceptance`` over ``prior_weight`` pseudo-steps) discounted like the data.
3. **Choice** (:meth:`WindowController.choose`): before each round the window W in
   ``CANDIDATES`` (0: plain ancestral steps; 1 never: it commits one step on at least the
   states of an ancestral step; capped by the longest stochastic run) with the most expected
   committed chain-steps per second,

       W = argmax  live * S(W) / (f_W * (t_net(b_W) + t_own(W))),
       S(W) = 1 + a0 (1 - a^(W-1)) / (1 - a),   S(0) = 1,

   b_W the states the round's call holds, a speculative W only where it beats the ancestral
   step by ``margin`` (10%: a near-tie is not worth the risk).
4. **Measured rounds** (``f_W``): the cost model is a first guess, made in milliseconds. Every
   real round and block is timed (host clock, from its start to the next read of the counters)
   and its ratio to the model's seconds is kept per arm (ancestral steps; speculative rounds of
   any window: the last ``KEEP``); ``f_W`` is the median of its arm's ratios (else the other
   arm's: a cold calibration misjudges every size alike). Sub-millisecond probes at the start
   are noisy, and a wrong first guess used to decide a whole run; now both arms are measured on
   real rounds (``MEASURE`` times) unless the guess rules one out (below ``EXPLORE`` of the
   preferred arm's rate; an arm the process has never measured is measured once even then, in
   runs of at least ``(SPEC_PROBE + 1) / PROBE_SHARE`` steps): ancestral steps first (they are the baseline's own work), then
   speculation on a short window (``SPEC_PROBE``). An arm last measured more than ``REVISIT``
   decisions ago, or not yet in this run, is measured again where it is a close call
   (``REVISIT_RATE``): the machine's speed drifts. The corrections are shared, with the cost model, by later runs in the process.
   A user's ``cost=`` is never corrected: such runs repeat bit for bit.
5. **Ancestral blocks**: W = 0 runs a block of plain ancestral steps in the ancestral chain's
   own loop (``FIRST_BLOCK`` steps, doubling while W = 0 is chosen again, up to
   ``LONGEST_BLOCK``; ``PROBE_BLOCK`` to measure), then the controller decides again from the measured costs, so a run that fell
   back comes back to speculation when its own rounds say it pays. The next round starts from
   stale roots: the frozen value is the x0-hat of each chain's last parent state (as after a
   rejected window).

Exactness (docs/design.md §5): W is a function of the chains' past verification outcomes (steps
already committed) and of timings, which do not depend on any chain's noise; given that past, a
round with any W commits steps whose law is the ancestral chain's, and an ancestral step draws
the step's own noise xi_k. By the same induction over rounds (stopping times) as for a fixed L,
the output law is the ancestral chain's. What W must never depend on is the current round's
noise, uniforms or log ratios: it is chosen before the round. Two consequences users see: the
samples of a seed depend on the measured costs (pass ``cost=`` or an int ``window`` to make a run
repeatable across processes), and a chain's samples depend on its batch (W is chosen for the
batch).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..ops import layout
from .accounting import SamplerStats
from .ancestral import LeanAncestral
from .static_round import ChainBatch, StaticRound
from .window import AdaptiveWindow

CANDIDATES = (0, 1, 2, 4, 8, 16, 32)
PROBE_MULTIPLES = (2, 9)  # call sizes of windows 1 and 8 (full call)
BUDGET_FRACTION = 0.02  # the calibration's budget: this fraction of the estimated ancestral run
LINEAR = 0.9  # t(mB) >= LINEAR * m * t(B): compute-bound, extrapolate linearly from here
# the sampler's own fixed cost per round (host work, the round's small ops), seconds: the static
# round's and the ancestral step's own costs at B = 1 (bench/results/latency_cpu.md)
ROUND_FIXED = {"cpu": 8e-5, "cuda": 6e-5}
ANCESTRAL_FIXED = {"cpu": 3e-5, "cuda": 2e-5}
OWN_PASSES = 3.0  # a speculative round reads and writes the window about this many times
# measuring real rounds: the arm not preferred is tried while it has fewer measurements than this
# (W = 0: ancestral blocks; W >= 1: speculative rounds, pooled over W) and its rate is at least
# EXPLORE times the preferred arm's; the last KEEP measurements per W are kept
MEASURE = {0: 2, 1: 2}
EXPLORE = 0.5
KEEP = 8
SPEC_PROBE = 4  # the longest window used to measure speculative rounds
# an arm not measured for REVISIT decisions is measured again where its rate is at least this
# fraction of the preferred arm's (W = 0: ancestral, 1: speculative)
REVISIT = 10
FORGET = 60  # a window's own measurements count for this many decisions
REVISIT_RATE = {0: 0.85, 1: 0.7}
PROBE_SHARE = 0.1
FIRST_BLOCK, PROBE_BLOCK = 8, 4  # ancestral block lengths: first chosen (doubles), measuring
LONGEST_BLOCK = 32  # the controller decides again at least this often


@dataclass
class CostModel:
    """Seconds per network call on b states and the sampler's own cost (see the module docstring).

    ``sizes``/``seconds``: measured calls (increasing b); ``per_state``: the own cost per drafted
    state; ``round_fixed``/``ancestral_fixed``: the own cost per speculative round / ancestral
    step; ``calibration_s``: what measuring took; ``user``: a user's ``b -> seconds``."""

    sizes: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    per_state: float = 0.0
    round_fixed: float = 8e-5
    ancestral_fixed: float = 3e-5
    calibration_s: float = 0.0
    user: Optional[Callable[[int], float]] = None
    online: bool = True  # corrected by this process's real rounds (a user's cost=: never)
    # arm (0: ancestral steps, 1: speculative rounds) -> its last (measured / model) seconds
    ratios: dict = field(default_factory=dict)
    clock: int = 0  # decisions made with this model (all runs)
    by_window: dict = field(default_factory=dict)  # W >= 1 -> recent (clock, ratio) of W alone
    when: dict = field(default_factory=dict)  # arm -> the clock at its last measurement
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def network(self, b: float) -> float:
        """Predicted seconds of one call on b states (memoised: a run asks for few sizes)."""
        if b not in self._memo:
            self._memo[b] = self._network(b)
        return self._memo[b]

    def _network(self, b: float) -> float:
        if self.user is not None:
            return float(self.user(b))
        xs, ts = self.sizes, self.seconds
        if len(xs) == 1 or b <= xs[0]:
            return ts[0] * max(b, 1.0) / xs[0] if b > xs[0] else ts[0]
        for (x0, t0), (x1, t1) in zip(zip(xs, ts), zip(xs[1:], ts[1:])):
            if b <= x1:
                return t0 + (t1 - t0) * (b - x0) / (x1 - x0)
        slope = max((ts[-1] - ts[-2]) / (xs[-1] - xs[-2]), 0.0)
        return ts[-1] + slope * (b - xs[-1])

    def speculative_round(self, evals: float, drafted: float) -> float:
        return self.network(evals) + self.round_fixed + OWN_PASSES * self.per_state * drafted

    def ancestral_step(self, live: float) -> float:
        return self.network(live) + self.ancestral_fixed + self.per_state * 2 * live

    def measured(self, W: int, ratio: float) -> None:
        """Fold in one real round of window W (0: an ancestral block): measured / model seconds."""
        if self.online and math.isfinite(ratio) and ratio > 0:
            arm = min(W, 1)
            kept = self.ratios.setdefault(arm, [])
            kept.append(ratio)
            del kept[:-KEEP]
            self.when[arm] = self.clock
            if W > 0:
                own = self.by_window.setdefault(W, [])
                own.append((self.clock, ratio))
                del own[:-KEEP]

    def factor(self, W: int) -> float:
        """The correction of the model's seconds for window W: the median of W's own ratios
        where it has two from the last ``FORGET`` decisions, else of the last measured ratios of
        its arm (ancestral steps, or speculative rounds of any window), else the other arm's (a call timed cold at the start misjudges every size alike), else 1. A median, not
        a minimum: the minimum of many measurements is lower than one measurement's, and the
        arms are measured unequally often."""
        own = [r for c, r in self.by_window.get(W, ()) if self.clock - c <= FORGET]
        if len(own) >= 2:  # the window's own recent rounds: the model's shape can be off
            return statistics.median(own)
        kept = self.ratios.get(min(W, 1)) or self.ratios.get(1 - min(W, 1))
        return statistics.median(kept) if kept else 1.0

    def needs_measuring(self, W: int) -> bool:
        """Whether the arm of W (0: ancestral, else speculative) has too few real measurements."""
        arm = min(W, 1)
        return self.online and len(self.ratios.get(arm, ())) < MEASURE[arm]

    def stale(self, W: int) -> bool:
        """Whether the arm of W was last measured more than ``REVISIT`` decisions ago (the
        machine's speed drifts: a slow spell must not keep an arm out for good)."""
        last = self.when.get(min(W, 1))
        return self.online and (last is None or self.clock - last > REVISIT)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["user"] = self.user is not None
        del d["_memo"]
        return d

    @staticmethod
    def from_user(cost, device_type: str) -> "CostModel":
        """``cost=``: a table ``{b: seconds}`` or a callable ``b -> seconds``."""
        fixed = dict(
            round_fixed=ROUND_FIXED.get(device_type, 8e-5),
            ancestral_fixed=ANCESTRAL_FIXED.get(device_type, 3e-5),
        )
        fixed["online"] = False  # a run then repeats bit for bit across processes
        if callable(cost):
            return CostModel(user=cost, **fixed)
        if not isinstance(cost, dict) or not cost:
            raise TypeError(
                f"cost must be a non-empty dict {{states: seconds}} or a callable, got "
                f"{type(cost).__name__}"
            )
        items = sorted((int(b), float(t)) for b, t in cost.items())
        if any(b < 1 or not (t > 0 and math.isfinite(t)) for b, t in items):
            raise ValueError(f"cost must map states >= 1 to finite seconds > 0, got {cost!r}")
        return CostModel([b for b, _ in items], [t for _, t in items], **fixed)


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def calibrate(
    call: Callable[[int], object],
    draft: Callable[[], object],
    drafted_states: int,
    B: int,
    max_states: int,
    num_steps: int,
    device_type: str,
    sync: Callable[[], None] = lambda: None,
) -> CostModel:
    """Measure the cost model (see the module docstring): ``call(b)`` runs the network on b
    states, ``draft()`` one ``frozen_draft`` of ``drafted_states`` states."""
    start = time.perf_counter()
    # the first call at a new size may be cold (allocations; oneDNN builds its convolution
    # primitives per shape: a 3 ms call took 25 ms), so each size's first time only counts
    # through the min with a later one
    first = _timed(lambda: call(B), sync)
    first_2B = _timed(lambda: call(2 * B), sync)
    reps = 2 if first < 1e-3 else 1
    # B and 2B alternately (min of each): a slow spell of the machine falls on both sizes
    pairs = [
        (_timed(lambda: call(B), sync), _timed(lambda: call(2 * B), sync)) for _ in range(reps)
    ]
    t_B = min([first] + [p[0] for p in pairs])
    t_2B = max(min([first_2B] + [p[1] for p in pairs]), t_B)
    per_state = _timed(draft, sync) / max(drafted_states, 1)
    model = CostModel(
        [B, 2 * B],
        [t_B, t_2B],
        per_state,
        ROUND_FIXED.get(device_type, 8e-5),
        ANCESTRAL_FIXED.get(device_type, 3e-5),
    )
    if 2 * B > max_states:
        model.sizes, model.seconds = [B], [t_B]
    budget = BUDGET_FRACTION * num_steps * model.ancestral_step(B)
    for m in PROBE_MULTIPLES[1:] if t_2B < LINEAR * 2 * t_B else ():
        b = m * B
        # the slope from B to 2B can understate larger calls' (caches): one call at a window's
        # size, if it costs at most the budget itself
        if b > max_states or model.network(b) > budget:
            break
        # twice: the first call at a new size pays its allocations, and a fresh process (every
        # CLI run) has never made a call this large
        t_b = min(_timed(lambda: call(b), sync) for _ in range(2))
        model.sizes.append(b)
        model.seconds.append(max(t_b, model.seconds[-1]))  # noise must not make b cheaper
        model._memo.clear()
        if t_b >= LINEAR * m * t_B:
            break
    model.calibration_s = time.perf_counter() - start
    return model


def expected_steps(a0: float, a: float, W: int) -> float:
    """S(W): expected steps committed by a window of W drafted steps (W >= 1)."""
    if W <= 1:
        return 1.0
    geo = W - 1 if a >= 1.0 else (1.0 - a ** (W - 1)) / (1.0 - a)
    return 1.0 + a0 * geo


class MostlyAncestralWarning(UserWarning):
    """``window="auto"`` took most of a run's steps as plain ancestral steps (speculation did
    not pay for that model, batch and device)."""


@dataclass
class ControllerLog:
    """What the controller did in one run (``SamplerStats.autopilot``)."""

    cost: dict
    window_hist: dict = field(default_factory=dict)  # W -> rounds (0: ancestral blocks)
    ancestral_steps: int = 0  # chain-steps taken as plain ancestral steps
    ancestral_blocks: list = field(default_factory=list)  # (first round, steps) of each block
    explored: int = 0  # decisions made to measure the arm not preferred (see choose)
    predicted_s: list = field(default_factory=list)  # per round or block
    measured_s: list = field(default_factory=list)  # per round or block (host clock)

    def as_dict(self) -> dict:
        return asdict(self)


class Arm(NamedTuple):
    """One candidate of a decision: window W (0: ancestral steps), expected committed chain-steps
    and seconds, corrected by this process's measurements of real rounds (``factor``)."""

    W: int
    steps: float
    seconds: float
    factor: float

    @property
    def rate(self) -> float:
        return self.steps / self.seconds


class WindowController:
    """The choice of W before each round (see the module docstring). ``max_window``: the
    longest W (the round's buffer); ``compact``: the round's call holds only the states it reads
    (else every chain's W + 1 states)."""

    def __init__(
        self,
        cost: CostModel,
        max_window: int,
        num_chains: int,
        compact: bool,
        *,
        num_steps: int = 0,
        prior_acceptance: float = 0.9,
        prior_weight: float = 2.0,
        decay: float = 0.7,
        margin: float = 0.10,
    ):
        self.cost, self.B, self.compact = cost, num_chains, compact
        # W = 1 commits one step on at least the states of an ancestral step: never better
        self.candidates = [w for w in CANDIDATES if w <= max_window and w != 1]
        self.prior = (prior_acceptance * prior_weight, prior_weight)
        self.decay, self.margin = decay, margin
        # discounted (accepted, attempted) at position 0 and at positions >= 1
        self.pos0 = list(self.prior)
        self.rest = list(self.prior)
        # an arm measured after this clock was measured in this run (each run's first decision
        # moves the clock past it)
        self.run_start = cost.clock
        # an arm this process has never measured is measured once whatever the guess says (a
        # calibration timed beside another process can misjudge a size several times over, and
        # an arm the guess rules out would otherwise never be seen): at most a probe's states
        # per PROBE_SHARE of the run's steps
        self.probe_unmeasured = SPEC_PROBE + 1 <= PROBE_SHARE * num_steps

    def acceptance(self) -> tuple[float, float]:
        return self.pos0[0] / self.pos0[1], self.rest[0] / self.rest[1]

    def observe(self, accepted: list, attempted: list) -> None:
        """Fold in one round's verified steps by window position (the prior's pseudo-counts are
        discounted with the data)."""
        d = self.decay
        new0 = (accepted[0], attempted[0])
        new1 = (sum(accepted[1:]), sum(attempted[1:]))
        for counts, new in ((self.pos0, new0), (self.rest, new1)):
            for i in (0, 1):
                counts[i] = d * counts[i] + new[i]

    def round_time(self, W: int, live: int, exact: int, a0: float, a: float) -> tuple:
        """(expected committed chain-steps, the cost model's seconds) of a round with window W
        (W = 0: one ancestral step of the batch)."""
        c = self.cost
        if W == 0:
            return float(live), c.ancestral_step(live)
        evals = live * (W + 1) - exact if self.compact else self.B * (W + 1)
        return live * expected_steps(a0, a, W), c.speculative_round(evals, self.B * (W + 1))

    def arm(self, W: int, live: int, exact: int) -> Arm:
        steps, t = self.round_time(W, live, exact, *self.acceptance())
        f = self.cost.factor(W)
        return Arm(W, steps, t * f, f)

    def choose(self, live: int, exact: int) -> tuple[Arm, bool]:
        """(the arm for the next round of ``live`` unfinished chains, ``exact`` of them with an
        exact root; whether it was chosen to measure it rather than for its rate)."""
        anc = self.arm(0, live, exact)
        specs = {W: self.arm(W, live, exact) for W in self.candidates[1:]}
        if not specs:  # no window longer than one step fits the schedule
            return anc, False
        spec = max(specs.values(), key=lambda a: a.rate)
        best = spec if spec.rate > anc.rate * (1 + self.margin) else anc
        # the arms are measured on real rounds where the cost model alone does not rule them
        # out (a slow first calibration must not decide a whole run): ancestral steps first,
        # which are never wasted work (they are the baseline's), then speculative rounds of a
        # short window (a long one is a large bet on an unmeasured guess)
        self.cost.clock += 1
        for arm in (anc, specs.get(min(spec.W, SPEC_PROBE), spec)):
            never = self.probe_unmeasured and not self.cost.ratios.get(min(arm.W, 1))
            if self.cost.needs_measuring(arm.W) and (arm.rate >= EXPLORE * best.rate or never):
                return arm, True
            # measured long ago or in another run, and a close call: measured again
            # (speculation is missed only where it would gain little; falling back only where
            # it would lose little)
            close = REVISIT_RATE[min(arm.W, 1)] * best.rate
            this_run = self.cost.when.get(min(arm.W, 1), -1) > self.run_start
            stale = self.cost.stale(arm.W) or not this_run
            if arm is not best and self.cost.online and stale and arm.rate >= close:
                return arm, True
        return best, False


class AutoRounds:
    """The static round driven by the controller: :meth:`next` runs the round the controller
    chooses, or a block of plain ancestral steps (``lean``: a
    :class:`~specdiff_kernels.sampling.ancestral.LeanAncestral` of the same chains), and folds the
    measured time of each into the cost model."""

    def __init__(
        self,
        rnd: StaticRound,
        controller: WindowController,
        lean: LeanAncestral,
        check_finite: bool = True,
    ):
        self.rnd, self.controller, self.lean = rnd, controller, lean
        self.check_finite = check_finite
        self.log = ControllerLog(cost=controller.cost.as_dict())
        self.L, self.N = rnd.L, rnd.N
        det = lean.T.deterministic.to(torch.int64).tolist()
        self.det_before = [0] + list(itertools.accumulate(det))  # deterministic steps in [0, k)
        self.prev_counts: Optional[list] = None
        self.pending: Optional[tuple[int, float, float]] = None  # (W, model's s, start) of a round
        self.block = FIRST_BLOCK  # the next ancestral block's length (doubles while repeated)
        self.direct_steps = 0  # stochastic chain-steps of the ancestral blocks
        # (step, row, "output" or "state") of an ancestral block's first non-finite value
        self.bad: Optional[tuple[int, int, str]] = None

    def head_size(self) -> int:
        """The stats prefix a round reads: the head, then accepted / attempted by position."""
        return layout.STAT_HEAD + 2 * self.L

    def next(self, s: ChainBatch, head: list) -> ChainBatch:
        self.settle()
        counts = head[layout.STAT_HEAD :]
        if self.prev_counts is not None:
            delta = [c - p for c, p in zip(counts, self.prev_counts)]
            if delta[self.L]:  # a window was verified: position 0 was attempted
                self.controller.observe(delta[: self.L], delta[self.L :])
        self.prev_counts = counts
        live = head[layout.STAT_LIVE]
        exact = int(s.exact.sum()) if self.rnd.compact else 0
        arm, explore = self.controller.choose(live, exact)
        self.log.window_hist[arm.W] = self.log.window_hist.get(arm.W, 0) + 1
        self.log.predicted_s.append(arm.seconds)
        self.log.explored += explore
        if arm.W == 0:
            steps = PROBE_BLOCK if explore else self.block
            self.block = self.block if explore else min(2 * self.block, LONGEST_BLOCK)
            return self.ancestral_block(s, steps, arm)
        self.block = FIRST_BLOCK
        self.pending = (arm.W, arm.seconds / arm.factor, time.perf_counter())
        return self.rnd.step(s, arm.W)

    def settle(self) -> None:
        """Record the last round's time: from its start to now (the next head read)."""
        if self.pending is not None:
            W, model_s, start = self.pending
            self.measured(W, model_s, time.perf_counter() - start)
            self.pending = None

    def measured(self, W: int, model_s: float, seconds: float) -> None:
        self.log.measured_s.append(seconds)
        self.controller.cost.measured(W, seconds / model_s)

    def ancestral_block(self, s: ChainBatch, steps: int, arm: Arm) -> ChainBatch:
        """``steps`` ancestral steps of every chain not finished (chains may be at different
        steps; a finished chain's window length is 0: its state is kept). The next round starts
        from stale roots: the frozen value (and a multistep chain's previous prediction) is the
        x0-hat at each chain's last parent state, as after a rejected window."""
        start = time.perf_counter()
        x, k = s.x, s.k
        k_start = k.tolist()
        n = min(steps, self.N - min(k_start))
        lockstep = min(k_start) == max(k_start)  # the usual case: every chain ends together
        lengths = (k < self.N).to(torch.int64)
        # per chain, the first failure as 2 step + (1 if only the state failed); 2 N: none
        first = torch.full_like(k, 2 * self.N)
        graphs = self.lean.cuda_graphs
        prev = s.prev if self.lean.multistep else None
        last = None  # (parent states, their x0-hat, steps, lengths) of the last step
        for _ in range(n):
            if graphs:  # each step replays a CUDA graph whose outputs the next replay overwrites
                torch.compiler.cudagraph_mark_step_begin()
            y, code, p = self.lean._step(x, k, lengths, prev)
            if graphs:
                y, code, p = y.clone(), code.clone(), p.clone()
            if prev is not None:  # a finished chain keeps its own
                prev = p if lockstep else torch.where(_rows_like(lengths > 0, p), p, prev)
            failed = code > 0 if lockstep else (code > 0) & (lengths > 0)
            first = torch.where(failed, torch.minimum(first, 2 * k + (code == 1)), first)
            last = (x, p, k, lengths)
            x, k = y, k + lengths
            if not lockstep:  # chains finish at different iterations
                lengths = (k < self.N).to(torch.int64)
        frozen = s.frozen
        if last is not None:  # chains finished before the last step keep theirs (never read)
            x_par, p, k_par, moved = last
            fresh = self.rnd.freeze_at(x_par, p, k_par)
            frozen = fresh if lockstep else torch.where(_rows_like(moved > 0, p), fresh, frozen)
        f = int(first.min())
        if f < 2 * self.N and self.bad is None:
            row = int((first == f).nonzero()[0, 0])
            self.bad = (f // 2, row, "state" if f % 2 else "output")
        stats = self.block_stats(s.stats, k_start, n)
        if self.bad is not None and self.check_finite:
            stats[layout.STAT_LIVE] = 0  # the run ends here and raises
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        self.measured(0, arm.seconds / arm.factor * n, time.perf_counter() - start)
        self.log.ancestral_blocks.append((len(self.log.predicted_s) - 1, n))
        self.log.predicted_s[-1] *= n
        prev = s.prev if prev is None else prev
        exact = torch.zeros_like(s.exact)
        return ChainBatch(x=x, k=k, frozen=frozen, exact=exact, stats=stats, prev=prev)

    def block_stats(self, stats: Tensor, k_start: list, n: int) -> Tensor:
        """The stats vector after an ancestral block of n calls (host arithmetic: the block's
        steps are known without reading the device)."""
        N, B = self.N, len(k_start)
        k_end = [min(k + n, N) for k in k_start]
        taken = sum(e - k for k, e in zip(k_start, k_end))
        det = sum(self.det_before[e] - self.det_before[k] for k, e in zip(k_start, k_end))
        self.direct_steps += taken - det
        self.log.ancestral_steps += taken
        self.rnd.target_evals += B * n
        out = stats.clone()
        rounds = int(out[layout.STAT_ROUNDS])
        out[layout.STAT_ROUNDS] = rounds + n
        out[layout.STAT_DET_STEPS] += det
        out[layout.STAT_STEPS_DONE] = sum(k_end)
        out[layout.STAT_LIVE] = sum(e < N for e in k_end)
        cr = self.rnd.layout.view(out, "chain_rounds")
        done = [c for c, (k, e) in enumerate(zip(k_start, k_end)) if k < N and e >= N]
        if done:  # a chain's rounds: the calls until its last step
            idx = torch.tensor(done, dtype=torch.int64, device=out.device)
            when = torch.tensor([rounds + N - k_start[c] for c in done], device=out.device)
            cr.index_copy_(0, idx, when.to(cr.dtype))
        return out

    def finish(self, stats: SamplerStats) -> None:
        """Add the ancestral blocks' steps to the run's stats and the controller's log."""
        self.settle()  # the last round
        stats.direct_steps += self.direct_steps
        stats.autopilot = self.log.as_dict()

    def warn_if_mostly_ancestral(self, stats: SamplerStats) -> None:
        total = stats.num_chains * stats.num_steps
        if total and self.log.ancestral_steps > 0.5 * total:
            c = self.controller.cost
            B = stats.num_chains
            ratio = c.network(2 * B) / c.network(B)
            a0, a = self.controller.acceptance()
            warnings.warn(
                MostlyAncestralWarning(
                    f"window='auto' took {self.log.ancestral_steps / total:.0%} of the steps as plain "
                    f"ancestral steps: speculation does not pay for this model, batch and device "
                    f"(a call on {2 * B} states costs {ratio:.2f}x one on {B}; acceptance "
                    f"{a:.2f}); an int window forces speculation"
                ),
                stacklevel=5,
            )


def _rows_like(mask: Tensor, like: Tensor) -> Tensor:
    """A [B] mask shaped to broadcast over ``like``'s [B, *E]."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


class AutoWindow(AdaptiveWindow):
    """``window="auto"`` on the ragged path: each chain's window from its own acceptance (as
    :class:`AdaptiveWindow`) and the cost model: the W in ``CANDIDATES`` (>= 1: a ragged round
    always verifies) with the most expected committed steps per second of a round in which every
    chain drafts W. ``cost`` and ``num_chains`` are set by the sampler before the run."""

    def __init__(self, max_window: int = 32):
        super().__init__(max_window, max_evals_ratio=None, prior_acceptance=0.9)
        self.cost: Optional[CostModel] = None
        self.num_chains = 1

    def __repr__(self) -> str:
        return f"AutoWindow(max_window={self.max_window})"

    def choose(self, a0, a, extra_evals=None, cap=None) -> Tensor:
        a0 = torch.as_tensor(a0, dtype=torch.float64).reshape(-1)
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
        e = torch.zeros_like(a) if extra_evals is None else torch.as_tensor(extra_evals)
        e = e.to(torch.float64).reshape(-1)
        Ws = [w for w in CANDIDATES if 1 <= w <= self.max_window] or [self.max_window]
        B, c = self.num_chains, self.cost
        rates = []
        for W in Ws:
            steps = self.expected_steps(a0, a, torch.tensor(W))
            secs = torch.tensor(
                [c.speculative_round(B * (W + extra), B * (W + 1)) for extra in (0.0, 1.0)],
                dtype=torch.float64,
            )
            rates.append(steps / torch.where(e > 0, secs[1], secs[0]))
        best = torch.stack(rates, 1).argmax(1)
        return torch.tensor(Ws, dtype=torch.int64)[best]


__all__ = [
    "AutoRounds",
    "AutoWindow",
    "CANDIDATES",
    "ControllerLog",
    "CostModel",
    "WindowController",
    "calibrate",
    "expected_steps",
]

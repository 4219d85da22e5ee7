"""window="auto" (specdiff_kernels.sampling.autopilot): the cost model, the controller's choices,
what a run records, and exactness with the controller on, on both paths (docs/design.md §5).

The law tests give the sampler a cost model (``cost=``) under which the controller really
speculates, changes its window from round to round and, with the "handoff" cost, hands the end of
the schedule to the ancestral loop: the chain's law must stay the ancestral one through every
switch. The power tests run the same tests on deliberately wrong verifiers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from preamble import SINGLE_THREAD, gen
from test_sampler_exactness import (
    ALPHA,
    DRAFTS,
    GAUSS_D,
    GAUSS_N,
    exact_final_law,
    gaussian_model,
    gaussian_one_sample_pvalue,
    gaussian_transitions,
    gmm_ancestral,
    gmm_setup,
    two_sample_pvalue,
)
from wrong_verifiers import VerifyFreshFromP, static_wrong_verify, verify_keep_draft_on_reject

import specdiff_kernels.sampling.sampler as sampler_module
from specdiff_kernels.sampling import autopilot
from specdiff_kernels.sampling.autopilot import (
    FORGET,
    KEEP,
    MEASURE,
    REVISIT,
    REVISIT_RATE,
    SPEC_PROBE,
    AutoRounds,
    AutoWindow,
    CostModel,
    WindowController,
    calibrate,
    expected_steps,
)
from specdiff_kernels.sampling.drafts import FrozenTargetDraft
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.static_round import StaticRound

pytestmark = SINGLE_THREAD

# seconds per call on b states: a latency-bound device (every window size costs the same), and
# one where a state costs more than the call's fixed part: speculation pays while acceptance is
# high and stops paying when it collapses at the end of the schedule
COSTS = {
    "flat": lambda b: 1e-3,
    "handoff": lambda b: 1e-3 + 1.05e-3 * b / GAUSS_N,
}


def auto_sampler(model, T, draft, cost, **kw) -> SpeculativeSampler:
    return SpeculativeSampler(model, T, draft, "auto", cost=COSTS[cost], **kw)


# ===================================================================== the cost model
def test_cost_model_interpolates_and_extrapolates_by_the_last_slope():
    c = CostModel([4, 8, 12], [1.0, 2.0, 2.5])
    assert c.network(4) == 1.0 and c.network(6) == pytest.approx(1.5)
    assert c.network(10) == pytest.approx(2.25)
    assert c.network(20) == pytest.approx(2.5 + 0.125 * 8)  # the last segment's slope
    assert c.network(2) == 1.0  # below the batch: never cheaper than the smallest call
    one = CostModel([4], [1.0])  # one size: assumed proportional beyond it
    assert one.network(8) == pytest.approx(2.0)


def test_calibrate_stops_once_calls_grow_in_proportion():
    sizes = []

    def call(b):  # a compute-bound network: time proportional to b
        sizes.append(b)
        x = torch.randn(b * 64, 64)
        for _ in range(4):
            x = x @ torch.eye(64)

    c = calibrate(call, lambda: None, 8, B=64, max_states=64 * 33, num_steps=200, device_type="cpu")
    assert c.sizes[0] == 64 and 128 in c.sizes
    assert c.sizes[-1] <= 64 * 5  # no probe at 9B or more once the slope is linear
    assert c.calibration_s > 0 and len(c.sizes) == len(c.seconds)
    assert all(b in sizes for b in c.sizes)


def test_calibrate_is_not_misled_by_a_cold_first_call_at_a_size(monkeypatch):
    # oneDNN builds its convolution primitives at a call's first shape: the first call at each
    # size costs several times a later one (seen: 25 ms against 3 ms on the pusht policy). A
    # latency-bound network whose cold calls would look compute-bound must be measured warm.
    # The calls' durations are given (a stand-in clock), so a busy machine cannot blur them.
    seen, spent = set(), []

    def call(b):  # 3 ms at any size once warm; the first call at a size 8x that
        spent.append(0.003 if b in seen else 0.024)
        seen.add(b)

    def timed(fn, sync):
        spent.clear()
        fn()
        return sum(spent)

    monkeypatch.setattr(autopilot, "_timed", timed)
    draft = lambda: spent.append(1e-5)  # noqa: E731
    c = calibrate(call, draft, 9, B=1, max_states=9, num_steps=100, device_type="cpu")
    assert c.seconds[0] == pytest.approx(0.003)
    assert c.network(2) < 1.5 * c.network(1)


def test_user_cost_is_checked():
    with pytest.raises(TypeError, match="cost"):
        CostModel.from_user([1, 2], "cpu")
    with pytest.raises(ValueError, match="cost"):
        CostModel.from_user({0: 1.0}, "cpu")
    with pytest.raises(ValueError, match="cost"):
        CostModel.from_user({4: float("nan")}, "cpu")
    model, T = gmm_setup()
    with pytest.raises(ValueError, match="cost"):
        SpeculativeSampler(model, T, window=8, cost={1: 1e-3})


# ===================================================================== the controller
def test_expected_steps_matches_a_simulated_window():
    g = torch.Generator().manual_seed(0)
    a0, a, W = 0.7, 0.85, 6
    n = 200_000
    u = torch.rand(n, W, generator=g)
    acc = torch.cat([u[:, :1] < a0, u[:, 1:] < a], 1)
    first_reject = torch.where(acc.all(1), W, (~acc).float().argmax(1))
    committed = torch.clamp(first_reject + 1, max=W).double()
    assert expected_steps(a0, a, W) == pytest.approx(committed.mean().item(), abs=0.01)


def test_controller_falls_back_where_calls_are_compute_bound():
    linear = CostModel([64, 128], [1e-3, 2e-3], online=False)
    ctl = WindowController(linear, 32, 64, compact=False)
    assert ctl.choose(64, 0) == (ctl.arm(0, 64, 0), False)
    flat = CostModel([64, 128], [1e-3, 1e-3], online=False)
    ctl = WindowController(flat, 32, 64, compact=False)
    assert ctl.choose(64, 0)[0].W == 32  # prior acceptance 0.9, every window costs the same


def test_controller_measures_both_arms_then_trusts_measurements():
    """A measured cost model is a first guess: ancestral steps are measured first (never wasted
    work), then a short speculative window, where the guess does not rule them out; measured
    rounds then correct the guess both ways."""
    cost = CostModel([64, 128], [1e-3, 2e-3])  # compute-bound by the calibration
    ctl = WindowController(cost, 32, 64, compact=False)
    for _ in range(MEASURE[0]):
        arm, explore = ctl.choose(64, 0)
        assert arm.W == 0 and explore
        cost.measured(0, 1.0)
    arm, explore = ctl.choose(64, 0)
    assert 0 < arm.W <= SPEC_PROBE and explore  # not ruled out: rate >= EXPLORE x ancestral
    for _ in range(MEASURE[1]):  # real rounds cost a quarter of the model's guess
        cost.measured(arm.W, 0.25)
    arm, explore = ctl.choose(64, 0)
    assert arm.W > 0 and not explore and arm.factor == 0.25
    # the machine slows down: speculative rounds cost what they do, ancestral steps stay
    for W in ctl.candidates[1:]:
        for _ in range(KEEP):
            cost.measured(W, 4.0)
    arm, explore = ctl.choose(64, 0)
    assert arm.W == 0 and not explore
    never = CostModel([64, 128], [1e-3, 8e-3])  # far worse than ancestral: never tried
    ctl = WindowController(never, 32, 64, compact=False)
    never.measured(0, 1.0), never.measured(0, 1.0)
    assert all(ctl.choose(64, 0)[0].W == 0 for _ in range(3 * REVISIT))
    flat = CostModel([64, 128], [1e-3, 1e-3])  # latency-bound: ancestral steps ruled out
    assert WindowController(flat, 32, 64, compact=False).choose(64, 0)[0].W >= 16
    # ... unless the run is long enough to afford one probe of an arm this process has never
    # measured (a guess timed beside a busy process can rule out the arm that pays)
    never = CostModel([64, 128], [1e-3, 8e-3])
    never.measured(0, 1.0), never.measured(0, 1.0)
    ctl = WindowController(never, 32, 64, compact=False, num_steps=100)
    arm, explore = ctl.choose(64, 0)
    assert 0 < arm.W <= SPEC_PROBE and explore
    never.measured(arm.W, 1.0)  # measured as slow as guessed: not probed again
    assert all(ctl.choose(64, 0)[0].W == 0 for _ in range(3 * REVISIT))
    short = CostModel([64, 128], [1e-3, 8e-3])
    short.measured(0, 1.0), short.measured(0, 1.0)
    ctl = WindowController(short, 32, 64, compact=False, num_steps=40)  # too short to probe
    assert ctl.choose(64, 0)[0].W == 0


def test_a_window_with_its_own_recent_rounds_uses_them():
    cost = CostModel([64, 128], [1e-3, 2e-3])
    cost.measured(4, 1.0), cost.measured(4, 1.0), cost.measured(16, 3.0), cost.measured(16, 3.0)
    assert cost.factor(16) == 3.0 and cost.factor(4) == 1.0  # each its own
    assert cost.factor(8) == 2.0  # none of its own: the arm's median
    cost.clock += FORGET + 1
    assert cost.factor(16) == 2.0  # its own are forgotten


def test_a_stale_close_arm_is_measured_again():
    cost = CostModel([64, 128], [1e-3, 1.6e-3])
    ctl = WindowController(cost, 32, 64, compact=False)
    cost.measured(0, 1.0), cost.measured(0, 1.0)
    cost.measured(4, 1.2), cost.measured(4, 1.2)  # speculation measured slower than guessed
    # a new run (controller) measures a close arm once, whatever it measured before
    assert WindowController(cost, 32, 64, compact=False).choose(64, 0)[0].W > 0
    ctl.run_start = -1  # as if both were measured in this run
    first = ctl.choose(64, 0)
    assert first == (ctl.arm(0, 64, 0), False)
    spec = max((ctl.arm(W, 64, 0) for W in ctl.candidates[1:]), key=lambda a: a.rate)
    assert spec.rate >= REVISIT_RATE[1] * first[0].rate  # a close call
    seen = []
    for _ in range(REVISIT + 2):
        arm, explore = ctl.choose(64, 0)
        seen.append((arm.W > 0, explore))
        if arm.W == 0:
            cost.measured(0, 1.0)
    assert (True, True) in seen  # measured again once stale
    assert seen.index((True, True)) >= REVISIT - 3  # (the clock counts the two calls above)


def test_controller_shortens_the_window_when_acceptance_falls():
    cost = CostModel([1, 2], [1e-3, 1.05e-3], online=False)
    ctl = WindowController(cost, 32, 1, compact=True)
    high = ctl.choose(1, 1)[0].W
    for _ in range(20):  # position 0 accepted, later positions mostly rejected
        ctl.observe([1] + [0] * 31, [1, 1] + [0] * 30)
    low = ctl.choose(1, 0)[0].W
    assert high > low


# ===================================================================== what a run records
def test_run_records_the_controller_and_hands_off():
    model, T = gmm_setup()
    s = auto_sampler(model, T, FrozenTargetDraft("x0"), "handoff")
    res = s.sample(GAUSS_N, (16,), generator=gen(3))
    ap = res.stats.autopilot
    assert ap["cost"]["user"] is True
    assert sum(ap["window_hist"].values()) == len(ap["predicted_s"]) == len(ap["measured_s"])
    assert len(ap["window_hist"]) >= 2  # more than one window was chosen
    assert 0 < ap["ancestral_steps"] < GAUSS_N * T.num_steps
    assert ap["ancestral_blocks"] and res.stats.speculative_steps > 0
    assert sum(n for _, n in ap["ancestral_blocks"]) * GAUSS_N >= ap["ancestral_steps"]
    # every chain-step is accounted for exactly once
    st = res.stats
    total = st.speculative_steps + st.direct_steps + st.deterministic_steps
    assert total == GAUSS_N * T.num_steps
    assert max(st.chain_rounds) == st.rounds


def test_mostly_ancestral_run_warns_once_and_says_why():
    model, T = gmm_setup()
    s = SpeculativeSampler(model, T, cost=lambda b: 1e-4 * b)  # compute-bound
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = s.sample(64, (16,), generator=gen(4))
    msgs = [str(x.message) for x in w if "window='auto'" in str(x.message)]
    assert len(msgs) == 1 and "ancestral" in msgs[0] and "acceptance" in msgs[0]
    assert res.stats.autopilot["ancestral_steps"] == 64 * (T.num_steps - 1)
    assert res.stats.target_calls == T.num_steps  # the first step, then the ancestral loop


def test_samplers_of_one_model_share_the_cost_model_and_its_measurements():
    """Measured once per model in the process; later runs start from the earlier runs' real
    rounds (their samples then differ by timings, their law does not)."""
    model, T = gmm_setup()
    a = SpeculativeSampler(model, T).sample(9, (16,), generator=gen(5)).stats.autopilot
    b = SpeculativeSampler(model, T).sample(9, (16,), generator=gen(5)).stats.autopilot
    assert a["cost"]["calibration_s"] == b["cost"]["calibration_s"] > 0
    assert a["cost"]["ratios"] == {} and b["cost"]["ratios"]


def test_given_cost_makes_runs_repeatable():
    model, T = gmm_setup()
    a = auto_sampler(model, T, None, "flat").sample(9, (16,), generator=gen(6))
    b = auto_sampler(model, T, None, "flat").sample(9, (16,), generator=gen(6))
    assert torch.equal(a.samples, b.samples)
    assert a.stats.autopilot["window_hist"] == b.stats.autopilot["window_hist"]


# ===================================================================== exactness
def run_gaussian_auto(draft: str, cost: str, path: str, seed: int, verify_fn=None):
    T = gaussian_transitions("ddpm")
    model = gaussian_model(T)
    s = auto_sampler(model, T, DRAFTS[draft](T), cost, path=path, verify_fn=verify_fn)
    assert s.resolve_path() == path
    res = s.sample(GAUSS_N, (GAUSS_D,), generator=gen(seed), dtype=torch.float64)
    m, C = exact_final_law(model, T, GAUSS_D)
    return res, gaussian_one_sample_pvalue(res.samples.numpy(), m, C)


@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize(
    "draft,path",
    [("frozen_x0", "static"), ("frozen_eps", "static"), ("frozen_x0", "ragged")]
    + [("wrong_draft_model", "ragged"), ("frozen_x0_noprefetch", "ragged")],
)
def test_auto_window_matches_exact_gaussian_law(draft, path, cost):
    seed = 700 + 10 * list(DRAFTS).index(draft) + len(path) + len(cost)
    res, p = run_gaussian_auto(draft, cost, path, seed)
    assert p > ALPHA
    assert res.stats.speculative_steps > 0
    assert sum(res.stats.accepted_by_position) < sum(res.stats.attempted_by_position)
    if path == "static" and cost == "handoff":  # speculative windows, then the ancestral loop
        hist = res.stats.autopilot["window_hist"]
        assert 0 in hist and len(hist) >= 2


@pytest.mark.parametrize("path", ["static", "ragged"])
def test_auto_window_gmm_vs_ancestral(path):
    model, T = gmm_setup()
    ref = gmm_ancestral(501)
    res = auto_sampler(model, T, FrozenTargetDraft("x0"), "handoff", path=path).sample(
        1200, (16,), generator=gen(510 + len(path))
    )
    assert two_sample_pvalue(res.samples.numpy(), ref) > ALPHA


@pytest.mark.parametrize("wrong", ["keep_draft", "fresh_from_p"])
def test_auto_window_ragged_tests_reject_wrong_verifiers(wrong):
    fn = {"keep_draft": verify_keep_draft_on_reject, "fresh_from_p": VerifyFreshFromP(6)}[wrong]
    _, p = run_gaussian_auto("wrong_draft_model", "flat", "ragged", 420, verify_fn=fn)
    assert p < ALPHA


@pytest.mark.parametrize("wrong", ["keep_draft", "fresh_from_p"])
def test_auto_window_static_tests_reject_wrong_verifiers(wrong, monkeypatch):
    monkeypatch.setattr(StaticRound, "_verify", static_wrong_verify(wrong, seed=7))
    _, p = run_gaussian_auto("frozen_eps", "flat", "static", 430)
    assert p < ALPHA


def test_auto_window_policy_is_cost_aware_on_the_ragged_path():
    w = AutoWindow(32)
    w.num_chains = 8
    w.cost = CostModel([8, 16], [1e-3, 1e-3])  # flat: the longest window
    assert int(w.choose(torch.tensor([0.9]), torch.tensor([0.9]))[0]) == 32
    w.cost = CostModel([8, 16], [1e-3, 2e-3])  # proportional: the shortest
    assert int(w.choose(torch.tensor([0.9]), torch.tensor([0.9]))[0]) == 1


# ===================================================================== ancestral blocks
class Alternating(WindowController):
    """A past-only rule that switches often: speculative rounds of W = 4 and ancestral blocks
    (every third decision; every sixth as a measuring probe), whatever the costs say."""

    def choose(self, live, exact):
        self.n = getattr(self, "n", 0) + 1
        W = 0 if self.n % 3 == 0 else 4
        return self.arm(W, live, exact), self.n % 6 == 0


def keep_roots_exact(monkeypatch):
    """A wrong block: it keeps the frozen value from before the block and calls the roots exact
    (the next round then takes the target's step-0 mean from a prediction made steps ago)."""
    block = AutoRounds.ancestral_block

    def wrong(self, s, steps, arm):
        out = block(self, s, steps, arm)
        out.frozen, out.exact = s.frozen, torch.ones_like(out.exact)
        return out

    monkeypatch.setattr(AutoRounds, "ancestral_block", wrong)


def run_alternating(monkeypatch, T, model, draft, seed, dim):
    monkeypatch.setattr(sampler_module, "WindowController", Alternating)
    s = SpeculativeSampler(model, T, draft, "auto", cost=COSTS["flat"], path="static")
    res = s.sample(GAUSS_N, (dim,), generator=gen(seed), dtype=torch.float64)
    hist = res.stats.autopilot["window_hist"]
    assert hist.get(0, 0) >= 2 and hist.get(4, 0) >= 2  # both kinds, more than once
    st = res.stats
    assert st.speculative_steps + st.direct_steps + st.deterministic_steps == GAUSS_N * T.num_steps
    assert max(st.chain_rounds) == st.rounds
    return res


@pytest.mark.parametrize("freeze", ["x0", "eps"])
@pytest.mark.parametrize("wrong", [False, True])
def test_switching_between_blocks_and_rounds_keeps_the_law(freeze, wrong, monkeypatch):
    """Rounds after an ancestral block start from stale roots whose frozen value is the block's
    last x0-hat; the power check (see keep_roots_exact) must be rejected."""
    if wrong:
        keep_roots_exact(monkeypatch)
    T = gaussian_transitions("ddpm")
    model = gaussian_model(T)
    res = run_alternating(monkeypatch, T, model, FrozenTargetDraft(freeze), 740, GAUSS_D)
    m, C = exact_final_law(model, T, GAUSS_D)
    p = gaussian_one_sample_pvalue(res.samples.numpy(), m, C)
    assert (p < ALPHA) if wrong else (p > ALPHA)


@pytest.mark.parametrize("wrong", [False, True])
def test_switching_keeps_the_multistep_law(wrong, monkeypatch):
    """DPM-Solver++ 2M SDE: the block carries each chain's previous prediction into the next
    round; the power check drops it (a zero buffer, as at a chain's first step)."""
    import test_multistep_exactness as ms

    if wrong:
        block = AutoRounds.ancestral_block

        def stale_prev(self, s, steps, arm):
            out = block(self, s, steps, arm)
            out.prev = torch.zeros_like(s.prev)
            return out

        monkeypatch.setattr(AutoRounds, "ancestral_block", stale_prev)
    T = ms.transitions("default", 30)
    model = ms.model_for(T)
    res = run_alternating(monkeypatch, T, model, FrozenTargetDraft("x0"), 750, ms.D)
    p = ms.law_p(T, model, res)
    assert (p < ALPHA) if wrong else (p > ALPHA)

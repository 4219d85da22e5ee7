"""Adaptive window length (``SpeculativeSampler(..., window="adaptive" | AdaptiveWindow(...))``).

* the rule: long windows for high acceptance, short ones for low acceptance, within the cap;
* it adapts per chain: in one ragged batch, chains whose draft is exact get the longest windows
  and chains whose draft is poor get short ones (and spend far fewer evaluations than a fixed long
  window);
* exactness: the window length is a function of each chain's own past, so the output law is still
  the ancestral chain's: one-sample tests against exactly computable Gaussian laws (DDPM on
  Gaussian data; ULA on a Gaussian target) pass, and the SAME tests reject wrong verifiers;
* a chain's result does not depend on its batch (adaptive state is per chain).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from preamble import ABAR, SINGLE_THREAD, gen

from specdiff_kernels.models.gmm import GaussianMixture, GMMDenoiser, make_gmm
from specdiff_kernels.sampling.checks import as_window
from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.langevin import SpeculativeLangevin
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.transitions import GaussianTransitions, ddpm_transitions
from specdiff_kernels.sampling.window import AdaptiveWindow
from specdiff_kernels.testing.two_sample import gaussian_one_sample_pvalue

ALPHA = 1e-3
pytestmark = SINGLE_THREAD


# ===================================================================== wrong verifiers (power)
from wrong_verifiers import WRONG  # noqa: E402


# ===================================================================== the rule
def test_rule_long_windows_for_high_acceptance():
    p = AdaptiveWindow(max_window=16, max_evals_ratio=2.0)
    assert p.window_for_acceptance(1.0) == 16
    assert p.window_for_acceptance(0.0) == 1
    Ls = [p.window_for_acceptance(a) for a in np.linspace(0.0, 1.0, 21)]
    assert Ls == sorted(Ls) and Ls[0] < Ls[10] < Ls[-1]  # monotone in the acceptance
    # an exact root (step 0 always accepted) never shortens the window
    for a in (0.3, 0.6, 0.9):
        assert p.window_for_acceptance(a, a0=1.0) >= p.window_for_acceptance(a, a0=a)
    # a looser cap never shortens it, no cap gives max_window
    for a in (0.5, 0.8, 0.95):
        Lc = [AdaptiveWindow(16, c).window_for_acceptance(a) for c in (1.2, 1.5, 2.0, 3.0, 6.0)]
        assert Lc == sorted(Lc)
        assert AdaptiveWindow(16, None).window_for_acceptance(a) == 16
    assert AdaptiveWindow(16, 2.0, min_window=4).window_for_acceptance(0.0) == 4


def test_rule_respects_the_cap_under_its_model():
    """The chosen L has expected evaluations per committed step <= cap (when any L does), and no
    longer admissible L gains more than GAIN_TOL expected steps."""
    for c in (1.3, 2.0, 3.0):
        p = AdaptiveWindow(24, c)
        for a0 in (0.4, 0.8, 1.0):
            for a in np.linspace(0.05, 0.99, 12):
                for e in (0.0, 1.0):
                    L = p.window_for_acceptance(float(a), a0=a0, extra_evals=e)

                    def S(n):
                        return float(
                            p.expected_steps(
                                torch.tensor(a0), torch.tensor(float(a)), torch.tensor(n)
                            )
                        )

                    ratios = [(n + e) / S(n) for n in range(1, 25)]
                    if min(ratios) <= c:
                        assert ratios[L - 1] <= c + 1e-9
                        for n in range(L + 1, 25):
                            if ratios[n - 1] <= c:
                                assert S(n) - S(L) <= p.GAIN_TOL + 1e-12
                    else:
                        assert L == 1 + int(np.argmin(ratios))


def test_expected_steps_formula():
    """S(L) = E[committed steps] of a window with step-0 acceptance a0 and a after: Monte Carlo."""
    rng = np.random.default_rng(0)
    a0, a, L = 0.7, 0.85, 6
    acc = np.concatenate([rng.random((200000, 1)) < a0, rng.random((200000, L - 1)) < a], axis=1)
    first_rej = np.where(acc.all(1), L, np.argmin(acc, axis=1))
    committed = np.minimum(first_rej + 1, L)
    S = float(AdaptiveWindow.expected_steps(torch.tensor(a0), torch.tensor(a), torch.tensor(L)))
    assert committed.mean() == pytest.approx(S, rel=5e-3)


def test_window_argument_forms():
    assert as_window(8) == (8, None)
    L, pol = as_window("adaptive")
    assert isinstance(pol, AdaptiveWindow) and L == pol.max_window
    p = AdaptiveWindow(max_window=12, max_evals_ratio=1.5)
    assert as_window(p) == (12, p)
    for bad in (0, "fixed"):
        with pytest.raises(ValueError, match="^window must be"):
            as_window(bad)
    for bad in (2.5, None, True):  # not a window at all (True would have meant L = 1)
        with pytest.raises(TypeError, match="^window must be"):
            as_window(bad)
    with pytest.raises(ValueError):
        AdaptiveWindow(4, 0.5)
    with pytest.raises(ValueError):
        AdaptiveWindow(4, 2.0, min_window=5)
    with pytest.raises(ValueError):
        AdaptiveWindow(4, 2.0, decay=0.0)
    model = GMMDenoiser(make_gmm(3, K=2, seed=0), ABAR)
    T = ddpm_transitions(ABAR, num_inference_steps=10)
    s = SpeculativeSampler(model, T, window="adaptive")
    # the buffer is clamped to the 9 stochastic steps (the 10th, t = 0, is deterministic)
    assert s.window_policy.max_window == 32 and s.window == 9 and "AdaptiveWindow" in repr(s)
    st = s.sample(4, (3,), generator=gen(0)).stats
    assert st.window == 9 and len(st.window_length_hist) == 10
    assert sum(st.window_length_hist) == st.windows


# ===================================================================== it adapts, per chain
RW_S = 0.1
RW_D = 3
RW_STEPS = 96


def random_walk_transitions(steps=RW_STEPS) -> GaussianTransitions:
    """x' ~ N(model(x), s^2 I) (prediction "sample", c_x0 = 1, c_x = 0)."""
    h = math.sqrt(0.5)
    return GaussianTransitions(
        torch.arange(steps), 1.0, 0.0, RW_S, h, h, prediction="sample", name="random-walk"
    )


def identity(x, t):
    return x.clone()


def region_draft(x, t):
    """Exact where x_0 > 0; off by 2 s along e_1 where x_0 < 0 (acceptance 2 Phi(-1) = 0.32)."""
    out = x.clone()
    out[:, 0] += 2 * RW_S * (x[:, 0] < 0).to(x.dtype)
    return out


def region_start(n_good: int, n_bad: int) -> torch.Tensor:
    x = torch.zeros(n_good + n_bad, RW_D, dtype=torch.float64)
    x[:n_good, 0] = 5.0  # random walk std over 96 steps ~ 1: chains stay in their half
    x[n_good:, 0] = -5.0
    return x


def test_high_acceptance_chains_get_long_windows():
    T = random_walk_transitions()
    pol = AdaptiveWindow(max_window=16, max_evals_ratio=2.0)
    s = SpeculativeSampler(identity, T, DraftModelDraft(region_draft), pol)
    res = s.sample(x_init=region_start(8, 8), generator=gen(0))
    st = res.stats
    rounds = np.array(st.chain_rounds)
    good, bad = rounds[:8], rounds[8:]
    # exact draft: windows of 16 after at most a couple of rounds -> about 96/16 = 6 rounds
    assert good.max() <= 9
    # poor draft (acceptance 0.32): the rule picks L = 2 -> about 96 / 1.3 rounds
    assert bad.min() > 50
    hist = st.window_length_hist
    assert hist[16] >= 8 * 4  # the good chains' long windows
    assert sum(hist[1:5]) > 0.8 * (st.windows - sum(hist[13:]))  # the rest are short


def test_adaptive_spends_far_fewer_evaluations_on_poor_drafts():
    """Poor-draft chains alone: a fixed L = 16 wastes ~L evaluations per round; the adaptive rule
    stays near its cap (2 evaluations per committed step) with hardly more rounds."""
    T = random_walk_transitions()
    x = region_start(0, 16)
    fixed = (
        SpeculativeSampler(identity, T, DraftModelDraft(region_draft), 16)
        .sample(x_init=x, generator=gen(1))
        .stats
    )
    adapt = (
        SpeculativeSampler(identity, T, DraftModelDraft(region_draft), AdaptiveWindow(16, 2.0))
        .sample(x_init=x, generator=gen(1))
        .stats
    )
    steps = 16 * RW_STEPS
    assert fixed.target_evals / steps > 8
    assert adapt.target_evals / steps < 2.3
    assert adapt.mean_chain_rounds < 1.15 * fixed.mean_chain_rounds


def drifting_models(drift: float):
    """A target that moves x_0 by ``drift`` per step, and a draft that is exact where x_0 > 0 and
    off by 2 s where x_0 < 0 (acceptance 0.32): acceptance changes as the chains cross 0."""

    def drift_model(x, t):
        out = x.clone()
        out[:, 0] += drift
        return out

    def draft(x, t):
        out = drift_model(x, t)
        out[:, 0] += 2 * RW_S * (x[:, 0] < 0).to(x.dtype)
        return out

    return drift_model, draft


def test_acceptance_changing_along_the_chain():
    """Chains that cross from the poor region into the exact one switch to long windows."""
    T = random_walk_transitions(200)
    drift_model, draft = drifting_models(0.05)  # -2 -> +8
    x = torch.zeros(8, RW_D, dtype=torch.float64)
    x[:, 0] = -2.0
    s = SpeculativeSampler(drift_model, T, DraftModelDraft(draft), AdaptiveWindow(16, 2.0))
    st = s.sample(x_init=x, generator=gen(2)).stats
    hist = st.window_length_hist
    assert hist[16] > 0 and sum(hist[1:4]) > 0


# ===================================================================== exactness
GAUSS_D = 4
GAUSS_N = 4000
GAUSS_STEPS = 25


def gaussian_setup():
    g = torch.Generator().manual_seed(3)
    data = GaussianMixture(
        torch.randn(1, GAUSS_D, generator=g, dtype=torch.float64) * 0.8,
        torch.tensor([[0.3, 0.5, 0.8, 1.2]], dtype=torch.float64),
    )
    T = ddpm_transitions(ABAR, num_inference_steps=GAUSS_STEPS, prediction="epsilon")
    return GMMDenoiser(data, ABAR, prediction="epsilon"), T


def poor_draft_model():
    return GMMDenoiser(
        GaussianMixture(torch.full((1, GAUSS_D), 0.7, dtype=torch.float64), 0.6),
        ABAR,
        prediction="epsilon",
    )


def exact_final_law(model, T: GaussianTransitions, D: int):
    """Final law of the ancestral chain when every transition mean is affine (Gaussian data)."""
    m = np.zeros(D)
    C = np.eye(D) * T.init_std**2
    pts = torch.cat([torch.zeros(1, D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)])
    for step in range(T.num_steps):
        f = T.mean(model, pts, torch.full((D + 1,), step, dtype=torch.int64)).numpy()
        b, A = f[0], (f[1:] - f[0]).T
        s = float(T.std[step])
        m = A @ m + b
        C = A @ C @ A.T + s * s * np.eye(D)
    return m, C


def run_ddpm(draft: str, seed: int, verify_fn=None, policy=None):
    model, T = gaussian_setup()
    d = {
        "frozen": FrozenTargetDraft("x0"),
        "frozen_noprefetch": FrozenTargetDraft("x0", False),
        "draft_model": DraftModelDraft(poor_draft_model()),
    }[draft]
    pol = policy or AdaptiveWindow(max_window=8, max_evals_ratio=1.5)
    res = SpeculativeSampler(model, T, d, pol, verify_fn=verify_fn).sample(
        GAUSS_N, (GAUSS_D,), generator=gen(seed), dtype=torch.float64
    )
    return res, exact_final_law(model, T, GAUSS_D)


@pytest.mark.parametrize("draft", ["frozen", "frozen_noprefetch", "draft_model"])
def test_adaptive_ddpm_matches_exact_gaussian_law(draft):
    res, (m, C) = run_ddpm(draft, 900 + len(draft))
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) > ALPHA
    st = res.stats
    assert 0 < sum(st.accepted_by_position) < sum(st.attempted_by_position)
    assert sum(1 for c in st.window_length_hist if c) >= 3  # the windows really vary


@pytest.mark.parametrize("wrong", list(WRONG))
def test_adaptive_ddpm_tests_reject_wrong_verifiers(wrong):
    res, (m, C) = run_ddpm("draft_model", 950, verify_fn=WRONG[wrong])
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) < ALPHA


def ula_setup():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 4))
    P = A @ A.T / 4 + np.diag([0.5, 1.0, 2.0, 4.0])
    mu = rng.standard_normal(4)
    Pt, mut = torch.tensor(P), torch.tensor(mu)
    g, n, start = 0.05, 40, np.array([2.0, -1.0, 0.5, 3.0])
    m, C = start.copy(), np.zeros((4, 4))
    for _ in range(n):
        M = np.eye(4) - g * P
        m = M @ m + g * P @ mu
        C = M @ C @ M.T + 2 * g * np.eye(4)
    grad = lambda x: (x - mut) @ Pt  # noqa: E731
    return grad, g, n, torch.tensor(start).expand(GAUSS_N, 4).clone(), m, C


@pytest.mark.parametrize("wrong", [None, "always_accept", "keep_draft"])
def test_adaptive_langevin_exact_law_and_power(wrong):
    grad, g, n, x0, m, C = ula_setup()
    s = SpeculativeLangevin(
        grad_U=grad,
        step_size=g,
        num_steps=n,
        window=AdaptiveWindow(max_window=16, max_evals_ratio=1.5),
        verify_fn=None if wrong is None else WRONG[wrong],
    )
    res = s.sample(x0, generator=gen(970))
    p = gaussian_one_sample_pvalue(res.samples.numpy(), m, C)
    if wrong is None:
        assert p > ALPHA
        assert 1 < res.stats.mean_window_length < 16
    else:
        assert p < ALPHA


# ===================================================================== batch independence
@pytest.mark.parametrize("draft", ["frozen", "draft_model"])
def test_adaptive_chain_independent_of_batch(draft):
    model, T = gaussian_setup()
    d = FrozenTargetDraft("x0") if draft == "frozen" else DraftModelDraft(poor_draft_model())
    s = SpeculativeSampler(model, T, d, AdaptiveWindow(8, 1.5))
    together = s.sample(8, (GAUSS_D,), generator=gen(3), dtype=torch.float64)
    alone = s.sample(1, (GAUSS_D,), generator=gen(3), chain_ids=[5], dtype=torch.float64)
    torch.testing.assert_close(alone.samples[0], together.samples[5], rtol=0, atol=1e-9)
    assert together.stats.chain_rounds[5] == alone.stats.rounds


def test_pacing_option_keeps_law():
    pol = AdaptiveWindow(max_window=8, max_evals_ratio=1.5, pacing=True)
    res, (m, C) = run_ddpm("frozen", 990, policy=pol)
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) > ALPHA


def test_pacing_cap_lets_a_thrifty_chain_draft_longer():
    """Two chains with the same acceptance history; chain 0 has spent 1 evaluation per step so far,
    chain 1 its whole cap c = 1.5. Pacing raises chain 0's cap to (c N - spent) / steps left and
    gives it a longer window; chain 1 keeps cap c and the window it had without pacing."""
    c, done, left = 1.5, 100.0, 20.0
    rows = torch.tensor([0, 1])
    exact = torch.zeros(2, dtype=torch.bool)
    windows = {}
    for pacing in (False, True):
        pol = AdaptiveWindow(max_window=16, max_evals_ratio=c, pacing=pacing, decay=1.0)
        st = pol.init_state(2)
        st["acc"] += 30.0  # acceptance 0.75 on positions >= 1, the same for both chains
        st["att"] += 40.0
        st["steps"] += done
        st["evals"] = torch.tensor([1.0 * done, c * done], dtype=torch.float64)
        if pacing:
            cap = pol.pacing_cap(st, rows, torch.tensor([left, left]))
            torch.testing.assert_close(
                cap, torch.tensor([(c * (done + left) - done) / left, c], dtype=torch.float64)
            )
        windows[pacing] = pol.lengths(
            st, rows, exact, None, steps_left=torch.tensor([left, left])
        ).tolist()
    assert windows[False][0] == windows[False][1]
    assert windows[True][1] == windows[False][1]
    assert windows[True][0] > windows[False][0]


def test_pacing_spends_the_saved_budget_where_acceptance_drops():
    """Acceptance is 1 for the first ~160 steps (exact draft where x_0 > 0), then 0.32: without
    pacing a chain saves 0.5 evaluations per step early and cannot use them; with pacing it drafts
    longer windows at the end: fewer sequential calls, more evaluations, still within c N."""
    T = random_walk_transitions(200)
    drift_model, draft = drifting_models(-0.05)  # 8 -> -2
    x = torch.zeros(16, RW_D, dtype=torch.float64)
    x[:, 0] = 8.0
    c = 1.5
    st = {
        pacing: SpeculativeSampler(
            drift_model, T, DraftModelDraft(draft), AdaptiveWindow(16, c, pacing=pacing)
        )
        .sample(x_init=x, generator=gen(2))
        .stats
        for pacing in (False, True)
    }
    evals = {p: s.target_evals / (16 * 200) for p, s in st.items()}
    assert st[True].mean_chain_rounds < st[False].mean_chain_rounds - 0.5
    assert evals[False] < evals[True] <= c
    assert st[True].mean_window_length > st[False].mean_window_length
    # the one-step windows of the low-acceptance end are the ones pacing lengthens
    assert st[True].window_length_hist[1] < 0.75 * st[False].window_length_hist[1]

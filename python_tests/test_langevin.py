"""Speculative unadjusted Langevin (docs/design.md §11): ULA written as affine Gaussian transitions, run by
the existing samplers.

* conventions: the transitions give the ULA mean and std, the frozen draft is the frozen gradient,
  the plain sampler is a hand-written ULA loop over the same per-chain noise (bit for bit);
* exactness (a): Gaussian pi (quadratic U): the ULA law after n steps is an exactly computable
  Gaussian (float64 affine recursion) -> one-sample tests (Mahalanobis^2 vs chi2 by KS,
  projections vs N(0, 1)) for the plain and the speculative chains;
* exactness (b): banana target in D = 4: two-sample tests, speculative vs plain ULA (same n);
* power (c): the SAME tests reject deliberately wrong verifiers (always-accept, keep the draft on
  rejection) injected with ``verify_fn=``.

Fixed seeds: every p-value is deterministic. Correct samplers: p > 1e-3; wrong ones: p < 1e-3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from preamble import SINGLE_THREAD, gen

from specdiff_kernels.cli.demo import run_langevin_demo
from specdiff_kernels.sampling.base import NonFiniteError
from specdiff_kernels.sampling.drafts import FrozenTargetDraft
from specdiff_kernels.sampling.langevin import (
    GradientModel,
    LangevinSampler,
    SpeculativeLangevin,
    banana_energy,
    banana_grad,
    langevin_transitions,
)
from specdiff_kernels.sampling.noise import ChainNoise, base_seed_from
from specdiff_kernels.testing.two_sample import gaussian_one_sample_pvalue, two_sample_pvalue

ALPHA = 1e-3


pytestmark = SINGLE_THREAD


# ===================================================================== wrong verifiers (power)
from wrong_verifiers import WRONG  # noqa: E402

# ===================================================================== Gaussian target
D = 4
N_CHAINS = 4000
N_STEPS = 40
G = 0.05
START = np.array([2.0, -1.0, 0.5, 3.0])


def gaussian_target():
    """U(x) = (x - mu)^T P (x - mu) / 2 with a non-diagonal precision P (eigenvalues ~0.5..5)."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((D, D))
    P = A @ A.T / D + np.diag([0.5, 1.0, 2.0, 4.0])
    mu = rng.standard_normal(D)
    return P, mu


def quadratic_U():
    P, mu = gaussian_target()
    Pt, mut = torch.tensor(P), torch.tensor(mu)

    def U(x):
        z = x - mut.to(x.dtype)
        return 0.5 * ((z @ Pt.to(x.dtype)) * z).sum(1)

    return U


def quadratic_grad():
    P, mu = gaussian_target()
    Pt, mut = torch.tensor(P), torch.tensor(mu)
    return lambda x: (x - mut.to(x.dtype)) @ Pt.to(x.dtype)


def exact_ula_law(step_sizes, m0, C0):
    """Mean and covariance (float64) of ULA after len(step_sizes) steps on the Gaussian target:
    x' = (I - g P) x + g P mu + sqrt(2 g) xi."""
    P, mu = gaussian_target()
    m, C = np.array(m0, dtype=np.float64), np.array(C0, dtype=np.float64)
    for g in step_sizes:
        M = np.eye(D) - g * P
        m = M @ m + g * P @ mu
        C = M @ C @ M.T + 2 * g * np.eye(D)
    return m, C


def fixed_start(B=N_CHAINS):
    return torch.tensor(START, dtype=torch.float64).expand(B, D).clone()


def law_from_fixed_start(steps=N_STEPS, g=G):
    return exact_ula_law([g] * steps, START, np.zeros((D, D)))


# ===================================================================== conventions
def test_transitions_are_ula():
    g = torch.tensor([0.1, 0.05, 0.02], dtype=torch.float64)
    T = langevin_transitions(g, init_std=2.0)
    assert T.num_steps == 3 and T.init_std == 2.0 and T.prediction == "sample"
    assert not bool(T.deterministic.any())
    torch.testing.assert_close(T.step_std(torch.arange(3)), (2 * g).sqrt())
    x = torch.randn(5, D, generator=gen(0), dtype=torch.float64)
    grad = quadratic_grad()
    model = GradientModel(grad_U=grad)
    for k in range(3):
        kk = torch.full((5,), k)
        torch.testing.assert_close(T.mean(model, x, kk), x - g[k] * grad(x))
        # the model sees the state itself and t = the step index
        assert torch.equal(T.model_input(x, kk), x) and T.t(kk).tolist() == [k] * 5
    # the frozen-x0 draft freezes the gradient: mq_j = y_j - g grad U(y_0)
    d = FrozenTargetDraft("x0")
    y = x + 0.3
    frozen = d.freeze_value(T, x, model(x, None), torch.zeros(5, dtype=torch.int64))
    k1 = torch.ones(5, dtype=torch.int64)
    torch.testing.assert_close(T.mean_from_x0(y, d.x0_at(T, frozen, y, k1), k1), y - g[1] * grad(x))
    assert langevin_transitions(0.1, 7).num_steps == 7


def test_autograd_gradient_equals_closed_form():
    x = torch.randn(6, D, generator=gen(1), dtype=torch.float64)
    torch.testing.assert_close(GradientModel(U=quadratic_U())(x, None), quadratic_grad()(x))
    xb = torch.randn(6, 5, generator=gen(2), dtype=torch.float64)
    torch.testing.assert_close(GradientModel(U=banana_energy())(xb, None), banana_grad()(xb))
    # under no_grad too (autograd is re-enabled inside)
    with torch.no_grad():
        torch.testing.assert_close(GradientModel(U=quadratic_U())(x, None), quadratic_grad()(x))


def test_plain_sampler_is_the_ula_loop_bit_for_bit():
    """LangevinSampler == a hand-written ULA loop over the chains' own noise streams (xi_k of step
    k from chain_noise), both from a user start and from the default N(0, init_std^2) start."""
    B, n, g = 5, 12, 0.07
    grad = quadratic_grad()
    ids = [3, 9, 0, 1, 7]
    for x_init in (torch.randn(B, D, generator=gen(5), dtype=torch.float64), None):
        s = LangevinSampler(grad_U=grad, step_size=g, num_steps=n, init_std=1.5)
        res = s.sample(
            x_init,
            num_chains=B,
            event_shape=(D,),
            generator=gen(6),
            chain_ids=ids,
            dtype=torch.float64,
        )
        base = base_seed_from(gen(6))
        noise = ChainNoise(base, ids, (D,), torch.float64, "cpu")
        x = (noise.initial * 1.5) if x_init is None else x_init.clone()
        rows = torch.arange(B)
        gt = torch.tensor(g, dtype=torch.float64)
        for k in range(n):
            xi, _ = noise.window(rows, torch.full((B,), k), 1)
            x = (x + (-gt) * grad(x)) + (2 * gt).sqrt() * xi[:, 0]
        torch.testing.assert_close(res.samples, x, rtol=0, atol=1e-12)
        assert res.stats.target_calls == n and res.stats.target_evals == B * n


def test_U_and_grad_U_give_the_same_chains():
    kw = dict(step_size=G, num_steps=15, window=4)
    a = SpeculativeLangevin(U=quadratic_U(), **kw).sample(fixed_start(16), generator=gen(1))
    b = SpeculativeLangevin(grad_U=quadratic_grad(), **kw).sample(fixed_start(16), generator=gen(1))
    torch.testing.assert_close(a.samples, b.samples)
    assert a.stats.accepted_by_position == b.stats.accepted_by_position


def test_window_one_without_prefetch_equals_plain():
    grad = quadratic_grad()
    plain = LangevinSampler(grad_U=grad, step_size=G, num_steps=20).sample(
        num_chains=32, event_shape=(D,), generator=gen(2)
    )
    spec = SpeculativeLangevin(
        grad_U=grad, step_size=G, num_steps=20, window=1, prefetch=False
    ).sample(num_chains=32, event_shape=(D,), generator=gen(2))
    # the plain step is one fused kernel, the ragged round eager ops: equal up to rounding
    torch.testing.assert_close(plain.samples, spec.samples, rtol=1e-5, atol=1e-5)
    assert spec.stats.acceptance_rate == 1.0


def test_stats_one_sequential_gradient_call_per_round():
    U = quadratic_U()
    s = SpeculativeLangevin(U, step_size=G, num_steps=N_STEPS, window=8)
    res = s.sample(fixed_start(64), generator=gen(3))
    st = res.stats
    assert st.target_calls == st.rounds == s.model.num_calls
    assert st.target_evals == s.model.num_evals
    assert st.direct_steps == 64 and st.draft_calls == 0
    assert st.speculative_steps + st.direct_steps == 64 * N_STEPS
    assert st.target_calls < N_STEPS / 2  # the point of it
    # a surrogate gradient draft: sequential cheap calls, one target call per round
    sur = SpeculativeLangevin(
        U,
        step_size=G,
        num_steps=N_STEPS,
        window=8,
        draft=lambda x: x - torch.tensor(gaussian_target()[1], dtype=x.dtype),
    )
    st2 = sur.sample(fixed_start(64), generator=gen(3)).stats
    assert st2.target_calls == st2.rounds and st2.draft_calls > 0 and st2.direct_steps == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="give U"):
        LangevinSampler(step_size=0.1, num_steps=3)
    with pytest.raises(ValueError, match="step_size"):
        LangevinSampler(quadratic_U(), step_size=0.0, num_steps=3)
    with pytest.raises(ValueError, match="step_size"):
        langevin_transitions([0.1, 0.2], 3)
    with pytest.raises(ValueError, match="draft"):
        SpeculativeLangevin(quadratic_U(), step_size=0.1, num_steps=3, draft="frozn")
    with pytest.raises(ValueError, match="freeze"):
        SpeculativeLangevin(
            quadratic_U(), step_size=0.1, num_steps=3, draft=FrozenTargetDraft("eps")
        )
    with pytest.raises(ValueError, match="one energy per state"):
        LangevinSampler(lambda x: x.sum(), step_size=0.1, num_steps=2).sample(fixed_start(3))
    # integer starts are cast to the requested dtype
    r = LangevinSampler(quadratic_U(), step_size=0.1, num_steps=2).sample(
        torch.zeros(3, D, dtype=torch.int64)
    )
    assert r.samples.dtype == torch.float32


def test_divergent_chain_raises():
    """ULA with a far too large step diverges: the sampler names the step and the chain."""
    s = SpeculativeLangevin(quadratic_U(), step_size=5.0, num_steps=400, window=4)
    with pytest.raises(NonFiniteError, match="chain"):
        s.sample(fixed_start(2).float(), generator=gen(0))


# ===================================================================== (a) exact Gaussian law
def test_plain_ula_matches_exact_law():
    m, C = law_from_fixed_start()
    res = LangevinSampler(quadratic_U(), step_size=G, num_steps=N_STEPS).sample(
        fixed_start(), generator=gen(100)
    )
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) > ALPHA


@pytest.mark.parametrize(
    "draft,window", [("frozen", 2), ("frozen", 8), ("frozen_noprefetch", 8), ("surrogate", 4)]
)
def test_speculative_ula_matches_exact_law(draft, window):
    m, C = law_from_fixed_start()
    P, mu = gaussian_target()
    # a poor surrogate: the gradient of an isotropic Gaussian at the wrong centre
    sur = lambda x: 1.5 * (x - torch.tensor(mu + 0.3, dtype=x.dtype))  # noqa: E731
    kw = {"frozen": {}, "frozen_noprefetch": {"prefetch": False}, "surrogate": {"draft": sur}}[
        draft
    ]
    s = SpeculativeLangevin(quadratic_U(), step_size=G, num_steps=N_STEPS, window=window, **kw)
    res = s.sample(fixed_start(), generator=gen(200 + window + len(draft)))
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) > ALPHA
    st = res.stats
    assert 0 < sum(st.accepted_by_position) < sum(st.attempted_by_position)  # not trivially exact


def test_speculative_ula_default_start_and_step_schedule():
    """Default start N(0, init_std^2 I) from the streams; a decreasing step-size schedule."""
    sched = np.linspace(0.08, 0.02, N_STEPS)
    m, C = exact_ula_law(sched, np.zeros(D), np.eye(D) * 1.5**2)
    s = SpeculativeLangevin(quadratic_U(), step_size=sched, window=8, init_std=1.5)
    res = s.sample(num_chains=N_CHAINS, event_shape=(D,), generator=gen(301), dtype=torch.float64)
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) > ALPHA


@pytest.mark.parametrize("wrong", list(WRONG))
def test_gaussian_tests_reject_wrong_verifiers(wrong):
    m, C = law_from_fixed_start()
    s = SpeculativeLangevin(
        quadratic_U(), step_size=G, num_steps=N_STEPS, window=8, verify_fn=WRONG[wrong]
    )
    res = s.sample(fixed_start(), generator=gen(400))
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) < ALPHA


# ===================================================================== (b) banana, two-sample
BANANA_D = 4
BANANA_N = 1200
BANANA_STEPS = 30
BANANA_START = [2.5, 0.0, 1.0, -1.0]


def banana_start():
    return torch.tensor(BANANA_START).expand(BANANA_N, BANANA_D).clone()


@pytest.fixture(scope="module")
def banana_reference():
    s = LangevinSampler(banana_energy(), step_size=G, num_steps=BANANA_STEPS)
    return s.sample(banana_start(), generator=gen(500)).samples.numpy()


@pytest.mark.parametrize("draft", ["frozen", "surrogate"])
def test_banana_speculative_vs_plain(banana_reference, draft):
    d = "frozen" if draft == "frozen" else banana_grad(b=0.0)  # surrogate: the Gaussian part only
    s = SpeculativeLangevin(banana_energy(), step_size=G, num_steps=BANANA_STEPS, window=8, draft=d)
    res = s.sample(banana_start(), generator=gen(600 + len(draft)))
    assert two_sample_pvalue(res.samples.numpy(), banana_reference) > ALPHA
    st = res.stats
    assert 0 < sum(st.accepted_by_position) < sum(st.attempted_by_position)


def test_banana_sanity_two_plain_runs(banana_reference):
    s = LangevinSampler(banana_energy(), step_size=G, num_steps=BANANA_STEPS)
    assert (
        two_sample_pvalue(
            s.sample(banana_start(), generator=gen(501)).samples.numpy(), banana_reference
        )
        > ALPHA
    )


@pytest.mark.parametrize("wrong", list(WRONG))
def test_banana_tests_reject_wrong_verifiers(banana_reference, wrong):
    s = SpeculativeLangevin(
        banana_energy(), step_size=G, num_steps=BANANA_STEPS, window=8, verify_fn=WRONG[wrong]
    )
    res = s.sample(banana_start(), generator=gen(700))
    assert two_sample_pvalue(res.samples.numpy(), banana_reference) < ALPHA


# ===================================================================== demo
def test_demo_runs(capsys):
    assert run_langevin_demo(seed=0, batch=200, window=4, steps=30, dim=3, step_size=0.05) == 0
    out = capsys.readouterr().out
    for word in (
        "plain ULA",
        "frozen gradient",
        "surrogate gradient",
        "seq grad calls",
        "acceptance by window position",
        "p vs ULA",
    ):
        assert word in out
    assert not math.isnan(0.0)

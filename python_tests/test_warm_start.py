"""``SpeculativeSampler.sample(warm_start=...)`` (docs/design.md §5.1): a guess of each chain's
sample replaces the first call of the frozen-target draft. Any guess keeps the ancestral law:
the exact-law test on Gaussian data (test_sampler_exactness) with guesses far from the data, on
both paths, both frozen values and window="auto"; one step whose whole draft is the guess, with
its known law and acceptance, which rejects a warm start that treats the guess as the target's
prediction at the root (power)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from preamble import SINGLE_THREAD, gen
from scipy import stats
from test_sampler_exactness import (
    ALPHA,
    GAUSS_D,
    GAUSS_N,
    ONE_STEP_D,
    ONE_STEP_N,
    ConstantModel,
    constant_mean_transitions,
    exact_final_law,
    gaussian_model,
    gaussian_transitions,
    one_step_pvalue,
    one_step_setup,
)

from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.static_round import StaticRound
from specdiff_kernels.testing.two_sample import gaussian_one_sample_pvalue

pytestmark = SINGLE_THREAD

# a fixed "auto" cost: a call on 9 chains' windows costs what one on the roots does, so the
# controller speculates, and the run repeats
FLAT_COST = {GAUSS_N: 1e-3, 9 * GAUSS_N: 1.2e-3, 33 * GAUSS_N: 1.5e-3}


def far_guess(seed: int) -> torch.Tensor:
    """Guesses nowhere near the data (which lies within about +-3): +-4 per coordinate."""
    g = gen(seed)
    return 4.0 * (2.0 * torch.randint(0, 2, (GAUSS_N, GAUSS_D), generator=g) - 1.0).double()


def warm_run(freeze: str, window, path: str, seed: int, guess=None):
    T = gaussian_transitions("ddpm")
    model = gaussian_model(T)
    cost = FLAT_COST if window == "auto" else None
    sampler = SpeculativeSampler(model, T, FrozenTargetDraft(freeze), window, path=path, cost=cost)
    guess = far_guess(seed + 1) if guess is None else guess
    res = sampler.sample(
        GAUSS_N, (GAUSS_D,), generator=gen(seed), dtype=torch.float64, warm_start=guess
    )
    m, C = exact_final_law(model, T, GAUSS_D)
    return res, gaussian_one_sample_pvalue(res.samples.numpy(), m, C)


@pytest.mark.parametrize("path", ["static", "ragged"])
@pytest.mark.parametrize("freeze,window", [("x0", 8), ("eps", 8), ("x0", "auto")])
def test_warm_start_keeps_the_exact_law(freeze, window, path):
    seed = (
        700
        + 10 * (freeze == "eps")
        + (5 if window == "auto" else 0)
        + (50 if path == "static" else 0)
    )
    res, p = warm_run(freeze, window, path, seed)
    assert p > ALPHA
    # no first ancestral step, and the far guess was rejected somewhere: the test saw it
    assert res.stats.direct_steps == 0
    assert sum(res.stats.accepted_by_position) < sum(res.stats.attempted_by_position)


def test_warm_start_saves_the_first_call():
    cold = warm_run("x0", 8, "static", 760, guess=None)[0]
    T = gaussian_transitions("ddpm")
    sampler = SpeculativeSampler(gaussian_model(T), T, window=8, path="static")
    base = sampler.sample(GAUSS_N, (GAUSS_D,), generator=gen(760), dtype=torch.float64)
    assert base.stats.direct_steps == GAUSS_N and cold.stats.direct_steps == 0
    # the static round's calls: the first step's, then one per round
    assert base.stats.target_calls == base.stats.rounds
    assert cold.stats.target_calls == cold.stats.rounds


def one_step_warm(gap: float, path: str, seed: int = 21):
    """One step x' ~ N(mp, s^2 I) (a "sample"-prediction target ignoring its input) from a warm
    start mq at distance gap * s: the guess is the whole draft, so the committed law and the
    acceptance frequency 2 Phi(-gap / 2) are known exactly."""
    mp, mq, e, s = one_step_setup(gap)
    T = constant_mean_transitions(1, s)
    sampler = SpeculativeSampler(ConstantModel(mp), T, FrozenTargetDraft("x0"), 1, path=path)
    x0 = torch.zeros(ONE_STEP_N, ONE_STEP_D, dtype=torch.float64)
    guess = torch.as_tensor(mq).expand(ONE_STEP_N, -1)
    res = sampler.sample(x_init=x0, generator=gen(seed), warm_start=guess)
    return res, one_step_pvalue(res.samples.numpy(), mp, e, s)


@pytest.mark.parametrize("path", ["static", "ragged"])
def test_one_warm_step_has_the_target_law_and_acceptance(path):
    gap = 1.5
    res, p = one_step_warm(gap, path)
    assert p > ALPHA
    st = res.stats
    assert st.attempted_by_position == [ONE_STEP_N] and st.target_calls == 1
    expected = 2 * stats.norm.cdf(-gap / 2)
    assert stats.binomtest(st.accepted_by_position[0], ONE_STEP_N, expected).pvalue > ALPHA


def test_a_warm_start_taken_for_the_roots_prediction_is_rejected(monkeypatch):
    """Power: marking the warm roots exact (the guess used as the target's prediction at the
    starting states, which are then never evaluated) commits the guess's law, and the test sees
    it."""
    real = StaticRound.start

    def wrong_start(self, x, warm=None):
        s = real(self, x, warm)
        return dataclasses.replace(s, exact=torch.ones_like(s.exact)) if warm is not None else s

    monkeypatch.setattr(StaticRound, "start", wrong_start)
    _, p = one_step_warm(1.5, "static")
    assert p < ALPHA


def test_warm_start_is_checked_in_one_line():
    T = gaussian_transitions("ddpm")
    model = gaussian_model(T)
    ok = torch.zeros(4, GAUSS_D)
    cases = [
        (SpeculativeSampler(model, T, window=4), ok[:, :3], ValueError, "shape"),
        (SpeculativeSampler(model, T, window=4), ok.long(), TypeError, "floating"),
        (SpeculativeSampler(model, T, window=4), [[0.0] * GAUSS_D] * 4, TypeError, "tensor"),
        (SpeculativeSampler(model, T, window=4), ok * float("nan"), ValueError, "non-finite"),
        (
            SpeculativeSampler(model, T, FrozenTargetDraft(prefetch_root=False), window=4),
            ok,
            ValueError,
            "prefetch",
        ),
        (SpeculativeSampler(model, T, DraftModelDraft(model), window=4), ok, ValueError, "draft"),
    ]
    for sampler, guess, err, word in cases:
        with pytest.raises(err, match="warm_start") as info:
            sampler.sample(4, (GAUSS_D,), generator=gen(0), warm_start=guess)
        assert word in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("path", ["static", "ragged"])
def test_warm_start_keeps_the_multistep_law(path):
    """DPM-Solver++ 2M SDE: the warm round's first step is first order (no previous
    prediction), as the ancestral chain's."""
    from test_multistep_exactness import N_CHAINS, D, law_p, model_for, transitions

    T = transitions("karras")
    model = model_for(T)
    sampler = SpeculativeSampler(model, T, window=8, path=path)
    guess = 3.0 * torch.randn(N_CHAINS, D, generator=gen(5), dtype=torch.float64)
    res = sampler.sample(
        N_CHAINS, (D,), generator=gen(830 + len(path)), dtype=torch.float64, warm_start=guess
    )
    assert res.stats.direct_steps == 0
    assert law_p(T, model, res) > ALPHA

"""Statistical proof that the speculative sampler is exact (docs/design.md §3.4): its output law equals the
ancestral chain's, for every draft and window.

* one step from a fixed state: the committed state is N(mp, s^2 I) and the acceptance frequency is
  2 Phi(-||d|| / (2 s));
* full chains on Gaussian data, where the ancestral chain's final law is an exactly computable
  Gaussian (the denoiser is affine): one-sample tests against it;
* full chains on a Gaussian mixture (exact analytic denoiser, D = 16): two-sample tests of
  speculative vs ancestral samples;
* power: the SAME test functions reject deliberately wrong verifiers (injected with
  ``verify_fn=``), so a pass means something.

All seeds are fixed: the p-values below are deterministic. Tests of correct samplers use
alpha = 1e-3 on Bonferroni-combined p-values; power tests assert p < 1e-3 as well.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from preamble import ABAR, SINGLE_THREAD, gen
from scipy import stats

from specdiff_kernels.models.gmm import GaussianMixture, GMMDenoiser, make_gmm
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.static_round import StaticRound
from specdiff_kernels.sampling.transitions import (
    GaussianTransitions,
    ddim_transitions,
    ddpm_transitions,
    euler_ancestral_transitions,
)

ALPHA = 1e-3
pytestmark = SINGLE_THREAD


# ===================================================================== statistical tests
# (scipy.stats-based; shared with the demo and the benchmarks)
# ===================================================================== wrong verifiers (power)
from wrong_verifiers import (  # noqa: E402
    STATIC_WRONG,
    WRONG,
    VerifyFreshFromP,
    static_wrong_verify,
    wrong_verifier,
)

from specdiff_kernels.testing.two_sample import (  # noqa: E402,F401
    bonferroni,
    energy_distance_pvalue,
    gaussian_one_sample_pvalue,
    per_coordinate_ks_pvalue,
    random_directions,
    two_sample_pvalue,
)


# ===================================================================== one step from a fixed state
class ConstantModel(torch.nn.Module):
    """``model(x, t) = value`` (a "sample"-prediction network ignoring its input)."""

    def __init__(self, value):
        super().__init__()
        self.value = torch.as_tensor(value, dtype=torch.float64)

    def forward(self, x, t):
        return self.value.to(x.dtype).expand_as(x).clone()


def constant_mean_transitions(num_steps: int, s: float) -> GaussianTransitions:
    """Steps x' ~ N(x0_hat, s^2 I): c_x0 = 1, c_x = 0, prediction "sample"."""
    half = math.sqrt(0.5)
    return GaussianTransitions(
        torch.arange(num_steps - 1, -1, -1),
        1.0,
        0.0,
        s,
        half,
        half,
        prediction="sample",
        name="constant-mean",
    )


ONE_STEP_D = 8
ONE_STEP_N = 20000


def one_step_setup(gap: float, s: float = 0.5):
    """Target mean mp, draft mean mq with ||mp - mq|| / s = gap."""
    g = np.random.default_rng(7)
    mp = g.standard_normal(ONE_STEP_D)
    e = g.standard_normal(ONE_STEP_D)
    e /= np.linalg.norm(e)
    mq = mp - gap * s * e
    return mp, mq, e, s


def run_one_step(gap: float, window: int = 1, verify_fn=None, seed: int = 11):
    mp, mq, e, s = one_step_setup(gap)
    T = constant_mean_transitions(window, s)
    sampler = SpeculativeSampler(
        ConstantModel(mp), T, DraftModelDraft(ConstantModel(mq)), window, verify_fn=verify_fn
    )
    x0 = torch.zeros(ONE_STEP_N, ONE_STEP_D, dtype=torch.float64)
    res = sampler.sample(x_init=x0, generator=gen(seed))
    return res, mp, mq, e, s


def one_step_pvalue(samples: np.ndarray, mp, e, s) -> float:
    """H0: rows ~ N(mp, s^2 I): KS per coordinate, along d, and on random projections."""
    z = (samples - mp) / s
    ps = [stats.kstest(z[:, d], stats.norm.cdf).pvalue for d in range(z.shape[1])]
    for v in np.concatenate([e[None], random_directions(z.shape[1], 8, 3)]):
        ps.append(stats.kstest(z @ v, stats.norm.cdf).pvalue)
    return bonferroni(ps)


@pytest.mark.parametrize("gap", [0.5, 2.0])
def test_one_step_law_and_acceptance(gap):
    res, mp, mq, e, s = run_one_step(gap)
    assert one_step_pvalue(res.samples.numpy(), mp, e, s) > ALPHA
    st = res.stats
    assert st.attempted_by_position == [ONE_STEP_N]
    expected = 2 * stats.norm.cdf(-gap / 2)
    assert stats.binomtest(st.accepted_by_position[0], ONE_STEP_N, expected).pvalue > ALPHA


def test_window_of_three_constant_steps():
    """Three steps x' ~ N(mp, s^2) in one window: final law N(mp, s^2 I); acceptance at every
    window position is 2 Phi(-gap/2) among the steps that get there."""
    gap = 1.0
    res, mp, mq, e, s = run_one_step(gap, window=3, seed=12)
    assert one_step_pvalue(res.samples.numpy(), mp, e, s) > ALPHA
    st = res.stats
    expected = 2 * stats.norm.cdf(-gap / 2)
    for acc, att in zip(st.accepted_by_position, st.attempted_by_position):
        assert att > 1000
        assert stats.binomtest(acc, att, expected).pvalue > ALPHA


@pytest.mark.parametrize("wrong", ["always_accept", "keep_draft", "fresh_from_p"])
def test_one_step_tests_reject_wrong_verifiers(wrong):
    fn = wrong_verifier(wrong, fresh_seed=5)
    res, mp, mq, e, s = run_one_step(2.0, verify_fn=fn)
    assert one_step_pvalue(res.samples.numpy(), mp, e, s) < ALPHA


# ===================================================================== full chains, Gaussian data
GAUSS_D = 4
GAUSS_N = 4000
GAUSS_STEPS = 25


def gaussian_data() -> GaussianMixture:
    g = torch.Generator().manual_seed(3)
    return GaussianMixture(
        torch.randn(1, GAUSS_D, generator=g, dtype=torch.float64) * 0.8,
        torch.tensor([[0.3, 0.5, 0.8, 1.2]], dtype=torch.float64),
    )


def wrong_gaussian_data() -> GaussianMixture:
    """A different Gaussian: the denoiser of this is a valid but poor draft model."""
    return GaussianMixture(torch.full((1, GAUSS_D), 0.7, dtype=torch.float64), 0.6)


def exact_final_law(model, T: GaussianTransitions, D: int):
    """Mean and covariance (float64) of the ancestral chain's final state when every transition
    mean is affine in x (checked): propagate N(m, C) through x' = A x + b + s xi."""
    m = np.zeros(D)
    C = np.eye(D) * T.init_std**2
    for step in range(T.num_steps):
        k = torch.full((D + 1,), step, dtype=torch.int64)
        pts = torch.cat([torch.zeros(1, D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)])
        f = T.mean(model, pts, k).numpy()
        b = f[0]
        A = (f[1:] - b).T
        # affine check at a random point
        z = torch.randn(1, D, generator=gen(step), dtype=torch.float64)
        fz = T.mean(model, z, k[:1]).numpy()[0]
        assert np.allclose(fz, A @ z.numpy()[0] + b, atol=1e-8), "transition mean is not affine"
        s = float(T.std[step])
        m = A @ m + b
        C = A @ C @ A.T + s * s * np.eye(D)
    return m, C


def gaussian_transitions(kind: str) -> GaussianTransitions:
    if kind == "ddpm":
        return ddpm_transitions(ABAR, num_inference_steps=GAUSS_STEPS, prediction="epsilon")
    if kind == "ddpm_v_large":
        return ddpm_transitions(
            ABAR, num_inference_steps=GAUSS_STEPS, prediction="v_prediction", variance="fixed_large"
        )
    if kind == "ddim_eta1":
        return ddim_transitions(ABAR, num_inference_steps=GAUSS_STEPS, eta=1.0, prediction="sample")
    if kind == "euler_ancestral":
        return euler_ancestral_transitions(
            ABAR, num_inference_steps=GAUSS_STEPS, spacing="linspace"
        )
    raise ValueError(kind)


def gaussian_model(T: GaussianTransitions, data=None) -> GMMDenoiser:
    return GMMDenoiser(gaussian_data() if data is None else data, ABAR, prediction=T.prediction)


DRAFTS = {
    "frozen_x0": lambda T: FrozenTargetDraft("x0", prefetch_root=True),
    "frozen_eps": lambda T: FrozenTargetDraft("eps", prefetch_root=True),
    "frozen_x0_noprefetch": lambda T: FrozenTargetDraft("x0", prefetch_root=False),
    "frozen_eps_noprefetch": lambda T: FrozenTargetDraft("eps", prefetch_root=False),
    "wrong_draft_model": lambda T: DraftModelDraft(gaussian_model(T, wrong_gaussian_data())),
}


# Drafts the static round runs (frozen target, prefetched root); the others run ragged only.
STATIC_DRAFTS = ("frozen_x0", "frozen_eps")
PATHS = ("static", "ragged")


def run_gaussian(kind: str, draft: str, window: int, seed: int, verify_fn=None, path="auto"):
    T = gaussian_transitions(kind)
    model = gaussian_model(T)
    sampler = SpeculativeSampler(model, T, DRAFTS[draft](T), window, verify_fn=verify_fn, path=path)
    assert path == "auto" or sampler.resolve_path() == path
    res = sampler.sample(GAUSS_N, (GAUSS_D,), generator=gen(seed), dtype=torch.float64)
    m, C = exact_final_law(model, T, GAUSS_D)
    return res, m, C


def test_ancestral_matches_exact_gaussian_law():
    T = gaussian_transitions("ddpm")
    model = gaussian_model(T)
    res = AncestralSampler(model, T).sample(
        GAUSS_N, (GAUSS_D,), generator=gen(100), dtype=torch.float64
    )
    m, C = exact_final_law(model, T, GAUSS_D)
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) > ALPHA


@pytest.mark.parametrize("window", [2, 8])
@pytest.mark.parametrize(
    "draft,path", [(d, p) for d in DRAFTS for p in PATHS if p == "ragged" or d in STATIC_DRAFTS]
)
def test_speculative_matches_exact_gaussian_law(draft, window, path):
    seed = 200 + 10 * list(DRAFTS).index(draft) + window + (50 if path == "static" else 0)
    res, m, C = run_gaussian("ddpm", draft, window, seed, path=path)
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) > ALPHA
    # the draft is not trivially exact: some steps were rejected
    assert sum(res.stats.accepted_by_position) < sum(res.stats.attempted_by_position)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["ddpm_v_large", "ddim_eta1", "euler_ancestral"])
def test_speculative_other_samplers_match_exact_gaussian_law(kind, path):
    res, m, C = run_gaussian(kind, "frozen_x0", 8, 300 + len(kind) + len(path), path=path)
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) > ALPHA


@pytest.mark.parametrize("wrong", ["always_accept", "keep_draft", "fresh_from_p"])
def test_gaussian_chain_tests_reject_wrong_verifiers(wrong):
    fn = wrong_verifier(wrong, fresh_seed=6)
    res, m, C = run_gaussian("ddpm", "wrong_draft_model", 8, 400, verify_fn=fn)
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) < ALPHA


@pytest.mark.parametrize("wrong", STATIC_WRONG)
def test_static_path_tests_reject_wrong_verifiers(wrong, monkeypatch):
    """The same exact-law test, on the static round, rejects a wrong fused verify. The frozen eps
    draft at L = 8 rejects often enough for every wrong variant to show."""
    monkeypatch.setattr(StaticRound, "_verify", static_wrong_verify(wrong, seed=7))
    res, m, C = run_gaussian("ddpm", "frozen_eps", 8, 410, path="static")
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) < ALPHA


# ===================================================================== full chains, Gaussian mixture
GMM_D = 16
GMM_N = 1200
GMM_STEPS = 25


def gmm_setup(clip=None):
    gmm = make_gmm(GMM_D, K=4, seed=1)
    T = ddpm_transitions(ABAR, num_inference_steps=GMM_STEPS, clip_sample=clip)
    return GMMDenoiser(gmm, ABAR, prediction="epsilon"), T


def gmm_ancestral(seed: int, clip=None) -> np.ndarray:
    model, T = gmm_setup(clip)
    return AncestralSampler(model, T).sample(GMM_N, (GMM_D,), generator=gen(seed)).samples.numpy()


def gmm_speculative(draft, window: int, seed: int, verify_fn=None, clip=None, path="auto"):
    model, T = gmm_setup(clip)
    return SpeculativeSampler(model, T, draft, window, verify_fn=verify_fn, path=path).sample(
        GMM_N, (GMM_D,), generator=gen(seed)
    )


@pytest.fixture(scope="module")
def gmm_reference():
    return gmm_ancestral(500)


@pytest.mark.parametrize(
    "draft,window,path",
    [
        ("frozen_x0", 8, "ragged"),
        ("frozen_eps", 4, "ragged"),
        ("frozen_x0_noprefetch", 8, "ragged"),
        ("draft_model", 4, "ragged"),
        ("frozen_x0", 8, "static"),
        ("frozen_eps", 4, "static"),
    ],
)
def test_gmm_speculative_vs_ancestral(gmm_reference, draft, window, path):
    d = {
        "frozen_x0": FrozenTargetDraft("x0"),
        "frozen_eps": FrozenTargetDraft("eps"),
        "frozen_x0_noprefetch": FrozenTargetDraft("x0", prefetch_root=False),
        "draft_model": DraftModelDraft(GMMDenoiser(make_gmm(GMM_D, K=4, seed=2), ABAR)),
    }[draft]
    res = gmm_speculative(d, window, 600 + window + len(draft) + len(path), path=path)
    assert two_sample_pvalue(res.samples.numpy(), gmm_reference) > ALPHA
    assert sum(res.stats.accepted_by_position) < sum(res.stats.attempted_by_position)


@pytest.mark.parametrize("path", PATHS)
def test_gmm_speculative_vs_ancestral_with_clipping(path):
    ref = gmm_ancestral(700, clip=1.0)
    res = gmm_speculative(FrozenTargetDraft("x0"), 8, 701, clip=1.0, path=path)
    assert two_sample_pvalue(res.samples.numpy(), ref) > ALPHA


def test_gmm_null_two_independent_ancestral_runs(gmm_reference):
    """The null case of the two-sample test on the reference set the speculative runs are compared
    with: another ancestral run of the same chain (same law) must pass."""
    assert two_sample_pvalue(gmm_ancestral(501), gmm_reference) > ALPHA


def gmm_data(seed: int) -> np.ndarray:
    return make_gmm(GMM_D, K=4, seed=1).sample(GMM_N, generator=gen(seed)).numpy()


def test_gmm_ancestral_vs_data():
    """The baseline every speculative run is compared with, against the data itself: the
    250-step ancestral chain with the exact mixture denoiser vs i.i.d. mixture samples (its
    discretisation error is below what these sample sizes resolve). The same test rejects the
    chain of the moment-matched Gaussian's denoiser (same mean and per-coordinate variance)."""
    gmm = make_gmm(GMM_D, K=4, seed=1)
    T = ddpm_transitions(ABAR, num_inference_steps=250)
    data = gmm_data(42)
    right = AncestralSampler(GMMDenoiser(gmm, ABAR), T).sample(GMM_N, (GMM_D,), generator=gen(510))
    assert two_sample_pvalue(right.samples.numpy(), data) > ALPHA
    moment_matched = GaussianMixture(gmm.mean()[None], torch.diagonal(gmm.cov()).sqrt()[None])
    wrong = AncestralSampler(GMMDenoiser(moment_matched, ABAR), T).sample(
        GMM_N, (GMM_D,), generator=gen(510)
    )
    assert two_sample_pvalue(wrong.samples.numpy(), data) < ALPHA


def shifted_mixture_draft() -> DraftModelDraft:
    """The target mixture's denoiser with every component moved by 0.6 along x_0: a draft whose
    error always points the same way, so a verifier that resamples rejected steps from p (instead
    of the residual (p - q)_+) drifts the chains along x_0 step after step."""
    gmm = make_gmm(GMM_D, K=4, seed=1)
    means = gmm.means.clone()
    means[:, 0] += 0.6
    return DraftModelDraft(GMMDenoiser(GaussianMixture(means, gmm.stds, gmm.weights), ABAR))


@pytest.mark.parametrize("wrong", ["always_accept", "keep_draft", "fresh_from_p"])
def test_gmm_tests_reject_wrong_verifiers(gmm_reference, wrong):
    if wrong == "fresh_from_p":
        # With the frozen-x0 draft fresh-from-p's error is too small for these sample sizes at
        # D = 16 (p ~ 0.2); the shifted draft makes it systematic. The right verifier passes.
        res = gmm_speculative(shifted_mixture_draft(), 4, 800, verify_fn=VerifyFreshFromP(6))
        x = res.samples.numpy()
        assert two_sample_pvalue(x, gmm_reference) < ALPHA
        assert per_coordinate_ks_pvalue(x, gmm_reference) < ALPHA
        right = gmm_speculative(shifted_mixture_draft(), 4, 800)
        assert two_sample_pvalue(right.samples.numpy(), gmm_reference) > ALPHA
        return
    fn = WRONG[wrong]
    res = gmm_speculative(FrozenTargetDraft("x0"), 8, 800, verify_fn=fn)
    x = res.samples.numpy()
    assert two_sample_pvalue(x, gmm_reference) < ALPHA
    # each component test has power on its own
    assert per_coordinate_ks_pvalue(x, gmm_reference) < ALPHA
    assert energy_distance_pvalue(x, gmm_reference) < ALPHA


# ===================================================================== L = 1 and streams
def test_window_one_equals_ancestral():
    """L = 1 with the frozen draft without prefetch: every window starts from the target's own
    prediction at its root, so mq_0 == mp_0, the step is always accepted and y_1 = mp_0 + s xi_k with
    the same xi_k (counter-based noise indexed by step): the ancestral chain, up to rounding (one
    fused kernel there, eager ops here)."""
    model, T = gmm_setup()
    anc = AncestralSampler(model, T).sample(64, (GMM_D,), generator=gen(9))
    spec = SpeculativeSampler(model, T, FrozenTargetDraft("x0", prefetch_root=False), 1).sample(
        64, (GMM_D,), generator=gen(9)
    )
    torch.testing.assert_close(anc.samples, spec.samples, rtol=1e-5, atol=1e-5)
    assert spec.stats.accepted_by_position == spec.stats.attempted_by_position


@pytest.mark.parametrize("draft", ["frozen_x0", "draft_model"])
def test_window_one_law(draft):
    """L = 1 with prefetching or a draft model: paths differ from the ancestral ones (stale frozen
    predictions, reflected rejections) but the law is the same."""
    T = gaussian_transitions("ddpm")
    d = DRAFTS["frozen_x0" if draft == "frozen_x0" else "wrong_draft_model"](T)
    model = gaussian_model(T)
    res = SpeculativeSampler(model, T, d, 1).sample(
        GAUSS_N, (GAUSS_D,), generator=gen(901), dtype=torch.float64
    )
    m, C = exact_final_law(model, T, GAUSS_D)
    assert gaussian_one_sample_pvalue(res.samples.numpy(), m, C) > ALPHA

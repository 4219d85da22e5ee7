"""Exactness of speculative sampling over MULTISTEP chains (SDE-DPM-Solver++ 2M, docs/design.md
§2.1, §6.1): the committed chain must have the law of the ancestral multistep chain, on both
paths and with every draft, and the tests must reject deliberately wrong variants (a wrong
previous prediction after a rejection, a dropped first-order warm-up).

The target is a Gaussian data law, so the denoiser's x0-hat is affine in the state and the
ancestral chain's final law is Gaussian and known exactly: propagate the joint law of (x_k,
p_{k-1}) through x' = A x + b + H p_prev + s xi, p' = P x + c (``exact_multistep_law``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from preamble import ABAR, gen

from specdiff_kernels import (
    AncestralSampler,
    DraftModelDraft,
    FrozenTargetDraft,
    SpeculativeSampler,
)
from specdiff_kernels.models.gmm import GaussianMixture, GMMDenoiser
from specdiff_kernels.ops import round as round_ops
from specdiff_kernels.sampling.static_round import StaticRound
from specdiff_kernels.sampling.transitions import (
    GaussianTransitions,
    dpmsolver_sde_transitions,
    make_betas,
)
from specdiff_kernels.testing.two_sample import gaussian_one_sample_pvalue, two_sample_pvalue

ALPHA = 0.01
D = 6
N_CHAINS = 3000
BACKEND = None  # the default backend per device (the ops under test)


def data(shift: float = 0.0) -> GaussianMixture:
    """One Gaussian component: x0-hat is affine in x (the mixture of one)."""
    center = torch.linspace(-1.5, 1.5, D, dtype=torch.float64)[None] + shift
    return GaussianMixture(center, 0.3 if shift == 0 else 0.5)


def transitions(
    kind: str = "default", steps: int = 20, prediction="epsilon"
) -> GaussianTransitions:
    return dpmsolver_sde_transitions(
        steps, alphas_cumprod=ABAR, sigma_schedule=kind, prediction=prediction
    )


def model_for(T: GaussianTransitions, shift: float = 0.0) -> GMMDenoiser:
    return GMMDenoiser(data(shift), ABAR, prediction=T.prediction)


def exact_multistep_law(model, T: GaussianTransitions) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the ancestral multistep chain's final state (float64): the joint
    Gaussian of z = (x_k, p_{k-1}) through z' = M z + v + noise on x only."""
    eye = torch.eye(D, dtype=torch.float64)
    pts = torch.cat([torch.zeros(1, D, dtype=torch.float64), eye])
    m = np.zeros(2 * D)
    C = np.zeros((2 * D, 2 * D))
    C[:D, :D] = np.eye(D) * T.init_std**2
    for step in range(T.num_steps):
        k = torch.full((D + 1,), step, dtype=torch.int64)
        x0 = T.predict_x0(model, pts, k)
        mean = T.mean_from_x0(pts, x0, k, torch.zeros_like(pts))
        P, c = (x0[1:] - x0[0]).T.numpy(), x0[0].numpy()
        A, b = (mean[1:] - mean[0]).T.numpy(), mean[0].numpy()
        H = float(T.c_prev[step]) * np.eye(D)
        M = np.block([[A, H], [P, np.zeros((D, D))]])
        v = np.concatenate([b, c])
        s2 = float(T.std[step]) ** 2
        m = M @ m + v
        C = M @ C @ M.T
        C[:D, :D] += s2 * np.eye(D)
    return m[:D], C[:D, :D]


def run(sampler, seed: int) -> np.ndarray:
    res = sampler.sample(N_CHAINS, (D,), generator=gen(seed), dtype=torch.float64)
    return res


def law_p(T, model, res) -> float:
    m, C = exact_multistep_law(model, T)
    return gaussian_one_sample_pvalue(res.samples.numpy(), m, C)


def test_exact_law_is_the_diffusers_loop_law():
    """The propagated law is the law of diffusers' own scheduler.step loop (two-sample test):
    the oracle of the tests below is diffusers' SDE-DPM-Solver++ 2M itself."""
    diffusers = pytest.importorskip("diffusers")
    T = transitions("karras", 15)
    model = model_for(T)
    sch = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, trained_betas=make_betas().numpy()
    )
    sch.set_timesteps(15)
    g = gen(5)
    x = torch.randn(N_CHAINS, D, generator=g, dtype=torch.float64)
    for t in sch.timesteps:
        eps = model(x, torch.full((N_CHAINS,), int(t)))
        x = sch.step(eps, t, x, generator=g).prev_sample.double()
    m, C = exact_multistep_law(model, T)
    assert gaussian_one_sample_pvalue(x.numpy(), m, C) > ALPHA
    anc = AncestralSampler(model, T, backend=BACKEND).sample(
        N_CHAINS, (D,), generator=gen(6), dtype=torch.float64
    )
    assert two_sample_pvalue(x.numpy(), anc.samples.numpy()) > ALPHA


@pytest.mark.parametrize("kind", ["default", "karras"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ancestral_multistep_matches_exact_law(kind, prediction):
    T = transitions(kind, prediction=prediction)
    model = model_for(T)
    res = AncestralSampler(model, T, backend=BACKEND).sample(
        N_CHAINS, (D,), generator=gen(11), dtype=torch.float64
    )
    assert law_p(T, model, res) > ALPHA


DRAFTS = {
    "frozen_x0": (lambda T: FrozenTargetDraft("x0"), ("static", "ragged")),
    "frozen_eps": (lambda T: FrozenTargetDraft("eps"), ("static", "ragged")),
    "frozen_x0_noprefetch": (lambda T: FrozenTargetDraft("x0", prefetch_root=False), ("ragged",)),
    "draft_model": (lambda T: DraftModelDraft(model_for(T, shift=0.4)), ("ragged",)),
}
CASES = [(d, p) for d, (_, paths) in DRAFTS.items() for p in paths]


@pytest.mark.parametrize("window", [3, 8])
@pytest.mark.parametrize("draft,path", CASES)
def test_speculative_multistep_matches_exact_law(draft, path, window):
    T = transitions("karras")
    model = model_for(T)
    sampler = SpeculativeSampler(model, T, DRAFTS[draft][0](T), window, path=path, backend=BACKEND)
    assert sampler.resolve_path() == path
    res = run(sampler, 100 + 7 * window + len(draft) + len(path))
    assert law_p(T, model, res) > ALPHA
    # windows were rejected (the test exercises the reflection and its previous prediction)
    assert sum(res.stats.accepted_by_position) < sum(res.stats.attempted_by_position)


@pytest.mark.parametrize("window", ["adaptive", "auto"])
def test_speculative_multistep_window_policies(window):
    T = transitions("default", 30)
    model = model_for(T)
    res = run(SpeculativeSampler(model, T, window=window, backend=BACKEND), 300 + len(window))
    assert law_p(T, model, res) > ALPHA


def test_multistep_speculative_vs_ancestral_two_sample():
    """Speculative vs its ancestral run (independent seeds), two-sample: the same law."""
    T = transitions("default", 50)
    model = model_for(T)
    spec = run(SpeculativeSampler(model, T, window=8, backend=BACKEND), 401)
    anc = AncestralSampler(model, T, backend=BACKEND).sample(
        N_CHAINS, (D,), generator=gen(402), dtype=torch.float64
    )
    assert two_sample_pvalue(spec.samples.numpy(), anc.samples.numpy()) > ALPHA


def test_first_batch_buffers_are_distinct():
    """A captured CUDA round copies its result into the first batch's tensors field by field
    (ChainBatch.copy_): no two fields may share memory, or one copy overwrites another (the
    frozen x0 and the previous prediction both come from the first call's x0-hat)."""
    T = transitions("default")
    rnd = StaticRound(
        model_for(T), T, 4, "x0", torch.tensor(1), torch.arange(3), dtype=torch.float64
    )
    s = rnd.start(torch.randn(3, D, generator=gen(0), dtype=torch.float64))
    ptrs = [t.untyped_storage().data_ptr() for t in s.tensors()]
    assert len(set(ptrs)) == len(ptrs)


# ------------------------------------------------------------------ power: wrong variants
def _wrong_next_prev(kind: str):
    """StaticRound._verify whose next state's previous prediction is wrong after a rejection:
    the draft's own x0-hat at y_J ("draft_prev", with the frozen-eps draft that differs from the
    frozen value) or the frozen value ("frozen")."""
    right = StaticRound._verify

    def verify(self, Y, P, chains):
        res = right(self, Y, P, chains)
        B = Y.shape[0]
        rejected = res.num_accepted < chains.lengths
        J = res.num_accepted.clamp(max=Y.shape[1] - 1)
        yJ = Y[torch.arange(B), J]
        if kind == "frozen":
            wrong = chains.frozen
        else:
            wrong = round_ops.draft_x0(self.spec, yJ, chains.frozen, chains.steps + J)
        mask = rejected.view(-1, *([1] * (Y.dim() - 2)))
        return res._replace(next_prev=torch.where(mask, wrong, res.next_prev))

    return verify


@pytest.mark.parametrize("kind,freeze", [("draft_prev", "eps"), ("frozen", "x0")])
def test_wrong_previous_prediction_after_rejection_is_detected(kind, freeze, monkeypatch):
    monkeypatch.setattr(StaticRound, "_verify", _wrong_next_prev(kind))
    T = transitions("karras")
    model = model_for(T)
    sampler = SpeculativeSampler(
        model, T, FrozenTargetDraft(freeze), 8, path="static", backend=BACKEND
    )
    res = run(sampler, 501)
    assert law_p(T, model, res) < ALPHA


def test_dropped_lower_order_steps_are_detected():
    """Below 15 steps diffusers takes the last step at first order (``lower_order_final``): a
    chain that drops that rule (its last step second order) has another law, and the test says
    so; the same run with the rule passes."""
    right = dpmsolver_sde_transitions(10, alphas_cumprod=ABAR, final_sigmas_type="sigma_min")
    wrong = dpmsolver_sde_transitions(
        10, alphas_cumprod=ABAR, final_sigmas_type="sigma_min", lower_order_final=False
    )
    assert float(right.c_prev[-1]) == 0 and float(wrong.c_prev[-1]) != 0
    model = model_for(right)
    for T, ok in ((right, True), (wrong, False)):
        res = run(SpeculativeSampler(model, T, window=4, path="static", backend=BACKEND), 601)
        assert (law_p(right, model, res) > ALPHA) == ok

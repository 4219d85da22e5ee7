"""Transitions (DDPM, DDIM, Euler-ancestral) against diffusers' schedulers, and the analytic GMM
denoiser against brute-force integration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from preamble import ABAR

from specdiff_kernels.models.gmm import GaussianMixture, GMMDenoiser, make_gmm
from specdiff_kernels.sampling.transitions import (
    GaussianTransitions,
    alphas_cumprod_from_betas,
    ddim_transitions,
    ddpm_transitions,
    euler_ancestral_transitions,
    make_betas,
    respaced_timesteps,
)

diffusers = pytest.importorskip("diffusers")

# diffusers' own numpy-2 deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

T_TRAIN = 1000
RTOL = 2e-4  # diffusers works in float32
ATOL = 2e-4


def _k(step: int, n: int) -> torch.Tensor:
    return torch.full((n,), step, dtype=torch.int64)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_betas_match_diffusers(schedule):
    name = "squaredcos_cap_v2" if schedule == "cosine" else schedule
    s = diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule=name)
    torch.testing.assert_close(
        make_betas(schedule, T_TRAIN), s.betas.to(torch.float64), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n", [10, 37, 1000])
def test_respaced_timesteps_match_diffusers(spacing, n):
    s = diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, timestep_spacing=spacing)
    s.set_timesteps(n)
    assert torch.equal(respaced_timesteps(T_TRAIN, n, spacing), s.timesteps.to(torch.int64))


def _ddpm_case(prediction, variance, clip, schedule, spacing, n):
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T_TRAIN,
        beta_schedule=("squaredcos_cap_v2" if schedule == "cosine" else schedule),
        prediction_type=prediction,
        variance_type=variance,
        clip_sample=clip is not None,
        clip_sample_range=clip or 1.0,
        timestep_spacing=spacing,
    )
    sched.set_timesteps(n)
    T = ddpm_transitions(
        alphas_cumprod_from_betas(make_betas(schedule, T_TRAIN)),
        num_inference_steps=n,
        spacing=spacing,
        prediction=prediction,
        variance=variance,
        clip_sample=clip,
    )
    return sched, T


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize(
    "schedule,spacing,n",
    [("linear", "leading", 20), ("cosine", "trailing", 13), ("linear", "linspace", 1000)],
)
def test_ddpm_step_matches_diffusers(prediction, variance, clip, schedule, spacing, n):
    sched, T = _ddpm_case(prediction, variance, clip, schedule, spacing, n)
    assert torch.equal(T.timesteps, sched.timesteps.to(torch.int64))
    g = torch.Generator().manual_seed(0)
    B, D = 5, 6
    steps = range(n) if n <= 20 else [0, 1, 500, 998, 999]
    for step in steps:
        t = int(sched.timesteps[step])
        x = torch.randn(B, D, generator=g) * 1.5
        out = torch.randn(B, D, generator=g)
        gd = torch.Generator().manual_seed(step)
        ref = sched.step(out, t, x, generator=gd).prev_sample
        noise = (
            torch.randn(B, D, generator=torch.Generator().manual_seed(step))
            if t > 0
            else torch.zeros(B, D)
        )
        k = _k(step, B)
        x64 = x.double()
        mean = T.mean_from_x0(x64, T.x0_from_output(x64, out.double(), k), k)
        ours = mean + T.coef("std", k, x64) * noise.double()
        torch.testing.assert_close(ours.float(), ref, rtol=RTOL, atol=ATOL)
        assert bool(T.deterministic[step]) == (t == 0 or float(T.std[step]) == 0)


def test_ddpm_last_step_deterministic_and_std_formula():
    T = ddpm_transitions(ABAR, num_inference_steps=10)
    assert T.deterministic.tolist() == [False] * 9 + [True]
    a_t, a_prev = ABAR[T.timesteps[3]], ABAR[T.timesteps[4]]
    beta = 1 - a_t / a_prev
    assert math.isclose(float(T.std[3]) ** 2, float((1 - a_prev) / (1 - a_t) * beta), rel_tol=1e-12)
    Tl = ddpm_transitions(ABAR, num_inference_steps=10, variance="fixed_large")
    assert math.isclose(float(Tl.std[3]) ** 2, float(beta), rel_tol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip,use_clipped", [(None, False), (1.0, False), (1.0, True)])
def test_ddim_step_matches_diffusers(prediction, eta, clip, use_clipped):
    n = 15
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=T_TRAIN,
        prediction_type=prediction,
        clip_sample=clip is not None,
        clip_sample_range=clip or 1.0,
    )
    sched.set_timesteps(n)
    T = ddim_transitions(
        ABAR,
        num_inference_steps=n,
        eta=eta,
        prediction=prediction,
        clip_sample=clip,
        use_clipped_model_output=use_clipped,
    )
    assert torch.equal(T.timesteps, sched.timesteps.to(torch.int64))
    assert bool(T.deterministic.all()) == (eta == 0)
    g = torch.Generator().manual_seed(1)
    B, D = 4, 5
    for step in range(n):
        t = int(sched.timesteps[step])
        x = torch.randn(B, D, generator=g) * 1.5
        out = torch.randn(B, D, generator=g)
        noise = torch.randn(B, D, generator=g)
        ref = sched.step(
            out, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise
        ).prev_sample
        k = _k(step, B)
        x64 = x.double()
        ours = (
            T.mean_from_x0(x64, T.x0_from_output(x64, out.double(), k), k)
            + T.coef("std", k, x64) * noise.double()
        )
        torch.testing.assert_close(ours.float(), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_ancestral_matches_diffusers(prediction, spacing):
    n = 12
    sched = diffusers.EulerAncestralDiscreteScheduler(
        num_train_timesteps=T_TRAIN, prediction_type=prediction, timestep_spacing=spacing
    )
    sched.set_timesteps(n)
    T = euler_ancestral_transitions(
        ABAR, num_inference_steps=n, spacing=spacing, prediction=prediction
    )
    torch.testing.assert_close(T.timesteps.to(torch.float64), sched.timesteps.to(torch.float64))
    assert math.isclose(T.init_std, float(sched.init_noise_sigma), rel_tol=1e-5)
    assert T.deterministic.tolist() == [False] * (n - 1) + [True]
    g = torch.Generator().manual_seed(2)
    B, D = 4, 5
    for step in range(n):
        t = sched.timesteps[step]
        x = torch.randn(B, D, generator=g) * float(sched.sigmas[step] + 1)
        out = torch.randn(B, D, generator=g)
        k = _k(step, B)
        x64 = x.double()
        torch.testing.assert_close(
            T.model_input(x64, k).float(), sched.scale_model_input(x, t), rtol=RTOL, atol=ATOL
        )
        gd = torch.Generator().manual_seed(100 + step)
        ref = sched.step(out, t, x, generator=gd).prev_sample
        noise = torch.randn(B, D, generator=torch.Generator().manual_seed(100 + step)).double()
        ours = (
            T.mean_from_x0(x64, T.x0_from_output(x64, out.double(), k), k)
            + T.coef("std", k, x64) * noise
        )
        torch.testing.assert_close(
            ours.float(), ref, rtol=RTOL, atol=ATOL * (1 + float(sched.sigmas[step]))
        )


def test_conversions_roundtrip_and_state_convention():
    for T in (
        ddpm_transitions(ABAR, num_inference_steps=30),
        euler_ancestral_transitions(ABAR, num_inference_steps=30),
    ):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(7, 3, generator=g, dtype=torch.float64)
        x0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
        k = torch.randint(0, 30, (7,), generator=g)
        eps = T.eps_from_x0(x, x0, k)
        torch.testing.assert_close(T.x0_from_eps(x, eps, k), x0)
        # the state obeys x = state_alpha x0 + state_sigma eps
        torch.testing.assert_close(
            T.coef("state_alpha", k, x) * x0 + T.coef("state_sigma", k, x) * eps, x
        )
    # per-chain steps: one batch, different steps per row
    T = ddpm_transitions(ABAR, num_inference_steps=10)
    x = torch.randn(3, 2, dtype=torch.float64)
    x0 = torch.randn(3, 2, dtype=torch.float64)
    k = torch.tensor([0, 4, 9])
    m = T.mean_from_x0(x, x0, k)
    for i in range(3):
        torch.testing.assert_close(
            m[i : i + 1], T.mean_from_x0(x[i : i + 1], x0[i : i + 1], k[i : i + 1])
        )
    assert T.t(k).tolist() == [T.timesteps[0].item(), T.timesteps[4].item(), T.timesteps[9].item()]


def test_custom_tables_validation():
    with pytest.raises(ValueError, match="std must be >= 0"):
        GaussianTransitions([1, 0], 1.0, 0.0, [-1.0, 0.0], 0.5, 0.5)
    with pytest.raises(ValueError, match="c_x0 must have 2 entries"):
        GaussianTransitions([1, 0], [1.0, 1.0, 1.0], 0.0, 0.1, 0.5, 0.5)
    with pytest.raises(ValueError, match="prediction"):
        GaussianTransitions([1, 0], 1.0, 0.0, 0.1, 0.5, 0.5, prediction="x0")
    with pytest.raises(ValueError, match="variance"):
        ddpm_transitions(ABAR, variance="learned")


# ----------------------------------------------------------------------------- GMM denoiser
def _brute_force_posterior_mean_1d(gmm: GaussianMixture, xt: float, abar: float) -> float:
    grid = np.linspace(-12, 12, 200001)
    p0 = np.exp(gmm.log_prob(torch.from_numpy(grid[:, None])).numpy())
    lik = np.exp(-((xt - math.sqrt(abar) * grid) ** 2) / (2 * (1 - abar)))
    w = p0 * lik
    return float((grid * w).sum() / w.sum())


def test_gmm_denoiser_matches_brute_force_integration():
    gmm = GaussianMixture(
        torch.tensor([[-2.0], [0.5], [3.0]]),
        torch.tensor([0.3, 0.7, 0.5]),
        torch.tensor([0.2, 0.5, 0.3]),
    )
    model = GMMDenoiser(gmm, ABAR, prediction="sample")
    for t in (0, 100, 400, 900, 999):
        xs = torch.tensor([[-2.5], [0.0], [1.7]], dtype=torch.float64)
        out = model(xs, torch.full((3,), t))
        for i in range(3):
            ref = _brute_force_posterior_mean_1d(gmm, float(xs[i, 0]), float(ABAR[t]))
            assert abs(float(out[i, 0]) - ref) < 1e-6, (t, i)


def test_gmm_denoiser_gaussian_is_affine_and_predictions_agree():
    gmm = GaussianMixture(torch.tensor([[1.0, -0.5]]), torch.tensor([[0.5, 1.5]]))
    x0m = GMMDenoiser(gmm, ABAR, "sample")
    epsm = GMMDenoiser(gmm, ABAR, "epsilon")
    vm = GMMDenoiser(gmm, ABAR, "v_prediction")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    a = ABAR[t].sqrt()[:, None]
    s = (1 - ABAR[t]).sqrt()[:, None]
    var0 = torch.tensor([0.25, 2.25], dtype=torch.float64)
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    expected = mu + a * var0 / (a**2 * var0 + s**2) * (x - a * mu)
    torch.testing.assert_close(x0m(x, t), expected)
    torch.testing.assert_close(epsm(x, t), (x - a * expected) / s)
    torch.testing.assert_close(vm(x, t), a * epsm(x, t) - s * expected)
    # float32 in, float32 out; multi-dim event shapes
    y = x0m(x.float().reshape(6, 1, 2), t)
    assert y.dtype == torch.float32 and y.shape == (6, 1, 2)


def test_gmm_fractional_timesteps_interpolate_sigma():
    gmm = make_gmm(3, K=2, seed=0)
    model = GMMDenoiser(gmm, ABAR, "sample")
    sig = ((1 - ABAR) / ABAR).sqrt()
    t = torch.tensor([10.25, 500.5])
    s = torch.stack([sig[10] + 0.25 * (sig[11] - sig[10]), sig[500] + 0.5 * (sig[501] - sig[500])])
    torch.testing.assert_close(model.abar(t), 1 / (1 + s**2))
    torch.testing.assert_close(model.abar(torch.tensor([3.0, 7.0])), ABAR[[3, 7]])


def test_gmm_sample_moments_and_make_gmm():
    gmm = make_gmm(5, K=3, seed=4)
    assert gmm.means.shape == (3, 5) and math.isclose(float(gmm.weights.sum()), 1.0)
    assert torch.equal(make_gmm(5, K=3, seed=4).means, gmm.means)
    x = gmm.sample(200000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean(0), gmm.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gmm.cov(), atol=0.03, rtol=0)
    # at t = 0 (abar ~ 1) the denoiser is close to the identity
    model = GMMDenoiser(gmm, ABAR, "sample")
    torch.testing.assert_close(
        model(x[:100], torch.zeros(100, dtype=torch.int64)), x[:100], atol=5e-3, rtol=0
    )


# ------------------------------------------------------------------ multistep (DPM++ 2M SDE)
def test_multistep_tables_and_their_checks():
    from specdiff_kernels.ops.layout import ROW_H
    from specdiff_kernels.sampling.transitions import dpmsolver_sde_transitions, round_tables

    T = dpmsolver_sde_transitions(20)
    assert T.multistep and float(T.c_prev[0]) == 0 and bool((T.c_prev[1:-1] < 0).all())
    # final sigma 0: the last step is first order and deterministic (its mean is the x0-hat)
    assert float(T.c_prev[-1]) == 0 and float(T.std[-1]) == 0 and float(T.c_x0[-1]) == 1
    torch.testing.assert_close(round_tables(T)[ROW_H], T.c_prev, rtol=0, atol=0)
    first = dpmsolver_sde_transitions(20, solver_order=1)
    assert not first.multistep
    torch.testing.assert_close(first.std, T.std)
    with pytest.raises(ValueError, match="c_prev\\[0\\] must be 0"):
        GaussianTransitions([2, 1], 0.5, 0.5, 0.1, 0.8, 0.6, c_prev=[0.3, 0.1])
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="multistep.*prev"):
        T.mean_from_x0(x, x, torch.zeros(2, dtype=torch.int64))
    for kwargs, match in (
        (dict(solver_order=3), "solver_order"),
        (dict(solver_type="euler"), "solver_type"),
        (dict(sigma_schedule="exponential"), "sigma_schedule"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
    ):
        with pytest.raises(ValueError, match=match):
            dpmsolver_sde_transitions(20, **kwargs)

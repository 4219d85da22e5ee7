"""The embedded flow-matching models: the Gaussian mixture's exact rectified-flow velocity
(:class:`specdiff_kernels.models.gmm.GMMFlowVelocity`) and the ``digits-flow`` networks (shipped
weights load, reproduce their recorded eval loss, and their samples look like digits according
to the digits classifier; an untrained network's do not).

The digits sampler here is a self-contained Euler loop of the flow ODE dx/dt = v (uniform t
grid from 1 to 0), independent of the project's samplers."""

from __future__ import annotations

import json

import pytest
import torch

from specdiff_kernels import models
from specdiff_kernels.models import digits as D
from specdiff_kernels.models.gmm import GMMDenoiser, GMMFlowVelocity, make_gmm


# --------------------------------------------------------------------------------------------
# GMM: exact velocity
# --------------------------------------------------------------------------------------------
def test_gmm_velocity_is_the_vp_posterior_mean_after_a_time_change():
    """x_t = (1 - t) x0 + t eps, divided by s = sqrt((1 - t)^2 + t^2), is the VP state with
    abar = (1 - t)^2 / s^2: the flow posterior mean must be the (separately tested) VP
    denoiser's at x_t / s, and v = (x_t - x0_hat) / t."""
    gmm = make_gmm(6, K=4, seed=3)
    flow = GMMFlowVelocity(gmm)
    vp = GMMDenoiser(gmm, torch.linspace(0.999, 0.001, 1000, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.02, 0.3, 0.5, 0.77, 1.0], dtype=torch.float64)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64) * 1.5
    s = ((1 - t) ** 2 + t**2).sqrt()
    x0 = vp.posterior_mean_x0(x / s[:, None], ((1 - t) / s) ** 2)
    v = flow(x, 1000 * t)
    torch.testing.assert_close(v, (x - x0) / t[:, None], rtol=1e-10, atol=1e-10)
    # float32 in, float32 out; scalar timesteps broadcast
    v32 = flow(x.float(), torch.tensor(500.0))
    assert v32.dtype == torch.float32 and v32.shape == (5, 6)


def test_gmm_velocity_matches_monte_carlo():
    """Self-normalised importance sampling of E[eps - x0 | x_t] over draws of x0 (D = 2)."""
    gmm = make_gmm(2, K=3, seed=1)
    flow = GMMFlowVelocity(gmm)
    x0 = gmm.sample(400_000, generator=torch.Generator().manual_seed(5))
    for t, xt in ((0.4, torch.tensor([0.3, -0.2])), (0.8, torch.tensor([-0.5, 1.0]))):
        xt = xt.double()
        logw = -0.5 * ((xt - (1 - t) * x0) ** 2).sum(-1) / t**2
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * ((xt - (1 - t) * x0) / t - x0)).sum(0)
        exact = flow(xt[None], torch.tensor([1000 * t]))[0]
        torch.testing.assert_close(exact, mc, rtol=0, atol=0.02)
        # and a wrong time convention (VP's t index) is far off: the check has power
        wrong = flow(xt[None], torch.tensor([1000 * (1 - t)]))[0]
        assert (wrong - mc).abs().max() > 0.1


def test_gmm_velocity_refuses_t_outside_0_1():
    flow = GMMFlowVelocity(make_gmm(2, K=2))
    with pytest.raises(ValueError, match="timestep"):
        flow(torch.zeros(1, 2), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="features"):
        flow(torch.zeros(1, 3), torch.tensor([10.0]))

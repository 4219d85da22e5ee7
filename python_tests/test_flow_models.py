"""The embedded flow-matching models: the Gaussian mixture's exact rectified-flow velocity
(:class:`specdiff_kernels.models.gmm.GMMVelocity`) and the ``digits-flow`` networks (shipped
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
from specdiff_kernels.models.gmm import GMMDenoiser, GMMVelocity, make_gmm


# --------------------------------------------------------------------------------------------
# GMM: exact velocity
# --------------------------------------------------------------------------------------------
def test_gmm_velocity_is_the_vp_posterior_mean_after_a_time_change():
    """x_t = (1 - t) x0 + t eps, divided by s = sqrt((1 - t)^2 + t^2), is the VP state with
    abar = (1 - t)^2 / s^2: the flow posterior mean must be the (separately tested) VP
    denoiser's at x_t / s, and v = (x_t - x0_hat) / t."""
    gmm = make_gmm(6, K=4, seed=3)
    flow = GMMVelocity(gmm)
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
    flow = GMMVelocity(gmm)
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


# --------------------------------------------------------------------------------------------
# digits-flow: shipped networks
# --------------------------------------------------------------------------------------------
# Mean top-class probability of the digits classifier on 64 samples of the flow Euler ODE
# (seeds below), measured with the shipped weights: see test_flow_samples_look_like_digits.
FLOW_MIN_CONF = 0.85
MEASURED_ABS = 0.01
NOISE_MAX_CONF = 0.01


@pytest.fixture(scope="module")
def flow_model():
    return models.load("digits-flow")


def _flow_info() -> dict:
    return json.loads((D.WEIGHTS_DIR / D.FLOW_INFO_FILE).read_text())


@torch.no_grad()
def euler_ode(model, n: int, num_steps: int, seed: int) -> torch.Tensor:
    """dx/dt = v(x, 1000 t) from t = 1 (noise) to t = 0 on a uniform grid (float64 state)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = model(x.float(), torch.full((n,), 1000 * float(t))).double()
        x = x + (t_next - t) * v
    return x.float()


def test_digits_flow_loads(flow_model):
    m = flow_model
    assert m.name == "digits-flow" and m.prediction == "flow_prediction"
    assert m.alphas_cumprod is None and m.event_shape == (1, 8, 8)
    assert m.target.config == D.TARGET_CONFIG and m.draft.config == D.DRAFT_CONFIG
    for net in (m.target, m.draft):
        assert not net.training and all(not p.requires_grad for p in net.parameters())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1000.0, 512.5, 3.0])  # timesteps 1000 t: float
    for net in (m.target, m.draft):
        v = net(x, t)
        assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    info = _flow_info()
    assert D.count_params(m.target) == info["target"]["params"]
    assert D.count_params(m.draft) == info["draft"]["params"]
    assert m.data(5, torch.Generator().manual_seed(0)).shape == (5, 1, 8, 8)
    with pytest.raises(TypeError, match="dim"):
        models.load("digits-flow", dim=3)


@pytest.mark.parametrize("which", ["target", "draft"])
def test_shipped_weights_reproduce_their_recorded_eval_loss(flow_model, which):
    """The training run's final eval loss (EMA weights, fixed t and noise over the whole
    dataset), recomputed from the shipped file: the weights are the ones that run wrote."""
    from specdiff_kernels.models.train import eval_loss

    net = getattr(flow_model, which)
    got = eval_loss(net, D.digits_dataset(), None, objective="flow_prediction")
    assert got == pytest.approx(_flow_info()[which]["final_eval_loss_ema"], abs=2e-5)


def _untrained() -> torch.nn.Module:
    """The target's architecture with random weights everywhere (the zero-initialised layers
    too, so that its velocity is not simply 0)."""
    torch.manual_seed(0)
    net = D.build_digits_model(D.TARGET_CONFIG)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return net.eval()


def test_flow_samples_look_like_digits(flow_model):
    """64 samples of the Euler ODE, 50 steps. Measured: mean confidence target 0.943 (10 digit
    classes), draft 0.858 (the DDPM digits target: 0.942); an untrained network's and clipped
    noise stay below 0.01."""
    from specdiff_kernels.models.digits_classifier import digit_confidence, digit_predict

    s = euler_ode(flow_model.target, 64, 50, seed=0)
    assert torch.isfinite(s).all()
    conf = digit_confidence(s)
    assert conf.mean().item() > FLOW_MIN_CONF
    assert conf.mean().item() == pytest.approx(0.943, abs=MEASURED_ABS)
    assert torch.unique(digit_predict(s[conf > 0.5])).numel() >= 8
    draft = digit_confidence(euler_ode(flow_model.draft, 64, 50, seed=0)).mean().item()
    assert draft == pytest.approx(0.858, abs=MEASURED_ABS)
    # the same check fails an untrained network of the same architecture
    assert digit_confidence(euler_ode(_untrained(), 64, 50, seed=0)).mean().item() < NOISE_MAX_CONF

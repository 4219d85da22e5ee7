"""k-diffusion's interface (``specdiff_kernels.integrations.k_diffusion``) against an oracle: the
update equations of k-diffusion's ``sample_euler_ancestral`` and ``sample_dpmpp_2m_sde``
(crowsonkb/k-diffusion, ``k_diffusion/sampling.py``) run as a plain loop with torch noise, on a
denoiser known in closed form (a two-component Gaussian mixture, so the chains' law is not
Gaussian). k-diffusion itself is not imported (it needs torchvision).

* law: speculative samples against the oracle loop's (two-sample test, >= 2000 chains), for
  both samplers, both solver types, eta and s_noise other than 1;
* power: wrong verifiers must be rejected by the same test;
* pointwise: with no noise (eta = 0, or s_noise = 0, which keeps eta's means) the chain is
  deterministic and must equal the oracle's to rounding (the means, without statistics);
* callback (k-diffusion's dict, once per step, a committed trajectory), extra_args, one-line
  refusals.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from wrong_verifiers import verify_always_accept, verify_keep_draft_on_reject

from specdiff_kernels.integrations.k_diffusion import sample_dpmpp_2m_sde, sample_euler_ancestral
from specdiff_kernels.models.gmm import GaussianMixture, GMMDenoiser
from specdiff_kernels.testing.two_sample import (
    bonferroni,
    energy_distance_pvalue,
    per_coordinate_ks_pvalue,
)

ALPHA = 0.01
N_CHAINS = 2000
D = 2


# ------------------------------------------------------------------ k-diffusion's helpers
def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0):
    """k-diffusion's Karras et al. (2022) schedule (float32, a final 0 appended)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def get_sigmas_exponential(n, sigma_min, sigma_max):
    """k-diffusion's exponential schedule (float32, a final 0 appended)."""
    sig = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    return torch.cat([sig, torch.zeros(1)])


# ------------------------------------------------------------------ the oracle loops
def oracle_euler_ancestral(model, x, sigmas, extra_args=None, eta=1.0, s_noise=1.0, g=None):
    """k-diffusion's sample_euler_ancestral with get_ancestral_step, noise from torch."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * s_in, **extra_args)
        if eta:
            sigma_up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        else:
            sigma_up = s_next * 0
        sigma_down = (s_next**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / s
        x = x + d * (sigma_down - s)
        if s_next > 0:
            x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * s_noise * sigma_up
    return x


def oracle_dpmpp_2m_sde(
    model, x, sigmas, extra_args=None, eta=1.0, s_noise=1.0, solver_type="midpoint", g=None
):
    """k-diffusion's sample_dpmpp_2m_sde, its Brownian-tree noise replaced by its law per step
    (independent N(0, I))."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = (
                sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x
                + (-h - eta_h).expm1().neg() * denoised
            )
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    c = (-h - eta_h).expm1().neg() / (-h - eta_h) + 1
                else:
                    c = 0.5 * (-h - eta_h).expm1().neg()
                x = x + c * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
                x = x + noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


SAMPLERS = {
    "euler_ancestral": (sample_euler_ancestral, oracle_euler_ancestral),
    "dpmpp_2m_sde": (sample_dpmpp_2m_sde, oracle_dpmpp_2m_sde),
}


# ------------------------------------------------------------------ the denoiser
class MixtureDenoiser:
    """The exact denoiser E[x0 | x0 + sigma eps = x] of a Gaussian mixture, k-diffusion's
    convention (``model(x, sigma, **extra_args)``); counts calls and keeps the extra_args seen."""

    def __init__(self):
        gmm = GaussianMixture([[-1.5, 0.5], [1.0, -1.0]], [0.3, 0.5], [0.4, 0.6])
        self.vp = GMMDenoiser(gmm, torch.ones(1), prediction="sample")
        self.calls, self.seen = 0, []

    def __call__(self, x, sigma, **extra_args):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        self.calls += 1
        self.seen.append(extra_args)
        abar = 1 / (1 + sigma.double() ** 2)
        x_vp = x.double().reshape(x.shape[0], -1) * abar.sqrt()[:, None]
        return self.vp.posterior_mean_x0(x_vp, abar).to(x.dtype).reshape(x.shape)


def start(n: int, sigmas, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64) * float(sigmas[0])


def oracle(name: str, sigmas, seed: int, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_CHAINS, D, generator=g, dtype=torch.float64) * float(sigmas[0])
    return SAMPLERS[name][1](MixtureDenoiser(), x, sigmas.double(), g=g, **kw)


def law_p(x, y) -> float:
    """Per-coordinate KS and the energy permutation test, Bonferroni over the two."""
    return bonferroni(
        [per_coordinate_ks_pvalue(x, y), energy_distance_pvalue(x, y, n_resamples=499)]
    )


SIGMAS = get_sigmas_karras(12, 0.02, 10.0)
LAW_CASES = {
    "euler_ancestral": ("euler_ancestral", {}, SIGMAS),
    "euler_ancestral-eta0.6-snoise1.2-exponential": (
        "euler_ancestral",
        {"eta": 0.6, "s_noise": 1.2},
        get_sigmas_exponential(12, 0.02, 10.0),
    ),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, SIGMAS),
    "dpmpp_2m_sde-heun-eta0.7-snoise0.9": (
        "dpmpp_2m_sde",
        {"solver_type": "heun", "eta": 0.7, "s_noise": 0.9},
        SIGMAS,
    ),
}


@pytest.mark.parametrize("case", list(LAW_CASES))
def test_law_matches_the_k_diffusion_loop(case):
    name, kw, sigmas = LAW_CASES[case]
    model = MixtureDenoiser()
    x, stats_ = SAMPLERS[name][0](
        model,
        start(N_CHAINS, sigmas, 1),
        sigmas,
        window=4,
        generator=torch.Generator().manual_seed(2),
        return_info=True,
        **kw,
    )
    ref = oracle(name, sigmas, 3, **kw)
    p = law_p(x.numpy(), ref.numpy())
    assert p > ALPHA, f"{case}: speculative samples differ from k-diffusion's loop (p={p:.3g})"
    # speculation: fewer sequential calls than steps
    assert stats_.target_calls < len(sigmas) - 1


@pytest.mark.parametrize(
    "name,wrong",
    [("dpmpp_2m_sde", verify_always_accept), ("euler_ancestral", verify_keep_draft_on_reject)],
)
def test_power_wrong_verifier_is_rejected(name, wrong):
    """The law test rejects a wrong verifier (always accepting: the draft chain's law; keeping the
    rejected draft instead of its reflection). A wrong eta is a weak probe of a law test (every
    eta's chain has the same marginals up to discretisation: eta = 0.5 for 1 gave p = 0.03 here);
    the noiseless test below checks eta's means pointwise instead."""
    x = SAMPLERS[name][0](
        MixtureDenoiser(),
        start(N_CHAINS, SIGMAS, 1),
        SIGMAS,
        window=4,
        generator=torch.Generator().manual_seed(2),
        verify_fn=wrong,
    )
    assert law_p(x.numpy(), oracle(name, SIGMAS, 3).numpy()) < ALPHA


NO_NOISE = {
    "euler_ancestral-eta0": ("euler_ancestral", {"eta": 0.0}),
    "euler_ancestral-snoise0": ("euler_ancestral", {"s_noise": 0.0}),
    "euler_ancestral-eta0.5-snoise0": ("euler_ancestral", {"eta": 0.5, "s_noise": 0.0}),
    "dpmpp_2m_sde-eta0": ("dpmpp_2m_sde", {"eta": 0.0}),
    "dpmpp_2m_sde-snoise0": ("dpmpp_2m_sde", {"s_noise": 0.0}),
    "dpmpp_2m_sde-heun-eta1.5-snoise0": (
        "dpmpp_2m_sde",
        {"eta": 1.5, "s_noise": 0.0, "solver_type": "heun"},
    ),
}


@pytest.mark.parametrize("case", list(NO_NOISE))
@pytest.mark.parametrize("end", ["zero", "partial"])
def test_noiseless_chain_is_the_k_diffusion_loop_pointwise(case, end):
    """Without noise the chains are deterministic: the same states as the oracle loop (its means,
    so eta's, exactly). "partial": a schedule that stops above 0 (ComfyUI's split sigmas)."""
    name, kw = NO_NOISE[case]
    sigmas = SIGMAS.double() if end == "zero" else SIGMAS.double()[:8]
    x0 = start(64, sigmas, 4)
    out = SAMPLERS[name][0](MixtureDenoiser(), x0, sigmas, **kw)
    ref = SAMPLERS[name][1](MixtureDenoiser(), x0, sigmas, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "name,eta", [("euler_ancestral", 1.0), ("dpmpp_2m_sde", 1.0), ("dpmpp_2m_sde", 0.0)]
)
def test_callback_gets_each_committed_step(name, eta):
    """Once per step, in order, k-diffusion's keys; ``denoised`` is the denoiser at ``x``; the
    steps chain: the Euler-ancestral residuals x_{i+1} - mean_i(x_i) are s_up N(0, I), and the
    last step (to sigma 0) returns its denoised. eta = 0: the plain (deterministic) chain."""
    model, seen = MixtureDenoiser(), []
    sigmas = SIGMAS.double()
    x0 = start(400, sigmas, 5)
    out = SAMPLERS[name][0](model, x0, sigmas, callback=seen.append, window=4, eta=eta)
    N = len(sigmas) - 1
    assert [d["i"] for d in seen] == list(range(N))
    assert all(set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"} for d in seen)
    assert all(float(d["sigma"]) == float(sigmas[d["i"]]) == float(d["sigma_hat"]) for d in seen)
    torch.testing.assert_close(seen[0]["x"], x0)
    for d in seen:
        s = torch.full((x0.shape[0],), float(d["sigma"]), dtype=x0.dtype)
        torch.testing.assert_close(d["denoised"], model(d["x"], s))
    torch.testing.assert_close(seen[-1]["denoised"], out)
    if name == "euler_ancestral":
        z = []
        for a, b in zip(seen[:-2], seen[1:-1]):  # the stochastic steps
            s, s_next = float(a["sigma"]), float(b["sigma"])
            up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
            down = math.sqrt(s_next**2 - up**2)
            mean = a["x"] + (a["x"] - a["denoised"]) / s * (down - s)
            z.append(((b["x"] - mean) / up).flatten())
        assert stats.kstest(torch.cat(z).numpy(), "norm").pvalue > ALPHA


# window="auto" (measured costs): on a loaded machine it may say speculation does not pay here
@pytest.mark.filterwarnings("ignore::specdiff_kernels.sampling.autopilot.MostlyAncestralWarning")
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_extra_args_reach_every_denoiser_call(name):
    model = MixtureDenoiser()
    extra = {"cond_scale": 7.5, "seed": 3, "mask": torch.ones(1)}
    x, st = SAMPLERS[name][0](
        model, start(32, SIGMAS, 6), SIGMAS, extra_args=extra, window="auto", return_info=True
    )
    assert model.calls > 0 and all(kw == extra for kw in model.seen)
    assert x.shape == (32, D) and x.dtype == torch.float64 and st.num_steps == len(SIGMAS) - 1


def test_no_step_returns_x():
    x = start(4, SIGMAS, 7)
    assert sample_euler_ancestral(MixtureDenoiser(), x, SIGMAS[:1]) is x


BAD = [
    ({"noise_sampler": lambda s, t: torch.zeros(1)}, ValueError, "noise_sampler must be None"),
    ({"eta": -0.5}, ValueError, "eta must be"),
    ({"s_noise": "1"}, TypeError, "s_noise must be"),
    ({"sigmas": SIGMAS.flip(0)}, ValueError, "sigmas must be strictly decreasing"),
    ({"sigmas": torch.stack([SIGMAS, SIGMAS])}, ValueError, "sigmas must be one-dimensional"),
    ({"sigmas": -SIGMAS}, ValueError, "sigmas must be finite and >= 0"),
    ({"x": [[0.0, 1.0]]}, TypeError, "x must be a floating-point tensor"),
    ({"extra_args": [1]}, TypeError, "extra_args must be a dict"),
    ({"callback": 3}, TypeError, "callback must be callable"),
    ({"disable": "yes"}, TypeError, "disable must be None or a bool"),
    ({"progress": True}, TypeError, "unexpected keyword argument.*progress"),
    ({"callback": print, "path": "static"}, ValueError, "path='static' cannot record"),
]


@pytest.mark.parametrize("bad,err,match", BAD, ids=[b[2][:24] for b in BAD])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_bad_input_is_refused_in_one_line(name, bad, err, match):
    args = {"x": start(4, SIGMAS, 8), "sigmas": SIGMAS, **bad}
    with pytest.raises(err, match=match) as info:
        SAMPLERS[name][0](MixtureDenoiser(), **args)
    assert "\n" not in str(info.value)


def test_bad_solver_type_is_refused():
    with pytest.raises(ValueError, match="solver_type must be one of"):
        sample_dpmpp_2m_sde(MixtureDenoiser(), start(4, SIGMAS, 8), SIGMAS, solver_type="euler")

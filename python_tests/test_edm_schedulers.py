"""EDM-style stochastic samplers (docs/design.md §2.3) against diffusers' own steps:

* ``EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` (EDM preconditioning:
  input c_in x, timestep c_noise, x0 = c_skip x + c_out out), ``EulerDiscreteScheduler`` and
  ``EDMEulerScheduler`` stepped with ``s_churn > 0`` (the churn noise is drawn after the network
  call) and Stable Audio's ``CosineDPMSolverMultistepScheduler`` (its Brownian-tree noise: per
  step an independent Gaussian whose variance follows torchsde's rounding of the interval ends,
  read here from torchsde itself);
* step by step: every step of ``scheduler.step`` (its noise draw replaced by known noise) equals the
  tables' mean + std * noise to float32 rounding, over all steps, for several sigma schedules,
  predictions, solver options and final sigmas;
* law: SpeculativeSampler on the tabulated chain against diffusers' own sampling loop
  (``scale_model_input`` / model / ``step``), on a closed-form Gaussian-mixture denoiser, >= 2000
  chains; power: the same test rejects an always-accepting verifier.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from wrong_verifiers import verify_always_accept

from specdiff_kernels import SpeculativeSampler
from specdiff_kernels.models.gmm import GaussianMixture, GMMDenoiser
from specdiff_kernels.sampling.edm import (
    brownian_tree_noise_var,
    cosine_dpmsolver_sde_transitions,
    edm_dpmsolver_sde_from_sigmas,
    edm_dpmsolver_sde_transitions,
    edm_euler_churn_transitions,
)
from specdiff_kernels.testing.two_sample import (
    bonferroni,
    energy_distance_pvalue,
    per_coordinate_ks_pvalue,
)

diffusers = pytest.importorskip("diffusers")
from specdiff_kernels.integrations.diffusers import diffusers_transitions  # noqa: E402

ALPHA = 0.01
N_CHAINS = 2000
D = 2
GMM = GaussianMixture([[-1.5, 0.5], [1.0, -1.0]], [0.3, 0.5], [0.4, 0.6])
EDM_MODULE = "diffusers.schedulers.scheduling_edm_dpmsolver_multistep"
EULER_MODULE = "diffusers.schedulers.scheduling_euler_discrete"
EDM_EULER_MODULE = "diffusers.schedulers.scheduling_edm_euler"


# ------------------------------------------------------------------ step by step
def _steps_agree(
    monkeypatch, module, sched, T, step_kwargs: dict, seed: int = 0, size: float = 1.0, tol=2e-5
) -> None:
    """Run diffusers' step N times from one state with arbitrary model outputs and known noise
    (``size`` times standard normal; its ``randn_tensor`` replaced, or with ``module`` None the
    cosine scheduler's Brownian-tree sampler, by known noise times the tree's own scale); each
    result must be the tables' mean + std * noise."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, 2, 4)
    x = torch.randn(shape, generator=g) * float(sched.init_noise_sigma)
    drawn = []

    def known_noise(shape, **kw):
        z = size * torch.randn(shape, generator=g, dtype=kw.get("dtype") or torch.float32)
        drawn.append(z)
        return z

    if module is None:
        var = _tree_noise_var(monkeypatch, sched)
        sched.noise_sampler = lambda s, s1: known_noise(shape) * var(s, s1) ** 0.5
    else:
        monkeypatch.setattr(f"{module}.randn_tensor", known_noise)
    prev = torch.zeros(shape, dtype=torch.float64)  # c_prev[0] = 0: step 0 has none
    for k, t in enumerate(sched.timesteps):
        out = torch.randn(shape, generator=g)
        drawn.clear()
        got = sched.step(out, t, x, **step_kwargs).prev_sample
        kk = torch.full((shape[0],), k, dtype=torch.int64)
        xd = x.double()
        x0 = T.x0_from_output(xd, out.double(), kk)
        mean = T.mean_from_x0(xd, x0, kk, prev if T.multistep else None)
        noise = drawn[0].double() if drawn else torch.zeros_like(xd)
        want = mean + float(T.std[k]) * noise
        scale = float(want.abs().max()) + 1.0
        err = float((got.double() - want).abs().max())
        assert err <= tol * scale, f"step {k}: |diffusers - tables| = {err:.3g} (scale {scale:.3g})"
        if T.std[k] > 0:
            assert drawn, f"step {k}: the tables add noise but diffusers' step drew none"
        prev, x = x0, got


EDM_CONFIGS = {
    "karras-eps-midpoint": ({}, 10),
    "exponential-v-heun": (
        {"sigma_schedule": "exponential", "prediction_type": "v_prediction", "solver_type": "heun"},
        10,
    ),
    "karras-eps-sigma_min-20": ({"final_sigmas_type": "sigma_min"}, 20),
    "karras-v-order1-sigma_data1": (
        {"solver_order": 1, "prediction_type": "v_prediction", "sigma_data": 1.0},
        12,
    ),
    "karras-eps-euler_at_final-rho5-20": ({"euler_at_final": True, "rho": 5.0}, 20),
    "karras-eps-no-lower-final-heun": (
        {"lower_order_final": False, "solver_type": "heun", "sigma_max": 20.0},
        8,
    ),
}


@pytest.mark.parametrize("case", list(EDM_CONFIGS))
def test_edm_dpm_steps_agree_with_diffusers(case, monkeypatch):
    cfg, n = EDM_CONFIGS[case]
    sched = diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **cfg)
    T = diffusers_transitions(sched, n)
    assert T.num_steps == n and T.multistep is (sched.config.solver_order == 2)
    assert torch.equal(T.timesteps, _fresh(sched, n).timesteps.double())  # c_noise, as diffusers
    sched.set_timesteps(n)
    _steps_agree(monkeypatch, EDM_MODULE, sched, T, {})


EULER_CONFIGS = {
    "linspace-eps-churn0.5": ({}, {"s_churn": 0.5}, 10),
    "linspace-eps-churn-cap": ({}, {"s_churn": 100.0}, 10),
    "karras-v-tmin-tmax": (
        {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
        {"s_churn": 3.0, "s_tmin": 0.5, "s_tmax": 20.0},
        12,
    ),
    "exponential-eps-snoise": (
        {"use_exponential_sigmas": True},
        {"s_churn": 40.0, "s_noise": 1.007},
        15,
    ),
    "karras-eps-sigma_min-leading": (
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
        {"s_churn": 2.0},
        10,
    ),
    "leading-v-trailing": (
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        {"s_churn": 1.0},
        9,
    ),
}


@pytest.mark.parametrize("case", list(EULER_CONFIGS))
def test_euler_churn_steps_agree_with_diffusers(case, monkeypatch):
    cfg, churn, n = EULER_CONFIGS[case]
    sched = diffusers.EulerDiscreteScheduler(**cfg)
    T = diffusers_transitions(sched, n, **churn)
    sched.set_timesteps(n)
    sched.is_scale_input_called = True  # the step warns otherwise; its input is not needed here
    _steps_agree(monkeypatch, EULER_MODULE, sched, T, churn)


@pytest.mark.parametrize("case", ["karras-eps-churn2", "exponential-v-tmin-sigma_min"])
def test_edm_euler_churn_steps_agree_with_diffusers(case, monkeypatch):
    cfg, churn, n = {
        "karras-eps-churn2": ({}, {"s_churn": 2.0}, 10),
        "exponential-v-tmin-sigma_min": (
            {
                "sigma_schedule": "exponential",
                "prediction_type": "v_prediction",
                "sigma_data": 1.0,
                "final_sigmas_type": "sigma_min",
            },
            {"s_churn": 40.0, "s_tmin": 0.1, "s_tmax": 30.0, "s_noise": 1.003},
            12,
        ),
    }[case]
    sched = diffusers.EDMEulerScheduler(**cfg)
    T = diffusers_transitions(sched, n, **churn)
    assert torch.equal(T.timesteps, _fresh(sched, n).timesteps.double())  # c_noise
    sched.set_timesteps(n)
    sched.is_scale_input_called = True
    _steps_agree(monkeypatch, EDM_EULER_MODULE, sched, T, churn)


def test_edm_euler_native_builder_is_the_adapters_chain():
    cfg = {"sigma_schedule": "exponential", "prediction_type": "v_prediction", "rho": 5.0}
    churn = {"s_churn": 7.0, "s_tmax": 20.0}
    T = diffusers_transitions(diffusers.EDMEulerScheduler(**cfg), 14, **churn)
    U = edm_euler_churn_transitions(
        14, prediction="v_prediction", sigma_schedule="exponential", rho=5.0, **churn
    )
    for name in ("timesteps", "c_x0", "c_x", "std", "input_scale", "out_x", "out_pred"):
        torch.testing.assert_close(getattr(U, name), getattr(T, name), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ the cosine scheduler
def _tree_noise_var(monkeypatch, sched):
    """``var(sigma, sigma_next)``: the variance of the noise diffusers' Brownian-tree sampler
    gives a step, read from torchsde itself: a sampler built as the scheduler's step builds it,
    with torchsde's increments replaced by the length of each interval it resolves the query
    into (W's variance there), so its output is |interval| / sqrt|sigma - sigma_next|."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
    from torchsde._brownian import brownian_interval

    def lengths(interval):
        size = interval._top._size
        return torch.full(size, interval._end - interval._start, dtype=torch.float64), None, None

    cfg = sched.config
    tree = BrownianTreeNoiseSampler(
        torch.zeros(1, dtype=torch.float64), cfg.sigma_min, cfg.sigma_max, seed=0
    )

    def var(sigma, sigma_next):
        with monkeypatch.context() as m, warnings.catch_warnings():
            m.setattr(brownian_interval._Interval, "_increment_and_levy_area", lengths)
            warnings.simplefilter("ignore")  # torchsde: a sigma outside [sigma_min, sigma_max]
            out = float(tree(sigma, sigma_next)[0])
        # a decreasing query gives -W (the sign BatchedBrownianTree applies): the same law
        return abs(out) / float((sigma_next - sigma).abs().sqrt())

    return var


COSINE_CONFIGS = {
    "default-v-exponential": ({}, 10),
    "karras-eps-heun-25": (
        {"sigma_schedule": "karras", "prediction_type": "epsilon", "solver_type": "heun"},
        25,
    ),
    # sigmas 1e-4 apart: the rounding of the tree's ends moves each variance by up to ~1e-2
    "narrow-order1-sigma_data0.5": (
        {"sigma_min": 0.3, "sigma_max": 0.302, "solver_order": 1, "sigma_data": 0.5},
        30,
    ),
    "edm-range-no-lower-final": (
        {"sigma_min": 0.002, "sigma_max": 80.0, "lower_order_final": False, "rho": 5.0},
        12,
    ),
}


@pytest.mark.parametrize("case", list(COSINE_CONFIGS))
def test_cosine_noise_variance_is_torchsdes(case, monkeypatch):
    """brownian_tree_noise_var equals the variance torchsde's Brownian interval resolves."""
    cfg, n = COSINE_CONFIGS[case]
    sched = diffusers.CosineDPMSolverMultistepScheduler(**cfg)
    sched.set_timesteps(n)
    var = _tree_noise_var(monkeypatch, sched)
    sig = sched.sigmas
    want = torch.tensor([var(sig[k], sig[k + 1]) for k in range(n)], dtype=torch.float64)
    got = brownian_tree_noise_var(sig.double(), sched.config.sigma_min, sched.config.sigma_max)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    if case.startswith("narrow"):  # the case where the rounding matters
        assert float((want[:-1] - 1).abs().max()) > 1e-3


@pytest.mark.parametrize("case", list(COSINE_CONFIGS))
def test_cosine_steps_agree_with_diffusers(case, monkeypatch):
    cfg, n = COSINE_CONFIGS[case]
    sched = diffusers.CosineDPMSolverMultistepScheduler(**cfg)
    T = diffusers_transitions(sched, n)
    assert T.num_steps == n and T.multistep is (sched.config.solver_order == 2)
    assert torch.equal(T.timesteps, _fresh(sched, n).timesteps.double())  # atan(sigma) 2 / pi
    sched.set_timesteps(n)
    if "narrow" not in case:
        _steps_agree(monkeypatch, None, sched, T, {})
        return
    # large known noise, so the noise term dominates; diffusers' float32 log-SNR step h loses
    # ~1e-4 of its precision at sigmas 1e-4 apart, while the rounding moves the std by ~1e-2
    _steps_agree(monkeypatch, None, sched, T, {}, size=100.0, tol=1e-4)
    cfg = sched.config
    without = edm_dpmsolver_sde_from_sigmas(  # the same chain but the Brownian tree's variance
        sched.timesteps.double(),
        sched.sigmas.double(),
        sigma_data=float(cfg.sigma_data),
        prediction=cfg.prediction_type,
        solver_order=1,
        init_std=float(sched.init_noise_sigma),
    )
    sched.set_timesteps(n)
    with pytest.raises(AssertionError, match="diffusers - tables"):
        _steps_agree(monkeypatch, None, sched, without, {}, size=100.0, tol=1e-4)


def test_cosine_native_builder_is_the_adapters_chain():
    cfg = {"sigma_schedule": "karras", "prediction_type": "epsilon", "sigma_max": 80.0}
    T = diffusers_transitions(diffusers.CosineDPMSolverMultistepScheduler(**cfg), 16)
    U = cosine_dpmsolver_sde_transitions(
        16, prediction="epsilon", sigma_schedule="karras", sigma_max=80.0
    )
    for name in ("timesteps", "c_x0", "c_x", "c_prev", "std", "input_scale", "out_x", "out_pred"):
        torch.testing.assert_close(getattr(U, name), getattr(T, name), rtol=1e-6, atol=1e-9)


def test_cosine_refusals_name_the_setting():
    cls = diffusers.CosineDPMSolverMultistepScheduler
    for cfg, match in (
        ({"final_sigmas_type": "sigma_min"}, "final_sigmas_type='sigma_min' is not supported"),
        ({"solver_order": 3}, "solver_order=3 is not supported"),
        ({"prediction_type": "sample"}, "prediction_type must be one of"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            diffusers_transitions(cls(**cfg), 10)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="0/0"):
        brownian_tree_noise_var(torch.tensor([1.0, 0.5, 0.5]), 0.5, 1.0)


def _fresh(sched, n):
    s = type(sched).from_config(sched.config)
    s.set_timesteps(n)
    return s


def test_euler_without_churn_is_refused_and_other_families_take_no_churn():
    sched = diffusers.EulerDiscreteScheduler()
    for churn in ({}, {"s_churn": 0.0}):
        for s in (sched, diffusers.EDMEulerScheduler()):
            with pytest.raises(ValueError, match="pass s_churn > 0") as err:
                diffusers_transitions(s, 10, **churn)
            assert "\n" not in str(err.value) and "deterministic" in str(err.value)
    with pytest.raises(
        ValueError, match="s_churn applies to EulerDiscreteScheduler or EDMEulerScheduler only"
    ):
        diffusers_transitions(diffusers.DDPMScheduler(), 10, s_churn=1.0)
    with pytest.raises(ValueError, match="s_noise must be"):
        diffusers_transitions(sched, 10, s_churn=1.0, s_noise=-1.0)


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "EDMEulerScheduler"])
def test_from_pipeline_passes_the_churn_through(cls):
    """from_pipeline takes the step's churn arguments as diffusers_transitions does (and refuses
    the churn-less step, or churn for another scheduler, in its words)."""
    from tiny_diffusers import tiny_unet

    from specdiff_kernels.integrations.diffusers import from_pipeline

    churn = {"s_churn": 5.0, "s_tmin": 0.2, "s_tmax": 30.0, "s_noise": 1.01}
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(channels=1), scheduler=getattr(diffusers, cls)())
    _, T = from_pipeline(pipe, 10, **churn)
    want = diffusers_transitions(pipe.scheduler, 10, **churn)
    assert torch.equal(T.std, want.std) and torch.equal(T.c_x, want.c_x) and T.std.max() > 0
    with pytest.raises(ValueError, match="pass s_churn > 0"):
        from_pipeline(pipe, 10)
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler()
    with pytest.raises(ValueError, match="s_churn applies to"):
        from_pipeline(pipe, 10, s_churn=1.0)


def test_edm_dpm_refuses_its_deterministic_solver():
    with pytest.raises(ValueError, match="algorithm_type='dpmsolver\\+\\+' is deterministic"):
        diffusers_transitions(diffusers.EDMDPMSolverMultistepScheduler(), 10)


def test_edm_thresholding_keeps_the_preconditioning():
    sched = diffusers.EDMDPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", thresholding=True
    )
    T = diffusers_transitions(sched, 10)
    plain = diffusers_transitions(
        diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), 10
    )
    assert (
        not T.affine
        and torch.equal(T.out_x, plain.out_x)
        and torch.equal(T.out_pred, plain.out_pred)
    )


def test_native_builder_is_the_adapters_chain():
    """Without diffusers' scheduler: the same tables (float32-rounded sigmas, both)."""
    cfg = {"sigma_schedule": "exponential", "prediction_type": "v_prediction", "sigma_max": 50.0}
    T = diffusers_transitions(
        diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **cfg), 16
    )
    U = edm_dpmsolver_sde_transitions(
        16, prediction="v_prediction", sigma_schedule="exponential", sigma_max=50.0
    )
    for name in ("timesteps", "c_x0", "c_x", "c_prev", "std", "input_scale", "out_x", "out_pred"):
        torch.testing.assert_close(getattr(U, name), getattr(T, name), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ law
class EDMMixture(torch.nn.Module):
    """An EDM-preconditioned network whose x0 is exact for GMM: ``model(c_in x, c_noise)`` returns
    ``(E[x0 | x] - c_skip x) / c_out`` at sigma = exp(4 c_noise) (EDM) or tan(c_noise pi / 2)
    (``cosine``: Stable Audio's c_noise = atan(sigma) 2 / pi)."""

    def __init__(self, sigma_data: float, prediction: str, cosine: bool = False):
        super().__init__()
        self.vp = GMMDenoiser(GMM, torch.ones(1), prediction="sample")
        self.sd, self.sign = sigma_data, 1.0 if prediction == "epsilon" else -1.0
        self.cosine = cosine

    def forward(self, x_in, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        sigma = torch.tan(t * math.pi / 2) if self.cosine else torch.exp(4 * t)
        sigma = sigma.expand(x_in.shape[0])
        norm = (sigma**2 + self.sd**2).sqrt()[:, None]
        x = x_in.double() * norm
        abar = 1 / (1 + sigma**2)
        x0 = self.vp.posterior_mean_x0(x * abar.sqrt()[:, None], abar)
        c_skip, c_out = self.sd**2 / norm**2, self.sign * sigma[:, None] * self.sd / norm
        return ((x0 - c_skip * x) / c_out).to(x_in.dtype)


def diffusers_loop(sched, model, n: int, seed: int, **step_kwargs) -> torch.Tensor:
    """diffusers' own sampling loop over a batch of chains (the reference)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_CHAINS, D, generator=g) * float(sched.init_noise_sigma)
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t.reshape(1).expand(N_CHAINS))
        x = sched.step(out, t, x, generator=g, **step_kwargs).prev_sample
    return x


def law_p(x, y) -> float:
    return bonferroni(
        [per_coordinate_ks_pvalue(x, y), energy_distance_pvalue(x, y, n_resamples=499)]
    )


def _speculative(model, T, verify_fn=None):
    sampler = SpeculativeSampler(model, T, window=4, verify_fn=verify_fn)
    res = sampler.sample(N_CHAINS, (D,), generator=torch.Generator().manual_seed(2))
    return res.samples if hasattr(res, "samples") else res.x


def _edm_case(prediction: str, cfg: dict, n: int):
    sched = diffusers.EDMDPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", prediction_type=prediction, sigma_max=10.0, **cfg
    )
    T = diffusers_transitions(sched, n)
    sched.set_timesteps(n)
    return sched, T, EDMMixture(float(sched.config.sigma_data), prediction)


def _edm_euler_case(prediction: str, cfg: dict, n: int):
    sched = diffusers.EDMEulerScheduler(prediction_type=prediction, sigma_max=10.0, **cfg)
    return sched, EDMMixture(float(sched.config.sigma_data), prediction)


def _cosine_case(prediction: str, cfg: dict, n: int):
    sched = diffusers.CosineDPMSolverMultistepScheduler(
        prediction_type=prediction, sigma_min=0.05, sigma_max=20.0, **cfg
    )
    T = diffusers_transitions(sched, n)
    sched.set_timesteps(n)
    return sched, T, EDMMixture(float(sched.config.sigma_data), prediction, cosine=True)


def _euler_case(prediction: str, cfg: dict, n: int):
    sched = diffusers.EulerDiscreteScheduler(prediction_type=prediction, **cfg)
    sched.set_timesteps(n)
    model = GMMDenoiser(GMM, sched.alphas_cumprod.double(), prediction=prediction)
    return sched, model


LAW = {
    "edm-eps-karras": ("edm", "epsilon", {}, 12, {}),
    "edm-v-exponential-heun": (
        "edm",
        "v_prediction",
        {"sigma_schedule": "exponential", "solver_type": "heun", "sigma_data": 1.0},
        12,
        {},
    ),
    "euler-churn-eps": ("euler", "epsilon", {}, 12, {"s_churn": 2.0}),
    "euler-churn-v-karras-tmax": (
        "euler",
        "v_prediction",
        {"use_karras_sigmas": True},
        12,
        {"s_churn": 100.0, "s_tmax": 5.0},
    ),
    "edm-euler-churn-eps": ("edm-euler", "epsilon", {}, 12, {"s_churn": 3.0}),
    "edm-euler-churn-v-exponential": (
        "edm-euler",
        "v_prediction",
        {"sigma_schedule": "exponential", "sigma_data": 1.0},
        10,
        {"s_churn": 100.0, "s_tmin": 0.05},
    ),
    "cosine-v-exponential": ("cosine", "v_prediction", {}, 12, {}),
    "cosine-eps-karras-heun": (
        "cosine",
        "epsilon",
        {"sigma_schedule": "karras", "solver_type": "heun", "sigma_data": 0.5},
        12,
        {},
    ),
}


def _law_samples(case: str, verify_fn=None):
    kind, prediction, cfg, n, churn = LAW[case]
    if kind in ("edm", "cosine"):
        sched, T, model = (_edm_case if kind == "edm" else _cosine_case)(prediction, cfg, n)
    else:
        sched, model = (_euler_case if kind == "euler" else _edm_euler_case)(prediction, cfg, n)
        T = diffusers_transitions(sched, n, **churn)
    x = _speculative(model, T, verify_fn)
    sched.set_timesteps(n)
    ref = diffusers_loop(sched, model, n, 3, **churn)
    return x, ref


@pytest.mark.parametrize("case", list(LAW))
def test_law_matches_the_diffusers_loop(case):
    x, ref = _law_samples(case)
    p = law_p(x.double().numpy(), ref.double().numpy())
    assert p > ALPHA, f"{case}: speculative samples differ from diffusers' loop (p={p:.3g})"


@pytest.mark.parametrize(
    "case", ["edm-eps-karras", "euler-churn-eps", "edm-euler-churn-eps", "cosine-v-exponential"]
)
def test_power_always_accept_is_rejected(case):
    x, ref = _law_samples(case, verify_always_accept)
    assert law_p(x.double().numpy(), ref.double().numpy()) < ALPHA


def test_native_families_build_on_a_vp_model():
    """On a VP model (an embedded one) the EDM family takes its sigma range and fractional
    timesteps; sigma_data (EDM preconditioning only) is refused there."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    T = edm_dpmsolver_sde_transitions(10, alphas_cumprod=abar)
    assert T.output is None and T.timesteps.is_floating_point()
    assert math.isclose(
        float(T.state_sigma[0]), float(((1 - abar[-1]) / abar[-1]).sqrt()), rel_tol=1e-6
    )
    with pytest.raises(ValueError, match="sigma_data applies to an EDM-preconditioned network"):
        edm_dpmsolver_sde_transitions(10, alphas_cumprod=abar, sigma_data=0.5)

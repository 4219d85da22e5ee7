"""Rectified-flow chains (prediction "flow_prediction", docs/design.md "flow matching"): the
stochastic FlowMatch Euler step (family "flow-euler") and Flow-GRPO's reverse SDE ("flow-sde").

* diffusers: the adapter's tables step for step as ``FlowMatchEulerDiscreteScheduler(
  stochastic_sampling=True).step`` with the same noise (diffusers draws ``torch.randn_like`` from
  the global RNG: seeded, and the same draw fed to the tables), for every sigma option; the native
  builder's sigmas are diffusers' own; the SDE's tables step as a transcription of Flow-GRPO's
  ``sde_step_with_logprob``;
* law: SpeculativeSampler (static and ragged rounds, fixed and "auto" windows, x0 and eps frozen
  drafts) against an independent ancestral loop written from the papers' formulas, on the exact
  velocity of a Gaussian mixture (>= 2000 chains); power: the same test rejects an always-accepting
  verifier and a wrong std;
* the Triton round under TRITON_INTERPRET gives the C++ round's samples;
* refusals, in one line naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch
from preamble import SINGLE_THREAD
from wrong_verifiers import verify_always_accept

from specdiff_kernels import models
from specdiff_kernels.models.gmm import GMMVelocity, make_gmm
from specdiff_kernels.sampling.drafts import FrozenTargetDraft
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.transitions import (
    GaussianTransitions,
    flow_euler_from_sigmas,
    flow_euler_transitions,
    flow_sde_from_sigmas,
    flow_sde_transitions,
    flow_sigmas,
)
from specdiff_kernels.testing.two_sample import (
    bonferroni,
    energy_distance_pvalue,
    per_coordinate_ks_pvalue,
)

pytestmark = SINGLE_THREAD

diffusers = pytest.importorskip("diffusers")
from specdiff_kernels.integrations import diffusers as adapter  # noqa: E402

FlowMatchEuler = diffusers.FlowMatchEulerDiscreteScheduler
ALPHA = 0.01
N_CHAINS = 2000
D = 2
STEPS = 10
NOISE_LEVEL = 0.7
GMM = make_gmm(D, K=3, seed=3)


def velocity() -> GMMVelocity:
    return GMMVelocity(GMM)


# ------------------------------------------------------------------ diffusers' step
SCHEDULERS = {  # FlowMatchEulerDiscreteScheduler settings, set_timesteps' mu
    "default": ({}, None),
    "shift3": ({"shift": 3.0}, None),
    "dynamic-exponential": ({"use_dynamic_shifting": True}, 0.8),
    "dynamic-linear": ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.7),
    "shift_terminal": ({"shift": 2.0, "shift_terminal": 0.05}, None),
    "karras": ({"use_karras_sigmas": True}, None),
    "exponential": ({"use_exponential_sigmas": True}, None),
    "beta": ({"use_beta_sigmas": True}, None),
}


def _scheduler(case: str, stochastic: bool = True):
    cfg, mu = SCHEDULERS[case]
    return FlowMatchEuler(stochastic_sampling=stochastic, **cfg), mu


def _mu(mu) -> dict:
    return {} if mu is None else {"mu": mu}


@pytest.mark.parametrize("case", list(SCHEDULERS))
def test_tables_step_as_diffusers_flow_match_euler(case):
    """Every step of the tabulated chain is diffusers' stochastic step: from the same state, the
    same velocity and the same normal draw, the same next state to float32 rounding."""
    sched, mu = _scheduler(case)
    T = adapter.diffusers_transitions(sched, STEPS, **_mu(mu))
    sched.set_timesteps(STEPS, **_mu(mu))
    assert torch.equal(T.timesteps, sched.timesteps.double())
    v = velocity()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(sched.timesteps):
        kk = torch.full((64,), k)
        out = v(x, t.expand(64))
        torch.manual_seed(100 + k)  # diffusers' randn_like draws from the global RNG
        want = sched.step(out, t, x).prev_sample
        torch.manual_seed(100 + k)
        z = torch.randn_like(x)
        mean = T.mean_from_x0(x, T.x0_from_output(x, out, kk), kk)
        got = mean + T.coef("std", kk, x) * z
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        x = want
    assert bool(T.deterministic[-1]) and not bool(T.deterministic[:-1].any())


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("n", [1, 7, 28, 1000])
def test_native_sigmas_are_diffusers_own(shift, n):
    sched = FlowMatchEuler(shift=shift)
    sched.set_timesteps(n)
    ts, sig = flow_sigmas(n, shift=shift)
    assert torch.equal(ts, sched.timesteps) and torch.equal(sig, sched.sigmas)
    T = flow_euler_transitions(n, shift=shift)
    assert torch.equal(T.timesteps, sched.timesteps.double()) and T.timesteps.is_floating_point()


def flow_grpo_step(v, t, x, sigmas, timesteps, noise, noise_level=NOISE_LEVEL):
    """Flow-GRPO's ``sde_step_with_logprob`` (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py),
    transcribed in float32 on the scheduler's sigmas, with the normal draw given."""
    i = int((timesteps == t).nonzero()[0, 0])
    sigma, sigma_prev, sigma_max = sigmas[i], sigmas[i + 1], sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = (
        x * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    return mean + std_dev_t * torch.sqrt(-1 * dt) * noise


@pytest.mark.parametrize("case", ["default", "shift3", "dynamic-exponential", "karras"])
def test_sde_tables_step_as_flow_grpo(case):
    sched, mu = _scheduler(case, stochastic=False)  # Flow-GRPO's pipelines: the default config
    sched.set_timesteps(STEPS, **_mu(mu))
    T = flow_sde_from_sigmas(sched.timesteps, sched.sigmas, noise_level=NOISE_LEVEL)
    v = velocity()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, D, generator=g)
    for k, t in enumerate(sched.timesteps):
        kk = torch.full((64,), k)
        out, z = v(x, t.expand(64)), torch.randn(64, D, generator=g)
        want = flow_grpo_step(out, t, x, sched.sigmas, sched.timesteps, z)
        got = T.mean_from_x0(x, T.x0_from_output(x, out, kk), kk) + T.coef("std", kk, x) * z
        torch.testing.assert_close(got, want, rtol=5e-6, atol=5e-6)
        x = want
    assert not bool(T.deterministic.any())  # Flow-GRPO's last step is stochastic too


# ------------------------------------------------------------------ the law
def reference_loop(family: str, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The ancestral chain from the formulas (no tables): FlowMatch Euler's stochastic step
    x0 = x - s v, x' = (1 - s') x0 + s' z; or Flow-GRPO's Euler-Maruyama step."""
    ts, sig = flow_sigmas(STEPS)
    sig = sig.double()
    v = velocity()
    for k in range(STEPS):
        s, s_next = sig[k], sig[k + 1]
        out = v(x, ts[k].double().expand(x.shape[0]))
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        if family == "flow-euler":
            x = (1 - s_next) * (x - s * out) + s_next * z
        else:
            sd = NOISE_LEVEL * math.sqrt(s / (1 - (sig[1] if s == 1 else s)))
            dt = s_next - s
            x = x * (1 + sd**2 / (2 * s) * dt) + out * (1 + sd**2 * (1 - s) / (2 * s)) * dt
            x = x + sd * math.sqrt(-dt) * z
    return x


_REFERENCE: dict = {}


def reference(family: str) -> torch.Tensor:
    if family not in _REFERENCE:
        g = torch.Generator().manual_seed(7)
        x = torch.randn(N_CHAINS, D, generator=g, dtype=torch.float64)
        _REFERENCE[family] = reference_loop(family, x, g)
    return _REFERENCE[family]


def transitions(family: str) -> GaussianTransitions:
    if family == "flow-euler":
        return flow_euler_transitions(STEPS)
    return flow_sde_transitions(STEPS, noise_level=NOISE_LEVEL)


def law_p(x, y) -> float:
    """Per-coordinate KS and the energy permutation test, Bonferroni over the two."""
    x, y = x.numpy(), y.numpy()
    return bonferroni(
        [per_coordinate_ks_pvalue(x, y), energy_distance_pvalue(x, y, n_resamples=499)]
    )


def speculative(T, path="static", window=4, freeze="x0", seed=2, **kw) -> torch.Tensor:
    sampler = SpeculativeSampler(
        velocity(), T, FrozenTargetDraft(freeze), window, path=path, compile=False, **kw
    )
    g = torch.Generator().manual_seed(seed)
    res = sampler.sample(N_CHAINS, (D,), generator=g, dtype=torch.float64)
    return res.samples, res.stats


def cost(states) -> float:  # "auto" windows from a fixed cost model: runs repeat exactly
    return 1e-2 + 1e-8 * states  # latency-bound (a GPU): speculating pays


LAW_CASES = [  # (family, path, window, freeze)
    ("flow-euler", "static", 4, "x0"),
    ("flow-euler", "ragged", "auto", "eps"),
    ("flow-euler", "ragged", 3, "x0"),
    ("flow-euler", "static", "auto", "eps"),
    ("flow-sde", "static", 4, "eps"),
    ("flow-sde", "ragged", "auto", "x0"),
    ("flow-sde", "ragged", 5, "eps"),
    ("flow-sde", "static", "auto", "x0"),
]


@pytest.mark.parametrize("family,path,window,freeze", LAW_CASES, ids=str)
def test_speculative_law_is_the_ancestral_chain(family, path, window, freeze):
    extra = {"cost": cost} if window == "auto" else {}
    x, st = speculative(transitions(family), path, window, freeze, **extra)
    p = law_p(x, reference(family))
    assert p > ALPHA, f"{family} {path} {window} {freeze}: law differs (p={p:.3g})"
    # it speculated: committed windows, fewer sequential calls than steps per chain on average
    assert st.speculative_steps > 0 and sum(st.chain_rounds) < STEPS * N_CHAINS


@pytest.mark.parametrize("family", ["flow-euler", "flow-sde"])
def test_power_always_accepting_verifier_is_rejected(family):
    x, _ = speculative(transitions(family), "ragged", 4, "x0", verify_fn=verify_always_accept)
    assert law_p(x, reference(family)) < ALPHA


@pytest.mark.parametrize("family", ["flow-euler", "flow-sde"])
def test_power_wrong_std_is_rejected(family):
    """The chain with every step's std 1.5 times its own (the means kept) is another law."""
    T = transitions(family)
    wrong = GaussianTransitions(
        T.timesteps,
        T.c_x0,
        T.c_x,
        1.5 * T.std,
        T.model_alpha,
        T.model_sigma,
        prediction=T.prediction,
        name="wrong std",
    )
    x, _ = speculative(wrong, "ragged", 4, "x0")
    assert law_p(x, reference(family)) < ALPHA


def test_triton_round_gives_the_cpp_rounds_samples():
    """The static round on the Triton backend (interpreted on CPU) draws the same counter-based
    noise as the C++ one: the same samples to rounding, frozen eps included (X0 rows 0 at t = 1)."""
    T = flow_euler_transitions(6, shift=3.0)
    out = {}
    for backend in ("cpp", "triton"):
        s = SpeculativeSampler(
            velocity(), T, FrozenTargetDraft("eps"), 3, path="static", backend=backend
        )
        out[backend] = s.sample(6, (D,), generator=torch.Generator().manual_seed(5)).samples
    assert torch.isfinite(out["cpp"]).all()
    torch.testing.assert_close(out["triton"], out["cpp"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ models and families
def flow_model() -> models.EmbeddedModel:
    return models.EmbeddedModel("gmm-flow", velocity(), None, (D,), None, "flow_prediction")


def test_embedded_flow_model_builds_the_flow_families():
    m = flow_model()
    assert m.flow
    T = m.transitions(STEPS)  # default: flow-euler
    assert torch.equal(T.std, flow_euler_transitions(STEPS).std)
    S = m.transitions(STEPS, "flow-sde", noise_level=0.3, shift=2.0)
    assert torch.equal(S.c_x0, flow_sde_transitions(STEPS, noise_level=0.3, shift=2.0).c_x0)
    with pytest.raises(TypeError, match="num_train_timesteps.*the model's own"):
        m.transitions(STEPS, "flow-euler", num_train_timesteps=500)


# ------------------------------------------------------------------ refusals
def _one_line(call, exc, match):
    with pytest.raises(exc) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg
    assert match in msg, msg


T_S = flow_sigmas(4)
REFUSALS = [
    (lambda: flow_euler_transitions(0), ValueError, "num_inference_steps must be"),
    (lambda: flow_euler_transitions(4, shift=0), ValueError, "shift must be"),
    (lambda: flow_euler_transitions(4, shift="3"), TypeError, "shift must be"),
    (lambda: flow_euler_transitions(4, prediction="epsilon"), ValueError, "prediction must be"),
    (lambda: flow_sde_transitions(4, noise_level=-0.1), ValueError, "noise_level must be"),
    (lambda: flow_sde_transitions(4, noise_level=True), TypeError, "noise_level must be"),
    (lambda: flow_sde_transitions(4, num_train_timesteps=2.5), TypeError, "num_train_timesteps"),
    (lambda: flow_euler_from_sigmas(T_S[0], T_S[1][:-1]), ValueError, "sigmas must have 5"),
    (lambda: flow_euler_from_sigmas(T_S[0], T_S[1] * 2), ValueError, "sigmas must be in [0, 1]"),
    (
        lambda: flow_sde_from_sigmas(T_S[0], T_S[1].flip(0)),
        ValueError,
        "sigmas must be > 0 before the final entry",
    ),
    (
        lambda: flow_sde_from_sigmas(T_S[0], torch.tensor([1.0, 1.0, 0.5, 0.2, 0.0])),
        ValueError,
        "sigmas[1] must be < 1",
    ),
    (
        lambda: flow_sde_from_sigmas(T_S[0], torch.tensor([0.9, 0.5, 0.7, 0.2, 0.0])),
        ValueError,
        "sigmas must be non-increasing",
    ),
    (
        lambda: GaussianTransitions([1.0], 1, 0, 1, 0.0, 1.0, prediction="epsilon"),
        ValueError,
        "model_alpha must be > 0 for epsilon-prediction",
    ),
    (
        lambda: GaussianTransitions([1.0], 1, 0, 1, 0.5, 0.6, prediction="flow_prediction"),
        ValueError,
        "model_alpha must be 1 - model_sigma for flow_prediction",
    ),
]


@pytest.mark.parametrize("case", range(len(REFUSALS)))
def test_bad_builder_input_is_refused_in_one_line(case):
    _one_line(*REFUSALS[case])


def test_vp_builders_refuse_flow_prediction():
    from specdiff_kernels.sampling.transitions import ddpm_transitions, dpmsolver_sde_transitions

    for build in (ddpm_transitions, dpmsolver_sde_transitions):
        _one_line(
            lambda: build(num_inference_steps=4, prediction="flow_prediction"),
            ValueError,
            "prediction must be one of ('epsilon', 'sample', 'v_prediction')",
        )


ADAPTER_REFUSALS = [
    (
        lambda: adapter.diffusers_transitions(FlowMatchEuler(), 4),
        ValueError,
        "stochastic_sampling=False is deterministic",
    ),
    (
        lambda: adapter.diffusers_transitions(
            FlowMatchEuler(stochastic_sampling=True, use_dynamic_shifting=True), 4
        ),
        ValueError,
        "mu must be given",
    ),
    (
        lambda: adapter.diffusers_transitions(FlowMatchEuler(stochastic_sampling=True), 4, mu=1),
        ValueError,
        "mu applies to FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=True only",
    ),
    (
        lambda: adapter.diffusers_transitions(diffusers.DDPMScheduler(), 4, mu=1.0),
        ValueError,
        "mu applies to",
    ),
    (
        lambda: adapter.diffusers_transitions(
            FlowMatchEuler(stochastic_sampling=True, use_dynamic_shifting=True), 4, mu="1"
        ),
        TypeError,
        "mu must be",
    ),
    (
        lambda: adapter.diffusers_transitions(
            FlowMatchEuler(stochastic_sampling=True, invert_sigmas=True), 4
        ),
        ValueError,
        "invert_sigmas=True is not supported",
    ),
    (
        lambda: adapter.diffusers_transitions(FlowMatchEuler(stochastic_sampling=True), 4, eta=1),
        ValueError,
        "eta applies to DDIMScheduler only",
    ),
    (
        lambda: adapter.diffusers_transitions(diffusers.FlowMatchHeunDiscreteScheduler(), 4),
        TypeError,
        "FlowMatchHeunDiscreteScheduler: deterministic",
    ),
]


@pytest.mark.parametrize("case", range(len(ADAPTER_REFUSALS)))
def test_bad_scheduler_is_refused_in_one_line(case):
    _one_line(*ADAPTER_REFUSALS[case])


@pytest.mark.parametrize("pipeline", ["digits", "patches"])
def test_cli_refuses_a_flow_family_on_a_diffusion_pipeline(pipeline):
    from specdiff_kernels.cli.sample import PipelineError, resolve_pipeline

    for name in ("flow-euler", "flow-sde"):
        _one_line(lambda: resolve_pipeline(pipeline, name, 10, None), PipelineError, name)
        with pytest.raises(PipelineError, match="flow"):
            resolve_pipeline(pipeline, name, 10, None)

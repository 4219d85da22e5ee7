"""diffusers' SDE-DPM-Solver++ ("DPM++ 2M SDE") through the adapter: every step of the tabulated
multistep chain equals ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").step``
with the same noise, for every sigma option, prediction type and solver type; the refusals are
one line naming the option.

The network is a fixed analytic function (the adapter only sees its outputs), the states float64.

Tolerance: diffusers casts the state to float32 and builds its coefficients in float32 from its
float32 sigmas (lambda = log(alpha / sigma) up to |10|, so h and every exp(-h) carry ~1e-6
relative error, amplified by 1 / r in the second-order term); the tables are float64 from the
same float32 sigmas. The measured worst case over this matrix is ~5e-6 relative to (1 + |x|);
ATOL = RTOL = 2e-5 (~170 float32 ulps) passes it, while every deliberately wrong variant below
(the previous prediction dropped or replaced, the other solver type, no thresholding of the
previous prediction) is off by > 1e-3.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from tiny_diffusers import tiny_unet  # noqa: E402

from specdiff_kernels.integrations.diffusers import (  # noqa: E402
    diffusers_transitions,
    from_pipeline,
    scheduler_from_config,
)
from specdiff_kernels.sampling.transitions import (  # noqa: E402
    GaussianTransitions,
    dpmsolver_sde_transitions,
)

ATOL = RTOL = 2e-5
SHAPE = (3, 1, 4, 4)

SIGMA_OPTIONS = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "lu-lambdas": {"use_lu_lambdas": True},
    "final-sigma-min": {"final_sigmas_type": "sigma_min"},
    "karras-sigma-min": {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "no-lower-order-final": {"lower_order_final": False},
    "euler-at-final": {"euler_at_final": True},
    "order-1": {"solver_order": 1},
    "cosine-karras": {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True},
    "scaled-linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "zero-snr": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    "cosine-lambda-clipped": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SOLVER_TYPES = ("midpoint", "heun")


def net(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed smooth 'network' output (eps, v or x0 alike): O(1), depends on x and t."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.8 * torch.tanh(x) + 0.3 * torch.cos(3 * x + t / 100)


def dpm(**options) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **options)


def run_both(sched, tr, n: int, seed: int = 0, *, out_scale: float = 1.0, wrong=None):
    """Walk diffusers' own loop; at every step compare its ``step`` with the tables' step from
    the same state, network output, previous x0-hat and noise. Returns the largest error of
    ``wrong(tr, x, x0, k, prev)`` (a deliberately wrong mean), if given."""
    sched.set_timesteps(n)
    # from step 0: diffusers starts a loop whose first timestep repeats (cosine + Karras:
    # 998, 998, ...) at its SECOND occurrence (index_for_timestep), i.e. skips a step
    sched.set_begin_index(0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    prev = torch.zeros_like(x)  # no previous prediction at step 0 (c_prev[0] = 0)
    B = SHAPE[0]
    worst_wrong = 0.0
    for i, t in enumerate(sched.timesteps):
        out = out_scale * net(x, t)
        k = torch.full((B,), i)
        x0 = tr.x0_from_output(x, out, k)
        noise = torch.randn(SHAPE, generator=g)  # float32, as diffusers casts it
        expect = sched.step(out, t, x, variance_noise=noise).prev_sample
        got = tr.mean_from_x0(x, x0, k, prev) + float(tr.std[i]) * noise.double()
        torch.testing.assert_close(
            got, expect, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {i} of {n}: {m}"
        )
        if wrong is not None:
            bad = wrong(tr, x, x0, k, prev) + float(tr.std[i]) * noise.double()
            worst_wrong = max(worst_wrong, float((bad - expect).abs().max()))
        prev, x = x0, expect
    return worst_wrong


@pytest.mark.parametrize("n", [10, 20])
@pytest.mark.parametrize("solver_type", SOLVER_TYPES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("option", list(SIGMA_OPTIONS))
def test_every_step_matches_scheduler_step(option, prediction, solver_type, n):
    make = lambda: dpm(  # noqa: E731
        prediction_type=prediction, solver_type=solver_type, **SIGMA_OPTIONS[option]
    )
    if option == "karras-sigma-min" and solver_type == "heun" and n >= 15:
        # sigma_min twice at the end: diffusers' own second-order Heun step is NaN (0 / 0)
        with pytest.raises(ValueError, match="sigmas repeat .*use final_sigmas_type='zero'"):
            diffusers_transitions(make(), n)
        sched = make()
        sched.set_timesteps(n)
        x = torch.ones(SHAPE)
        for t in sched.timesteps:
            x = sched.step(net(x, t).float(), t, x, variance_noise=torch.zeros(SHAPE)).prev_sample
        assert bool(x.isnan().all())
        return
    tr = diffusers_transitions(make(), n)
    sched = make()
    sched.set_timesteps(n)
    assert tr.num_steps == n and torch.equal(tr.timesteps, sched.timesteps)
    order = sched.config.solver_order
    assert tr.multistep == (order == 2 and n > 1)
    run_both(sched, tr, n)


def test_second_order_steps_follow_diffusers_rule():
    """Step 0 is first order; the last is first order below 15 steps (lower_order_final), at a
    final sigma of 0, or with euler_at_final; every other step is second order."""
    for n, opts, last_second in [
        (10, {"final_sigmas_type": "sigma_min"}, False),
        (20, {"final_sigmas_type": "sigma_min"}, True),
        (20, {"final_sigmas_type": "sigma_min", "euler_at_final": True}, False),
        (10, {"final_sigmas_type": "sigma_min", "lower_order_final": False}, True),
        (20, {}, False),  # final sigma 0: the last step is the x0-hat, deterministic
    ]:
        tr = diffusers_transitions(dpm(**opts), n)
        second = (tr.c_prev != 0).tolist()
        assert second == [False] + [True] * (n - 2) + [last_second], (n, opts)
        assert (float(tr.std[-1]) == 0.0) == (opts.get("final_sigmas_type") != "sigma_min")


WRONG = {
    # the previous prediction dropped: a first-order chain
    "no-prev": lambda tr, x, x0, k, prev: tr.mean_from_x0(x, x0, k, x0),
    # the previous prediction zeroed
    "zero-prev": lambda tr, x, x0, k, prev: tr.mean_from_x0(x, x0, k, torch.zeros_like(prev)),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_a_wrong_previous_term_fails(wrong):
    """The comparison can fail: a chain that mishandles the previous x0-hat is far off."""
    sched = dpm(use_karras_sigmas=True)
    tr = diffusers_transitions(sched, 20)
    assert run_both(sched, tr, 20, wrong=WRONG[wrong]) > 1e-3


def test_the_other_solver_type_fails():
    heun = diffusers_transitions(dpm(solver_type="heun"), 20)
    with pytest.raises(AssertionError, match="step 1 of 20"):
        run_both(dpm(solver_type="midpoint"), heun, 20)


# ------------------------------------------------------------------------- thresholding
@pytest.mark.parametrize("prediction", ["sample", "epsilon"])
def test_thresholding_thresholds_the_previous_prediction_too(prediction):
    """diffusers keeps the thresholded x0 in model_outputs: the non-affine (ragged-path)
    transitions threshold both predictions; thresholding only the current one is wrong."""
    make = lambda: dpm(  # noqa: E731
        prediction_type=prediction, thresholding=True, sample_max_value=1.5
    )
    tr = diffusers_transitions(make(), 20)
    assert tr.affine is False and tr.multistep and "threshold" in tr.name

    def current_only(tr, x, x0, k, prev):
        return GaussianTransitions.mean_from_x0(tr, x, tr.threshold(x0), k, prev)

    # outputs scaled so that the quantile exceeds 1 (else thresholding is a plain clip)
    assert run_both(make(), tr, 20, out_scale=2.5, wrong=current_only) > 1e-3


def test_thresholding_is_per_sample_in_a_window():
    """Window-shaped states [w, L, *E] with steps [w, L]: each (chain, slot) thresholded alone."""
    tr = diffusers_transitions(dpm(prediction_type="sample", thresholding=True), 20)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 1, 4, 4, generator=g, dtype=torch.float64)
    x0, prev = 3 * torch.randn_like(x), 3 * torch.randn_like(x)
    k = torch.tensor([[1, 2, 3], [5, 6, 7]])
    window = tr.mean_from_x0(x, x0, k, prev)
    for w in range(2):
        for j in range(3):
            one = tr.mean_from_x0(
                x[w, j : j + 1], x0[w, j : j + 1], k[w, j : j + 1], prev[w, j : j + 1]
            )
            torch.testing.assert_close(window[w, j : j + 1], one)


# ------------------------------------------------------------------------- native builder
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("n", [10, 20, 50])
def test_native_builder_equals_adapter(karras, spacing, final, n):
    opts = {"use_karras_sigmas": karras, "timestep_spacing": spacing, "final_sigmas_type": final}
    sched = dpm(**opts)
    adapter = diffusers_transitions(sched, n)
    native = dpmsolver_sde_transitions(
        n,
        alphas_cumprod=sched.alphas_cumprod.double(),
        sigma_schedule="karras" if karras else "default",
        spacing=spacing,
        final_sigmas_type=final,
    )
    assert torch.equal(native.timesteps, adapter.timesteps)
    # the native sigmas are float64 rounded to float32, diffusers' float32 throughout: they may
    # differ by one float32 ulp (6e-8), which 1 / r amplifies to ~4e-6 in the multistep terms
    for name in ("c_x0", "c_x", "c_prev", "std", "model_alpha", "model_sigma"):
        torch.testing.assert_close(
            getattr(native, name), getattr(adapter, name), rtol=1e-5, atol=1e-12, msg=name
        )


# ------------------------------------------------------------------------- refusals
REFUSED = [
    (
        lambda: DPMSolverMultistepScheduler(),
        ValueError,
        "DPMSolverMultistepScheduler config: algorithm_type='dpmsolver++' is deterministic (no "
        "noise to speculate over); use algorithm_type='sde-dpmsolver++'",
    ),
    (
        lambda: DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
        ),
        ValueError,
        "algorithm_type='dpmsolver' is deterministic (no noise to speculate over); use "
        "algorithm_type='sde-dpmsolver++'",
    ),
    (
        lambda: DPMSolverMultistepScheduler(
            algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"
        ),
        ValueError,
        "algorithm_type='sde-dpmsolver' is not supported",
    ),
    (lambda: dpm(solver_order=3), ValueError, "solver_order=3 is not supported"),
    (lambda: dpm(use_flow_sigmas=True), ValueError, "use_flow_sigmas=True is not supported"),
    (
        lambda: dpm(prediction_type="flow_prediction"),
        ValueError,
        "prediction_type='flow_prediction' is not supported",
    ),
    (lambda: dpm(variance_type="learned_range"), ValueError, "variance_type='learned_range'"),
    (
        lambda: UniPCMultistepScheduler(),
        TypeError,
        "unsupported scheduler UniPCMultistepScheduler: deterministic (no noise to speculate "
        "over); use DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')",
    ),
    (
        lambda: EulerDiscreteScheduler(),
        ValueError,
        "EulerDiscreteScheduler: pass s_churn > 0 (diffusers' step takes it per call); without "
        "churn its step is deterministic (no noise to speculate over): use "
        "EulerAncestralDiscreteScheduler, or pass s_churn",
    ),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("make,kind,message", REFUSED, ids=[m[:40] for _, _, m in REFUSED])
def test_refusals_are_one_line_naming_the_option(make, kind, message):
    with pytest.raises(kind) as err:
        diffusers_transitions(make(), 10)
    text = str(err.value)
    assert message in text and "\n" not in text
    if "solver_order" in message:
        assert text.endswith("use solver_order=2")


def test_ddim_eta_zero_says_the_same():
    with pytest.raises(ValueError, match=r"deterministic \(no noise to speculate over\)") as err:
        diffusers_transitions(DDIMScheduler(), 10, eta=0.0)
    assert "\n" not in str(err.value)


def test_scheduler_from_config():
    cfg = dict(DPMSolverMultistepScheduler().config)
    with pytest.raises(ValueError, match="algorithm_type='dpmsolver\\+\\+' is deterministic"):
        scheduler_from_config({**cfg, "_class_name": "DPMSolverMultistepScheduler"})
    sched = scheduler_from_config(
        {**cfg, "algorithm_type": "sde-dpmsolver++", "_class_name": "DPMSolverMultistepScheduler"}
    )
    assert isinstance(sched, DPMSolverMultistepScheduler)
    with pytest.raises(TypeError, match="UniPCMultistepScheduler: deterministic"):
        scheduler_from_config(dict(UniPCMultistepScheduler().config), "UniPCMultistepScheduler")


def test_from_pipeline_with_a_dpm_scheduler():
    unet = tiny_unet(channels=1)
    pipe = DDPMPipeline(unet=unet, scheduler=dpm(use_karras_sigmas=True))
    model, tr = from_pipeline(pipe, 12)
    assert tr.multistep and tr.num_steps == 12 and pipe.scheduler.num_inference_steps is None
    with torch.no_grad():
        x = torch.randn(2, 1, 8, 8)
        k = torch.tensor([0, 5])
        assert tr.mean(model, x, k, torch.zeros_like(x)).shape == x.shape


@pytest.mark.parametrize(
    "key,value,known",
    [("algorithm_type", "foo", "'sde-dpmsolver++'"), ("solver_type", "bar", "'midpoint', 'heun'")],
)
def test_unknown_algorithm_or_solver_type_in_a_config(key, value, known):
    """diffusers raises NotImplementedError for these: one line naming the key, not the
    beta_schedule."""
    cfg = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}
    with pytest.raises(ValueError) as err:
        scheduler_from_config({**cfg, key: value})
    assert str(err.value) == (
        f"DPMSolverMultistepScheduler config: {key} {value!r} is not implemented by diffusers; "
        f"use {known}"
    )

"""Every public argument of the transitions constructors, the embedded-model factory and the
diffusers adapter is checked up front: a bad value raises ValueError (range, consistency) or
TypeError (type) with a ONE-line message that names the argument.

Table-driven: each case is ``(call, exception type, the name the message must contain)``; the
cases are what a new user tries (0, negative, fractional, bool and string step counts, NaN,
typos in option strings, schedules that are not schedules, objects that are not schedulers).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from specdiff_kernels import models
from specdiff_kernels.sampling.langevin import langevin_transitions
from specdiff_kernels.sampling.transitions import (
    GaussianTransitions,
    alphas_cumprod_from_betas,
    ddim_from_schedule,
    ddim_transitions,
    ddpm_transitions,
    euler_ancestral_from_sigmas,
    euler_ancestral_transitions,
    make_betas,
    respaced_timesteps,
    round_tables,
    stochastic_runs,
)

NAN = math.nan
ABAR = alphas_cumprod_from_betas(make_betas())
N3 = dict(timesteps=[20, 10, 0], c_x0=[0.1] * 3, c_x=[0.9] * 3, std=[0.1, 0.1, 0.0])
VP3 = dict(model_alpha=[0.5] * 3, model_sigma=[0.75**0.5] * 3)


def gt(**overrides):
    """GaussianTransitions over three valid steps, with some arguments replaced."""
    kw = {**N3, **VP3, **overrides}
    args = [kw.pop(k) for k in ("timesteps", "c_x0", "c_x", "std", "model_alpha", "model_sigma")]
    return GaussianTransitions(*args, **kw)


@functools.lru_cache(maxsize=None)
def gmm():
    return models.load("gmm", dim=2, components=2)


def abar_with(index, value):
    a = ABAR.clone()
    a[index] = value
    return a


def bad_steps(builder, name="num_inference_steps"):
    """The step counts a new user tries, for a builder ``builder(n)``."""
    return {
        "0": (lambda: builder(0), ValueError, name),
        "neg": (lambda: builder(-3), ValueError, name),
        "float": (lambda: builder(2.5), TypeError, name),
        "bool": (lambda: builder(True), TypeError, name),
        "str": (lambda: builder("50"), TypeError, name),
        "over_T": (lambda: builder(1001), ValueError, name),
    }


def prefixed(prefix, cases):
    return {f"{prefix}_{k}": v for k, v in cases.items()}


# --------------------------------------------------------------------------- transitions
CASES = {
    # Langevin's chain: a step count is an int (2.5 was truncated to 2, True meant 1)
    "langevin_steps_float": (
        lambda: langevin_transitions(0.1, num_steps=2.5),
        TypeError,
        "num_steps",
    ),
    "langevin_steps_bool": (
        lambda: langevin_transitions(0.1, num_steps=True),
        TypeError,
        "num_steps",
    ),
    "langevin_steps_str": (
        lambda: langevin_transitions(0.1, num_steps="5"),
        TypeError,
        "num_steps",
    ),
    "langevin_init_std_str": (
        lambda: langevin_transitions(0.1, num_steps=5, init_std="2"),
        TypeError,
        "init_std",
    ),
    # DDIM's eta above 1: the step's variance can exceed 1 - abar_prev (no real direction term)
    "ddim_eta_above_1": (
        lambda: ddim_transitions(ABAR, num_inference_steps=20, eta=1.5),
        ValueError,
        "eta",
    ),
    # make_betas
    "make_betas_schedule_typo": (lambda: make_betas("bogus"), ValueError, "schedule"),
    "make_betas_schedule_int": (lambda: make_betas(3), TypeError, "schedule"),
    "make_betas_T_0": (
        lambda: make_betas(num_train_timesteps=0),
        ValueError,
        "num_train_timesteps",
    ),
    "make_betas_T_neg": (
        lambda: make_betas(num_train_timesteps=-1),
        ValueError,
        "num_train_timesteps",
    ),
    "make_betas_T_float": (
        lambda: make_betas(num_train_timesteps=2.5),
        TypeError,
        "num_train_timesteps",
    ),
    "make_betas_T_bool": (
        lambda: make_betas(num_train_timesteps=True),
        TypeError,
        "num_train_timesteps",
    ),
    "make_betas_T_str": (
        lambda: make_betas(num_train_timesteps="1000"),
        TypeError,
        "num_train_timesteps",
    ),
    "make_betas_start_neg": (lambda: make_betas(beta_start=-0.1), ValueError, "beta_start"),
    "make_betas_start_0": (lambda: make_betas(beta_start=0.0), ValueError, "beta_start"),
    "make_betas_start_nan": (lambda: make_betas(beta_start=NAN), ValueError, "beta_start"),
    "make_betas_end_1": (lambda: make_betas(beta_end=1.0), ValueError, "beta_end"),
    "make_betas_end_str": (lambda: make_betas(beta_end="0.02"), TypeError, "beta_end"),
    "make_betas_scaled_end_nan": (
        lambda: make_betas("scaled_linear", beta_end=NAN),
        ValueError,
        "beta_end",
    ),
    # alphas_cumprod_from_betas
    "betas_nan": (lambda: alphas_cumprod_from_betas([0.1, NAN]), ValueError, "betas"),
    "betas_neg": (lambda: alphas_cumprod_from_betas([-0.1, 0.1]), ValueError, "betas"),
    "betas_1": (lambda: alphas_cumprod_from_betas([0.5, 1.0]), ValueError, "betas"),
    "betas_2d": (lambda: alphas_cumprod_from_betas([[0.1, 0.2]]), ValueError, "betas"),
    "betas_empty": (lambda: alphas_cumprod_from_betas([]), ValueError, "betas"),
    "betas_str": (lambda: alphas_cumprod_from_betas("0.1"), TypeError, "betas"),
    # respaced_timesteps
    "respaced_spacing_typo": (lambda: respaced_timesteps(1000, 10, "bogus"), ValueError, "spacing"),
    "respaced_T_0": (lambda: respaced_timesteps(0, 10), ValueError, "num_train_timesteps"),
    "respaced_offset_neg": (
        lambda: respaced_timesteps(1000, 10, steps_offset=-1),
        ValueError,
        "steps_offset",
    ),
    "respaced_offset_float": (
        lambda: respaced_timesteps(1000, 10, steps_offset=1.5),
        TypeError,
        "steps_offset",
    ),
    "respaced_offset_past_T": (
        lambda: respaced_timesteps(1000, 10, steps_offset=100),
        ValueError,
        "steps_offset",
    ),
    **prefixed("respaced_n", bad_steps(lambda n: respaced_timesteps(1000, n))),
    # ddpm_transitions
    **prefixed("ddpm_n", bad_steps(lambda n: ddpm_transitions(ABAR, num_inference_steps=n))),
    "ddpm_prediction_typo": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, prediction="eps"),
        ValueError,
        "prediction",
    ),
    "ddpm_prediction_none": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, prediction=None),
        TypeError,
        "prediction",
    ),
    "ddpm_variance_typo": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, variance="small"),
        ValueError,
        "variance",
    ),
    "ddpm_clip_0": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, clip_sample=0),
        ValueError,
        "clip_sample",
    ),
    "ddpm_clip_neg": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, clip_sample=-1.0),
        ValueError,
        "clip_sample",
    ),
    "ddpm_clip_nan": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, clip_sample=NAN),
        ValueError,
        "clip_sample",
    ),
    "ddpm_clip_str": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, clip_sample="1.0"),
        TypeError,
        "clip_sample",
    ),
    "ddpm_clip_bool": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, clip_sample=True),
        TypeError,
        "clip_sample",
    ),
    "ddpm_abar_nan": (
        lambda: ddpm_transitions(abar_with(5, NAN), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_increasing": (
        lambda: ddpm_transitions(ABAR.flip(0), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_above_1": (
        lambda: ddpm_transitions(abar_with(0, 1.5), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_0": (
        lambda: ddpm_transitions(abar_with(-1, 0.0), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_2d": (
        lambda: ddpm_transitions(ABAR[None], num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_str": (
        lambda: ddpm_transitions("abc", num_inference_steps=10),
        TypeError,
        "alphas_cumprod",
    ),
    "ddpm_abar_and_betas": (
        lambda: ddpm_transitions(ABAR, betas=make_betas(), num_inference_steps=10),
        ValueError,
        "betas",
    ),
    "ddpm_betas_nan": (
        lambda: ddpm_transitions(betas=[0.1, NAN, 0.2], num_inference_steps=2),
        ValueError,
        "betas",
    ),
    "ddpm_betas_1": (
        lambda: ddpm_transitions(betas=[0.1, 1.0, 0.2], num_inference_steps=2),
        ValueError,
        "betas",
    ),
    "ddpm_timesteps_and_n": (
        lambda: ddpm_transitions(ABAR, timesteps=[9, 5, 0], num_inference_steps=10),
        ValueError,
        "timesteps",
    ),
    "ddpm_timesteps_float": (
        lambda: ddpm_transitions(ABAR, timesteps=[9.5, 5, 0]),
        TypeError,
        "timesteps",
    ),
    "ddpm_timesteps_past_T": (
        lambda: ddpm_transitions(ABAR, timesteps=[1000, 5, 0]),
        ValueError,
        "timesteps",
    ),
    "ddpm_timesteps_increasing": (
        lambda: ddpm_transitions(ABAR, timesteps=[0, 5, 9]),
        ValueError,
        "timesteps",
    ),
    "ddpm_timesteps_empty": (lambda: ddpm_transitions(ABAR, timesteps=[]), ValueError, "timesteps"),
    "ddpm_timesteps_2d": (
        lambda: ddpm_transitions(ABAR, timesteps=[[9, 5, 0]]),
        ValueError,
        "timesteps",
    ),
    "ddpm_spacing_typo": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, spacing="bogus"),
        ValueError,
        "spacing",
    ),
    "ddpm_offset_neg": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, steps_offset=-1),
        ValueError,
        "steps_offset",
    ),
    "ddpm_offset_bool": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, steps_offset=True),
        TypeError,
        "steps_offset",
    ),
    "ddpm_offset_ignored_by_linspace": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, spacing="linspace", steps_offset=1),
        ValueError,
        "steps_offset",
    ),
    "ddpm_offset_without_respacing": (
        lambda: ddpm_transitions(ABAR, steps_offset=1),
        ValueError,
        "steps_offset",
    ),
    "euler_offset_ignored_by_trailing": (
        lambda: euler_ancestral_transitions(ABAR, spacing="trailing", steps_offset=1),
        ValueError,
        "steps_offset",
    ),
    "ddpm_offset_past_T": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, steps_offset=100),
        ValueError,
        "steps_offset",
    ),
    # ddim_transitions
    **prefixed("ddim_n", bad_steps(lambda n: ddim_transitions(ABAR, num_inference_steps=n))),
    "ddim_n_none": (
        lambda: ddim_transitions(ABAR, num_inference_steps=None),
        TypeError,
        "num_inference_steps",
    ),
    "ddim_eta_neg": (lambda: ddim_transitions(ABAR, eta=-1.0), ValueError, "eta"),
    "ddim_eta_nan": (lambda: ddim_transitions(ABAR, eta=NAN), ValueError, "eta"),
    "ddim_eta_inf": (lambda: ddim_transitions(ABAR, eta=math.inf), ValueError, "eta"),
    "ddim_eta_str": (lambda: ddim_transitions(ABAR, eta="0.5"), TypeError, "eta"),
    "ddim_eta_bool": (lambda: ddim_transitions(ABAR, eta=True), TypeError, "eta"),
    "ddim_eta_none": (lambda: ddim_transitions(ABAR, eta=None), TypeError, "eta"),
    "ddim_set_alpha_str": (
        lambda: ddim_transitions(ABAR, set_alpha_to_one="no"),
        TypeError,
        "set_alpha_to_one",
    ),
    "ddim_clipped_output_str": (
        lambda: ddim_transitions(ABAR, use_clipped_model_output="yes"),
        TypeError,
        "use_clipped_model_output",
    ),
    "ddim_clipped_output_without_clip": (
        lambda: ddim_transitions(ABAR, use_clipped_model_output=True),
        ValueError,
        "use_clipped_model_output",
    ),
    "ddim_prediction_typo": (
        lambda: ddim_transitions(ABAR, prediction="v"),
        ValueError,
        "prediction",
    ),
    "ddim_clip_0": (lambda: ddim_transitions(ABAR, clip_sample=0.0), ValueError, "clip_sample"),
    "ddim_spacing_typo": (lambda: ddim_transitions(ABAR, spacing="linear"), ValueError, "spacing"),
    "ddim_abar_and_betas": (
        lambda: ddim_transitions(ABAR, betas=make_betas()),
        ValueError,
        "betas",
    ),
    "ddim_abar_increasing": (lambda: ddim_transitions(ABAR.flip(0)), ValueError, "alphas_cumprod"),
    # euler_ancestral_transitions
    **prefixed(
        "euler_n", bad_steps(lambda n: euler_ancestral_transitions(ABAR, num_inference_steps=n))
    ),
    "euler_init_std_0": (
        lambda: euler_ancestral_transitions(ABAR, init_std=0.0),
        ValueError,
        "init_std",
    ),
    "euler_init_std_nan": (
        lambda: euler_ancestral_transitions(ABAR, init_std=NAN),
        ValueError,
        "init_std",
    ),
    "euler_init_std_str": (
        lambda: euler_ancestral_transitions(ABAR, init_std="1"),
        TypeError,
        "init_std",
    ),
    "euler_spacing_typo": (
        lambda: euler_ancestral_transitions(ABAR, spacing="bogus"),
        ValueError,
        "spacing",
    ),
    "euler_prediction_typo": (
        lambda: euler_ancestral_transitions(ABAR, prediction="eps"),
        ValueError,
        "prediction",
    ),
    "euler_offset_past_T": (
        lambda: euler_ancestral_transitions(
            ABAR, num_inference_steps=10, spacing="leading", steps_offset=200
        ),
        ValueError,
        "steps_offset",
    ),
    "euler_abar_nan": (
        lambda: euler_ancestral_transitions(abar_with(3, NAN)),
        ValueError,
        "alphas_cumprod",
    ),
    "euler_abar_and_betas": (
        lambda: euler_ancestral_transitions(ABAR, betas=make_betas()),
        ValueError,
        "betas",
    ),
    # GaussianTransitions
    "gt_prediction_typo": (lambda: gt(prediction="eps"), ValueError, "prediction"),
    "gt_clip_0": (lambda: gt(clip_sample=0.0), ValueError, "clip_sample"),
    "gt_clip_str": (lambda: gt(clip_sample="1"), TypeError, "clip_sample"),
    "gt_init_std_neg": (lambda: gt(init_std=-1.0), ValueError, "init_std"),
    "gt_init_std_inf": (lambda: gt(init_std=math.inf), ValueError, "init_std"),
    "gt_init_std_nan": (lambda: gt(init_std=NAN), ValueError, "init_std"),
    "gt_init_std_none": (lambda: gt(init_std=None), TypeError, "init_std"),
    "gt_std_neg": (lambda: gt(std=[0.1, -0.1, 0.0]), ValueError, "std"),
    "gt_table_length": (lambda: gt(c_x0=[0.1, 0.1]), ValueError, "c_x0"),
    "gt_table_2d": (lambda: gt(c_x=[[0.9], [0.9], [0.9]]), ValueError, "c_x"),
    "gt_table_str": (lambda: gt(c_x="abc"), TypeError, "c_x"),
    "gt_table_nan": (lambda: gt(c_eps=[0.0, NAN, 0.0]), ValueError, "c_eps"),
    "gt_table_meta": (lambda: gt(c_x=torch.ones(3, device="meta")), ValueError, "c_x"),
    "ddpm_abar_meta": (
        lambda: ddpm_transitions(ABAR.to("meta"), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "gt_model_sigma_neg": (lambda: gt(model_sigma=[-0.5] * 3), ValueError, "model_sigma"),
    "gt_model_alpha_0": (lambda: gt(model_alpha=[0.0] * 3), ValueError, "model_alpha"),
    "gt_input_scale_0": (lambda: gt(input_scale=[0.0] * 3), ValueError, "input_scale"),
    "gt_timesteps_nan": (lambda: gt(timesteps=[20.0, NAN, 0.0]), ValueError, "timesteps"),
    "gt_timesteps_2d": (lambda: gt(timesteps=[[20, 10, 0]]), ValueError, "timesteps"),
    "gt_timesteps_str": (lambda: gt(timesteps="abc"), TypeError, "timesteps"),
    "gt_timesteps_empty": (lambda: gt(timesteps=[]), ValueError, "timesteps"),
    "gt_eps_from_clipped_str": (
        lambda: gt(eps_from_clipped_x0="yes"),
        TypeError,
        "eps_from_clipped_x0",
    ),
    "gt_name_int": (lambda: gt(name=3), TypeError, "name"),
    # the shared builders the adapter uses
    "ddim_schedule_step_ratio_0": (
        lambda: ddim_from_schedule(ABAR, [900, 0], 0, 1.0, eta=1.0, name="d"),
        ValueError,
        "step_ratio",
    ),
    "ddim_schedule_final_0": (
        lambda: ddim_from_schedule(ABAR, [900, 0], 100, 0.0, eta=1.0, name="d"),
        ValueError,
        "final_alpha_cumprod",
    ),
    "ddim_schedule_final_above_1": (
        lambda: ddim_from_schedule(ABAR, [900, 0], 100, 1.5, eta=1.0, name="d"),
        ValueError,
        "final_alpha_cumprod",
    ),
    "ddim_schedule_timesteps_past_T": (
        lambda: ddim_from_schedule(ABAR, [1000, 0], 100, 1.0, eta=1.0, name="d"),
        ValueError,
        "timesteps",
    ),
    "ddim_schedule_eta_str": (
        lambda: ddim_from_schedule(ABAR, [900, 0], 100, 1.0, eta="1", name="d"),
        TypeError,
        "eta",
    ),
    "euler_sigmas_length": (
        lambda: euler_ancestral_from_sigmas(
            [10.0, 5.0], [3.0, 1.0], prediction="epsilon", init_std=3.0, name="e"
        ),
        ValueError,
        "sigmas",
    ),
    "euler_sigmas_neg": (
        lambda: euler_ancestral_from_sigmas(
            [10.0, 5.0], [3.0, -1.0, 0.0], prediction="epsilon", init_std=3.0, name="e"
        ),
        ValueError,
        "sigmas",
    ),
    "euler_sigmas_nan": (
        lambda: euler_ancestral_from_sigmas(
            [10.0, 5.0], [3.0, NAN, 0.0], prediction="epsilon", init_std=3.0, name="e"
        ),
        ValueError,
        "sigmas",
    ),
    "round_tables_not_transitions": (lambda: round_tables("ddpm"), TypeError, "transitions"),
    "stochastic_runs_not_transitions": (lambda: stochastic_runs(None), TypeError, "transitions"),
    # models.load and EmbeddedModel.transitions
    "load_unknown": (lambda: models.load("nope"), ValueError, "name"),
    "load_name_int": (lambda: models.load(3), TypeError, "name"),
    "load_name_list": (lambda: models.load(["gmm"]), TypeError, "name"),
    "load_gmm_dim_0": (lambda: models.load("gmm", dim=0), ValueError, "dim"),
    "load_gmm_dim_neg": (lambda: models.load("gmm", dim=-1), ValueError, "dim"),
    "load_gmm_dim_float": (lambda: models.load("gmm", dim=2.5), TypeError, "dim"),
    "load_gmm_dim_bool": (lambda: models.load("gmm", dim=True), TypeError, "dim"),
    "load_gmm_dim_str": (lambda: models.load("gmm", dim="64"), TypeError, "dim"),
    "load_gmm_components_0": (
        lambda: models.load("gmm", dim=2, components=0),
        ValueError,
        "components",
    ),
    "load_gmm_components_float": (
        lambda: models.load("gmm", dim=2, components=2.5),
        TypeError,
        "components",
    ),
    "load_gmm_seed_float": (lambda: models.load("gmm", dim=2, seed=0.5), TypeError, "seed"),
    "load_gmm_seed_neg": (lambda: models.load("gmm", dim=2, seed=-1), ValueError, "seed"),
    "load_gmm_unknown_kwarg": (lambda: models.load("gmm", dimension=3), TypeError, "dimension"),
    "load_gmm_device": (lambda: models.load("gmm", dim=2, device="cpu"), TypeError, "device"),
    "load_digits_dim": (lambda: models.load("digits", dim=3), TypeError, "dim"),
    "load_digits_dtype_str": (lambda: models.load("digits", dtype="float32"), TypeError, "dtype"),
    "load_digits_dtype_int": (
        lambda: models.load("digits", dtype=torch.int64),
        ValueError,
        "dtype",
    ),
    "load_digits_device_typo": (lambda: models.load("digits", device="gpu0"), ValueError, "device"),
    "load_digits_device_int_type": (lambda: models.load("digits", device=1.5), TypeError, "device"),
    **prefixed("model_steps", bad_steps(lambda n: gmm().transitions(n), "num_steps")),
    "model_sampler_typo": (lambda: gmm().transitions(10, "euler"), ValueError, "sampler"),
    "model_sampler_int": (lambda: gmm().transitions(10, 1), TypeError, "sampler"),
    "model_eta_on_ddpm": (lambda: gmm().transitions(10, "ddpm", eta=0.5), TypeError, "eta"),
    "model_betas": (lambda: gmm().transitions(10, "ddpm", betas=make_betas()), TypeError, "betas"),
    "model_timesteps": (
        lambda: gmm().transitions(10, "ddpm", timesteps=[5, 0]),
        TypeError,
        "timesteps",
    ),
    "model_prediction": (
        lambda: gmm().transitions(10, "ddim", prediction="sample"),
        TypeError,
        "prediction",
    ),
    "model_unknown_kwarg": (
        lambda: gmm().transitions(10, "euler_ancestral", bogus=1),
        TypeError,
        "bogus",
    ),
    "model_ddim_eta_nan": (lambda: gmm().transitions(10, "ddim", eta=NAN), ValueError, "eta"),
}


def check(call, exc, name):
    with pytest.raises(exc) as err:
        call()
    msg = str(err.value)
    assert type(err.value) is exc, f"{type(err.value).__name__}: {msg}"
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    assert name in msg, f"does not name {name!r}: {msg!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_naming_the_argument(case):
    check(*CASES[case])


def test_digits_refused_before_its_weights_load(monkeypatch):
    from specdiff_kernels.models import digits

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(digits, "load_digits_target", no_load)
    monkeypatch.setattr(digits, "load_digits_draft", no_load)
    check(lambda: models.load("digits", dim=3), TypeError, "dim")
    check(lambda: models.load("digits", dtype=torch.int32), ValueError, "dtype")


# --------------------------------------------------------------------------- diffusers adapter
def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is an optional extra")


def sched(cls="DDPMScheduler", **config):
    return getattr(_diffusers(), cls)(**config)


def dt(*args, **kwargs):
    from specdiff_kernels.integrations.diffusers import diffusers_transitions

    return diffusers_transitions(*args, **kwargs)


class Pipe:
    def __init__(self, **parts):
        self.__dict__.update(parts)


def fp(pipe, *args, **kwargs):
    from specdiff_kernels.integrations.diffusers import from_pipeline

    return from_pipeline(pipe, *args, **kwargs)


def from_config(config, cls="DDPMScheduler"):
    from specdiff_kernels.integrations.diffusers import scheduler_from_config

    return scheduler_from_config(config, cls)


DIFFUSERS_CASES = {
    "scheduler_none": (lambda: dt(None, 10), TypeError, "scheduler"),
    "scheduler_str": (lambda: dt("DDPMScheduler", 10), TypeError, "scheduler"),
    "scheduler_class_not_instance": (
        lambda: dt(_diffusers().DDPMScheduler, 10),
        TypeError,
        "scheduler",
    ),
    "scheduler_unsupported": (lambda: dt(sched("PNDMScheduler"), 10), TypeError, "PNDMScheduler"),
    "scheduler_unsupported_lists": (
        lambda: dt(sched("EulerDiscreteScheduler"), 10),
        TypeError,
        "EulerAncestralDiscreteScheduler",
    ),
    **prefixed("ddpm_n", bad_steps(lambda n: dt(sched(), n))),
    **prefixed("ddim_n", bad_steps(lambda n: dt(sched("DDIMScheduler"), n, eta=1.0))),
    **prefixed("euler_n", bad_steps(lambda n: dt(sched("EulerAncestralDiscreteScheduler"), n))),
    "n_none_unset": (lambda: dt(sched(), None), ValueError, "num_inference_steps"),
    "ddim_eta_0": (lambda: dt(sched("DDIMScheduler"), 10, eta=0.0), ValueError, "eta"),
    "ddim_eta_neg": (lambda: dt(sched("DDIMScheduler"), 10, eta=-1.0), ValueError, "eta"),
    "ddim_eta_nan": (lambda: dt(sched("DDIMScheduler"), 10, eta=NAN), ValueError, "eta"),
    "ddim_eta_inf": (lambda: dt(sched("DDIMScheduler"), 10, eta=math.inf), ValueError, "eta"),
    "ddim_eta_str": (lambda: dt(sched("DDIMScheduler"), 10, eta="0.5"), TypeError, "eta"),
    "ddim_eta_bool": (lambda: dt(sched("DDIMScheduler"), 10, eta=True), TypeError, "eta"),
    "ddim_eta_missing": (lambda: dt(sched("DDIMScheduler"), 10), ValueError, "eta"),
    "ddim_clipped_output_str": (
        lambda: dt(sched("DDIMScheduler"), 10, eta=1.0, use_clipped_model_output="yes"),
        TypeError,
        "use_clipped_model_output",
    ),
    "ddpm_eta": (lambda: dt(sched(), 10, eta=0.5), ValueError, "eta"),
    "prediction_type_typo": (
        lambda: dt(sched(prediction_type="eps"), 10),
        ValueError,
        "prediction_type",
    ),
    "ddim_prediction_type_typo": (
        lambda: dt(sched("DDIMScheduler", prediction_type="v"), 10, eta=1.0),
        ValueError,
        "prediction_type",
    ),
    "euler_prediction_type_sample": (
        lambda: dt(sched("EulerAncestralDiscreteScheduler", prediction_type="sample"), 10),
        ValueError,
        "prediction_type",
    ),
    "clip_range_0": (lambda: dt(sched(clip_sample_range=0.0), 10), ValueError, "clip_sample_range"),
    "clip_range_nan": (
        lambda: dt(sched(clip_sample_range=NAN), 10),
        ValueError,
        "clip_sample_range",
    ),
    "clip_range_str": (
        lambda: dt(sched(clip_sample_range="1"), 10),
        TypeError,
        "clip_sample_range",
    ),
    "ddim_clip_range_neg": (
        lambda: dt(sched("DDIMScheduler", clip_sample=True, clip_sample_range=-1.0), 10, eta=1.0),
        ValueError,
        "clip_sample_range",
    ),
    "timestep_spacing_typo": (
        lambda: dt(sched(timestep_spacing="bogus"), 10),
        ValueError,
        "timestep_spacing",
    ),
    "euler_timestep_spacing_typo": (
        lambda: dt(sched("EulerAncestralDiscreteScheduler", timestep_spacing="bogus"), 10),
        ValueError,
        "timestep_spacing",
    ),
    "variance_type_typo": (
        lambda: dt(sched(variance_type="small"), 10),
        ValueError,
        "variance_type",
    ),
    "variance_type_learned": (
        lambda: dt(sched(variance_type="learned"), 10),
        ValueError,
        "variance_type",
    ),
    "num_train_timesteps_0": (
        lambda: dt(sched(num_train_timesteps=0), 10),
        ValueError,
        "num_train_timesteps",
    ),
    "steps_offset_non_int": (lambda: dt(sched(steps_offset=1.5), 10), TypeError, "steps_offset"),
    "steps_offset_neg": (lambda: dt(sched(steps_offset=-1), 10), ValueError, "steps_offset"),
    "steps_offset_past_T": (
        lambda: dt(sched("DDIMScheduler", steps_offset=200), 10, eta=1.0),
        ValueError,
        "steps_offset",
    ),
    "beta_start_neg": (lambda: dt(sched(beta_start=-0.1), 10), ValueError, "beta_start"),
    "beta_end_1": (
        lambda: dt(sched("EulerAncestralDiscreteScheduler", beta_end=1.0), 10),
        ValueError,
        "beta_end",
    ),
    "trained_betas_nan": (
        lambda: dt(sched(num_train_timesteps=4, trained_betas=[0.1, NAN, 0.2, 0.3]), 2),
        ValueError,
        "trained_betas",
    ),
    "trained_betas_1": (
        lambda: dt(sched(num_train_timesteps=4, trained_betas=[0.1, 1.0, 0.2, 0.3]), 2),
        ValueError,
        "trained_betas",
    ),
    "threshold_ratio": (
        lambda: dt(sched(thresholding=True, dynamic_thresholding_ratio=1.5), 10),
        ValueError,
        "dynamic_thresholding_ratio",
    ),
    "threshold_max_0": (
        lambda: dt(sched(thresholding=True, sample_max_value=0.0), 10),
        ValueError,
        "sample_max_value",
    ),
    "from_config_beta_schedule": (
        lambda: from_config({"beta_schedule": "bogus"}),
        ValueError,
        "beta_schedule",
    ),
    "from_config_beta_schedule_by_class_name": (
        lambda: from_config({"_class_name": "DDIMScheduler", "beta_schedule": "bogus"}, None),
        ValueError,
        "beta_schedule",
    ),
    "from_config_clip_range_0": (
        lambda: from_config({"clip_sample": True, "clip_sample_range": 0}, "DDIMScheduler"),
        ValueError,
        "clip_sample_range",
    ),
    "from_config_T_str": (
        lambda: from_config({"num_train_timesteps": "1000"}),
        TypeError,
        "num_train_timesteps",
    ),
    "from_config_T_float": (
        lambda: from_config({"num_train_timesteps": 2.5}),
        TypeError,
        "num_train_timesteps",
    ),
    "from_config_beta_start_str": (
        lambda: from_config({"beta_start": "0.1"}, "EulerAncestralDiscreteScheduler"),
        TypeError,
        "beta_start",
    ),
    "from_config_trained_betas_str": (
        lambda: from_config({"trained_betas": "abc"}),
        TypeError,
        "trained_betas",
    ),
    "from_config_trained_betas_length": (
        lambda: from_config({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}),
        ValueError,
        "trained_betas",
    ),
    "from_config_no_class": (lambda: from_config({}, None), TypeError, "scheduler_class"),
    "from_config_class_unsupported": (
        lambda: from_config({}, "PNDMScheduler"),
        TypeError,
        "PNDMScheduler",
    ),
    "from_config_class_unknown": (
        lambda: from_config({}, "NoSuchScheduler"),
        ValueError,
        "NoSuchScheduler",
    ),
    "from_config_not_a_dict": (lambda: from_config("linear"), TypeError, "config"),
    "from_config_prediction_typo": (
        lambda: from_config({"prediction_type": "eps"}),
        ValueError,
        "prediction_type",
    ),
    "pipe_none": (lambda: fp(None, 10), TypeError, "pipe"),
    "pipe_no_unet": (lambda: fp(Pipe(scheduler=sched()), 10), TypeError, "unet"),
    "pipe_no_scheduler": (lambda: fp(Pipe(unet=torch.nn.Identity()), 10), TypeError, "scheduler"),
    "pipe_n_0": (
        lambda: fp(Pipe(unet=torch.nn.Identity(), scheduler=sched()), 0),
        ValueError,
        "num_inference_steps",
    ),
    "pipe_n_str": (
        lambda: fp(Pipe(unet=torch.nn.Identity(), scheduler=sched()), "50"),
        TypeError,
        "num_inference_steps",
    ),
    "pipe_eta_on_ddpm": (
        lambda: fp(Pipe(unet=torch.nn.Identity(), scheduler=sched()), 10, eta=0.5),
        ValueError,
        "eta",
    ),
    "pipe_guidance_str": (
        lambda: fp(Pipe(unet=torch.nn.Identity(), scheduler=sched()), 10, guidance_scale="7"),
        TypeError,
        "guidance_scale",
    ),
    "model_call_kwarg_typo": (
        lambda: _model(torch.nn.Identity(), guidance=7.5),
        TypeError,
        "guidance",
    ),
    "pipe_call_kwarg_typo": (
        lambda: fp(Pipe(unet=torch.nn.Identity(), scheduler=sched()), 10, guidance=7.5),
        TypeError,
        "guidance",
    ),
    "model_return_dict": (
        lambda: _model(torch.nn.Identity(), return_dict=True),
        TypeError,
        "return_dict",
    ),
    "model_unet_none": (lambda: _model(None), TypeError, "unet"),
    "model_guidance_nan": (
        lambda: _model(torch.nn.Identity(), guidance_scale=NAN),
        ValueError,
        "guidance_scale",
    ),
}


def _model(unet, **kwargs):
    from specdiff_kernels.integrations.diffusers import DiffusersModel

    return DiffusersModel(unet, **kwargs)


@pytest.mark.parametrize("case", list(DIFFUSERS_CASES))
def test_adapter_refuses_in_one_line_naming_the_argument(case):
    _diffusers()
    check(*DIFFUSERS_CASES[case])


def test_valid_input_still_builds():
    """The checks refuse only what is wrong: each builder's defaults and the edge values the
    checks sit next to (one step, T steps, eta 0, infinite clip, the largest steps_offset)."""
    assert ddpm_transitions(ABAR, num_inference_steps=1).num_steps == 1
    assert ddpm_transitions(ABAR, num_inference_steps=1000).num_steps == 1000
    assert ddpm_transitions(ABAR, num_inference_steps=10, steps_offset=99).timesteps[0] == 999
    assert (
        ddpm_transitions(ABAR, num_inference_steps=10, clip_sample=math.inf).clip_sample == math.inf
    )
    assert ddpm_transitions(betas=make_betas("cosine", 50), num_inference_steps=5).num_steps == 5
    assert bool(ddim_transitions(ABAR, eta=0).deterministic.all())
    assert ddim_transitions(ABAR, eta=1).init_std == 1.0
    assert euler_ancestral_transitions(num_inference_steps=3, init_std=2).init_std == 2.0
    assert gt(timesteps=torch.tensor([20.5, 10.0, 0.0])).timesteps.dtype == torch.float64
    assert gt(init_std=0).init_std == 0.0  # a fixed start at the origin (Langevin)
    assert gt(clip_sample=torch.tensor(2.0), eps_from_clipped_x0=True).clip_sample == 2.0
    assert gmm().transitions(5, "ddim", eta=0.5, spacing="trailing").num_steps == 5
    assert models.load("gmm", dim=3, components=1, seed=7).event_shape == (3,)


def test_adapter_valid_input_still_builds():
    """diffusers ignores steps_offset outside 'leading' spacing; the adapter follows it."""
    _diffusers()
    tr = dt(sched("DDIMScheduler", timestep_spacing="trailing", steps_offset=1), 10, eta=1.0)
    assert tr.timesteps[0] == 999
    assert dt(sched(steps_offset=1), 10).timesteps[0] == 901

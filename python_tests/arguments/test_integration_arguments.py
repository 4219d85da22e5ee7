"""The diffusers adapter refuses what it cannot run before any network call, in ONE line that names
the argument or class and says why (issue 27).

* Its arguments (``diffusers_transitions``, ``from_pipeline``, ``scheduler_from_config``,
  ``DiffusersModel``), table-driven: each case is ``(call, exception type, the name the message
  must contain)``.
* What is not supported: ``DiffusersModel`` of a transformer or other non-UNet diffusers model,
  ``from_pipeline`` of a transformer pipeline, ``SpeculativePipeline`` of a transformer or
  conditional pipeline it has no kind for (python_tests/test_conditional_pipelines.py: the ones it
  has), and every unsupported diffusers scheduler, each with its reason.

Tiny random components built from configs (no downloads).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra")
import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    FlowMatchEulerDiscreteScheduler,
)
from refusal import CallCounter, bad_steps, check, one_line  # noqa: E402
from tiny_diffusers import tiny_cond_unet, tiny_dit, tiny_unet, tiny_vae  # noqa: E402

from specdiff_kernels.integrations import SpeculativePipeline  # noqa: E402
from specdiff_kernels.integrations.diffusers import (  # noqa: E402
    SUPPORTED,
    DiffusersModel,
    diffusers_transitions,
    from_pipeline,
    scheduler_from_config,
)

NAN = math.nan

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- arguments
def sched(cls="DDPMScheduler", **config):
    return getattr(diffusers, cls)(**config)


dt = diffusers_transitions


class Pipe:
    def __init__(self, **parts):
        self.__dict__.update(parts)


fp = from_pipeline


def from_config(config, cls="DDPMScheduler"):
    return scheduler_from_config(config, cls)


DIFFUSERS_CASES = {
    "scheduler_none": (lambda: dt(None, 10), TypeError, "scheduler"),
    "scheduler_str": (lambda: dt("DDPMScheduler", 10), TypeError, "scheduler"),
    "scheduler_class_not_instance": (
        lambda: dt(diffusers.DDPMScheduler, 10),
        TypeError,
        "scheduler",
    ),
    "scheduler_unsupported": (lambda: dt(sched("PNDMScheduler"), 10), TypeError, "PNDMScheduler"),
    "scheduler_unsupported_lists": (
        lambda: dt(sched("LMSDiscreteScheduler"), 10),
        TypeError,
        "DPMSolverMultistepScheduler",
    ),
    "euler_without_churn": (
        lambda: dt(sched("EulerDiscreteScheduler"), 10),
        ValueError,
        "EulerAncestralDiscreteScheduler",
    ),
    **bad_steps("ddpm_n", lambda n: dt(sched(), n)),
    **bad_steps("ddim_n", lambda n: dt(sched("DDIMScheduler"), n, eta=1.0)),
    **bad_steps("euler_n", lambda n: dt(sched("EulerAncestralDiscreteScheduler"), n)),
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
    check(*DIFFUSERS_CASES[case])


def test_adapter_valid_input_still_builds():
    """diffusers ignores steps_offset outside 'leading' spacing; the adapter follows it."""
    tr = dt(sched("DDIMScheduler", timestep_spacing="trailing", steps_offset=1), 10, eta=1.0)
    assert tr.timesteps[0] == 999
    assert dt(sched(steps_offset=1), 10).timesteps[0] == 901


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_eta_refused_where_it_does_not_apply(scheduler):
    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000)
    with pytest.raises(
        ValueError, match=rf"^eta applies to DDIMScheduler only, not to {scheduler}$"
    ):
        diffusers_transitions(sched, 10, eta=0.5)
    with pytest.raises(ValueError, match="^use_clipped_model_output applies to DDIMScheduler only"):
        diffusers_transitions(sched, 10, use_clipped_model_output=True)

    class Pipe:
        unet = torch.nn.Identity()
        scheduler = sched

    with pytest.raises(ValueError, match="^eta applies to DDIMScheduler only"):
        from_pipeline(Pipe(), 10, eta=0.5)


# ----------------------------------------------------------------------------- what is not supported
def test_diffusers_model_refuses_a_transformer():
    dit = tiny_dit()
    count = CallCounter(dit)
    with pytest.raises(TypeError) as err:
        DiffusersModel(dit)
    text = one_line(err)
    assert text.startswith("DiffusersModel: DiTTransformer2DModel is a transformer model")
    assert "not a UNet-style one; use DiffusersTransformerModel" in text
    assert count.calls == 0


def test_diffusers_model_refuses_a_plain_transformer_and_a_vae():
    torch.manual_seed(0)
    t2d = diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, num_layers=1, norm_num_groups=2
    )
    with pytest.raises(TypeError) as err:
        DiffusersModel(t2d)
    assert "Transformer2DModel is a transformer model" in one_line(err)
    with pytest.raises(TypeError) as err:
        DiffusersModel(tiny_vae())
    text = one_line(err)
    assert "AutoencoderKL is not a UNet-style denoiser" in text and "(sample, timestep" in text


def dit_pipe() -> DiTPipeline:
    return DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=DDPMScheduler())


def test_transformer_pipelines_are_refused():
    """from_pipeline takes UNet pipelines; SpeculativePipeline a transformer pipeline it has a
    kind for (a DiTPipeline), not another."""
    pipe = dit_pipe()
    count = CallCounter(pipe.transformer)
    with pytest.raises(TypeError) as err:
        from_pipeline(pipe, 10)
    assert one_line(err) == (
        "from_pipeline: DiTPipeline has a .transformer (DiTTransformer2DModel), not a .unet; "
        "transformer models are not supported yet (UNet-style models called as "
        "unet(sample, timestep, ...) are: UNet2DModel, UNet2DConditionModel)"
    )

    class PixArtLike:
        transformer, scheduler = pipe.transformer, pipe.scheduler

    with pytest.raises(TypeError) as err:
        SpeculativePipeline(PixArtLike())
    assert one_line(err).startswith(
        "SpeculativePipeline: PixArtLike has a .transformer (DiTTransformer2DModel), not a "
        ".unet, and is not a pipeline it supports (DiTPipeline, StableDiffusionPipeline"
    )
    assert count.calls == 0


def test_conditional_pipeline_is_refused():
    pipe = DDPMPipeline(unet=tiny_cond_unet(), scheduler=DDPMScheduler())
    count = CallCounter(pipe.unet)
    with pytest.raises(TypeError) as err:
        SpeculativePipeline(pipe)
    text = one_line(err)
    assert text.startswith("SpeculativePipeline: DDPMPipeline is a conditional pipeline (its unet ")
    assert "UNet2DConditionModel" in text and "encoder_hidden_states" in text
    assert "not supported yet" in text and "from_pipeline(" in text and "model_kwargs" in text
    assert count.calls == 0


def test_class_conditional_pipeline_is_refused():
    pipe = DDPMPipeline(unet=tiny_unet(num_class_embeds=10), scheduler=DDPMScheduler())
    with pytest.raises(TypeError) as err:
        SpeculativePipeline(pipe)
    text = one_line(err)
    assert "conditional pipeline" in text and "num_class_embeds=10" in text
    assert "class_labels" in text and "from_pipeline(" in text


def unsupported_schedulers() -> list:
    """Every diffusers scheduler class the adapter does not support."""
    names = []
    for name in sorted(n for n in dir(diffusers) if n.endswith("Scheduler")):
        cls = getattr(diffusers, name, None)
        if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
            if name not in SUPPORTED:
                names.append(name)
    return names


@pytest.mark.parametrize("name", unsupported_schedulers())
def test_every_unsupported_scheduler_says_why(name):
    with pytest.raises(TypeError) as err:
        scheduler_from_config({}, name)
    text = one_line(err)
    assert text.startswith(f"unsupported scheduler {name}: ")  # a reason follows the name
    if name.startswith("FlowMatch"):  # the flow schedulers' reason names the flow families
        assert "flow-matching models take FlowMatchEulerDiscreteScheduler(" in text
        assert "'flow-euler'" in text and "'flow-sde'" in text
    elif "deterministic (no noise" not in text:
        assert "; supported: DDPMScheduler" in text


def test_euler_discrete_names_s_churn_and_euler_ancestral():
    unet = tiny_unet()
    count = CallCounter(unet)
    pipe = DDPMPipeline(unet=unet, scheduler=diffusers.EulerDiscreteScheduler())
    spec = SpeculativePipeline(pipe, window=2)
    with pytest.raises(ValueError) as err:
        spec(batch_size=1, num_inference_steps=5)
    text = one_line(err)
    assert text.startswith("EulerDiscreteScheduler: pass s_churn > 0")
    assert "deterministic" in text and "use EulerAncestralDiscreteScheduler" in text
    assert count.calls == 0


def test_flow_matching_scheduler_in_the_adapter():
    with pytest.raises(ValueError) as err:
        diffusers_transitions(FlowMatchEulerDiscreteScheduler(), 10)
    assert one_line(err) == (
        "FlowMatchEulerDiscreteScheduler config: stochastic_sampling=False is deterministic (no "
        "noise to speculate over): the Euler step of the flow ODE; set stochastic_sampling=True"
    )
    sched = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", use_dynamic_shifting=True
    )
    with pytest.raises(ValueError) as err:
        diffusers_transitions(sched, 10)
    assert "use_dynamic_shifting=True is not supported" in one_line(err)
    assert "flow-matching models take FlowMatchEulerDiscreteScheduler(" in str(err.value)

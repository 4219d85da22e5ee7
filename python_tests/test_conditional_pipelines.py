"""``SpeculativePipeline`` of conditional latent pipelines, called as the pipeline is:
``DiTPipeline`` (class labels), ``StableDiffusionPipeline`` (text) and
``StableDiffusion3Pipeline`` (text, rectified flow on the stochastic FlowMatch Euler scheduler),
with classifier-free guidance in one batched network call.

* The law: the latents (``output_type="latent"``) of ``SpeculativePipeline(pipe)(...)`` against
  the pipeline's OWN loop with the same stochastic scheduler (two-sample tests, 2000 chains,
  guided), and the power checks: the same test rejects an always-accepting verifier and the
  pipeline's loop at another guidance scale (SD3's tiny random transformer: without guidance).
* The outputs: the pipeline's output class, shapes, dtypes and ranges for every output type.
* The refusals: what the wrapper cannot honour, in one line, before any network call.

Tiny random components built from configs (tiny_diffusers.py; no downloads).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from preamble import SINGLE_THREAD, gen

pytest.importorskip("diffusers", reason="diffusers is an optional extra")
pytest.importorskip("transformers", reason="the text pipelines need transformers' CLIP")
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    ImagePipelineOutput,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput  # noqa: E402
from refusal import CallCounter, one_line  # noqa: E402
from tiny_diffusers import (  # noqa: E402
    SIZE,
    tiny_dit_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)
from wrong_verifiers import verify_always_accept  # noqa: E402

from specdiff_kernels.integrations import SpeculativePipeline  # noqa: E402
from specdiff_kernels.testing.two_sample import two_sample_pvalue  # noqa: E402

N_LAW, STEPS = 2000, 10
pytestmark = SINGLE_THREAD


@pytest.fixture(scope="module")
def one_thread():
    """single_thread for the module's reference loops (module fixtures run before it)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def dit_reference(pipe, labels, guidance_scale: float, seed: int) -> torch.Tensor:
    """The latents of DiTPipeline's own loop (it always decodes: they are read at its VAE
    decode, where it divides them by the scaling factor)."""
    seen = []
    decode = pipe.vae.decode

    def record(z, *args, **kwargs):
        seen.append(z * pipe.vae.config.scaling_factor)
        return decode(z, *args, **kwargs)

    pipe.vae.decode = record
    try:
        with torch.no_grad():
            pipe(labels, guidance_scale, gen(seed), STEPS, output_type="np")
    finally:
        del pipe.vae.decode
    return seen[0]


# ----------------------------------------------------------------------------- DiT
DIT_LABELS = [c % 4 for c in range(N_LAW)]


@pytest.fixture(scope="module")
def dit_law(one_thread):
    """A DiT with a learned variance on DPM++ 2M SDE, and its own loop's latents at guidance 4."""
    pipe = tiny_dit_pipeline(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
    return pipe, dit_reference(pipe, DIT_LABELS, 4.0, seed=1)


def test_dit_law_of_the_pipelines_own_loop(dit_law):
    pipe, ref = dit_law
    spec = SpeculativePipeline(pipe, window=4)
    got = spec(DIT_LABELS, 4.0, gen(2), STEPS, output_type="latent").images
    assert got.shape == ref.shape and spec.last_stats.target_calls <= STEPS
    assert spec.sampler(STEPS, None, 4.0).transitions.multistep
    p = two_sample_pvalue(got, ref, seed=0)
    assert p > 0.01, f"speculative DiT latents differ from DiTPipeline's own loop (p={p:.2g})"


def test_dit_law_test_detects_a_wrong_chain_and_a_wrong_guidance(dit_law):
    pipe, ref = dit_law
    spec = SpeculativePipeline(pipe, window=4, verify_fn=verify_always_accept)
    wrong = spec(DIT_LABELS, 4.0, gen(2), STEPS, output_type="latent").images
    assert two_sample_pvalue(wrong, ref, seed=0) < 1e-3
    right = SpeculativePipeline(pipe, window=4)(DIT_LABELS, 3.0, gen(2), STEPS, "latent").images
    assert two_sample_pvalue(right, ref, seed=0) < 1e-3


def test_dit_guides_in_one_batched_call_against_the_null_class():
    pipe = tiny_dit_pipeline()
    count = CallCounter(pipe.transformer)
    seen = []
    forward = pipe.transformer.forward

    def record(hidden_states, timestep=None, class_labels=None, **kwargs):
        seen.append(class_labels.clone())
        return forward(hidden_states, timestep, class_labels, **kwargs)

    pipe.transformer.forward = record
    spec = SpeculativePipeline(pipe, window=3)
    spec([5, 7], 4.0, gen(0), 6, output_type="latent")
    assert count.calls == len(seen) == spec.last_stats.target_calls + spec.last_stats.draft_calls
    for labels in seen:  # every call: [null rows, conditional rows], one call for both branches
        half = labels.shape[0] // 2
        assert labels.shape[0] == 2 * half and bool((labels[:half] == 1000).all())
        assert set(labels[half:].tolist()) <= {5, 7}
    seen.clear()
    spec([5, 7], 1.0, gen(0), 6, output_type="latent")  # guidance_scale <= 1: no guidance
    assert seen and all(1000 not in labels.tolist() for labels in seen)


@pytest.mark.parametrize("out_channels", [8, 4], ids=["learned-sigma", "fixed-sigma"])
def test_dit_outputs(out_channels):
    pipe = tiny_dit_pipeline(out_channels=out_channels)
    spec = SpeculativePipeline(pipe, window=4)
    run = lambda output_type, **kw: spec([1, 2, 3], 4.0, gen(0), 5, output_type, **kw)  # noqa: E731
    out = run("np")
    own = pipe([1, 2, 3], 4.0, gen(0), 5, output_type="np")
    assert isinstance(out, ImagePipelineOutput) and isinstance(out.images, np.ndarray)
    assert out.images.shape == own.images.shape == (3, SIZE, SIZE, 3)
    assert out.images.dtype == own.images.dtype and 0 <= out.images.min() <= out.images.max() <= 1
    pil = run("pil").images
    assert [(im.size, im.mode) for im in pil] == [
        (im.size, im.mode) for im in pipe.numpy_to_pil(own.images)
    ]
    np.testing.assert_array_equal(np.asarray(pil[0]), np.asarray(pipe.numpy_to_pil(out.images)[0]))
    pt = run("pt").images
    assert pt.shape == (3, 3, SIZE, SIZE) and pt.dtype == torch.float32
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), out.images)
    (latents,) = run("latent", return_dict=False)
    assert latents.shape == (3, 4, SIZE, SIZE)


def test_dit_refusals_are_one_line():
    pipe = tiny_dit_pipeline()
    count = CallCounter(pipe.transformer)
    spec = SpeculativePipeline(pipe)
    for kwargs, kind, message in [
        ({"class_labels": [1, 1001]}, ValueError, "class_labels[1] must be"),
        ({"class_labels": 3}, TypeError, "class_labels must be a list of class ids"),
        ({"class_labels": [1], "output_type": "jpg"}, ValueError, "output_type must be one of"),
        ({"class_labels": [1], "prompt": "x"}, TypeError, "unexpected keyword argument(s) prompt"),
        ({"class_labels": [1], "generator": [gen(0)]}, TypeError, "a list of per-image"),
    ]:
        with pytest.raises(kind) as err:
            spec(**kwargs)
        assert message in one_line(err)
    few = tiny_dit_pipeline()
    few.transformer = few.transformer.__class__(
        **{**few.transformer.config, "num_embeds_ada_norm": 10}
    )
    with pytest.raises(ValueError) as err:
        SpeculativePipeline(few)([1], 4.0)
    assert "null class 1000, which this transformer has no embedding for" in one_line(err)
    assert count.calls == 0


# ----------------------------------------------------------------------------- Stable Diffusion
PROMPTS, NEGATIVE = ["a cat", "a dog"], ["blurry", "dark"]


def sd_call(n: int = N_LAW // 2, **kwargs) -> dict:
    return dict(
        prompt=PROMPTS,
        negative_prompt=NEGATIVE,
        num_images_per_prompt=n,
        num_inference_steps=STEPS,
        output_type="latent",
        **kwargs,
    )


@pytest.fixture(scope="module")
def sd_law(one_thread):
    """A tiny StableDiffusionPipeline on DDPM and its own loop's latents at guidance 3."""
    pipe = tiny_sd_pipeline()
    with torch.no_grad():
        ref = pipe(guidance_scale=3.0, generator=gen(1), **sd_call()).images
    return pipe, ref


def test_sd_law_of_the_pipelines_own_loop(sd_law):
    pipe, ref = sd_law
    spec = SpeculativePipeline(pipe, window=4)
    out = spec(guidance_scale=3.0, generator=gen(2), **sd_call())
    assert isinstance(out, StableDiffusionPipelineOutput) and out.nsfw_content_detected is None
    assert out.images.shape == ref.shape and spec.last_stats.target_calls <= STEPS
    p = two_sample_pvalue(out.images, ref, seed=0)
    assert p > 0.01, f"speculative SD latents differ from the pipeline's own loop (p={p:.2g})"


def test_sd_law_test_detects_a_wrong_chain_and_a_wrong_guidance(sd_law):
    pipe, ref = sd_law
    spec = SpeculativePipeline(pipe, window=4, verify_fn=verify_always_accept)
    wrong = spec(guidance_scale=3.0, generator=gen(2), **sd_call()).images
    assert two_sample_pvalue(wrong, ref, seed=0) < 1e-3
    right = SpeculativePipeline(pipe, window=4)(guidance_scale=2.0, generator=gen(2), **sd_call())
    assert two_sample_pvalue(right.images, ref, seed=0) < 1e-3


def test_sd_given_latents_start_the_chains():
    """``latents`` given: every chain starts there (scaled by the scheduler's init_noise_sigma,
    as the pipeline does: Euler-ancestral's is not 1), in law as the pipeline's own loop."""
    pipe = tiny_sd_pipeline(EulerAncestralDiscreteScheduler(steps_offset=1))
    start = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=gen(9)).expand(N_LAW, -1, -1, -1)
    call = sd_call(latents=start.clone(), guidance_scale=3.0)
    with torch.no_grad():
        ref = pipe(generator=gen(1), **call).images
    spec = SpeculativePipeline(pipe, window=4)
    got = spec(generator=gen(2), **call).images
    p = two_sample_pvalue(got, ref, seed=0)
    assert p > 0.01, f"chains from the given latents differ from the pipeline's loop (p={p:.2g})"
    other = SpeculativePipeline(pipe, window=4)(generator=gen(2), **{**call, "latents": 0 * start})
    assert two_sample_pvalue(other.images, ref, seed=0) < 1e-3


def test_sd_outputs_and_prompt_embeds():
    pipe = tiny_sd_pipeline()
    spec = SpeculativePipeline(pipe, window=4)
    base = dict(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0)
    for output_type in ("pil", "np", "pt", "latent"):
        out = spec(generator=gen(0), output_type=output_type, **base)
        own = pipe(generator=gen(0), output_type=output_type, **base)
        assert type(out) is type(own) and out.nsfw_content_detected is None
        if output_type == "pil":
            assert [(im.size, im.mode) for im in out.images] == [
                (im.size, im.mode) for im in own.images
            ]
            continue
        assert type(out.images) is type(own.images) and out.images.shape == own.images.shape
        assert out.images.dtype == own.images.dtype
        if output_type != "latent":
            assert 0 <= out.images.min() <= out.images.max() <= 1
    image, nsfw = spec(generator=gen(0), output_type="pt", return_dict=False, **base)
    assert image.shape == (4, 3, SIZE, SIZE) and nsfw is None
    # the prompt's embeddings given instead: the same chains
    cond, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVE)
    a = spec(generator=gen(3), negative_prompt=NEGATIVE, output_type="latent", **base).images
    b = spec(
        prompt_embeds=cond,
        negative_prompt_embeds=neg,
        num_images_per_prompt=2,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=gen(3),
        output_type="latent",
    ).images
    torch.testing.assert_close(a, b)


SD_BAD_CALLS = [
    ({"callback_on_step_end": print}, TypeError, "cannot honour: callback_on_step_end"),
    ({"guidance_rescale": 0.7}, TypeError, "cannot honour: guidance_rescale"),
    (
        {"cross_attention_kwargs": {"scale": 0.5}, "sigmas": [1.0, 0.5]},
        TypeError,
        "cross_attention_kwargs (not supported yet), sigmas",
    ),
    ({"timesteps": [999, 500]}, TypeError, "cannot honour: timesteps"),
    ({"eta": 0.5}, TypeError, "eta=0.5 (it applies to DDIMScheduler only)"),
    ({"ip_adapter_image": object()}, TypeError, "cannot honour: ip_adapter_image"),
    (
        {"callback": print, "promt": "x"},
        TypeError,
        "unexpected keyword argument(s) callback, promt",
    ),
    ({"generator": [gen(0), gen(1)]}, TypeError, "a list of per-image generators"),
    ({"output_type": "jpg"}, ValueError, "output_type must be one of"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, ValueError, "latents has shape (1, 4, 8, 8)"),
    ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt must be"),
]


@pytest.mark.parametrize(
    "kwargs,kind,message", SD_BAD_CALLS, ids=[m[:30] for _, _, m in SD_BAD_CALLS]
)
def test_sd_refusals_are_one_line(kwargs, kind, message):
    pipe = tiny_sd_pipeline()
    count = CallCounter(pipe.unet)
    with pytest.raises(kind) as err:
        SpeculativePipeline(pipe)(prompt="a cat", num_inference_steps=5, **kwargs)
    assert message in one_line(err)
    assert count.calls == 0


def test_sd_defaults_passed_explicitly_are_accepted():
    pipe = tiny_sd_pipeline()
    out = SpeculativePipeline(pipe, window=2)(
        "a cat",
        num_inference_steps=3,
        guidance_rescale=0.0,
        eta=0.0,
        callback_on_step_end=None,
        output_type="latent",
        generator=gen(0),
    )
    assert out.images.shape == (1, 4, SIZE // 2, SIZE // 2)


def test_sd_guidance_distilled_unet_is_refused():
    pipe = tiny_sd_pipeline()
    pipe.unet.register_to_config(time_cond_proj_dim=8)
    with pytest.raises(TypeError) as err:
        SpeculativePipeline(pipe)
    assert "time_cond_proj_dim=8" in one_line(err)


# ----------------------------------------------------------------------------- Stable Diffusion 3
def sd3_call(**kwargs) -> dict:
    """2000 chains of two prompts; T5's zeros (no text_encoder_3) cut to 4 tokens."""
    return sd_call(max_sequence_length=4, **kwargs)


@pytest.fixture(scope="module")
def sd3_law(one_thread):
    """A tiny SD3 on FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3) and its
    own loop's latents at guidance 3 (its step draws from torch's global generator)."""
    pipe = tiny_sd3_pipeline()
    torch.manual_seed(0)
    with torch.no_grad():
        ref = pipe(guidance_scale=3.0, generator=gen(1), **sd3_call()).images
    return pipe, ref


def test_sd3_law_of_the_pipelines_own_loop(sd3_law):
    pipe, ref = sd3_law
    spec = SpeculativePipeline(pipe, window=4)
    out = spec(guidance_scale=3.0, generator=gen(2), **sd3_call())
    assert type(out).__name__ == "StableDiffusion3PipelineOutput" and out.images.shape == ref.shape
    assert spec.last_stats.target_calls <= STEPS
    assert spec.sampler(STEPS, None, 3.0).transitions.prediction == "flow_prediction"
    p = two_sample_pvalue(out.images, ref, seed=0)
    assert p > 0.01, f"speculative SD3 latents differ from the pipeline's own loop (p={p:.2g})"


def test_sd3_law_test_detects_a_wrong_chain_and_no_guidance(sd3_law):
    pipe, ref = sd3_law
    spec = SpeculativePipeline(pipe, window=4, verify_fn=verify_always_accept)
    wrong = spec(guidance_scale=3.0, generator=gen(2), **sd3_call()).images
    assert two_sample_pvalue(wrong, ref, seed=0) < 1e-3
    unguided = SpeculativePipeline(pipe, window=4)(
        guidance_scale=1.0, generator=gen(2), **sd3_call()
    )
    assert two_sample_pvalue(unguided.images, ref, seed=0) < 1e-3


def test_sd3_guides_in_one_batched_call():
    pipe = tiny_sd3_pipeline()
    rows = []
    forward = pipe.transformer.forward

    def record(
        hidden_states=None, encoder_hidden_states=None, pooled_projections=None, timestep=None, **kw
    ):
        rows.append((hidden_states.shape[0], pooled_projections.shape[0], timestep.dtype))
        return forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, **kw)

    pipe.transformer.forward = record
    spec = SpeculativePipeline(pipe, window=3)
    spec(
        "a cat", num_inference_steps=5, guidance_scale=4.0, max_sequence_length=4, generator=gen(0)
    )
    assert len(rows) == spec.last_stats.target_calls + spec.last_stats.draft_calls
    # one call per network evaluation: both branches (2 rows per state), float timesteps
    assert all(n == p and n % 2 == 0 and dtype.is_floating_point for n, p, dtype in rows)


def test_sd3_outputs_and_dynamic_shifting():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_sd3_pipeline()
    spec = SpeculativePipeline(pipe, window=4)
    base = dict(
        prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=4, max_sequence_length=4
    )
    for output_type in ("pil", "np", "pt", "latent"):
        out = spec(generator=gen(0), output_type=output_type, **base)
        own = pipe(generator=gen(0), output_type=output_type, **base)
        assert type(out) is type(own)
        if output_type == "pil":
            assert [(im.size, im.mode) for im in out.images] == [
                (im.size, im.mode) for im in own.images
            ]
            continue
        assert type(out.images) is type(own.images) and out.images.shape == own.images.shape
        assert out.images.dtype == own.images.dtype
        if output_type != "latent":
            assert 0 <= out.images.min() <= out.images.max() <= 1
    (image,) = spec(generator=gen(0), output_type="np", return_dict=False, **base)
    assert image.shape == (4, SIZE, SIZE, 3)
    # dynamic shifting: the pipeline's mu from the image's token count, the same timesteps
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        stochastic_sampling=True, use_dynamic_shifting=True
    )
    spec(generator=gen(0), output_type="latent", **base)
    pipe(generator=gen(0), output_type="latent", **base)
    (sampler,) = spec._samplers.values()
    torch.testing.assert_close(
        sampler.transitions.timesteps.double(), pipe.scheduler.timesteps[:4].double()
    )


SD3_BAD_CALLS = [
    ({"sigmas": [1.0, 0.5]}, "cannot honour: sigmas"),
    ({"joint_attention_kwargs": {"scale": 0.5}}, "cannot honour: joint_attention_kwargs"),
    ({"skip_guidance_layers": [0]}, "cannot honour: skip_guidance_layers"),
    ({"callback_on_step_end": print}, "cannot honour: callback_on_step_end"),
    ({"negative_prompt_4": "x"}, "unexpected keyword argument(s) negative_prompt_4"),
]


@pytest.mark.parametrize("kwargs,message", SD3_BAD_CALLS, ids=[m[:30] for _, m in SD3_BAD_CALLS])
def test_sd3_refusals_are_one_line(kwargs, message):
    pipe = tiny_sd3_pipeline()
    count = CallCounter(pipe.transformer)
    with pytest.raises(TypeError) as err:
        SpeculativePipeline(pipe)(prompt="a cat", num_inference_steps=5, **kwargs)
    assert message in one_line(err)
    assert count.calls == 0


def test_sd3_deterministic_flow_scheduler_is_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_sd3_pipeline(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError) as err:
        SpeculativePipeline(pipe)("a cat", num_inference_steps=5, max_sequence_length=4)
    assert "stochastic_sampling=False" in one_line(err)

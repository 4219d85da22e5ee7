"""``SpeculativePipeline``: a diffusers unconditional image pipeline called as usual, sampled by
the speculative sampler; diffusers' own output type and post-processing, the law of the
pipeline's own loop.

Tiny random ``UNet2DModel`` pipelines (no downloads).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from preamble import gen

pytest.importorskip("diffusers", reason="diffusers is an optional extra")
from diffusers import (  # noqa: E402
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
)
from tiny_diffusers import tiny_unet  # noqa: E402

from specdiff_kernels import SpeculativeSampler  # noqa: E402
from specdiff_kernels.integrations import SpeculativePipeline  # noqa: E402
from specdiff_kernels.integrations.diffusers import from_pipeline  # noqa: E402

SIZE = 8


def ddpm_pipe(channels: int = 3, seed: int = 0) -> DDPMPipeline:
    pipe = DDPMPipeline(unet=tiny_unet(seed, channels), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dpm_pipe(channels: int = 3, seed: int = 0, **options) -> DDPMPipeline:
    sched = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **options)
    pipe = DDPMPipeline(unet=tiny_unet(seed, channels), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_output_types_and_post_processing():
    pipe = ddpm_pipe()
    spec = SpeculativePipeline(pipe, window=4)
    assert spec.last_stats is None
    out = spec(batch_size=3, generator=gen(1), num_inference_steps=20, output_type="pt")
    assert isinstance(out, ImagePipelineOutput)
    pt = out.images
    assert pt.shape == (3, 3, SIZE, SIZE) and float(pt.min()) >= 0 and float(pt.max()) <= 1
    assert spec.last_stats is not None and spec.last_stats.target_calls <= 20
    # the same samples as the sampler itself gives for this seed, DDPMPipeline's post-processing
    model, tr = from_pipeline(pipe, 20)
    ref = SpeculativeSampler(model, tr, window=4).sample(3, (3, SIZE, SIZE), generator=gen(1))
    torch.testing.assert_close(pt, (ref.samples / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    (arr,) = spec(3, gen(1), 20, output_type="np", return_dict=False)
    assert isinstance(arr, np.ndarray) and arr.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    pil = spec(batch_size=3, generator=gen(1), num_inference_steps=20).images
    assert [im.size for im in pil] == [(SIZE, SIZE)] * 3
    assert [im.mode for im in pil] == [im.mode for im in pipe.numpy_to_pil(arr)]
    np.testing.assert_array_equal(np.asarray(pil[0]), np.asarray(pipe.numpy_to_pil(arr)[0]))


def test_same_seed_same_images_and_the_sampler_is_reused():
    spec = SpeculativePipeline(ddpm_pipe(), window=2)
    a = spec(2, gen(5), 10, output_type="pt").images
    sampler = spec.sampler(10)
    b = spec(2, gen(5), 10, output_type="pt").images
    assert torch.equal(a, b) and spec.sampler(10) is sampler
    assert not torch.equal(a, spec(2, gen(6), 10, output_type="pt").images)


def test_default_steps_are_the_pipelines():
    assert SpeculativePipeline(ddpm_pipe())._default_steps() == 1000
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler())
    assert SpeculativePipeline(pipe)._default_steps() == 50


def test_a_new_scheduler_takes_effect():
    pipe = ddpm_pipe()
    spec = SpeculativePipeline(pipe, window=2)
    spec(1, gen(0), 10, output_type="pt")
    assert "ddpm" in spec.sampler(10).transitions.name
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="eta"):
        spec(1, gen(0), 10)
    spec(1, gen(0), 10, output_type="pt", eta=0.5)
    assert "ddim" in spec.sampler(10, 0.5).transitions.name


BAD_CALLS = [
    ({"guidance_scale": 3.0, "prompt": "x"}, TypeError, "guidance_scale, prompt"),
    ({"output_type": "latent"}, ValueError, "output_type must be one of"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
    ({"generator": [gen(0), gen(1)]}, TypeError, "a list of per-image generators"),
]


@pytest.mark.parametrize("kwargs,kind,message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_calls_are_one_line(kwargs, kind, message):
    spec = SpeculativePipeline(ddpm_pipe())
    with pytest.raises(kind) as err:
        spec(num_inference_steps=5, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_construction():
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) windw, transitions"):
        SpeculativePipeline(ddpm_pipe(), windw=4, transitions=None)
    with pytest.raises(TypeError, match="has no .unet"):
        SpeculativePipeline(object())
    with pytest.raises(TypeError, match="UniPCMultistepScheduler: deterministic"):
        from diffusers import UniPCMultistepScheduler

        pipe = ddpm_pipe()
        pipe.scheduler = UniPCMultistepScheduler()
        SpeculativePipeline(pipe)(1, num_inference_steps=5)


def pipeline_loop_samples(pipe, n: int, steps: int, seed: int) -> torch.Tensor:
    out = pipe(batch_size=n, generator=gen(seed), num_inference_steps=steps, output_type="np")
    return torch.from_numpy(out.images).permute(0, 3, 1, 2).double()


def sharp_dpm_pipe(channels: int = 1, seed: int = 3, **options) -> DDPMPipeline:
    """DPM++ 2M SDE on an x0-predicting UNet with outputs scaled up: x0-hat moves enough from
    step to step that the multistep term matters to the law (with a plain random eps-UNet, the
    first-order chain is indistinguishable in 240 samples)."""
    pipe = dpm_pipe(channels, seed, prediction_type="sample", **options)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(4.0)
        pipe.unet.conv_out.bias.mul_(4.0)
    return pipe


N_LAW, STEPS_LAW = 240, 16


def thresholded_dpm_pipe(channels: int = 1, seed: int = 3) -> DDPMPipeline:
    return sharp_dpm_pipe(channels, seed, thresholding=True, sample_max_value=1.5)


@pytest.mark.parametrize(
    "make",
    [ddpm_pipe, sharp_dpm_pipe, thresholded_dpm_pipe],
    ids=["ddpm", "dpm++2m-sde", "dpm++2m-sde-thresholding"],
)
def test_law_of_the_pipelines_own_loop(make):
    """The wrapper's images have the law of ``pipe(...)``'s own loop (two-sample test); with
    dynamic thresholding the chain is not affine in x0-hat and runs the ragged round."""
    from specdiff_kernels.testing.two_sample import two_sample_pvalue

    pipe = make(channels=1, seed=3)
    with torch.no_grad():
        ref = pipeline_loop_samples(pipe, N_LAW, STEPS_LAW, seed=5)
    spec = SpeculativePipeline(pipe, window=4)
    got = spec(N_LAW, gen(6), STEPS_LAW, output_type="pt").images.double()
    assert spec.last_stats.target_calls <= STEPS_LAW
    if isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        assert spec.sampler(STEPS_LAW).transitions.multistep
    if pipe.scheduler.config.get("thresholding"):
        assert spec.sampler(STEPS_LAW).resolve_path() == "ragged"
    p = two_sample_pvalue(got, ref, seed=0)
    assert p > 0.01, f"speculative images differ from the pipeline's own loop (p={p:.2g})"


def _first_order(tr):
    """The chain without its multistep term (the previous x0-hat's weight moved onto the
    current one)."""
    from specdiff_kernels.sampling.transitions import GaussianTransitions

    return GaussianTransitions(
        tr.timesteps,
        tr.c_x0 + tr.c_prev,
        tr.c_x,
        tr.std,
        tr.model_alpha,
        tr.model_sigma,
        prediction=tr.prediction,
    )


def _previous_not_thresholded(tr):
    """Thresholding the current x0-hat only (diffusers keeps the thresholded one)."""
    from specdiff_kernels.integrations.diffusers import _ThresholdedTransitions
    from specdiff_kernels.sampling.transitions import GaussianTransitions

    class CurrentOnly(_ThresholdedTransitions):
        def mean_from_x0(self, x, x0, k, prev=None):
            x0 = self.threshold(x0, max(1, k.dim()))
            return GaussianTransitions.mean_from_x0(self, x, x0, k, prev)

    tr.__class__ = CurrentOnly
    return tr


@pytest.mark.parametrize(
    "make,wrong",
    [(sharp_dpm_pipe, _first_order), (thresholded_dpm_pipe, _previous_not_thresholded)],
    ids=["dropped-previous-term", "previous-not-thresholded"],
)
def test_the_dpm_law_test_detects_a_wrong_chain(make, wrong):
    """The DPM cases above can fail: a chain that mishandles the previous x0-hat is far from
    the pipeline's own loop."""
    from specdiff_kernels.testing.two_sample import two_sample_pvalue

    pipe = make()
    with torch.no_grad():
        ref = pipeline_loop_samples(pipe, N_LAW, STEPS_LAW, seed=5)
    model, tr = from_pipeline(pipe, STEPS_LAW)
    res = SpeculativeSampler(model, wrong(tr), window=4).sample(
        N_LAW, (1, SIZE, SIZE), generator=gen(6)
    )
    got = (res.samples / 2 + 0.5).clamp(0, 1).double()
    assert two_sample_pvalue(got, ref, seed=0) < 1e-3

"""diffusers adapter: per-sample transitions equal what each scheduler's own ``step`` produces.

Uses a tiny randomly initialised UNet2DModel built from a config (no downloads).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional extra")
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler  # noqa: E402
from tiny_diffusers import tiny_unet  # noqa: E402

from specdiff_kernels.integrations.diffusers import DiffusersModel, diffusers_transitions  # noqa: E402

N_STEPS = 12


def unet_1ch(seed: int = 0, **config):
    """A tiny random UNet on one-channel 8 x 8 samples."""
    return tiny_unet(seed, channels=1, **config)


SCHEDULERS = {
    "ddpm-eps-small-clip": (
        lambda: DDPMScheduler(num_train_timesteps=1000, clip_sample=True),
        None,
    ),
    "ddpm-v-large": (
        lambda: DDPMScheduler(
            prediction_type="v_prediction",
            variance_type="fixed_large",
            clip_sample=False,
            beta_schedule="squaredcos_cap_v2",
        ),
        None,
    ),
    "ddpm-sample-threshold": (
        lambda: DDPMScheduler(
            prediction_type="sample", thresholding=True, sample_max_value=1.5, clip_sample=False
        ),
        None,
    ),
    "ddpm-eps-trailing": (
        lambda: DDPMScheduler(timestep_spacing="trailing", clip_sample=False),
        None,
    ),
    "ddim-eps-eta1": (lambda: DDIMScheduler(clip_sample=False), 1.0),
    "ddim-v-eta05-clip": (
        lambda: DDIMScheduler(
            prediction_type="v_prediction", clip_sample=True, clip_sample_range=0.8
        ),
        0.5,
    ),
    "euler-a-eps": (lambda: EulerAncestralDiscreteScheduler(), None),
    "euler-a-v-leading": (
        lambda: EulerAncestralDiscreteScheduler(
            prediction_type="v_prediction", timestep_spacing="leading"
        ),
        None,
    ),
}


def scheduler_step(sched, unet, x, i, eta, seed):
    """One step of the scheduler's own loop at step index i, noise from a seeded generator."""
    t = sched.timesteps[i]
    if isinstance(sched, EulerAncestralDiscreteScheduler):
        sched._step_index = None
    x_in = sched.scale_model_input(x, t)
    out = unet(x_in, t).sample
    g = torch.Generator().manual_seed(seed)
    kwargs = {"eta": eta} if eta is not None else {}
    return sched.step(out, t, x, generator=g, **kwargs).prev_sample


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_transition_matches_scheduler_step(name):
    make, eta = SCHEDULERS[name]
    unet = unet_1ch()
    model = DiffusersModel(unet)
    sched = make()
    tr = diffusers_transitions(sched, N_STEPS, eta=eta)
    sched.set_timesteps(N_STEPS)
    assert tr.num_steps == len(sched.timesteps) == N_STEPS
    gx = torch.Generator().manual_seed(1)
    scale = float(getattr(sched, "init_noise_sigma", 1.0))
    for i in (0, 1, N_STEPS // 2, N_STEPS - 2, N_STEPS - 1):
        x = scale * torch.randn(3, 1, 8, 8, generator=gx) * (1.0 - i / N_STEPS) + 0.1
        expect = scheduler_step(sched, unet, x, i, eta, seed=100 + i)
        k = torch.full((3,), i)
        mean = tr.mean(model, x, k)
        std = float(tr.std[i])
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        got = mean + std * noise
        torch.testing.assert_close(
            got,
            expect,
            rtol=2e-4,
            atol=2e-4 * max(1.0, scale),
            msg=f"{name}: step {i} differs from scheduler.step",
        )


@pytest.mark.parametrize("name", ["ddpm-eps-small-clip", "ddim-eps-eta1", "euler-a-eps"])
def test_per_sample_steps_match_scalar_steps(name):
    """A batch whose chains sit at different steps gives each chain its own step's mean."""
    make, eta = SCHEDULERS[name]
    model = DiffusersModel(unet_1ch())
    tr = diffusers_transitions(make(), N_STEPS, eta=eta)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    k = torch.tensor([0, 5, 3, N_STEPS - 1])
    batched = tr.mean(model, x, k)
    for b in range(4):
        single = tr.mean(model, x[b : b + 1], k[b : b + 1])
        torch.testing.assert_close(
            batched[b : b + 1], single, rtol=1e-4, atol=2e-4
        )  # conv numerics vary with batch size


def test_scheduler_is_not_mutated_and_ddpm_last_step_is_deterministic():
    sched = DDPMScheduler()
    tr = diffusers_transitions(sched, 10)
    assert sched.num_inference_steps is None
    assert float(tr.std[-1]) == 0.0 and bool((tr.std[:-1] > 0).all())


def test_learned_variance_is_refused():
    sched = DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="learned variances"):
        diffusers_transitions(sched, 10)
    model = DiffusersModel(unet_1ch(out_channels=2))
    with pytest.raises(ValueError, match="also predicts a variance"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([10, 20]))


def test_ddim_needs_positive_eta():
    with pytest.raises(ValueError, match="eta"):
        diffusers_transitions(DDIMScheduler(), 10)
    with pytest.raises(ValueError, match="deterministic"):
        diffusers_transitions(DDIMScheduler(), 10, eta=0.0)


def test_unsupported_scheduler():
    from diffusers import PNDMScheduler

    with pytest.raises(TypeError, match="unsupported scheduler"):
        diffusers_transitions(PNDMScheduler(), 10)


def scheduler_loop(sched, unet, n: int, seed: int, eta=None) -> torch.Tensor:
    """The scheduler's own ancestral sampling loop (batched, scalar timesteps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) * float(getattr(sched, "init_noise_sigma", 1.0))
    kwargs = {"eta": eta} if eta is not None else {}
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(out, t, x, generator=g, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("name", ["ddpm-eps-small-clip", "ddim-eps-eta1", "euler-a-eps"])
def test_speculative_through_adapter_matches_scheduler_loop(name):
    """Speculative sampling through the adapter has the law of the scheduler's own loop."""
    from specdiff_kernels import SpeculativeSampler
    from specdiff_kernels.testing.two_sample import two_sample_pvalue

    make, eta = SCHEDULERS[name]
    unet = unet_1ch(3)
    n, steps = 240, 16
    sched = make()
    sched.set_timesteps(steps)
    with torch.no_grad():
        ref = scheduler_loop(sched, unet, n, seed=5, eta=eta)
        tr = diffusers_transitions(make(), steps, eta=eta)
        res = SpeculativeSampler(DiffusersModel(unet), tr, window=4).sample(
            n, (1, 8, 8), generator=torch.Generator().manual_seed(6)
        )
    # one call per round, each round commits >= 1 step (a random UNet's drafts are poor, so few
    # are saved here; the savings are measured on trained models in the benchmarks)
    assert res.stats.target_calls <= steps
    p = two_sample_pvalue(res.samples, ref, seed=0)
    assert p > 0.01, f"{name}: speculative samples differ from the scheduler's loop (p={p:.2g})"

"""diffusers adapter: a UNet-style model plus a DDPM, DDIM (eta > 0) or Euler-ancestral scheduler
become the sampler's model and :class:`~specdiff_kernels.transitions.GaussianTransitions`.

diffusers' ``scheduler.step`` takes one scalar timestep for the whole batch; speculative sampling
needs per-chain steps (ragged batches, drafted windows), so the step's coefficients are tabulated
here from the scheduler's own ``timesteps``, ``alphas_cumprod`` and ``sigmas`` after
``set_timesteps``, and evaluated per sample. ``prediction_type``, ``clip_sample`` /
``clip_sample_range``, ``thresholding`` (dynamic thresholding) and ``variance_type`` are honoured.

Example::

    from diffusers import DDPMPipeline
    from specdiff_kernels.integrations.diffusers import from_pipeline
    model, transitions = from_pipeline(pipe, num_inference_steps=200)
    sampler = SpeculativeSampler(model, transitions, window=8)

Install with ``pip install specdiff_kernels[diffusers]``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..transitions import (GaussianTransitions, ddim_from_schedule, ddpm_transitions,
                           euler_ancestral_from_sigmas)

__all__ = ["DiffusersModel", "diffusers_transitions", "from_pipeline"]

_LEARNED = ("learned", "learned_range")


class DiffusersModel(torch.nn.Module):
    """``model(x, t) -> prediction`` around a diffusers model with the UNet call signature
    (``unet(sample, timestep).sample``), with ``t`` a per-sample ``[B]`` tensor.

    Models that predict a variance as extra channels are refused: speculative sampling needs the
    draft and target steps to share one covariance.
    """

    def __init__(self, unet: torch.nn.Module, **call_kwargs) -> None:
        super().__init__()
        self.unet = unet
        self.call_kwargs = call_kwargs

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.unet(x, t, return_dict=False, **self.call_kwargs)[0]
        if out.shape != x.shape:
            raise ValueError(
                f"DiffusersModel: the model returned shape {tuple(out.shape)} for input "
                f"{tuple(x.shape)}; a model that also predicts a variance (2x channels) is not "
                f"supported, because speculative sampling needs the draft and target steps to "
                f"share one covariance")
        return out


class _ThresholdedTransitions(GaussianTransitions):
    """Transitions whose x0_hat goes through diffusers' dynamic thresholding (Imagen):
    per sample, s = clamp(quantile(|x0|, ratio), 1, max); x0 <- clamp(x0, -s, s) / s."""

    def __init__(self, *args, ratio: float, max_value: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threshold_ratio = float(ratio)
        self.threshold_max = float(max_value)

    def threshold(self, x0: Tensor) -> Tensor:
        B = x0.shape[0]
        flat = x0.reshape(B, -1)
        work = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
        s = torch.quantile(work.abs(), self.threshold_ratio, dim=1)
        s = s.clamp(min=1.0, max=self.threshold_max).unsqueeze(1)
        return (torch.clamp(work, -s, s) / s).to(x0.dtype).reshape(x0.shape)

    def mean_from_x0(self, x: Tensor, x0: Tensor, k: Tensor) -> Tensor:
        return super().mean_from_x0(x, self.threshold(x0), k)


def _fresh(scheduler, num_inference_steps: Optional[int]):
    """A copy of the scheduler with timesteps set, so the caller's scheduler is not mutated."""
    sched = type(scheduler).from_config(scheduler.config)
    if num_inference_steps is not None:
        sched.set_timesteps(int(num_inference_steps))
    elif getattr(scheduler, "num_inference_steps", None):
        sched.set_timesteps(int(scheduler.num_inference_steps))
    else:
        raise ValueError("num_inference_steps must be given (the scheduler has no timesteps set)")
    return sched


def _with_thresholding(cfg, transitions: GaussianTransitions) -> GaussianTransitions:
    if not cfg.get("thresholding", False):
        return transitions
    t = transitions
    return _ThresholdedTransitions(
        t.timesteps, t.c_x0, t.c_x, t.std, t.model_alpha, t.model_sigma, c_eps=t.c_eps,
        input_scale=t.input_scale, prediction=t.prediction, clip_sample=None,
        eps_from_clipped_x0=t.eps_from_clipped_x0, init_std=t.init_std, name=t.name + "+threshold",
        ratio=cfg.get("dynamic_thresholding_ratio", 0.995),
        max_value=cfg.get("sample_max_value", 1.0))


def _clip(cfg) -> Optional[float]:
    if cfg.get("thresholding", False) or not cfg.get("clip_sample", False):
        return None
    return float(cfg.get("clip_sample_range", 1.0))


def _ddpm(sched) -> GaussianTransitions:
    cfg = sched.config
    vt = cfg.variance_type
    if vt in _LEARNED:
        raise ValueError(f"DDPMScheduler variance_type={vt!r}: learned variances make the draft and "
                         f"target steps' covariances differ, which speculative sampling cannot verify")
    if vt not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ValueError(f"DDPMScheduler variance_type={vt!r} is not supported; use 'fixed_small', "
                         f"'fixed_small_log' or 'fixed_large'")
    # fixed_small_log draws with std sqrt(beta_tilde), exactly as fixed_small (diffusers 0.3x)
    variance = "fixed_large" if vt == "fixed_large" else "fixed_small"
    tr = ddpm_transitions(sched.alphas_cumprod.double(), timesteps=sched.timesteps.long(),
                          prediction=cfg.prediction_type, variance=variance, clip_sample=_clip(cfg))
    return _with_thresholding(cfg, tr)


def _ddim(sched, eta: float) -> GaussianTransitions:
    cfg = sched.config
    if eta <= 0:
        raise ValueError("DDIMScheduler with eta = 0 is deterministic: there is nothing to "
                         "speculate; pass eta > 0")
    tr = ddim_from_schedule(sched.alphas_cumprod.double(), sched.timesteps.long(),
                            cfg.num_train_timesteps // sched.num_inference_steps,
                            sched.final_alpha_cumprod, eta=eta, prediction=cfg.prediction_type,
                            clip_sample=_clip(cfg), eps_from_clipped_x0=False,
                            name=f"diffusers-ddim[eta={eta}]")
    return _with_thresholding(cfg, tr)


def _euler_ancestral(sched) -> GaussianTransitions:
    cfg = sched.config
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"EulerAncestralDiscreteScheduler prediction_type="
                         f"{cfg.prediction_type!r} is not supported by diffusers either")
    return euler_ancestral_from_sigmas(sched.timesteps.double(), sched.sigmas.double(),
                                       prediction=cfg.prediction_type,
                                       init_std=float(sched.init_noise_sigma),
                                       name="diffusers-euler-ancestral")


def diffusers_transitions(scheduler, num_inference_steps: Optional[int] = None, *,
                          eta: Optional[float] = None,
                          use_clipped_model_output: bool = False) -> GaussianTransitions:
    """Tabulate a diffusers scheduler's ancestral step for per-sample use.

    Args:
        scheduler: a ``DDPMScheduler``, ``DDIMScheduler`` or ``EulerAncestralDiscreteScheduler``
            (not mutated: a copy gets ``set_timesteps``).
        num_inference_steps: sampling steps (default: the scheduler's, if already set).
        eta: DDIM's eta (required for DDIM, > 0).
        use_clipped_model_output: DDIM's flag of the same name.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler

    sched = _fresh(scheduler, num_inference_steps)
    if not isinstance(sched, DDIMScheduler):
        # DDPM and Euler-ancestral steps have a fixed variance: an eta would be silently ignored
        if eta is not None:
            raise ValueError(f"eta applies to DDIMScheduler only, not to {type(scheduler).__name__}")
        if use_clipped_model_output:
            raise ValueError(f"use_clipped_model_output applies to DDIMScheduler only, not to "
                             f"{type(scheduler).__name__}")
    if isinstance(sched, DDPMScheduler):
        return _ddpm(sched)
    if isinstance(sched, DDIMScheduler):
        if eta is None:
            raise ValueError("DDIMScheduler: pass eta (> 0); diffusers' step takes it per call")
        tr = _ddim(sched, float(eta))
        tr.eps_from_clipped_x0 = bool(use_clipped_model_output)
        return tr
    if isinstance(sched, EulerAncestralDiscreteScheduler):
        return _euler_ancestral(sched)
    raise TypeError(f"unsupported scheduler {type(scheduler).__name__}; supported: DDPMScheduler, "
                    f"DDIMScheduler (eta > 0), EulerAncestralDiscreteScheduler")


def from_pipeline(pipe, num_inference_steps: int, *, eta: Optional[float] = None):
    """``(model, transitions)`` from a diffusers pipeline with ``.unet`` and ``.scheduler``."""
    return (DiffusersModel(pipe.unet),
            diffusers_transitions(pipe.scheduler, num_inference_steps, eta=eta))

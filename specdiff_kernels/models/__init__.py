"""Embedded models: everything ships in the package, nothing is downloaded.

* ``gmm``: a Gaussian mixture with its EXACT denoiser (any dimension): the target whose law is
  known. Its draft model is the denoiser of the moment-matched (diagonal) Gaussian: affine, so
  cheap, and trained on nothing.
* ``digits``: a DDPM (eps-prediction, 1000-step linear schedule) trained on scikit-learn's bundled
  8x8 digits by ``python -m specdiff_kernels.models.train digits``, with a smaller, independently trained
  draft model.
* ``patches`` (:mod:`specdiff_kernels.models.patches`, not through ``load``): a real diffusers
  ``DDPMPipeline`` (UNet2DModel + DDPMScheduler) in ``save_pretrained`` layout, trained by
  ``python -m specdiff_kernels.models.train patches`` on crops of scikit-image's photographs; load it with
  ``patches.load_pipeline()`` or ``DDPMPipeline.from_pretrained(patches.pipeline_dir())``.

``load(name)`` returns an :class:`EmbeddedModel` with the target, the draft model and a
``transitions(num_steps)`` factory over the model's training schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..sampling.transitions import (
    GaussianTransitions,
    alphas_cumprod_from_betas,
    ddim_transitions,
    ddpm_transitions,
    euler_ancestral_transitions,
    make_betas,
)

__all__ = ["EmbeddedModel", "TRAIN_TIMESTEPS", "available", "load"]

# Length of both embedded models' training schedule: the most sampling steps they can take.
TRAIN_TIMESTEPS = 1000


@dataclass
class EmbeddedModel:
    """A target network, an optional cheaper draft network and their shared training schedule."""

    name: str
    target: nn.Module
    draft: Optional[nn.Module]
    event_shape: tuple[int, ...]
    alphas_cumprod: Tensor  # training schedule, float64 [T]
    prediction: str  # "epsilon" | "sample" | "v_prediction"
    clip_sample: Optional[float] = None  # DDPM-style x0 clipping range (None: off)
    description: str = ""
    data: Optional[Callable[..., Tensor]] = field(default=None, repr=False)  # data(n, generator)

    def transitions(self, num_steps: int, sampler: str = "ddpm", **kwargs) -> GaussianTransitions:
        """The chain over ``num_steps`` respaced steps of the training schedule.

        ``sampler``: ``"ddpm"`` (default; fixed_small variance), ``"ddim"`` (pass ``eta`` > 0) or
        ``"euler_ancestral"``.
        """
        if sampler == "ddpm":
            return ddpm_transitions(
                self.alphas_cumprod,
                num_inference_steps=num_steps,
                prediction=self.prediction,
                clip_sample=self.clip_sample,
                **kwargs,
            )
        if sampler == "ddim":
            return ddim_transitions(
                self.alphas_cumprod,
                num_inference_steps=num_steps,
                prediction=self.prediction,
                clip_sample=self.clip_sample,
                **kwargs,
            )
        if sampler == "euler_ancestral":
            return euler_ancestral_transitions(
                self.alphas_cumprod,
                num_inference_steps=num_steps,
                prediction=self.prediction,
                **kwargs,
            )
        raise ValueError(f"sampler must be 'ddpm', 'ddim' or 'euler_ancestral', got {sampler!r}")


def _load_gmm(dim: int = 64, components: int = 8, seed: int = 0, **_) -> EmbeddedModel:
    from .gmm import GaussianMixture, GMMDenoiser, make_gmm

    abar = alphas_cumprod_from_betas(make_betas("linear", TRAIN_TIMESTEPS))
    gmm = make_gmm(int(dim), K=int(components), seed=int(seed))
    moment_matched = GaussianMixture(gmm.mean()[None], gmm.variance().sqrt()[None])
    return EmbeddedModel(
        name="gmm",
        target=GMMDenoiser(gmm, abar, prediction="epsilon"),
        draft=GMMDenoiser(moment_matched, abar, prediction="epsilon"),
        event_shape=(int(dim),),
        alphas_cumprod=abar,
        prediction="epsilon",
        description=f"analytic {components}-component Gaussian mixture, D={dim}, exact denoiser; "
        f"draft: moment-matched Gaussian denoiser",
        data=lambda n, generator=None: gmm.sample(n, generator=generator).float(),
    )


def _load_digits(device="cpu", dtype=torch.float32, **_) -> EmbeddedModel:
    from .digits import digits_alphas_cumprod, digits_dataset, load_digits_draft, load_digits_target

    data_cache: dict = {}

    def data(n, generator=None):
        if "x" not in data_cache:
            data_cache["x"] = digits_dataset()
        x = data_cache["x"]
        idx = torch.randperm(x.shape[0], generator=generator)[:n]
        return x[idx]

    return EmbeddedModel(
        name="digits",
        target=load_digits_target(device, dtype),
        draft=load_digits_draft(device, dtype),
        event_shape=(1, 8, 8),
        alphas_cumprod=digits_alphas_cumprod(),
        prediction="epsilon",
        clip_sample=1.0,
        description="DDPM (eps-prediction, 1000-step linear betas) trained on sklearn's 8x8 digits; "
        "draft: independently trained smaller network",
        data=data,
    )


_REGISTRY = {"gmm": _load_gmm, "digits": _load_digits}


def available() -> list[str]:
    return sorted(_REGISTRY)


def load(name: str, **kwargs) -> EmbeddedModel:
    """Load an embedded model by name (``"digits"`` or ``"gmm"``; ``gmm`` takes ``dim=``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available()}")
    return _REGISTRY[name](**kwargs)

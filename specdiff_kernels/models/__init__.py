"""Embedded models: everything ships in the package, nothing is downloaded.

* ``gmm``: a Gaussian mixture with its EXACT denoiser (any dimension): the target whose law is
  known. Its draft model is the denoiser of the moment-matched (diagonal) Gaussian: affine, so
  cheap, and trained on nothing.
* ``digits``: a DDPM (eps-prediction, 1000-step linear schedule) trained on scikit-learn's bundled
  8x8 digits by ``python -m specdiff_kernels.models.train digits``, with a smaller, independently trained
  draft model.
* ``digits-flow``: a rectified-flow model (velocity prediction, ``x_t = (1 - t) x0 + t eps``,
  called with timestep ``1000 t``) of the same data, with the digits networks' architectures,
  trained by ``python -m specdiff_kernels.models.train digits-flow``; no ``alphas_cumprod``: sample
  it with the flow families (``"flow-euler"``, ``"flow-sde"``).
* ``patches`` (:mod:`specdiff_kernels.models.patches`, not through ``load``): a real diffusers
  ``DDPMPipeline`` (UNet2DModel + DDPMScheduler) in ``save_pretrained`` layout, trained by
  ``python -m specdiff_kernels.models.train patches`` on crops of scikit-image's photographs; load it with
  ``patches.load_pipeline()`` or ``DDPMPipeline.from_pretrained(patches.pipeline_dir())``.

* ``pusht``: a Diffusion Policy (conditional 1-D temporal UNet, DDPM 100 steps, cosine
  schedule) for gym-pusht's PushT task, trained by ``python -m specdiff_kernels.models.train
  pusht`` on demonstrations of a scripted expert (:mod:`specdiff_kernels.models.pusht`). Its
  network is called as ``model(x, t, obs=...)``; the loaded model also has ``.policy``,
  ``normalize_obs``, ``unnormalize_action`` and ``obs_condition``. Running the environment needs
  ``pip install 'specdiff_kernels[policy]'``; loading the policy does not.

``load(name)`` returns an :class:`EmbeddedModel` with the target, the draft model and a
``transitions(num_steps)`` factory over the model's training schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..sampling.families import family
from ..sampling.transitions import (
    GaussianTransitions,
    alphas_cumprod_from_betas,
    make_betas,
)
from ..validate import as_int

__all__ = [
    "EmbeddedModel",
    "TRAIN_TIMESTEPS",
    "available",
    "digits_flow_schedule",
    "digits_schedule",
    "load",
]

# Length of both embedded models' training schedule: the most sampling steps they can take.
TRAIN_TIMESTEPS = 1000


@dataclass
class EmbeddedModel:
    """A target network, an optional cheaper draft network and their shared training schedule."""

    name: str
    target: nn.Module
    draft: Optional[nn.Module]
    event_shape: tuple[int, ...]
    alphas_cumprod: Optional[Tensor]  # training schedule, float64 [T]; None: a flow model
    prediction: str  # "epsilon" | "sample" | "v_prediction" | "flow_prediction"
    clip_sample: Optional[float] = None  # DDPM-style x0 clipping range (None: off)
    description: str = ""
    data: Optional[Callable[..., Tensor]] = field(default=None, repr=False)  # data(n, generator)
    # a flow model (prediction "flow_prediction", alphas_cumprod None) is called as
    # model(x_t, num_train_timesteps * t), x_t = (1 - t) x0 + t eps
    num_train_timesteps: int = TRAIN_TIMESTEPS

    @property
    def flow(self) -> bool:
        """Whether this is a rectified-flow model (sampled by the flow families)."""
        return self.alphas_cumprod is None

    @property
    def default_sampler(self) -> str:
        """DDPM for a diffusion model, FlowMatch Euler (stochastic) for a flow model: the step of
        the diffusers scheduler each kind ships with."""
        return "flow-euler" if self.flow else "ddpm"

    def transitions(
        self, num_steps: int, sampler: Optional[str] = None, **kwargs
    ) -> GaussianTransitions:
        """The chain over ``num_steps`` respaced steps of the training schedule.

        ``sampler``: a sampler family (:mod:`specdiff_kernels.sampling.families`): ``"ddpm"``
        (default for a diffusion model; fixed_small variance), ``"ddim"`` (pass ``eta`` > 0), ``"euler-a"`` (or
        ``"euler_ancestral"``) or ``"dpm++2m-sde"``; a flow model (``alphas_cumprod`` None,
        prediction ``"flow_prediction"``) takes ``"flow-euler"`` or ``"flow-sde"`` (``shift``,
        ``noise_level``; default ``"flow-euler"``) and only those. ``kwargs``: the family's options
        (``Family.options``: ``spacing``, ``steps_offset``; ``variance`` for DDPM; ``eta``,
        ``set_alpha_to_one``, ``use_clipped_model_output`` for DDIM; ``init_std`` for
        Euler-ancestral; ``sigma_schedule``, ``solver_order``, ... for DPM++ 2M SDE); the
        schedule, prediction and clipping are the model's own (clipping where the family clips,
        as diffusers' scheduler of that family).
        """
        if sampler is None:
            sampler = self.default_sampler
        fam = family(sampler, "sampler")
        fam.check_model(self.flow, self.prediction)
        top = None if self.flow else int(self.alphas_cumprod.numel())
        num_steps = as_int("num_steps", num_steps, 1, top)
        for key in kwargs:
            if key not in fam.options:
                # the model's schedule/prediction/clipping would be overridden or, for betas
                # next to alphas_cumprod, silently ignored
                why = "is the model's own" if key in _MODEL_FIXED else "is not an option"
                raise TypeError(
                    f"EmbeddedModel.transitions got an unexpected keyword argument {key!r}: it "
                    f"{why}; the options of sampler {fam.name!r} are {', '.join(fam.options)}"
                )
        flow = {"num_train_timesteps": self.num_train_timesteps} if self.flow else {}
        return fam.build(
            self.alphas_cumprod,
            num_steps,
            prediction=self.prediction,
            clip_sample=self.clip_sample,
            **flow,
            **kwargs,
        )


_MODEL_FIXED = ("alphas_cumprod", "betas", "num_inference_steps", "timesteps", "prediction")
_MODEL_FIXED += ("clip_sample", "num_train_timesteps")


def _load_gmm(dim: int = 64, components: int = 8, seed: int = 0) -> EmbeddedModel:
    from .gmm import GaussianMixture, GMMDenoiser, make_gmm

    dim = as_int("dim", dim, 1)
    components = as_int("components", components, 1)
    seed = as_int("seed", seed, 0)
    if seed >= 2**64:
        raise ValueError(f"seed must be < 2**64 (a torch generator seed), got {seed}")

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


def _check_device(device) -> torch.device:
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from None
    if dev.type == "cuda" and not (
        torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    ):
        raise ValueError(
            f"device {device!r} is not available (CUDA devices: {torch.cuda.device_count()})"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
    return dev


def _load_digits(device="cpu", dtype=torch.float32) -> EmbeddedModel:
    from . import digits
    from .digits import digits_dataset

    device = _check_device(device)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")

    data_cache: dict = {}

    def data(n, generator=None):
        if "x" not in data_cache:
            data_cache["x"] = digits_dataset()
        x = data_cache["x"]
        idx = torch.randperm(x.shape[0], generator=generator)[:n]
        return x[idx]

    return replace(
        digits_schedule(),
        target=digits.load_digits_target(device, dtype),
        draft=digits.load_digits_draft(device, dtype),
        data=data,
    )


def digits_schedule() -> EmbeddedModel:
    """The ``digits`` model without its networks (target and draft None, no weights read): its
    training schedule, prediction, clipping and event shape, so its ``transitions`` can be built
    (``specdiff sample`` checks its arguments before loading anything)."""
    from .digits import digits_alphas_cumprod

    return EmbeddedModel(
        name="digits",
        target=None,
        draft=None,
        event_shape=(1, 8, 8),
        alphas_cumprod=digits_alphas_cumprod(),
        prediction="epsilon",
        clip_sample=1.0,
        description="DDPM (eps-prediction, 1000-step linear betas) trained on sklearn's 8x8 digits; "
        "draft: independently trained smaller network",
    )


def digits_flow_schedule() -> EmbeddedModel:
    """The ``digits-flow`` model without its networks (no weights read), as
    :func:`digits_schedule`."""
    return EmbeddedModel(
        name="digits-flow",
        target=None,
        draft=None,
        event_shape=(1, 8, 8),
        alphas_cumprod=None,
        prediction="flow_prediction",
    )


def _load_digits_flow(device="cpu", dtype=torch.float32) -> EmbeddedModel:
    from . import digits

    device = _check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    data_cache: dict = {}

    def data(n, generator=None):
        if "x" not in data_cache:
            data_cache["x"] = digits.digits_dataset()
        x = data_cache["x"]
        return x[torch.randperm(x.shape[0], generator=generator)[:n]]

    return EmbeddedModel(
        name="digits-flow",
        target=digits.load_digits_model(
            digits.WEIGHTS_DIR / digits.FLOW_TARGET_FILE, device, dtype
        ),
        draft=digits.load_digits_model(digits.WEIGHTS_DIR / digits.FLOW_DRAFT_FILE, device, dtype),
        event_shape=(1, 8, 8),
        alphas_cumprod=None,  # a flow model: no VP schedule (x_t = (1 - t) x0 + t eps)
        prediction="flow_prediction",
        description="rectified flow (velocity prediction, timestep 1000 t) trained on sklearn's "
        "8x8 digits; draft: independently trained smaller network",
        data=data,
    )


def _load_pusht(device="cpu", dtype=torch.float32) -> EmbeddedModel:
    from . import pusht

    device = _check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return pusht.load_policy(device=device, dtype=dtype)


_REGISTRY = {
    "gmm": _load_gmm,
    "digits": _load_digits,
    "digits-flow": _load_digits_flow,
    "pusht": _load_pusht,
}
_LOAD_OPTIONS = {
    "gmm": ("dim", "components", "seed"),
    "digits": ("device", "dtype"),
    "digits-flow": ("device", "dtype"),
    "pusht": ("device", "dtype"),
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def load(name: str, **kwargs) -> EmbeddedModel:
    """Load an embedded model by name (``"digits"``, ``"digits-flow"``, ``"gmm"`` or ``"pusht"``;
    ``gmm`` takes ``dim=``)."""
    if not isinstance(name, str):
        raise TypeError(f"models.load: name must be a str, one of {available()}, got {name!r}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; available: {available()}")
    for key in kwargs:
        if key not in _LOAD_OPTIONS[name]:
            raise TypeError(
                f"models.load({name!r}) got an unexpected keyword argument {key!r}; it takes "
                f"{', '.join(_LOAD_OPTIONS[name])}"
            )
    return _REGISTRY[name](**kwargs)

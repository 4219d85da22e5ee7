"""diffusers adapter: a UNet-style model plus a DDPM, DDIM (eta > 0), Euler-ancestral or
SDE-DPM-Solver++ (``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``, "DPM++ 2M
SDE") scheduler become the sampler's model and
:class:`~specdiff_kernels.sampling.transitions.GaussianTransitions`.

diffusers' ``scheduler.step`` takes one scalar timestep for the whole batch; speculative sampling
needs per-chain steps (ragged batches, drafted windows), so the step's coefficients are tabulated
here from the scheduler's own ``timesteps``, ``alphas_cumprod`` and ``sigmas`` after
``set_timesteps``, and evaluated per sample. ``prediction_type``, ``clip_sample`` /
``clip_sample_range``, ``thresholding`` (dynamic thresholding) and ``variance_type`` are honoured;
for DPM-Solver every sigma option (Karras, exponential, beta, Lu lambdas, ``final_sigmas_type``,
``timestep_spacing``) through the scheduler's own ``sigmas``, and ``solver_order`` 1 or 2,
``solver_type``, ``lower_order_final`` and ``euler_at_final``. Deterministic solvers (DDIM with
eta = 0, DPM-Solver++ ODE, UniPC, FlowMatch Euler without ``stochastic_sampling``, ...) are
refused: there is no noise to speculate over. Rectified-flow models (``flow_prediction``) take
``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` (``shift``, dynamic shifting with
``mu=``, ``shift_terminal``, Karras / exponential / beta sigmas); every other scheduler is refused
with its reason.

Conditioning (``class_labels``, ``encoder_hidden_states``, ...) is passed per chain through the
samplers' ``model_kwargs``; classifier-free guidance (``DiffusersModel(unet, guidance_scale=w,
uncond=...)``) evaluates both branches in one batched UNet call. The guided prediction is a
deterministic function of the state, so the sampler stays exact. Transformers (DiT, SD3, ...) are
called as ``transformer(hidden_states, timestep, ...)`` by :class:`DiffusersTransformerModel`,
with the same conditioning and guidance; ``SpeculativePipeline`` (``.pipeline``) runs
``DiTPipeline``, ``StableDiffusionPipeline`` and ``StableDiffusion3Pipeline`` as called.

Example::

    from diffusers import DDPMPipeline
    from specdiff_kernels.integrations.diffusers import from_pipeline
    model, transitions = from_pipeline(pipe, num_inference_steps=200)
    sampler = SpeculativeSampler(model, transitions, window=8)

    # class-conditional UNet with a null class (id 10) and guidance 4:
    model = DiffusersModel(unet, guidance_scale=4.0, uncond={"class_labels": 10})
    res = SpeculativeSampler(model, transitions, window=8).sample(
        64, (3, 32, 32), model_kwargs={"class_labels": labels})     # labels: [64] long

Install with ``pip install specdiff_kernels[diffusers]``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from typing import Any, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from ..sampling.edm import (
    EDM_SCHEDULES,
    brownian_tree_noise_var,
    edm_dpmsolver_sde_from_sigmas,
    euler_churn_from_sigmas,
)
from ..sampling.families import FAMILIES, NAMES, Family, canonical, family
from ..sampling.transitions import (
    FINAL_SIGMAS,
    SOLVER_TYPES,
    SPACINGS,
    VP_PREDICTIONS,
    GaussianTransitions,
    as_clip,
    check_betas,
    check_steps_offset,
    ddim_from_schedule,
    ddpm_transitions,
    dpmsolver_sde_from_sigmas,
    euler_ancestral_from_sigmas,
    flow_euler_from_sigmas,
)
from ..validate import as_choice, as_flag, as_int, as_real

__all__ = [
    "DiffusersModel",
    "DiffusersTransformerModel",
    "diffusers_transitions",
    "from_pipeline",
    "scheduler_from_config",
]

_LEARNED = ("learned", "learned_range")
# the UNet call's own arguments (DiffusersModel._call passes them)
_RESERVED = ("sample", "timestep", "return_dict")


class DiffusersModel(torch.nn.Module):
    """``model(x, t, **cond) -> prediction`` around a diffusers model with the UNet call signature
    (``unet(sample, timestep, ...)``), with ``t`` a per-sample ``[B]`` tensor.

    **Conditioning.** Keyword arguments of a call (``class_labels``, ``encoder_hidden_states``,
    ``added_cond_kwargs={...}``, ...) are passed on to the UNet; tensors among them must have one
    row per state of ``x``. The samplers supply them per chain: ``sample(...,
    model_kwargs={"class_labels": labels})`` with ``labels[c]`` chain c's label, and every network
    call gets the rows of the chains it evaluates. ``call_kwargs`` given to the constructor are
    fixed arguments passed unchanged to every call (e.g. ``cross_attention_kwargs``); a name may
    not be both fixed and per-call.

    **Classifier-free guidance** (``guidance_scale=w``, ``w != 1``): the prediction is
    ``u + w (c - u)`` with ``c`` the UNet's raw output under the call's conditioning and ``u``
    under the unconditional inputs, both from ONE UNet call on the doubled batch
    ``[x, x]`` with ``[uncond, cond]``, exactly as diffusers' pipelines guide the raw model output
    (eps, v or x0, whichever the model predicts). The guided prediction is a deterministic function
    of the state, so speculative sampling stays exact. Unconditional inputs, by name:

    * ``uncond={"class_labels": null_id}`` (DiT-style null class) or
      ``uncond={"encoder_hidden_states": negative_embeds}`` (``[S, D]`` or ``[1, S, D]``): one value
      for every state (broadcast);
    * per chain: ``sample(..., model_kwargs={"encoder_hidden_states": emb, "uncond":
      {"encoder_hidden_states": neg}})`` with ``neg`` one row per chain; these override the
      constructor's values of the same name.

    Conditioning without an unconditional counterpart (e.g. ``added_cond_kwargs["time_ids"]``
    where only ``text_embeds`` has one) is the same in both branches. With ``w = 1`` (or ``None``)
    there is one branch and no doubling (unconditional inputs are accepted and unused). Unlike diffusers' pipelines, which skip guidance for
    ``w <= 1``, any finite ``w != 1`` is applied (``w = 0`` samples the unconditional model).
    A draft network (``DraftModelDraft``) receives the same per-chain kwargs: wrap it the same way,
    with its own ``guidance_scale`` (``1.0`` for an unguided draft that accepts ``uncond``).

    Models that predict a variance as extra channels are refused: speculative sampling needs the
    draft and target steps to share one covariance. Diffusers models that are not called as
    ``unet(sample, timestep, ...)`` (``Transformer2DModel``, ``DiTTransformer2DModel``,
    ``SD3Transformer2DModel``, a VAE, ...) are refused at construction: transformers go in
    :class:`DiffusersTransformerModel`.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        guidance_scale: Optional[float] = None,
        uncond: Optional[Mapping[str, Any]] = None,
        **call_kwargs,
    ) -> None:
        super().__init__()
        if not callable(unet):
            raise TypeError(
                f"DiffusersModel: unet must be a callable model (a diffusers UNet), got "
                f"{type(unet).__name__}"
            )
        self._check_network(unet)
        for name in self.reserved:
            if name in call_kwargs:
                raise TypeError(
                    f"DiffusersModel: {name!r} is set by the sampler on every call; it cannot be "
                    f"a fixed call argument"
                )
        _check_call_kwargs(unet, call_kwargs)
        self.unet = unet
        self.call_kwargs = call_kwargs
        self.guidance_scale = (
            None
            if guidance_scale is None
            else as_real("DiffusersModel: guidance_scale", guidance_scale)
        )
        self.uncond = {} if uncond is None else _as_uncond(uncond, "uncond")
        if self.uncond and self.guidance_scale is None:
            raise ValueError(
                "DiffusersModel: uncond is given without guidance_scale; pass "
                "guidance_scale (1 = conditional only) to use it"
            )
        for name in self.uncond:
            if name in call_kwargs:
                raise ValueError(
                    f"DiffusersModel: {name!r} is a fixed call argument; uncond "
                    f"applies to per-call conditioning only"
                )
        _check_null_class(unet, self.uncond.get("class_labels"))

    # the network call's own arguments (set by _call on every call)
    reserved = _RESERVED

    def _check_network(self, net) -> None:
        _check_unet_style(net)

    @property
    def guided(self) -> bool:
        """Whether calls evaluate two branches (``guidance_scale`` set and != 1)."""
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    def forward(
        self, x: Tensor, t: Tensor, *, uncond: Optional[Mapping[str, Any]] = None, **cond
    ) -> Tensor:
        B = x.shape[0]
        for name in cond:
            if name in self.call_kwargs:
                raise ValueError(
                    f"DiffusersModel: {name!r} is given both as a fixed call argument and per call"
                )
        _check_rows(cond, B, "")
        if uncond is not None:
            if self.guidance_scale is None:
                raise ValueError(
                    "DiffusersModel: per-call uncond is given but the model has no "
                    "guidance_scale; pass guidance_scale to DiffusersModel"
                )
            uncond = _as_uncond(uncond, "uncond")
        if not self.guided:
            return self._call(x, t, cond)
        if not self.uncond and not uncond:
            raise ValueError(
                f"DiffusersModel: guidance_scale={self.guidance_scale} needs "
                f"unconditional inputs: pass uncond={{...}} to DiffusersModel or "
                f"model_kwargs={{'uncond': {{...}}}} to sample()"
            )
        null = _unconditional(cond, self.uncond, uncond, B)
        both = _double(cond, null)
        out = self._call(torch.cat([x, x]), torch.cat([t, t]) if t.numel() > 1 else t, both)
        out_u, out_c = out.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def _call(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        out = self.unet(x, t, return_dict=False, **self.call_kwargs, **cond)[0]
        return _same_shape(out, x)


class DiffusersTransformerModel(DiffusersModel):
    """:class:`DiffusersModel` for a diffusers transformer, called as ``transformer(
    hidden_states=x, timestep=t, **cond)`` (``DiTTransformer2DModel``, ``Transformer2DModel``,
    ``SD3Transformer2DModel``, ...): the same per-chain conditioning, fixed call arguments and
    classifier-free guidance on one doubled batch (SD3: ``encoder_hidden_states`` and
    ``pooled_projections``, both with unconditional counterparts; DiT: ``class_labels`` with the
    null class as ``uncond={"class_labels": 1000}``).

    ``channels``: how many leading output channels are the prediction (default: all, and the
    output must have the input's shape). A DiT that learns its variance (``out_channels = 2 x
    in_channels``) returns it in the trailing channels; ``DiTPipeline`` guides the leading
    (noise) channels and drops the rest before the scheduler's step, and so does
    ``channels=in_channels``: the chain's covariance stays the scheduler's fixed one.
    """

    reserved = ("hidden_states", "timestep", "return_dict")

    def __init__(
        self,
        transformer: torch.nn.Module,
        *,
        channels: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        uncond: Optional[Mapping[str, Any]] = None,
        **call_kwargs,
    ) -> None:
        super().__init__(transformer, guidance_scale=guidance_scale, uncond=uncond, **call_kwargs)
        self.channels = (
            None if channels is None else as_int("DiffusersTransformerModel: channels", channels, 1)
        )

    def _check_network(self, net) -> None:
        _check_transformer_style(net)

    def _call(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        out = self.unet(hidden_states=x, timestep=t, return_dict=False, **self.call_kwargs, **cond)
        out = out[0]
        if self.channels is not None:
            out = out[:, : self.channels]
        return _same_shape(out, x)


def _same_shape(out: Tensor, x: Tensor) -> Tensor:
    """The network's prediction for states x, refused when it is not x's shape."""
    if out.shape != x.shape:
        raise ValueError(
            f"DiffusersModel: the model returned shape {tuple(out.shape)} for input "
            f"{tuple(x.shape)}; a model that also predicts a variance (2x channels) is not "
            f"supported, because speculative sampling needs the draft and target steps to "
            f"share one covariance (a DiT's learned variance is dropped, as DiTPipeline does, "
            f"by DiffusersTransformerModel(..., channels=in_channels))"
        )
    return out


TRANSFORMERS_NOT_YET = (
    "transformer models are not supported yet (UNet-style models called as "
    "unet(sample, timestep, ...) are: UNet2DModel, UNet2DConditionModel)"
)
# where a transformer is supported: DiffusersModel's refusal names it
USE_TRANSFORMER_MODEL = (
    "use DiffusersTransformerModel for transformers, or SpeculativePipeline(pipe) for "
    "DiTPipeline and StableDiffusion3Pipeline"
)


def _is_diffusers_model(module) -> bool:
    return any(
        c.__name__ == "ModelMixin" and c.__module__.startswith("diffusers")
        for c in type(module).__mro__
    )


def _check_unet_style(unet) -> None:
    """A diffusers model that is not called as ``unet(sample, timestep, ...)`` (a DiT, SD3 or
    other transformer, a VAE) is refused here in one line, not 28 frames deep in diffusers at the
    first network call."""
    if not _is_diffusers_model(unet):
        return  # the user's own network: its call is its own contract
    name = type(unet).__name__
    try:
        params = [
            n
            for n, p in inspect.signature(unet.forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = None
    if "Transformer" in name or (params and params[0] == "hidden_states"):
        raise TypeError(
            f"DiffusersModel: {name} is a transformer model (called as "
            f"{name}(hidden_states, ...)), not a UNet-style one; {USE_TRANSFORMER_MODEL}"
        )
    if params is not None and params[:2] != ["sample", "timestep"]:
        raise TypeError(
            f"DiffusersModel: {name} is not a UNet-style denoiser (its forward takes "
            f"({', '.join(params[:2])}, ...), not (sample, timestep, ...)); only UNet-style "
            f"models are supported (UNet2DModel, UNet2DConditionModel)"
        )


def _check_transformer_style(net) -> None:
    """A diffusers model whose forward does not take ``hidden_states`` and ``timestep`` (a UNet,
    a VAE) is refused in one line."""
    if not _is_diffusers_model(net):
        return
    try:
        params = inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return
    if not all(n in params for n in ("hidden_states", "timestep")):
        raise TypeError(
            f"DiffusersTransformerModel: {type(net).__name__} is not a transformer denoiser "
            f"called as (hidden_states, timestep, ...); UNet-style models go in DiffusersModel"
        )


def _check_call_kwargs(unet, call_kwargs: Mapping) -> None:
    """Fixed call arguments the UNet's forward does not take (a typo such as ``guidance=7.5``
    given to from_pipeline) are refused now, not at the first call deep inside the sampler."""
    if not call_kwargs:
        return
    try:
        params = inspect.signature(getattr(unet, "forward", unet)).parameters
    except (TypeError, ValueError):  # no signature to read (a C function): the call will tell
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in call_kwargs:
        if name not in params:
            raise TypeError(
                f"DiffusersModel: got an unexpected keyword argument {name!r}: "
                f"{type(unet).__name__}.forward does not take it"
            )


def _as_uncond(uncond, where: str) -> dict:
    """``uncond`` as a dict of tensors (numbers become 0-dim tensors), nested dicts kept."""
    if not isinstance(uncond, Mapping):
        raise TypeError(
            f"DiffusersModel: {where} must be a dict of unconditional inputs by name, "
            f"got {type(uncond).__name__}"
        )
    out = {}
    for name, v in uncond.items():
        if isinstance(v, Mapping):
            out[name] = _as_uncond(v, f"{where}[{name!r}]")
        elif isinstance(v, Tensor):
            out[name] = v
        elif isinstance(v, numbers.Number) and not isinstance(v, bool):
            out[name] = torch.tensor(v)
        else:
            raise TypeError(
                f"DiffusersModel: {where}[{name!r}] must be a tensor or a number, "
                f"got {type(v).__name__}"
            )
    return out


def _check_rows(cond: Mapping, B: int, where: str) -> None:
    """Every tensor of per-call conditioning has one row per state."""
    for name, v in cond.items():
        label = f"{where}[{name!r}]" if where else repr(name)
        if isinstance(v, Mapping):
            _check_rows(v, B, label)
        elif isinstance(v, Tensor) and (v.dim() == 0 or v.shape[0] != B):
            raise ValueError(
                f"DiffusersModel: conditioning {label} has shape {tuple(v.shape)}; "
                f"it needs one row per state ({B} rows)"
            )


def _check_null_class(unet, null) -> None:
    n = getattr(getattr(unet, "config", None), "num_class_embeds", None)
    if null is None or n is None:
        return
    if null.dtype.is_floating_point or null.numel() != 1 or not 0 <= int(null) < int(n):
        raise ValueError(
            f"DiffusersModel: uncond['class_labels'] must be one integer class id in "
            f"[0, {n}) (the model's num_class_embeds), got {null.tolist()}"
        )


def _label(where: str, name) -> str:
    return f"{where}[{name!r}]"


def _unconditional(
    cond: Mapping, fixed: Mapping, per_call: Optional[Mapping], B: int, where: str = "uncond"
) -> dict:
    """The unconditional inputs of a call, one row per state, by the names of ``cond``:
    ``fixed`` (the constructor's, one row each: broadcast) overridden by ``per_call`` (one row
    per state). Every unconditional input needs a conditional tensor of the same name and row
    shape."""
    per_call = per_call or {}
    out = {}
    for name in list(fixed) + [n for n in per_call if n not in fixed]:
        label = _label(where, name)
        if name not in cond:
            raise ValueError(
                f"DiffusersModel: {label} has no conditional counterpart in this "
                f"call (conditioning given: {sorted(cond)})"
            )
        c, f, p = cond[name], fixed.get(name), per_call.get(name)
        if isinstance(c, Mapping):
            for v in (f, p):
                if v is not None and not isinstance(v, Mapping):
                    raise ValueError(
                        f"DiffusersModel: {label} must be a dict, like the "
                        f"conditioning of the same name"
                    )
            out[name] = _unconditional(c, f or {}, p, B, label)
            continue
        if not isinstance(c, Tensor) or any(isinstance(v, Mapping) for v in (f, p)):
            raise ValueError(
                f"DiffusersModel: {label} must be a tensor, like the conditioning of the same name"
            )
        row = tuple(c.shape[1:])
        if p is not None:
            u = p
            if tuple(u.shape) != tuple(c.shape):
                raise ValueError(
                    f"DiffusersModel: {label} has shape {tuple(u.shape)}; per call "
                    f"it needs the conditioning's shape {tuple(c.shape)}"
                )
        else:
            if tuple(f.shape) not in (row, (1,) + row):
                raise ValueError(
                    f"DiffusersModel: {label} has shape {tuple(f.shape)}; it needs "
                    f"the shape of one row of the conditioning, {row} or "
                    f"{(1,) + row} (broadcast to every state)"
                )
            u = f.reshape(row).expand((B,) + row)
        out[name] = u.to(device=c.device, dtype=c.dtype)
    return out


def _double(cond: Mapping, null: Mapping) -> dict:
    """The conditioning of the doubled batch ``[unconditional rows, conditional rows]``: a tensor
    with an unconditional counterpart is concatenated with it, one without is repeated, anything
    else is passed as is."""
    out = {}
    for name, c in cond.items():
        u = null.get(name)
        if isinstance(c, Mapping):
            out[name] = _double(c, u or {})
        elif isinstance(c, Tensor):
            out[name] = torch.cat([c if u is None else u, c])
        else:
            out[name] = c
    return out


class _ThresholdedTransitions(GaussianTransitions):
    """Transitions whose x0_hat goes through diffusers' dynamic thresholding (Imagen):
    per sample, s = clamp(quantile(|x0|, ratio), 1, max); x0 <- clamp(x0, -s, s) / s.

    For a multistep chain the previous step's x0-hat is thresholded too: diffusers keeps the
    thresholded prediction in ``model_outputs``, and the chain carries the raw one."""

    # the mean is not affine in x0-hat: the fused round ops (static path) cannot express it
    affine = False

    def __init__(self, *args, ratio: float, max_value: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threshold_ratio = float(ratio)
        self.threshold_max = float(max_value)

    def threshold(self, x0: Tensor, batch_dims: int = 1) -> Tensor:
        """Per sample: the first ``batch_dims`` dims index samples (a window [w, L, *E] has 2)."""
        flat = x0.reshape(math.prod(x0.shape[:batch_dims]), -1)
        work = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
        s = torch.quantile(work.abs(), self.threshold_ratio, dim=1)
        s = s.clamp(min=1.0, max=self.threshold_max).unsqueeze(1)
        return (torch.clamp(work, -s, s) / s).to(x0.dtype).reshape(x0.shape)

    def mean_from_x0(
        self, x: Tensor, x0: Tensor, k: Tensor, prev: Optional[Tensor] = None
    ) -> Tensor:
        dims = max(1, k.dim())
        if prev is not None:
            prev = self.threshold(prev, dims)
        return super().mean_from_x0(x, self.threshold(x0, dims), k, prev)


# the families whose diffusers step the adapter tabulates (sampling.families), by class name
_FAMILIES = tuple(f for f in FAMILIES if f.scheduler is not None)
SUPPORTED = tuple(f.scheduler for f in _FAMILIES)
_SUPPORTED_TEXT = ", ".join(f.scheduler_text for f in _FAMILIES)
NO_NOISE = "deterministic (no noise to speculate over)"
# a deterministic solver's stochastic counterpart
_USE_SDE_DPM = f"use {family('dpm++2m-sde').scheduler_call}"
# diffusers schedulers whose step draws no noise: the stochastic one to use instead
DETERMINISTIC_SCHEDULERS = {
    "UniPCMultistepScheduler": _USE_SDE_DPM,
    "DPMSolverSinglestepScheduler": _USE_SDE_DPM
    + " (the singlestep solver's SDE variant calls the network at points inside a step, so its "
    "step is not one Gaussian around one network mean)",
    "DEISMultistepScheduler": _USE_SDE_DPM,
    "PNDMScheduler": _USE_SDE_DPM,
    "LMSDiscreteScheduler": _USE_SDE_DPM,
    "HeunDiscreteScheduler": _USE_SDE_DPM,
    "KDPM2DiscreteScheduler": _USE_SDE_DPM,
}
FLOW_EULER = family("flow-euler")
# what a flow-matching model takes (the stochastic FlowMatch Euler step, or Flow-GRPO's SDE)
FLOW_MATCHING = (
    f"flow-matching models take {FLOW_EULER.scheduler_call} (family 'flow-euler') or the "
    f"'flow-sde' chain (flow_sde_from_sigmas on its sigmas)"
)
# why every other diffusers scheduler is refused (a scheduler not listed here nor above: the
# generic reason of _unsupported_text)
UNSUPPORTED_REASONS = {
    "KDPM2AncestralDiscreteScheduler": "stochastic, but each step calls the network twice (at a "
    "midpoint sigma) before its noise, so a step is not one Gaussian around one network mean",
    "DPMSolverSDEScheduler": "stochastic, but its noise comes from a Brownian tree (correlated "
    "across steps) and each step calls the network twice, so its steps are not independent "
    "Gaussians around one network mean",
    "SASolverScheduler": "a stochastic predictor-corrector: the corrector reuses the predictor's "
    "noise after the next network call, so a step is not one Gaussian transition",
    "LCMScheduler": "a consistency-model sampler (boundary-condition scalings of a distilled "
    "model), not tabulated yet",
    "TCDScheduler": "a consistency-model sampler (trajectory consistency distillation), not "
    "tabulated yet",
    "CMStochasticIterativeScheduler": "a consistency-model sampler on an EDM sigma schedule, not "
    "tabulated yet",
    "SCMScheduler": "a continuous-time consistency-model sampler, not tabulated yet",
    "ScoreSdeVeScheduler": "a variance-exploding SDE predictor-corrector (step_pred / "
    "step_correct, Langevin corrector) on a continuous sigma schedule, not tabulated yet",
    "ScoreSdeVpScheduler": "a continuous-time VP SDE (beta_min / beta_max), not tabulated yet",
    "KarrasVeScheduler": "a variance-exploding churn sampler: its noise is added before the network "
    "call, so a step is not a Gaussian around the network's mean",
    "IPNDMScheduler": f"{NO_NOISE}, on its own continuous schedule",
    "DDIMInverseScheduler": "an inversion scheduler (image to noise), deterministic",
    "DPMSolverMultistepInverseScheduler": "an inversion scheduler (image to noise)",
    "RePaintScheduler": "an inpainting sampler that jumps back in time and needs a known image "
    "and mask",
    "UnCLIPScheduler": "its model predicts a learned variance (variance_type='learned_range'), so "
    "the draft and target steps' covariances differ",
    "VQDiffusionScheduler": "a discrete (categorical) diffusion, not Gaussian",
    "AmusedScheduler": "masked-token (categorical) generation, not Gaussian",
    "DDPMWuerstchenScheduler": "Wuerstchen's continuous-time cosine schedule (timestep ratios), "
    "not tabulated yet",
    "DDPMParallelScheduler": "the parallel-sampling variant of DDPMScheduler; use DDPMScheduler",
    "DDIMParallelScheduler": "the parallel-sampling variant of DDIMScheduler; use DDIMScheduler "
    "with eta > 0",
    "CogVideoXDDIMScheduler": "CogVideoX's SNR-shifted schedule (snr_shift_scale), not tabulated "
    "yet",
    "CogVideoXDPMScheduler": "CogVideoX's SNR-shifted schedule (snr_shift_scale), not tabulated "
    "yet",
    "ConsistencyDecoderScheduler": "a VAE's consistency decoder, not a diffusion sampler",
    "FlowMatchHeunDiscreteScheduler": f"{NO_NOISE}: Heun's method on the flow ODE, two network "
    f"calls a step; {FLOW_MATCHING}",
    "FlowMatchLCMScheduler": "a consistency-model sampler for flow models (its step may rescale "
    f"the sample between steps), not tabulated yet; {FLOW_MATCHING}",
}


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError(
            "the diffusers adapter needs diffusers: pip install specdiff_kernels[diffusers]"
        ) from None
    return diffusers


def _supported_family(scheduler, where: str = "scheduler") -> Family:
    """The family whose supported class ``scheduler`` is an instance of, else a one-line
    TypeError."""
    diffusers = _import_diffusers()
    if isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin):
        raise TypeError(
            f"{where} must be a scheduler instance, got the class {scheduler.__name__} "
            f"(pass {scheduler.__name__}() or {scheduler.__name__}.from_config(...))"
        )
    if not isinstance(scheduler, diffusers.SchedulerMixin):
        raise TypeError(
            f"{where} must be a diffusers scheduler ({_SUPPORTED_TEXT}), got "
            f"{type(scheduler).__name__}"
        )
    for fam in _FAMILIES:
        if isinstance(scheduler, getattr(diffusers, fam.scheduler)):
            return fam
    raise TypeError(_unsupported_text(type(scheduler).__name__))


def is_flow_matching(name: str, config: Optional[Mapping] = None) -> Optional[str]:
    """Why a scheduler (class name, config) is a flow-matching one, else None."""
    if isinstance(name, str) and name.startswith("FlowMatch"):
        return "a flow-matching scheduler class"
    cfg = config or {}
    if cfg.get("prediction_type") == "flow_prediction":
        return "prediction_type='flow_prediction'"
    for key in ("use_flow_sigmas", "use_dynamic_shifting"):
        if cfg.get(key):
            return f"{key}={cfg[key]!r}"
    for key in ("shift", "base_shift", "max_shift", "shift_terminal"):
        if key in cfg:
            return f"its config has the flow-matching key {key!r}"
    return None


def _unsupported_text(name: str) -> str:
    instead = DETERMINISTIC_SCHEDULERS.get(name)
    if instead is not None:
        return f"unsupported scheduler {name}: {NO_NOISE}; {instead}"
    if is_flow_matching(name) and name not in UNSUPPORTED_REASONS:
        return f"unsupported scheduler {name}: a flow-matching scheduler; {FLOW_MATCHING}"
    reason = UNSUPPORTED_REASONS.get(
        name,
        "its step is not one of the Gaussian ancestral steps the adapter tabulates "
        "(x' ~ N(mean from one network call, fixed std))",
    )
    return f"unsupported scheduler {name}: {reason}; supported: {_SUPPORTED_TEXT}"


def _check_schedule(cfg: Mapping) -> None:
    """The training schedule's settings (a built scheduler's config, or a raw config dict: the
    supported schedulers share these defaults); diffusers' constructor fails deep in torch on a
    string or fractional value."""
    cfg = {**_SCHEDULE_DEFAULTS, **cfg}
    T = as_int("num_train_timesteps", cfg["num_train_timesteps"], 1)
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = check_betas(trained, "trained_betas")
        if betas.numel() != T:
            raise ValueError(
                f"trained_betas has {betas.numel()} entries for num_train_timesteps={T}"
            )
    elif cfg.get("beta_schedule") in ("linear", "scaled_linear", "sigmoid"):
        for key in ("beta_start", "beta_end"):
            as_real(key, cfg[key], 0, 1, open_low=True, open_high=True)


_SCHEDULE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}


def _check_dpm(cfg) -> None:
    """DPMSolverMultistepScheduler: only the SDE variant of DPM-Solver++, order 1 or 2, on VP
    sigmas, has a Gaussian step the chain can express (docs/design.md §2.1)."""
    algo = cfg.get("algorithm_type", "dpmsolver++")
    if algo in ("dpmsolver++", "dpmsolver"):
        raise ValueError(
            f"algorithm_type={algo!r} is {NO_NOISE}; use algorithm_type='sde-dpmsolver++'"
        )
    if algo == "sde-dpmsolver":
        raise ValueError(
            "algorithm_type='sde-dpmsolver' is not supported (its multistep term is a difference "
            "of noise predictions, not of x0-hats; deprecated by diffusers); use "
            "algorithm_type='sde-dpmsolver++'"
        )
    as_choice("algorithm_type", algo, ("sde-dpmsolver++",))
    order = as_int("solver_order", cfg.get("solver_order", 2), 1)
    if order > 2:
        raise ValueError(
            f"solver_order={order} is not supported (its step needs two previous predictions); "
            f"use solver_order=2"
        )
    as_choice("solver_type", cfg.get("solver_type", "midpoint"), SOLVER_TYPES)
    if cfg.get("prediction_type") == "flow_prediction":
        raise ValueError(
            f"prediction_type='flow_prediction' is not supported (DPM-Solver on a flow-matching "
            f"model is not tabulated yet; {FLOW_MATCHING})"
        )
    for key in ("use_flow_sigmas", "use_dynamic_shifting"):
        if cfg.get(key):
            raise ValueError(
                f"{key}={cfg[key]!r} is not supported (flow-matching sigmas: not tabulated for "
                f"DPM-Solver yet; {FLOW_MATCHING}); the chain needs VP sigmas"
            )
    vt = cfg.get("variance_type")
    if vt in _LEARNED:
        raise ValueError(
            f"variance_type={vt!r}: learned variances make the draft and "
            f"target steps' covariances differ, which speculative sampling cannot verify"
        )
    keys = (
        "lower_order_final",
        "euler_at_final",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_lu_lambdas",
    )
    for key in keys:
        if cfg.get(key) is not None:
            as_flag(key, cfg[key])
    as_choice("final_sigmas_type", cfg.get("final_sigmas_type", "zero"), FINAL_SIGMAS)


def _check_edm_dpm(cfg) -> None:
    """EDMDPMSolverMultistepScheduler: its SDE variant, order 1 or 2 (as DPM-Solver's)."""
    algo = cfg.get("algorithm_type", "dpmsolver++")
    if algo == "dpmsolver++":
        raise ValueError(
            f"algorithm_type={algo!r} is {NO_NOISE}; use algorithm_type='sde-dpmsolver++'"
        )
    as_choice("algorithm_type", algo, ("sde-dpmsolver++",))
    if as_int("solver_order", cfg.get("solver_order", 2), 1) > 2:
        raise ValueError(
            f"solver_order={cfg['solver_order']} is not supported (its step needs two previous "
            f"predictions); use solver_order=2"
        )
    as_choice("solver_type", cfg.get("solver_type", "midpoint"), SOLVER_TYPES)
    as_real("sigma_data", cfg.get("sigma_data", 0.5), 0, open_low=True)
    for key in ("lower_order_final", "euler_at_final"):
        as_flag(key, cfg.get(key, False))
    as_choice("final_sigmas_type", cfg.get("final_sigmas_type", "zero"), FINAL_SIGMAS)


def _check_flow(cfg) -> None:
    """FlowMatchEulerDiscreteScheduler: its stochastic step, on the sigma options its own
    ``set_timesteps`` applies (docs/design.md §2.2)."""
    if not as_flag("stochastic_sampling", cfg.get("stochastic_sampling", False)):
        raise ValueError(
            f"stochastic_sampling=False is {NO_NOISE}: the Euler step of the flow ODE; set "
            f"stochastic_sampling=True"
        )
    if as_flag("invert_sigmas", cfg.get("invert_sigmas", False)):
        raise ValueError(
            "invert_sigmas=True is not supported (its sigmas rise to 1, so its stochastic step "
            "does not sample x_t = (1 - t) x0 + t eps); use invert_sigmas=False"
        )
    as_real("shift", cfg.get("shift", 1.0), 0, open_low=True)
    for key in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas"):
        as_flag(key, cfg.get(key) or False)
    as_flag("use_beta_sigmas", cfg.get("use_beta_sigmas") or False)
    as_choice("time_shift_type", cfg.get("time_shift_type", "exponential"), _TIME_SHIFTS)
    if cfg.get("shift_terminal") is not None:  # diffusers stretches to it, dividing by 1 - it
        as_real("shift_terminal", cfg["shift_terminal"], 0, 1, open_high=True)


_TIME_SHIFTS = ("exponential", "linear")


def _check_cosine(cfg) -> None:
    """CosineDPMSolverMultistepScheduler: order 1 or 2, its sigma schedules, a final sigma of 0
    (docs/design.md §2.3)."""
    if as_int("solver_order", cfg.get("solver_order", 2), 1) > 2:
        raise ValueError(
            f"solver_order={cfg['solver_order']} is not supported (its step needs two previous "
            f"predictions); use solver_order=2"
        )
    as_choice("solver_type", cfg.get("solver_type", "midpoint"), SOLVER_TYPES)
    as_choice("sigma_schedule", cfg.get("sigma_schedule", "exponential"), EDM_SCHEDULES)
    as_real("sigma_data", cfg.get("sigma_data", 1.0), 0, open_low=True)
    for key in ("lower_order_final", "euler_at_final"):
        as_flag(key, cfg.get(key, False))
    final = as_choice("final_sigmas_type", cfg.get("final_sigmas_type", "zero"), FINAL_SIGMAS)
    if final == "sigma_min":
        raise ValueError(
            "final_sigmas_type='sigma_min' is not supported: the last step's Brownian-tree "
            "interval has length 0 and diffusers' noise there is 0/0 (NaN); use "
            "final_sigmas_type='zero'"
        )


def _check_edm_euler(cfg) -> None:
    """EDMEulerScheduler: its sigma schedules and preconditioning."""
    as_choice("sigma_schedule", cfg.get("sigma_schedule", "karras"), EDM_SCHEDULES)
    as_real("sigma_data", cfg.get("sigma_data", 0.5), 0, open_low=True)
    as_choice("final_sigmas_type", cfg.get("final_sigmas_type", "zero"), FINAL_SIGMAS)


_CHECKS = {
    "DPMSolverMultistepScheduler": _check_dpm,
    "EDMDPMSolverMultistepScheduler": _check_edm_dpm,
    "CosineDPMSolverMultistepScheduler": _check_cosine,
    "EDMEulerScheduler": _check_edm_euler,
}


def _check_options(kind: str, cfg) -> None:
    """The step's options: prediction, clipping, thresholding, variance."""
    if kind == FLOW_EULER.scheduler:
        return _check_flow(cfg)
    if kind in _CHECKS:
        _CHECKS[kind](cfg)
    # EDM's preconditioning has c_out for these two only; Euler's step converts these two only
    edm = kind.startswith("EDM") or kind.startswith("Cosine")
    preds = ("epsilon", "v_prediction") if kind.startswith("Euler") or edm else VP_PREDICTIONS
    as_choice("prediction_type", cfg.prediction_type, preds)
    as_choice("timestep_spacing", cfg.get("timestep_spacing", "leading"), SPACINGS)
    if kind == "DDPMScheduler":
        vt = cfg.variance_type
        if vt in _LEARNED:
            raise ValueError(
                f"variance_type={vt!r}: learned variances make the draft and "
                f"target steps' covariances differ, which speculative sampling cannot verify"
            )
        as_choice("variance_type", vt, ("fixed_small", "fixed_small_log", "fixed_large"))
    for key in ("clip_sample", "thresholding", "set_alpha_to_one", "rescale_betas_zero_snr"):
        if key in cfg:
            as_flag(key, cfg[key])
    if cfg.get("thresholding", False):
        r = cfg.get("dynamic_thresholding_ratio", 0.995)
        as_real("dynamic_thresholding_ratio", r, 0, 1, open_low=True)
        as_real(
            "sample_max_value", cfg.get("sample_max_value", 1.0), 0, open_low=True, finite=False
        )
    elif cfg.get("clip_sample", False):
        as_clip("clip_sample_range", cfg.get("clip_sample_range", 1.0))


def _check_config(scheduler, num_inference_steps) -> tuple[Family, Optional[int]]:
    """Check a supported scheduler's config up front (diffusers itself accepts most bad values
    and fails at ``step`` or deep in numpy); returns its family and the step count."""
    fam = _supported_family(scheduler)
    kind = fam.scheduler
    cfg = scheduler.config
    try:
        _check_schedule(cfg)
        _check_options(kind, cfg)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{kind} config: {err}") from None
    T = int(cfg.num_train_timesteps)
    if num_inference_steps is None:
        num_inference_steps = getattr(scheduler, "num_inference_steps", None)
        if not num_inference_steps:
            raise ValueError(
                "num_inference_steps must be given (the scheduler has no timesteps set)"
            )
    n = as_int("num_inference_steps", num_inference_steps, 1, None if fam.flow else T)
    try:
        spacing = cfg.get("timestep_spacing", "leading")
        check_steps_offset(cfg.get("steps_offset", 0), spacing, n, T, ignored_ok=True)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{kind} config: {err}") from None
    return fam, n


def _diffusers_class(name: str):
    return getattr(_import_diffusers(), name)


def _build(cls, config: Mapping):
    """``cls.from_config(config)``; diffusers' multi-line NotImplementedError for an unknown
    beta_schedule becomes one line naming it, another failure one line naming the class."""
    try:
        return cls.from_config(config)
    except NotImplementedError as err:  # a RuntimeError: caught first
        # DPMSolverMultistepScheduler raises it for an unknown algorithm_type or solver_type too
        for key, known in (
            ("algorithm_type", "'sde-dpmsolver++'"),
            ("solver_type", "'midpoint', 'heun'"),
        ):
            value = config.get(key)
            if isinstance(value, str) and str(err).startswith(f"{value} is not implemented"):
                raise ValueError(
                    f"{cls.__name__} config: {key} {value!r} is not implemented by diffusers; "
                    f"use {known}"
                ) from None
        known = "'linear', 'scaled_linear', 'squaredcos_cap_v2'"
        known += ", 'sigmoid'" if issubclass(cls, _diffusers_class("DDPMScheduler")) else ""
        raise ValueError(
            f"{cls.__name__} config: beta_schedule {config.get('beta_schedule')!r} is not "
            f"implemented by diffusers; use one of {known}"
        ) from None
    except (TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise type(err)(f"{cls.__name__} config: {first}") from None
    except Exception as err:  # any other kind diffusers raises for a config it cannot build
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{cls.__name__} config: {type(err).__name__}: {first}") from None


def scheduler_from_config(config: Mapping, scheduler_class=None):
    """A supported diffusers scheduler from a config dict (e.g. a pipeline's
    ``scheduler/scheduler_config.json``), every value checked with a one-line error naming it.

    ``scheduler_class``: a supported scheduler class or its name, or a sampler family's name
    (:mod:`specdiff_kernels.sampling.families`, e.g. ``"dpm++2m-sde"``: its scheduler with the
    family's settings over the config's); default: the config's ``_class_name``. Keys of other
    schedulers are ignored, as by diffusers' ``from_config``. A ``DPMSolverMultistepScheduler``
    config must say ``algorithm_type="sde-dpmsolver++"`` (the default, ``"dpmsolver++"``, is
    deterministic: refused) and ``solver_order`` 1 or 2.
    """
    sched = build_scheduler(config, scheduler_class)
    _check_config(sched, 1)
    return sched


def build_scheduler(config: Mapping, scheduler_class=None):
    """:func:`scheduler_from_config` up to the build: the class, the training schedule and what
    diffusers' constructor refuses are checked; the step's options (prediction, clipping,
    DPM-Solver's algorithm, ...) are left to :func:`diffusers_transitions`."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of scheduler settings, got {type(config).__name__}")
    cls = config.get("_class_name") if scheduler_class is None else scheduler_class
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if isinstance(cls, str) and canonical(cls) in NAMES:
        fam = family(cls)
        cls, config = fam.scheduler, {**config, **dict(fam.scheduler_config)}
    cls = _scheduler_class(cls)
    try:
        _check_schedule(config)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{cls.__name__} config: {err}") from None
    with quiet_diffusers():  # from_config warns about another scheduler's keys
        return _build(cls, config)


def _scheduler_class(cls) -> type:
    """A supported diffusers scheduler class from itself or its name."""
    diffusers = _import_diffusers()
    if isinstance(cls, str):
        found = getattr(diffusers, cls, None)
        if not (isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin)):
            raise ValueError(f"scheduler_class {cls!r} is not a diffusers scheduler")
        cls = found
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise TypeError(
            f"scheduler_class must be a diffusers scheduler class or its name (or the config "
            f"must name one in _class_name), got {cls!r}"
        )
    if not any(issubclass(cls, getattr(diffusers, name)) for name in SUPPORTED):
        raise TypeError(_unsupported_text(cls.__name__))
    return cls


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' logger at error level (its warnings about ignored config keys, or about
    loading without accelerate, are noise here), restored after."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _fresh(scheduler, num_inference_steps: int, **options):
    """A copy of the scheduler with timesteps set, so the caller's scheduler is not mutated
    (``options``: FlowMatch's ``mu``)."""
    sched = _build(type(scheduler), scheduler.config)
    sched.set_timesteps(num_inference_steps, **options)
    return sched


def _with_thresholding(cfg, transitions: GaussianTransitions) -> GaussianTransitions:
    if not cfg.get("thresholding", False):
        return transitions
    t = transitions
    return _ThresholdedTransitions(
        t.timesteps,
        t.c_x0,
        t.c_x,
        t.std,
        t.model_alpha,
        t.model_sigma,
        c_eps=t.c_eps,
        c_prev=t.c_prev,
        input_scale=t.input_scale,
        output=t.output,
        prediction=t.prediction,
        clip_sample=None,
        eps_from_clipped_x0=t.eps_from_clipped_x0,
        init_std=t.init_std,
        name=t.name + "+threshold",
        ratio=cfg.get("dynamic_thresholding_ratio", 0.995),
        max_value=cfg.get("sample_max_value", 1.0),
    )


def _clip(cfg) -> Optional[float]:
    if cfg.get("thresholding", False) or not cfg.get("clip_sample", False):
        return None
    return float(cfg.get("clip_sample_range", 1.0))


class _StepArgs(NamedTuple):
    """diffusers' per-call ``step`` arguments (DDIM's; Euler's churn); the other steps take none."""

    eta: Optional[float]
    use_clipped_model_output: bool
    churn: Optional[dict] = None  # Euler's (and EDM Euler's) s_churn, s_tmin, s_tmax, s_noise


def _ddpm(sched, step: _StepArgs) -> GaussianTransitions:
    cfg = sched.config
    vt = cfg.variance_type
    # fixed_small_log draws with std sqrt(beta_tilde), exactly as fixed_small (diffusers 0.3x)
    variance = "fixed_large" if vt == "fixed_large" else "fixed_small"
    tr = ddpm_transitions(
        sched.alphas_cumprod.double(),
        timesteps=sched.timesteps.long(),
        prediction=cfg.prediction_type,
        variance=variance,
        clip_sample=_clip(cfg),
    )
    return _with_thresholding(cfg, tr)


def _ddim(sched, step: _StepArgs) -> GaussianTransitions:
    cfg, eta = sched.config, step.eta
    tr = ddim_from_schedule(
        sched.alphas_cumprod.double(),
        sched.timesteps.long(),
        cfg.num_train_timesteps // sched.num_inference_steps,
        sched.final_alpha_cumprod,
        eta=eta,
        prediction=cfg.prediction_type,
        clip_sample=_clip(cfg),
        eps_from_clipped_x0=False,
        name=f"diffusers-ddim[eta={eta}]",
    )
    tr = _with_thresholding(cfg, tr)
    tr.eps_from_clipped_x0 = step.use_clipped_model_output
    return tr


def _euler_ancestral(sched, step: _StepArgs) -> GaussianTransitions:
    cfg = sched.config
    return euler_ancestral_from_sigmas(
        sched.timesteps.double(),
        sched.sigmas.double(),
        prediction=cfg.prediction_type,
        init_std=float(sched.init_noise_sigma),
        name="diffusers-euler-ancestral",
    )


def _dpm_sde(sched, step: _StepArgs) -> GaussianTransitions:
    cfg = sched.config
    order = int(cfg.solver_order)
    # the scheduler's own float32 sigmas (every sigma option already applied by set_timesteps),
    # widened: the tables then take the steps diffusers takes
    sigmas = sched.sigmas.double()
    try:
        tr = dpmsolver_sde_from_sigmas(
            sched.timesteps,
            sigmas,
            solver_order=order,
            solver_type=cfg.solver_type,
            lower_order_final=bool(cfg.lower_order_final),
            euler_at_final=bool(cfg.euler_at_final),
            prediction=cfg.prediction_type,
            name=f"diffusers-dpm++{'2m' if order == 2 else '1s'}-sde[{cfg.solver_type}]",
        )
    except ValueError:
        same = (sigmas[1:] == sigmas[:-1]).nonzero().view(-1)
        if order != 2 or same.numel() == 0:
            raise
        # e.g. Karras / exponential / beta sigmas end at sigma_min, and final_sigmas_type=
        # 'sigma_min' appends it again: diffusers' own second-order step is NaN there (0 / 0)
        k = int(same[0])
        raise ValueError(
            f"the scheduler's sigmas repeat (sigma[{k}] = sigma[{k + 1}] = "
            f"{float(sigmas[k]):.4g}), where the second-order {cfg.solver_type} step divides by "
            f"a zero log-SNR step (diffusers' own step gives NaN); use final_sigmas_type='zero' "
            f"or solver_type='midpoint'"
        ) from None
    return _with_thresholding(cfg, tr)


def _repeated_sigmas(sigmas: Tensor, solver_type: str) -> Optional[str]:
    """Why a second-order step divides by zero (a repeated sigma), or None."""
    same = (sigmas[1:] == sigmas[:-1]).nonzero().view(-1)
    if same.numel() == 0:
        return None
    k = int(same[0])
    return (
        f"the scheduler's sigmas repeat (sigma[{k}] = sigma[{k + 1}] = {float(sigmas[k]):.4g}), "
        f"where the second-order {solver_type} step divides by a zero log-SNR step (diffusers' "
        f"own step gives NaN); use final_sigmas_type='zero' or solver_type='midpoint'"
    )


def _edm_sde(sched, label: str, noise_var=None) -> GaussianTransitions:
    """The VE-state SDE-DPM-Solver++ on an EDM-style scheduler's own float32 sigmas, with its
    EDM preconditioning (its timesteps are its c_noise) and, for a Brownian-tree noise, the
    per-step noise variance (docs/design.md §2.3)."""
    cfg = sched.config
    order = int(cfg.solver_order)
    sigmas = sched.sigmas.double()
    try:
        return edm_dpmsolver_sde_from_sigmas(
            sched.timesteps.double(),
            sigmas,
            sigma_data=float(cfg.sigma_data),
            prediction=cfg.prediction_type,
            solver_order=order,
            solver_type=cfg.solver_type,
            lower_order_final=bool(cfg.lower_order_final),
            euler_at_final=bool(cfg.euler_at_final),
            init_std=float(sched.init_noise_sigma),
            noise_var=noise_var,
            name=f"diffusers-{label}-dpm++{'2m' if order == 2 else '1s'}-sde[{cfg.solver_type}]",
        )
    except ValueError:
        why = _repeated_sigmas(sigmas, cfg.solver_type) if order == 2 else None
        if why is None:
            raise
        raise ValueError(why) from None


def _edm_dpm_sde(sched, step: _StepArgs) -> GaussianTransitions:
    """EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"): c_noise = log(sigma)/4."""
    return _with_thresholding(sched.config, _edm_sde(sched, "edm"))


def _euler_churn(sched, step: _StepArgs) -> GaussianTransitions:
    """EulerDiscreteScheduler stepped with s_churn > 0 (docs/design.md §2.3)."""
    return euler_churn_from_sigmas(
        sched.timesteps.double(),
        sched.sigmas.double(),
        **step.churn,
        prediction=sched.config.prediction_type,
        init_std=float(sched.init_noise_sigma),
        name=f"diffusers-euler-churn[s_churn={step.churn['s_churn']}]",
    )


def _edm_euler_churn(sched, step: _StepArgs) -> GaussianTransitions:
    """EDMEulerScheduler stepped with s_churn > 0: Euler churn with EDM's preconditioning at
    sigma_hat (docs/design.md §2.3's EDM row)."""
    cfg = sched.config
    return euler_churn_from_sigmas(
        sched.timesteps.double(),  # c_noise = log(sigma) / 4
        sched.sigmas.double(),
        **step.churn,
        sigma_data=float(cfg.sigma_data),
        prediction=cfg.prediction_type,
        init_std=float(sched.init_noise_sigma),
        name=f"diffusers-edm-euler-churn[s_churn={step.churn['s_churn']}]",
    )


def _cosine_dpm_sde(sched, step: _StepArgs) -> GaussianTransitions:
    """CosineDPMSolverMultistepScheduler: c_noise = atan(sigma) 2 / pi, and its Brownian-tree
    noise's variance per step (docs/design.md §2.3)."""
    cfg = sched.config
    var = brownian_tree_noise_var(sched.sigmas.double(), cfg.sigma_min, cfg.sigma_max)
    return _edm_sde(sched, "cosine", noise_var=var)


def _flow_euler(sched, step: _StepArgs) -> GaussianTransitions:
    # the scheduler's own float32 sigmas after set_timesteps (shift, dynamic shifting with mu,
    # shift_terminal, Karras / exponential / beta sigmas), widened
    return flow_euler_from_sigmas(
        sched.timesteps.double(), sched.sigmas.double(), name="diffusers-flow-euler"
    )


# each family's tabulation of its diffusers step (sampling.families), by family name
_TABULATE = {
    "ddpm": _ddpm,
    "ddim": _ddim,
    "euler-a": _euler_ancestral,
    "dpm++2m-sde": _dpm_sde,
    "flow-euler": _flow_euler,
    "edm-dpm++2m-sde": _edm_dpm_sde,
    "euler-churn": _euler_churn,
    "edm-euler-churn": _edm_euler_churn,
    "cosine-dpm++2m-sde": _cosine_dpm_sde,
}


def diffusers_transitions(
    scheduler,
    num_inference_steps: Optional[int] = None,
    *,
    eta: Optional[float] = None,
    use_clipped_model_output: bool = False,
    s_churn: Optional[float] = None,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    mu: Optional[float] = None,
) -> GaussianTransitions:
    """Tabulate a diffusers scheduler's ancestral step for per-sample use.

    Args:
        scheduler: a ``DDPMScheduler``, ``DDIMScheduler``, ``EulerAncestralDiscreteScheduler``,
            ``EulerDiscreteScheduler`` (with ``s_churn > 0``),
            ``DPMSolverMultistepScheduler`` / ``EDMDPMSolverMultistepScheduler`` with
            ``algorithm_type="sde-dpmsolver++"`` and ``solver_order`` 1 or 2 (the transitions are
            then multistep for order 2: the mean also takes the previous step's x0-hat), or
            ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``, ``EDMEulerScheduler``
            (with ``s_churn > 0``), Stable Audio's ``CosineDPMSolverMultistepScheduler`` (the
            registry's families,
            :mod:`specdiff_kernels.sampling.families`); not mutated: a copy gets
            ``set_timesteps``. Deterministic schedulers are refused.
        num_inference_steps: sampling steps (default: the scheduler's, if already set).
        eta: DDIM's eta (required for DDIM, > 0).
        use_clipped_model_output: DDIM's flag of the same name.
        s_churn, s_tmin, s_tmax, s_noise: ``EulerDiscreteScheduler.step``'s and
            ``EDMEulerScheduler.step``'s churn (s_churn required for them, > 0: without churn
            their step is deterministic).
        mu: ``FlowMatchEulerDiscreteScheduler``'s ``set_timesteps(n, mu=mu)`` shift, required
            with (and only with) ``use_dynamic_shifting=True`` (pipelines compute it from the
            image's token count).

    ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` (rectified-flow models,
    prediction ``"flow_prediction"``) is tabulated from its own sigmas after ``set_timesteps``;
    Flow-GRPO's SDE on the same sigmas is ``flow_sde_from_sigmas(sched.timesteps, sched.sigmas,
    noise_level=a)`` (a scheduler with timesteps set, any ``stochastic_sampling``).
    """
    fam, n = _check_config(scheduler, num_inference_steps)
    step = _step_args(fam, type(scheduler).__name__, eta, use_clipped_model_output)
    churn = _churn_args(fam, type(scheduler).__name__, s_churn, s_tmin, s_tmax, s_noise)
    step = step._replace(churn=churn)
    return _TABULATE[fam.name](_fresh(scheduler, n, **_shift_args(fam, scheduler, mu)), step)


def _shift_args(fam: Family, scheduler, mu) -> dict:
    """``set_timesteps``' ``mu``: required by a FlowMatch scheduler with dynamic shifting, refused
    elsewhere (it would be ignored)."""
    dynamic = fam.flow and bool(scheduler.config.get("use_dynamic_shifting", False))
    name = type(scheduler).__name__
    if mu is None:
        if dynamic:
            raise ValueError(
                f"mu must be given: {name} has use_dynamic_shifting=True (diffusers' "
                f"set_timesteps(n, mu=mu))"
            )
        return {}
    if not dynamic:
        raise ValueError(
            f"mu applies to {FLOW_EULER.scheduler} with use_dynamic_shifting=True only, not to "
            f"{name}" + (" without it" if fam.flow else "")
        )
    linear = scheduler.config.get("time_shift_type") == "linear"  # mu / (mu + 1/t - 1)
    return {"mu": as_real("mu", mu, 0.0, open_low=True) if linear else as_real("mu", mu)}


def _step_args(fam: Family, cls: str, eta, use_clipped_model_output) -> _StepArgs:
    """diffusers' per-call step arguments, for the families whose step takes them (DDIM's eta)."""
    use_clipped_model_output = as_flag("use_clipped_model_output", use_clipped_model_output)
    if "eta" not in fam.options:
        # DDPM and Euler-ancestral steps have a fixed variance: an eta would be silently ignored
        only = " or ".join(f.scheduler for f in _FAMILIES if "eta" in f.options)
        if eta is not None:
            raise ValueError(f"eta applies to {only} only, not to {cls}")
        if use_clipped_model_output:
            raise ValueError(f"use_clipped_model_output applies to {only} only, not to {cls}")
    elif eta is None:
        raise ValueError(f"{fam.scheduler}: pass eta (> 0); diffusers' step takes it per call")
    elif as_real("eta", eta, 0, 1) == 0:
        raise ValueError(
            f"{fam.scheduler} with eta = 0 is {NO_NOISE}; pass eta > 0 (eta = 1: DDPM's variance)"
        )
    return _StepArgs(None if eta is None else float(eta), use_clipped_model_output)


def _churn_args(fam: Family, cls: str, s_churn, s_tmin, s_tmax, s_noise) -> Optional[dict]:
    """EulerDiscreteScheduler.step's churn arguments, checked (None for the other families)."""
    given = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    if "s_churn" not in fam.options:
        defaults = {"s_churn": None, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
        for key, value in given.items():
            if value is not defaults[key] and value != defaults[key]:
                only = " or ".join(f.scheduler for f in _FAMILIES if "s_churn" in f.options)
                raise ValueError(f"{key} applies to {only} only, not to {cls}")
        return None
    if s_churn is None or as_real("s_churn", s_churn, 0.0, finite=False) == 0:
        raise ValueError(
            f"{fam.scheduler}: pass s_churn > 0 (diffusers' step takes it per call); without "
            f"churn its step is {NO_NOISE}: use EulerAncestralDiscreteScheduler, or pass s_churn"
        )
    return {
        "s_churn": float(s_churn),
        "s_tmin": as_real("s_tmin", s_tmin, finite=False),
        "s_tmax": as_real("s_tmax", s_tmax, finite=False),
        "s_noise": as_real("s_noise", s_noise, 0.0),
    }


def check_pipeline_parts(pipe, where: str) -> None:
    """``pipe`` has a ``.unet`` and a ``.scheduler``; a transformer pipeline (``.transformer``:
    DiT, PixArt, SD3, Flux, ...) is refused with its reason."""
    if getattr(pipe, "unet", None) is None:
        transformer = getattr(pipe, "transformer", None)
        if transformer is not None:
            raise TypeError(
                f"{where}: {type(pipe).__name__} has a .transformer "
                f"({type(transformer).__name__}), not a .unet; {TRANSFORMERS_NOT_YET}"
            )
    for part in ("unet", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise TypeError(
                f"{where}: pipe must be a diffusers pipeline with .unet and .scheduler; "
                f"{type(pipe).__name__} has no .{part}"
            )


def from_pipeline(
    pipe,
    num_inference_steps: int,
    *,
    eta: Optional[float] = None,
    s_churn: Optional[float] = None,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    guidance_scale: Optional[float] = None,
    uncond: Optional[Mapping[str, Any]] = None,
    **call_kwargs,
):
    """``(model, transitions)`` from a diffusers pipeline with ``.unet`` and ``.scheduler`` (one
    that :func:`diffusers_transitions` accepts: e.g. ``pipe.scheduler =
    DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
    algorithm_type="sde-dpmsolver++")`` for DPM++ 2M SDE). To call a pipeline as usual, see
    :class:`specdiff_kernels.integrations.pipeline.SpeculativePipeline`.

    ``eta`` (DDIM) and ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` (Euler's churn) are the
    scheduler step's per-call arguments, as :func:`diffusers_transitions` takes them.
    ``guidance_scale`` and ``uncond`` (classifier-free guidance) and ``call_kwargs`` go to
    :class:`DiffusersModel`; the per-chain conditioning is passed to the sampler's ``sample(...,
    model_kwargs=...)``. For a text pipeline, e.g. ``cond, neg = pipe.encode_prompt(prompts,
    "cpu", 1, True)`` and ``from_pipeline(pipe, n, guidance_scale=7.5, uncond={
    "encoder_hidden_states": neg[:1]})`` with ``model_kwargs={"encoder_hidden_states": cond}``.
    """
    check_pipeline_parts(pipe, "from_pipeline")
    churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    transitions = diffusers_transitions(pipe.scheduler, num_inference_steps, eta=eta, **churn)
    model = DiffusersModel(pipe.unet, guidance_scale=guidance_scale, uncond=uncond, **call_kwargs)
    return model, transitions

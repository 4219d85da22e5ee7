"""The pipeline kinds :class:`~specdiff_kernels.integrations.pipeline.SpeculativePipeline`
calls: one small object per diffusers pipeline ``__call__`` it mirrors.

A kind says whether it ``accepts`` a pipeline, ``check``s it at construction, builds the
sampler's ``model`` for a guidance scale, and turns one call's arguments (bound against the
pipeline's own ``__call__`` signature, its defaults filled in) into a :class:`Run`: the chains'
number, shape, initial latents and per-chain conditioning, and ``finish``, which turns the
sampled latents into the pipeline's own output (its VAE, image processor, output class).

Classifier-free guidance is the pipelines': on when ``guidance_scale > 1`` (as diffusers'
``do_classifier_free_guidance``), both branches in ONE network call on the doubled batch
(:class:`~specdiff_kernels.integrations.diffusers.DiffusersModel`), the unconditional inputs per
chain through ``model_kwargs["uncond"]``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor

from ..validate import as_choice, as_int, as_real
from .diffusers import DiffusersModel, DiffusersTransformerModel, check_pipeline_parts

OUTPUT_TYPES = ("pil", "np", "pt")
LATENT_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# why an argument of a pipeline's __call__ cannot be honoured (others: a generic reason)
WHY_NOT = {
    "callback_on_step_end": "the chains commit their steps in rounds, not one step at a time",
    "callback": "the chains commit their steps in rounds, not one step at a time",
    "callback_steps": "the chains commit their steps in rounds, not one step at a time",
    "guidance_rescale": "not supported yet",
    "timesteps": "the schedule is the scheduler's own for num_inference_steps",
    "sigmas": "the schedule is the scheduler's own for num_inference_steps",
    "cross_attention_kwargs": "not supported yet",
    "joint_attention_kwargs": "not supported yet",
    "ip_adapter_image": "not supported yet",
    "ip_adapter_image_embeds": "not supported yet",
    "eta": "it applies to DDIMScheduler only",
    "skip_guidance_layers": "not supported yet",
}


@dataclass
class Run:
    """One call of a pipeline, as the sampler runs it."""

    steps: int
    guidance: Optional[float]  # the model's guidance scale (None: one branch)
    num_chains: int
    event_shape: tuple
    finish: Callable[[Tensor], Any]  # the sampled latents -> the pipeline's output
    eta: Optional[float] = None  # DDIM's
    mu: Optional[float] = None  # a FlowMatch scheduler's dynamic shift
    # the chains' initial latents in units of N(0, I) (the sampler scales them by the
    # scheduler's init_noise_sigma, as diffusers' prepare_latents does); None: drawn per chain
    latents: Optional[Tensor] = None
    model_kwargs: Optional[dict] = None


class PipelineKind(Protocol):
    """What :class:`SpeculativePipeline` needs of a kind of pipeline."""

    name: str
    honoured: tuple  # the __call__ arguments it honours (others: refused unless at default)

    def accepts(self, pipe) -> bool: ...

    def check(self, pipe) -> None: ...

    def signature(self, pipe) -> inspect.Signature: ...

    def refused(self, pipe, given: dict) -> list[str]: ...

    def model(self, pipe, guidance: Optional[float]) -> torch.nn.Module: ...

    def prepare(self, pipe, args: dict) -> Run: ...


def _is(pipe, name: str) -> bool:
    """``pipe`` is an instance of diffusers' class ``name`` (False without diffusers)."""
    try:
        import diffusers
    except ImportError:
        return False
    cls = getattr(diffusers, name, None)
    return isinstance(cls, type) and isinstance(pipe, cls)


def device_of(pipe) -> torch.device:
    """Where the pipeline runs its denoiser (diffusers' ``_execution_device``)."""
    for name in ("_execution_device", "device"):
        device = getattr(pipe, name, None)
        if isinstance(device, torch.device):
            return device
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return next(net.parameters()).device


def guidance_of(value) -> Optional[float]:
    """The model's guidance scale for a pipeline's ``guidance_scale``: diffusers guides when it
    is > 1 and calls the conditional branch alone otherwise."""
    w = as_real("guidance_scale", value)
    return w if w > 1 else None


def output(cls, return_dict: bool, *fields):
    return cls(*fields) if return_dict else tuple(fields)


class _Kind:
    """The defaults of a kind: the pipeline's own ``__call__`` signature, no refusals beyond
    the arguments it does not honour."""

    def signature(self, pipe) -> inspect.Signature:
        return inspect.signature(type(pipe).__call__)

    def refused(self, pipe, given: dict) -> list[str]:
        """Honoured arguments refused for this pipeline's settings (``"name=value (why)"``)."""
        return []


# ------------------------------------------------------------------------------ unconditional
def unconditional_call(
    batch_size: int = 1,
    generator: Optional[torch.Generator] = None,
    num_inference_steps: Optional[int] = None,
    output_type: Optional[str] = "pil",
    return_dict: bool = True,
    eta: Optional[float] = None,
):
    """The call of an unconditional UNet pipeline (``DDPMPipeline``, ``DDIMPipeline``)."""


class Unconditional(_Kind):
    """An unconditional UNet image pipeline (``pipe.unet(sample, timestep)``): DDPMPipeline's
    post-processing of pixel-space samples."""

    name = "unconditional"
    honoured = tuple(inspect.signature(unconditional_call).parameters)

    def accepts(self, pipe) -> bool:
        return True  # the fallback: check() refuses what it cannot run

    def check(self, pipe) -> None:
        transformer = getattr(pipe, "transformer", None)
        if getattr(pipe, "unet", None) is None and transformer is not None:
            raise TypeError(
                f"SpeculativePipeline: {type(pipe).__name__} has a .transformer "
                f"({type(transformer).__name__}), not a .unet, and is not a pipeline it "
                f"supports ({SUPPORTED_TEXT})"
            )
        check_pipeline_parts(pipe, "SpeculativePipeline")
        why = conditional(pipe)
        if why is not None:
            raise TypeError(
                f"SpeculativePipeline: {type(pipe).__name__} is a conditional pipeline ({why}); "
                f"conditional pipelines other than {SUPPORTED_TEXT} are not supported yet by "
                f"SpeculativePipeline; use from_pipeline(pipe, num_inference_steps, ...) and "
                f"pass the conditioning per chain with sample(..., model_kwargs={{...}}), as "
                f"from_pipeline's docstring shows"
            )
        DiffusersModel(pipe.unet)  # a diffusers model that is not UNet-style: refused now

    def signature(self, pipe) -> inspect.Signature:
        return inspect.signature(unconditional_call)

    def model(self, pipe, guidance) -> torch.nn.Module:
        return DiffusersModel(pipe.unet)

    def prepare(self, pipe, args: dict) -> Run:
        batch_size = as_int("batch_size", args["batch_size"], 1)
        output_type = args["output_type"]
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        n = args["num_inference_steps"]
        cfg = pipe.unet.config
        size = cfg.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)

        def finish(samples: Tensor):
            return _pixels(pipe, (samples / 2 + 0.5).clamp(0, 1), output_type, args["return_dict"])

        return Run(
            steps=default_steps(pipe) if n is None else n,
            guidance=None,
            num_chains=batch_size,
            event_shape=(int(cfg.in_channels), *(int(v) for v in hw)),
            finish=finish,
            eta=args["eta"],
        )


def _pixels(pipe, image: Tensor, output_type: str, return_dict: bool):
    """DDPMPipeline's (and DiTPipeline's) output of images ``[B, C, H, W]`` in [0, 1]."""
    from diffusers import ImagePipelineOutput

    if output_type == "pt":
        images = image
    else:
        images = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            images = pipe.numpy_to_pil(images)
    return output(ImagePipelineOutput, return_dict, images)


def default_steps(pipe) -> int:
    """The pipeline's own default ``num_inference_steps`` (1000 if it has none)."""
    try:
        p = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    except (TypeError, ValueError):
        p = None
    if p is not None and isinstance(p.default, int) and not isinstance(p.default, bool):
        return p.default
    return 1000


def conditional(pipe) -> Optional[str]:
    """What makes ``pipe`` conditional (its UNet needs inputs besides the sample and the
    timestep), else None."""
    unet = pipe.unet
    if getattr(pipe, "text_encoder", None) is not None:
        return f"it has a text_encoder ({type(pipe.text_encoder).__name__})"
    cfg = getattr(unet, "config", None)
    get = (lambda key: getattr(cfg, key, None)) if cfg is not None else (lambda key: None)
    if get("cross_attention_dim") is not None:
        return (
            f"its unet {type(unet).__name__} has cross-attention (cross_attention_dim="
            f"{get('cross_attention_dim')}) and needs encoder_hidden_states"
        )
    for key in ("num_class_embeds", "class_embed_type"):
        if get(key) is not None:
            return (
                f"its unet {type(unet).__name__} is class-conditional ({key}={get(key)!r}) and "
                f"needs class_labels"
            )
    try:
        params = inspect.signature(unet.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    needed = [
        n
        for n, p in list(params.items())[2:]
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if needed:
        return f"its unet {type(unet).__name__} needs {', '.join(needed)}"
    return None


# ------------------------------------------------------------------------------ DiT
DIT_NULL_CLASS = 1000  # DiTPipeline's class_null


class DiT(_Kind):
    """``DiTPipeline``: class-conditional latents, guided on the noise channels against the null
    class 1000, learned-variance channels dropped, decoded by the VAE."""

    name = "DiTPipeline"
    honoured = (
        "class_labels",
        "guidance_scale",
        "generator",
        "num_inference_steps",
        "output_type",
        "return_dict",
    )

    def accepts(self, pipe) -> bool:
        return _is(pipe, "DiTPipeline")

    def check(self, pipe) -> None:
        cfg = pipe.transformer.config
        c, out = int(cfg.in_channels), int(cfg.out_channels or cfg.in_channels)
        if out not in (c, 2 * c):
            raise TypeError(
                f"SpeculativePipeline: the DiT's out_channels={out} is neither in_channels={c} "
                f"nor 2 x in_channels (a learned variance)"
            )
        DiffusersTransformerModel(pipe.transformer, channels=c)

    def model(self, pipe, guidance) -> torch.nn.Module:
        uncond = None if guidance is None else {"class_labels": DIT_NULL_CLASS}
        return DiffusersTransformerModel(
            pipe.transformer,
            channels=int(pipe.transformer.config.in_channels),
            guidance_scale=guidance,
            uncond=uncond,
        )

    def labels(self, pipe, class_labels) -> Tensor:
        """``class_labels`` as a long tensor, each id one the transformer embeds."""
        n = int(pipe.transformer.config.num_embeds_ada_norm)
        if isinstance(class_labels, Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (int, str)) or not hasattr(class_labels, "__len__"):
            raise TypeError(
                f"class_labels must be a list of class ids, got {type(class_labels).__name__}"
            )
        ids = [as_int(f"class_labels[{i}]", v, 0, n) for i, v in enumerate(class_labels)]
        if not ids:
            raise ValueError("class_labels must hold at least one class id")
        return torch.tensor(ids, dtype=torch.long, device=device_of(pipe))

    def prepare(self, pipe, args: dict) -> Run:
        labels = self.labels(pipe, args["class_labels"])
        guidance = guidance_of(args["guidance_scale"])
        cfg = pipe.transformer.config
        if guidance is not None and int(cfg.num_embeds_ada_norm) < DIT_NULL_CLASS:
            raise ValueError(
                f"guidance_scale={args['guidance_scale']}: DiTPipeline guides against the null "
                f"class {DIT_NULL_CLASS}, which this transformer has no embedding for "
                f"(num_embeds_ada_norm={cfg.num_embeds_ada_norm}); use guidance_scale <= 1"
            )
        output_type = as_choice("output_type", args["output_type"], LATENT_OUTPUT_TYPES)
        size = int(cfg.sample_size)

        def finish(latents: Tensor):
            if output_type == "latent":
                return output(_image_output(), args["return_dict"], latents)
            vae = pipe.vae
            images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
            return _pixels(pipe, (images / 2 + 0.5).clamp(0, 1), output_type, args["return_dict"])

        return Run(
            steps=as_int("num_inference_steps", args["num_inference_steps"], 1),
            guidance=guidance,
            num_chains=labels.shape[0],
            event_shape=(int(cfg.in_channels), size, size),
            finish=finish,
            model_kwargs={"class_labels": labels},
        )


def _image_output():
    from diffusers import ImagePipelineOutput

    return ImagePipelineOutput


# ------------------------------------------------------------------------------ Stable Diffusion
class StableDiffusion(_Kind):
    """``StableDiffusionPipeline``: text-to-image latents, the prompt encoded by the pipeline's
    own ``encode_prompt``, guided on the UNet's output against the negative prompt's embedding,
    decoded by its VAE, safety checker and image processor."""

    name = "StableDiffusionPipeline"
    honoured = (
        "prompt",
        "height",
        "width",
        "num_inference_steps",
        "guidance_scale",
        "negative_prompt",
        "num_images_per_prompt",
        "eta",
        "generator",
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "output_type",
        "return_dict",
        "clip_skip",
    )

    def accepts(self, pipe) -> bool:
        return _is(pipe, "StableDiffusionPipeline")

    def check(self, pipe) -> None:
        proj = getattr(pipe.unet.config, "time_cond_proj_dim", None)
        if proj is not None:
            raise TypeError(
                f"SpeculativePipeline: the unet has time_cond_proj_dim={proj} (a guidance-"
                f"distilled UNet, e.g. LCM): not supported yet"
            )
        DiffusersModel(pipe.unet)

    def model(self, pipe, guidance) -> torch.nn.Module:
        return DiffusersModel(pipe.unet, guidance_scale=guidance)

    def refused(self, pipe, given: dict) -> list[str]:
        """eta is DDIM's step argument; the pipeline ignores it for another scheduler."""
        eta = given.get("eta", 0.0)
        if not _is(pipe.scheduler, "DDIMScheduler") and eta not in (None, 0, 0.0):
            return [f"eta={eta!r} ({WHY_NOT['eta']})"]
        return []

    def prepare(self, pipe, args: dict) -> Run:
        guidance = guidance_of(args["guidance_scale"])
        output_type = as_choice("output_type", args["output_type"], LATENT_OUTPUT_TYPES)
        n = as_int("num_images_per_prompt", args["num_images_per_prompt"], 1)
        steps = as_int("num_inference_steps", args["num_inference_steps"], 1)
        f = pipe.vae_scale_factor
        size = pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        height, width = args["height"] or h * f, args["width"] or w * f
        pipe.check_inputs(
            args["prompt"],
            height,
            width,
            None,
            args["negative_prompt"],
            args["prompt_embeds"],
            args["negative_prompt_embeds"],
        )
        device = device_of(pipe)
        cond, neg = pipe.encode_prompt(
            args["prompt"],
            device,
            n,
            guidance is not None,
            args["negative_prompt"],
            prompt_embeds=args["prompt_embeds"],
            negative_prompt_embeds=args["negative_prompt_embeds"],
            clip_skip=args["clip_skip"],
        )
        kwargs = {"encoder_hidden_states": cond}
        if guidance is not None:
            kwargs["uncond"] = {"encoder_hidden_states": neg}
        shape = (int(pipe.unet.config.in_channels), int(height) // f, int(width) // f)
        eta = args["eta"] if _is(pipe.scheduler, "DDIMScheduler") else None

        def finish(latents: Tensor):
            return _decode(pipe, latents.to(cond.dtype), output_type, args, device)

        return Run(
            steps=steps,
            guidance=guidance,
            num_chains=cond.shape[0],
            event_shape=shape,
            finish=finish,
            eta=eta,
            latents=given_latents(args["latents"], cond.shape[0], shape),
            model_kwargs=kwargs,
        )


def given_latents(latents, num_chains: int, shape: tuple) -> Optional[Tensor]:
    """The call's ``latents`` (the chains' start before the scheduler's init_noise_sigma),
    checked to be the chains' shape, as diffusers' ``prepare_latents``."""
    if latents is None:
        return None
    if not isinstance(latents, Tensor):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
    want = (num_chains, *shape)
    if tuple(latents.shape) != want:
        raise ValueError(
            f"latents has shape {tuple(latents.shape)}; this call's latents are {want} "
            f"(prompts x num_images_per_prompt, channels, height / vae_scale_factor, width / "
            f"vae_scale_factor)"
        )
    return latents


def _decode(pipe, latents: Tensor, output_type: str, args: dict, device):
    """StableDiffusionPipeline's end of ``__call__``: VAE, safety checker, image processor."""
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    if output_type == "latent":
        image, nsfw = latents, None
    else:
        vae = pipe.vae
        image = vae.decode(
            (latents / vae.config.scaling_factor).to(vae.dtype),
            return_dict=False,
            generator=args["generator"],
        )[0]
        image, nsfw = pipe.run_safety_checker(image, device, latents.dtype)
    denormalize = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
    image = pipe.image_processor.postprocess(
        image, output_type=output_type, do_denormalize=denormalize
    )
    return output(StableDiffusionPipelineOutput, args["return_dict"], image, nsfw)


# ------------------------------------------------------------------------------ SD3
class StableDiffusion3(_Kind):
    """``StableDiffusion3Pipeline``: a rectified-flow transformer (velocity prediction) on
    ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``, the prompts encoded by the
    pipeline's own ``encode_prompt`` (two CLIPs, T5 or its zeros), guided on the velocity against
    the negative prompts' embeddings and pooled projections, decoded as
    ``vae.decode(latents / scaling_factor + shift_factor)``."""

    name = "StableDiffusion3Pipeline"
    honoured = (
        "prompt",
        "prompt_2",
        "prompt_3",
        "height",
        "width",
        "num_inference_steps",
        "guidance_scale",
        "negative_prompt",
        "negative_prompt_2",
        "negative_prompt_3",
        "num_images_per_prompt",
        "generator",
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "output_type",
        "return_dict",
        "clip_skip",
        "max_sequence_length",
        "mu",
        # the skip-layer guidance's settings: unused without skip_guidance_layers (refused)
        "skip_layer_guidance_scale",
        "skip_layer_guidance_stop",
        "skip_layer_guidance_start",
    )
    # the text inputs, passed on to the pipeline's own check_inputs and encode_prompt
    _texts = (
        "prompt",
        "prompt_2",
        "prompt_3",
        "negative_prompt",
        "negative_prompt_2",
        "negative_prompt_3",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )

    def accepts(self, pipe) -> bool:
        return _is(pipe, "StableDiffusion3Pipeline")

    def check(self, pipe) -> None:
        DiffusersTransformerModel(pipe.transformer)

    def model(self, pipe, guidance) -> torch.nn.Module:
        return DiffusersTransformerModel(pipe.transformer, guidance_scale=guidance)

    def prepare(self, pipe, args: dict) -> Run:
        guidance = guidance_of(args["guidance_scale"])
        output_type = as_choice("output_type", args["output_type"], LATENT_OUTPUT_TYPES)
        n = as_int("num_images_per_prompt", args["num_images_per_prompt"], 1)
        f = pipe.vae_scale_factor
        height = args["height"] or pipe.default_sample_size * f
        width = args["width"] or pipe.default_sample_size * f
        texts = {k: args[k] for k in self._texts}
        pipe.check_inputs(
            height=height, width=width, max_sequence_length=args["max_sequence_length"], **texts
        )
        device = device_of(pipe)
        cond, neg, pooled, neg_pooled = pipe.encode_prompt(
            do_classifier_free_guidance=guidance is not None,
            device=device,
            clip_skip=args["clip_skip"],
            num_images_per_prompt=n,
            max_sequence_length=args["max_sequence_length"],
            **texts,
        )
        kwargs = {"encoder_hidden_states": cond, "pooled_projections": pooled}
        if guidance is not None:
            kwargs["uncond"] = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
        shape = (int(pipe.transformer.config.in_channels), int(height) // f, int(width) // f)

        def finish(latents: Tensor):
            return _decode_sd3(pipe, latents.to(cond.dtype), output_type, args["return_dict"])

        return Run(
            steps=as_int("num_inference_steps", args["num_inference_steps"], 1),
            guidance=guidance,
            num_chains=cond.shape[0],
            event_shape=shape,
            finish=finish,
            mu=self.mu(pipe, args["mu"], shape),
            latents=given_latents(args["latents"], cond.shape[0], shape),
            model_kwargs=kwargs,
        )

    def mu(self, pipe, mu, shape: tuple) -> Optional[float]:
        """The pipeline's shift for a scheduler with dynamic shifting (from the image's token
        count unless given), else None."""
        cfg = pipe.scheduler.config
        if mu is not None or not cfg.get("use_dynamic_shifting", None):
            return mu
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        patch = pipe.transformer.config.patch_size
        return calculate_shift(
            (shape[1] // patch) * (shape[2] // patch),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.16),
        )


def _decode_sd3(pipe, latents: Tensor, output_type: str, return_dict: bool):
    """StableDiffusion3Pipeline's end of ``__call__``."""
    from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

    if output_type == "latent":
        image = latents
    else:
        cfg = pipe.vae.config
        image = pipe.vae.decode(
            ((latents / cfg.scaling_factor) + cfg.shift_factor).to(pipe.vae.dtype),
            return_dict=False,
        )[0]
        image = pipe.image_processor.postprocess(image, output_type=output_type)
    return output(StableDiffusion3PipelineOutput, return_dict, image)


# every kind, most specific first (Unconditional accepts any pipeline: last)
KINDS: tuple = (DiT(), StableDiffusion(), StableDiffusion3(), Unconditional())
SUPPORTED_TEXT = ", ".join(k.name for k in KINDS if k.name != "unconditional")


def pipeline_kind(pipe) -> PipelineKind:
    """The kind of ``pipe``, checked (a one-line TypeError where it cannot be run)."""
    kind = next(k for k in KINDS if k.accepts(pipe))
    kind.check(pipe)
    return kind

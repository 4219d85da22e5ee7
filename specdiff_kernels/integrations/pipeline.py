"""A diffusers unconditional image pipeline that samples by speculative sampling.

``SpeculativePipeline(pipe)`` wraps a ``DDPMPipeline``-like pipeline (``pipe.unet``, a UNet
called as ``unet(sample, timestep)``, and ``pipe.scheduler``: DDPM, DDIM with eta > 0,
Euler-ancestral or ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``) and is
called like the pipeline::

    from diffusers import DDPMPipeline
    from specdiff_kernels.integrations.pipeline import SpeculativePipeline

    pipe = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")
    spec = SpeculativePipeline(pipe)                      # window="auto"
    images = spec(batch_size=4, generator=torch.Generator().manual_seed(0),
                  num_inference_steps=200).images         # PIL images, as pipe(...) gives
    spec.last_stats                                       # the run's SamplerStats

The images have exactly the law of the pipeline's own loop with the same scheduler and step count
(not the same pixels for a seed: the noise is drawn per chain from the generator's seed); only the
number of sequential UNet calls changes. The post-processing is ``DDPMPipeline``'s.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from ..sampling.sampler import SpeculativeSampler
from ..validate import as_int
from .diffusers import DiffusersModel, check_pipeline_parts, diffusers_transitions

__all__ = ["SpeculativePipeline"]

OUTPUT_TYPES = ("pil", "np", "pt")
_CALL_ARGS = ("batch_size", "generator", "num_inference_steps", "output_type", "return_dict", "eta")
# SpeculativeSampler's own arguments that the wrapper sets
_SET_HERE = ("model", "transitions", "window")


class _Cast(torch.nn.Module):
    """The UNet in its own precision, the chains' states float32 (as ``specdiff sample``)."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x, t):
        return self.net(x.to(self.dtype), t).to(x.dtype)


class SpeculativePipeline:
    """``pipe``'s ``__call__``, sampled by :class:`~specdiff_kernels.SpeculativeSampler`.

    Args:
        pipe: an unconditional UNet image pipeline (``pipe.unet``, ``pipe.scheduler``; e.g.
            ``DDPMPipeline``, ``DDIMPipeline``). Its scheduler is read at every call (assigning
            ``pipe.scheduler = ...`` between calls takes effect) and never mutated. Refused at
            construction, in one line: a conditional pipeline (a text encoder, a UNet with
            cross-attention or class labels: use :func:`from_pipeline` with ``model_kwargs``) and
            a transformer pipeline (``pipe.transformer``: not supported yet).
        window: the sampler's ``window`` (default ``"auto"``).
        **sampler_options: further :class:`SpeculativeSampler` arguments (``draft``,
            ``progress``, ``path``, ``max_batch``, ``cost``, ``backend``, ...).

    Attributes:
        last_stats: the :class:`~specdiff_kernels.SamplerStats` of the last call (None before).
        pipe: the wrapped pipeline.
    """

    def __init__(self, pipe, *, window="auto", **sampler_options) -> None:
        check_pipeline_parts(pipe, "SpeculativePipeline")
        why = _conditional(pipe)
        if why is not None:
            raise TypeError(
                f"SpeculativePipeline: {type(pipe).__name__} is a conditional pipeline ({why}); "
                f"conditional pipelines are not supported yet by SpeculativePipeline, which "
                f"samples unconditional UNet pipelines (DDPMPipeline, DDIMPipeline); use "
                f"from_pipeline(pipe, num_inference_steps, ...) and pass the conditioning per "
                f"chain with sample(..., model_kwargs={{...}}), as from_pipeline's docstring shows"
            )
        DiffusersModel(pipe.unet)  # a diffusers model that is not UNet-style: refused now
        accepted = inspect.signature(SpeculativeSampler.__init__).parameters
        unknown = [k for k in sampler_options if k not in accepted or k in _SET_HERE]
        if unknown:
            raise TypeError(
                f"SpeculativePipeline: unexpected keyword argument(s) {', '.join(unknown)} "
                f"(SpeculativeSampler options: "
                f"{', '.join(k for k in accepted if k not in ('self', *_SET_HERE))})"
            )
        self.pipe = pipe
        self.window = window
        self.sampler_options = sampler_options
        self.last_stats = None
        # one sampler per (schedule, steps): window="auto" measures the network's cost once
        self._samplers: dict = {}

    def __repr__(self) -> str:
        return f"SpeculativePipeline({type(self.pipe).__name__}, window={self.window!r})"

    # ------------------------------------------------------------------ the pipeline's call
    def _default_steps(self) -> int:
        try:
            p = inspect.signature(type(self.pipe).__call__).parameters.get("num_inference_steps")
        except (TypeError, ValueError):
            p = None
        if p is not None and isinstance(p.default, int) and not isinstance(p.default, bool):
            return p.default
        return 1000

    def _device(self) -> torch.device:
        device = getattr(self.pipe, "device", None)
        if isinstance(device, torch.device):
            return device
        return next(self.pipe.unet.parameters()).device

    def _event_shape(self) -> tuple:
        cfg = self.pipe.unet.config
        size = cfg.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), *(int(v) for v in hw))

    def sampler(self, num_inference_steps: int, eta: Optional[float] = None) -> SpeculativeSampler:
        """The sampler a call with these settings uses (built once, then reused)."""
        sched = self.pipe.scheduler
        key = (num_inference_steps, eta, id(sched), repr(sorted(dict(sched.config).items())))
        sampler = self._samplers.get(key)
        if sampler is None:
            transitions = diffusers_transitions(sched, num_inference_steps, eta=eta)
            unet = self.pipe.unet
            model = DiffusersModel(unet)
            dtype = getattr(unet, "dtype", torch.float32)
            if dtype != torch.float32:
                model = _Cast(model, dtype)
            sampler = SpeculativeSampler(
                model, transitions, window=self.window, **self.sampler_options
            )
            self._samplers = {key: sampler}  # the latest only: a schedule change drops the old
        return sampler

    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[torch.Generator] = None,
        num_inference_steps: Optional[int] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        eta: Optional[float] = None,
        **kwargs,
    ):
        """As ``pipe(batch_size, generator, num_inference_steps, output_type, return_dict)``:
        diffusers' ``ImagePipelineOutput(images=...)`` (a tuple ``(images,)`` when
        ``return_dict=False``); ``output_type`` ``"pil"`` (a list of PIL images), ``"np"``
        (``[B, H, W, C]`` float in [0, 1]) or ``"pt"`` (``[B, C, H, W]`` tensor in [0, 1]).
        ``num_inference_steps`` defaults to the pipeline's own default; ``eta`` is DDIM's (> 0).
        ``generator``: one torch.Generator (a CUDA one is drawn from once for the seed)."""
        if kwargs:
            raise TypeError(
                f"SpeculativePipeline.__call__: unexpected keyword argument(s) "
                f"{', '.join(sorted(kwargs))} (accepted: {', '.join(_CALL_ARGS)})"
            )
        batch_size = as_int("batch_size", batch_size, 1)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        generator = _cpu_generator(generator)
        n = self._default_steps() if num_inference_steps is None else num_inference_steps
        sampler = self.sampler(n, eta)
        res = sampler.sample(
            batch_size,
            self._event_shape(),
            generator=generator,
            device=self._device(),
            dtype=torch.float32,
        )
        self.last_stats = res.stats
        image = (res.samples / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            images = image
        else:
            images = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.pipe.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        from diffusers import ImagePipelineOutput

        return ImagePipelineOutput(images=images)


def _conditional(pipe) -> Optional[str]:
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


def _cpu_generator(generator) -> Optional[torch.Generator]:
    """The sampler's generator only seeds the chains' streams (one draw), on the CPU; a CUDA
    generator, as diffusers users pass, gives that draw itself (advanced as by one draw)."""
    if isinstance(generator, (list, tuple)):
        raise TypeError(
            "generator: pass one torch.Generator; a list of per-image generators is not "
            "supported (each chain's noise is a function of one seed and its index)"
        )
    if isinstance(generator, torch.Generator) and generator.device.type != "cpu":
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
        return torch.Generator().manual_seed(int(seed.item()))
    return generator

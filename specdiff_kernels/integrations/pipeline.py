"""A diffusers pipeline that samples by speculative sampling, called as the pipeline is.

``SpeculativePipeline(pipe)`` wraps

* an unconditional UNet pipeline (``DDPMPipeline``, ``DDIMPipeline``: ``pipe.unet`` called as
  ``unet(sample, timestep)``),
* ``DiTPipeline`` (class-conditional latents: ``class_labels``, ``guidance_scale``),
* ``StableDiffusionPipeline`` (text to image: ``prompt``, ``negative_prompt``,
  ``guidance_scale``, ``num_images_per_prompt``, ``height`` / ``width``, ``latents``,
  ``prompt_embeds`` / ``negative_prompt_embeds``, ``output_type`` incl. ``"latent"``),
* ``StableDiffusion3Pipeline`` (the same, with ``prompt_2`` / ``prompt_3``, pooled embeddings,
  ``max_sequence_length`` and ``mu``; guidance on the velocity),

with a stochastic scheduler (DDPM, DDIM with eta > 0, Euler-ancestral,
``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``; SD3:
``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``), and is called like the pipeline,
returning its output type::

    from diffusers import DDPMPipeline
    from specdiff_kernels.integrations.pipeline import SpeculativePipeline

    pipe = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")
    spec = SpeculativePipeline(pipe)                      # window="auto"
    images = spec(batch_size=4, generator=torch.Generator().manual_seed(0),
                  num_inference_steps=200).images         # PIL images, as pipe(...) gives
    spec.last_stats                                       # the run's SamplerStats

    sd = SpeculativePipeline(sd_pipe)                     # a StableDiffusionPipeline
    out = sd(prompt=["a cat"], negative_prompt=["blurry"], guidance_scale=7.5,
             num_inference_steps=50, generator=torch.Generator().manual_seed(0))

The latents (images) have exactly the law of the pipeline's own loop with the same scheduler and
step count (not the same pixels for a seed: the noise is drawn per chain from the generator's
seed); only the number of sequential network calls changes. Classifier-free guidance evaluates
both branches in one batched network call. Arguments of the pipeline's ``__call__`` that cannot
be honoured (callbacks, ``guidance_rescale``, ``cross_attention_kwargs``, custom ``timesteps`` /
``sigmas``, IP-adapter inputs, a list of generators, ...) are refused in one line naming them.
Each pipeline is one kind (:mod:`.pipeline_kinds`): its call, conditioning and decoding.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from ..sampling.network import CastNet
from ..sampling.sampler import SpeculativeSampler
from .diffusers import diffusers_transitions
from .pipeline_kinds import WHY_NOT, PipelineKind, Run, default_steps, device_of, pipeline_kind

__all__ = ["SpeculativePipeline"]

# SpeculativeSampler's own arguments that the wrapper sets
_SET_HERE = ("model", "transitions", "window")


class SpeculativePipeline:
    """``pipe``'s ``__call__``, sampled by :class:`~specdiff_kernels.SpeculativeSampler`.

    Args:
        pipe: an unconditional UNet image pipeline (``pipe.unet``, ``pipe.scheduler``; e.g.
            ``DDPMPipeline``, ``DDIMPipeline``), a ``DiTPipeline``, a
            ``StableDiffusionPipeline`` or a ``StableDiffusion3Pipeline``. Its scheduler is read at every call (assigning
            ``pipe.scheduler = ...`` between calls takes effect) and never mutated. Refused at
            construction, in one line: another conditional pipeline (use
            :func:`from_pipeline` with ``model_kwargs``) or transformer pipeline.
        window: the sampler's ``window`` (default ``"auto"``).
        **sampler_options: further :class:`SpeculativeSampler` arguments (``draft``,
            ``progress``, ``path``, ``max_batch``, ``cost``, ``backend``, ...).

    Calls take the pipeline's own arguments (positional ones in its order) and return its own
    output class; ``generator`` is one torch.Generator (a CUDA one is drawn from once for the
    seed). An argument the wrapper cannot honour is refused, unless it has the pipeline's
    default value.

    Attributes:
        last_stats: the :class:`~specdiff_kernels.SamplerStats` of the last call (None before).
        pipe: the wrapped pipeline.
        kind: its :class:`~specdiff_kernels.integrations.pipeline_kinds.PipelineKind`.
    """

    def __init__(self, pipe, *, window="auto", **sampler_options) -> None:
        self.kind: PipelineKind = pipeline_kind(pipe)
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
        # one sampler per (schedule, steps, guidance): window="auto" measures the cost once
        self._samplers: dict = {}

    def __repr__(self) -> str:
        return f"SpeculativePipeline({type(self.pipe).__name__}, window={self.window!r})"

    # ------------------------------------------------------------------ the pipeline's call
    def _default_steps(self) -> int:
        return default_steps(self.pipe)

    def sampler(
        self,
        num_inference_steps: int,
        eta: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        mu: Optional[float] = None,
    ) -> SpeculativeSampler:
        """The sampler a call with these settings uses (built once, then reused);
        ``guidance_scale``: the model's (None: the conditional branch alone); ``mu``: a
        FlowMatch scheduler's dynamic shift."""
        sched = self.pipe.scheduler
        config = repr(sorted(dict(sched.config).items()))
        key = (num_inference_steps, eta, guidance_scale, mu, id(sched), config)
        sampler = self._samplers.get(key)
        if sampler is None:
            transitions = diffusers_transitions(sched, num_inference_steps, eta=eta, mu=mu)
            model = self.kind.model(self.pipe, guidance_scale)
            dtype = getattr(model.unet, "dtype", torch.float32)
            if dtype != torch.float32:
                model = CastNet(model, dtype)
            sampler = SpeculativeSampler(
                model, transitions, window=self.window, **self.sampler_options
            )
            self._samplers = {key: sampler}  # the latest only: a schedule change drops the old
        return sampler

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """As ``pipe(*args, **kwargs)``: the pipeline's own output (``ImagePipelineOutput``,
        ``StableDiffusionPipelineOutput``, or its tuple with ``return_dict=False``).

        Unconditional pipelines: ``(batch_size, generator, num_inference_steps, output_type,
        return_dict, eta)``, ``output_type`` ``"pil"``, ``"np"`` (``[B, H, W, C]`` in [0, 1])
        or ``"pt"`` (``[B, C, H, W]`` in [0, 1]); ``num_inference_steps`` defaults to the
        pipeline's own default; ``eta`` is DDIM's (> 0). Latent pipelines also take
        ``output_type="latent"`` (the sampled latents, not decoded)."""
        call = self._bind(args, kwargs)
        generator = _cpu_generator(call["generator"])
        run: Run = self.kind.prepare(self.pipe, call)
        sampler = self.sampler(run.steps, run.eta, run.guidance, run.mu)
        device = device_of(self.pipe)
        x_init = None
        if run.latents is not None:  # diffusers' prepare_latents: latents * init_noise_sigma
            x_init = run.latents.to(device, torch.float32) * sampler.transitions.init_std
        res = sampler.sample(
            None if x_init is not None else run.num_chains,
            None if x_init is not None else run.event_shape,
            generator=generator,
            x_init=x_init,
            device=None if x_init is not None else device,
            dtype=None if x_init is not None else torch.float32,
            model_kwargs=run.model_kwargs,
        )
        self.last_stats = res.stats
        return run.finish(res.samples)

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name, the pipeline's defaults filled in; what the wrapper
        cannot honour is refused in one line, before any network call."""
        sig = self.kind.signature(self.pipe)
        params = [
            p
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        where = "SpeculativePipeline.__call__"
        if len(args) > len(params):
            raise TypeError(
                f"{where}: takes {len(params)} positional arguments but {len(args)} were given"
            )
        given = dict(zip((p.name for p in params), args))
        for name, value in kwargs.items():
            if name in given:
                raise TypeError(f"{where}: got multiple values for argument {name!r}")
            given[name] = value
        defaults = {p.name: p.default for p in params}
        unknown = sorted(k for k in given if k not in defaults)
        not_honoured = [
            f"{k} ({WHY_NOT.get(k, 'not supported')})"
            for k in given
            if k in defaults
            and k not in self.kind.honoured
            and not _is_default(given[k], defaults[k])
        ] + self.kind.refused(self.pipe, given)
        problems = []
        if unknown:
            problems.append(
                f"unexpected keyword argument(s) {', '.join(unknown)} (accepted: "
                f"{', '.join(self.kind.honoured)})"
            )
        if not_honoured:
            problems.append(
                f"{type(self.pipe).__name__}'s argument(s) that speculative sampling cannot "
                f"honour: {', '.join(not_honoured)}"
            )
        if problems:
            raise TypeError(f"{where}: {'; '.join(problems)}")
        empty = inspect.Parameter.empty
        return {k: (None if d is empty else d) for k, d in defaults.items()} | given


def _is_default(value, default) -> bool:
    """``value`` is the parameter's default (passing a default explicitly is harmless)."""
    if value is default:
        return True
    if isinstance(value, (bool, int, float, str, list, tuple)) and type(value) is type(default):
        return value == default
    return False


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

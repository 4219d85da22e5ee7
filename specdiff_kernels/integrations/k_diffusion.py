"""k-diffusion's sampler functions, sampled speculatively.

``sample_euler_ancestral`` and ``sample_dpmpp_2m_sde`` have the signatures of k-diffusion's
functions of those names (``k_diffusion.sampling``, which ComfyUI and A1111 vendor) and sample
the same chains exactly in law through :class:`~specdiff_kernels.SpeculativeSampler`: only the
number of sequential denoiser calls changes. k-diffusion's conventions hold:

* ``model(x, sigma, **extra_args) -> denoised``: ``x`` the VE state ``x0 + sigma * eps``
  ``[b, *E]``, ``sigma`` a ``[b]`` tensor (x's dtype and device), ``denoised`` the x0 estimate.
  The speculative rounds call it on batches of any size b, each row a state of one of the chains
  (``x``'s rows) at its own sigma; ``extra_args`` reach every call unchanged.
* ``x`` is the starting state (``noise * sigmas[0]``, as k-diffusion's callers pass it);
  ``sigmas`` any strictly decreasing schedule (``N + 1`` entries, e.g. the output of
  ``get_sigmas_karras`` / ``get_sigmas_exponential``, ending in 0 or not), used as given.
* ``callback``: k-diffusion's dict ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step
  i = 0..N-1, ``x`` the chains' state at step i and ``denoised`` the denoiser's output there. The
  chains of a speculative run commit their steps in rounds, at their own pace, so the calls come
  in step order once the run has ended (states and outputs are kept per step until then: 2 N
  states per chain).
* ``disable``: the progress bar (tqdm's convention: None shows it on a terminal only).
* ``eta`` and ``s_noise`` as k-diffusion's (:func:`euler_ancestral_from_sigmas` and
  :func:`dpmsolver_sde_from_sigmas` derive their means and stds); eta = 0 or s_noise = 0 makes
  every step deterministic: the chain is then run step by step (nothing to speculate over).
* ``noise_sampler``: only None. The noise of a speculative run comes from counter-based per-chain
  streams (the verify reflects rejected steps with them), so a user's noise cannot be honoured;
  the law sampled is that of k-diffusion's default noise samplers, which give independent N(0, I)
  per step: ``default_noise_sampler`` (``randn_like``) and the Brownian-tree noise of
  ``sample_dpmpp_2m_sde`` (its increments over the disjoint intervals [sigma_{i+1}, sigma_i],
  normalised). The samples have that law, not k-diffusion's pixels for a seed.

The chains are the project's Euler-ancestral and DPM-Solver++ 2M SDE tables on these sigmas
(``prediction="sample"``; DPM++ 2M SDE with ``lower_order_final=False``: k-diffusion's second
order at every step after the first, save a final step to sigma = 0). DPM-Solver++'s tables keep
the VP state ``x / sqrt(1 + sigma^2)``; the denoiser sees the VE state either way.

Speculative options (keyword-only, after k-diffusion's arguments): ``window`` (default
``"auto"``), ``draft`` (default ``FrozenTargetDraft()``), ``generator`` (seeds the chains'
streams; None: one draw from torch's global generator, as k-diffusion's ``randn_like``),
``return_info`` (return ``(x, stats)``, as k-diffusion's ``sample_dpm_adaptive``) and further
:class:`~specdiff_kernels.SpeculativeSampler` arguments (``path``, ``max_batch``, ``cost``,
``backend``, ...). ``window="auto"`` measures the denoiser's cost at every call (a few batched
probe calls before the run); ``cost=`` (a previous run's ``stats.autopilot["cost"]``) or an int
window skips that. On CUDA the path defaults to ``"ragged"``: the static round captures the
network in a CUDA graph, which a k-diffusion denoiser (host syncs, Python control flow: ComfyUI's
CFG wrapper) cannot be; give ``path="auto"`` for a denoiser that can.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..sampling.ancestral import AncestralSampler
from ..sampling.sampler import SpeculativeSampler
from ..sampling.transitions import (
    SOLVER_TYPES,
    GaussianTransitions,
    dpmsolver_sde_from_sigmas,
    euler_ancestral_from_sigmas,
)
from ..validate import as_choice

__all__ = ["sample_dpmpp_2m_sde", "sample_euler_ancestral"]

# the SpeculativeSampler arguments these functions set themselves
_SET_HERE = ("self", "model", "transitions", "window", "draft", "progress")
# those AncestralSampler takes too (a chain with no noise: eta = 0 or s_noise = 0)
_ANCESTRAL_OPTIONS = ("check_finite", "backend", "max_batch")
# the model kwarg that names each row's chain when a callback records the steps
_ROW = "_k_diffusion_chain"


@dataclass(frozen=True)
class _Chain:
    """A k-diffusion sampler on given sigmas: the project's tables and the state convention."""

    transitions: GaussianTransitions  # timesteps: the step indices 0..N-1
    sigmas: Tensor  # [N + 1] float64 on the CPU
    given: Tensor  # the sigmas as given (the callback's ``sigma``: k-diffusion's ``sigmas[i]``)
    vp: bool  # the state is x / sqrt(1 + sigma^2) (DPM-Solver++'s tables), else x itself

    def state_scale(self, k: int) -> float:
        """The chain's state per unit of k-diffusion's x at sigmas[k]."""
        return 1 / math.sqrt(1 + float(self.sigmas[k]) ** 2) if self.vp else 1.0


@dataclass
class _Record:
    """Every chain's state and denoiser output per step, for the callback: the last evaluation of
    a chain at step i is its committed state there (a rejected draft at step i is evaluated in a
    round before the one that commits step i; later rounds start past it)."""

    x: Tensor  # [N, B, *E], NaN until written
    denoised: Tensor

    @staticmethod
    def like(x: Tensor, num_steps: int) -> "_Record":
        empty = x.new_full((num_steps, *x.shape), math.nan)
        return _Record(empty, empty.clone())

    def write(self, k: Tensor, rows: Tensor, x: Tensor, denoised: Tensor) -> None:
        self.x[k, rows] = x
        self.denoised[k, rows] = denoised

    def replay(self, callback: Callable, sigmas: Tensor) -> None:
        for i in range(self.x.shape[0]):
            if bool(self.x[i].isnan().any()):  # every committed state below N is evaluated
                raise RuntimeError(f"k-diffusion callback: step {i} of a chain was not recorded")
            sigma = sigmas[i]
            callback(
                {
                    "x": self.x[i],
                    "i": i,
                    "sigma": sigma,
                    "sigma_hat": sigma,
                    "denoised": self.denoised[i],
                }
            )


class _Denoiser:
    """A k-diffusion denoiser as the samplers' ``model(x_in, t)``: t is the step index, x_in the
    model input of the tables (``model_alpha[t]`` times k-diffusion's x, for both chains); the
    output is the denoised x0 (``prediction="sample"``)."""

    def __init__(self, model, chain: _Chain, extra_args: dict, like: Tensor, record):
        self.model, self.extra_args, self.record = model, extra_args, record
        self.alpha = chain.transitions.model_alpha.to(like.device, like.dtype)
        # sigmas[i] in x's dtype: what k-diffusion's ``sigmas[i] * s_in`` passes
        self.sigma = chain.sigmas[:-1].to(like.device, like.dtype)

    def __call__(self, x_in: Tensor, t: Tensor, **rows) -> Tensor:
        x = x_in / self.alpha[t].reshape(-1, *([1] * (x_in.dim() - 1)))
        denoised = self.model(x, self.sigma[t], **self.extra_args)
        if self.record is not None:
            self.record.write(t, rows[_ROW], x, denoised)
        return denoised


@dataclass(frozen=True)
class _Speculation:
    """The speculative options of a call (keyword-only arguments)."""

    window: object = "auto"
    draft: object = None
    generator: Optional[torch.Generator] = None
    return_info: bool = False
    sampler_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        accepted = inspect.signature(SpeculativeSampler.__init__).parameters
        unknown = [k for k in self.sampler_options if k not in accepted or k in _SET_HERE]
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {', '.join(unknown)} (k-diffusion's arguments, "
                f"then window, draft, generator, return_info and the SpeculativeSampler options "
                f"{', '.join(k for k in accepted if k not in _SET_HERE)})"
            )
        if not isinstance(self.return_info, bool):
            raise TypeError(f"return_info must be a bool, got {self.return_info!r}")


def _checked_sigmas(sigmas) -> Tensor:
    """k-diffusion's sigmas as float64 on the CPU, refused in one line unless strictly
    decreasing, finite and >= 0."""
    try:
        sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"sigmas must be a tensor of noise levels, got {sigmas!r}") from None
    if sig.dim() != 1:
        raise ValueError(f"sigmas must be one-dimensional, got shape {tuple(sig.shape)}")
    if not bool((torch.isfinite(sig) & (sig >= 0)).all()):
        raise ValueError(f"sigmas must be finite and >= 0, got {sig.tolist()}")
    up = (sig[1:] >= sig[:-1]).nonzero().view(-1)
    if up.numel():
        i = int(up[0])
        raise ValueError(
            f"sigmas must be strictly decreasing (a sampling schedule from sigma_max down), got "
            f"sigmas[{i}]={sig[i].item():g}, sigmas[{i + 1}]={sig[i + 1].item():g}"
        )
    return sig


class _Args(NamedTuple):
    """k-diffusion's arguments of a call."""

    model: Callable
    x: Tensor
    sigmas: object
    extra_args: Optional[dict]
    callback: Optional[Callable]
    disable: Optional[bool]
    noise_sampler: object


def _checked_call(args: _Args) -> dict:
    """k-diffusion's arguments but sigmas, refused in one line where they cannot be honoured;
    returns the denoiser's kwargs."""
    model, x, _, extra_args, callback, disable, noise_sampler = args
    if not callable(model):
        raise TypeError(
            f"model must be a callable denoiser model(x, sigma, **extra_args), got {model!r}"
        )
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1 and x.shape[0] > 0):
        raise TypeError(f"x must be a floating-point tensor [batch, ...], got {x!r}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of the denoiser's kwargs, got {extra_args!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it gets k-diffusion's dict), got {callback!r}")
    if disable is not None and not isinstance(disable, bool):
        raise TypeError(f"disable must be None or a bool, got {disable!r}")
    if noise_sampler is not None:
        raise ValueError(
            "noise_sampler must be None: a speculative run draws each chain's noise from its own "
            "counter-based stream, with the law of k-diffusion's default noise samplers "
            "(independent N(0, I) per step)"
        )
    return {} if extra_args is None else extra_args


def _sampler(model, chain: _Chain, progress: bool, spec: _Speculation, x: Tensor, recording):
    """The speculative sampler, or the plain chain where no step has noise (eta = 0)."""
    T = chain.transitions
    options = dict(spec.sampler_options)
    if bool(T.deterministic.all()):
        plain = {k: v for k, v in options.items() if k in _ANCESTRAL_OPTIONS}
        return AncestralSampler(model, T, progress=progress, **plain)
    if recording:  # the record reads the ragged round's calls: only states the chains need
        if options.get("path", "ragged") != "ragged":
            raise ValueError(
                f"path={options['path']!r} cannot record the steps a callback gets; leave path "
                f"out (the ragged round) or pass callback=None"
            )
        options["path"] = "ragged"
    elif x.device.type == "cuda":
        options.setdefault("path", "ragged")  # see the module docstring
    return SpeculativeSampler(model, T, spec.draft, spec.window, progress=progress, **options)


def _sample(chain: _Chain, args: _Args, extra_args: dict, spec: _Speculation):
    """Run ``chain`` from k-diffusion's x."""
    x, callback, disable = args.x, args.callback, args.disable
    N = chain.transitions.num_steps
    record = None if callback is None else _Record.like(x, N)
    denoiser = _Denoiser(args.model, chain, extra_args, x, record)
    # tqdm's disable=None: a bar on a terminal only
    progress = bool(getattr(sys.stderr, "isatty", bool)()) if disable is None else not disable
    sampler = _sampler(denoiser, chain, progress, spec, x, record is not None)
    rows = None if record is None else {_ROW: torch.arange(x.shape[0], device=x.device)}
    start = chain.state_scale(0)
    res = sampler.sample(
        x_init=x if start == 1.0 else x * start, generator=spec.generator, model_kwargs=rows
    )
    end = chain.state_scale(N)
    out = res.samples if end == 1.0 else res.samples / end
    if record is not None:
        record.replay(callback, chain.given)
    return (out, res.stats) if spec.return_info else out


def _run(args: _Args, spec: _Speculation, tables: Callable[[Tensor], GaussianTransitions], vp):
    """The shared body of both functions: ``tables(sigmas)`` builds the chain's tables from the
    checked sigmas (float64); ``vp``: their state is x / sqrt(1 + sigma^2)."""
    extra_args = _checked_call(args)
    sig = _checked_sigmas(args.sigmas)
    if sig.numel() < 2:  # no step: k-diffusion's loop returns x
        return (args.x, None) if spec.return_info else args.x
    chain = _Chain(tables(sig), sig, torch.as_tensor(args.sigmas), vp)
    return _sample(chain, args, extra_args, spec)


def _steps(sig: Tensor) -> Tensor:
    """The tables' timesteps: the step index (the denoiser wrapper looks its sigma up)."""
    return torch.arange(sig.numel() - 1)


@torch.no_grad()
def sample_euler_ancestral(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    *,
    window="auto",
    draft=None,
    generator: Optional[torch.Generator] = None,
    return_info: bool = False,
    **sampler_options,
):
    """k-diffusion's ``sample_euler_ancestral``, sampled speculatively (exact in law; see the
    module docstring for the arguments). Step i: ``sigma_up = min(sigma_{i+1}, eta *
    sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2))``, ``sigma_down =
    sqrt(sigma_{i+1}^2 - sigma_up^2)``, ``x' = x + (x - denoised) / sigma_i * (sigma_down -
    sigma_i) + s_noise * sigma_up * N(0, I)``."""
    args = _Args(model, x, sigmas, extra_args, callback, disable, noise_sampler)
    spec = _Speculation(window, draft, generator, return_info, sampler_options)

    def tables(sig: Tensor) -> GaussianTransitions:
        return euler_ancestral_from_sigmas(
            _steps(sig),
            sig,
            prediction="sample",
            init_std=float(sig[0]),
            name="k-diffusion euler_ancestral",
            eta=eta,
            s_noise=s_noise,
        )

    return _run(args, spec, tables, vp=False)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    solver_type="midpoint",
    *,
    window="auto",
    draft=None,
    generator: Optional[torch.Generator] = None,
    return_info: bool = False,
    **sampler_options,
):
    """k-diffusion's ``sample_dpmpp_2m_sde`` (DPM-Solver++(2M) SDE), sampled speculatively (exact
    in law; see the module docstring for the arguments). With h = log(sigma_i / sigma_{i+1}):
    ``x' = sigma_{i+1} / sigma_i e^(-eta h) x + (1 - e^(-(1 + eta) h)) denoised + (second order,
    from step 1: c (denoised - old_denoised) / r, r = h_last / h, c = (1 - e^(-(1 + eta) h)) / 2
    for "midpoint", (1 - e^(-(1 + eta) h)) / (-(1 + eta) h) + 1 for "heun") + s_noise
    sigma_{i+1} sqrt(1 - e^(-2 eta h)) N(0, I)``; a step to sigma = 0 gives ``denoised``."""
    args = _Args(model, x, sigmas, extra_args, callback, disable, noise_sampler)
    spec = _Speculation(window, draft, generator, return_info, sampler_options)
    solver_type = as_choice("solver_type", solver_type, SOLVER_TYPES)

    def tables(sig: Tensor) -> GaussianTransitions:
        return dpmsolver_sde_from_sigmas(
            _steps(sig),
            sig,
            solver_type=solver_type,
            lower_order_final=False,
            prediction="sample",
            name=f"k-diffusion dpmpp_2m_sde[{solver_type}]",
            eta=eta,
            s_noise=s_noise,
        )

    return _run(args, spec, tables, vp=True)

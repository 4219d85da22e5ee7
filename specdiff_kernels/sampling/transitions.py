"""Gaussian transitions of stochastic diffusion samplers, in affine form (docs/design.md §2, §5).

A sampler with N steps is a Markov chain over *sampling steps* k = 0..N-1: step k maps the state
at (model) timestep ``timesteps[k]`` to the state of the next timestep (after the last step: the
data). Every step is Gaussian with a model-independent, isotropic std::

    x' ~ N(mean_k(x), std[k]^2 I)
    mean_k(x) = c_x0[k] * clip(x0_hat) + c_eps[k] * eps_hat + c_x[k] * x

where ``x0_hat`` and ``eps_hat`` are the network's denoised estimate and noise estimate at
(x, k). All per-step quantities are plain float64 tables of length N, so an adapter (e.g. for a
diffusers scheduler) can supply its own; the builders below produce DDPM, DDIM (eta >= 0),
Euler-ancestral, DPM-Solver++ 2M SDE and rectified-flow (FlowMatch Euler, Flow-GRPO SDE) tables.

Conventions, made explicit:

* **Model call.** ``out = model(input_scale[k] * x, t)`` with ``t = timesteps[k]`` as a per-sample
  ``[B]`` tensor (integer dtype when all timesteps are integral, float64 otherwise). The model's
  input obeys the VP marginal ``x_in = model_alpha[k] * x0 + model_sigma[k] * eps``
  (``model_alpha^2 + model_sigma^2 = 1`` for the usual VP-trained networks).
* **State scaling.** The state x itself obeys ``x = state_alpha[k] * x0 + state_sigma[k] * eps``
  with ``state_alpha = model_alpha / input_scale`` and ``state_sigma = model_sigma /
  input_scale``. For VP samplers (DDPM, DDIM) ``input_scale = 1`` and the state is the VP
  ``x_t``. For Euler-ancestral the state is the VE variable ``x = x0 + sigma_k * eps``
  (``state_alpha = 1``, ``state_sigma = sigma_k``) and ``input_scale = 1/sqrt(1 + sigma_k^2)``,
  exactly diffusers' ``scale_model_input``; the initial state has std ``init_std``.
* **Prediction types.** ``epsilon``: x0 = (x_in - model_sigma * out) / model_alpha;
  ``sample``: x0 = out; ``v_prediction``: x0 = model_alpha * x_in - model_sigma * out;
  ``flow_prediction`` (rectified flow, x_t = (1 - t) x0 + t eps, the network's velocity v = eps -
  x0): x0 = x_in - model_sigma * out, with model_alpha = 1 - t (0 at t = 1 is allowed, for every
  prediction but epsilon) and model_sigma = t (docs/design.md §2.2; builders
  :func:`flow_euler_transitions`, :func:`flow_sde_transitions`).
  ``eps_hat`` is derived from the *unclipped* x0 (``(x - state_alpha x0) / state_sigma``; for an
  epsilon-model this is its output), unless ``eps_from_clipped_x0`` (diffusers DDIM's
  ``use_clipped_model_output``).
* **Clipping.** ``clip_sample=c`` clamps x0_hat to [-c, c] before it enters the mean (DDPM/DDIM).
* **Deterministic steps.** ``std[k] == 0`` (final DDPM step, DDIM eta = 0, the last
  Euler-ancestral step): the sampler runs these with the target directly.

The frozen-target draft (``drafts.py``) freezes the network OUTPUT at one state, as a raw x0
(``freeze="x0"``) or as eps (``freeze="eps"``), and recomputes the mean at every drafted state
with :meth:`GaussianTransitions.mean_from_x0` (after :meth:`x0_from_eps` for eps).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..ops import layout
from ..ops.round_spec import RoundSpec
from ..validate import as_choice, as_flag, as_int, as_real

# what the VP/VE builders take; "flow_prediction" (rectified flow's velocity) only the flow ones
VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
FLOW = "flow_prediction"
PREDICTIONS = VP_PREDICTIONS + (FLOW,)

Model = Callable[[Tensor, Tensor], Tensor]


def _tensor(x, name: str, dtype=None) -> Tensor:
    """``x`` as a tensor; what torch cannot convert is a TypeError naming the argument."""
    try:
        t = torch.as_tensor(x, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        kind = type(x).__name__
        raise TypeError(f"{name} must be a sequence or tensor of numbers, got {kind}") from None
    if t.is_meta:
        raise ValueError(f"{name} is a meta tensor: it has no values to tabulate")
    # the tables are small and indexed on the host; ops get their own device copies
    return t.cpu()


def _vector(x, name: str) -> Tensor:
    """A 1-D (or scalar) float64 copy of ``x``: a [N, 1] table would be flattened silently."""
    t = _tensor(x, name, torch.float64)
    if t.dim() > 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    return t.flatten().clone()


def _first_bad(name: str, t: Tensor, bad: Tensor, want: str) -> None:
    """Raise ``name must be <want>`` with the first offending entry (a table may be long)."""
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be {want}, got {t[i].item()} at index {i}")


def _table(x, n: Optional[int] = None, name: str = "table") -> Tensor:
    t = _vector(x, name)
    if n is not None and t.numel() == 1 and n != 1:
        t = t.expand(n).clone()
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} must have {n} entries (one per sampling step), got {t.numel()}")
    _first_bad(name, t, ~torch.isfinite(t), "finite")
    return t


def _timesteps(timesteps, name: str = "timesteps", flow: bool = False) -> Tensor:
    """The network's timesteps as int64 where they are whole numbers, else float64; always
    float64 for a flow model (``flow``: diffusers calls it with float timesteps t * 1000)."""
    ts = _tensor(timesteps, name)
    if ts.dim() > 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(ts.shape)}")
    ts = ts.flatten().clone()
    if ts.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if ts.dtype == torch.bool or ts.is_complex():
        raise TypeError(f"{name} must be numbers, got a {ts.dtype} tensor")
    if not ts.is_floating_point():
        return ts.to(torch.float64 if flow else torch.int64)
    ts = ts.to(torch.float64)
    _first_bad(name, ts, ~torch.isfinite(ts), "finite")
    whole = not flow and bool((ts == ts.round()).all())
    return ts.round().to(torch.int64) if whole else ts


def as_clip(name: str, value) -> Optional[float]:
    """None (no clipping) or a bound > 0 (inf: no clipping either)."""
    if value is None:
        return None
    return as_real(name, value, 0.0, open_low=True, finite=False)


def _options(prediction, clip_sample, eps_from_clipped_x0, init_std, name) -> tuple:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {name!r}")
    return (
        as_choice("prediction", prediction, PREDICTIONS),
        as_clip("clip_sample", clip_sample),
        as_flag("eps_from_clipped_x0", eps_from_clipped_x0),
        # 0 is a fixed start at the origin (e.g. a Langevin chain given no x_init)
        as_real("init_std", init_std, 0.0),
    )


def _check_model_alpha(alpha: Tensor, sigma: Tensor, prediction: str) -> None:
    """model_alpha > 0 for epsilon-prediction (x0 = (x - sigma eps) / alpha); >= 0 otherwise
    (flow at t = 1 is pure noise). A flow model's input is x_t = (1 - t) x0 + t eps: alpha =
    1 - sigma, else its velocity does not give x0 = x - t v."""
    if prediction == "epsilon":
        _first_bad("model_alpha", alpha, alpha <= 0, "> 0 for epsilon-prediction")
        return
    _first_bad("model_alpha", alpha, alpha < 0, ">= 0")
    if prediction == FLOW:
        want = "1 - model_sigma for flow_prediction (x_t = (1 - t) x0 + t eps)"
        _first_bad("model_alpha", alpha, (alpha + sigma - 1).abs() > 1e-9, want)


def _prev_table(c_prev, n: int) -> Tensor:
    """The multistep coefficient table: 0 at step 0, which has no previous prediction."""
    t = _table(0.0 if c_prev is None else c_prev, n, "c_prev")
    if float(t[0]) != 0.0:
        raise ValueError(
            f"c_prev[0] must be 0 (the first step has no previous prediction), got {t[0].item()}"
        )
    return t


class GaussianTransitions:
    """Per-step coefficient tables of an affine Gaussian sampler (see the module docstring).

    Subclasses whose ``mean_from_x0`` is not affine in x0-hat (diffusers' dynamic thresholding)
    set ``affine = False``: the static round's fused ops cannot express them, so the sampler
    takes the ragged path.

    Args:
        timesteps: ``[N]`` model timestep of each sampling step (training-schedule values).
        c_x0, c_x, std: ``[N]`` mean coefficients and step std (std >= 0; 0 = deterministic).
        model_alpha, model_sigma: ``[N]`` VP coefficients of the model's input at each step.
        c_eps: ``[N]`` coefficient of eps_hat in the mean (default 0).
        c_prev: ``[N]`` coefficient of the PREVIOUS step's raw x0_hat in the mean (default 0;
            multistep solvers such as DPM-Solver++ 2M, docs/design.md §2.1). ``c_prev[0]`` must be
            0: the first step has no previous prediction.
        input_scale: ``[N]`` model input = input_scale * state (default 1).
        prediction: ``"epsilon"``, ``"sample"``, ``"v_prediction"`` or ``"flow_prediction"``.
        clip_sample: clamp x0_hat to [-clip_sample, clip_sample] (None: no clipping).
        eps_from_clipped_x0: derive eps_hat from the clipped x0_hat (default: unclipped).
        init_std: std of the initial state, x_start ~ N(0, init_std^2 I).
        name: a label for reprs and errors.
    """

    affine = True

    def __init__(
        self,
        timesteps,
        c_x0,
        c_x,
        std,
        model_alpha,
        model_sigma,
        *,
        c_eps=None,
        c_prev=None,
        input_scale=None,
        prediction: str = "epsilon",
        clip_sample: Optional[float] = None,
        eps_from_clipped_x0: bool = False,
        init_std: float = 1.0,
        name: str = "custom",
    ):
        prediction, clip_sample, eps_from_clipped_x0, init_std = _options(
            prediction, clip_sample, eps_from_clipped_x0, init_std, name
        )
        ts = _timesteps(timesteps, flow=prediction == FLOW)
        n = ts.numel()
        self.timesteps = ts
        self.num_steps = n
        self.c_x0 = _table(c_x0, n, "c_x0")
        self.c_x = _table(c_x, n, "c_x")
        self.c_eps = _table(0.0 if c_eps is None else c_eps, n, "c_eps")
        self.c_prev = _prev_table(c_prev, n)
        # the chain's state carries the previous step's x0-hat (docs/design.md §2.1)
        self.multistep = bool((self.c_prev != 0).any())
        self.std = _table(std, n, "std")
        _first_bad("std", self.std, self.std < 0, ">= 0")
        self.model_alpha = _table(model_alpha, n, "model_alpha")
        self.model_sigma = _table(model_sigma, n, "model_sigma")
        self.input_scale = _table(1.0 if input_scale is None else input_scale, n, "input_scale")
        for label in ("model_sigma", "input_scale"):
            _first_bad(label, getattr(self, label), getattr(self, label) <= 0, "> 0")
        _check_model_alpha(self.model_alpha, self.model_sigma, prediction)
        # VP samplers feed the state as it is: no multiply by ones on every call
        self.unit_input = bool((self.input_scale == 1).all())
        self.prediction = prediction
        self.clip_sample = clip_sample
        self.eps_from_clipped_x0 = eps_from_clipped_x0
        self.init_std = init_std
        self.name = name
        self._conversions()
        self.deterministic = self.std == 0
        self._has_eps = bool((self.c_eps != 0).any())
        self._cache: dict = {}

    def _conversions(self) -> None:
        """The state's alpha and sigma and the tables between x, the network output, x0 and
        eps."""
        ma, ms, scale = self.model_alpha, self.model_sigma, self.input_scale
        self.state_alpha = ma / scale
        self.state_sigma = ms / scale
        # x0 of an eps-hat at y: x0_y y - x0_f eps (the frozen-eps draft). Where state_alpha is 0
        # (flow at t = 1: the state is pure noise) eps says nothing of x0: the draft's x0 is 0
        # there (any draft is exact; docs/design.md §2.2)
        alive = self.state_alpha > 0
        self.x0_y = torch.where(alive, 1 / self.state_alpha, 0.0)
        self.x0_f = torch.where(alive, self.state_sigma / self.state_alpha, 0.0)
        # x0_raw = out_x[k] * x + out_pred[k] * out
        if self.prediction == "epsilon":
            self.out_x, self.out_pred = scale / ma, -ms / ma
        elif self.prediction == "sample":
            self.out_x, self.out_pred = torch.zeros_like(ma), torch.ones_like(ma)
        elif self.prediction == "v_prediction":
            self.out_x, self.out_pred = ma * scale, -ms
        else:  # flow_prediction: x0 = x_in - t v (x_in = (1 - t) x0 + t eps, v = eps - x0)
            self.out_x, self.out_pred = scale.clone(), -ms

    def __repr__(self) -> str:
        return (
            f"GaussianTransitions({self.name}, N={self.num_steps}, "
            f"prediction={self.prediction!r}, "
            f"clip_sample={self.clip_sample}, deterministic_steps="
            f"{int(self.deterministic.sum())})"
        )

    # ------------------------------------------------------------------ table lookups
    def _on(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        t = self._cache.get(key)
        if t is None:
            t = getattr(self, name).to(device=device, dtype=dtype)
            self._cache[key] = t
        return t

    def coef(self, name: str, k: Tensor, like: Tensor) -> Tensor:
        """Table ``name`` at per-chain steps ``k`` (any shape), shaped to broadcast against
        ``like`` (whose leading dims are k's shape)."""
        table = self._on(name, like.device, like.dtype)
        idx = k.to(device=like.device, dtype=torch.int64).clamp(0, self.num_steps - 1)
        c = table[idx]
        return c.reshape(*k.shape, *([1] * (like.dim() - k.dim())))

    def t(self, k: Tensor) -> Tensor:
        """Model timesteps for per-chain steps ``k`` ([B] -> [B])."""
        table = self._on("timesteps", k.device, self.timesteps.dtype)
        return table[k.to(torch.int64).clamp(0, self.num_steps - 1)]

    def step_std(self, k: Tensor) -> Tensor:
        """Step std (float64) at steps ``k``."""
        k = k.to(torch.int64).clamp(0, self.num_steps - 1)
        return self._on("std", k.device, torch.float64)[k]

    def is_deterministic(self, k: Tensor) -> Tensor:
        k = k.to(torch.int64).clamp(0, self.num_steps - 1)
        return self._on("deterministic", k.device, torch.bool)[k]

    # ------------------------------------------------------------------ parametrisations
    def model_input(self, x: Tensor, k: Tensor) -> Tensor:
        return x if self.unit_input else x * self.coef("input_scale", k, x)

    def x0_from_output(self, x: Tensor, out: Tensor, k: Tensor) -> Tensor:
        """Raw (unclipped) x0_hat from the network output at (x, k)."""
        if self.prediction == "sample":
            return out
        return self.coef("out_x", k, x) * x + self.coef("out_pred", k, x) * out

    def eps_from_x0(self, x: Tensor, x0: Tensor, k: Tensor) -> Tensor:
        return (x - self.coef("state_alpha", k, x) * x0) / self.coef("state_sigma", k, x)

    def x0_from_eps(self, x: Tensor, eps: Tensor, k: Tensor) -> Tensor:
        """x0 = (x - state_sigma eps) / state_alpha; 0 where state_alpha is 0 (see x0_y)."""
        return self.coef("x0_y", k, x) * x - self.coef("x0_f", k, x) * eps

    def mean_from_x0(
        self, x: Tensor, x0: Tensor, k: Tensor, prev: Optional[Tensor] = None
    ) -> Tensor:
        """Transition mean at state x, step k, given the raw (unclipped) x0_hat, and for
        multistep transitions the raw x0_hat of the previous step, ``prev`` (required then)."""
        x0c = x0 if self.clip_sample is None else x0.clamp(-self.clip_sample, self.clip_sample)
        mean = self.coef("c_x0", k, x) * x0c + self.coef("c_x", k, x) * x
        if self._has_eps:
            eps = self.eps_from_x0(x, x0c if self.eps_from_clipped_x0 else x0, k)
            mean = mean + self.coef("c_eps", k, x) * eps
        if self.multistep:
            if prev is None:
                raise ValueError(
                    f"{self.name} is a multistep sampler: its mean needs the previous step's "
                    f"x0-hat (prev)"
                )
            mean = mean + self.coef("c_prev", k, x) * prev
        return mean

    def call_model(self, model: Model, x: Tensor, k: Tensor, **cond) -> Tensor:
        """``model(input_scale * x, t, **cond)`` with per-sample timesteps (``cond``: the rows'
        conditioning, if any)."""
        return model(self.model_input(x, k), self.t(k).to(x.device), **cond)

    def predict_x0(self, model: Model, x: Tensor, k: Tensor) -> Tensor:
        """Raw x0_hat of ``model`` at states x [B, *E] and per-chain steps k [B]."""
        return self.x0_from_output(x, self.call_model(model, x, k), k)

    def mean(self, model: Model, x: Tensor, k: Tensor, prev: Optional[Tensor] = None) -> Tensor:
        return self.mean_from_x0(x, self.predict_x0(model, x, k), k, prev)

    def sample_prior(
        self,
        shape: Sequence[int],
        generator: Optional[torch.Generator] = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> Tensor:
        x = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return x * self.init_std


def step_mean(
    transitions: GaussianTransitions, x: Tensor, x0: Tensor, k: Tensor, prev: Optional[Tensor]
) -> Tensor:
    """``transitions.mean_from_x0``, with ``prev`` only for multistep chains (a subclass written
    for one-step samplers may override ``mean_from_x0(x, x0, k)`` without it)."""
    if prev is None:
        return transitions.mean_from_x0(x, x0, k)
    return transitions.mean_from_x0(x, x0, k, prev)


# ---------------------------------------------------------------------- schedules
SPACINGS = ("leading", "linspace", "trailing")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2")


def make_betas(
    schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Tensor:
    """Training betas (float64), as diffusers: ``"linear"``, ``"scaled_linear"`` or
    ``"cosine"`` (= ``"squaredcos_cap_v2"``, Nichol & Dhariwal, betas capped at 0.999)."""
    schedule = as_choice("schedule", schedule, BETA_SCHEDULES)
    T = as_int("num_train_timesteps", num_train_timesteps, 1)
    # a beta of 0 makes abar = 1 (noise std 0: 0/0 in the step), 1 makes every later abar 0
    b0 = as_real("beta_start", beta_start, 0, 1, open_low=True, open_high=True)
    b1 = as_real("beta_end", beta_end, 0, 1, open_low=True, open_high=True)
    if schedule == "linear":
        return torch.linspace(b0, b1, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2

    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64
    )


def check_betas(betas, name: str = "betas") -> Tensor:
    b = _tensor(betas, name, torch.float64)
    if b.dim() != 1 or b.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
    _first_bad(name, b, ~((b > 0) & (b < 1)), "in (0, 1)")
    return b


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    return torch.cumprod(1.0 - check_betas(betas), dim=0)


def check_alphas_cumprod(alphas_cumprod, name: str = "alphas_cumprod") -> Tensor:
    """A training schedule's abar as float64 [T]: in (0, 1] and non-increasing."""
    a = _tensor(alphas_cumprod, name, torch.float64)
    if a.dim() != 1 or a.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(a.shape)}")
    _first_bad(name, a, ~((a > 0) & (a <= 1)), "in (0, 1]")
    up = a[1:] > a[:-1]
    if bool(up.any()):
        i = int(up.nonzero()[0, 0]) + 1
        raise ValueError(
            f"{name} must be non-increasing (a cumulative product of 1 - beta), got "
            f"{a[i].item()} at index {i} after {a[i - 1].item()}"
        )
    return a


def _schedule(alphas_cumprod, betas) -> Tensor:
    if alphas_cumprod is not None and betas is not None:
        raise ValueError("betas must not be given with alphas_cumprod (it would be ignored)")
    if alphas_cumprod is None:
        alphas_cumprod = alphas_cumprod_from_betas(make_betas() if betas is None else betas)
    return check_alphas_cumprod(alphas_cumprod)


def _inference_steps(num_inference_steps, T: int) -> int:
    """An int in 1..T (a float or bool would be truncated silently; 0 fails deep in numpy)."""
    return as_int("num_inference_steps", num_inference_steps, 1, T)


def check_steps_offset(steps_offset, spacing: str, n: int, T: int, *, ignored_ok=False) -> int:
    """``steps_offset`` (added by "leading" spacing only, as diffusers) keeps timesteps < T.
    Elsewhere it has no effect: refused unless ``ignored_ok`` (a diffusers config, where
    ignoring it is diffusers' own behaviour)."""
    off = as_int("steps_offset", steps_offset, 0)
    if off and spacing != "leading" and not ignored_ok:
        raise ValueError(
            f"steps_offset applies to spacing='leading' only (it would be ignored with "
            f"spacing={spacing!r}), got {off}"
        )
    top = T - 1 - (n - 1) * (T // n)
    if spacing == "leading" and off > top:
        raise ValueError(
            f"steps_offset must be at most {top} for {n} leading-spaced steps of {T} training "
            f"timesteps (the first timestep would be {T - 1 - top + off}), got {off}"
        )
    return off


def respaced_timesteps(
    num_train_timesteps: int,
    num_inference_steps: Optional[int] = None,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> Tensor:
    """Decreasing integer timesteps, as diffusers' DDPM/DDIM ``set_timesteps``.

    ``num_inference_steps=None`` gives all training timesteps T-1..0.
    """
    T = as_int("num_train_timesteps", num_train_timesteps, 1)
    spacing = as_choice("spacing", spacing, SPACINGS)
    if num_inference_steps is None:
        if as_int("steps_offset", steps_offset, 0):
            raise ValueError("steps_offset applies to respaced steps (num_inference_steps) only")
        return torch.arange(T - 1, -1, -1, dtype=torch.int64)
    n = _inference_steps(num_inference_steps, T)
    steps_offset = check_steps_offset(steps_offset, spacing, n, T)
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    else:
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return torch.from_numpy(ts.copy())


def _schedule_timesteps(timesteps, T: int) -> Tensor:
    """Explicit timesteps: integers in 0..T-1 (indices into the schedule), strictly decreasing."""
    ts = _timesteps(timesteps)
    if ts.is_floating_point():
        frac = ts[ts != ts.round()][0].item()
        raise TypeError(f"timesteps must be integers (indices into alphas_cumprod), got {frac}")
    _first_bad("timesteps", ts, (ts < 0) | (ts >= T), f"in 0..{T - 1}")
    if ts.numel() > 1 and bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError("timesteps must be strictly decreasing")
    return ts


def _abar_and_timesteps(
    alphas_cumprod, betas, num_inference_steps, timesteps, spacing, steps_offset
):
    abar = _schedule(alphas_cumprod, betas)
    T = abar.numel()
    if timesteps is None:
        return abar, respaced_timesteps(T, num_inference_steps, spacing, steps_offset)
    if num_inference_steps is not None:
        raise ValueError("timesteps and num_inference_steps exclude each other; give one")
    if spacing != "leading" or steps_offset != 0:
        raise ValueError("timesteps are explicit: spacing and steps_offset do not apply to them")
    return abar, _schedule_timesteps(timesteps, T)


def ddpm_transitions(
    alphas_cumprod=None,
    *,
    betas=None,
    num_inference_steps: Optional[int] = None,
    timesteps=None,
    spacing: str = "leading",
    steps_offset: int = 0,
    prediction: str = "epsilon",
    variance: str = "fixed_small",
    clip_sample: Optional[float] = None,
) -> GaussianTransitions:
    """DDPM ancestral sampling (diffusers ``DDPMScheduler.step``), on any decreasing subset of the
    training timesteps (respacing: ``betas_k = 1 - abar_t / abar_prev``).

    Args:
        alphas_cumprod: training ``abar`` [T] (default: from ``betas``, default linear 1e-4..0.02).
        num_inference_steps, spacing, steps_offset: respacing as diffusers' ``set_timesteps``;
            or give ``timesteps`` explicitly (strictly decreasing).
        prediction: ``"epsilon"``, ``"sample"``, ``"v_prediction"``.
        variance: ``"fixed_small"`` (posterior beta_tilde = (1-abar_prev)/(1-abar) beta) or
            ``"fixed_large"`` (beta).
        clip_sample: clamp x0_hat to [-c, c] (diffusers default for DDPM: 1.0); None: off.

    The step at t = 0 adds no noise (diffusers adds noise only for t > 0), so it is deterministic.
    A fixed_small step whose previous abar is 1 has variance 0 and is deterministic as well
    (diffusers clamps that variance at 1e-20, i.e. adds 1e-10 noise; dropped here).
    """
    variance = as_choice("variance", variance, ("fixed_small", "fixed_large"))
    prediction, clip_sample = (
        as_choice("prediction", prediction, VP_PREDICTIONS),
        as_clip("clip_sample", clip_sample),
    )
    abar, ts = _abar_and_timesteps(
        alphas_cumprod, betas, num_inference_steps, timesteps, spacing, steps_offset
    )
    a_t = abar[ts]
    a_prev = torch.cat([abar[ts[1:]], torch.ones(1, dtype=torch.float64)])
    alpha_k = a_t / a_prev
    beta_k = 1 - alpha_k
    c_x0 = a_prev.sqrt() * beta_k / (1 - a_t)
    c_x = alpha_k.sqrt() * (1 - a_prev) / (1 - a_t)
    if variance == "fixed_small":
        var = (1 - a_prev) / (1 - a_t) * beta_k
    else:
        var = beta_k.clone()
    var = torch.where(ts > 0, var, torch.zeros_like(var)).clamp_min(0)
    return GaussianTransitions(
        ts,
        c_x0,
        c_x,
        var.sqrt(),
        a_t.sqrt(),
        (1 - a_t).sqrt(),
        prediction=prediction,
        clip_sample=clip_sample,
        init_std=1.0,
        name=f"ddpm[{variance}]",
    )


def ddim_transitions(
    alphas_cumprod=None,
    *,
    betas=None,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    spacing: str = "leading",
    steps_offset: int = 0,
    prediction: str = "epsilon",
    clip_sample: Optional[float] = None,
    set_alpha_to_one: bool = True,
    use_clipped_model_output: bool = False,
) -> GaussianTransitions:
    """DDIM (diffusers ``DDIMScheduler.step``): ``mean = sqrt(abar_prev) x0 + sqrt(1 - abar_prev -
    std^2) eps``, ``std = eta * sqrt((1-abar_prev)/(1-abar) (1 - abar/abar_prev))``.

    As diffusers, the previous timestep is ``t - T // num_inference_steps`` (and
    ``final_alpha_cumprod`` = 1 or abar[0] below 0). eta = 0: every step is deterministic.
    """
    as_real("eta", eta, 0, 1)  # above 1 the direction term can have no real value
    prediction, clip_sample = (
        as_choice("prediction", prediction, VP_PREDICTIONS),
        as_clip("clip_sample", clip_sample),
    )
    set_alpha_to_one = as_flag("set_alpha_to_one", set_alpha_to_one)
    use_clipped_model_output = as_flag("use_clipped_model_output", use_clipped_model_output)
    if use_clipped_model_output and clip_sample is None:
        raise ValueError("use_clipped_model_output has no effect without clip_sample; set both")
    abar = _schedule(alphas_cumprod, betas)
    T = abar.numel()
    n = _inference_steps(num_inference_steps, T)
    ts = respaced_timesteps(T, n, spacing, steps_offset)
    final = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else abar[0]
    return ddim_from_schedule(
        abar,
        ts,
        T // n,
        final,
        eta=eta,
        prediction=prediction,
        clip_sample=clip_sample,
        eps_from_clipped_x0=use_clipped_model_output,
        name=f"ddim[eta={eta}]",
    )


def ddim_from_schedule(
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    step_ratio: int,
    final_alpha_cumprod,
    *,
    eta: float,
    name: str,
    **kwargs,
) -> GaussianTransitions:
    """DDIM's step at ``timesteps`` of a training schedule ``alphas_cumprod``, as diffusers
    computes it: previous timestep ``t - step_ratio``, ``final_alpha_cumprod`` below 0.
    ``kwargs`` go to :class:`GaussianTransitions` (prediction, clip_sample, eps_from_clipped_x0).
    Shared by :func:`ddim_transitions` and the diffusers adapter."""
    eta = as_real("eta", eta, 0, 1)
    abar = check_alphas_cumprod(alphas_cumprod)
    ts = _schedule_timesteps(timesteps, abar.numel())
    prev = ts - as_int("step_ratio", step_ratio, 1)
    fin = as_real("final_alpha_cumprod", final_alpha_cumprod, 0, 1, open_low=True)
    final = torch.tensor(fin, dtype=torch.float64)
    a_t = abar[ts]
    a_prev = torch.where(prev >= 0, abar[prev.clamp_min(0)], final)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * var.clamp_min(0).sqrt()
    c_eps = (1 - a_prev - std**2).clamp_min(0).sqrt()
    return GaussianTransitions(
        ts,
        a_prev.sqrt(),
        torch.zeros_like(a_t),
        std,
        a_t.sqrt(),
        (1 - a_t).sqrt(),
        c_eps=c_eps,
        init_std=1.0,
        name=name,
        **kwargs,
    )


def euler_ancestral_transitions(
    alphas_cumprod=None,
    *,
    betas=None,
    num_inference_steps: int = 50,
    spacing: str = "linspace",
    steps_offset: int = 0,
    prediction: str = "epsilon",
    init_std: Optional[float] = None,
) -> GaussianTransitions:
    """Euler-ancestral (diffusers ``EulerAncestralDiscreteScheduler``), VE state convention.

    State ``x = x0 + sigma_k eps`` with ``sigma = sqrt((1-abar)/abar)`` at the (possibly
    fractional, linearly interpolated in sigma, as diffusers) timesteps; the model sees
    ``x / sqrt(1 + sigma_k^2)``. With ``s_up = sqrt(s_to^2 (s_from^2 - s_to^2) / s_from^2)`` and
    ``s_down = sqrt(s_to^2 - s_up^2)``: ``mean = (s_down/s_from) x + (1 - s_down/s_from) x0``,
    ``std = s_up`` (the last step, to sigma = 0, is deterministic: mean = x0).
    ``init_std`` defaults to diffusers' ``init_noise_sigma`` (sigma_max for "linspace"/"trailing"
    spacing, sqrt(sigma_max^2 + 1) for "leading").
    """
    prediction = as_choice("prediction", prediction, VP_PREDICTIONS)
    if init_std is not None:
        init_std = as_real("init_std", init_std, 0, open_low=True)
    spacing = as_choice("spacing", spacing, SPACINGS)
    abar = _schedule(alphas_cumprod, betas)
    T = abar.numel()
    n = _inference_steps(num_inference_steps, T)
    steps_offset = check_steps_offset(steps_offset, spacing, n, T)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float64)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float64) + steps_offset
    else:
        ts = np.arange(T, 0, -T / n).round().copy().astype(np.float64) - 1
    full = ((1 - abar) / abar).sqrt().numpy()
    sig = torch.from_numpy(np.interp(ts, np.arange(T), full))
    if init_std is None:
        smax = float(sig.max())
        init_std = smax if spacing in ("linspace", "trailing") else math.sqrt(smax**2 + 1)
    return euler_ancestral_from_sigmas(
        torch.from_numpy(ts),
        torch.cat([sig, sig.new_zeros(1)]),
        prediction=prediction,
        init_std=init_std,
        name="euler_ancestral",
    )


def euler_ancestral_from_sigmas(
    timesteps: Tensor,
    sigmas: Tensor,
    *,
    prediction: str,
    init_std: float,
    name: str,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> GaussianTransitions:
    """The Euler-ancestral step from ``sigmas[k]`` to ``sigmas[k + 1]`` (``N + 1`` entries, the
    last one the final sigma, 0), as diffusers' ``EulerAncestralDiscreteScheduler.step``. Shared by
    :func:`euler_ancestral_transitions`, the diffusers adapter and k-diffusion's interface
    (:mod:`specdiff_kernels.integrations.k_diffusion`), whose ``eta`` and ``s_noise`` these are
    (k-diffusion's ``get_ancestral_step``): ``s_up = min(s_to, eta * s_up)``, ``s_down =
    sqrt(s_to^2 - s_up^2)``, and the noise added is ``s_noise * s_up`` (the mean keeps s_down)."""
    prediction = as_choice("prediction", prediction, VP_PREDICTIONS)
    eta = as_real("eta", eta, 0.0)
    s_noise = as_real("s_noise", s_noise, 0.0)
    ts = _timesteps(timesteps)
    sig = _vector(sigmas, "sigmas")
    if sig.numel() != ts.numel() + 1:
        raise ValueError(
            f"sigmas must have {ts.numel() + 1} entries (one per timestep, then the final "
            f"sigma), got {sig.numel()}"
        )
    _first_bad("sigmas", sig, ~(torch.isfinite(sig) & (sig >= 0)), "finite and >= 0")
    _first_bad("sigmas", sig[:-1], sig[:-1] <= 0, "> 0 before the final entry")
    s_from, s_to = sig[:-1], sig[1:]
    s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2).clamp_min(0).sqrt()
    if eta != 1.0:  # (eta = 1: the tables diffusers' step gives, bit for bit)
        s_up = torch.minimum(s_to, eta * s_up)
    s_down = (s_to**2 - s_up**2).clamp_min(0).sqrt()
    ratio = s_down / s_from
    scale = 1 / (1 + s_from**2).sqrt()
    return GaussianTransitions(
        ts,
        1 - ratio,
        ratio,
        s_up if s_noise == 1.0 else s_noise * s_up,
        scale,
        s_from * scale,
        input_scale=scale,
        prediction=prediction,
        init_std=init_std,
        name=name,
    )


SOLVER_TYPES = ("midpoint", "heun")
SIGMA_SCHEDULES = ("default", "karras")
FINAL_SIGMAS = ("zero", "sigma_min")


def dpmsolver_sde_from_sigmas(
    timesteps,
    sigmas,
    *,
    solver_order: int = 2,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    prediction: str = "epsilon",
    name: str = "dpm++2m-sde",
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> GaussianTransitions:
    """SDE-DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", the SDE variant of its multistep solver)
    from ``sigmas`` (``N + 1`` entries: the VE noise levels sigma = sqrt((1 - abar) / abar) of the
    N timesteps, then the final one), as diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` steps (docs/design.md §2.1).

    With alpha = 1/sqrt(1 + sigma^2), s = alpha sigma (VP) and lambda = log(alpha / s), step k goes
    from s0 = sigmas[k] to t = sigmas[k + 1] with h = lambda_t - lambda_s0, r = h_prev / h:

    * first order: x' = (s_t / s_s0) e^-h x + alpha_t (1 - e^-2h) D0 + s_t sqrt(1 - e^-2h) xi
      with D0 the x0-hat at x;
    * second order adds a multiple of D1 = (D0 - D_prev) / r (``"midpoint"``: 1/2 alpha_t
      (1 - e^-2h); ``"heun"``: alpha_t ((1 - e^-2h) / (-2h) + 1)), D_prev the x0-hat of the
      previous step: the chain is multistep (``c_prev``).

    Step 0 is first order (no previous prediction), as is the last step when ``euler_at_final``,
    when the final sigma is 0, or when ``lower_order_final`` and N < 15, exactly diffusers' rule.
    A final sigma of 0 makes the last step deterministic (its mean is the x0-hat).

    ``eta`` and ``s_noise`` are k-diffusion's (``sample_dpmpp_2m_sde``; 1 and 1: diffusers'
    chain): with eta h in place of h where the state decays and in the noise, G = (s_t / s_s0)
    e^(-eta h), the x0-hat coefficients take 1 - e^(-(1 + eta) h) in place of 1 - e^-2h (heun's:
    (1 - e^(-(1 + eta) h)) / (-(1 + eta) h) + 1), and the std is s_noise s_t sqrt(1 - e^(-2 eta
    h)); eta = 0 is the deterministic DPM-Solver++ 2M chain of k-diffusion's SDE sampler.
    """
    order = as_int("solver_order", solver_order, 1, 2)
    prediction = as_choice("prediction", prediction, VP_PREDICTIONS)
    eta, s_noise = as_real("eta", eta, 0.0), as_real("s_noise", s_noise, 0.0)
    solver_type = as_choice("solver_type", solver_type, SOLVER_TYPES)
    lower_order_final = as_flag("lower_order_final", lower_order_final)
    euler_at_final = as_flag("euler_at_final", euler_at_final)
    ts = _timesteps(timesteps)
    n = ts.numel()
    sig = _sde_sigmas(sigmas, n)
    alpha, s0, G, c_x0, std, c_prev = _sde_dpm_steps(
        sig, order, solver_type, euler_at_final or (lower_order_final and n < 15), eta
    )
    return GaussianTransitions(
        ts,
        c_x0,
        G,
        std if s_noise == 1.0 else s_noise * std,
        alpha,
        s0,
        c_prev=c_prev,
        prediction=prediction,
        name=name,
    )


def _sde_sigmas(sigmas, n: int) -> Tensor:
    """``sigmas`` checked: ``n + 1`` finite levels, > 0 but for the last (>= 0)."""
    sig = _vector(sigmas, "sigmas")
    if sig.numel() != n + 1:
        raise ValueError(
            f"sigmas must have {n + 1} entries (one per timestep, then the final sigma), got "
            f"{sig.numel()}"
        )
    _first_bad("sigmas", sig, ~(torch.isfinite(sig) & (sig >= 0)), "finite and >= 0")
    _first_bad("sigmas", sig[:-1], sig[:-1] <= 0, "> 0 before the final entry")
    return sig


def _sde_dpm_steps(
    sig: Tensor, order: int, solver_type: str, first_order_final: bool, eta: float = 1.0
):
    """The SDE-DPM-Solver++ step tables from the N + 1 noise levels ``sig`` (see
    :func:`dpmsolver_sde_from_sigmas`): the model's VP alpha and sigma at each step, then G, c_x0,
    std and c_prev."""
    n = sig.numel() - 1
    alpha = 1 / (1 + sig**2).sqrt()
    s = sig * alpha
    lam = torch.log(alpha) - torch.log(s)  # +inf at a final sigma of 0
    s0, st, at = s[:-1], s[1:], alpha[1:]
    h = lam[1:] - lam[:-1]
    # eta h, 0 at eta = 0 even where h = inf (no 0 * inf); h itself at eta = 1 (the same bits)
    eta_h = torch.zeros_like(h) if eta == 0 else eta * h
    one_m_e2 = -torch.expm1(-(h + eta_h))  # 1 - e^-(1 + eta)h: 1 - e^-2h at eta = 1
    G = st / s0 * torch.exp(-eta_h)  # 0 where h = inf
    c_d0 = at * one_m_e2
    std = st * (-torch.expm1(-2 * eta_h)).sqrt()
    c_x0, c_prev = c_d0.clone(), torch.zeros(n, dtype=torch.float64)
    second = torch.zeros(n, dtype=torch.bool)
    if order == 2 and n > 1:
        second[1:] = True
        # diffusers' lower_order_final: the last step first order (always at a final sigma 0)
        second[-1] = not (first_order_final or float(sig[-1]) == 0.0)
    k = second.nonzero().view(-1)
    r = (lam[k] - lam[k - 1]) / h[k]  # h_prev / h
    if solver_type == "midpoint":
        c_d1 = 0.5 * c_d0[k]
    else:
        c_d1 = at[k] * (one_m_e2[k] / -(h[k] + eta_h[k]) + 1)
    c_x0[k] = c_d0[k] + c_d1 / r
    c_prev[k] = -c_d1 / r
    return alpha[:-1], s0, G, c_x0, std, c_prev


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """The noise levels of Karras et al. (2022), from sigma_max down to sigma_min (float64 [n])."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """Fractional training timesteps of noise levels ``sigma`` (log-linear interpolation of the
    training schedule's log sigmas), as diffusers' ``_sigma_to_t``."""
    log_sigma = torch.log(sigma.clamp_min(1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = (dists >= 0).to(torch.int64).cumsum(0).argmax(0).clamp(max=log_sigmas.numel() - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def dpmsolver_sde_transitions(
    num_inference_steps: int,
    *,
    alphas_cumprod=None,
    betas=None,
    sigma_schedule: str = "default",
    spacing: str = "linspace",
    solver_order: int = 2,
    solver_type: str = "midpoint",
    final_sigmas_type: str = "zero",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    prediction: str = "epsilon",
) -> GaussianTransitions:
    """DPM-Solver++ 2M SDE ("DPM++ 2M SDE", with ``sigma_schedule="karras"`` "DPM++ 2M SDE
    Karras") for a VP model with training schedule ``alphas_cumprod`` (or ``betas``; default: the
    linear DDPM schedule), without diffusers: the timesteps and noise levels of diffusers'
    ``DPMSolverMultistepScheduler.set_timesteps`` (``timestep_spacing`` = ``spacing``,
    ``use_karras_sigmas``, ``final_sigmas_type``), steps by :func:`dpmsolver_sde_from_sigmas`.
    ``solver_order=1`` is the first-order SDE-DPM-Solver++ chain."""
    abar = _schedule(alphas_cumprod, betas)
    T = abar.numel()
    n = _inference_steps(num_inference_steps, T)
    spacing = as_choice("spacing", spacing, SPACINGS)
    schedule = as_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
    final = as_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
    train_sigmas = ((1 - abar) / abar).sqrt()
    if schedule == "karras":  # the timesteps follow the noise levels: no spacing
        sig = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), n)
        timesteps = sigma_to_t(sig, train_sigmas.log()).round().to(torch.int64)
    else:
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64)
        else:
            ts = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
        timesteps = torch.from_numpy(ts.copy())
        sig = torch.from_numpy(np.interp(ts, np.arange(T), train_sigmas.numpy()).astype(np.float64))
    last = float(train_sigmas[0]) if final == "sigma_min" else 0.0
    # diffusers keeps its sigmas in float32: so do the tables, for identical steps
    sigmas = torch.cat([sig, torch.tensor([last], dtype=torch.float64)]).float().double()
    label = "dpm++2m-sde" + (" karras" if schedule == "karras" else "")
    return dpmsolver_sde_from_sigmas(
        timesteps,
        sigmas,
        solver_order=solver_order,
        solver_type=solver_type,
        lower_order_final=lower_order_final,
        euler_at_final=euler_at_final,
        prediction=prediction,
        name=label if solver_order == 2 else "dpm++1s-sde",
    )


# ---------------------------------------------------------------- flow matching
def flow_sigmas(
    num_inference_steps: int, *, shift: float = 1.0, num_train_timesteps: int = 1000
) -> tuple[Tensor, Tensor]:
    """``(timesteps [N], sigmas [N + 1])`` of diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=T).set_timesteps(N)``, in
    its float32 arithmetic: the training sigmas ``i / T`` (i = T..1) shifted by ``shift s / (1 +
    (shift - 1) s)``, N levels spaced linearly from the largest to the smallest of them and
    shifted once more (diffusers shifts the endpoints twice), the timesteps ``T sigma``, the final
    sigma 0."""
    T = as_int("num_train_timesteps", num_train_timesteps, 1)
    n = as_int("num_inference_steps", num_inference_steps, 1)
    shift = as_real("shift", shift, 0.0, open_low=True)
    train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
    train = shift * train / (1 + (shift - 1) * train)
    sig = np.linspace(train[0].item() * T, train[-1].item() * T, n) / T
    sig = torch.from_numpy(shift * sig / (1 + (shift - 1) * sig)).to(torch.float32)
    return sig * T, torch.cat([sig, sig.new_zeros(1)])


def _flow_steps(timesteps, sigmas) -> tuple[Tensor, Tensor]:
    """Checked float64 ``(timesteps [N], sigmas [N + 1])`` of a flow chain: the state's noise
    level t at each step, then the final one; in [0, 1], > 0 before the final entry."""
    ts = _timesteps(timesteps, flow=True)
    sig = _vector(sigmas, "sigmas")
    if sig.numel() != ts.numel() + 1:
        raise ValueError(
            f"sigmas must have {ts.numel() + 1} entries (one per timestep, then the final "
            f"sigma), got {sig.numel()}"
        )
    _first_bad("sigmas", sig, ~(torch.isfinite(sig) & (sig >= 0) & (sig <= 1)), "in [0, 1]")
    _first_bad("sigmas", sig[:-1], sig[:-1] <= 0, "> 0 before the final entry")
    return ts, sig


def _flow(ts: Tensor, s: Tensor, c_x0: Tensor, c_x: Tensor, std: Tensor, name: str):
    """A rectified-flow chain: the model sees the state x_t = (1 - t) x0 + t eps as it is."""
    return GaussianTransitions(ts, c_x0, c_x, std, 1 - s, s, prediction=FLOW, name=name)


def flow_euler_from_sigmas(timesteps, sigmas, *, name: str = "flow-euler") -> GaussianTransitions:
    """diffusers' ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).step`` from
    ``s = sigmas[k]`` to ``s' = sigmas[k + 1]`` (docs/design.md §2.2, (F5)):
    ``x0_hat = x - s v``, ``x' = (1 - s') x0_hat + s' z``, i.e. ``c_x0 = 1 - s'``, ``c_x = 0``,
    ``std = s'``. The last step, to s' = 0, is deterministic (x' = x0_hat). ``timesteps``: the
    model's (diffusers: ``1000 s``); ``sigmas``: ``N + 1`` entries, the last the final one."""
    ts, sig = _flow_steps(timesteps, sigmas)
    s, s_next = sig[:-1], sig[1:]
    return _flow(ts, s, 1 - s_next, torch.zeros_like(s), s_next.clone(), name)


def flow_sde_from_sigmas(
    timesteps, sigmas, *, noise_level: float = 0.7, name: str = "flow-sde"
) -> GaussianTransitions:
    """Flow-GRPO's step (Liu et al. 2025, ``sde_step_with_logprob``): the Euler-Maruyama step of
    the marginal-preserving reverse SDE with noise ``sigma_t = a sqrt(t / (1 - t))`` (``a`` =
    ``noise_level``) from ``s = sigmas[k]`` to ``s' = sigmas[k + 1]``, dt = s' - s < 0
    (docs/design.md §2.2, (F2)-(F4))::

        mean = x (1 + sigma_s^2 dt / (2 s)) + v (1 + sigma_s^2 (1 - s) / (2 s)) dt
        std  = sigma_s sqrt(-dt)

    with ``v = (x - x0_hat) / s``; as Flow-GRPO, ``sigmas[1]`` stands in for s = 1 in sigma_s's
    denominator. Every step is stochastic, the last one too (a > 0); a = 0 is the Euler step of
    the probability-flow ODE (deterministic)."""
    a = as_real("noise_level", noise_level, 0.0)
    ts, sig = _flow_steps(timesteps, sigmas)
    _first_bad("sigmas", sig[1:], sig[1:] > sig[:-1], "non-increasing (dt <= 0)")
    s, s_next = sig[:-1], sig[1:]
    denom = 1 - torch.where(s == 1, sig[1], s)
    if bool((denom <= 0).any()):
        raise ValueError("sigmas[1] must be < 1 when sigmas[0] is 1 (it stands in for t = 1)")
    sd = a * (s / denom).sqrt()  # (F2): sigma_t at the step's t = s
    dt = s_next - s
    b = (1 + sd**2 * (1 - s) / (2 * s)) * dt  # the velocity's coefficient, (F4)
    c_x = 1 + sd**2 / (2 * s) * dt + b / s  # v = (x - x0_hat) / s
    return _flow(ts, s, -b / s, c_x, sd * (-dt).sqrt(), name)


def _flow_prediction(prediction) -> str:
    return as_choice("prediction", prediction, (FLOW,))


def flow_euler_transitions(
    num_inference_steps: int,
    *,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    prediction: str = FLOW,
) -> GaussianTransitions:
    """The stochastic FlowMatchEuler chain (:func:`flow_euler_from_sigmas`) on the sigmas of
    diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N)``
    (:func:`flow_sigmas`), for a rectified-flow model called as ``model(x, 1000 t)``."""
    _flow_prediction(prediction)
    ts, sig = flow_sigmas(num_inference_steps, shift=shift, num_train_timesteps=num_train_timesteps)
    return flow_euler_from_sigmas(ts, sig, name=f"flow-euler[shift={shift:g}]")


def flow_sde_transitions(
    num_inference_steps: int,
    *,
    noise_level: float = 0.7,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    prediction: str = FLOW,
) -> GaussianTransitions:
    """Flow-GRPO's SDE chain (:func:`flow_sde_from_sigmas`) on the sigmas of diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N)`` (:func:`flow_sigmas`)."""
    _flow_prediction(prediction)
    a = as_real("noise_level", noise_level, 0.0)
    ts, sig = flow_sigmas(num_inference_steps, shift=shift, num_train_timesteps=num_train_timesteps)
    return flow_sde_from_sigmas(ts, sig, noise_level=a, name=f"flow-sde[a={a:g}]")


# ---------------------------------------------------------------- the round ops' tables
def check_transitions(transitions, where: str = "") -> None:
    """``transitions`` is a GaussianTransitions (``where``: the function's name, for the
    message)."""
    if not isinstance(transitions, GaussianTransitions):
        raise TypeError(
            f"{where + ': ' if where else ''}transitions must be a GaussianTransitions, got "
            f"{type(transitions).__name__}"
        )


def round_tables(transitions: GaussianTransitions, device=None) -> Tensor:
    """The float64 ``[9, N]`` coefficient tensor of ``transitions`` (rows ``ops.layout.ROW_*``):

    ``mean(x, k) = A clip(p) + E p + G x + H p_prev`` for the network's raw x0-hat p
    (GaussianTransitions' ``mean_from_x0`` with its eps term expanded; H = c_prev, 0 unless
    multistep), the step std, the frozen-eps draft's x0 at y (``X0_Y y - X0_F eps``) and the eps of
    an x0-hat at y (``EPS_Y y - EPS_P x0``)."""
    check_transitions(transitions, "round_tables")
    if not transitions.affine:
        raise ValueError(
            f"round_tables: {transitions.name} is not affine in x0-hat (dynamic "
            f"thresholding); the round ops cannot express it"
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    key = ("round_tables", device)
    cache = transitions._cache
    if key in cache:
        return cache[key]
    T = transitions
    sa, ss = T.state_alpha, T.state_sigma
    eps_x0 = -T.c_eps * sa / ss  # coefficient of x0 inside c_eps * eps
    G = T.c_x + T.c_eps / ss
    if T.clip_sample is None:
        A, E = torch.zeros_like(G), T.c_x0 + eps_x0
    elif T.eps_from_clipped_x0:
        A, E = T.c_x0 + eps_x0, torch.zeros_like(G)
    else:
        A, E = T.c_x0.clone(), eps_x0
    rows = {
        layout.ROW_A: A,
        layout.ROW_E: E,
        layout.ROW_G: G,
        layout.ROW_STD: T.std,
        layout.ROW_X0_Y: T.x0_y,
        layout.ROW_X0_F: T.x0_f,
        layout.ROW_EPS_Y: 1.0 / ss,
        layout.ROW_EPS_P: sa / ss,
        layout.ROW_H: T.c_prev,
    }
    table = torch.stack([rows[r] for r in range(layout.NUM_ROWS)])
    table = table.to(device=device, dtype=torch.float64).contiguous()
    cache[key] = table
    return table


def round_spec(
    transitions: GaussianTransitions, seed: Tensor, freeze: str = "x0", device=None
) -> RoundSpec:
    """The round ops' per-run constants (:class:`~specdiff_kernels.ops.round_spec.RoundSpec`) of
    ``transitions`` with noise key ``seed`` (``ops.seed_tensor``) and a frozen-target draft that
    freezes ``freeze`` (``"x0"`` or ``"eps"``); ``device``: the seed's by default."""
    device = seed.device if device is None else device
    coef = round_tables(transitions, device)
    return RoundSpec(coef, seed, layout.FREEZE_MODES[freeze], clip_value(transitions))


def clip_value(transitions: GaussianTransitions) -> float:
    """The clip bound the ops take (``inf``: no clipping)."""
    check_transitions(transitions, "clip_value")
    return math.inf if transitions.clip_sample is None else float(transitions.clip_sample)


def stochastic_runs(transitions: GaussianTransitions) -> Tensor:
    """``[N + 1]`` int64: stochastic steps from step k before the next deterministic step or the
    end (0 at a deterministic step and at k = N)."""
    check_transitions(transitions, "stochastic_runs")
    det = transitions.deterministic.tolist()
    run = [0] * (transitions.num_steps + 1)
    for s in range(transitions.num_steps - 1, -1, -1):
        run[s] = 0 if det[s] else run[s + 1] + 1
    return torch.tensor(run, dtype=torch.int64)

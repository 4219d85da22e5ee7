"""Speculative unadjusted Langevin (docs/design.md §11, the paper's extension).

ULA for an unnormalised density pi ∝ exp(-U) runs

    x_{k+1} ~ N(x_k - g_k * grad U(x_k), 2 g_k I).

This is an affine Gaussian chain of the kind the diffusion samplers already run, so nothing new is
sampled here: :func:`langevin_transitions` writes ULA as a :class:`GaussianTransitions` with

    prediction = "sample"   (the "model" output is taken as the x0-hat of the affine form)
    c_x = 1, c_x0 = -g_k, std = sqrt(2 g_k)
    model(x, t) = grad U(x) (t, the step index, is ignored)

so ``mean_from_x0(x, grad, k) = x - g_k * grad``, which is the ULA mean. Then

* the plain chain (:class:`LangevinSampler`) is
  :class:`~specdiff_kernels.sampling.ancestral.AncestralSampler` on these transitions: one
  gradient call per step;
* the frozen-target draft (``FrozenTargetDraft("x0")``) freezes the model OUTPUT, i.e. the
  gradient: the draft window is y_{j+1} = y_j - g grad U(y_0) + sqrt(2g) xi_j, the
  training-free "frozen gradient" draft. With the prefetched root (default) every round costs one
  sequential (batched) gradient call;
* ``DraftModelDraft(surrogate)`` with a cheap surrogate gradient is the surrogate draft.

:class:`SpeculativeLangevin` is :class:`~specdiff_kernels.sampling.sampler.SpeculativeSampler` on
the same transitions. Its output law equals the plain ULA chain's law after the same number of
steps (for any draft, window or adaptive window): it is exact with respect to ULA, NOT with
respect to pi (ULA itself is biased by O(g)); add a Metropolis correction (MALA) for that, which
is outside this module.

Conventions inherited from the samplers: the per-chain random streams (same generator seed ->
same xi_k in the plain and the speculative chain), ``chain_ids``, ``x_init`` (a user start
``[B, *E]``; default ``init_std * N(0, I)``), float32 or float64 states.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..validate import as_int, as_real
from .ancestral import AncestralSampler
from .base import SamplingResult
from .drafts import Draft, DraftModelDraft, FrozenTargetDraft
from .sampler import SpeculativeSampler
from .transitions import GaussianTransitions

GradFn = Callable[[Tensor], Tensor]
EnergyFn = Callable[[Tensor], Tensor]

__all__ = [
    "GradientModel",
    "langevin_transitions",
    "LangevinSampler",
    "SpeculativeLangevin",
    "banana_energy",
    "banana_grad",
]


# --------------------------------------------------------------------------- the chain
def langevin_transitions(
    step_size, num_steps: Optional[int] = None, *, init_std: float = 1.0
) -> GaussianTransitions:
    """ULA x' ~ N(x - g_k grad U(x), 2 g_k I) as affine Gaussian transitions.

    Args:
        step_size: g (> 0): a scalar, or a length-``num_steps`` schedule g_0..g_{N-1}.
        num_steps: N (default: the length of the ``step_size`` schedule).
        init_std: std of the default initial state N(0, init_std^2 I) (used when no ``x_init``).

    The model is called as ``model(x, t)`` with ``t`` = the step index k (int64), and must return
    grad U(x) (prediction "sample", input_scale 1: the model sees the state itself).
    """
    g = torch.as_tensor(step_size, dtype=torch.float64).flatten()
    if num_steps is None:
        num_steps = g.numel()
    n = as_int("num_steps", num_steps, 1)  # 2.5, True or "5" are refused, not truncated
    init_std = as_real("init_std", init_std, 0)
    if g.numel() == 1:
        g = g.expand(n).clone()
    if g.numel() != n:
        raise ValueError(
            f"step_size must be a scalar or have num_steps = {n} entries, got {g.numel()}"
        )
    if not bool(torch.isfinite(g).all()) or bool((g <= 0).any()):
        raise ValueError(f"step_size must be finite and > 0, got {g.tolist()}")
    half = math.sqrt(0.5)  # model_alpha/model_sigma only matter for eps-conversions (not used)
    label = f"g={float(g[0]):g}" if bool((g == g[0]).all()) else "g=schedule"
    return GaussianTransitions(
        torch.arange(n, dtype=torch.int64),
        -g,
        1.0,
        (2 * g).sqrt(),
        half,
        half,
        prediction="sample",
        init_std=float(init_std),
        name=f"ula[{label}]",
    )


class GradientModel:
    """``model(x, t) -> grad U(x)`` from an energy ``U`` (autograd) or a gradient callable.

    Args:
        U: ``U(x) -> [B]`` energies of a batch of states ``x [B, *E]`` (a PyTorch function; its
            gradient is taken with :func:`torch.autograd.grad` of ``U(x).sum()``).
        grad_U: ``grad_U(x) -> [B, *E]`` (used as is; takes precedence over ``U``).

    Counts its calls (``num_calls``) and evaluated states (``num_evals``).
    """

    def __init__(self, U: Optional[EnergyFn] = None, grad_U: Optional[GradFn] = None):
        if U is None and grad_U is None:
            raise ValueError("give U (an energy, differentiated by autograd) or grad_U")
        self.U = U
        self.grad_U = grad_U
        self.num_calls = 0
        self.num_evals = 0

    def gradient(self, x: Tensor) -> Tensor:
        if self.grad_U is not None:
            return self.grad_U(x)
        # The samplers run under inference_mode; autograd needs an ordinary tensor and grad mode.
        with torch.inference_mode(False), torch.enable_grad():
            xr = x.clone().requires_grad_(True)
            u = self.U(xr)
            if u.dim() != 1 or u.shape[0] != x.shape[0]:
                raise ValueError(
                    f"U must return one energy per state, shape [{x.shape[0]}], got "
                    f"{tuple(u.shape)}"
                )
            (grad,) = torch.autograd.grad(u.sum(), xr)
        return grad.detach()

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.num_calls += 1
        self.num_evals += x.shape[0]
        return self.gradient(x)

    def __repr__(self) -> str:
        return f"GradientModel({'grad_U' if self.grad_U is not None else 'U via autograd'})"


def _as_model(fn) -> GradientModel:
    return fn if isinstance(fn, GradientModel) else GradientModel(grad_U=fn)


class _LangevinBase:
    def __init__(self, U, grad_U, step_size, num_steps, init_std):
        self.model = GradientModel(U=U, grad_U=grad_U)
        self.transitions = langevin_transitions(step_size, num_steps, init_std=init_std)
        self.step_size = self.transitions.c_x0.neg()
        self.num_steps = self.transitions.num_steps

    @property
    def sampler(self):
        """The underlying :class:`~specdiff_kernels.sampling.ancestral.AncestralSampler` /
        :class:`~specdiff_kernels.sampling.sampler.SpeculativeSampler` (diffusion-sampler
        signature)."""
        return self._sampler

    def sample(
        self,
        x_init: Optional[Tensor] = None,
        *,
        num_chains: Optional[int] = None,
        event_shape=None,
        generator: Optional[torch.Generator] = None,
        chain_ids=None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> SamplingResult:
        """Run the chains for ``num_steps`` steps.

        Args:
            x_init: initial states ``[B, *E]`` (their dtype/device are used); or give
                ``num_chains`` and ``event_shape`` to start from ``init_std * N(0, I)`` drawn from
                the chains' streams.
            generator: seeds every chain's stream (same seed: same noise as the other sampler).
            chain_ids: global id of each chain (default 0..B-1); chain c's result depends only on
                (seed, c), not on the other chains of the batch.

        Returns:
            :class:`~specdiff_kernels.sampling.base.SamplingResult`: ``samples [B, *E]`` and
            ``stats``
            (``stats.target_calls`` = sequential gradient calls, ``stats.target_evals`` = gradient
            evaluations, acceptance by window position, ...).
        """
        if x_init is not None:
            x_init = torch.as_tensor(x_init)
            if not x_init.is_floating_point():
                x_init = x_init.to(torch.float32 if dtype is None else dtype)
        return self._sampler.sample(
            num_chains,
            event_shape,
            generator=generator,
            chain_ids=chain_ids,
            x_init=x_init,
            dtype=dtype,
            device=device,
        )


class LangevinSampler(_LangevinBase):
    """The plain ULA chain (baseline): one gradient call per step.

    Args:
        U / grad_U: the energy (autograd) or its gradient, on batches ``[B, *E]``.
        step_size: g (scalar or per-step schedule); num_steps: N.
        init_std: std of the default initial state.
    """

    def __init__(
        self,
        U: Optional[EnergyFn] = None,
        grad_U: Optional[GradFn] = None,
        *,
        step_size,
        num_steps: Optional[int] = None,
        init_std: float = 1.0,
        progress: bool = False,
        check_finite: bool = True,
    ):
        super().__init__(U, grad_U, step_size, num_steps, init_std)
        self._sampler = AncestralSampler(
            self.model, self.transitions, progress=progress, check_finite=check_finite
        )
        self._sampler.name = "ula"

    def __repr__(self) -> str:
        return f"LangevinSampler({self.transitions!r}, {self.model!r})"


class SpeculativeLangevin(_LangevinBase):
    """Exact speculative ULA: same law as :class:`LangevinSampler` with the same arguments.

    Args:
        U / grad_U: the (expensive) target energy (autograd) or gradient, on batches ``[B, *E]``.
        step_size: g (scalar or per-step schedule); num_steps: N.
        window: L (int), or ``"adaptive"`` / an
            :class:`~specdiff_kernels.sampling.window.AdaptiveWindow` (per-chain window lengths
            from each chain's own past acceptance).
        draft: ``"frozen"`` (training-free: the gradient at the window's root, reused for every
            drafted step; with ``prefetch=True`` one sequential gradient call per round),
            a callable ``surrogate_grad(x) -> [B, *E]`` (a cheap gradient: L sequential cheap
            calls per window, then one batched target call), or a
            :class:`~specdiff_kernels.sampling.drafts.Draft` instance.
        prefetch: for the frozen draft: evaluate the target at the window's end inside the verify
            call (one sequential call per round instead of two).
        init_std: std of the default initial state.
        backend, verify_fn: passed to :class:`~specdiff_kernels.sampling.sampler.SpeculativeSampler`
            (``verify_fn`` replaces the verify op: a testing hook).
    """

    def __init__(
        self,
        U: Optional[EnergyFn] = None,
        grad_U: Optional[GradFn] = None,
        *,
        step_size,
        num_steps: Optional[int] = None,
        window: Union[int, str, object] = 8,
        draft: Union[str, GradFn, Draft] = "frozen",
        prefetch: bool = True,
        init_std: float = 1.0,
        backend: Optional[str] = None,
        verify_fn=None,
        progress: bool = False,
        check_finite: bool = True,
    ):
        super().__init__(U, grad_U, step_size, num_steps, init_std)
        if isinstance(draft, Draft):
            d = draft
            if isinstance(d, FrozenTargetDraft) and d.freeze != "x0":
                raise ValueError("the frozen Langevin draft freezes the gradient: use freeze='x0'")
        elif isinstance(draft, str):
            if draft != "frozen":
                raise ValueError(
                    f"draft must be 'frozen', a surrogate gradient callable or a "
                    f"Draft, got {draft!r}"
                )
            d = FrozenTargetDraft("x0", prefetch_root=prefetch)
        elif callable(draft):
            d = DraftModelDraft(_as_model(draft))
        else:
            raise TypeError(
                f"draft must be 'frozen', a callable or a Draft, got {type(draft).__name__}"
            )
        self.draft = d
        self._sampler = SpeculativeSampler(
            self.model,
            self.transitions,
            d,
            window,
            backend=backend,
            verify_fn=verify_fn,
            progress=progress,
            check_finite=check_finite,
        )
        self._sampler.name = "speculative-ula"

    @property
    def window(self):
        return self._sampler.window

    def __repr__(self) -> str:
        return (
            f"SpeculativeLangevin({self.transitions!r}, window={self.window}, draft={self.draft!r})"
        )


# --------------------------------------------------------------------------- demo targets
def banana_energy(a: float = 1.5, b: float = 0.5) -> EnergyFn:
    """A "banana" (Haario et al.) in D >= 2 dims:
    ``U(x) = x_1^2 / (2 a^2) + (x_2 - b (x_1^2 - a^2))^2 / 2 + sum_{i>2} x_i^2 / 2``."""
    a2 = float(a) ** 2
    b = float(b)

    def U(x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        x1, x2 = x[:, 0], x[:, 1]
        return x1**2 / (2 * a2) + 0.5 * (x2 - b * (x1**2 - a2)) ** 2 + 0.5 * (x[:, 2:] ** 2).sum(1)

    return U


def banana_grad(a: float = 1.5, b: float = 0.5) -> GradFn:
    """Closed-form gradient of :func:`banana_energy` (same a, b)."""
    a2 = float(a) ** 2
    b = float(b)

    def grad(x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1)
        x1, x2 = x[:, 0], x[:, 1]
        r = x2 - b * (x1**2 - a2)
        g = x.clone()
        g[:, 0] = x1 / a2 - 2 * b * x1 * r
        g[:, 1] = r
        return g.reshape(shape)

    return grad

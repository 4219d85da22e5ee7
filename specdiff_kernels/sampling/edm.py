"""EDM-style stochastic samplers (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models") as Gaussian chains (docs/design.md §2.3).

Their state is the VE variable ``x = x0 + sigma eps`` on a decreasing list of noise levels
``sigmas`` (N + 1 entries, the last the final one). Two model parametrisations:

* **EDM preconditioning** (diffusers' ``EDMDPMSolverMultistepScheduler``, ``EDMEulerScheduler``,
  ``CosineDPMSolverMultistepScheduler``): the network sees ``c_in(sigma) x`` at the timestep
  ``c_noise(sigma)`` (EDM: ``log(sigma) / 4``; Stable Audio's cosine schedule: ``atan(sigma) 2 /
  pi``) and x0_hat = ``c_skip(sigma) x + c_out(sigma) out`` with ``c_in = 1 / sqrt(sigma^2 +
  sigma_data^2)``, ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``, ``c_out = +-sigma
  sigma_data / sqrt(sigma^2 + sigma_data^2)`` (+ for ``epsilon``, - for ``v_prediction``, as
  diffusers): :func:`edm_preconditioning`, passed to GaussianTransitions as its ``output`` tables.
* **a VP model** (a discrete training schedule ``alphas_cumprod``; diffusers'
  ``EulerDiscreteScheduler``, k-diffusion's wrappers): the network sees ``x / sqrt(1 + sigma^2)``
  at the (fractional) training timestep of sigma, with its own prediction's conversion.

Steps: SDE-DPM-Solver++ (1S / 2M) in the VE state (:func:`edm_dpmsolver_sde_from_sigmas`) and
Euler with "churn" (:func:`euler_churn_from_sigmas`), Algorithm 2 of the paper as diffusers steps
it: the noise is added after the network call, so given x the step is one Gaussian.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..validate import as_choice, as_flag, as_int, as_real
from .transitions import (
    FINAL_SIGMAS,
    PREDICTIONS,
    SOLVER_TYPES,
    GaussianTransitions,
    _schedule,
    _sde_dpm_steps,
    _sde_sigmas,
    _timesteps,
    _vector,
    karras_sigmas,
    sigma_to_t,
)

EDM_PREDICTIONS = ("epsilon", "v_prediction")
EDM_SCHEDULES = ("karras", "exponential")
# c_noise(sigma): EDM's log(sigma) / 4, Stable Audio's cosine schedule's atan(sigma) 2 / pi
NOISE_CONDITIONINGS = ("log", "atan")


def edm_preconditioning(sigmas, sigma_data: float, prediction: str) -> tuple[Tensor, ...]:
    """``(c_in, c_skip, c_out)`` at noise levels ``sigmas`` (Karras et al. 2022, Table 1; c_out's
    sign for ``v_prediction`` as diffusers' ``precondition_outputs``)."""
    sd = as_real("sigma_data", sigma_data, 0.0, open_low=True)
    prediction = as_choice("prediction", prediction, EDM_PREDICTIONS)
    sig = _vector(sigmas, "sigmas")
    norm = (sig**2 + sd**2).sqrt()
    c_out = sig * sd / norm
    return 1 / norm, sd**2 / norm**2, c_out if prediction == "epsilon" else -c_out


def c_noise(sigmas, conditioning: str = "log") -> Tensor:
    """The network's timestep at noise levels ``sigmas``: ``log(sigma) / 4`` (EDM) or
    ``atan(sigma) 2 / pi`` (Stable Audio's cosine schedule), as diffusers computes it (float32)."""
    conditioning = as_choice("conditioning", conditioning, NOISE_CONDITIONINGS)
    sig = _vector(sigmas, "sigmas").float()
    t = 0.25 * torch.log(sig) if conditioning == "log" else sig.atan() / math.pi * 2
    return t.double()


def edm_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, schedule: str = "karras"
) -> Tensor:
    """``n`` decreasing noise levels from sigma_max to sigma_min: Karras et al.'s (``rho``) or
    log-linear ("exponential"), rounded to float32 as diffusers' EDM schedulers keep them (their
    log-linear levels are computed in float32: so are these)."""
    schedule = as_choice("sigma_schedule", schedule, EDM_SCHEDULES)
    if schedule == "karras":
        sig = karras_sigmas(sigma_min, sigma_max, n, rho)
    else:
        sig = torch.linspace(math.log(sigma_min), math.log(sigma_max), n).exp().flip(0)
    return sig.float().double()


def edm_dpmsolver_sde_from_sigmas(
    timesteps,
    sigmas,
    *,
    sigma_data: Optional[float],
    prediction: str = "epsilon",
    solver_order: int = 2,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    init_std: float = 1.0,
    noise_var=None,
    name: str = "edm-dpm++2m-sde",
) -> GaussianTransitions:
    """SDE-DPM-Solver++ in the VE state (diffusers' ``EDMDPMSolverMultistepScheduler(
    algorithm_type="sde-dpmsolver++")`` and ``CosineDPMSolverMultistepScheduler``): with alpha = 1,
    lambda = -log(sigma), h = lambda_t - lambda_s0, step k from s0 = sigmas[k] to t = sigmas[k+1]:
    ``x' = (t / s0) e^-h x + (1 - e^-2h) D0 + t sqrt(1 - e^-2h) xi`` (first order; second order:
    ``+ c D1`` as :func:`~specdiff_kernels.sampling.transitions.dpmsolver_sde_from_sigmas`, whose
    rules for the order of each step these are).

    ``sigma_data``: EDM's preconditioning (:func:`edm_preconditioning`; ``timesteps`` then are
    the network's c_noise); None: a VP model (its timesteps, input ``x / sqrt(1 + sigma^2)``).
    ``noise_var``: ``[N]`` variance of each step's noise draw when it is not 1 (the Brownian-tree
    sampler of the cosine scheduler, docs/design.md §2.3); the std is scaled by its square root.
    """
    order = as_int("solver_order", solver_order, 1, 2)
    solver_type = as_choice("solver_type", solver_type, SOLVER_TYPES)
    lower = as_flag("lower_order_final", lower_order_final)
    ts = _timesteps(timesteps)
    n = ts.numel()
    sig = _sde_sigmas(sigmas, n)
    # diffusers' rule: the last step first order (always at a final sigma of 0)
    first_final = as_flag("euler_at_final", euler_at_final) or (lower and n < 15)
    _, s0, G, c_x0, std, c_prev = _sde_dpm_steps(sig, order, solver_type, first_final, ve=True)
    if noise_var is not None:
        std = std * _vector(noise_var, "noise_var").sqrt()
    return _ve_transitions(ts, s0, c_x0, G, std, sigma_data, prediction, init_std, name, c_prev)


def _ve_transitions(ts, sig, c_x0, c_x, std, sigma_data, prediction, init_std, name, c_prev=None):
    """GaussianTransitions of a VE-state chain at noise levels ``sig`` (``[N]``): EDM-
    preconditioned (``sigma_data``) or a VP model's (None)."""
    if sigma_data is None:
        scale = 1 / (1 + sig**2).sqrt()
        output = None
        prediction = as_choice("prediction", prediction, PREDICTIONS)
    else:
        scale, c_skip, c_out = edm_preconditioning(sig, sigma_data, prediction)
        output = (c_skip, c_out)
    return GaussianTransitions(
        ts,
        c_x0,
        c_x,
        std,
        scale,
        sig * scale,
        c_prev=c_prev,
        input_scale=scale,
        output=output,
        prediction=prediction,
        init_std=init_std,
        name=name,
    )


def edm_dpmsolver_sde_transitions(
    num_inference_steps: int,
    *,
    alphas_cumprod=None,
    prediction: str = "epsilon",
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    sigma_data: Optional[float] = None,
    sigma_schedule: str = "karras",
    rho: float = 7.0,
    solver_order: int = 2,
    solver_type: str = "midpoint",
    final_sigmas_type: str = "zero",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> GaussianTransitions:
    """EDM's DPM++ 2M SDE (diffusers' ``EDMDPMSolverMultistepScheduler(algorithm_type=
    "sde-dpmsolver++")`` after ``set_timesteps``) without diffusers: ``num_inference_steps`` noise
    levels of ``sigma_schedule`` from sigma_max to sigma_min, then 0 (``final_sigmas_type=
    "zero"``) or sigma_min, stepped by :func:`edm_dpmsolver_sde_from_sigmas`.

    Without ``alphas_cumprod`` the network is EDM-preconditioned (``sigma_data``, default 0.5;
    sigma range default 0.002..80); with it, a VP model of that training schedule (its sigma range
    by default; ``sigma_data`` does not apply). The initial state's std is diffusers'
    ``init_noise_sigma``, sqrt(sigma_max^2 + 1)."""
    n = as_int("num_inference_steps", num_inference_steps, 1)
    final = as_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
    grid = _sigma_grid(alphas_cumprod, sigma_min, sigma_max, sigma_data)
    lo, hi, sigma_data, to_t = grid
    sig = edm_sigmas(n, lo, hi, as_real("rho", rho, 0.0, open_low=True), sigma_schedule)
    last = torch.tensor([lo if final == "sigma_min" else 0.0], dtype=torch.float64)
    return edm_dpmsolver_sde_from_sigmas(
        to_t(sig),
        torch.cat([sig, last.float().double()]),
        sigma_data=sigma_data,
        prediction=prediction,
        solver_order=solver_order,
        solver_type=solver_type,
        lower_order_final=lower_order_final,
        euler_at_final=euler_at_final,
        init_std=math.sqrt(hi**2 + 1),
        name="edm-dpm++2m-sde" if solver_order == 2 else "edm-dpm++1s-sde",
    )


class _Defaults(NamedTuple):
    """A scheduler's EDM-preconditioning defaults: sigma_data, sigma range, c_noise."""

    sigma_data: float
    sigma_min: float
    sigma_max: float
    conditioning: str


EDM_DEFAULTS = _Defaults(0.5, 0.002, 80.0, "log")  # EDMDPMSolverMultistep-, EDMEulerScheduler
COSINE_DEFAULTS = _Defaults(1.0, 0.3, 500.0, "atan")  # CosineDPMSolverMultistepScheduler


def _sigma_grid(alphas_cumprod, sigma_min, sigma_max, sigma_data, defaults=EDM_DEFAULTS):
    """``(sigma_min, sigma_max, sigma_data, timesteps of sigmas)`` of an EDM-preconditioned
    network (no ``alphas_cumprod``; ``defaults`` for what is not given) or of a VP model of
    training schedule ``alphas_cumprod``."""
    if alphas_cumprod is None:
        sd = defaults.sigma_data
        sd = sd if sigma_data is None else as_real("sigma_data", sigma_data, 0.0, open_low=True)
        lo_hi = (defaults.sigma_min, defaults.sigma_max)
        to_t = lambda sig: c_noise(sig, defaults.conditioning)  # noqa: E731
    else:
        if sigma_data is not None:
            raise ValueError(
                "sigma_data applies to an EDM-preconditioned network (no alphas_cumprod), not "
                "to a VP model"
            )
        abar = _schedule(alphas_cumprod, None)
        train = ((1 - abar) / abar).sqrt()
        sd, lo_hi = None, (float(train[0]), float(train[-1]))
        to_t = lambda sig: sigma_to_t(sig, train.log())  # noqa: E731 (fractional timesteps)
    lo = lo_hi[0] if sigma_min is None else as_real("sigma_min", sigma_min, 0.0, open_low=True)
    hi = lo_hi[1] if sigma_max is None else as_real("sigma_max", sigma_max, lo, open_low=True)
    return lo, hi, sd, to_t


def euler_churn_from_sigmas(
    timesteps,
    sigmas,
    *,
    s_churn: float,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    sigma_data: Optional[float] = None,
    prediction: str = "epsilon",
    init_std: float = 1.0,
    name: str = "euler-churn",
) -> GaussianTransitions:
    """Euler with churn (Karras et al. 2022, Algorithm 2 without its 2nd-order correction) as
    diffusers' ``EulerDiscreteScheduler.step`` / ``EDMEulerScheduler.step`` with ``s_churn``
    (docs/design.md §2.3). The network is called at the state x; then gamma = min(s_churn / N,
    sqrt(2) - 1) where s_tmin <= sigma <= s_tmax (else 0), sigma_hat = (1 + gamma) sigma,
    x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) z, x0 from the output with x_hat, and
    x' = r x_hat + (1 - r) x0 with r = sigma_next / sigma_hat: given x, one Gaussian with a mean
    affine in (x, x0_hat) and a fixed std (the churn noise, scaled by what x0 takes of x_hat).

    ``sigma_data``: EDM-preconditioned (``EDMEulerScheduler``: x0 = c_skip(sigma_hat) x_hat +
    c_out(sigma_hat) out); None: a VP model (``EulerDiscreteScheduler``: epsilon x0 = x_hat -
    sigma_hat out, v_prediction x0 = x_hat / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) out)."""
    churn = as_real("s_churn", s_churn, 0.0, finite=False)
    lo = as_real("s_tmin", s_tmin, finite=False)
    hi = as_real("s_tmax", s_tmax, finite=False)
    s_noise = as_real("s_noise", s_noise, 0.0)
    ts = _timesteps(timesteps)
    n = ts.numel()
    sig = _sde_sigmas(sigmas, n)
    s, nxt = sig[:-1], sig[1:]
    s32 = s.float()  # diffusers compares and scales its float32 sigmas
    gamma = min(churn / n, 2**0.5 - 1) if churn > 0 else 0.0
    gamma = gamma * ((s32 >= lo) & (s32 <= hi)).double()
    hat = (s32 * (gamma.float() + 1)).double()
    noise = s_noise * (hat**2 - s**2).clamp_min(0).sqrt()
    r = nxt / hat
    c_x0, c_x, keep = _churn_mean(s, hat, r, sigma_data, prediction)
    return _ve_transitions(ts, s, c_x0, c_x, noise * keep, sigma_data, prediction, init_std, name)


def _churn_mean(s: Tensor, hat: Tensor, r: Tensor, sigma_data, prediction: str):
    """``(c_x0, c_x, keep)`` of the churned Euler step: mean = c_x0 x0_hat(x) + c_x x, with x0_hat
    the tables' conversion at sigma; ``keep``: the coefficient of x_hat's noise in x'."""
    if sigma_data is not None:
        _, skip, out = edm_preconditioning(s, sigma_data, prediction)
        _, skip_h, out_h = edm_preconditioning(hat, sigma_data, prediction)
        c_x0 = (1 - r) * out_h / out  # out = (x0_hat - c_skip x) / c_out at sigma
        return c_x0, r + (1 - r) * skip_h - c_x0 * skip, r + (1 - r) * skip_h
    prediction = as_choice("prediction", prediction, PREDICTIONS)
    if prediction == "epsilon":  # x' = x_hat - (sigma_hat - sigma_next) out
        c_x0 = (hat - r * hat) / s
        return c_x0, 1 - c_x0, torch.ones_like(s)
    if prediction == "v_prediction":
        return 1 - r, r, r + (1 - r) / (1 + s**2)
    return 1 - r, r, r  # sample: x0 = out


def euler_churn_transitions(
    alphas_cumprod=None,
    *,
    betas=None,
    num_inference_steps: int = 50,
    s_churn: float = math.inf,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    spacing: str = "linspace",
    steps_offset: int = 0,
    prediction: str = "epsilon",
    init_std: Optional[float] = None,
) -> GaussianTransitions:
    """Euler with churn (diffusers' ``EulerDiscreteScheduler`` stepped with ``s_churn > 0``) for a
    VP model of training schedule ``alphas_cumprod`` (or ``betas``), on the noise levels and
    timesteps of the scheduler's default ``set_timesteps`` (``timestep_spacing`` = ``spacing``):
    :func:`euler_churn_from_sigmas`. ``s_churn`` defaults to the most churn, gamma = sqrt(2) - 1 at
    every step; ``s_churn = 0`` is the deterministic Euler ODE step (refused by the samplers'
    callers only where there is nothing to speculate over). ``init_std``: diffusers'
    ``init_noise_sigma`` by default."""
    from .transitions import euler_ancestral_transitions

    # the same timesteps and sigmas as diffusers' Euler-ancestral (one set_timesteps code)
    grid = euler_ancestral_transitions(
        alphas_cumprod,
        betas=betas,
        num_inference_steps=num_inference_steps,
        spacing=spacing,
        steps_offset=steps_offset,
        init_std=init_std,
    )
    sig = torch.cat([grid.state_sigma, grid.state_sigma.new_zeros(1)])
    return euler_churn_from_sigmas(
        grid.timesteps,
        sig,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        prediction=prediction,
        init_std=grid.init_std,
        name="euler-churn",
    )


def edm_euler_churn_transitions(
    num_inference_steps: int,
    *,
    alphas_cumprod=None,
    prediction: str = "epsilon",
    s_churn: float = math.inf,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    sigma_data: Optional[float] = None,
    sigma_schedule: str = "karras",
    rho: float = 7.0,
    final_sigmas_type: str = "zero",
) -> GaussianTransitions:
    """Euler with churn on EDM's noise levels (diffusers' ``EDMEulerScheduler`` stepped with
    ``s_churn > 0``) without diffusers: the levels as :func:`edm_dpmsolver_sde_transitions`
    (but ``final_sigmas_type="sigma_min"`` repeats the last level, as diffusers' EDM Euler),
    stepped by :func:`euler_churn_from_sigmas` with EDM's preconditioning (or a VP model's
    conversion, with ``alphas_cumprod``). ``s_churn`` defaults to the most churn."""
    n = as_int("num_inference_steps", num_inference_steps, 1)
    final = as_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
    lo, hi, sigma_data, to_t = _sigma_grid(alphas_cumprod, sigma_min, sigma_max, sigma_data)
    sig = edm_sigmas(n, lo, hi, as_real("rho", rho, 0.0, open_low=True), sigma_schedule)
    last = sig[-1:] if final == "sigma_min" else sig.new_zeros(1)
    return euler_churn_from_sigmas(
        to_t(sig),
        torch.cat([sig, last]),
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        sigma_data=sigma_data,
        prediction=prediction,
        init_std=math.sqrt(hi**2 + 1),
        name="edm-euler-churn",
    )


# ------------------------------------------------ Stable Audio's cosine DPM-Solver (§2.3)
# diffusers' BatchedBrownianTree builds torchsde's BrownianInterval with tol=1e-6: it rounds every
# time it is given to this many decimals (``round(t, -int(log10(tol)))``)
BROWNIAN_DIGITS = -int(math.log10(1e-6))


def brownian_tree_noise_var(sigmas, sigma_min: float, sigma_max: float) -> Tensor:
    """``[N]`` variance of the noise diffusers' ``BrownianTreeNoiseSampler(sigma_min,
    sigma_max)`` gives step k, ``W(sigmas[k+1], sigmas[k]) / sqrt|sigmas[k] - sigmas[k+1]|``
    (docs/design.md §2.3). W is a Brownian motion resolved by torchsde on the tree's rounded ends:
    each query end is clamped to them, then rounded to ``BROWNIAN_DIGITS`` decimals, so W's
    variance is the rounded interval's length (0 where both ends clamp or round to one point)
    while the divisor is the float32 sigmas' own distance. ``sigma_min``/``sigma_max``: the scheduler's
    config values (made float32 tensors as diffusers does)."""
    rnd = lambda t: round(t, BROWNIAN_DIGITS)  # noqa: E731 (torchsde's _round)
    lo = rnd(float(torch.as_tensor(sigma_min)))
    hi = rnd(float(torch.as_tensor(sigma_max)))
    s32 = _vector(sigmas, "sigmas").float()
    ends = [min(max(float(t), lo), hi) for t in s32]  # BrownianInterval.__call__'s clamping
    var = []
    for k in range(s32.numel() - 1):
        a, b = ends[k + 1], ends[k]
        gap = float((s32[k] - s32[k + 1]).abs())  # diffusers' divisor, in float32
        if gap == 0:
            raise ValueError(
                f"sigmas[{k}] = sigmas[{k + 1}] = {float(s32[k])!r}: diffusers' Brownian-tree "
                f"noise there is 0/0 (NaN)"
            )
        # ends that round to one point: torchsde resolves no increment (zeros, or for some
        # points a RecursionError in diffusers' step)
        var.append((rnd(b) - rnd(a)) / gap)
    return torch.tensor(var, dtype=torch.float64)


def cosine_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float, schedule: str) -> Tensor:
    """``n`` decreasing noise levels of ``CosineDPMSolverMultistepScheduler.set_timesteps``:
    :func:`edm_sigmas`, but Karras' computed in float32 (its ramp is float32, the EDM
    schedulers' float64)."""
    if as_choice("sigma_schedule", schedule, EDM_SCHEDULES) == "exponential":
        return edm_sigmas(n, sigma_min, sigma_max, rho, schedule)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + torch.linspace(0, 1, n) * (lo - hi)) ** rho).double()


def cosine_dpmsolver_sde_transitions(
    num_inference_steps: int,
    *,
    alphas_cumprod=None,
    prediction: str = "v_prediction",
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    sigma_data: Optional[float] = None,
    sigma_schedule: str = "exponential",
    rho: float = 7.0,
    solver_order: int = 2,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> GaussianTransitions:
    """Stable Audio's sampler (diffusers' ``CosineDPMSolverMultistepScheduler``) without
    diffusers: SDE-DPM-Solver++ (:func:`edm_dpmsolver_sde_from_sigmas`) on its noise levels
    (:func:`cosine_sigmas`, then 0), EDM-preconditioned with c_noise = atan(sigma) 2 / pi (defaults
    sigma_data 1, sigma 0.3..500), each step's noise variance that of its Brownian tree
    (:func:`brownian_tree_noise_var`). With ``alphas_cumprod``: a VP model of that training
    schedule (its sigma range). The final sigma is 0: diffusers' "sigma_min" ends on a zero-length
    Brownian interval (0/0)."""
    n = as_int("num_inference_steps", num_inference_steps, 1)
    grid = _sigma_grid(alphas_cumprod, sigma_min, sigma_max, sigma_data, COSINE_DEFAULTS)
    lo, hi, sigma_data, to_t = grid
    sig = cosine_sigmas(n, lo, hi, as_real("rho", rho, 0.0, open_low=True), sigma_schedule)
    sigmas = torch.cat([sig, sig.new_zeros(1)])
    return edm_dpmsolver_sde_from_sigmas(
        to_t(sig),
        sigmas,
        sigma_data=sigma_data,
        prediction=prediction,
        solver_order=solver_order,
        solver_type=solver_type,
        lower_order_final=lower_order_final,
        euler_at_final=euler_at_final,
        init_std=math.sqrt(hi**2 + 1),
        noise_var=brownian_tree_noise_var(sigmas, lo, hi),
        name="cosine-dpm++2m-sde" if solver_order == 2 else "cosine-dpm++1s-sde",
    )

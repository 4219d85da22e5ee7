"""An analytic Gaussian-mixture data distribution and its EXACT denoiser under the VP process.

Data: ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` in R^D (isotropic per component when the stds are
given per component, diagonal when given per component and dimension). Forward process:
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. Given component k, x_t is Gaussian with mean
``sqrt(abar) mu_k`` and per-dim variance ``v_k = abar s_k^2 + 1 - abar``, and

    E[x0 | x_t, k] = mu_k + sqrt(abar) s_k^2 / v_k * (x_t - sqrt(abar) mu_k),

so the posterior mean is ``sum_k r_k(x_t) E[x0 | x_t, k]`` with responsibilities ``r_k`` from a
logsumexp over ``log w_k + log N(x_t; sqrt(abar) mu_k, v_k I)``. Everything is computed in
float64. With K = 1 (a Gaussian) the denoiser is affine in x_t.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


class GaussianMixture:
    """``sum_k weights[k] N(means[k], diag(stds[k]^2))``.

    Args:
        means: ``[K, D]``.
        stds: ``[K]`` (isotropic per component), ``[K, D]`` (diagonal) or a scalar.
        weights: ``[K]`` positive (normalised here); default uniform.
    """

    def __init__(self, means, stds=1.0, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must be [K, D], got {tuple(self.means.shape)}")
        K, D = self.means.shape
        s = torch.as_tensor(stds, dtype=torch.float64)
        if s.dim() == 0:
            s = s.expand(K)
        if s.dim() == 1:
            if s.numel() != K:
                raise ValueError(f"stds must have K = {K} entries, got {s.numel()}")
            s = s[:, None].expand(K, D)
        if tuple(s.shape) != (K, D):
            raise ValueError(
                f"stds must be scalar, [K] or [K, D] = [{K}, {D}], got {tuple(s.shape)}"
            )
        if bool((s <= 0).any()):
            raise ValueError("stds must be > 0")
        self.stds = s.contiguous()
        w = (
            torch.ones(K, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if w.shape != (K,) or bool((w <= 0).any()):
            raise ValueError(f"weights must be [K] = [{K}] and positive")
        self.weights = w / w.sum()

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def variance(self) -> Tensor:
        """``[D]``: the diagonal of :meth:`cov`, without the D x D matrix (O(K D) memory)."""
        c = self.means - self.mean()
        return (self.weights[:, None] * self.stds**2).sum(0) + (self.weights[:, None] * c * c).sum(
            0
        )

    def cov(self) -> Tensor:
        """``[D, D]`` (D^2 floats: for small D; :meth:`variance` is its diagonal)."""
        m = self.mean()
        within = (self.weights[:, None] * self.stds**2).sum(0)
        c = self.means - m
        return torch.diag(within) + (self.weights[:, None] * c).T @ c

    def sample(
        self,
        n: int,
        generator: Optional[torch.Generator] = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """``n`` samples ``[n, D]`` (float64 math, cast to ``dtype``)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp] * z).to(dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, self.dim)
        return _log_mix(x, self.means, self.stds**2, self.weights).logsumexp(-1)


def _log_mix(x: Tensor, centers: Tensor, var: Tensor, weights: Tensor) -> Tensor:
    """[B, K]: log w_k + log N(x; centers_k, diag(var_k)); x [B, D], centers/var [K, D]."""
    diff2 = ((x[:, None, :] - centers[None]) ** 2 / var[None]).sum(-1)
    logdet = var.log().sum(-1)
    D = x.shape[-1]
    return weights.log()[None] - 0.5 * (diff2 + logdet[None] + D * math.log(2 * math.pi))


def posterior_mean(mix: nn.Module, x: Tensor, a: Tensor, noise_var: Tensor) -> Tensor:
    """E[x0 | a x0 + sqrt(noise_var) eps = x] for x [B, D] float64, a and noise_var [B] float64,
    under the mixture of ``mix`` (buffers ``means``, ``var0``, ``log_weights``)."""
    a = a[:, None, None]  # [B,1,1]
    v = a**2 * mix.var0[None] + noise_var[:, None, None]  # [B,K,D]
    diff = x[:, None, :] - a * mix.means[None]  # [B,K,D]
    D = x.shape[-1]
    logp = mix.log_weights[None] - 0.5 * (
        (diff**2 / v).sum(-1) + v.log().sum(-1) + D * math.log(2 * math.pi)
    )
    r = torch.softmax(logp, dim=-1)  # [B,K]
    cond = mix.means[None] + a * mix.var0[None] / v * diff  # [B,K,D]
    return (r[..., None] * cond).sum(1)


class GMMVelocity(nn.Module):
    """Exact rectified-flow velocity ``model(x, timestep)`` of a :class:`GaussianMixture`:
    ``x_t = (1 - t) x0 + t eps``, ``v = E[eps - x0 | x_t] = (x_t - E[x0 | x_t]) / t`` with ``t =
    timestep / num_train_timesteps`` (diffusers' FlowMatch convention; prediction
    ``"flow_prediction"``). Output: same shape and dtype as ``x``; math in float64."""

    def __init__(self, gmm: GaussianMixture, num_train_timesteps: int = 1000):
        super().__init__()
        self.gmm = gmm
        self.num_train_timesteps = int(num_train_timesteps)
        self.register_buffer("means", gmm.means.clone())
        self.register_buffer("var0", (gmm.stds**2).clone())
        self.register_buffer("log_weights", gmm.weights.log().clone())
        self.num_calls = 0

    def forward(self, x: Tensor, timestep: Tensor) -> Tensor:
        B = x.shape[0]
        xf = x.reshape(B, -1).to(torch.float64)
        t = torch.as_tensor(timestep, device=x.device).to(torch.float64).reshape(-1)
        t = (t.expand(B) if t.numel() == 1 else t) / self.num_train_timesteps
        x0 = posterior_mean(self, xf, 1 - t, t**2)
        if not torch.compiler.is_compiling():
            self.num_calls += 1
        return ((xf - x0) / t[:, None]).to(x.dtype).reshape(x.shape)


class GMMDenoiser(nn.Module):
    """Exact denoiser ``model(x, t)`` of a :class:`GaussianMixture` under the VP process.

    Args:
        gmm: the data distribution.
        alphas_cumprod: training ``abar`` ``[T]``.
        prediction: ``"epsilon"`` (returns E[eps | x_t]), ``"sample"`` (E[x0 | x_t]) or
            ``"v_prediction"`` (sqrt(abar) E[eps] - sqrt(1-abar) E[x0]).

    ``forward(x, t)``: ``x`` is ``[B, *E]`` with prod(E) = D, ``t`` a ``[B]`` (or scalar) tensor of
    timesteps. Integral t index ``alphas_cumprod``; fractional t (Euler-ancestral "linspace"
    spacing) use ``sigma = sqrt((1-abar)/abar)`` linearly interpolated in t, as diffusers does.
    Output: same shape and dtype as ``x``; math in float64.
    """

    def __init__(self, gmm: GaussianMixture, alphas_cumprod, prediction: str = "epsilon"):
        super().__init__()
        if prediction not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"prediction must be 'epsilon', 'sample' or 'v_prediction', got {prediction!r}"
            )
        self.gmm = gmm
        self.prediction = prediction
        self.register_buffer("means", gmm.means.clone())
        self.register_buffer("var0", (gmm.stds**2).clone())
        self.register_buffer("log_weights", gmm.weights.log().clone())
        self.register_buffer(
            "alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64).clone()
        )
        self.num_calls = 0
        self.num_evals = 0

    def abar(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        T = self.alphas_cumprod.numel()
        if not t.is_floating_point() or bool((t == t.round()).all()):
            return self.alphas_cumprod[t.round().long().clamp(0, T - 1)]
        sig = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        tf = t.to(torch.float64).clamp(0, T - 1)
        lo = tf.floor().long().clamp(0, T - 1)
        hi = (lo + 1).clamp(max=T - 1)
        s = sig[lo] + (tf - lo.to(torch.float64)) * (sig[hi] - sig[lo])
        return 1 / (1 + s * s)

    def posterior_mean_x0(self, x: Tensor, abar: Tensor) -> Tensor:
        """E[x0 | x_t = x] for x [B, D] float64 and abar [B] float64."""
        return posterior_mean(self, x, abar.sqrt(), 1 - abar)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        xf = x.reshape(B, -1).to(torch.float64)
        if xf.shape[1] != self.means.shape[1]:
            raise ValueError(
                f"x has {xf.shape[1]} features per sample, the mixture has D = {self.means.shape[1]}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        abar = self.abar(t).to(torch.float64).reshape(B)
        x0 = self.posterior_mean_x0(xf, abar)
        if not torch.compiler.is_compiling():  # a counter in a compiled graph is a recompile
            self.num_calls += 1
            self.num_evals += B
        if self.prediction == "sample":
            out = x0
        else:
            a = abar.sqrt()[:, None]
            s = (1 - abar).sqrt()[:, None]
            eps = (xf - a * x0) / s
            out = eps if self.prediction == "epsilon" else a * eps - s * x0
        return out.to(x.dtype).reshape(x.shape)


def make_gmm(
    D: int,
    K: int = 8,
    seed: int = 0,
    *,
    mean_scale: float = 1.0,
    std_range: tuple[float, float] = (0.1, 0.4),
    dirichlet: float = 5.0,
) -> GaussianMixture:
    """A standard test mixture in dimension D: K components, means ~ N(0, mean_scale^2 I)
    (per-coordinate scale, so the data have roughly unit variance per coordinate), isotropic
    stds uniform in ``std_range``, weights ~ Dirichlet(int(dirichlet)). Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    means = torch.randn(K, D, generator=g, dtype=torch.float64) * mean_scale
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(K, generator=g, dtype=torch.float64)
    if K == 1:
        w = torch.ones(1, dtype=torch.float64)
    else:
        # Gamma(n, 1) as a sum of n exponentials (seeded; torch's Gamma has no generator)
        u = torch.rand(K, max(1, int(dirichlet)), generator=g, dtype=torch.float64)
        w = -u.clamp_min(1e-300).log().sum(-1)
    return GaussianMixture(means, stds, w)

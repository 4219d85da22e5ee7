"""The embedded ``digits`` DDPM: a target network and a much smaller draft network.

Data: scikit-learn's bundled ``load_digits()`` (1797 images, 8x8, values 0..16), scaled to
[-1, 1] as ``x = v / 8 - 1`` and shaped [N, 1, 8, 8] float32 (:func:`digits_dataset`).

Schedule: standard DDPM, T = 1000, betas linear from 1e-4 to 0.02 (computed in float64;
``alphas_cumprod = cumprod(1 - betas)``), see :func:`digits_betas` / :func:`digits_alphas_cumprod`.

Parametrisation: epsilon prediction. Both networks have the interface

    model(x, t) -> eps_hat

with ``x`` a [B, 1, 8, 8] tensor and ``t`` a [B] tensor of integer timesteps in 0..999 (int64,
or a float tensor holding integer values; a scalar / 0-d ``t`` is broadcast over the batch).
The output has the shape and dtype of ``x``.

Architecture (:class:`DigitsEpsMLP`): a residual MLP on the 64 pixels. The timestep goes
through a sinusoidal embedding and a 2-layer SiLU MLP; every residual block is
``h + W2 SiLU(W1 FiLM(LN(h), t))`` (pre-LayerNorm, FiLM scale/shift from the time embedding,
zero-initialised output projection), followed by LayerNorm, SiLU and a zero-initialised linear
read-out to the 64 pixels. Target and draft differ only in width/depth (see ``TARGET_CONFIG``
and ``DRAFT_CONFIG``); the shipped weights were trained by ``python -m specdiff_kernels.models.train
digits`` and are stored with their config in the safetensors metadata.

This module imports only torch (and safetensors when loading); scikit-learn is imported
inside :func:`digits_dataset`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "T",
    "TARGET_CONFIG",
    "DRAFT_CONFIG",
    "WEIGHTS_DIR",
    "DigitsEpsMLP",
    "build_digits_model",
    "count_params",
    "digits_alphas_cumprod",
    "digits_betas",
    "digits_dataset",
    "digits_labels",
    "load_digits_draft",
    "load_digits_model",
    "load_digits_target",
    "timestep_embedding",
]

#: number of diffusion timesteps of the training schedule
T = 1000
BETA_START = 1e-4
BETA_END = 0.02

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TARGET_FILE = "digits_target.safetensors"
DRAFT_FILE = "digits_draft.safetensors"
# the rectified-flow pair (``train digits-flow``): same architectures, velocity prediction
FLOW_TARGET_FILE = "digits_flow_target.safetensors"
FLOW_DRAFT_FILE = "digits_flow_draft.safetensors"
FLOW_INFO_FILE = "digits_flow_train_info.json"

#: architecture of the shipped target (701,376 parameters, 2.8 MB fp32; 0.70 M MACs / sample)
TARGET_CONFIG: dict[str, int] = {"width": 256, "depth": 4, "hidden_mult": 1, "temb_dim": 64}
#: architecture of the shipped draft (83,168 parameters; 8.4x fewer params, 8.5x fewer MACs)
DRAFT_CONFIG: dict[str, int] = {"width": 96, "depth": 2, "hidden_mult": 1, "temb_dim": 64}


# --------------------------------------------------------------------------------------------
# schedule and data
# --------------------------------------------------------------------------------------------
def digits_betas() -> torch.Tensor:
    """The DDPM schedule: float64 [1000], linear from 1e-4 to 0.02."""
    return torch.linspace(BETA_START, BETA_END, T, dtype=torch.float64)


def digits_alphas_cumprod() -> torch.Tensor:
    """``cumprod(1 - betas)`` in float64, [1000]."""
    return torch.cumprod(1.0 - digits_betas(), dim=0)


def digits_dataset(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sklearn's bundled digits scaled to [-1, 1]: [1797, 1, 8, 8] (in the dataset's order)."""
    from sklearn.datasets import load_digits  # heavy import kept local

    images = load_digits().images  # float64 [1797, 8, 8], values 0..16
    x = torch.as_tensor(images, dtype=torch.float64) / 8.0 - 1.0
    return x.reshape(-1, 1, 8, 8).to(dtype)


def digits_labels() -> torch.Tensor:
    """Class labels (int64 [1797]) matching :func:`digits_dataset`."""
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().target, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] (float32) of timesteps ``t`` [B] (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _ResBlock(nn.Module):
    def __init__(self, width: int, hidden: int, temb_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(temb_hidden, 2 * width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(temb).chunk(2, dim=-1)
        z = self.norm(h) * (1.0 + scale) + shift
        z = self.fc2(torch.nn.functional.silu(self.fc1(z)))
        return h + z


class DigitsEpsMLP(nn.Module):
    """Residual MLP epsilon-predictor for 8x8 digits: ``forward(x [B,1,8,8], t [B]) -> eps``."""

    def __init__(
        self,
        width: int = 256,
        depth: int = 4,
        hidden_mult: int = 1,
        temb_dim: int = 128,
        in_dim: int = 64,
    ) -> None:
        super().__init__()
        self.config = {
            "width": int(width),
            "depth": int(depth),
            "hidden_mult": int(hidden_mult),
            "temb_dim": int(temb_dim),
        }
        self.in_dim = in_dim
        self.temb_dim = temb_dim
        self.temb_mlp = nn.Sequential(
            nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim), nn.SiLU()
        )
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(
            [_ResBlock(width, width * hidden_mult, temb_dim) for _ in range(depth)]
        )
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, in_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        shape = x.shape
        b = shape[0]
        h = x.reshape(b, -1)
        if h.shape[1] != self.in_dim:
            raise ValueError(f"expected {self.in_dim} pixels per sample, got shape {tuple(shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape [{b}], got {tuple(t.shape)}")
        wdtype = self.inp.weight.dtype
        temb = self.temb_mlp(timestep_embedding(t, self.temb_dim).to(wdtype))
        h = self.inp(h.to(wdtype))
        for blk in self.blocks:
            h = blk(h, temb)
        eps = self.out(torch.nn.functional.silu(self.out_norm(h)))
        return eps.to(x.dtype).reshape(shape)

    def flops_per_sample(self) -> int:
        """Multiply-accumulates of the linear layers for one sample (norms/activations ignored)."""
        return sum(
            m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear)
        )


def build_digits_model(config: dict[str, Any]) -> DigitsEpsMLP:
    return DigitsEpsMLP(**{k: int(v) for k, v in config.items()})


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_digits_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DigitsEpsMLP:
    """Load a digits model saved by ``specdiff_kernels.models.train`` (config in the metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; train it with `python -m specdiff_kernels.models.train digits --into-package`"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta["config"]) if "config" in meta else None
    if config is None:
        raise ValueError(f"{path} has no 'config' metadata")
    model = build_digits_model(config)
    state = load_file(str(path))
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def load_digits_target(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DigitsEpsMLP:
    """The shipped digits target (eval mode, no grad)."""
    return load_digits_model(WEIGHTS_DIR / TARGET_FILE, device=device, dtype=dtype)


def load_digits_draft(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DigitsEpsMLP:
    """The shipped, independently trained, much smaller digits draft (eval mode, no grad)."""
    return load_digits_model(WEIGHTS_DIR / DRAFT_FILE, device=device, dtype=dtype)

"""The embedded ``pusht`` diffusion policy (the paper's robotics experiment, closed loop).

Environment: gym-pusht's ``PushTEnv`` with ``obs_type="state"``: the observation is
``[agent_x, agent_y, block_x, block_y, block_angle]`` (pixels of the 512 x 512 arena, angle in
[0, 2 pi)); the action is the agent's target position; reward and success are the environment's
own (coverage of the goal by the block, success at coverage > 0.95); episodes last at most
``MAX_STEPS`` = 300 control steps. It runs headless: nothing is drawn unless :func:`render` is
called. gym-pusht is an optional dependency (``pip install 'specdiff_kernels[policy]'``); the
network, its weights and ``models.load("pusht")`` need only torch.

Policy (Diffusion Policy, as LeRobot's pusht configuration, sized for a CPU):

* ``N_OBS_STEPS`` = 2 observations, ``HORIZON`` = 16 actions per chunk, of which
  ``N_ACTION_STEPS`` = 8 are executed before planning again. The chunk starts at the first
  observation's step: chunk[i] is the action at time t - 1 + i for observations (o_{t-1}, o_t);
  the executed actions are chunk[1:9].
* The sample (the diffusion state, event shape ``EVENT_SHAPE`` = (16, 2)) is the normalised
  action chunk, **horizon first**: ``[B, 16, 2]``; the network moves the action axis to
  channels itself.
* The network (:class:`ConditionalUnet1D`) is Diffusion Policy's conditional 1-D temporal UNet:
  Conv1d residual blocks (Conv1d, GroupNorm, Mish) with FiLM (scale and shift) from the
  concatenation of a sinusoidal diffusion-step embedding (through a Mish MLP) and the flattened,
  normalised observation history ``obs`` [B, 2 * 5]. Call it as ``model(x, t, obs=obs)``.
* DDPM, ``TRAIN_TIMESTEPS`` = 100 steps, ``squaredcos_cap_v2`` betas, epsilon prediction,
  ``clip_sample`` 1.0.
* Normalisation: actions and observations to [-1, 1] by min/max over the demonstrations
  (:class:`Normalizer`, stored with the weights). The block angle is first wrapped to
  [goal - pi, goal + pi) so that its discontinuity lies opposite the goal's orientation.

Training: ``python -m specdiff_kernels.models.train pusht`` on demonstrations of the scripted
expert of :mod:`specdiff_kernels.models.pusht_expert` (nothing is downloaded).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "EVENT_SHAPE",
    "GOAL_POSE",
    "HORIZON",
    "N_ACTION_STEPS",
    "N_OBS_STEPS",
    "TRAIN_TIMESTEPS",
    "ConditionalUnet1D",
    "Normalizer",
    "PushTPolicy",
    "load_policy",
    "make_env",
    "require_gym_pusht",
]

N_OBS_STEPS = 2
HORIZON = 16
N_ACTION_STEPS = 8
OBS_DIM = 5
ACTION_DIM = 2
EVENT_SHAPE = (HORIZON, ACTION_DIM)
TRAIN_TIMESTEPS = 100
BETA_SCHEDULE = "squaredcos_cap_v2"
CLIP_SAMPLE = 1.0
MAX_STEPS = 300
GOAL_POSE = (256.0, 256.0, math.pi / 4)  # gym-pusht's goal: x, y, angle

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
POLICY_FILE = "pusht_policy.safetensors"
INFO_FILE = "pusht_train_info.json"

#: the shipped network's architecture
UNET_CONFIG: dict = {
    "input_dim": ACTION_DIM,
    "global_cond_dim": N_OBS_STEPS * OBS_DIM,
    "diffusion_step_embed_dim": 64,
    "down_dims": [32, 64, 128],
    "kernel_size": 5,
    "n_groups": 8,
}

EXTRA_HINT = "pip install 'specdiff_kernels[policy]'"


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def require_gym_pusht():
    """gym-pusht's env module, or ImportError with one line naming the extra to install."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        from gym_pusht.envs import pusht as env_module
    except ImportError:
        raise ImportError(
            f"the PushT environment needs gym-pusht, which is not installed: {EXTRA_HINT}"
        ) from None
    return env_module


def make_env(render: bool = False):
    """gym-pusht's ``PushTEnv(obs_type="state")``, unwrapped (no TimeLimit: the callers stop at
    ``MAX_STEPS``). ``render_mode="rgb_array"`` in both cases (gym-pusht has no headless
    ``None`` mode); nothing is drawn unless ``env.render()`` is called."""
    env_module = require_gym_pusht()
    if render:
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    return env_module.PushTEnv(obs_type="state", render_mode="rgb_array")


def render(env) -> np.ndarray:
    """An RGB frame [680, 680, 3] uint8 of ``env`` (headless: pygame surfaces, no window)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    return env.render()


def wrap_angle(obs: np.ndarray | Tensor):
    """The block angle (last column) wrapped to [goal - pi, goal + pi)."""
    lo = GOAL_POSE[2] - math.pi
    if isinstance(obs, Tensor):
        out = obs.clone()
        out[..., 4] = torch.remainder(out[..., 4] - lo, 2 * math.pi) + lo
        return out
    out = np.array(obs, dtype=np.float64, copy=True)
    out[..., 4] = np.mod(out[..., 4] - lo, 2 * math.pi) + lo
    return out


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------
@dataclass
class Normalizer:
    """Min/max scaling to [-1, 1] of observations (angle wrapped first) and actions."""

    obs_min: Tensor  # [5]
    obs_max: Tensor
    action_min: Tensor  # [2]
    action_max: Tensor

    @classmethod
    def fit(cls, obs: np.ndarray, actions: np.ndarray) -> "Normalizer":
        o = torch.as_tensor(wrap_angle(obs), dtype=torch.float32).reshape(-1, OBS_DIM)
        a = torch.as_tensor(actions, dtype=torch.float32).reshape(-1, ACTION_DIM)
        return cls(o.amin(0), o.amax(0), a.amin(0), a.amax(0))

    @staticmethod
    def _scale(x, lo, hi):
        rng = (hi - lo).clamp_min(1e-6)
        return 2.0 * (x - lo) / rng - 1.0

    @staticmethod
    def _unscale(x, lo, hi):
        return (x + 1.0) / 2.0 * (hi - lo) + lo

    def normalize_obs(self, obs) -> Tensor:
        """Raw observations [..., 5] (numpy or torch) -> [..., 5] float32 in [-1, 1]."""
        o = wrap_angle(torch.as_tensor(np.asarray(obs) if not isinstance(obs, Tensor) else obs))
        o = o.to(torch.float32)
        return self._scale(o, self.obs_min.to(o.device), self.obs_max.to(o.device))

    def unnormalize_obs(self, z: Tensor) -> Tensor:
        return self._unscale(z, self.obs_min.to(z.device), self.obs_max.to(z.device))

    def normalize_action(self, a) -> Tensor:
        a = torch.as_tensor(a, dtype=torch.float32)
        return self._scale(a, self.action_min.to(a.device), self.action_max.to(a.device))

    def unnormalize_action(self, z: Tensor) -> Tensor:
        """Normalised actions [..., 2] -> arena pixels."""
        return self._unscale(z, self.action_min.to(z.device), self.action_max.to(z.device))

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "normalizer.obs_min": self.obs_min,
            "normalizer.obs_max": self.obs_max,
            "normalizer.action_min": self.action_min,
            "normalizer.action_max": self.action_max,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "Normalizer":
        return cls(*(state[f"normalizer.{k}"].float() for k in _NORM_KEYS))


_NORM_KEYS = ("obs_min", "obs_max", "action_min", "action_max")


# --------------------------------------------------------------------------------------------
# network: Diffusion Policy's ConditionalUnet1D
# --------------------------------------------------------------------------------------------
class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        f = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -f)
        args = t.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, cin: int, cout: int, kernel: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(cin, cout, kernel, padding=kernel // 2),
            nn.GroupNorm(n_groups, cout),
            nn.Mish(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1dBlocks with FiLM (per-channel scale and shift from ``cond``) after the first,
    plus a 1x1 residual projection."""

    def __init__(self, cin: int, cout: int, cond_dim: int, kernel: int, n_groups: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Conv1dBlock(cin, cout, kernel, n_groups), Conv1dBlock(cout, cout, kernel, n_groups)]
        )
        self.out_channels = cout
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * cout))
        self.residual_conv = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        out = self.blocks[0](x)
        scale, bias = self.cond_encoder(cond).unsqueeze(-1).chunk(2, dim=1)
        out = self.blocks[1](scale * out + bias)
        return out + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """``forward(x [B, HORIZON, input_dim], t [B] or scalar, obs=[B, global_cond_dim]) -> eps``
    (same shape as x)."""

    def __init__(
        self,
        input_dim: int = ACTION_DIM,
        global_cond_dim: int = N_OBS_STEPS * OBS_DIM,
        diffusion_step_embed_dim: int = 64,
        down_dims=(64, 128, 256),
        kernel_size: int = 5,
        n_groups: int = 8,
    ):
        super().__init__()
        self.config = {
            "input_dim": int(input_dim),
            "global_cond_dim": int(global_cond_dim),
            "diffusion_step_embed_dim": int(diffusion_step_embed_dim),
            "down_dims": [int(d) for d in down_dims],
            "kernel_size": int(kernel_size),
            "n_groups": int(n_groups),
        }
        dsed = diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed)
        )
        cond_dim = dsed + global_cond_dim
        dims = [input_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:]))

        def res(a, b):
            return ConditionalResidualBlock1D(a, b, cond_dim, kernel_size, n_groups)

        self.down_modules = nn.ModuleList()
        for i, (a, b) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down_modules.append(
                nn.ModuleList(
                    [res(a, b), res(b, b), nn.Conv1d(b, b, 3, 2, 1) if not last else nn.Identity()]
                )
            )
        mid = down_dims[-1]
        self.mid_modules = nn.ModuleList([res(mid, mid), res(mid, mid)])
        self.up_modules = nn.ModuleList()
        # as Diffusion Policy: every up level upsamples, the first level's skip is unused
        for a, b in reversed(pairs[1:]):
            self.up_modules.append(
                nn.ModuleList([res(2 * b, a), res(a, a), nn.ConvTranspose1d(a, a, 4, 2, 1)])
            )
        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], input_dim, 1),
        )

    def forward(self, x: Tensor, t, obs: Optional[Tensor] = None) -> Tensor:
        if obs is None:
            raise TypeError("ConditionalUnet1D needs the observation history: model(x, t, obs=...)")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        wdtype = self.final_conv[1].weight.dtype
        cond = torch.cat(
            [self.diffusion_step_encoder(t), obs.reshape(b, -1).to(torch.float32)], dim=-1
        ).to(wdtype)
        h = x.to(wdtype).transpose(1, 2)  # [B, action_dim, horizon]
        skips = []
        for r1, r2, down in self.down_modules:
            h = r2(r1(h, cond), cond)
            skips.append(h)
            h = down(h)
        for m in self.mid_modules:
            h = m(h, cond)
        for r1, r2, up in self.up_modules:
            h = torch.cat([h, skips.pop()], dim=1)
            h = r2(r1(h, cond), cond)
            h = up(h)
        return self.final_conv(h).transpose(1, 2).to(x.dtype)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# schedule, saving and loading
# --------------------------------------------------------------------------------------------
def pusht_betas() -> Tensor:
    from ..sampling.transitions import make_betas

    return make_betas(BETA_SCHEDULE, TRAIN_TIMESTEPS)


def pusht_alphas_cumprod() -> Tensor:
    from ..sampling.transitions import alphas_cumprod_from_betas

    return alphas_cumprod_from_betas(pusht_betas())


def save_policy(path: Path, model: ConditionalUnet1D, normalizer: Normalizer, extra: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    state.update({k: v.float().contiguous().clone() for k, v in normalizer.state_dict().items()})
    meta = {
        "config": json.dumps(model.config),
        "format": "pt",
        "model": "specdiff_kernels.models.pusht.ConditionalUnet1D",
        "prediction_type": "epsilon",
        "schedule": f"ddpm {BETA_SCHEDULE}, T={TRAIN_TIMESTEPS}, clip_sample {CLIP_SAMPLE}",
        "event_shape": json.dumps(list(EVENT_SHAPE)),
        "n_obs_steps": str(N_OBS_STEPS),
        "n_action_steps": str(N_ACTION_STEPS),
    }
    meta.update({k: str(v) for k, v in extra.items()})
    save_file(state, str(path), metadata=meta)
    Path(path).chmod(0o644)


def load_policy_file(
    path: str | Path, device="cpu", dtype: torch.dtype = torch.float32
) -> tuple[ConditionalUnet1D, Normalizer]:
    """The network (eval mode, no grad) and normaliser saved by ``train pusht``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; train it with `python -m specdiff_kernels.models.train pusht "
            "--into-package`"
        )
    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {})["config"])
    state = load_file(str(path))
    norm = Normalizer.from_state_dict(state)
    model = ConditionalUnet1D(**config)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("normalizer.")})
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, norm


@dataclass
class PushTPolicy:
    """What ``models.load("pusht")`` returns besides the EmbeddedModel fields: the normaliser
    and the chunking constants (see :func:`load_policy`)."""

    normalizer: Normalizer
    n_obs_steps: int = N_OBS_STEPS
    horizon: int = HORIZON
    n_action_steps: int = N_ACTION_STEPS

    def obs_condition(self, history) -> Tensor:
        """Raw observation histories [B, 2, 5] (or one [2, 5]) -> the network's ``obs``
        [B, 10]."""
        z = self.normalizer.normalize_obs(history)
        if z.ndim == 2:
            z = z[None]
        return z.reshape(z.shape[0], -1)

    def actions(self, chunk: Tensor) -> np.ndarray:
        """Sampled chunks [B, 16, 2] (normalised) -> the executed actions [B, 8, 2] in pixels."""
        a = self.normalizer.unnormalize_action(chunk.detach().float().cpu())
        start = self.n_obs_steps - 1
        return a[:, start : start + self.n_action_steps].numpy().astype(np.float64)


def load_policy(path: str | Path | None = None, device="cpu", dtype=torch.float32):
    """An ``EmbeddedModel`` (name "pusht") with ``.policy`` (a :class:`PushTPolicy`), and
    ``normalize_obs`` / ``unnormalize_action`` / ``obs_condition`` helpers."""
    from . import EmbeddedModel

    path = WEIGHTS_DIR / POLICY_FILE if path is None else Path(path)
    model, norm = load_policy_file(path, device, dtype)
    em = EmbeddedModel(
        name="pusht",
        target=model,
        draft=None,
        event_shape=EVENT_SHAPE,
        alphas_cumprod=pusht_alphas_cumprod(),
        prediction="epsilon",
        clip_sample=CLIP_SAMPLE,
        description="Diffusion Policy (ConditionalUnet1D, obs= [B, 10]) on gym-pusht state "
        "observations; DDPM 100 steps, squaredcos_cap_v2, eps, clip 1.0; actions (16, 2)",
    )
    policy = PushTPolicy(norm)
    em.policy = policy
    em.normalizer = norm
    em.normalize_obs = norm.normalize_obs
    em.unnormalize_action = norm.unnormalize_action
    em.obs_condition = policy.obs_condition
    return em

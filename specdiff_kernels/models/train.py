"""Train the embedded models.

    python -m specdiff_kernels.models.train digits [--steps N] [--draft-steps N] [--seed S]
                                            [--threads K] [--out DIR | --into-package]
    python -m specdiff_kernels.models.train patches [--steps N] [--batch B] [--seed S]
                                             [--threads K] [--out DIR | --into-package]
    python -m specdiff_kernels.models.train pusht [--steps N] [--batch B] [--episodes E]
                                           [--seed S] [--threads K] [--out DIR | --into-package]

Where the results go: ``--out DIR`` (default ``./specdiff_models`` for digits,
``./specdiff_models/patches`` for patches, relative to the current directory). The shipped weights
inside the installed package are replaced only with ``--into-package``. Each run records, in its
``*_train_info.json``, the command that reproduces it (every flag that changes the weights
explicit).

``digits`` trains BOTH the digits target and the (much smaller) digits draft, deterministically
(fixed seeds, explicit torch.Generator for data order / timesteps / noise, a fixed number of
CPU threads -- 1 by default, see --threads --, deterministic algorithms), with the standard DDPM
epsilon-prediction loss on sklearn's bundled 8x8 digits scaled to [-1, 1] (see
:mod:`specdiff_kernels.models.digits`). The shipped weights are the EMA of the training weights.
Writes ``digits_target.safetensors``, ``digits_draft.safetensors`` and
``digits_train_info.json``. Load a folder of your own with
``specdiff_kernels.models.digits.load_digits_model(DIR / "digits_target.safetensors")`` (and
``digits_draft.safetensors``).

``patches`` trains the diffusers ``UNet2DModel`` of :mod:`specdiff_kernels.models.patches` on
random 32x32 crops (with horizontal flips) of scikit-image's bundled photographs, with the same
loss, the same determinism rules and EMA weights, and writes a ``DDPMPipeline`` with
``save_pretrained`` (``model_index.json``, ``unet/``, ``scheduler/``, safetensors) plus
``patches_train_info.json``; sample it with ``specdiff sample --pipeline DIR``.

``pusht`` (needs gym-pusht: ``pip install 'specdiff_kernels[policy]'``) runs the scripted expert
of :mod:`specdiff_kernels.models.pusht_expert` for ``--episodes`` episodes (env seeds 0..E-1),
fits the min/max normaliser on its observations and actions, and trains the Diffusion Policy
network of :mod:`specdiff_kernels.models.pusht` (epsilon loss, 100-step squaredcos_cap_v2
schedule, EMA weights). Writes ``pusht_policy.safetensors`` (network + normaliser),
``pusht_demos.npz`` (the demonstrations) and ``pusht_train_info.json``.

Reproducibility: two runs with the same seed, steps, thread count, torch version and CPU (which
picks torch's and the BLAS library's kernels) give bitwise identical weights. Another thread
count, torch version or CPU gives weights that differ in the last bits: a full digits retraining
on another x86-64 CPU differs from the shipped weights by up to ~1e-5 (same losses). The JSON
records the torch version, thread count and torch's CPU capability next to the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..validate import as_int
from . import digits as D

DEFAULT_SEED = 20250105
DEFAULT_TARGET_STEPS = 16000  # the draft gets the same number of steps by default
# One thread by default: bitwise results depend on the thread count, and on a shared 2-core
# machine two OpenMP threads slow down ~10x when another process is busy (measured: 25 ms vs
# 255 ms per target step under load; 16 ms vs 12 ms when idle).
DEFAULT_THREADS = 1
DEFAULT_BATCH = 256
# Sized to fit the 60-minute budget on the shared 2-core CPU at one thread: a step of 32 crops
# measured 0.35 s idle and 0.49 s with two other jobs on the cores (200-step run), so 4500
# steps take ~37 min under that load.
PATCHES_DEFAULT_STEPS = 4500
PATCHES_DEFAULT_BATCH = 32
# pusht: ~50 minutes at one thread of this 2-core CPU (a step of 256 chunks of the 1.1M-parameter
# UNet takes 0.17-0.19 s with another job on the other core), after ~4 minutes of demos; closed-loop
# success of each setting: pusht_train_info.json
PUSHT_DEFAULT_STEPS = 16000
PUSHT_DEFAULT_BATCH = 256
PUSHT_DEFAULT_EPISODES = 300
# Where training writes unless told otherwise: a folder in the current directory, never the
# installed package (its weights are replaced only with --into-package).
DEFAULT_OUT = Path("specdiff_models")
MODULE_COMMAND = "python -m specdiff_kernels.models.train"


def default_out(model: str) -> Path:
    """The folder ``model`` is written to without ``--out``: ``./specdiff_models`` for digits and
    pusht, ``./specdiff_models/patches`` for the patches pipeline."""
    return DEFAULT_OUT / "patches" if model == "patches" else DEFAULT_OUT


def package_dir(model: str) -> Path:
    """The installed package's folder of ``model``'s shipped weights (``--into-package``)."""
    if model in ("digits", "digits-flow"):
        return D.WEIGHTS_DIR
    if model == "pusht":
        from . import pusht

        return pusht.WEIGHTS_DIR
    from . import patches as P

    return P.pipeline_dir()


def reproduce_command(model: str, **flags) -> str:
    """The command line that trains the same weights (every flag that changes them explicit; the
    output folder left to the user)."""
    parts = [MODULE_COMMAND, model]
    for name, value in flags.items():
        parts += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(parts)


def _machine() -> dict:
    """What besides the command decides the bits: torch, the CPU and its instruction set."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
    }


class _Deterministic:
    """``threads`` torch CPU threads and deterministic algorithms for the block; the caller's
    settings are restored after it."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        self.prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(True)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev[0])
        torch.use_deterministic_algorithms(self.prev[1])
        return False


def _lr_at(step: int, total: int, base: float, warmup: int, final_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * p)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)


def _eps_loss(predict, x0: torch.Tensor, g: torch.Generator, abar: torch.Tensor) -> torch.Tensor:
    """The DDPM epsilon loss of ``predict(x_t, t)`` on clean data x0 (t, then eps, drawn from g)."""
    b = x0.shape[0]
    t = torch.randint(0, abar.shape[0], (b,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = abar[t].view(b, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return (predict(xt, t) - eps).pow(2).mean()


def _flow_pair(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
    """Rectified flow (docs/design.md, flow matching): x_t = (1 - t) x0 + t eps, its velocity
    v = eps - x0, and the network's timestep input t * 1000 (diffusers' FlowMatch convention)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * eps, eps - x0, t * D.T


def _flow_loss(predict, x0: torch.Tensor, g: torch.Generator, abar=None) -> torch.Tensor:
    """The rectified-flow loss ||v_hat(x_t, 1000 t) - (eps - x0)||^2 with t ~ U[0, 1) (t, then
    eps, drawn from g). Uniform t, not SD3's logit-normal: the samplers step uniformly in t
    (shift 1), so every t is used equally at sampling time, and the small-t steps that draw the
    final strokes would get little training weight under a logit-normal density."""
    t = torch.rand(x0.shape[0], generator=g)
    eps = torch.randn(x0.shape, generator=g)
    xt, v, timestep = _flow_pair(x0, t, eps)
    return (predict(xt, timestep) - v).pow(2).mean()


_LOSSES = {"epsilon": _eps_loss, "flow_prediction": _flow_loss}


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    warmup: int
    final_lr_frac: float
    ema_decay: float
    grad_clip: float
    log_every: int

    def record(self) -> dict:
        """The hyper-parameters as the training info files record them."""
        return {
            "steps": self.steps,
            "lr": self.lr,
            "warmup": self.warmup,
            "final_lr_frac": self.final_lr_frac,
            "ema_decay": self.ema_decay,
            "grad_clip": self.grad_clip,
        }


class _Trainer:
    """One optimiser step at a time: cosine learning rate, gradient clipping, EMA weights, a
    smoothed loss and a log line every ``log_every`` steps (shared by both models)."""

    def __init__(self, name: str, model: torch.nn.Module, ema: torch.nn.Module, opt, sch: Schedule):
        self.name, self.model, self.ema, self.opt, self.sch = name, model, ema, opt, sch
        self.smooth: Optional[float] = None
        self.t0 = time.perf_counter()

    def step(self, step: int, loss: torch.Tensor) -> None:
        sch, opt = self.sch, self.opt
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, sch.steps, sch.lr, sch.warmup, sch.final_lr_frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sch.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), sch.grad_clip)
        opt.step()
        _ema_update(self.ema, self.model, min(sch.ema_decay, (1.0 + step) / (10.0 + step)))
        lv = loss.item()
        self.smooth = lv if self.smooth is None else 0.99 * self.smooth + 0.01 * lv
        if (step + 1) % sch.log_every == 0 or step + 1 == sch.steps:
            print(
                f"[{self.name}] step {step + 1:6d}/{sch.steps}  loss {lv:.5f}  ema-loss "
                f"{self.smooth:.5f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.perf_counter() - self.t0:7.1f}s",
                flush=True,
            )


def _write_json(path: Path, info: dict) -> None:
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    data: torch.Tensor,
    abar: torch.Tensor,
    seed: int = 12345,
    repeats: int = 4,
    objective: str = "epsilon",
) -> float:
    """Mean training loss (epsilon-MSE, or velocity-MSE for ``objective="flow_prediction"``) of
    ``model`` over the dataset with fixed (seeded) timesteps and noise."""
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for i in range(0, data.shape[0], 512):
            x0 = data[i : i + 512]
            b = x0.shape[0]
            if objective == "flow_prediction":
                t = torch.rand(b, generator=g)
                eps = torch.randn(x0.shape, generator=g)
                xt, target, t = _flow_pair(x0, t, eps)
            else:
                t = torch.randint(0, D.T, (b,), generator=g)
                eps = torch.randn(x0.shape, generator=g)
                a = abar[t].view(b, 1, 1, 1)
                xt, target = a.sqrt() * x0 + (1 - a).sqrt() * eps, eps
            total += (model(xt, t) - target).pow(2).mean(dim=(1, 2, 3)).sum().item()
            count += b
    return total / count


def train_eps_model(
    name: str,
    config: dict,
    data: torch.Tensor,
    *,
    steps: int,
    seed: int,
    batch: int = DEFAULT_BATCH,
    lr: float = 1e-3,
    warmup: int = 500,
    final_lr_frac: float = 0.02,
    ema_decay: float = 0.9995,
    grad_clip: float = 1.0,
    log_every: int = 1000,
    objective: str = "epsilon",
) -> tuple[torch.nn.Module, dict]:
    """Train one digits network, an epsilon-prediction DDPM (``objective="epsilon"``) or a
    rectified-flow velocity model (``"flow_prediction"``); returns (EMA model in eval mode,
    stats)."""
    loss_fn = _LOSSES[objective]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = D.build_digits_model(config)
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    abar = D.digits_alphas_cumprod().to(torch.float32)
    n = data.shape[0]
    perm = torch.randperm(n, generator=g)
    pos = 0
    print(
        f"[{name}] config={config} params={D.count_params(model)} steps={steps} "
        f"batch={batch} lr={lr} seed={seed}",
        flush=True,
    )
    trainer = _Trainer(
        name,
        model,
        ema,
        opt,
        Schedule(steps, lr, warmup, final_lr_frac, ema_decay, grad_clip, log_every),
    )
    for step in range(steps):
        # deterministic data order: a fresh seeded permutation per epoch, consumed in order
        idx_parts = []
        need = batch
        while need > 0:
            if pos >= n:
                perm = torch.randperm(n, generator=g)
                pos = 0
            take = min(need, n - pos)
            idx_parts.append(perm[pos : pos + take])
            pos += take
            need -= take
        x0 = data[torch.cat(idx_parts)]
        trainer.step(step, loss_fn(model, x0, g, abar))
    wall = time.perf_counter() - trainer.t0
    smooth = trainer.smooth
    final_eval = eval_loss(ema, data, abar, objective=objective)
    stats = {
        "config": config,
        "params": D.count_params(ema),
        "macs_per_sample": ema.flops_per_sample(),
        "batch": batch,
        **trainer.sch.record(),
        "seed": seed,
        "wall_time_s": round(wall, 2),
        "final_smoothed_train_loss": round(smooth, 6),
        "final_eval_loss_ema": round(final_eval, 6),
    }
    print(
        f"[{name}] done: wall {wall:.1f}s  final EMA-smoothed train loss {smooth:.5f}  "
        f"eval loss (EMA weights, fixed noise) {final_eval:.5f}",
        flush=True,
    )
    return ema, stats


_DDPM_META = {"prediction_type": "epsilon", "schedule": "ddpm linear 1e-4..0.02, T=1000"}
_FLOW_META = {
    "prediction_type": "flow_prediction",
    "schedule": "rectified flow x_t = (1 - t) x0 + t eps, timestep = 1000 t",
}


def _save(model: torch.nn.Module, path: Path, extra: dict, kind: dict = _DDPM_META) -> None:
    from safetensors.torch import save_file

    state = {
        k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
    }
    meta = {
        "config": json.dumps(model.config),
        "format": "pt",
        "model": "specdiff_kernels.models.digits.DigitsEpsMLP",
        **kind,
    }
    meta.update({k: str(v) for k, v in extra.items()})
    save_file(state, str(path), metadata=meta)


@dataclass(frozen=True)
class _DigitsVariant:
    """What tells the two embedded digits models apart: the objective, the files, the records."""

    model: str  # the subcommand
    objective: str  # a key of _LOSSES
    target_file: str
    draft_file: str
    info_file: str
    meta: dict
    schedule: dict
    loss: str


_DIGITS = _DigitsVariant(
    "digits",
    "epsilon",
    D.TARGET_FILE,
    D.DRAFT_FILE,
    "digits_train_info.json",
    _DDPM_META,
    {
        "T": D.T,
        "beta_start": D.BETA_START,
        "beta_end": D.BETA_END,
        "kind": "linear",
        "prediction_type": "epsilon",
    },
    "mean squared error of epsilon, t ~ U{0..999}",
)
_DIGITS_FLOW = _DigitsVariant(
    "digits-flow",
    "flow_prediction",
    D.FLOW_TARGET_FILE,
    D.FLOW_DRAFT_FILE,
    D.FLOW_INFO_FILE,
    _FLOW_META,
    {
        "kind": "rectified flow, x_t = (1 - t) x0 + t eps, t in [0, 1]",
        "num_train_timesteps": D.T,
        "timestep_input": "1000 t (float)",
        "prediction_type": "flow_prediction",
    },
    "mean squared error of the velocity eps - x0, t ~ U[0, 1) (uniform: the samplers step "
    "uniformly in t, shift 1)",
)


def train_digits(
    steps: int = DEFAULT_TARGET_STEPS,
    draft_steps: int | None = None,
    out: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    threads: int = DEFAULT_THREADS,
    flow: bool = False,
) -> dict:
    """Train the digits target and draft; write them and ``digits_train_info.json`` to ``out``
    (default ``./specdiff_models``; ``package_dir("digits")`` replaces the shipped weights).
    ``flow=True``: the rectified-flow pair instead (``digits_flow_*`` files, velocity loss)."""
    draft_steps = steps if draft_steps is None else draft_steps
    _check_positive(steps=steps, draft_steps=draft_steps, threads=threads)
    out = Path(out) if out is not None else default_out("digits")
    variant = _DIGITS_FLOW if flow else _DIGITS
    with _Deterministic(threads):
        return _train_digits(variant, steps, draft_steps, out, seed, threads)


def _check_positive(**values) -> None:
    for name, v in values.items():
        as_int(name, v, 1)


def _train_digits(
    var: _DigitsVariant, steps: int, draft_steps: int, out: Path, seed: int, threads: int
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = D.digits_dataset()
    t_all = time.perf_counter()
    target, tstats = train_eps_model(
        "target",
        dict(D.TARGET_CONFIG),
        data,
        steps=steps,
        seed=seed,
        lr=1e-3,
        objective=var.objective,
    )
    _save(target, out / var.target_file, {"seed": seed, "steps": steps}, var.meta)
    draft, dstats = train_eps_model(
        "draft",
        dict(D.DRAFT_CONFIG),
        data,
        steps=draft_steps,
        seed=seed + 1,
        lr=2e-3,
        objective=var.objective,
    )
    _save(draft, out / var.draft_file, {"seed": seed + 1, "steps": draft_steps}, var.meta)
    total = time.perf_counter() - t_all
    info = {
        "command": reproduce_command(
            var.model, steps=steps, draft_steps=draft_steps, seed=seed, threads=threads
        ),
        "seed": seed,
        "data": "sklearn.datasets.load_digits, 1797 x 8x8, scaled v/8-1 to [-1,1], no augmentation",
        "schedule": var.schedule,
        "loss": var.loss,
        "weights": "EMA of training weights, fp32",
        "total_wall_time_s": round(total, 2),
        **_machine(),
        "target": tstats,
        "draft": dstats,
        "param_ratio_target_over_draft": round(tstats["params"] / dstats["params"], 2),
        "macs_ratio_target_over_draft": round(
            tstats["macs_per_sample"] / dstats["macs_per_sample"], 2
        ),
    }
    _write_json(out / var.info_file, info)
    print(
        f"wrote {out / var.target_file}, {out / var.draft_file}, {out / var.info_file}"
        f"  (total wall {total:.1f}s)",
        flush=True,
    )
    return info


@torch.no_grad()
def _patches_eval_loss(unet, data: torch.Tensor, abar: torch.Tensor, seed: int = 12345) -> float:
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, data.shape[0], 128):
        x0 = data[i : i + 128]
        b = x0.shape[0]
        t = torch.randint(0, abar.shape[0], (b,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        total += (unet(xt, t).sample - eps).pow(2).mean(dim=(1, 2, 3)).sum().item()
    return total / data.shape[0]


def train_patches(
    steps: int = PATCHES_DEFAULT_STEPS,
    batch: int = PATCHES_DEFAULT_BATCH,
    out: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    threads: int = DEFAULT_THREADS,
    lr: float = 5e-4,
    warmup: int = 200,
    final_lr_frac: float = 0.05,
    ema_decay: float = 0.999,
    grad_clip: float = 1.0,
    log_every: int = 100,
    eval_crops: int = 512,
) -> dict:
    """Train the ``patches`` UNet and save the EMA weights as a diffusers ``DDPMPipeline`` in
    ``out`` (default ``./specdiff_models/patches``; ``package_dir("patches")`` replaces the
    shipped pipeline)."""
    _check_positive(steps=steps, batch=batch, threads=threads, eval_crops=eval_crops)
    out = Path(out) if out is not None else default_out("patches")
    # the command line trains with these; other values are recorded as the Python call
    hyper = dict(
        lr=lr,
        warmup=warmup,
        final_lr_frac=final_lr_frac,
        ema_decay=ema_decay,
        grad_clip=grad_clip,
        eval_crops=eval_crops,
    )
    flags = dict(steps=steps, batch=batch, seed=seed, threads=threads)
    if hyper == _PATCHES_CLI_HYPER:
        command = reproduce_command("patches", **flags)
    else:
        call = ", ".join(f"{k}={v!r}" for k, v in {**flags, **hyper}.items())
        command = (
            f'python -c "from specdiff_kernels.models.train import train_patches; '
            f"train_patches({call}, out='specdiff_models/patches')\""
        )
    with _Deterministic(threads):
        return _train_patches(out, command, steps, batch, seed, threads, log_every, **hyper)


_PATCHES_CLI_HYPER = dict(
    lr=5e-4, warmup=200, final_lr_frac=0.05, ema_decay=0.999, grad_clip=1.0, eval_crops=512
)


def _train_patches(
    out: Path,
    command: str,
    steps: int,
    batch: int,
    seed: int,
    threads: int,
    log_every: int,
    *,
    lr: float,
    warmup: int,
    final_lr_frac: float,
    ema_decay: float,
    grad_clip: float,
    eval_crops: int,
) -> dict:
    from diffusers import DDPMPipeline

    from . import patches as P

    out.mkdir(parents=True, exist_ok=True)
    scheduler = P.build_scheduler()
    abar = scheduler.alphas_cumprod.to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    unet = P.build_unet(seed)
    ema = copy.deepcopy(unet).eval()
    ema.requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    evaldata = P.heldout_crops(eval_crops, seed=seed + 7)
    print(
        f"[patches] params={params} steps={steps} batch={batch} lr={lr} seed={seed} "
        f"threads={threads}",
        flush=True,
    )
    unet.train()
    trainer = _Trainer(
        "patches",
        unet,
        ema,
        opt,
        Schedule(steps, lr, warmup, final_lr_frac, ema_decay, grad_clip, log_every),
    )
    for step in range(steps):
        x0 = P.random_crops(batch, g)
        trainer.step(step, _eps_loss(lambda xt, t: unet(xt, t).sample, x0, g, abar))
    wall = time.perf_counter() - trainer.t0
    smooth = trainer.smooth
    final_eval = _patches_eval_loss(ema, evaldata, abar)
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    # safetensors writes through a 0600 temp file; installed package data must be world-readable
    for f in out.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    info = {
        "command": command,
        "seed": seed,
        "data": (
            f"random {P.CROP}x{P.CROP} crops with horizontal flips of skimage.data "
            f"{list(P.IMAGES)} (left {1 - P.HELDOUT_FRACTION:.0%} of each image's columns; "
            f"the rest is held out), scaled v/127.5-1 to [-1,1]"
        ),
        "unet_config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in P.UNET_CONFIG.items()
        },
        "scheduler_config": P.SCHEDULER_CONFIG,
        "loss": "mean squared error of epsilon, t ~ U{0..999}",
        "weights": "EMA of training weights, fp32, diffusers save_pretrained layout",
        "params": params,
        "batch": batch,
        **trainer.sch.record(),
        "wall_time_s": round(wall, 2),
        "final_smoothed_train_loss": round(smooth, 6),
        "final_heldout_loss_ema": round(final_eval, 6),
        "heldout_eval_crops": eval_crops,
        **_machine(),
    }
    _write_json(out / "patches_train_info.json", info)
    print(
        f"[patches] done: wall {wall:.1f}s  final EMA-smoothed train loss {smooth:.5f}  "
        f"held-out loss (EMA weights, fixed noise) {final_eval:.5f}; wrote {out}",
        flush=True,
    )
    return info


# --------------------------------------------------------------------------------------------
# pusht: Diffusion Policy on the scripted expert's demonstrations
# --------------------------------------------------------------------------------------------
def pusht_windows(episodes, horizon: int, n_obs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs of every step t of every episode: observations [t-1, t] (the first
    repeated at t = 0) and the action chunk t-1 .. t+14 (indices clamped to the episode, so the
    first and last actions repeat at its ends, as Diffusion Policy's padding). Raw units:
    ([N, n_obs, 5], [N, horizon, 2]) float64."""
    import numpy as np

    obs_w, act_w = [], []
    for ep in episodes:
        T = len(ep.actions)
        t = np.arange(T)
        oi = np.clip(t[:, None] + np.arange(-(n_obs - 1), 1)[None], 0, T - 1)
        ai = np.clip(t[:, None] + np.arange(-(n_obs - 1), horizon - (n_obs - 1))[None], 0, T - 1)
        obs_w.append(ep.obs[oi])
        act_w.append(ep.actions[ai])
    return (
        torch.as_tensor(np.concatenate(obs_w), dtype=torch.float64),
        torch.as_tensor(np.concatenate(act_w), dtype=torch.float64),
    )


def _save_demos(path: Path, demos) -> None:
    import numpy as np

    np.savez_compressed(
        path,
        obs=np.concatenate([e.obs for e in demos]),
        actions=np.concatenate([e.actions for e in demos]),
        episode_ends=np.cumsum([len(e.actions) for e in demos]),
        seeds=np.array([e.seed for e in demos]),
        success=np.array([e.success for e in demos]),
        coverage=np.array([e.coverage for e in demos]),
    )
    path.chmod(0o644)


def _pusht_eps_loss(model, x0, cond, g, abar) -> torch.Tensor:
    b = x0.shape[0]
    t = torch.randint(0, abar.shape[0], (b,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = abar[t].view(b, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return (model(xt, t, obs=cond) - eps).pow(2).mean()


def train_pusht(
    steps: int = PUSHT_DEFAULT_STEPS,
    batch: int = PUSHT_DEFAULT_BATCH,
    episodes: int = PUSHT_DEFAULT_EPISODES,
    out: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    threads: int = DEFAULT_THREADS,
    lr: float = 1e-3,
    warmup: int = 300,
    final_lr_frac: float = 0.02,
    ema_decay: float = 0.999,
    grad_clip: float = 1.0,
    log_every: int = 250,
    save_demos: bool = True,
) -> dict:
    """Generate ``episodes`` expert demonstrations, train the pusht policy on them and write
    ``pusht_policy.safetensors``, ``pusht_train_info.json`` and (``save_demos``)
    ``pusht_demos.npz`` to ``out`` (default ``./specdiff_models``; ``package_dir("pusht")``
    replaces the shipped policy)."""
    from . import pusht as P

    P.require_gym_pusht()
    _check_positive(steps=steps, batch=batch, episodes=episodes, threads=threads)
    out = Path(out) if out is not None else default_out("pusht")
    hyper = dict(
        lr=lr, warmup=warmup, final_lr_frac=final_lr_frac, ema_decay=ema_decay, grad_clip=grad_clip
    )
    flags = dict(steps=steps, batch=batch, episodes=episodes, seed=seed, threads=threads)
    if hyper == _PUSHT_CLI_HYPER:
        command = reproduce_command("pusht", **flags)
    else:
        call = ", ".join(f"{k}={v!r}" for k, v in {**flags, **hyper}.items())
        command = (
            f'python -c "from specdiff_kernels.models.train import train_pusht; '
            f"train_pusht({call}, out='specdiff_models')\""
        )
    with _Deterministic(threads):
        return _train_pusht(
            out, command, steps, batch, episodes, seed, threads, log_every, save_demos, **hyper
        )


_PUSHT_CLI_HYPER = dict(lr=1e-3, warmup=300, final_lr_frac=0.02, ema_decay=0.999, grad_clip=1.0)


def _train_pusht(
    out: Path,
    command: str,
    steps: int,
    batch: int,
    episodes: int,
    seed: int,
    threads: int,
    log_every: int,
    save_demos: bool,
    *,
    lr: float,
    warmup: int,
    final_lr_frac: float,
    ema_decay: float,
    grad_clip: float,
) -> dict:

    from . import pusht as P
    from . import pusht_expert as X

    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    demos, expert = X.generate_demos(episodes, first_seed=0)
    written = [out / P.POLICY_FILE, out / P.INFO_FILE]
    if save_demos:
        written.append(out / "pusht_demos.npz")
        _save_demos(out / "pusht_demos.npz", demos)
    obs_w, act_w = pusht_windows(demos, P.HORIZON, P.N_OBS_STEPS)
    norm = P.Normalizer.fit(obs_w.numpy(), act_w.numpy())
    cond_all = norm.normalize_obs(obs_w).reshape(obs_w.shape[0], -1)
    x_all = norm.normalize_action(act_w.to(torch.float32))
    n = x_all.shape[0]

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = P.ConditionalUnet1D(**P.UNET_CONFIG)
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    params = P.count_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6)
    abar = P.pusht_alphas_cumprod().to(torch.float32)
    print(
        f"[pusht] {n} training windows from {episodes} episodes; params={params} steps={steps} "
        f"batch={batch} lr={lr} seed={seed} threads={threads}",
        flush=True,
    )
    trainer = _Trainer(
        "pusht",
        model,
        ema,
        opt,
        Schedule(steps, lr, warmup, final_lr_frac, ema_decay, grad_clip, log_every),
    )
    perm, pos = torch.randperm(n, generator=g), 0
    for step in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        trainer.step(step, _pusht_eps_loss(model, x_all[idx], cond_all[idx], g, abar))
    wall = time.perf_counter() - trainer.t0
    P.save_policy(out / P.POLICY_FILE, ema, norm, {"seed": seed, "steps": steps})
    info = {
        "command": command,
        "seed": seed,
        "data": (
            f"{episodes} episodes of the scripted expert (specdiff_kernels.models.pusht_expert), "
            f"gym-pusht PushTEnv(obs_type='state') seeds 0..{episodes - 1}; {n} windows "
            f"(obs t-1..t, action chunk t-1..t+{P.HORIZON - 2})"
        ),
        "expert": expert,
        "unet_config": P.UNET_CONFIG,
        "policy": {
            "n_obs_steps": P.N_OBS_STEPS,
            "horizon": P.HORIZON,
            "n_action_steps": P.N_ACTION_STEPS,
            "event_shape": list(P.EVENT_SHAPE),
            "obs": "normalised [agent_x, agent_y, block_x, block_y, block_angle wrapped to "
            "[goal - pi, goal + pi)] of steps t-1, t, flattened [B, 10]",
        },
        "schedule": {
            "T": P.TRAIN_TIMESTEPS,
            "beta_schedule": P.BETA_SCHEDULE,
            "prediction_type": "epsilon",
            "clip_sample": P.CLIP_SAMPLE,
        },
        "normalizer": {k: v.tolist() for k, v in norm.state_dict().items()},
        "loss": f"mean squared error of epsilon, t ~ U{{0..{P.TRAIN_TIMESTEPS - 1}}}",
        "weights": "EMA of training weights, fp32",
        "params": params,
        "batch": batch,
        **trainer.sch.record(),
        "optimizer": "AdamW(betas=(0.95, 0.999), weight_decay=1e-6)",
        "train_wall_time_s": round(wall, 2),
        "total_wall_time_s": round(time.perf_counter() - t_all, 2),
        "final_smoothed_train_loss": round(trainer.smooth, 6),
        **_machine(),
    }
    _write_json(out / P.INFO_FILE, info)
    (out / P.INFO_FILE).chmod(0o644)
    print(
        f"[pusht] done: train wall {wall:.1f}s, total {info['total_wall_time_s']}s; wrote "
        f"{', '.join(map(str, written))}",
        flush=True,
    )
    return info


def build_parser() -> argparse.ArgumentParser:
    from ..argtypes import OneLineParser, positive_int, seed_int

    ap = OneLineParser(
        prog="python -m specdiff_kernels.models.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "model",
        choices=["digits", "digits-flow", "patches", "pusht"],
        help="which embedded model family to train",
    )
    ap.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"optimizer steps (digits and digits-flow target: default {DEFAULT_TARGET_STEPS}; "
        f"patches: default {PATCHES_DEFAULT_STEPS}; pusht: default {PUSHT_DEFAULT_STEPS})",
    )
    ap.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        help=f"patches: crops per step (default {PATCHES_DEFAULT_BATCH}); pusht: action "
        f"chunks per step (default {PUSHT_DEFAULT_BATCH})",
    )
    ap.add_argument(
        "--episodes",
        type=positive_int,
        default=None,
        help=f"pusht only: expert demonstrations (env seeds 0..E-1, default "
        f"{PUSHT_DEFAULT_EPISODES})",
    )
    ap.add_argument(
        "--draft-steps",
        type=positive_int,
        default=None,
        help="digits and digits-flow: optimizer steps for the draft (default: same as --steps)",
    )
    where = ap.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=str,
        default=None,
        metavar="DIR",
        help=f"output folder (default ./{default_out('digits')} for digits and pusht, "
        f"./{default_out('patches')} for patches, in the current directory); made if missing, "
        "earlier results of the same model in it are replaced",
    )
    where.add_argument(
        "--into-package",
        action="store_true",
        help="write into the installed package's weights folder instead, replacing the shipped "
        "weights that models.load and specdiff use",
    )
    ap.add_argument("--seed", type=seed_int, default=DEFAULT_SEED, help=f"default {DEFAULT_SEED}")
    ap.add_argument(
        "--threads",
        type=positive_int,
        default=DEFAULT_THREADS,
        help=f"torch CPU threads (default {DEFAULT_THREADS}). The weights are bitwise "
        "reproducible for a fixed seed, thread count, torch version and CPU instruction set "
        "(they differ in the last bits otherwise); 2 is ~1.4x faster on an idle 2-core machine "
        "but ~10x slower when another process competes for the cores",
    )
    return ap


def _check_out(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The folder to write to, checked before minutes of training: writable, and the package's
    own weights folder only with --into-package."""
    from ..argtypes import check_dir as _check_dir

    if args.into_package:
        out, option = package_dir(args.model), "--into-package"
    else:
        out = Path(args.out) if args.out is not None else default_out(args.model)
        option = "--out"
        if out.resolve() == package_dir(args.model).resolve():
            ap.error(
                f"argument --out: {str(out)!r} is the package's own weights folder; pass "
                "--into-package to replace the shipped weights"
            )
    err = _check_dir(option, str(out))
    if err is not None:
        ap.error(err)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    is_digits = args.model in ("digits", "digits-flow")
    if not is_digits and args.draft_steps is not None:
        ap.error("argument --draft-steps: applies to digits and digits-flow only")
    if is_digits and args.batch is not None:
        ap.error("argument --batch: applies to patches and pusht only")
    if args.model != "pusht" and args.episodes is not None:
        ap.error("argument --episodes: applies to pusht only")
    if args.model == "pusht":
        from . import pusht as P

        try:
            P.require_gym_pusht()
        except ImportError as err:
            ap.error(str(err))
    out = _check_out(ap, args)
    if args.model == "pusht":
        train_pusht(
            steps=args.steps or PUSHT_DEFAULT_STEPS,
            batch=args.batch or PUSHT_DEFAULT_BATCH,
            episodes=args.episodes or PUSHT_DEFAULT_EPISODES,
            out=out,
            seed=args.seed,
            threads=args.threads,
            save_demos=not args.into_package,  # regenerated by the command; not package data
        )
    elif args.model == "patches":
        train_patches(
            steps=args.steps or PATCHES_DEFAULT_STEPS,
            batch=args.batch or PATCHES_DEFAULT_BATCH,
            out=out,
            seed=args.seed,
            threads=args.threads,
        )
    else:
        train_digits(
            steps=args.steps or DEFAULT_TARGET_STEPS,
            draft_steps=args.draft_steps,
            out=out,
            seed=args.seed,
            threads=args.threads,
            flow=args.model == "digits-flow",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end wall-clock of speculative sampling on real diffusion networks, against every
ancestral baseline a user could run (not a test).

For each cell (model, dtype, N steps, B chains), in one process:

* baselines: ``AncestralSampler`` eager and ``compile=True``; diffusers' own pipeline call
  ``pipe(batch_size=B, num_inference_steps=N, output_type="np")`` (pipeline models) and the plain
  ``scheduler.step`` loop inside it (same UNet, scheduler, steps, batch);
* ``SpeculativeSampler`` (frozen-x0 draft, prefetched root) at each window L, eager and
  ``compile=True`` (on CUDA both run the static round as a CUDA graph; the library's default
  there is compiled, on CPU eager);
* wall-clock: medians of interleaved repetitions (random order per repetition); *ratio* = wall /
  the FASTEST baseline of the same cell;
* quality beside speed: the eager speculative samples of all batches and repetitions of a
  (model, dtype, N, L), pooled, against the pooled eager ancestral samples of the same
  (model, dtype, N), two-sample p-value (:func:`specdiff_kernels.testing.two_sample.two_sample_pvalue`); every
  run has its own seed, so the pools are independent draws.

Then the cost curve that decides whether speculation can pay on a device: time of one network
call at batch b / time at batch 1 (a round of window L evaluates B (L + 1) states in one call), for
``patches``, for a ``UNet2DModel`` with the DDPM CIFAR-10 architecture (google/ddpm-cifar10-32
config, 35.7 M parameters, RANDOM weights: cost only) and for the digits MLP.

    python bench/bench_e2e.py                       # CPU: the reduced grid below, ~15 min
    python bench/bench_e2e.py --device cuda         # the full grid, fp32 and fp16
    python bench/bench_e2e.py --dry-run             # seconds: one tiny cell per model, to check the script

CPU defaults (2 shared cores: a patches UNet call costs ~9 ms at batch 1 and ~35 ms at 9, a
round at B = 16, L = 8 ~1 s, and compiling costs 15-90 s per shape): the whole grid for digits,
B = 1 and 4 for patches (B = 16 skipped), eager everywhere, compiled configurations (ancestral
and L = 8) at B = 1, N = 200 only; fp32 only. Every skipped cell is listed in the results with its
reason; ``--full`` runs everything. ``--time-budget`` skips the cells left when it is spent.
Results: ``bench/results/e2e_<device>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import _common as common
import torch

from specdiff_kernels import models
from specdiff_kernels.cli.sample import CastNet
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.testing.two_sample import two_sample_pvalue

BASELINES = ("ancestral_eager", "ancestral_compiled", "diffusers_pipe", "diffusers_step_loop")

# google/ddpm-cifar10-32's unet/config.json (the architecture of Ho et al.'s CIFAR-10 model)
CIFAR10_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-6,
    "time_embedding_type": "positional",
}


def quiet_diffusers():
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # no accelerate: every from_pretrained warns


class StepLoop:
    """The loop of ``DDPMPipeline.__call__`` without its output conversion: ``unet(x, t).sample``
    then ``scheduler.step`` per step, states in the UNet's dtype, under inference_mode."""

    def __init__(self, unet, scheduler, N: int, device):
        self.unet, self.N, self.device = unet, N, device
        self.sched = type(scheduler).from_config(scheduler.config)
        self.sched.set_timesteps(N)

    def run(self, B, shape, seed):
        g = torch.Generator(self.device).manual_seed(seed)
        x = torch.randn(B, *shape, generator=g, device=self.device, dtype=self.unet.dtype)
        with torch.inference_mode():
            for t in self.sched.timesteps:
                out = self.unet(x, t).sample
                x = self.sched.step(out, t, x, generator=g).prev_sample
        return x


class Target:
    """One model at one dtype on one device: the network the samplers call, its transitions at N
    steps and its diffusers baselines."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype):
        self.name, self.device, self.dtype = name, device, dtype
        self.pipe = None
        if name == "digits":
            self.m = models.load("digits", device=device, dtype=dtype)
            self.net = self.m.target  # casts to its weights' dtype itself
            self.event_shape = self.m.event_shape
            self.label = "digits MLP (embedded, 0.70 M parameters)"
        else:
            quiet_diffusers()
            from diffusers import DDPMPipeline

            from specdiff_kernels.integrations.diffusers import DiffusersModel

            folder = self._folder(name)
            self.pipe = DDPMPipeline.from_pretrained(
                str(folder), torch_dtype=dtype, low_cpu_mem_usage=False
            ).to(device)
            self.pipe.set_progress_bar_config(disable=True)
            self.pipe.unet.eval().requires_grad_(False)
            net = DiffusersModel(self.pipe.unet)
            self.net = net if dtype == torch.float32 else CastNet(net, dtype)
            cfg = self.pipe.unet.config
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
            self.event_shape = (cfg.in_channels, size, size)
            params = sum(p.numel() for p in self.pipe.unet.parameters()) / 1e6
            self.label = (
                f"{name} ({type(self.pipe.unet).__name__}, {params:.2f} M parameters, {folder})"
            )

    @staticmethod
    def _folder(name: str) -> Path:
        if name == "patches":
            from specdiff_kernels.models import patches

            return patches.pipeline_dir()
        return Path(name)

    @staticmethod
    def available(name: str) -> str | None:
        """None, or why the model cannot be benchmarked here."""
        if name == "digits":
            return None
        try:
            folder = Target._folder(name)
        except ImportError as err:
            return f"not in this install ({err})"
        if not (folder / "model_index.json").is_file():
            return f"no pipeline at {folder} (patches: train it with python -m specdiff_kernels.models.train patches)"
        return None

    def transitions(self, N: int):
        if self.pipe is None:
            return self.m.transitions(N)
        from specdiff_kernels.integrations.diffusers import diffusers_transitions

        return diffusers_transitions(self.pipe.scheduler, N)

    def baselines(self, N: int, with_compile: bool) -> dict:
        T = self.transitions(N)
        out = {"ancestral_eager": AncestralSampler(self.net, T)}
        if with_compile:
            out["ancestral_compiled"] = AncestralSampler(self.net, T, compile=True)
        if self.pipe is None:
            try:
                from bench_latency import DiffusersLoop

                out["diffusers_step_loop"] = DiffusersLoop(self.m, N)
            except ImportError:
                pass
        else:
            out["diffusers_pipe"] = "pipe"
            out["diffusers_step_loop"] = StepLoop(
                self.pipe.unet, self.pipe.scheduler, N, self.device
            )
        return out

    def run(self, runner, B: int, N: int, seed: int):
        """(samples or None, stats or None); the caller times it."""
        if runner == "pipe":
            g = torch.Generator(self.device).manual_seed(seed)
            self.pipe(batch_size=B, num_inference_steps=N, generator=g, output_type="np")
            return None, None
        if isinstance(runner, StepLoop):
            return runner.run(B, self.event_shape, seed), None
        if not isinstance(runner, (AncestralSampler, SpeculativeSampler)):  # bench_latency's loop
            res = runner.sample(
                B,
                self.event_shape,
                generator=torch.Generator().manual_seed(seed),
                device=self.device,
            )
            return res.samples, None
        res = runner.sample(
            B, self.event_shape, generator=torch.Generator().manual_seed(seed), device=self.device
        )
        return res.samples, res.stats


# ----------------------------------------------------------------------------- plan
def plan(args, device) -> tuple[list, list]:
    """(cells to run, skipped cells with reasons). A cell: (model, dtype, N, B, windows, compiled
    windows). Order: dtype, then N, model and B as given, so that a time budget cuts the later
    dtypes and longer schedules first."""
    cells, skipped = [], []
    cpu_reduced = device.type == "cpu" and not args.full
    present = []
    for model in args.models:
        why = Target.available(model)
        if why:
            skipped.append({"model": model, "reason": why})
        else:
            present.append(model)
    for dtype in args.dtypes:
        for N in args.steps:
            for model in present:
                if dtype == "float16" and device.type == "cpu":
                    if N == args.steps[0]:
                        skipped.append(
                            {"model": model, "dtype": dtype, "reason": "float16 runs on CUDA only"}
                        )
                    continue
                for B in args.batches:
                    windows = [L for L in args.windows if L <= N]
                    comp = (
                        []
                        if args.compile == "off"
                        else [L for L in windows if L in args.compile_windows]
                    )
                    where = {"model": model, "dtype": dtype, "N": N, "B": B}
                    if cpu_reduced and model != "digits" and B > 4:
                        skipped.append(
                            {
                                **where,
                                "reason": "CPU: each round is one UNet call on "
                                "B (L + 1) states, seconds at this batch",
                            }
                        )
                        continue
                    if comp and B not in args.compile_batches:
                        skipped.append(
                            {
                                **where,
                                "configs": "compiled",
                                "reason": f"compiled only at B in {args.compile_batches} "
                                f"(--compile-batches)",
                            }
                        )
                        comp = []
                    elif cpu_reduced and comp and N != max(args.steps):
                        skipped.append(
                            {
                                **where,
                                "configs": "compiled",
                                "reason": "CPU: 15-90 s of "
                                f"compiling per shape; compiled at N = {max(args.steps)} only",
                            }
                        )
                        comp = []
                    cells.append((model, dtype, N, B, windows, comp))
    return cells, skipped


# ----------------------------------------------------------------------------- one cell
SEED_BASE = {"ancestral": 0, "speculative": 5_000_000}


def cell_configs(target: Target, N: int, windows, comp_windows) -> dict:
    """The baselines and the speculative sampler at each window, eager and compiled."""
    T = target.transitions(N)
    cfgs = target.baselines(N, bool(comp_windows))
    for L in windows:
        cfgs[f"spec_L{L}_eager"] = SpeculativeSampler(target.net, T, window=L, compile=False)
        if L in comp_windows:
            cfgs[f"spec_L{L}_compiled"] = SpeculativeSampler(target.net, T, window=L, compile=True)
    return cfgs


def error_text(err: Exception) -> str:
    msg = str(err).strip()
    return f"{type(err).__name__}: {msg.splitlines()[0] if msg else ''}"[:300]


def run_cell(
    target: Target,
    N: int,
    B: int,
    windows,
    comp_windows,
    reps: int,
    eager_warmup_counts: bool,
    pools: dict,
) -> list:
    dev, where = target.device, f"{target.name} N={N} B={B}"
    cfgs = cell_configs(target, N, windows, comp_windows)
    counter = {n: 0 for n in cfgs}

    def once(name):
        """One timed run with its own seed; eager samples go to the quality pools."""
        kind = "ancestral" if name == "ancestral_eager" else "speculative"
        seed = SEED_BASE[kind] + 10_000 * B + counter[name]
        counter[name] += 1
        common.sync(dev)
        t0 = time.perf_counter()
        samples, st = target.run(cfgs[name], B, N, seed)
        common.sync(dev)
        wall = time.perf_counter() - t0
        if name == "ancestral_eager":
            pools.setdefault(("anc", target.name, str(target.dtype), N), []).append(
                samples.float().cpu()
            )
        elif name.startswith("spec_") and name.endswith("_eager"):
            key = ("spec", target.name, str(target.dtype), N, int(name.split("_")[1][1:]))
            pools.setdefault(key, []).append(samples.float().cpu())
        return wall, st

    stats, errors, times = {}, {}, {}
    for name in list(cfgs):  # warm-up: compile, capture, autotune
        try:
            wall, stats[name] = once(name)
        except Exception as err:  # a config that fails is reported, not fatal
            errors[name] = error_text(err)
            common.log(f"  {where} {name}: FAILED {errors[name]}")
            del cfgs[name]
            continue
        counts = eager_warmup_counts and "compiled" not in name
        times[name] = [wall] if counts else []
        common.log(
            f"  {target.name} {target.dtype} N={N} B={B} warm-up {name}: {wall:.3f} s"
            + (" (kept as a repetition)" if counts else "")
        )
    wall = common.medians(common.interleaved(lambda n: once(n)[0], cfgs, reps, times))
    fastest = min((n for n in wall if n in BASELINES), key=wall.get)
    head = {
        "model": target.name,
        "dtype": str(target.dtype).replace("torch.", ""),
        "device": str(dev),
        "N": N,
        "B": B,
    }
    rows = []
    for name in cfgs:
        st = stats.get(name)
        L = int(name.split("_")[1][1:]) if name.startswith("spec_") else None
        rows.append(
            {
                **head,
                "sampler": name,
                "L": L,
                "compiled": "compiled" in name,
                "wall_s": wall[name],
                "reps": len(times[name]),
                "ratio_vs_fastest_baseline": wall[name] / wall[fastest],
                "fastest_baseline": fastest,
                "target_calls": N if st is None else st.target_calls,
                "rounds": N if st is None else st.rounds,
                "evals_per_BN": 1.0 if st is None else st.target_evals / (B * N),
            }
        )
        common.log(
            f"  {where} {name}: wall {wall[name]:.4f} s, ratio "
            f"{rows[-1]['ratio_vs_fastest_baseline']:.3f} vs {fastest}, calls "
            f"{rows[-1]['target_calls']}"
        )
    rows += [{**head, "sampler": name, "error": msg} for name, msg in errors.items()]
    return rows


def add_quality(rows: list, pools: dict) -> list:
    """p-value of each (model, dtype, N, L) speculative pool against its ancestral pool."""
    quality = []
    for key, xs in pools.items():
        if key[0] != "spec":
            continue
        _, model, dtype, N, L = key
        anc = pools.get(("anc", model, dtype, N))
        if not anc:
            continue
        x, y = torch.cat(xs), torch.cat(anc)
        p = two_sample_pvalue(x, y) if min(len(x), len(y)) >= 2 else math.nan
        d = dtype.replace("torch.", "")
        quality.append(
            {
                "model": model,
                "dtype": d,
                "N": N,
                "L": L,
                "n_speculative": len(x),
                "n_ancestral": len(y),
                "p_value": p,
            }
        )
        for r in rows:
            if (
                (r["model"], r["dtype"], r["N"], r.get("L")) == (model, d, N, L)
                and "error" not in r
                and not r["compiled"]
            ):
                r["p_vs_ancestral"], r["p_n"] = p, (len(x), len(y))
    return quality


# ----------------------------------------------------------------------------- cost curve
def cost_curve(nets: dict, batches, reps: int, device, dtype) -> dict:
    """{name: {b: median seconds of one call at batch b}}, the b's interleaved per repetition."""
    out = {}
    for name, (net, shape) in nets.items():
        xs = {
            b: (
                torch.randn(b, *shape, device=device, dtype=dtype),
                torch.full((b,), 500, device=device),
            )
            for b in batches
        }
        inner = {}
        with torch.inference_mode():
            for b in batches:  # warm-up (cuDNN autotuning, allocator), then calibrate
                net(*xs[b])
                t1 = common.per_call(lambda: net(*xs[b]), 1, device)
                # a 0.2 ms call timed alone is mostly timer and scheduler noise: repeat to ~20 ms
                inner[b] = max(1, min(1000, round(0.02 / max(t1, 1e-6))))
            times = common.interleaved(
                lambda b: common.per_call(lambda: net(*xs[b]), inner[b], device), batches, reps
            )
        out[name] = common.medians(times)
        common.log(
            f"  cost curve {name} {dtype}: "
            + ", ".join(f"b={b}: {out[name][b] / out[name][batches[0]]:.2f}" for b in batches)
        )
    return out


def cost_nets(device, dtype, patches_trained: bool) -> tuple[dict, dict]:
    """The networks of the cost curve, called as net(x, t) -> tensor, and their labels."""
    quiet_diffusers()
    from diffusers import UNet2DModel

    from specdiff_kernels.integrations.diffusers import DiffusersModel
    from specdiff_kernels.models import patches

    nets, labels = {}, {}
    torch.manual_seed(0)
    cifar = UNet2DModel(**CIFAR10_UNET).to(device, dtype).eval().requires_grad_(False)
    n_cifar = sum(p.numel() for p in cifar.parameters())
    if patches_trained:
        pu = patches.load_pipeline(device, dtype).unet
        plabel = "patches UNet2DModel (trained weights)"
    else:
        pu = patches.build_unet(seed=0).to(device, dtype).eval().requires_grad_(False)
        plabel = "patches UNet2DModel architecture (random weights: cost only)"
    n_p = sum(p.numel() for p in pu.parameters())
    nets["patches"] = (DiffusersModel(pu), (3, 32, 32))
    labels["patches"] = f"{plabel}, {n_p / 1e6:.2f} M parameters, 3x32x32"
    nets["cifar10_ddpm_unet"] = (DiffusersModel(cifar), (3, 32, 32))
    labels["cifar10_ddpm_unet"] = (
        f"UNet2DModel with the google/ddpm-cifar10-32 architecture, "
        f"{n_cifar / 1e6:.2f} M parameters, RANDOM weights: cost only"
    )
    d = models.load("digits", device=device, dtype=dtype)
    nets["digits"] = (d.target, (1, 8, 8))
    labels["digits"] = "digits MLP (embedded), 0.70 M parameters, 1x8x8"
    return nets, labels


# ----------------------------------------------------------------------------- report
def to_markdown(meta: dict, rows: list) -> str:
    lines = [
        f"# End-to-end wall-clock: speculative vs ancestral vs diffusers ({meta['device_name']}, "
        f"{meta['device']}, {meta['threads']} threads, torch {meta['torch']}, diffusers "
        f"{meta['diffusers']})",
        "",
        f"Command: `{meta['command']}`; {meta['elapsed_s']:.0f} s; load average at start / end: "
        f"{meta['loadavg_start']} / {meta.get('loadavg_end', '-')}.",
        "",
        "Medians of interleaved repetitions (random order per repetition). *ratio* = wall / the "
        "FASTEST baseline of the same cell (ancestral eager / compiled, diffusers' `pipe(...)` "
        'with `output_type="np"`, diffusers\' `scheduler.step` loop); below 1 speculation wins. '
        "Speculative: frozen-x0 draft with a prefetched root, window L; *eager* = `compile=False`, "
        "*compiled* = `compile=True` (on CUDA both replay the static round as a CUDA graph). "
        "*calls* = sequential target calls of the batch; *evals* = target evaluations / (B N). "
        "*p* = two-sample p-value (per-coordinate KS + energy distance, Bonferroni) of the eager "
        "speculative samples of all batches and repetitions of (model, dtype, N, L) against the "
        "eager ancestral samples of (model, dtype, N), every run with its own seed (n = pool "
        "sizes). float16: the network's weights and inputs in float16; the samplers of this "
        "project keep the chain's states in float32, diffusers' `pipe(...)` and step loop run "
        "everything in float16 as diffusers does. " + meta.get("warmup_note", ""),
        "",
    ]
    for m, lab in meta.get("model_labels", {}).items():
        lines.append(f"* {m}: {lab}")
    lines.append("")
    if meta.get("skipped"):
        lines += ["Skipped (not run in this run):", ""]
        for s in meta["skipped"]:
            where = ", ".join(
                f"{k} {s[k]}" for k in ("model", "dtype", "N", "B", "configs") if k in s
            )
            lines.append(f"* {where}: {s['reason']}")
        lines.append("")
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["dtype"]), []).append(r)
    for (model, dtype), rs in groups.items():
        lines += [
            f"## {model}, {dtype}",
            "",
            "| N | B | sampler | wall [s] | ratio | calls | evals | p (n spec / anc) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            if "error" in r:
                lines.append(
                    f"| {r['N']} | {r['B']} | {r['sampler']} | failed: {r['error']} | | | | |"
                )
                continue
            p = r.get("p_vs_ancestral")
            ptxt = "-" if p is None else f"{p:.3f} ({r['p_n'][0]} / {r['p_n'][1]})"
            best = "**" if r["sampler"] == r["fastest_baseline"] else ""
            lines.append(
                f"| {r['N']} | {r['B']} | {best}{r['sampler']}{best} | {r['wall_s']:.4f} | "
                f"{r['ratio_vs_fastest_baseline']:.3f} | {r['target_calls']} | "
                f"{r['evals_per_BN']:.2f} | {ptxt} |"
            )
        lines.append("")
    cc = meta.get("cost_curve")
    if cc:
        for dtype, curves in cc.items():
            names = list(curves)
            bs = sorted({int(b) for c in curves.values() for b in c})
            lines += [
                f"## Cost curve, {dtype}: time of one call at batch b / time at batch 1",
                "",
                "| b | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names),
            ]
            for b in bs:
                cells = []
                for n in names:
                    c = curves[n]
                    t1 = c.get(1) or c.get("1")
                    tb = c.get(b) or c.get(str(b))
                    cells.append("-" if tb is None else f"{tb / t1:.2f}")
                lines.append(f"| {b} | " + " | ".join(cells) + " |")
            lines += [
                "",
                "Batch-1 call: "
                + ", ".join(
                    f"{n} {1e3 * (curves[n].get(1) or curves[n].get('1')):.2f} ms" for n in names
                ),
                "",
            ]
        lines += [
            "A round of window L evaluates B (L + 1) states in one call, so at B = 1 the "
            "speculative chain costs about (rounds / N) x t(L + 1) / t(1) of the ancestral "
            "chain's network time: speculation pays only where t(L + 1) / t(1) is well below "
            "N / calls (the *calls* column of the speculative rows).",
            "",
        ]
    return "\n".join(lines)


def plot(meta: dict, rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    for dtype, curves in (meta.get("cost_curve") or {}).items():
        for name, c in curves.items():
            bs = sorted(int(b) for b in c)
            t1 = c.get(1) or c.get("1")
            ax.plot(
                bs,
                [(c.get(b) or c.get(str(b))) / t1 for b in bs],
                marker=".",
                label=f"{name} {dtype}",
            )
    if meta.get("cost_curve"):
        b = [1, 64]
        ax.plot(b, b, "k:", lw=0.8, label="proportional to b")
        ax.axhline(1, color="k", lw=0.5)
        ax.set_xscale("log", base=2), ax.set_yscale("log", base=2)
    ax.set_xlabel("batch b"), ax.set_ylabel("t(b) / t(1)")
    ax.set_title("cost of one network call (cifar10: random weights)")
    ax.legend(fontsize=7)
    ax = axes[1]
    series = {}
    for r in rows:
        if "error" in r or r["L"] is None or r["compiled"]:
            continue
        series.setdefault((r["model"], r["dtype"], r["N"], r["B"]), []).append(
            (r["L"], r["ratio_vs_fastest_baseline"])
        )
    for (model, dtype, N, B), pts in sorted(series.items()):
        pts.sort()
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            ls="-" if model == "digits" else "--",
            label=f"{model} {dtype} N={N} B={B}",
        )
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window L"), ax.set_ylabel("wall / fastest baseline")
    ax.set_title("speculative (eager) vs the fastest ancestral baseline")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, meta: dict, rows: list) -> None:
    common.write_results(
        out,
        {"meta": meta, "rows": rows},
        to_markdown(meta, rows),
        plot=lambda png: plot(meta, rows, png),
    )


def loadavg() -> str:
    load = common.load_average()
    return " ".join(f"{v:.1f}" for v in load) if load else "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with the device's defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--models",
        nargs="+",
        default=["patches", "digits"],
        help="digits, patches, or a DDPMPipeline save_pretrained folder",
    )
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--steps", nargs="+", type=int, default=[100, 200])
    p.add_argument("--windows", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=["float32", "float16"],
        help="default: float32 (CPU), float32 float16 (CUDA)",
    )
    p.add_argument(
        "--compile",
        default="both",
        choices=["both", "off"],
        help="both: eager and compile=True configurations; off: eager only",
    )
    p.add_argument(
        "--compile-batches",
        nargs="+",
        type=int,
        default=None,
        help="batches with compiled configurations (default: all on CUDA, 1 on CPU)",
    )
    p.add_argument(
        "--compile-windows",
        nargs="+",
        type=int,
        default=[8],
        help="windows with a compiled speculative configuration (default 8: each is "
        "one more compile per cell)",
    )
    p.add_argument("--reps", type=int, default=None, help="default: 3 (CPU), 5 (CUDA)")
    p.add_argument(
        "--cost-batches",
        nargs="+",
        type=int,
        default=None,
        help="default: 1..64 (CUDA); 1 2 3 4 5 8 9 16 17 32 64 (CPU)",
    )
    p.add_argument("--cost-reps", type=int, default=None, help="default: 3 (CPU), 10 (CUDA)")
    p.add_argument("--no-cost-curve", action="store_true")
    p.add_argument("--full", action="store_true", help="CPU: no reduced grid")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; cells not started when it is spent are skipped (and listed)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="one tiny cell per model and a 3-point cost curve, to check the script",
    )
    p.add_argument("--out", default=None, help="path stem (default bench/results/e2e_<device>)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the markdown and PNG from the JSON at --out",
    )
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        common.require_cuda(p)
    args.dtypes = args.dtypes or (["float32", "float16"] if cuda else ["float32"])
    args.reps = args.reps if args.reps is not None else (5 if cuda else 3)
    if args.compile_batches is None:
        args.compile_batches = args.batches if cuda or args.full else [1]
    args.cost_reps = args.cost_reps if args.cost_reps is not None else (10 if cuda else 3)
    args.cost_batches = args.cost_batches or (
        list(range(1, 65)) if cuda else [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 64]
    )
    if args.dry_run:
        args.batches, args.steps, args.windows, args.reps = [2], [20], [4], 1
        args.cost_batches, args.cost_reps, args.compile = [1, 2, 5], 1, "off"
    return args


def run_meta(args: argparse.Namespace, argv: list[str] | None) -> dict:
    import diffusers

    cuda = args.device == "cuda"
    grid = (
        "models",
        "batches",
        "steps",
        "windows",
        "dtypes",
        "reps",
        "compile",
        "compile_batches",
        "compile_windows",
        "cost_batches",
        "cost_reps",
    )
    return {
        **common.environment(args.device, __file__, argv),
        "diffusers": diffusers.__version__,
        "loadavg_start": loadavg(),
        "elapsed_s": 0.0,
        "grid": {k: getattr(args, k) for k in grid},
        "warmup_note": (
            "Every configuration ran once first, untimed where it compiles "
            "or captures; "
            + (
                "on CUDA every warm-up is untimed."
                if cuda
                else "on CPU an eager configuration's first run counts as its first repetition."
            )
        ),
        "model_labels": {},
    }


def run_cost_curves(args: argparse.Namespace, device: torch.device, meta: dict) -> None:
    meta["cost_curve"] = {}
    patches_trained = Target.available("patches") is None
    for dtype in args.dtypes:
        if dtype == "float16" and device.type != "cuda":
            continue
        nets, labels = cost_nets(device, getattr(torch, dtype), patches_trained)
        meta["cost_curve_labels"] = labels
        meta["cost_curve"][dtype] = cost_curve(
            nets, args.cost_batches, args.cost_reps, device, getattr(torch, dtype)
        )
        del nets
    for n, lab in meta["cost_curve_labels"].items():
        meta["model_labels"][f"cost curve: {n}"] = lab


def run_cells(
    args: argparse.Namespace,
    device: torch.device,
    meta: dict,
    rows: list,
    pools: dict,
    deadline: common.Deadline,
    save,
) -> None:
    """The grid's cells, one model in memory at a time; ``save()`` after each."""
    cells, meta["skipped"] = plan(args, device)
    targets = {}
    for model, dtype, N, B, windows, comp_windows in cells:
        if deadline.spent():
            meta["skipped"].append(
                {
                    "model": model,
                    "dtype": dtype,
                    "N": N,
                    "B": B,
                    "reason": f"time budget ({args.time_budget:.0f} s) spent",
                }
            )
            continue
        key = (model, dtype)
        if key not in targets:
            targets = {key: Target(model, device, getattr(torch, dtype))}
            meta["model_labels"][model] = targets[key].label
        common.log(f"{model} {dtype} N={N} B={B} windows {windows} compiled {comp_windows}")
        rows += run_cell(
            targets[key],
            N,
            B,
            windows,
            comp_windows,
            args.reps,
            eager_warmup_counts=device.type != "cuda",
            pools=pools,
        )
        save()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        import torch._dynamo.config as dcfg

        dcfg.recompile_limit = max(dcfg.recompile_limit, 64)  # one graph per (B, L, N, dtype)
    slug = common.card_slug(common.device_name(device)) if device.type == "cuda" else "cpu"
    out = common.out_stem(args.out, f"e2e_{slug}")
    if args.report_only:
        saved = json.loads(out.with_suffix(".json").read_text())
        write(out, saved["meta"], saved["rows"])
        return 0
    meta, rows, pools = run_meta(args, argv), [], {}
    deadline = common.Deadline(args.time_budget)

    def save():
        meta["elapsed_s"], meta["loadavg_end"] = deadline.elapsed(), loadavg()
        meta["quality"] = add_quality(rows, pools)
        write(out, meta, rows)

    if not args.no_cost_curve:
        run_cost_curves(args, device, meta)
        save()
    run_cells(args, device, meta, rows, pools, deadline, save)
    save()
    print(to_markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

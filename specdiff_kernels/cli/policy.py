"""``specdiff policy``: the pusht diffusion policy in closed loop, with a chosen sampler.

Runs E episodes vectorised (E chains of one sampler: throughput), then times the planner at
batch 1 on planning inputs recorded from the first episode (latency: what a robot waits for a
chunk), next to the eager ancestral DDPM-100 baseline on the same inputs; prints success +- s.e.,
coverage, sequential calls and evaluations per chunk, wall-clock per chunk and the control rate,
and writes ``policy_pusht.json`` and ``policy_pusht.png`` (the rollouts on the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from dataclasses import asdict
from typing import Optional

from ..argtypes import positive_int, seed_int
from .output import RunOutput, check_out, policy_files

FIRST_SEED = 100_000
LATENCY_CHUNKS = 30
PLOTTED = 8  # episodes drawn in the PNG


def policy_window(text: str):
    if text in ("auto", "ancestral"):
        return text
    try:
        L = int(text)
    except ValueError:
        L = 0
    if L < 1:
        raise argparse.ArgumentTypeError(
            f"must be 'auto', 'ancestral' or a positive integer, got {text!r}"
        )
    return L


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    from ..models.pusht_loop import FAMILIES
    from ..sampling.families import canonical

    p.add_argument("--episodes", type=positive_int, default=50, help="episodes (default 50)")
    p.add_argument(
        "--sampler",
        default="ddpm",
        type=canonical,
        choices=list(FAMILIES),
        help="ddpm (default, the policy's own 100 steps), ddim (eta 0, deterministic: "
        "ancestral only) or dpm++2m-sde",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="sampling steps (default: ddpm 100, ddim and dpm++2m-sde 10; at most 100)",
    )
    p.add_argument(
        "--window",
        type=policy_window,
        default="auto",
        help="'auto' (default: chosen per round from the measured cost), a fixed draft "
        "window L, or 'ancestral' (no speculation)",
    )
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="speculative: draft each chunk's first window from the previous chunk's actions "
        "not yet executed (one sequential call fewer per chunk)",
    )
    p.add_argument(
        "--latency-chunks",
        type=int,
        default=LATENCY_CHUNKS,
        help=f"chunks timed at batch 1 (default {LATENCY_CHUNKS}; 0: none)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="sampler seed (default 0)")
    p.add_argument(
        "--first-seed",
        type=seed_int,
        default=FIRST_SEED,
        help=f"the first episode's environment seed (default {FIRST_SEED})",
    )
    p.add_argument("--weights", default=None, help="a pusht_policy.safetensors (default: shipped)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default="out", help="directory for the PNG and JSON (default ./out)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier run in --out (other files are kept)",
    )


def check_policy_args(args: argparse.Namespace) -> Optional[str]:
    from ..models.pusht import require_gym_pusht
    from ..models.pusht_loop import FAMILIES

    try:
        require_gym_pusht()
    except ImportError as err:
        return str(err)

    if args.steps is None:
        args.steps = FAMILIES[args.sampler]
    if args.steps > 100:
        return f"argument --steps: at most the policy's 100 training steps, got {args.steps}"
    if args.sampler == "ddim" and args.window != "ancestral":
        return (
            "argument --window: ddim runs eta = 0, every step deterministic: nothing to "
            "speculate over; pass --window ancestral (or --sampler ddpm / dpm++2m-sde)"
        )
    if args.warm_start and args.window == "ancestral":
        return "argument --warm-start: it drafts the speculative sampler's first window; not with --window ancestral"
    if args.latency_chunks < 0:
        return f"argument --latency-chunks: must be >= 0, got {args.latency_chunks}"
    if args.weights is not None and not os.path.isfile(args.weights):
        return f"argument --weights: {args.weights!r} is not a file"
    return check_out("--out", args.out, args.overwrite)


def run_policy(args: argparse.Namespace) -> int:
    from ..models import pusht as P
    from ..models import pusht_loop as PL
    from ..sampling.autopilot import MostlyAncestralWarning

    em = P.load_policy(args.weights)
    window = None if args.window == "ancestral" else args.window
    config = PL.PlannerConfig(args.sampler, args.steps, window, args.warm_start, args.seed)
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    print(
        f"pusht policy, {config.label()}: {args.episodes} episodes (env seeds {seeds[0]}.."
        f"{seeds[-1]}), {args.threads} thread(s)",
        flush=True,
    )
    planner = PL.ChunkPlanner(em, config)
    with warnings.catch_warnings(record=True) as seen:
        # window="auto" warns at every planning step it mostly fell back: said once, below
        warnings.simplefilter("always", MostlyAncestralWarning)
        episodes, inputs = PL.run_episodes(planner, seeds, record_inputs=args.latency_chunks)
    fell_back = sum(issubclass(w.category, MostlyAncestralWarning) for w in seen)
    for w in seen:
        if not issubclass(w.category, MostlyAncestralWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    summary = PL.summarize(episodes, planner.records)
    _print_summary(summary, args.episodes)
    if fell_back:
        print(
            f"  (window='auto' took mostly ancestral steps in {fell_back} of "
            f"{summary['planner_calls']} planning steps: at {args.episodes} chains a round's "
            "call costs too much more than one on the chains alone here)"
        )
    latency = {}
    if inputs:
        latency["run"] = PL.batch1_latency(PL.ChunkPlanner(em, config), inputs)
        base_cfg = PL.PlannerConfig("ddpm", P.TRAIN_TIMESTEPS, None, False, args.seed)
        if base_cfg != config:
            latency["ancestral DDPM-100"] = PL.batch1_latency(PL.ChunkPlanner(em, base_cfg), inputs)
        _print_latency(latency, config.label(), len(inputs))
    result = {
        "command": _command(args),
        "sampler": config.label(),
        "config": asdict(config),
        "threads": args.threads,
        "env_seeds": f"{seeds[0]}..{seeds[-1]}",
        "vectorised": summary,
        "batch1": latency,
        "episodes": PL.episode_rows(episodes),
    }
    with RunOutput(args.out, args.overwrite) as out:
        js, png = (out.path(name) for name in policy_files())
        js.write_text(json.dumps(result, indent=1))
        plot_rollouts(episodes[:PLOTTED], config.label(), png)
    print(f"wrote {js} and {png}")
    return 0


def _command(args: argparse.Namespace) -> str:
    flags = [
        f"--episodes {args.episodes}",
        f"--sampler {args.sampler}",
        f"--steps {args.steps}",
        f"--window {args.window}",
        *(["--warm-start"] if args.warm_start else []),
        f"--latency-chunks {args.latency_chunks}",
        f"--seed {args.seed}",
        f"--first-seed {args.first_seed}",
        f"--threads {args.threads}",
        *([f"--weights {args.weights}"] if args.weights else []),
    ]
    return "specdiff policy " + " ".join(flags)


def _print_summary(s: dict, episodes: int) -> None:
    print(
        f"  success {s['success_rate']:.2f} +- {s['success_se']:.2f} (s.e.)   mean final "
        f"coverage {s['mean_final_coverage']:.2f}   mean episode length {s['mean_steps']:.0f} steps"
    )
    print(
        f"  vectorised ({episodes} chains): {s['calls_per_planner_call']:.1f} sequential network "
        f"calls per planning step, {s['evals_per_chunk']:.0f} evaluations per chunk, "
        f"{s['planning_s'] / max(s['planner_calls'], 1):.2f} s per planning step"
    )


def _print_latency(latency: dict, label: str, n: int) -> None:
    print(f"  batch 1 ({n} chunks from the first episode; median wall-clock per chunk):")
    for name, lat in latency.items():
        ms = lat["median_s"] * 1e3
        print(
            f"    {label if name == 'run' else name:44s} {lat['calls_per_chunk']:6.1f} calls "
            f"{ms:8.1f} ms  -> {1e3 / ms:5.1f} chunks/s ({8e3 / ms:5.0f} actions/s)"
        )
    if "ancestral DDPM-100" in latency:
        r = latency["run"]["median_s"] / latency["ancestral DDPM-100"]["median_s"]
        print(
            f"    wall-clock per chunk: {r:.2f}x the ancestral DDPM-100's ({1 / r:.1f}x the control rate)"
        )


def plot_rollouts(episodes, label: str, path) -> None:
    """The episodes on the table: the block's path (its position) and the agent's, the start,
    final and goal poses of the T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..models.pusht import GOAL_POSE

    cols = min(4, len(episodes))
    rows = math.ceil(len(episodes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(episodes) :]:
        ax.axis("off")
    for ax, ep in zip(axes.flat, episodes):
        block, agent = np.asarray(ep.block), np.asarray(ep.agent)
        _tee(ax, GOAL_POSE, dict(color="#2ca02c", alpha=0.25, lw=0))
        _tee(ax, block[0], dict(fill=False, ec="0.55", ls="--", lw=1))
        _tee(ax, block[-1], dict(color="#1f77b4", alpha=0.55, lw=0))
        ax.plot(block[:, 0], block[:, 1], color="#1f77b4", lw=1.2, label="block")
        ax.plot(agent[:, 0], agent[:, 1], color="#d62728", lw=0.8, alpha=0.8, label="agent")
        ax.plot(*agent[0], "o", color="#d62728", ms=3)
        verdict = "success" if ep.success else "no success"
        ax.set_title(f"seed {ep.seed}: {verdict}, coverage {ep.coverage:.2f}", fontsize=8)
        ax.set_xlim(0, 512)
        ax.set_ylim(512, 0)  # the environment's image coordinates: y down
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"pusht closed loop, {label}: goal (green), start (dashed), final block (blue)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tee(ax, pose, style: dict) -> None:
    """gym-pusht's T (two boxes, scale 30) at pose (x, y, angle)."""
    import numpy as np
    from matplotlib.patches import Polygon

    s, n = 30.0, 4.0
    boxes = [
        [(-n * s / 2, s), (n * s / 2, s), (n * s / 2, 0), (-n * s / 2, 0)],
        [(-s / 2, s), (-s / 2, n * s), (s / 2, n * s), (s / 2, s)],
    ]
    x, y, a = float(pose[0]), float(pose[1]), float(pose[2])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    for box in boxes:
        pts = np.asarray(box) @ rot.T + [x, y]
        ax.add_patch(Polygon(pts, closed=True, **style))

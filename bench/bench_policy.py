"""The pusht diffusion policy in closed loop: success against wall-clock per action chunk, for
every sampler a Diffusion Policy user would run (not a test).

Every cell runs the same ``--episodes`` environment seeds vectorised (one chain per episode:
success, coverage, throughput), then is timed at batch 1 (what a robot waits for a chunk) on the
same recorded planning inputs (the first episode's observation histories and previous chunks,
from the ancestral DDPM-100 cell), at each of ``--threads``. Baselines at batch 1: this
project's eager ancestral DDPM-100 and diffusers' ``DDPMScheduler`` loop (the loop LeRobot
runs); ratios are taken against the faster of the two. The best fixed window is chosen by a
batch-1 sweep first.

    python bench/bench_policy.py                        # every cell, 100 episodes, 1 and 2 threads
    python bench/bench_policy.py --episodes 4 --latency-chunks 4 --windows 8 --out /tmp/p   # smoke
    python bench/bench_policy.py --device cuda --latency-only   # GPU: batch-1 latency cells only,
                                                               # inputs from policy_cpu.json

Writes bench/results/policy_<cpu|card>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from _common import card_slug, device_name, environment, log, out_stem, write_results

from specdiff_kernels.cli.commands import torch_threads
from specdiff_kernels.models import pusht as P
from specdiff_kernels.models import pusht_loop as PL

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "ancestral DDPM-100"
COMPILED = "ancestral DDPM-100 (torch.compile)"
DIFFUSERS = "diffusers DDPMScheduler loop (DDPM-100)"


def cells(best_L: int) -> dict[str, PL.PlannerConfig]:
    C = PL.PlannerConfig
    return {
        BASELINE: C("ddpm", 100, None),
        COMPILED: C("ddpm", 100, None, compile=True),
        "speculative DDPM-100 (auto)": C("ddpm", 100, "auto"),
        f"speculative DDPM-100 (L={best_L})": C("ddpm", 100, best_L),
        "speculative DDPM-100 (auto, warm start)": C("ddpm", 100, "auto", True),
        f"speculative DDPM-100 (L={best_L}, warm start)": C("ddpm", 100, best_L, True),
        "DDIM-10": C("ddim", 10, None),
        "DDIM-16": C("ddim", 16, None),
        "ancestral DPM++ 2M SDE-10": C("dpm++2m-sde", 10, None),
        "speculative DPM++ 2M SDE-10 (auto)": C("dpm++2m-sde", 10, "auto"),
        "ancestral DPM++ 2M SDE-20": C("dpm++2m-sde", 20, None),
        "speculative DPM++ 2M SDE-20 (auto)": C("dpm++2m-sde", 20, "auto"),
    }


class DiffusersLoop:
    """diffusers' DDPMScheduler loop over the policy's 100 steps, batch 1 (LeRobot's sampler)."""

    def __init__(self, em, device):
        from diffusers import DDPMScheduler

        self.em, self.device = em, torch.device(device)
        self.sch = DDPMScheduler(
            num_train_timesteps=P.TRAIN_TIMESTEPS,
            beta_schedule=P.BETA_SCHEDULE,
            clip_sample=True,
            clip_sample_range=P.CLIP_SAMPLE,
            prediction_type="epsilon",
        )
        self.sch.set_timesteps(P.TRAIN_TIMESTEPS)
        self.g = torch.Generator(self.device).manual_seed(0)

    @torch.inference_mode()
    def chunk(self, history: np.ndarray) -> float:
        t0 = time.perf_counter()
        cond = self.em.obs_condition(history[None]).to(self.device)
        x = torch.randn((1, *P.EVENT_SHAPE), generator=self.g, device=self.device)
        for t in self.sch.timesteps:
            eps = self.em.target(x, t.to(self.device), obs=cond)
            x = self.sch.step(eps, t, x, generator=self.g).prev_sample
        x.cpu()
        return time.perf_counter() - t0


def diffusers_latency(em, inputs, device, warmup: int = 3) -> dict:
    loop = DiffusersLoop(em, device)
    for inp in inputs[:warmup]:
        loop.chunk(inp.history)
    n = P.TRAIN_TIMESTEPS
    return PL.latency_summary([PL.PlanRecord(1, n, n, loop.chunk(i.history)) for i in inputs])


def sweep_windows(em, inputs, windows, device) -> dict:
    """Median seconds and calls per chunk at batch 1 for each fixed window (1 thread)."""
    out = {}
    for L in windows:
        planner = PL.ChunkPlanner(em, PL.PlannerConfig("ddpm", 100, L), device)
        with torch_threads(1):
            out[L] = PL.batch1_latency(planner, inputs)
        log(f"  L={L}: {out[L]['median_s'] * 1e3:.1f} ms, {out[L]['calls_per_chunk']:.1f} calls")
    return out


def record_inputs(em, seeds, n, device):
    """The first episode's planning inputs under the baseline (its own seed)."""
    planner = PL.ChunkPlanner(em, PL.PlannerConfig("ddpm", 100, None), device)
    return PL.run_episodes(planner, seeds[:1], record_inputs=n)[1]


def inputs_from_json(path: Path):
    data = json.loads(path.read_text())
    return [
        PL.PlanningInput(
            np.asarray(i["history"]),
            None if i["previous"] is None else torch.tensor(i["previous"], dtype=torch.float32),
        )
        for i in data["inputs"]
    ]


def inputs_to_json(inputs) -> list:
    return [
        {
            "history": i.history.tolist(),
            "previous": None if i.previous is None else i.previous.tolist(),
        }
        for i in inputs
    ]


def run(args) -> dict:
    device = torch.device(args.device)
    em = P.load_policy(device=device)
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    if args.latency_only:
        inputs = inputs_from_json(Path(args.inputs))[: args.latency_chunks]
    else:
        P.require_gym_pusht()
        inputs = record_inputs(em, seeds, args.latency_chunks, device)
    log(f"{len(inputs)} planning inputs; window sweep at batch 1:")
    sweep = sweep_windows(em, inputs, args.windows, device)
    best_L = min(sweep, key=lambda L: sweep[L]["median_s"])
    table = cells(best_L)
    if args.cells:
        table = {k: v for k, v in table.items() if any(c in k for c in args.cells)}
    rows = {}
    for name, cfg in table.items():
        row = {"config": asdict(cfg), "label": cfg.label()}
        # the compiled chain has the ancestral law (and recompiles as episodes end): timed only
        if not args.latency_only and name != COMPILED:
            planner = PL.ChunkPlanner(em, cfg, device)
            t0 = time.perf_counter()
            eps, _ = PL.run_episodes(planner, seeds)
            row["closed_loop"] = PL.summarize(eps, planner.records)
            row["closed_loop"]["wall_s"] = round(time.perf_counter() - t0, 2)
            row["per_episode"] = PL.episode_rows(eps)
            s = row["closed_loop"]
            log(
                f"{name}: success {s['success_rate']:.3f} +- {s['success_se']:.3f}, coverage "
                f"{s['mean_final_coverage']:.3f}, {s['planning_s']:.1f} s planning"
            )
        rows[name] = row
    # batch-1 latency, every cell and the baselines, per thread count; the baselines first and
    # again last (the machine's speed drifts over minutes)
    base = cells(best_L)[BASELINE]
    rows.setdefault(BASELINE, {"config": asdict(base), "label": base.label()})
    order = [BASELINE, *(n for n in rows if n != BASELINE), BASELINE]
    for threads in args.threads:
        key = f"batch1_{threads}t"
        for name in order:
            cfg = table.get(name, base)
            planner = PL.ChunkPlanner(em, cfg, device)
            with torch_threads(threads):
                lat = PL.batch1_latency(planner, inputs)
            rows[name].setdefault(key, []).append(lat)
        if args.diffusers and importlib.util.find_spec("diffusers") is None:
            log("note: diffusers is not installed: no diffusers baseline")
            args.diffusers = False
        if args.diffusers:
            with torch_threads(threads):
                lat = diffusers_latency(em, inputs, device)
            rows.setdefault(DIFFUSERS, {"label": DIFFUSERS})[key] = [lat]
        log(f"batch-1 latency at {threads} thread(s) done")
    return {
        "environment": environment(device, __file__, args.argv),
        "device_name": device_name(device),
        "episodes": 0 if args.latency_only else args.episodes,
        "env_seeds": f"{seeds[0]}..{seeds[-1]}",
        "threads": args.threads,
        "window_sweep": {str(k): v for k, v in sweep.items()},
        "best_L": best_L,
        "rows": rows,
        "inputs": inputs_to_json(inputs),
    }


def median_s(row: dict, threads: int) -> float:
    lats = row.get(f"batch1_{threads}t")
    return statistics.median(x["median_s"] for x in lats) if lats else math.nan


def markdown(res: dict) -> str:
    env, rows, t0 = res["environment"], res["rows"], res["threads"][0]
    fastest = min(median_s(rows[n], t0) for n in (BASELINE, COMPILED, DIFFUSERS) if n in rows)
    eager = median_s(rows[BASELINE], t0)
    lines = [
        f"# pusht policy in closed loop: success against wall-clock per chunk ({res['device_name']})",
        "",
        f"`{env['command']}` on {env['cpu']} ({env['cores']} cores), torch {env['torch']}, "
        f"{env['date']}. {res['episodes']} episodes per cell (env seeds {res['env_seeds']}), "
        "vectorised (one chain per episode); batch-1 wall-clock: median over "
        f"{len(res['inputs'])} recorded planning inputs (the baseline's: median of its runs "
        "before and after the others). Ratios against the eager ancestral chain and against the "
        f"fastest baseline (eager, torch.compile or diffusers' loop) at {t0} thread(s). Best fixed window by a batch-1 sweep: L = {res['best_L']}.",
        "",
        "| sampler | success +- s.e. | final coverage | calls / chunk (batch 1) | evals / chunk "
        "| "
        + " | ".join(f"ms / chunk, {t} thr" for t in res["threads"])
        + f" | x eager ancestral ({t0} thr) | x fastest baseline | chunks / s "
        "| vectorised s / planning step |",
        "|---|---|---|---|---|" + "---|" * len(res["threads"]) + "---|---|---|---|",
    ]
    for name, row in rows.items():
        cl = row.get("closed_loop")
        lat = row.get(f"batch1_{t0}t", [{}])[0]
        succ = f"{cl['success_rate']:.2f} +- {cl['success_se']:.2f}" if cl else "-"
        cov = f"{cl['mean_final_coverage']:.3f}" if cl else "-"
        vec = f"{cl['planning_s'] / cl['planner_calls']:.2f}" if cl else "-"
        ms = " | ".join(f"{median_s(row, t) * 1e3:.1f}" for t in res["threads"])
        m = median_s(row, t0)
        lines.append(
            f"| {name} | {succ} | {cov} | {lat.get('calls_per_chunk', math.nan):.1f} | "
            f"{lat.get('evals_per_chunk', math.nan):.0f} | {ms} | {m / eager:.2f} | {m / fastest:.2f} | "
            f"{1 / m:.1f} | {vec} |"
        )
    lines += ["", "Window sweep (speculative DDPM-100 at batch 1, 1 thread):", ""]
    lines += ["| L | ms / chunk | calls / chunk |", "|---|---|---|"]
    for L, v in res["window_sweep"].items():
        lines.append(f"| {L} | {v['median_s'] * 1e3:.1f} | {v['calls_per_chunk']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict):
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        t0 = res["threads"][0]
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        same_law = res["rows"][BASELINE].get("closed_loop")
        for name, row in res["rows"].items():
            cl = row.get("closed_loop")
            if not cl and same_law and name in (COMPILED, DIFFUSERS):
                # the ancestral chain run another way: its success, hollow
                x = median_s(row, t0) * 1e3
                ax.plot(x, same_law["success_rate"], "s", mfc="none", color="#1f77b4")
                ax.annotate(
                    f"ancestral, {'torch.compile' if name == COMPILED else 'diffusers loop'} "
                    "(same law)",
                    (x, same_law["success_rate"]),
                    fontsize=6.5,
                    xytext=(-70, -10 if name == COMPILED else -19),
                    textcoords="offset points",
                )
                continue
            if not cl:
                continue
            x = median_s(row, t0) * 1e3
            spec = "speculative" in name
            ax.errorbar(
                x,
                cl["success_rate"],
                yerr=cl["success_se"],
                fmt="o" if spec else "s",
                color="#d62728" if spec else "#1f77b4",
                capsize=3,
            )
            ax.annotate(
                name,
                (x, cl["success_rate"]),
                fontsize=6.5,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"wall-clock per action chunk at batch 1, {t0} thread(s) [ms] (log)")
        ax.set_ylabel(f"closed-loop success ({res['episodes']} episodes, +- s.e.)")
        ax.set_title(
            f"pusht diffusion policy: speculative (red) and the alternatives ({res['device_name']})",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return draw


def replot(path: Path) -> None:
    """Redraw ``path``.png from its JSON (after a change to the chart only)."""
    res = json.loads(path.with_suffix(".json").read_text())
    import matplotlib

    matplotlib.use("Agg")
    plot(res)(path.with_suffix(".png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=100_000)
    ap.add_argument("--latency-chunks", type=int, default=30)
    ap.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2])
    ap.add_argument(
        "--windows", type=lambda s: [int(t) for t in s.split(",")], default=[8, 12, 16, 24, 32]
    )
    ap.add_argument("--cells", nargs="*", default=None, help="substrings of the cells to run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latency-only", action="store_true", help="no closed loop (no gym-pusht)")
    ap.add_argument(
        "--inputs", default=str(RESULTS / "policy_cpu.json"), help="--latency-only's inputs"
    )
    ap.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    ap.add_argument("--out", default=None)
    ap.add_argument("--replot", default=None, help="a results JSON: redraw its PNG, run nothing")
    args = ap.parse_args(argv)
    if args.replot:
        replot(Path(args.replot))
        return 0
    args.argv = argv
    torch.set_num_threads(args.threads[0])
    res = run(args)
    slug = "cpu" if args.device == "cpu" else card_slug(device_name(args.device))
    stem = out_stem(args.out, f"policy_{slug}")
    write_results(stem, res, markdown(res), plot(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

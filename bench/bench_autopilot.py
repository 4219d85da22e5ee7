"""window="auto" against the ancestral chain and every fixed window, in one run (not a test).

For each cell (model, B) at N steps: the ancestral chain, the default sampler (``window="auto"``)
and the speculative sampler at every fixed L of ``--windows``, all eager (the CPU default), each
warmed up once, then timed over ``--reps`` interleaved repetitions in a random order per
repetition; medians. The default's calibration is INCLUDED in its timings: the cost models
cached in the process are dropped before each of its runs, so every timed run measures its own
(its time is also reported alone, from the run's stats). Ratios: the default's median wall over
the ancestral chain's and over the best fixed L's of the same run.

    python bench/bench_autopilot.py              # the full grid, writes bench/results/autopilot_cpu.{md,json,png}
    python bench/bench_autopilot.py --quick      # a small smoke run (bench/results/autopilot_cpu_quick.*)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import _common as common
import torch

from specdiff_kernels import models
from specdiff_kernels.sampling import sampler as sampler_mod
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.sampler import SpeculativeSampler

GRID = ["digits:1", "digits:16", "digits:64", "digits:256", "digits:1024"]
GRID += ["gmm784:1", "gmm784:64", "patches:1", "patches:4"]
WINDOWS = (1, 2, 4, 8, 12, 16, 32)


def load(name: str, N: int):
    """(network, transitions, event shape) of a cell's model."""
    if name == "patches":
        from specdiff_kernels.integrations.diffusers import from_pipeline
        from specdiff_kernels.models import patches

        pipe = patches.load_pipeline()
        net, T = from_pipeline(pipe, N)
        return net, T, (3, 32, 32)
    m = models.load("gmm", dim=int(name[3:])) if name.startswith("gmm") else models.load(name)
    return m.target, m.transitions(N), tuple(m.event_shape)


def samplers(net, T, windows) -> dict:
    out = {
        "ancestral": AncestralSampler(net, T),
        "auto": SpeculativeSampler(net, T),
        "auto_cached": SpeculativeSampler(net, T),
    }
    for L in windows:
        out[f"L={L}"] = SpeculativeSampler(net, T, window=L)
    return out


def run_once(s, B: int, shape, seed: int = 0, cached=None):
    """One timed run. "auto": its calibration is part of the run (the process's cost models are
    dropped first); "auto_cached": the cost model measured at its warm-up run (``cached``)."""
    if s.__class__ is SpeculativeSampler and getattr(s, "autopilot", False):
        sampler_mod._COSTS.clear()
        if cached is not None:
            sampler_mod._COSTS[s.model] = cached
    t0 = time.perf_counter()
    res = s.sample(B, shape, generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - t0, res.stats


def bench_cell(key: str, N: int, reps: int, windows) -> dict:
    name, B = key.split(":")[0], int(key.split(":")[1])
    net, T, shape = load(name, N)
    ss = samplers(net, T, windows)
    stats = {}
    for k, s in ss.items():  # warm-up (lazy init, allocator), kept out of the timings
        _, stats[k] = run_once(s, B, shape)
    # the cost model the cached configuration keeps: measured once, at a warm-up run
    sampler_mod._COSTS.clear()
    run_once(ss["auto_cached"], B, shape)
    cached = dict(sampler_mod._COSTS[ss["auto_cached"].model])
    auto_stats = []

    def run(k):
        wall, st = run_once(ss[k], B, shape, cached=cached if k == "auto_cached" else None)
        stats[k] = st
        if k == "auto":
            auto_stats.append(st)
        return wall

    times = common.interleaved(run, list(ss), reps)
    med = common.medians(times)
    fixed = {k: v for k, v in med.items() if k.startswith("L=")}
    best = min(fixed, key=fixed.get)
    cal = [st.autopilot["cost"]["calibration_s"] for st in auto_stats]
    hists = [st.autopilot["window_hist"] for st in auto_stats]
    anc_frac = [st.autopilot["ancestral_steps"] / (B * N) for st in auto_stats]
    return {
        "cell": key,
        "model": name,
        "B": B,
        "N": N,
        "median_s": med,
        "times_s": times,
        "calls": {k: st.target_calls for k, st in stats.items()},
        "evals": {k: st.target_evals for k, st in stats.items()},
        "best_fixed": best,
        "auto_over_ancestral": med["auto"] / med["ancestral"],
        "auto_over_best_fixed": med["auto"] / med[best],
        "cached_over_ancestral": med["auto_cached"] / med["ancestral"],
        "cached_over_best_fixed": med["auto_cached"] / med[best],
        "best_fixed_over_ancestral": med[best] / med["ancestral"],
        "calibration_s_median": statistics.median(cal),
        "calibration_fraction": statistics.median(cal) / med["auto"],
        "auto_window_hist": hists,
        "auto_ancestral_fraction": statistics.median(anc_frac),
        "auto_cost_model": auto_stats[-1].autopilot["cost"],
    }


def markdown(rows: list, meta: dict) -> str:
    lines = [
        f"# window='auto' against the ancestral chain and fixed windows ({meta['device']})",
        "",
        f"`{meta['command']}`; torch {meta['torch']}, {meta['threads']} thread(s), N = "
        f"{meta['N']}, eager, medians of {meta['reps']} interleaved repetitions; the default's "
        "calibration is included in its wall-clock (each timed run measures its own cost model).",
        "",
        "auto: `SpeculativeSampler(model, transitions)` measuring its cost model in the run; "
        "cached: the same with the cost model of an earlier run of the process (what every run "
        "after the first gets).",
        "",
        "| cell | ancestral [s] | auto [s] | auto / ancestral | cached / ancestral | best fixed L "
        "| best fixed [s] | auto / best fixed | cached / best fixed | calibration [ms] (share) "
        "| auto: ancestral steps | auto: windows chosen (rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["median_s"]
        hist = r["auto_window_hist"][-1]
        hist_s = ", ".join(f"{w}: {n}" for w, n in sorted(hist.items()))
        lines.append(
            f"| {r['cell']} | {m['ancestral']:.4f} | {m['auto']:.4f} | "
            f"{r['auto_over_ancestral']:.3f} | {r['cached_over_ancestral']:.3f} | "
            f"{r['best_fixed']} | {m[r['best_fixed']]:.4f} | {r['auto_over_best_fixed']:.3f} | "
            f"{r['cached_over_best_fixed']:.3f} | {r['calibration_s_median'] * 1e3:.2f} "
            f"({r['calibration_fraction']:.1%}) | {r['auto_ancestral_fraction']:.0%} | {hist_s} |"
        )
    lines += ["", "Every configuration's median wall-clock [s]:", ""]
    keys = list(rows[0]["median_s"]) if rows else []
    lines.append("| cell | " + " | ".join(keys) + " |")
    lines.append("|---" * (len(keys) + 1) + "|")
    for r in rows:
        lines.append(
            f"| {r['cell']} | " + " | ".join(f"{r['median_s'][k]:.4f}" for k in keys) + " |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: list, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    cells = [r["cell"] for r in rows]
    xs = range(len(cells))
    bars = (
        ("auto_over_ancestral", "auto (calibrating in the run)"),
        ("cached_over_ancestral", "auto (cost model cached)"),
        ("best_fixed_over_ancestral", "best fixed L (found by sweeping)"),
    )
    for i, (key, label) in enumerate(bars):
        ax.bar([x + (i - 1) * 0.27 for x in xs], [r[key] for r in rows], 0.27, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), cells, rotation=30, ha="right")
    ax.set_ylabel("wall-clock / ancestral chain")
    ax.set_title("window='auto' vs the ancestral chain (lower is faster)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", default=None, help="model:B (default: the full grid)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    p.add_argument("--quick", action="store_true", help="digits:1 and digits:64, N = 50, 2 reps")
    p.add_argument("--out", default=None, help="results name (default autopilot_cpu[_quick])")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cells = a.cells or (["digits:1", "digits:64"] if a.quick else GRID)
    N, reps = (50, 2) if a.quick else (a.steps, a.reps)
    rows = []
    for key in cells:
        t0 = time.perf_counter()
        rows.append(bench_cell(key, N, reps, a.windows))
        r = rows[-1]
        print(
            f"{key}: auto/ancestral {r['auto_over_ancestral']:.3f} (cached "
            f"{r['cached_over_ancestral']:.3f}), auto/best fixed "
            f"({r['best_fixed']}) {r['auto_over_best_fixed']:.3f}, calibration "
            f"{r['calibration_s_median'] * 1e3:.2f} ms [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    meta = {
        "device": f"{common.cpu_name()}, cpu",
        "torch": torch.__version__,
        "threads": a.threads,
        "N": N,
        "reps": reps,
        "command": "python bench/bench_autopilot.py " + " ".join(argv or sys.argv[1:]),
        "load_average": common.load_average(),
    }
    name = a.out or ("autopilot_cpu_quick" if a.quick else "autopilot_cpu")
    out = common.RESULTS / name
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    chart(rows, out.with_suffix(".png"))
    print(f"wrote {out}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

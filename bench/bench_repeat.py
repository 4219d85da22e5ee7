"""Does the main job tell the same truth every run? (not a test)

Runs a CLI cell in ``--runs`` fresh processes, on an idle machine and again with one busy process
beside it (a Python loop on the other core), and records per run: whether ``window="auto"``
speculated (the share of chain-steps taken as ancestral steps, the windows chosen) and the
printed wall ratio (speculative / ancestral: the median over the demo's warm interleaved pairs of
runs; also the first runs' ratio, calibration included).

    python bench/bench_repeat.py                       # the cells below, 20 runs each, idle and loaded
    python bench/bench_repeat.py --cells digits --runs 3 --out /tmp/x   # a smoke run

Writes bench/results/repeat_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (the command's arguments after `specdiff`, what it should do on this CPU)
CELLS = {
    "digits": (["demo"], "speculate"),
    # --reps 15: both samplers run the same ancestral steps here; the ratio of medians of 5
    # ~0.1 s runs moves by +-15% on this VM
    "gmm256_b16": (
        ["demo", "--model", "gmm", "--dim", "256", "--batch", "16", "--reps", "15"],
        "fall back",
    ),
    "patches_b16": (
        ["sample", "--pipeline", "patches", "--batch", "16", "--steps", "30", "--compare"]
        + ["--reps", "1"],
        "fall back",
    ),
}
RESULTS = Path(__file__).resolve().parent / "results"


def busy(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def one_run(args: list, specdiff: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        cmd = [specdiff, *args, "--no-progress", "--out", d, "--overwrite"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            return {"rc": out.returncode, "stderr": out.stderr[-2000:]}
        if args[0] == "sample":
            rec = json.loads((Path(d) / "stats.json").read_text())
        else:
            name = args[args.index("--model") + 1] if "--model" in args else "digits"
            rec = json.loads((Path(d) / f"demo_{name}_stats.json").read_text())
    anc, spec = rec["ancestral"], rec["speculative"]
    warm = rec["warm_wall_time_s"]
    ap = spec["autopilot"]
    total = spec["num_chains"] * spec["num_steps"]
    return {
        "rc": 0,
        "process_s": wall,
        "ancestral_share": ap["ancestral_steps"] / total,
        "window_hist": ap["window_hist"],
        "explored": ap.get("explored"),
        "calls_ratio": spec["target_calls"] / anc["target_calls"],
        "warm_ratio": warm["ratio"],
        "warm_s": warm,
        "first_ratio": spec["wall_time"] / anc["wall_time"],
        "calibration_ms": ap["cost"]["calibration_s"] * 1e3,
    }


def summary(runs: list, expect: str) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    spec = [r["ancestral_share"] < 0.5 for r in ok]
    ratios = [r["warm_ratio"] for r in ok]
    med = statistics.median(ratios) if ratios else float("nan")
    return {
        "runs": len(runs),
        "failed": len(runs) - len(ok),
        "speculated": sum(spec),
        "fell_back": len(ok) - sum(spec),
        "as_expected": sum(spec) if expect == "speculate" else len(ok) - sum(spec),
        "warm_ratio_median": med,
        "warm_ratio_within_15pct": sum(abs(r / med - 1) <= 0.15 for r in ratios),
        "warm_ratio_min_max": [min(ratios), max(ratios)] if ratios else None,
        "first_ratio_median": statistics.median(r["first_ratio"] for r in ok) if ok else None,
        "first_ratio_max": max(r["first_ratio"] for r in ok) if ok else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--loads", default="idle,busy")
    ap.add_argument("--out", default=str(RESULTS / "repeat_cpu"))
    a = ap.parse_args()
    specdiff = str(Path(sys.executable).with_name("specdiff"))
    result = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "cells": {}}
    for cell in a.cells.split(","):
        args, expect = CELLS[cell]
        for load in a.loads.split(","):
            stop = mp.Event()
            proc = mp.Process(target=busy, args=(stop,)) if load == "busy" else None
            if proc:
                proc.start()
            runs = []
            for i in range(a.runs):
                runs.append(one_run(args, specdiff))
                r = runs[-1]
                print(
                    f"{cell} {load} {i}: "
                    + (
                        f"ancestral {r['ancestral_share']:.0%}, warm ratio {r['warm_ratio']:.3f}, "
                        f"first {r['first_ratio']:.3f}, windows {r['window_hist']}"
                        if r["rc"] == 0
                        else f"FAILED rc={r['rc']}: {r['stderr'][-300:]}"
                    ),
                    flush=True,
                )
            if proc:
                stop.set()
                proc.join()
            s = summary(runs, expect)
            result["cells"][f"{cell}/{load}"] = {
                "command": "specdiff " + " ".join(args),
                "expect": expect,
                "summary": s,
                "runs": runs,
            }
            print(f"{cell} {load}: {s}", flush=True)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        '# Fresh-process repeatability of `window="auto"` (bench/bench_repeat.py)',
        "",
        f"`python bench/bench_repeat.py --runs {a.runs}`; {result['cpus']}-core CPU; each run a "
        "fresh process, 1 thread (the demo's default); *busy*: one Python loop on the other "
        "core. Wall ratio = speculative / ancestral, the median over the demo's warm interleaved "
        "pairs of runs (5; `specdiff sample --compare`: 3); first = the first runs' ratio (calibration "
        "included).",
        "",
        "| cell | load | expected | as expected | wall ratio median | within +-15% | min-max | first-run median (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, c in result["cells"].items():
        s = c["summary"]
        cell, load = key.split("/")
        mm = s["warm_ratio_min_max"] or [float("nan")] * 2
        lines.append(
            f"| `{c['command']}` | {load} | {c['expect']} | {s['as_expected']}/{s['runs']} | "
            f"{s['warm_ratio_median']:.3f} | {s['warm_ratio_within_15pct']}/{s['runs']} | "
            f"{mm[0]:.3f}-{mm[1]:.3f} | {s['first_ratio_median']:.3f} ({s['first_ratio_max']:.3f}) |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json, {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

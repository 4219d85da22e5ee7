"""The static round's compact network call against its full B (L + 1) call, eager on CPU (not a
test): both reach the same states (python_tests/test_sampler.py checks it round by round); the
compact call evaluates only the states a round reads, for a few more ops per round. This is the
measurement behind ``sampler.COMPACT_MIN_CHAINS_CPU``.

    python bench/bench_compact.py          # digits, N = 200, L = 8, 1 thread: bench/results/compact_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from specdiff_kernels import models
from specdiff_kernels.ops import round as round_ops
from specdiff_kernels.ops.reference import round as rr
from specdiff_kernels.sampling.static_round import StaticRound

RESULTS = Path(__file__).resolve().parent / "results"


def run_static(m, T, B: int, L: int, compact: bool, seed: int = 0) -> tuple[float, int]:
    """(wall seconds, target evaluations) of one static run, eager, on CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *m.event_shape, generator=g)
    ids = torch.arange(B, dtype=torch.int64)
    t0 = time.perf_counter()
    with torch.inference_mode():
        rnd = StaticRound(m.target, T, L, "x0", round_ops.seed_tensor(seed), ids, dtype=x.dtype,
                          compact=compact)
        s = rnd.start(x)
        while int(s.stats[rr.STAT_LIVE]) > 0:
            s = rnd.step(s)
    return time.perf_counter() - t0, rnd.target_evals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8, 16, 64])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = models.load("digits")
    T = m.transitions(args.steps)
    rows = []
    for B in args.batches:
        runs = {c: [] for c in (False, True)}
        evals = {}
        for c in runs:                                       # warm-up
            evals[c] = run_static(m, T, B, args.window, c)[1]
        for _ in range(args.reps):
            for c in random.sample(list(runs), 2):
                runs[c].append(run_static(m, T, B, args.window, c)[0])
        full, compact = (statistics.median(runs[c]) for c in (False, True))
        rows.append({"B": B, "full_s": full, "compact_s": compact, "ratio": compact / full,
                     "full_evals": evals[False], "compact_evals": evals[True]})
        print(f"B={B}: compact {compact * 1e3:.2f} ms, full {full * 1e3:.2f} ms, "
              f"compact / full {compact / full:.3f}; evaluations {evals[True]} vs {evals[False]}",
              flush=True)
    res = {"device": "cpu", "name": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
           "window": args.window, "reps": args.reps, "rows": rows}
    out = Path(args.out) if args.out else RESULTS / "compact_cpu"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = [f"# Static round: compact vs full network call (digits, cpu, {res['threads']} threads, "
             f"torch {res['torch']})", "",
             f"N = {args.steps}, L = {args.window}, eager; medians of {args.reps} interleaved "
             "repetitions; the same states either way.", "",
             "| B | full call [ms] | compact call [ms] | compact / full | evaluations full | compact |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['B']} | {r['full_s'] * 1e3:.2f} | {r['compact_s'] * 1e3:.2f} | {r['ratio']:.3f} | "
              f"{r['full_evals']} | {r['compact_evals']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

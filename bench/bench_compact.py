"""The static round's compact network call against its full B (L + 1) call, eager on CPU (not a
test): both reach the same states (python_tests/test_sampler.py checks it round by round); the
compact call evaluates only the states a round reads, for a few more ops per round. This is the
measurement behind ``sampler.COMPACT_MIN_CHAINS_CPU``.

    python bench/bench_compact.py          # digits, N = 200, L = 8, 1 thread: bench/results/compact_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as common
import torch

from specdiff_kernels import models
from specdiff_kernels.ops import round as round_ops
from specdiff_kernels.ops.layout import STAT_LIVE
from specdiff_kernels.sampling.static_round import StaticRound


def run_static(m, T, B: int, L: int, compact: bool, seed: int = 0) -> tuple[float, int]:
    """(wall seconds, target evaluations) of one static run, eager, on CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *m.event_shape, generator=g)
    ids = torch.arange(B, dtype=torch.int64)
    t0 = time.perf_counter()
    with torch.inference_mode():
        rnd = StaticRound(
            m.target, T, L, "x0", round_ops.seed_tensor(seed), ids, dtype=x.dtype, compact=compact
        )
        s = rnd.start(x)
        while int(s.stats[STAT_LIVE]) > 0:
            s = rnd.step(s)
    return time.perf_counter() - t0, rnd.target_evals


def bench_batch(m, T, B: int, L: int, reps: int) -> dict:
    """Full and compact calls at batch B: medians of interleaved repetitions after a warm-up."""
    evals = {c: run_static(m, T, B, L, c)[1] for c in (False, True)}
    times = common.interleaved(lambda c: run_static(m, T, B, L, c)[0], (False, True), reps)
    full, compact = (common.medians(times)[c] for c in (False, True))
    return {
        "B": B,
        "full_s": full,
        "compact_s": compact,
        "ratio": compact / full,
        "full_evals": evals[False],
        "compact_evals": evals[True],
    }


def to_markdown(res: dict) -> str:
    lines = [
        f"# Static round: compact vs full network call (digits, cpu, {res['threads']} threads, "
        f"torch {res['torch']})",
        "",
        f"N = {res['steps']}, L = {res['window']}, eager; medians of {res['reps']} interleaved "
        "repetitions; the same states either way.",
        "",
        "| B | full call [ms] | compact call [ms] | compact / full | evaluations full | compact |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['B']} | {r['full_s'] * 1e3:.2f} | {r['compact_s'] * 1e3:.2f} | {r['ratio']:.3f} | "
        f"{r['full_evals']} | {r['compact_evals']} |"
        for r in res["rows"]
    ]
    return "\n".join(lines) + "\n"


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
        rows.append(r := bench_batch(m, T, B, args.window, args.reps))
        common.log(
            f"B={B}: compact {r['compact_s'] * 1e3:.2f} ms, full {r['full_s'] * 1e3:.2f} ms, "
            f"compact / full {r['ratio']:.3f}; evaluations {r['compact_evals']} vs "
            f"{r['full_evals']}"
        )
    res = {
        **common.environment("cpu", __file__, argv),
        "steps": args.steps,
        "window": args.window,
        "reps": args.reps,
        "rows": rows,
    }
    common.write_results(common.out_stem(args.out, "compact_cpu"), res, to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

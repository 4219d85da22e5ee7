"""CPU microbenchmark of the fused speculative_verify op against its floor and torch.compile
(not a test).

Side by side in one run, interleaved (a fresh random order in every repetition, so that other
jobs' load falls on all of them alike), at each thread count:

* ``cpp``: ``torch.ops.specdiff.speculative_verify`` (the C++ kernel);
* ``sum``: ``x.sum()`` over a tensor of the same bytes as the op's three inputs: the floor, a
  pass that only reads them;
* ``compiled``: ``torch.compile`` of the plain PyTorch verify (ops/reference/verify.py);
* ``eager``: that reference uncompiled (with ``--eager``; slow).

Reported per implementation: the median time per call with its 20-80% quantiles and the input
bandwidth (3·B·L·D·elt bytes / median). The ratios are medians over the repetitions of each
repetition's own ratio (its calls ran seconds apart, under the same load): ``of_sum_bw`` = sum
time / cpp time (the op's bandwidth as a fraction of the sum's) and ``vs_compiled`` = compiled
time / cpp time.

    python bench/bench_verify.py                  # 1 and 2 threads, headline + sweep
    python bench/bench_verify.py --quick          # headline size (B=64, L=8, D=3072) only
    python bench/bench_verify.py --threads 1 --reps 400
    python bench/bench_verify.py --device cuda [--quick ...]   # = bench/bench_verify_cuda.py

Writes bench/results/verify_cpu.{json,md} (``--out`` for another path stem).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import _common as common
import torch

from specdiff_kernels.ops import backends
from specdiff_kernels.ops.reference import verify as reference

HEADLINE = (64, 8, 3072)
SWEEP = [
    (1, 8, 3072),
    (8, 8, 3072),
    (256, 8, 3072),
    (64, 4, 3072),
    (64, 16, 3072),
    (1, 8, 3 * 256 * 256),
    (8, 8, 4 * 64 * 64),
    (64, 8, 4 * 64 * 64),
]
SAMPLE_S = 2e-3  # each timed sample runs enough calls to last about this long


@dataclass(frozen=True)
class Case:
    B: int
    L: int
    D: int
    dtype: torch.dtype = torch.float32

    @property
    def input_bytes(self) -> int:
        return 3 * self.B * self.L * self.D * torch.empty((), dtype=self.dtype).element_size()

    def label(self) -> str:
        return f"B={self.B:4d} L={self.L:3d} D={self.D:7d}"


def make_inputs(case: Case, seed: int = 0) -> tuple:
    B, L, D = case.B, case.L, case.D
    g = torch.Generator().manual_seed(seed)
    mq = torch.randn(B, L, D, generator=g)
    mp = mq + 0.5 / D**0.5 * torch.randn(B, L, D, generator=g)
    y = mq + torch.randn(B, L, D, generator=g)
    sigma, u = torch.ones(B, L), torch.rand(B, L, generator=g)
    return tuple(t.to(case.dtype) for t in (y, mq, mp)) + (sigma, u)


def implementations(case: Case, eager: bool, compile_: bool) -> dict[str, Callable[[], object]]:
    args = make_inputs(case)
    flat = torch.randn(case.input_bytes // torch.empty((), dtype=case.dtype).element_size())
    flat = flat.to(case.dtype)
    impls = {
        "cpp": lambda: torch.ops.specdiff.speculative_verify(*args, None),
        "sum": lambda: flat.sum(),
    }
    if compile_:
        torch._dynamo.reset()  # one compile per (threads, size): Inductor bakes the thread count
        compiled = torch.compile(reference.speculative_verify, dynamic=False)
        impls["compiled"] = lambda: compiled(*args)
    if eager:
        impls["eager"] = lambda: reference.speculative_verify(*args)
    return impls


def measure(case: Case, threads: int, reps: int, eager: bool, compile_: bool) -> dict:
    times = common.interleaved_per_call(implementations(case, eager, compile_), reps, SAMPLE_S)
    row = {"B": case.B, "L": case.L, "D": case.D, "dtype": str(case.dtype).split(".")[-1]}
    row |= {"threads": threads, "bytes": case.input_bytes, "reps": reps}
    for name, ts in times.items():
        t = common.Timing.of(ts)
        row[name] = {**t.ms(), "GBps": case.input_bytes / t.median / 1e9}
    row["of_sum_bw"] = common.paired_ratio(times["sum"], times["cpp"])
    if "compiled" in times:
        row["vs_compiled"] = common.paired_ratio(times["compiled"], times["cpp"])
    if "eager" in times:
        row["vs_eager"] = common.paired_ratio(times["eager"], times["cpp"])
    return row


def describe(row: dict) -> str:
    text = (
        f"{row['threads']}t B={row['B']:4d} L={row['L']:3d} D={row['D']:7d}: "
        f"cpp {row['cpp']['ms']:.3f} ms ({row['cpp']['GBps']:.1f} GB/s) | "
        f"sum {row['sum']['ms']:.3f} ms | cpp of sum BW {row['of_sum_bw']['median']:.2f}"
    )
    if "vs_compiled" in row:
        text += (
            f" | compiled {row['compiled']['ms']:.3f} ms, cpp x{row['vs_compiled']['median']:.2f}"
        )
    return text


def _ratio_cell(r: dict | None) -> str:
    return "-" if r is None else f"{r['median']:.2f} ({r['q20']:.2f}-{r['q80']:.2f})"


def _time_cell(t: dict | None) -> str:
    return "-" if t is None else f"{t['ms']:.3f} ({t['q20']:.3f}-{t['q80']:.3f})"


def to_markdown(meta: dict, rows: list[dict]) -> str:
    load = meta.get("load_average") or []
    lines = [
        f"# speculative_verify on CPU ({meta['cpu']}, {meta['cores']} cores)",
        "",
        f"torch {meta['torch']}, C++ kernels' ISA `{meta['cpu_capability']}`. Load average when "
        f"the run started: {', '.join(f'{v:.2f}' for v in load) or '-'} (other jobs share the "
        "cores: the quantiles show the spread). Command: "
        f"`{meta['command']}`",
        "",
        "Times: median ms per call (20-80% quantiles). `sum`: `x.sum()` over the op's input bytes "
        "(the read floor). Ratios: median over the repetitions of each repetition's ratio "
        "(20-80%): `of sum BW` = sum time / cpp time, `vs compiled` = compiled time / cpp time.",
        "",
        "| threads | B | L | D | cpp ms | cpp GB/s | sum ms | compiled ms | of sum BW | "
        "vs compiled | reps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['B']} | {r['L']} | {r['D']} | {_time_cell(r['cpp'])} | "
            f"{r['cpp']['GBps']:.1f} | {_time_cell(r['sum'])} | "
            f"{_time_cell(r.get('compiled'))} | {_ratio_cell(r['of_sum_bw'])} | "
            f"{_ratio_cell(r.get('vs_compiled'))} | {r['reps']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda runs bench/bench_verify_cuda.py with the remaining arguments",
    )
    ap.add_argument("--quick", action="store_true", help="headline size only")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    ap.add_argument("--eager", action="store_true", help="also time the uncompiled reference")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    ap.add_argument("--reps", type=int, default=200, help="repetitions at the headline size")
    ap.add_argument("--sweep-reps", type=int, default=40, help="repetitions at each sweep size")
    ap.add_argument(
        "--out", default=None, help="output path stem (default: bench/results/verify_cpu)"
    )
    args = ap.parse_args(argv)
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        ap.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    known, rest = pre.parse_known_args(argv)
    if known.device == "cuda":  # the GPU benchmark lives in its own script (Triton, do_bench)
        from bench_verify_cuda import main as cuda_main

        return cuda_main(["--device", "cuda", *rest])
    args = parse_args(argv)
    meta = common.environment("cpu", __file__, argv)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        sizes = [(HEADLINE, args.reps)] + [(s, args.sweep_reps) for s in SWEEP] * (not args.quick)
        for (B, L, D), reps in sizes:
            rows.append(measure(Case(B, L, D), threads, reps, args.eager, not args.no_compile))
            common.log(describe(rows[-1]))
    meta |= {
        "threads": args.threads,
        "cpu_capability": backends._C.cpu_capability() if backends.HAS_CPP else None,
        "build_info": backends._C.build_info() if backends.HAS_CPP else None,
        "summary_headline": {
            f"{r['threads']}t": {k: r[k]["median"] for k in ("of_sum_bw", "vs_compiled") if k in r}
            for r in rows
            if (r["B"], r["L"], r["D"]) == HEADLINE
        },
    }
    common.write_results(
        common.out_stem(args.out, "verify_cpu"),
        {"meta": meta, "rows": rows},
        to_markdown(meta, rows),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

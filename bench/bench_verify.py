"""CPU microbenchmark of the fused speculative_verify op (not a test).

Compares the C++ kernel against the eager PyTorch reference and torch.compile(reference), reports
median time, effective bandwidth (3·B·L·D·elt bytes read / time) and the fraction of this machine's
read bandwidth, measured in the same run with a large ``x.sum()``.

    python bench/bench_verify.py            # headline size + sweep, writes bench/results/verify_cpu.{json,md}
    python bench/bench_verify.py --quick    # headline size only
    python bench/bench_verify.py --device cuda [--quick ...]   # = bench/bench_verify_cuda.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

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
    (256, 16, 4 * 64 * 64),
]
READ_NUMEL = 1 << 27  # 512 MiB of fp32: far beyond the caches


def make_inputs(B: int, L: int, D: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mq = torch.randn(B, L, D, generator=g).to(dtype)
    mp = (mq.float() + 0.5 / D**0.5 * torch.randn(B, L, D, generator=g)).to(dtype)
    y = (mq.float() + torch.randn(B, L, D, generator=g)).to(dtype)
    sigma = torch.ones(B, L)
    u = torch.rand(B, L, generator=g)
    return y, mq, mp, sigma, u


def bench_size(B: int, L: int, D: int, read_bw: float, dtype=torch.float32, compiled=None) -> dict:
    args = make_inputs(B, L, D, dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = 3 * B * L * D * elt
    row = {"B": B, "L": L, "D": D, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes}
    impls = {
        "cpp": lambda: torch.ops.specdiff.speculative_verify(*args, None),
        "eager_reference": lambda: reference.speculative_verify(*args),
    }
    if compiled is not None:
        impls["compiled_reference"] = lambda: compiled(*args)
    for name, fn in impls.items():
        t = common.time_cpu(fn)
        row[name] = {
            **dataclasses.asdict(t),
            "ms": t.median * 1e3,
            "GBps": nbytes / t.median / 1e9,
            "frac_read_bw": nbytes / t.median / read_bw,
        }
    row["speedup_vs_eager"] = row["eager_reference"]["median"] / row["cpp"]["median"]
    if "compiled_reference" in row:
        row["speedup_vs_compiled"] = row["compiled_reference"]["median"] / row["cpp"]["median"]
    return row


def describe(row: dict) -> str:
    cpp = row["cpp"]
    text = (
        f"B={row['B']:4d} L={row['L']:3d} D={row['D']:7d}: cpp {cpp['ms']:8.3f} ms "
        f"({cpp['GBps']:6.1f} GB/s, {100 * cpp['frac_read_bw']:4.0f}% of read BW) "
        f"| eager {row['eager_reference']['ms']:8.3f} ms (x{row['speedup_vs_eager']:.1f})"
    )
    if "compiled_reference" in row:
        text += (
            f" | compiled {row['compiled_reference']['ms']:8.3f} ms "
            f"(x{row['speedup_vs_compiled']:.2f})"
        )
    return text


def to_markdown(meta: dict, rows: list[dict]) -> str:
    load = meta.get("load_average") or meta.get("load_average_at_start") or []
    lines = [
        f"# speculative_verify on CPU ({meta['cpu']}, {meta['threads']} threads)",
        "",
        f"Load average when the run started: {', '.join(f'{v:.2f}' for v in load) or '-'}.",
        "",
        f"torch {meta['torch']}; measured read bandwidth (x.sum over 512 MiB fp32): "
        f"{meta['read_bw_GBps']:.1f} GB/s. Command: `{meta['command']}`",
        "",
        "| B | L | D | dtype | C++ ms | C++ GB/s | % read BW | eager ms | compiled ms | "
        "× eager | × compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        comp = r.get("compiled_reference")
        lines.append(
            f"| {r['B']} | {r['L']} | {r['D']} | {r['dtype']} | {r['cpp']['ms']:.3f} | "
            f"{r['cpp']['GBps']:.1f} | {100 * r['cpp']['frac_read_bw']:.0f}% | "
            f"{r['eager_reference']['ms']:.3f} | "
            + (
                f"{comp['ms']:.3f} | {r['speedup_vs_eager']:.1f} | {r['speedup_vs_compiled']:.2f} |"
                if comp
                else f"- | {r['speedup_vs_eager']:.1f} | - |"
            )
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
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads")
    ap.add_argument(
        "--out",
        default=None,
        help="output path stem (default: bench/results/verify_cpu_<threads>t)",
    )
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    known, rest = pre.parse_known_args(argv)
    if known.device == "cuda":  # the GPU benchmark lives in its own script (Triton, do_bench)
        from bench_verify_cuda import main as cuda_main

        return cuda_main(["--device", "cuda", *rest])
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    read_bw = common.read_bandwidth(
        "cpu", READ_NUMEL, lambda fn: common.time_cpu(fn, min_run_time=1.0)
    )
    compiled = (
        None if args.no_compile else torch.compile(reference.speculative_verify, dynamic=False)
    )
    rows = []
    for B, L, D in [HEADLINE] + ([] if args.quick else SWEEP):
        torch._dynamo.reset()
        rows.append(bench_size(B, L, D, read_bw, compiled=compiled))
        common.log(describe(rows[-1]))
    meta = {
        **common.environment("cpu", __file__, argv),
        "read_bw_GBps": read_bw / 1e9,
        "build_info": backends._C.build_info() if backends.HAS_CPP else None,
    }
    common.write_results(
        common.out_stem(args.out, f"verify_cpu_{args.threads}t"),
        {"meta": meta, "rows": rows},
        to_markdown(meta, rows),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host (Python) cost of launching the verify op, level by level (not a test).

For small windows the GPU work of speculative_verify takes a few microseconds, so what a caller
waits for is the launch path: argument checks, the dispatcher, the ``triton_op`` machinery, the
autotuner's key lookup and Triton's own launcher. This times N back-to-back calls of each layer
(host time per call; the GPU queue is drained before and after) so the cost of each layer is the
difference between neighbouring rows, and compares with PyTorch's own launch of a trivial kernel
and with replaying the op from a CUDA graph.

    python bench/bench_launch_overhead.py            # CUDA
    python bench/bench_launch_overhead.py --dry-run  # CPU, Triton interpreter: checks the script

Writes bench/results/launch_overhead_<card>.json and .md (``--out`` overrides the stem).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import specdiff_kernels as sk  # noqa: E402
from bench_results import write_results  # noqa: E402
from bench_verify_cuda import card_slug, make_inputs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def host_us(fn, n: int, sync) -> float:
    """Median over 5 rounds of the host time per call of n back-to-back calls."""
    fn()
    sync()
    rounds = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
        sync()
    return statistics.median(rounds)


_NOOP = []


def _noop_op():
    """A torch.library.custom_op with the verify op's signature whose body only allocates the
    outputs: the cost of the custom-op dispatch itself."""
    if not _NOOP:
        @torch.library.custom_op("specdiff_bench::noop_verify", mutates_args=())
        def noop(y: torch.Tensor, mq: torch.Tensor, mp: torch.Tensor, sigma: torch.Tensor,
                 u: torch.Tensor, n: torch.Tensor | None = None, strategy: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            B, L = y.shape[:2]
            return (torch.empty(B, device=y.device, dtype=torch.int64),
                    torch.empty((B, *y.shape[2:]), device=y.device, dtype=y.dtype),
                    torch.empty(B, L, device=y.device))
        _NOOP.append(noop)
    return _NOOP[0]


def layers(B, L, D, device):
    from specdiff_kernels.ops.triton import verify_register as triton_backend  # noqa: F401  (registers the ops)
    from specdiff_kernels.ops.triton import verify as tk
    y, mq, mp, sigma, u = make_inputs(B, L, D, torch.float32, device)
    nacc = torch.empty(B, device=device, dtype=torch.int64)
    out = torch.empty(B, D, device=device)
    lr = torch.empty(B, L, device=device)
    if tk.INTERPRET:
        fixed = dict(tk._FIXED_STREAM)
    else:  # the config the kernels use with autotuning off
        cfg = tk.DEFAULT_STREAM_CONFIG
        fixed = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    sig_sb, sig_sl = sigma.stride()
    raw_args = (y, mq, mp, sigma, u, y, nacc, out, lr, L, D, sig_sb, sig_sl, 1)
    consts = {"MODE": tk.MODE_VERIFY, "HAS_N": False, "ACC_FP64": False}
    yield "torch: x.add_(1) (PyTorch's own launch)", lambda: out.add_(1.0)
    yield "torch: 3 x torch.empty", lambda: (torch.empty(B, device=device),
                                             torch.empty(B, D, device=device),
                                             torch.empty(B, L, device=device))
    yield "triton: raw JIT launch, per_chain kernel", \
        lambda: tk._per_chain_raw[(B,)](*raw_args, **consts, **fixed)
    if not tk.INTERPRET:
        yield "triton: autotuner launch (key lookup), per_chain kernel", \
            lambda: tk._per_chain_kernel[(B,)](*raw_args, **consts)
    yield "launcher: triton_kernels.speculative_verify, per_chain", \
        lambda: tk.speculative_verify(y, mq, mp, sigma, u, None, "per_chain")
    yield "launcher: triton_kernels.speculative_verify, split", \
        lambda: tk.speculative_verify(y, mq, mp, sigma, u, None, "split")
    op = torch.ops.specdiff.triton_speculative_verify.default
    yield "custom_op dispatch alone: a no-op op, same signature (3 x torch.empty)", \
        lambda: _noop_op()(y, mq, mp, sigma, u, None, "per_chain")
    yield "op: torch.ops.specdiff.triton_speculative_verify, per_chain", \
        lambda: op(y, mq, mp, sigma, u, None, "per_chain")
    yield "op: torch.ops.specdiff.triton_speculative_verify, auto", \
        lambda: op(y, mq, mp, sigma, u, None, "auto")
    if hasattr(torch.ops.specdiff, "speculative_verify"):
        yield "op: torch.ops.specdiff.speculative_verify (dispatcher -> Triton)", \
            lambda: torch.ops.specdiff.speculative_verify(y, mq, mp, sigma, u, None)
    yield "public: specdiff_kernels.speculative_verify (checks + backend)", \
        lambda: sk.speculative_verify(y, mq, mp, sigma, u)
    if device.type == "cuda":
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            op(y, mq, mp, sigma, u, None, "auto")
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g):
            op(y, mq, mp, sigma, u, None, "auto")
        yield "graph: CUDAGraph.replay() of the auto op", g.replay


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--calls", type=int, default=200, help="back-to-back calls per round")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        device, name, n = torch.device("cpu"), "cpu-interpreter-dry-run", 3
        sizes = [(1, 2, 300)]
        sync = lambda: None  # noqa: E731
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run to check the script on CPU", file=sys.stderr)
            return 2
        device, name, n = torch.device("cuda"), torch.cuda.get_device_name(), args.calls
        sizes = [(1, 8, 3 * 32 * 32), (1, 8, 3 * 256 * 256)]
        sync = torch.cuda.synchronize
    rows = []
    for B, L, D in sizes:
        for label, fn in layers(B, L, D, device):
            us = host_us(fn, n, sync)
            rows.append({"B": B, "L": L, "D": D, "layer": label, "host_us_per_call": us})
            print(f"B={B} L={L} D={D:7d} {label:70s} {us:8.1f} us", flush=True)
    import triton
    meta = {"device_name": name, "torch": torch.__version__, "triton": triton.__version__,
            "calls_per_round": n, "dry_run": args.dry_run,
            "command": "python bench/bench_launch_overhead.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out) if args.out else RESULTS / f"launch_overhead_{card_slug(name)}"
    write_results(out, meta, rows, to_markdown)
    return 0


def to_markdown(meta, rows) -> str:
    lines = [f"# Launch cost of speculative_verify on {meta['device_name']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}. Host time per call of "
             f"{meta['calls_per_round']} back-to-back calls (median of 5 rounds); fp32 inputs. "
             f"Command: `{meta['command']}`", ""]
    if meta.get("dry_run"):
        lines += ["**Dry run on CPU through the Triton interpreter: meaningless numbers.**", ""]
    lines += ["| B | L | D | layer | µs / call |", "|---|---|---|---|---|"]
    lines += [f"| {r['B']} | {r['L']} | {r['D']} | {r['layer']} | {r['host_us_per_call']:.1f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

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
import sys

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import _common as common  # noqa: E402
import torch  # noqa: E402
from bench_verify_cuda import make_inputs  # noqa: E402

import specdiff_kernels as sk  # noqa: E402

ROUNDS = 5


def host_us(fn, calls: int, device: torch.device) -> float:
    """Median over ROUNDS rounds of the host time per call of ``calls`` back-to-back calls."""
    fn()
    rounds = [common.per_call(fn, calls, device, host_only=True) for _ in range(ROUNDS)]
    return common.Timing.of(rounds).median * 1e6


_NOOP = []


def _noop_op():
    """A torch.library.custom_op with the verify op's signature whose body only allocates the
    outputs: the cost of the custom-op dispatch itself."""
    if not _NOOP:

        @torch.library.custom_op("specdiff_bench::noop_verify", mutates_args=())
        def noop(
            y: torch.Tensor,
            mq: torch.Tensor,
            mp: torch.Tensor,
            sigma: torch.Tensor,
            u: torch.Tensor,
            n: torch.Tensor | None = None,
            strategy: str = "auto",
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            B, L = y.shape[:2]
            return (
                torch.empty(B, device=y.device, dtype=torch.int64),
                torch.empty((B, *y.shape[2:]), device=y.device, dtype=y.dtype),
                torch.empty(B, L, device=y.device),
            )

        _NOOP.append(noop)
    return _NOOP[0]


def layers(B, L, D, device):
    from specdiff_kernels.ops.triton import verify as tk  # (registers the ops)

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
    yield (
        "torch: 3 x torch.empty",
        lambda: (
            torch.empty(B, device=device),
            torch.empty(B, D, device=device),
            torch.empty(B, L, device=device),
        ),
    )
    yield (
        "triton: raw JIT launch, per_chain kernel",
        lambda: tk._per_chain_raw[(B,)](*raw_args, **consts, **fixed),
    )
    if not tk.INTERPRET:
        yield (
            "triton: autotuner launch (key lookup), per_chain kernel",
            lambda: tk._per_chain_kernel[(B,)](*raw_args, **consts),
        )
    yield (
        "launcher: triton_kernels.speculative_verify, per_chain",
        lambda: tk.speculative_verify(y, mq, mp, sigma, u, None, "per_chain"),
    )
    yield (
        "launcher: triton_kernels.speculative_verify, split",
        lambda: tk.speculative_verify(y, mq, mp, sigma, u, None, "split"),
    )
    op = torch.ops.specdiff.triton_speculative_verify.default
    yield (
        "custom_op dispatch alone: a no-op op, same signature (3 x torch.empty)",
        lambda: _noop_op()(y, mq, mp, sigma, u, None, "per_chain"),
    )
    yield (
        "op: torch.ops.specdiff.triton_speculative_verify, per_chain",
        lambda: op(y, mq, mp, sigma, u, None, "per_chain"),
    )
    yield (
        "op: torch.ops.specdiff.triton_speculative_verify, auto",
        lambda: op(y, mq, mp, sigma, u, None, "auto"),
    )
    if hasattr(torch.ops.specdiff, "speculative_verify"):
        yield (
            "op: torch.ops.specdiff.speculative_verify (dispatcher -> Triton)",
            lambda: torch.ops.specdiff.speculative_verify(y, mq, mp, sigma, u, None),
        )
    yield (
        "public: specdiff_kernels.speculative_verify (checks + backend)",
        lambda: sk.speculative_verify(y, mq, mp, sigma, u),
    )
    if device.type == "cuda":
        yield (
            "graph: CUDAGraph.replay() of the auto op",
            common.cuda_graph(lambda: op(y, mq, mp, sigma, u, None, "auto"), warmup=1),
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--calls", type=int, default=200, help="back-to-back calls per round")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        device, name, calls = torch.device("cpu"), "cpu-interpreter-dry-run", 3
        sizes = [(1, 2, 300)]
    else:
        common.require_cuda(ap, ": use --dry-run to check the script on CPU")
        device, name, calls = torch.device("cuda"), torch.cuda.get_device_name(), args.calls
        sizes = [(1, 8, 3 * 32 * 32), (1, 8, 3 * 256 * 256)]
    import triton  # noqa: F401  (its version goes into the environment)

    rows = []
    for B, L, D in sizes:
        for label, fn in layers(B, L, D, device):
            us = host_us(fn, calls, device)
            rows.append({"B": B, "L": L, "D": D, "layer": label, "host_us_per_call": us})
            common.log(f"B={B} L={L} D={D:7d} {label:70s} {us:8.1f} us")
    meta = {
        **common.environment(device, __file__, argv),
        "device_name": name,
        "calls_per_round": calls,
        "dry_run": args.dry_run,
    }
    common.write_results(
        common.out_stem(args.out, f"launch_overhead_{common.card_slug(name)}"),
        {"meta": meta, "rows": rows},
        to_markdown(meta, rows),
    )
    return 0


def to_markdown(meta, rows) -> str:
    lines = [
        f"# Launch cost of speculative_verify on {meta['device_name']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}. Host time per call of "
        f"{meta['calls_per_round']} back-to-back calls (median of {ROUNDS} rounds); fp32 inputs. "
        f"Command: `{meta['command']}`",
        "",
    ]
    if meta.get("dry_run"):
        lines += ["**Dry run on CPU through the Triton interpreter: meaningless numbers.**", ""]
    lines += ["| B | L | D | layer | µs / call |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['B']} | {r['L']} | {r['D']} | {r['layer']} | {r['host_us_per_call']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""GPU microbenchmark of the fused speculative_verify op (not a test).

Triton (automatic strategy, and each strategy forced) vs the eager PyTorch reference vs
torch.compile(reference), timed with ``triton.testing.do_bench`` (median and 20/80% quantiles).
Reports effective bandwidth 3·B·L·D·elt bytes read / time and its fraction of the device copy
bandwidth, measured in the same run with a large ``dst.copy_(src)`` (read + write bytes counted).

    python bench/bench_verify_cuda.py --device cuda               # full sweep (B, L, D grid)
    python bench/bench_verify_cuda.py --device cuda --quick       # a few sizes
    python bench/bench_verify_cuda.py --device cuda --dtype bfloat16 --no-compile
    python bench/bench_verify_cuda.py --dry-run                   # no GPU: the script's logic on
                                                                  # CPU (Triton interpreter, tiny
                                                                  # sizes, meaningless numbers)

Writes bench/results/verify_cuda_<cardname>.json and .md (``--out`` overrides the stem). Each row
also records which strategy the automatic rule picked and how many chains' accept counts differ
from the reference (near-threshold ties only; expected 0 almost always), so the launch rule
(``choose_strategy`` in specdiff_kernels/ops/triton/verify.py) can be re-tuned from the
per-strategy timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import _common as common  # noqa: E402
import torch  # noqa: E402
from _common import card_slug  # noqa: E402  (bench/gpu_checks.sh imports it from here)

from specdiff_kernels.ops.reference import verify as reference  # noqa: E402

SWEEP_B = (1, 8, 64, 256)
SWEEP_L = (4, 8, 16)
SWEEP_D = (3 * 32 * 32, 4 * 64 * 64, 3 * 256 * 256)
QUICK = [(1, 8, 3 * 32 * 32), (1, 8, 3 * 256 * 256), (64, 8, 4 * 64 * 64), (256, 16, 3 * 32 * 32)]
DRY = [(1, 2, 300), (3, 2, 700), (8, 4, 96)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- timing
def bench(fn, device: torch.device) -> dict:
    """Median and 20/80% quantiles in ms; one untimed call first (compile, autotune). A dry run
    on CPU times a few plain calls (do_bench needs a GPU)."""
    t = common.time_cuda(fn) if device.type == "cuda" else common.time_calls(fn)
    return t.ms("_ms")


def copy_bandwidth(device: torch.device, numel: int) -> float:
    """Bytes/s of a large ``dst.copy_(src)``, counting read + write bytes."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * numel * 4 / (bench(lambda: dst.copy_(src), device)["ms"] * 1e-3)


# ---------------------------------------------------------------- inputs
def make_inputs(B: int, L: int, D: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A draft near the target: ||d|| / s = 1, so about 60% of the steps are accepted."""
    g = torch.Generator(device=device).manual_seed(seed)
    mq = torch.randn(B, L, D, generator=g, device=device, dtype=dtype)
    mp = mq + (torch.randn(B, L, D, generator=g, device=device, dtype=dtype) / math.sqrt(D))
    y = mq + torch.randn(B, L, D, generator=g, device=device, dtype=dtype)
    sigma = torch.ones(B, L, device=device)
    u = torch.rand(B, L, generator=g, device=device)
    return y, mq, mp, sigma, u


def reference_fits(B: int, L: int, D: int, elt: int, device: torch.device) -> bool:
    """The eager reference upcasts and materialises d, r and two products: ~8 fp32 copies."""
    if device.type != "cuda":
        return True
    need = B * L * D * (3 * elt + 8 * 4)
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.85 * free


# ---------------------------------------------------------------- one size
def bench_size(B, L, D, dtype, device, copy_bw, compiled) -> dict:
    from specdiff_kernels.ops.triton import verify as tk

    args = make_inputs(B, L, D, dtype, device)
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = 3 * B * L * D * elt
    row = {
        "B": B,
        "L": L,
        "D": D,
        "dtype": str(dtype).replace("torch.", ""),
        "bytes_read": nbytes,
        "auto_strategy": tk.choose_strategy(B, L, D, tk.num_sms(device), elt),
    }
    op = torch.ops.specdiff.triton_speculative_verify.default
    # "auto" launches exactly the kernels of the strategy it picks: its time is that strategy's.
    impls = {
        "triton_per_chain": lambda: op(*args, None, "per_chain"),
        "triton_split": lambda: op(*args, None, "split"),
    }
    fits = reference_fits(B, L, D, elt, device)
    if fits:
        impls["eager_reference"] = lambda: reference.speculative_verify(*args)
        if compiled is not None:
            impls["compiled_reference"] = lambda: compiled(*args)
    else:
        row["reference_skipped"] = "inputs too large for the reference's fp32 temporaries"
    for name, fn in impls.items():
        t = bench(fn, device)
        gbps = nbytes / (t["ms"] * 1e-3) / 1e9
        row[name] = {**t, "GBps": gbps, "frac_copy_bw": gbps * 1e9 / copy_bw}
    row["triton"] = dict(row[f"triton_{row['auto_strategy']}"])
    if device.type == "cuda":
        # Kernel time without the Python launch path (triton_op dispatch, autotuner lookup): the
        # op replayed from a CUDA graph. What a sampler that captures its verify step would see.
        import triton.testing

        for strat in ("per_chain", "split"):
            row[f"{strat}_graph_ms"] = triton.testing.do_bench_cudagraph(
                lambda: op(*args, None, strat), rep=20
            )
        row["triton_cudagraph_ms"] = row[f"{row['auto_strategy']}_graph_ms"]
        # Host time per call, back to back without synchronising: the launch path's own cost.
        row["triton_host_us_per_call"] = 1e6 * common.per_call(
            lambda: op(*args, None, "auto"), 50, device, host_only=True
        )
    for ref_name in ("eager_reference", "compiled_reference"):
        if ref_name in row:
            row[f"speedup_vs_{ref_name.split('_')[0]}"] = row[ref_name]["ms"] / row["triton"]["ms"]
    if fits:  # sanity: the accept counts agree with the reference (up to threshold ties)
        got = op(*args, None, "auto")[0]
        want = reference.speculative_verify(*args)[0]
        row["num_accepted_mismatches"] = int((got != want).sum())
    return row


# ---------------------------------------------------------------- report
def _cell(row, name, key="ms", fmt="{:.3f}"):
    return fmt.format(row[name][key]) if name in row else "-"


def _rule_now(meta: dict, row: dict) -> str:
    """What the current launch rule picks for the row's size (on the run's device)."""
    from specdiff_kernels.ops.triton import verify as tk

    if not meta.get("num_sms"):
        return row["auto_strategy"]
    elt = torch.empty((), dtype=DTYPES[meta["dtype"]]).element_size()
    return tk.choose_strategy(row["B"], row["L"], row["D"], meta["num_sms"], elt)


def _auto_cell(meta: dict, row: dict) -> str:
    now = _rule_now(meta, row)
    return (
        row["auto_strategy"] if now == row["auto_strategy"] else f"{row['auto_strategy']} → {now}"
    )


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# speculative_verify on {meta['device_name']} ({meta['dtype']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}; copy bandwidth (`copy_` of "
        f"{meta['copy_numel'] * 4 / 2**20:.0f} MiB fp32, read + write): "
        f"{meta['copy_bw_GBps']:.0f} GB/s. Times: `triton.testing.do_bench` median (ms). "
        f"GB/s = 3·B·L·D·elt / time. Command: `{meta['command']}`",
        "",
    ]
    if meta.get("dry_run"):
        lines += [
            "**Dry run on CPU through the Triton interpreter: the numbers are meaningless; "
            "it only checks the script.**",
            "",
        ]
    if meta.get("sizes_done", 0) < meta.get("sizes_planned", 0):
        lines += [
            f"Partial run: {meta['sizes_done']} of {meta['sizes_planned']} sizes (time budget).",
            "",
        ]
    changed = [r for r in rows if _rule_now(meta, r) != r["auto_strategy"]]
    if changed:
        lines += [
            f"The launch rule changed after this run: for {len(changed)} of {len(rows)} sizes "
            "it now picks the other strategy (shown as `old → now`); that strategy's time is "
            "in its own column (measured in this run), and the Triton, GB/s, graph and host "
            "columns are those of the old pick.",
            "",
        ]
    lines += [
        "Triton = the automatic strategy (its time is that strategy's column). graph µs: the "
        "op replayed from a CUDA graph (`do_bench_cudagraph`, no Python launch path); host "
        "µs: Python time per call, back to back.",
        "",
    ]
    lines += [
        "| B | L | D | auto | Triton ms | GB/s | % copy BW | per_chain ms | split ms | "
        "graph µs | per_chain / split graph µs | host µs | eager ms | compiled ms | "
        "× eager | × compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['L']} | {r['D']} | {_auto_cell(meta, r)} | {_cell(r, 'triton')} | "
            f"{_cell(r, 'triton', 'GBps', '{:.0f}')} | "
            f"{100 * r['triton']['frac_copy_bw']:.0f}% | {_cell(r, 'triton_per_chain')} | "
            f"{_cell(r, 'triton_split')} | "
            + (
                f"{1e3 * r['triton_cudagraph_ms']:.1f} | "
                + (
                    f"{1e3 * r['per_chain_graph_ms']:.1f} / {1e3 * r['split_graph_ms']:.1f} | "
                    if "split_graph_ms" in r
                    else "- | "
                )
                + f"{r['triton_host_us_per_call']:.0f} | "
                if "triton_cudagraph_ms" in r
                else "- | - | - | "
            )
            + f"{_cell(r, 'eager_reference')} | "
            f"{_cell(r, 'compiled_reference')} | "
            + (f"{r['speedup_vs_eager']:.1f}" if "speedup_vs_eager" in r else "-")
            + " | "
            + (f"{r['speedup_vs_compiled']:.2f}" if "speedup_vs_compiled" in r else "-")
            + " |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda", choices=["cuda"], help="benchmark device")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU: run the script's logic on CPU through the Triton interpreter",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="seconds: start no new size after this (0: no limit); results so far "
        "are written after every size either way",
    )
    ap.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="only rewrite the .md beside a saved results .json",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="output path stem (default bench/results/verify_cuda_<cardname>)",
    )
    args = ap.parse_args(argv)
    if not (args.dry_run or args.render):
        common.require_cuda(ap, ": use --dry-run to check the script on CPU")
    return args


def plan(args: argparse.Namespace) -> tuple[torch.device, str, list, int]:
    """(device, its name, the sizes in the order they run, the copy-bandwidth buffer's numel)."""
    if args.dry_run:
        return torch.device("cpu"), "cpu-interpreter-dry-run", DRY, 1 << 20
    sweep = [(B, L, D) for D in SWEEP_D for L in SWEEP_L for B in SWEEP_B]
    # the quick sizes first, so a run cut short by --time-budget still has them
    sizes = QUICK if args.quick else QUICK + [s for s in sweep if s not in QUICK]
    return torch.device("cuda"), torch.cuda.get_device_name(), sizes, 1 << 28  # 1 GiB fp32


def describe(row: dict) -> str:
    text = (
        f"B={row['B']:4d} L={row['L']:3d} D={row['D']:7d} [{row['auto_strategy']:9s}] triton "
        f"{row['triton']['ms']:8.4f} ms ({row['triton']['GBps']:7.1f} GB/s, "
        f"{100 * row['triton']['frac_copy_bw']:4.0f}% copy BW) | per_chain "
        f"{row['triton_per_chain']['ms']:8.4f} | split {row['triton_split']['ms']:8.4f}"
    )
    if "triton_cudagraph_ms" in row:
        text += (
            f" | graph pc/split {row['per_chain_graph_ms']:8.4f}/"
            f"{row['split_graph_ms']:8.4f} | host {row['triton_host_us_per_call']:6.1f} us"
        )
    if "eager_reference" in row:
        text += f" | eager {row['eager_reference']['ms']:8.3f} (x{row['speedup_vs_eager']:.1f})"
    if "compiled_reference" in row:
        text += (
            f" | compiled {row['compiled_reference']['ms']:8.3f} "
            f"(x{row['speedup_vs_compiled']:.2f})"
        )
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:  # rewrite the markdown of a saved run (e.g. after the launch rule changed)
        saved = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(to_markdown(saved["meta"], saved["rows"]))
        return 0
    device, name, sizes, copy_numel = plan(args)
    dtype = DTYPES[args.dtype]
    from specdiff_kernels.ops.triton import verify  # noqa: F401  (registers the ops)

    copy_bw = copy_bandwidth(device, copy_numel)
    compiled = (
        None if args.no_compile else torch.compile(reference.speculative_verify, dynamic=False)
    )
    meta = {
        **common.environment(device, __file__, argv),
        "device_name": name,
        "dtype": args.dtype,
        "copy_numel": copy_numel,
        "copy_bw_GBps": copy_bw / 1e9,
        "dry_run": args.dry_run,
        "sizes_planned": len(sizes),
        "num_sms": (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else None
        ),
    }
    out = common.out_stem(args.out, f"verify_cuda_{card_slug(name)}")
    if args.dtype != "float32" and not args.out:
        out = out.with_name(out.name + f"_{args.dtype}")
    budget, rows = common.Deadline(args.time_budget or None), []
    for B, L, D in sizes:
        if budget.spent():
            common.log(
                f"time budget of {args.time_budget:.0f} s spent: stopping after "
                f"{len(rows)} of {len(sizes)} sizes"
            )
            break
        torch._dynamo.reset()  # one specialised compile per size, never the recompile limit
        rows.append(bench_size(B, L, D, dtype, device, copy_bw, compiled))
        common.log(describe(rows[-1]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        meta["sizes_done"], meta["elapsed_s"] = len(rows), budget.elapsed()
        # after every size: a run cut off keeps what it measured
        common.write_results(out, {"meta": meta, "rows": rows}, to_markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

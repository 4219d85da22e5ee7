"""Benchmark of the fused frozen round (frozen_draft + verify_frozen) against the same round
composed from PyTorch ops (not a test).

The composition is what the samplers' general path computes: the draft rollout with the
transitions' mean formula, the target means at the drafted states, and the general
``speculative_verify``, compiled with ``torch.compile``. ``compiled`` draws its noise in the graph
(``torch.randn`` / ``torch.rand``), as the fused pair draws it in-kernel; ``compiled_given``
reads it from memory (precomputed, not timed: the composition's floor). The fused pair never
materialises the draft or target means. The network is outside both (its x0-hat P is an input).

Bytes moved by the fused pair (frozen x0): the draft reads the root and the frozen value and writes
Y (L+3 vectors per chain); the verify reads P_0..P_{L-1} and f, then the decisive Y_j, P_j, f and
writes next_state and next_frozen (L+6): (2L+9)·D·elt per chain. ``sum`` is ``x.sum()`` over that
many bytes, timed beside the others: the read floor.

On CPU every implementation (and the fused pair on each instruction-set variant of the C++
kernels) is timed interleaved, in a fresh random order in every repetition, at each thread count;
the ratios are medians over the repetitions of each repetition's own ratio. On CUDA each is timed
by ``triton.testing.do_bench`` (eager launches and CUDA-graph replay).

    python bench/bench_round_ops.py                  # CPU, writes bench/results/round_ops_cpu.{json,md}
    python bench/bench_round_ops.py --quick --threads 1
    python bench/bench_round_ops.py --device cuda    # GPU
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import _common as common
import torch

from specdiff_kernels import _C
from specdiff_kernels.ops import backends
from specdiff_kernels.ops.reference import verify as reference
from specdiff_kernels.sampling.transitions import clip_value, ddpm_transitions, round_tables

SIZES = [
    (64, 8, 3072),
    (1, 8, 3 * 64 * 64),
    (16, 8, 3 * 64 * 64),
    (256, 8, 3072),
    (1, 8, 784),
    (1024, 8, 64),
]  # the last two: the latency benchmark's gmm784 and digits cells
SAMPLE_S = 4e-3  # CPU: each timed sample runs enough calls to last about this long
Impls = dict[str, Callable[[], object]]


def make_round(B: int, L: int, D: int, device: str, dtype=torch.float32):
    T = ddpm_transitions(num_inference_steps=200, clip_sample=1.0)
    g = torch.Generator().manual_seed(0)
    root = torch.randn(B, D, generator=g).to(device, dtype)
    frozen = (0.5 * torch.randn(B, D, generator=g)).to(device, dtype)
    steps = torch.randint(0, 150, (B,), generator=g).to(device)
    lengths = torch.full((B,), L, dtype=torch.int64, device=device)
    seed = torch.tensor(1234, dtype=torch.int64, device=device)
    ids = torch.arange(B, dtype=torch.int64, device=device)
    a = dict(root=root, frozen=frozen, steps=steps, lengths=lengths, seed=seed, ids=ids)
    a |= dict(coef=round_tables(T, device), clip=clip_value(T), L=L)
    a["Y"] = fused_round(a, draft_only=True)
    # a target x0-hat close to the frozen one: most steps accepted, as in a real run
    a["P"] = frozen[:, None] + 0.02 * torch.randn(B, L + 1, D, generator=g).to(device, dtype)
    a["xi"], a["u"] = torch.ops.specdiff.chain_noise(seed, ids, steps, L, D, dtype)
    return T, a


def fused_round(a: dict, draft_only: bool = False):
    common_args = (a["steps"], a["lengths"], a["coef"], a["seed"], a["ids"])
    Y = torch.ops.specdiff.frozen_draft(a["root"], a["frozen"], *common_args, a["L"], 0, a["clip"])
    if draft_only:
        return Y
    return Y, torch.ops.specdiff.verify_frozen(Y, a["P"], a["frozen"], *common_args, 0, a["clip"])


def composed_round(T):
    """The general path's round as PyTorch ops: rollout, means, speculative_verify, commit."""

    def f(root, frozen, steps, lengths, P, xi, u):
        B, L = xi.shape[:2]
        ys, mqs = [root], []
        for j in range(L):
            kj = steps + j
            mq = T.mean_from_x0(ys[-1], frozen, kj)
            ys.append(mq + T.coef("std", kj, mq) * xi[:, j])
            mqs.append(mq)
        Y, MQ = torch.stack(ys, 1), torch.stack(mqs, 1)
        kw = steps[:, None] + torch.arange(L, device=steps.device)[None]
        MP = T.mean_from_x0(
            Y[:, :L].reshape(B * L, -1), P[:, :L].reshape(B * L, -1), kw.reshape(-1)
        ).reshape(MQ.shape)
        sigma = T.step_std(kw).to(torch.float32)
        nacc, state, lr = reference.speculative_verify(Y[:, 1:], MQ, MP, sigma, u, lengths)
        rejected = nacc < lengths
        src = torch.where(rejected, nacc, lengths)
        next_frozen = P[torch.arange(B, device=P.device), src]
        return Y, nacc, state, lr, next_frozen

    return f


def composed_round_drawing_noise(T):
    """composed_round with its noise drawn in the graph, as the fused pair draws it."""
    f = composed_round(T)

    def g(root, frozen, steps, lengths, P):
        B, D = root.shape
        L = P.shape[1] - 1
        xi = torch.randn(B, L, D, dtype=root.dtype, device=root.device)
        u = torch.rand(B, L, device=root.device)
        return f(root, frozen, steps, lengths, P, xi, u)

    return g


def implementations(T, a: dict, device: str, eager: bool) -> Impls:
    torch._dynamo.reset()  # one compile per (threads, size): Inductor bakes the thread count
    given = (a["root"], a["frozen"], a["steps"], a["lengths"], a["P"], a["xi"], a["u"])
    drawn = given[:5]
    compiled = torch.compile(composed_round_drawing_noise(T), fullgraph=True, dynamic=False)
    compiled_given = torch.compile(composed_round(T), fullgraph=True, dynamic=False)
    x = torch.randn(bytes_fused(a) // 4, device=device)
    impls = {
        "fused": lambda: fused_round(a),
        "compiled": lambda: compiled(*drawn),
        "compiled_given": lambda: compiled_given(*given),
        "sum": lambda: x.sum(),
    }
    if eager:
        impls["eager"] = lambda: composed_round(T)(*given)
    return impls


def with_capability(cap: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        before = _C.set_cpu_capability(cap)
        try:
            return fn()
        finally:
            _C.set_cpu_capability(before)

    return run


def bytes_fused(a: dict) -> int:
    B, D = a["root"].shape
    return (2 * a["L"] + 9) * B * D * 4


def measure_cpu(T, a: dict, reps: int, eager: bool) -> dict:
    impls = implementations(T, a, "cpu", eager)
    for cap in backends.cpu_capabilities():
        impls[f"fused[{cap}]"] = with_capability(cap, lambda: fused_round(a))
    times = common.interleaved_per_call(impls, reps, SAMPLE_S)
    row = {name: common.Timing.of(ts).ms() for name, ts in times.items()}
    row["fused_by_capability"] = {
        k[len("fused[") : -1]: row.pop(k) for k in list(row) if k.startswith("fused[")
    }
    row["vs_compiled"] = common.paired_ratio(times["compiled"], times["fused"])
    row["vs_compiled_given"] = common.paired_ratio(times["compiled_given"], times["fused"])
    row["of_sum_bw"] = common.paired_ratio(times["sum"], times["fused"])
    return row


def measure_cuda(T, a: dict, eager: bool) -> dict:
    impls = implementations(T, a, "cuda", eager)
    impls["fused_graph"] = common.cuda_graph(impls["fused"])
    impls["compiled_graph"] = common.cuda_graph(impls["compiled"])
    row = {name: common.time_cuda(fn, rep_ms=200).ms() for name, fn in impls.items()}
    ratio = lambda num, den: {"median": row[num]["ms"] / row[den]["ms"]}  # noqa: E731
    row["vs_compiled"] = ratio("compiled", "fused")
    row["vs_compiled_given"] = ratio("compiled_given", "fused")
    row["of_sum_bw"] = ratio("sum", "fused")
    row["graph_vs_compiled_graph"] = ratio("compiled_graph", "fused_graph")
    row["graph_of_sum_bw"] = ratio("sum", "fused_graph")
    return row


def bench_size(B: int, L: int, D: int, device: str, reps: int, eager: bool) -> dict:
    T, a = make_round(B, L, D, device)
    row = {
        "B": B,
        "L": L,
        "D": D,
        "threads": torch.get_num_threads(),
        "bytes_fused": bytes_fused(a),
    }
    row |= measure_cpu(T, a, reps, eager) if device == "cpu" else measure_cuda(T, a, eager)
    row["fused_GBps"] = row["bytes_fused"] / (row["fused"]["ms"] * 1e-3) / 1e9
    common.log(
        f"{row['threads']}t B={B} L={L} D={D}: fused {row['fused']['ms']:.4f} ms | compiled "
        f"{row['compiled']['ms']:.4f} ms (fused x{row['vs_compiled']['median']:.2f}) | "
        f"compiled_given {row['compiled_given']['ms']:.4f} ms | sum {row['sum']['ms']:.4f} ms "
        f"(fused {row['of_sum_bw']['median']:.2f} of its BW)"
    )
    return row


def _ratio(r: dict) -> str:
    if "q20" not in r:
        return f"{r['median']:.2f}"
    return f"{r['median']:.2f} ({r['q20']:.2f}-{r['q80']:.2f})"


def _ms(t: dict) -> str:
    return f"{t['ms']:.3f} ({t['q20']:.3f}-{t['q80']:.3f})"


def capability_table(rows: list[dict], current: str) -> list[str]:
    caps = list(rows[0]["fused_by_capability"])
    lines = [
        "",
        f"The fused round on each instruction-set variant of the C++ kernels (median ms; the "
        f"table above ran `{current}`; `SPECDIFF_CPU_CAPABILITY` picks one):",
        "",
        "| threads | B | L | D | " + " | ".join(caps) + f" | {caps[-1]} / {caps[0]} |",
        "|" + "---|" * (len(caps) + 5),
    ]
    for r in rows:
        fc = r["fused_by_capability"]
        lines.append(
            f"| {r['threads']} | {r['B']} | {r['L']} | {r['D']} | "
            + " | ".join(f"{fc[c]['ms']:.3f}" for c in caps)
            + f" | {fc[caps[-1]]['ms'] / fc[caps[0]]['ms']:.2f} |"
        )
    return lines


def to_markdown(res: dict) -> str:
    gpu = res["device"] == "cuda"
    load = res.get("load_average") or []
    lines = [
        f"# Fused frozen round vs composed round ({res['device_name']}, {res['device']}, "
        f"torch {res['torch']})",
        "",
        f"Command: `{res['command']}`. Load average at the start: "
        f"{', '.join(f'{v:.2f}' for v in load) or '-'}. fp32, frozen x0, DDPM N=200. Times: "
        "median ms per call (20-80% quantiles). `compiled` draws its noise in the graph, "
        "`compiled_given` reads it; `sum`: x.sum() over the fused pair's bytes. Ratios (median of "
        "each repetition's ratio, 20-80%): `vs compiled` = compiled / fused, `of sum BW` = sum / "
        "fused.",
        "",
        "| threads | B | L | D | fused | compiled | compiled_given | sum | vs compiled | "
        "vs compiled_given | fused GB/s | of sum BW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['threads']} | {r['B']} | {r['L']} | {r['D']} | {_ms(r['fused'])} | "
            f"{_ms(r['compiled'])} | {_ms(r['compiled_given'])} | {_ms(r['sum'])} | "
            f"{_ratio(r['vs_compiled'])} | {_ratio(r['vs_compiled_given'])} | "
            f"{r['fused_GBps']:.1f} | {_ratio(r['of_sum_bw'])} |"
        )
    if gpu:
        lines += ["", "| B | L | D | fused graph | compiled graph | graph vs compiled graph |"]
        lines += ["|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(
                f"| {r['B']} | {r['L']} | {r['D']} | {r['fused_graph']['ms']:.4f} | "
                f"{r['compiled_graph']['ms']:.4f} | {_ratio(r['graph_vs_compiled_graph'])} |"
            )
    else:
        lines += capability_table(res["rows"], res["cpu_capability"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="headline size only (B=64, L=8, D=3072)")
    p.add_argument("--threads", default="1,2", help="CPU: thread counts, comma-separated")
    p.add_argument("--reps", type=int, default=60, help="CPU: repetitions per size")
    p.add_argument("--eager", action="store_true", help="also time the uncompiled composition")
    p.add_argument(
        "--out", default=None, help="output path stem (default bench/results/round_ops_<device>)"
    )
    args = p.parse_args(argv)
    if args.device == "cuda":
        common.require_cuda(p)
    sizes = SIZES if args.device == "cpu" else SIZES[:2]  # device time is short: two sizes
    sizes = sizes[: 1 if args.quick else None]
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [None]
    res = common.environment(args.device, __file__, argv)
    rows = []
    for t in threads:
        if t is not None:
            torch.set_num_threads(t)
        rows += [bench_size(B, L, D, args.device, args.reps, args.eager) for B, L, D in sizes]
    res |= {"cpu_capability": _C.cpu_capability() if args.device == "cpu" else None, "rows": rows}
    md = to_markdown(res)
    common.write_results(common.out_stem(args.out, f"round_ops_{args.device}"), res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

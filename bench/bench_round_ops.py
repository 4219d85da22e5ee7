"""Benchmark of the fused frozen round (frozen_draft + verify_frozen) against the same round
composed from PyTorch ops (not a test).

The composition is what the samplers' general path computes: the draft rollout with the
transitions' mean formula, the target means at the drafted states, and the general
``speculative_verify``, with the noise read from memory (precomputed, not timed), compiled with
``torch.compile`` (and eager for scale). The fused pair draws its noise in-kernel and never
materialises the draft or target means. The network is outside both (its x0-hat P is an input).

Bytes moved by the fused pair (frozen x0): the draft reads the root and the frozen value and writes
Y (L+3 vectors per chain); the verify reads P_0..P_{L-1} and f, then the decisive Y_j, P_j, f and
writes next_state and next_frozen (L+6): (2L+9)·D·elt per chain. Reported as GB/s and as a
fraction of this device's ``x.sum()`` read bandwidth measured in the same run.

    python bench/bench_round_ops.py                  # CPU, writes bench/results/round_ops_cpu.{json,md}
    python bench/bench_round_ops.py --device cuda    # GPU (eager launches and CUDA-graph replay)
"""

from __future__ import annotations

import argparse
import sys

import _common as common
import torch

from specdiff_kernels import _C
from specdiff_kernels.ops import backends
from specdiff_kernels.ops import round as ro
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


def timer(device: str):
    """The device's timer; on CUDA with 200 ms of repetitions (the round is short)."""
    t = common.timer(device)
    return lambda fn: t(fn, rep_ms=200) if device == "cuda" else t(fn)


def make_round(B: int, L: int, D: int, device: str, dtype=torch.float32):
    T = ddpm_transitions(num_inference_steps=200, clip_sample=1.0)
    g = torch.Generator().manual_seed(0)
    root = torch.randn(B, D, generator=g).to(device, dtype)
    frozen = (0.5 * torch.randn(B, D, generator=g)).to(device, dtype)
    steps = torch.randint(0, 150, (B,), generator=g).to(device)
    lengths = torch.full((B,), L, dtype=torch.int64, device=device)
    seed = ro.seed_tensor(1234, device)
    ids = torch.arange(B, dtype=torch.int64, device=device)
    coef = round_tables(T, device)
    clip = clip_value(T)
    Y = ro.frozen_draft(root, frozen, steps, lengths, coef, seed, ids, L, 0, clip)
    # a target x0-hat close to the frozen one: most steps accepted, as in a real run
    P = frozen[:, None] + 0.02 * torch.randn(B, L + 1, D, generator=g).to(device, dtype)
    xi, u = ro.chain_noise(seed, ids, steps, L, (D,), dtype)
    return T, dict(
        root=root,
        frozen=frozen,
        steps=steps,
        lengths=lengths,
        seed=seed,
        ids=ids,
        coef=coef,
        clip=clip,
        Y=Y,
        P=P,
        xi=xi,
        u=u,
        L=L,
    )


def fused_round(a):
    Y = torch.ops.specdiff.frozen_draft(
        a["root"],
        a["frozen"],
        a["steps"],
        a["lengths"],
        a["coef"],
        a["seed"],
        a["ids"],
        a["L"],
        0,
        a["clip"],
    )
    return Y, torch.ops.specdiff.verify_frozen(
        Y,
        a["P"],
        a["frozen"],
        a["steps"],
        a["lengths"],
        a["coef"],
        a["seed"],
        a["ids"],
        0,
        a["clip"],
    )


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


def fused_by_capability(a: dict, t, label: str) -> dict:
    """The fused round on each of the C++ kernels' instruction-set variants, same inputs."""
    out = {}
    for cap in backends.cpu_capabilities():
        before = _C.set_cpu_capability(cap)
        try:
            out[cap] = t(lambda: fused_round(a)).ms()
        finally:
            _C.set_cpu_capability(before)
        common.log(f"{label} fused[{cap}]: {out[cap]['ms']:.4f} ms")
    return out


def bench_size(B: int, L: int, D: int, device: str, t, bw: float) -> dict:
    T, a = make_round(B, L, D, device)
    comp = composed_round(T)
    torch._dynamo.reset()  # one compile per size: every size would count as a recompile
    args = (a["root"], a["frozen"], a["steps"], a["lengths"], a["P"], a["xi"], a["u"])
    compiled = torch.compile(comp, fullgraph=True, dynamic=False)
    impls = {
        "fused": lambda: fused_round(a),
        "compiled": lambda: compiled(*args),
        "eager": lambda: comp(*args),
    }
    if device == "cuda":
        impls["fused_graph"] = common.cuda_graph(lambda: fused_round(a))
        impls["compiled_graph"] = common.cuda_graph(lambda: compiled(*args))
    label = f"B={B} L={L} D={D}"
    row = {"B": B, "L": L, "D": D, "bytes_fused": (2 * L + 9) * B * D * 4}
    for name, fn in impls.items():
        row[name] = t(fn).ms()
        common.log(f"{label} {name}: {row[name]['ms']:.4f} ms")
    if device == "cpu":
        row["fused_by_capability"] = fused_by_capability(a, t, label)
    row["fused_GBps"] = row["bytes_fused"] / (row["fused"]["ms"] * 1e-3) / 1e9
    row["fused_frac_read_bw"] = row["bytes_fused"] / (row["fused"]["ms"] * 1e-3) / bw
    row["speedup_vs_compiled"] = row["compiled"]["ms"] / row["fused"]["ms"]
    row["speedup_vs_eager"] = row["eager"]["ms"] / row["fused"]["ms"]
    if device == "cuda":
        row["graph_speedup_vs_compiled_graph"] = (
            row["compiled_graph"]["ms"] / row["fused_graph"]["ms"]
        )
        row["fused_graph_frac_read_bw"] = (
            row["bytes_fused"] / (row["fused_graph"]["ms"] * 1e-3) / bw
        )
    return row


def to_markdown(res: dict) -> str:
    gpu = res["device"] == "cuda"
    lines = [
        f"# Fused frozen round vs composed round ({res['device_name']}, {res['device']}, "
        f"{res['threads']} threads, torch {res['torch']})",
        "",
        f"x.sum() read bandwidth in the same run: {res['read_bw_GBps']:.1f} GB/s. "
        "Times are medians in ms (20-80% quantiles in the JSON); fp32, frozen x0, DDPM N=200.",
        "",
    ]
    head = "| B | L | D | fused | compiled | eager | fused / compiled speed-up | fused GB/s | of x.sum() BW |"
    if gpu:
        head += " fused graph | compiled graph | graph speed-up | graph of BW |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        line = (
            f"| {r['B']} | {r['L']} | {r['D']} | {r['fused']['ms']:.4f} | "
            f"{r['compiled']['ms']:.4f} | {r['eager']['ms']:.4f} | "
            f"{r['speedup_vs_compiled']:.2f}x | {r['fused_GBps']:.1f} | "
            f"{100 * r['fused_frac_read_bw']:.0f}% |"
        )
        if gpu:
            line += (
                f" {r['fused_graph']['ms']:.4f} | {r['compiled_graph']['ms']:.4f} | "
                f"{r['graph_speedup_vs_compiled_graph']:.2f}x | "
                f"{100 * r['fused_graph_frac_read_bw']:.0f}% |"
            )
        lines.append(line)
    if not gpu:
        caps = list(res["rows"][0]["fused_by_capability"])
        lines += [
            "",
            f"The fused round on each instruction-set variant of the C++ kernels (ms; the "
            f"table above ran `{res['cpu_capability']}`; `SPECDIFF_CPU_CAPABILITY` picks one):",
            "",
            "| B | L | D | " + " | ".join(caps) + f" | {caps[-1]} / {caps[0]} |",
            "|" + "---|" * (len(caps) + 4),
        ]
        for r in res["rows"]:
            fc = r["fused_by_capability"]
            lines.append(
                f"| {r['B']} | {r['L']} | {r['D']} | "
                + " | ".join(f"{fc[c]['ms']:.4f}" for c in caps)
                + f" | {fc[caps[-1]]['ms'] / fc[caps[0]]['ms']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="headline size only (B=64, L=8, D=3072)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--out", default=None, help="output path stem (default bench/results/round_ops_<device>)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        common.require_cuda(p)
    sizes = SIZES if args.device == "cpu" else SIZES[:2]  # device time is short: two sizes
    t = timer(args.device)
    bw = common.read_bandwidth(args.device, 1 << (27 if args.device == "cuda" else 25), t)
    rows = [
        bench_size(B, L, D, args.device, t, bw) for B, L, D in sizes[: 1 if args.quick else None]
    ]
    res = {
        **common.environment(args.device, __file__, argv),
        "cpu_capability": _C.cpu_capability() if args.device == "cpu" else None,
        "read_bw_GBps": bw / 1e9,
        "rows": rows,
    }
    md = to_markdown(res)
    common.write_results(common.out_stem(args.out, f"round_ops_{args.device}"), res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks of the issue-#7 extensions (not a test): speculative Langevin and adaptive windows.

1. Speculative ULA on a banana target (autograd gradient): plain ULA vs speculative ULA with the
   frozen-gradient draft (fixed L and adaptive) and with a cheap surrogate gradient; sequential
   gradient calls (batch and per chain), gradient evaluations, wall time, acceptance, and a
   two-sample p-value against an independent plain-ULA run (exactness check, not a speed claim).
2. Adaptive window vs the best fixed window on the analytic GMM (DDPM, linear betas, N = 200
   steps, frozen-x0 draft with prefetched root, as bench/bench_sampler.py), D in {2, 64, 784}. For
   each evaluation cap c, "best fixed L" is the fixed window (grid below) with the fewest sequential
   calls among those whose MEASURED evaluations / ancestral evaluations <= c; the adaptive window
   (defaults, max_window = 32, max_evals_ratio = c) is compared with it, and with the best fixed L
   that uses no more evaluations than the adaptive run actually used. Every number is a mean over
   seeds.

    seq/chain : mean over chains of the rounds (= sequential target calls) a chain needs / N
    seq/batch : sequential target calls of the whole ragged batch / N
    evals     : target evaluations / (chains * N)   (ancestral = 1)

Usage:
    .venv/bin/python bench/bench_extensions.py            # full (writes bench/results/extensions.{json,md})
    .venv/bin/python bench/bench_extensions.py --quick    # small, for a smoke run (does not overwrite)
"""

from __future__ import annotations

import argparse
import math
import time

import _common as common
import numpy as np
import torch

from specdiff_kernels.models.gmm import GMMDenoiser, make_gmm
from specdiff_kernels.sampling.drafts import FrozenTargetDraft
from specdiff_kernels.sampling.langevin import (
    LangevinSampler,
    SpeculativeLangevin,
    banana_energy,
    banana_grad,
)
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.transitions import (
    alphas_cumprod_from_betas,
    ddpm_transitions,
    make_betas,
)
from specdiff_kernels.sampling.window import AdaptiveWindow
from specdiff_kernels.testing.two_sample import two_sample_pvalue


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- 1. Langevin
def bench_langevin(B: int, N: int, D: int, g: float, L: int, seed: int) -> dict:
    U = banana_energy()
    plain = LangevinSampler(U, step_size=g, num_steps=N)
    ref = plain.sample(num_chains=B, event_shape=(D,), generator=gen(seed + 1000))
    rows = []

    def row(name, res):
        st = res.stats
        rows.append(
            {
                "sampler": name,
                "seq_calls": st.target_calls,
                "seq_per_N": st.target_calls / N,
                "seq_chain_per_N": st.mean_chain_rounds / N,
                "evals": st.target_evals,
                "evals_per_BN": st.target_evals / (B * N),
                "draft_calls": st.draft_calls,
                "acceptance": st.acceptance_rate if st.windows else math.nan,
                "acceptance_by_position": st.acceptance_by_position if st.windows else [],
                "mean_window": st.mean_window_length if st.windows else 1.0,
                "wall_s": st.wall_time,
                "p_vs_plain": two_sample_pvalue(res.samples, ref.samples),
            }
        )

    row("plain ULA", plain.sample(num_chains=B, event_shape=(D,), generator=gen(seed)))
    for name, kw in (
        (f"frozen gradient, L={L}", {"window": L}),
        ("frozen gradient, adaptive (c=2)", {"window": AdaptiveWindow(32, 2.0)}),
        (f"surrogate gradient (b=0), L={L}", {"window": L, "draft": banana_grad(b=0.0)}),
    ):
        s = SpeculativeLangevin(U, step_size=g, num_steps=N, **kw)
        row(name, s.sample(num_chains=B, event_shape=(D,), generator=gen(seed)))
    return {
        "target": f"banana a=1.5 b=0.5, D={D}",
        "chains": B,
        "steps": N,
        "step_size": g,
        "window": L,
        "gradient": "autograd",
        "rows": rows,
    }


# --------------------------------------------------------------------------- 2. adaptive window
def run_cell(model, T, B, D, window, seeds) -> dict:
    N = T.num_steps
    out = []
    t0 = time.perf_counter()
    for seed in seeds:
        st = (
            SpeculativeSampler(model, T, FrozenTargetDraft("x0", prefetch_root=True), window)
            .sample(B, (D,), generator=gen(seed))
            .stats
        )
        out.append(
            (
                st.mean_chain_rounds / N,
                st.target_calls / N,
                st.target_evals / (B * N),
                st.mean_window_length,
                st.acceptance_rate,
            )
        )
    a = np.array(out)
    return {
        "seq_chain": float(a[:, 0].mean()),
        "seq_batch": float(a[:, 1].mean()),
        "evals": float(a[:, 2].mean()),
        "mean_window": float(a[:, 3].mean()),
        "acceptance": float(a[:, 4].mean()),
        "seq_chain_by_seed": a[:, 0].tolist(),
        "seq_batch_by_seed": a[:, 1].tolist(),
        "wall_s": time.perf_counter() - t0,
    }


def best_fixed(fixed: dict, budget: float, key: str):
    ok = {L: r for L, r in fixed.items() if r["evals"] <= budget}
    if not ok:
        return None, None
    L = min(ok, key=lambda L: (ok[L][key], L))
    return L, ok[L][key]


def bench_adaptive(dims, windows, caps, B, N, seeds, pacing: bool) -> dict:
    abar = alphas_cumprod_from_betas(make_betas("linear", 1000))
    T = ddpm_transitions(abar, num_inference_steps=N)
    out = {
        "chains": B,
        "steps": T.num_steps,
        "seeds": list(seeds),
        "windows": windows,
        "caps": caps,
        "cells": [],
    }
    for D in dims:
        model = GMMDenoiser(make_gmm(D, K=8, seed=0), abar)
        fixed = {}
        for L in windows:
            fixed[L] = run_cell(model, T, B, D, L, seeds)
            r = fixed[L]
            print(
                f"  D={D:>4} fixed L={L:>2}: seq/chain {r['seq_chain']:.4f} seq/batch "
                f"{r['seq_batch']:.4f} evals {r['evals']:.3f}",
                flush=True,
            )
        variants = [("adaptive", False)] + ([("adaptive+pacing", True)] if pacing else [])
        for c in caps:
            for vname, pace in variants:
                ad = run_cell(model, T, B, D, AdaptiveWindow(max(windows), c, pacing=pace), seeds)
                cell = {"D": D, "cap": c, "variant": vname, "adaptive": ad}
                for key in ("seq_chain", "seq_batch"):
                    L, v = best_fixed(fixed, c, key)
                    L2, v2 = best_fixed(fixed, ad["evals"], key)
                    cell[f"best_fixed_{key}"] = {
                        "L": L,
                        "value": v,
                        "ratio": ad[key] / v if v else math.nan,
                    }
                    cell[f"same_evals_fixed_{key}"] = {
                        "L": L2,
                        "value": v2,
                        "ratio": ad[key] / v2 if v2 else math.nan,
                    }
                out["cells"].append(cell)
                print(
                    f"  D={D:>4} c={c} {vname}: seq/chain {ad['seq_chain']:.4f} "
                    f"(best fixed L={cell['best_fixed_seq_chain']['L']}: "
                    f"{cell['best_fixed_seq_chain']['ratio']:.3f}x) seq/batch {ad['seq_batch']:.4f} "
                    f"({cell['best_fixed_seq_batch']['ratio']:.3f}x) evals {ad['evals']:.3f}",
                    flush=True,
                )
        out.setdefault("fixed", {})[str(D)] = {str(L): r for L, r in fixed.items()}
    return out


# --------------------------------------------------------------------------- report
def fmt(v, p=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{p}f}"


def machine(res: dict) -> str:
    return res.get("machine") or f"{res['cpu']} ({res['cores']} cores)"


def markdown(res: dict) -> str:
    lv, ad = res["langevin"], res["adaptive"]
    lines = [
        "# Extensions benchmark (issue #7)",
        "",
        f"{machine(res)}; torch {res['torch']}; {res['threads']} thread(s). "
        f"Command: `{res['command']}` ({res['total_s']:.0f} s).",
        "",
        f"## Speculative Langevin: {lv['target']}, {lv['chains']} chains, N={lv['steps']} "
        f"steps, g={lv['step_size']}, gradient by {lv['gradient']}",
        "",
        "| sampler | seq grad calls | /N (batch) | /N (per chain) | grad evals /(B·N) | draft calls | "
        "acceptance | mean window | wall s | p vs plain ULA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lv["rows"]:
        lines.append(
            f"| {r['sampler']} | {r['seq_calls']} | {fmt(r['seq_per_N'])} | "
            f"{fmt(r['seq_chain_per_N'])} | {fmt(r['evals_per_BN'], 2)} | {r['draft_calls']} | "
            f"{fmt(r['acceptance'], 2)} | {fmt(r['mean_window'], 1)} | {fmt(r['wall_s'], 2)} | "
            f"{r['p_vs_plain']:.3g} |"
        )
    lines += [
        "",
        "p vs plain ULA: per-coordinate KS + energy-distance permutation test (Bonferroni) "
        "against an independent plain-ULA run (the plain row is the null check). Wall times: "
        "the banana gradient is cheap, so the sampler's per-round overhead dominates; the "
        "speculative sampler pays off when a gradient call costs much more than a round's "
        "bookkeeping.",
        "",
        f"## Adaptive window vs best fixed L (GMM K=8, DDPM N={ad['steps']}, frozen-x0 draft "
        f"with prefetch, {ad['chains']} chains, seeds {ad['seeds']})",
        "",
        f"Fixed-L grid {ad['windows']}; adaptive = `AdaptiveWindow(max_window={max(ad['windows'])}, "
        f"max_evals_ratio=c)` with default settings (no per-cell tuning). Best fixed L: "
        "fewest sequential calls among fixed L with measured evals <= c; 'same evals': among "
        "fixed L with evals <= the adaptive run's measured evals. Ratios < 1: adaptive is "
        "better.",
        "",
        "| D | cap c | variant | adaptive seq/chain | best fixed (L) | ratio | same-evals fixed (L) | ratio | "
        "adaptive seq/batch | best fixed (L) | ratio | same-evals fixed (L) | ratio | adaptive evals | "
        "mean window |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in ad["cells"]:
        a = c["adaptive"]
        bc, sc = c["best_fixed_seq_chain"], c["same_evals_fixed_seq_chain"]
        bb, sb = c["best_fixed_seq_batch"], c["same_evals_fixed_seq_batch"]
        lines.append(
            f"| {c['D']} | {c['cap']} | {c['variant']} | {fmt(a['seq_chain'], 4)} | {fmt(bc['value'], 4)} ({bc['L']}) | "
            f"{fmt(bc['ratio'])} | {fmt(sc['value'], 4)} ({sc['L']}) | {fmt(sc['ratio'])} | "
            f"{fmt(a['seq_batch'], 4)} | {fmt(bb['value'], 4)} ({bb['L']}) | {fmt(bb['ratio'])} | "
            f"{fmt(sb['value'], 4)} ({sb['L']}) | {fmt(sb['ratio'])} | {fmt(a['evals'])} | "
            f"{fmt(a['mean_window'], 1)} |"
        )
    lines += [
        "",
        "Fixed windows (mean over seeds):",
        "",
        "| D | L | seq/chain | seq/batch | evals | acceptance |",
        "|---|---|---|---|---|---|",
    ]
    for D, rows in ad["fixed"].items():
        for L, r in rows.items():
            lines.append(
                f"| {D} | {L} | {fmt(r['seq_chain'], 4)} | {fmt(r['seq_batch'], 4)} | "
                f"{fmt(r['evals'])} | {fmt(r['acceptance'], 2)} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes; results not written")
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 64, 784])
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
    ap.add_argument("--caps", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--chains", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-pacing", action="store_true", help="skip the pacing=True variant")
    ap.add_argument("--langevin-chains", type=int, default=1000)
    ap.add_argument("--langevin-dim", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(common.RESULTS / "extensions"))
    args = ap.parse_args(argv)
    if args.quick:
        args.dims, args.windows, args.caps = [2, 64], [2, 8, 32], [2.0]
        args.chains, args.seeds, args.langevin_chains = 16, 1, 200
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    common.log("1. speculative Langevin")
    lv = bench_langevin(args.langevin_chains, args.steps, args.langevin_dim, 0.05, 8, seed=0)
    for r in lv["rows"]:
        common.log(
            f"  {r['sampler']:<34} seq/N {r['seq_per_N']:.3f} (chain "
            f"{r['seq_chain_per_N']:.3f}) evals {r['evals_per_BN']:.2f} wall "
            f"{r['wall_s']:.2f}s p {r['p_vs_plain']:.3g}"
        )
    common.log("2. adaptive window vs fixed")
    ad = bench_adaptive(
        args.dims,
        args.windows,
        args.caps,
        args.chains,
        args.steps,
        range(args.seeds),
        pacing=not args.no_pacing,
    )
    res = {
        **common.environment("cpu", __file__, argv),
        "total_s": time.perf_counter() - t0,
        "langevin": lv,
        "adaptive": ad,
    }
    md = markdown(res)
    print(md)
    if not args.quick:
        common.write_results(common.out_stem(args.out, "extensions"), res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

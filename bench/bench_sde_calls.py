"""Sequential calls per chain of speculative DPM-Solver++ 2M SDE, and its law against its own
ancestral chain (not a test).

For each model and k in ``--steps``, default and Karras sigmas: the speculative sampler at every
fixed L of ``--windows`` on ``--chains`` chains (frozen-x0 draft), its mean sequential calls per
chain (the round in which each chain finished) and acceptance; at the best L, a two-sample test
(``specdiff_kernels.testing.two_sample.two_sample_pvalue``: per-coordinate KS + energy
distance, Bonferroni) of ``--law-chains`` speculative samples against as many from the ancestral
chain with another seed. Chains: the native tables (``dpmsolver_sde_transitions``, no
clipping; what ``specdiff sample --pipeline digits --scheduler dpm++2m-sde`` runs).

    python bench/bench_sde_calls.py    # writes bench/results/sde_calls_cpu.{md,json}
"""

from __future__ import annotations

import argparse

import _common as common
import torch

from specdiff_kernels import AncestralSampler, SpeculativeSampler, models
from specdiff_kernels.sampling.transitions import dpmsolver_sde_transitions
from specdiff_kernels.testing.two_sample import two_sample_pvalue


def cell(m, k: int, schedule: str, windows, chains: int, law_chains: int) -> dict:
    T = dpmsolver_sde_transitions(
        k, alphas_cumprod=m.alphas_cumprod, sigma_schedule=schedule, prediction=m.prediction
    )
    shape = tuple(m.event_shape)
    by_L = {}
    for L in windows:
        res = SpeculativeSampler(m.target, T, window=L).sample(
            chains, shape, generator=torch.Generator().manual_seed(1)
        )
        st = res.stats
        by_L[L] = dict(
            calls=sum(st.chain_rounds) / len(st.chain_rounds),
            acceptance=sum(st.accepted_by_position) / max(1, sum(st.attempted_by_position)),
        )
    best = min(by_L, key=lambda L: by_L[L]["calls"])
    spec = SpeculativeSampler(m.target, T, window=best).sample(
        law_chains, shape, generator=torch.Generator().manual_seed(2)
    )
    anc = AncestralSampler(m.target, T).sample(
        law_chains, shape, generator=torch.Generator().manual_seed(3)
    )
    p = two_sample_pvalue(spec.samples, anc.samples)
    return dict(k=k, sigmas=schedule, by_L=by_L, best_L=best, p=p, **by_L[best])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gmm16", "digits"])
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--chains", type=int, default=128)
    ap.add_argument("--law-chains", type=int, default=2000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in a.models:
        m = models.load("gmm", dim=int(name[3:])) if name.startswith("gmm") else models.load(name)
        for k in a.steps:
            for schedule in ("default", "karras"):
                r = dict(model=name, **cell(m, k, schedule, a.windows, a.chains, a.law_chains))
                common.log(
                    f"{name} k={k} {schedule}: {r['calls']:.1f} calls/chain at L={r['best_L']}, "
                    f"acceptance {r['acceptance']:.2f}, p = {r['p']:.3f}"
                )
                rows.append(r)
    env = common.environment("cpu", __file__)
    cmd = env["command"]
    md = [
        "# Speculative DPM-Solver++ 2M SDE: sequential calls per chain (best fixed L)",
        "",
        f"`{cmd}`; {env['cpu']}, {env['cores']} cores, {env['threads']} thread, torch "
        f"{env['torch']}, {env['date']}, load average at the start {env['load_average']}",
        "",
        f"{a.chains} chains for the calls; the law column: two-sample p of {a.law_chains} "
        "speculative samples (best L) against as many ancestral ones (another seed).",
        "",
        "| model | k | sigmas | best L | calls / chain | acceptance | two-sample p |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['model']} | {r['k']} | {r['sigmas']} | {r['best_L']} | {r['calls']:.1f} | "
            f"{r['acceptance']:.2f} | {r['p']:.3f} |"
        )
    stem = common.out_stem(a.out, "sde_calls_cpu")
    common.write_results(stem, dict(environment=env, rows=rows), "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

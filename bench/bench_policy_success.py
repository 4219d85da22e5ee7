"""Closed-loop success of the pusht policy, ancestral against speculative DDPM-100, on more
episodes than bench_policy's cells (not a test): the same environment seeds for both, each
sampler in its own process (one thread each, side by side), and the tests scipy gives for "the
same success rate": Fisher's exact test on the counts and McNemar's (exact binomial) on the
paired episodes.

    python bench/bench_policy_success.py                   # 200 episodes each, sampler seed 1
    python bench/bench_policy_success.py --episodes 4 --out /tmp/s   # smoke

Writes bench/results/policy_success_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch
from _common import environment, out_stem, write_results
from scipy import stats

CONFIGS = {"ancestral DDPM-100": None, "speculative DDPM-100 (auto)": "auto"}


def run_one(args: tuple) -> dict:
    name, window, seeds, seed = args
    from specdiff_kernels import models
    from specdiff_kernels.models import pusht_loop as PL

    torch.set_num_threads(1)
    planner = PL.ChunkPlanner(
        models.load("pusht"), PL.PlannerConfig("ddpm", 100, window, seed=seed)
    )
    eps, _ = PL.run_episodes(planner, seeds)
    return {"name": name, **PL.summarize(eps, planner.records), "success": [e.success for e in eps]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1, help="the samplers' seed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    jobs = [(name, w, seeds, args.seed) for name, w in CONFIGS.items()]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        rows = pool.map(run_one, jobs)
    a, b = (r["success"] for r in rows)
    table = [[sum(a), len(a) - sum(a)], [sum(b), len(b) - sum(b)]]
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    res = {
        "environment": environment("cpu", __file__, argv),
        "env_seeds": f"{seeds[0]}..{seeds[-1]}",
        "sampler_seed": args.seed,
        "rows": rows,
        "fisher_exact_p": float(stats.fisher_exact(table).pvalue),
        "mcnemar_exact_p": float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
        if only_a + only_b
        else 1.0,
        "discordant": [only_a, only_b],
    }
    env = res["environment"]
    md = [
        "# pusht policy: closed-loop success, ancestral against speculative DDPM-100",
        "",
        f"`{env['command']}` on {env['cpu']}, torch {env['torch']}, {env['date']}: "
        f"{args.episodes} episodes each (env seeds {res['env_seeds']}), sampler seed {args.seed}, "
        "vectorised, 1 thread per sampler.",
        "",
        "| sampler | success +- s.e. | mean final coverage |",
        "|---|---|---|",
        *(
            f"| {r['name']} | {r['success_rate']:.3f} +- {r['success_se']:.3f} | "
            f"{r['mean_final_coverage']:.3f} |"
            for r in rows
        ),
        "",
        f"Fisher's exact test: p = {res['fisher_exact_p']:.3f}; McNemar (paired episodes, "
        f"{only_a} succeeded only with the ancestral chain, {only_b} only with speculation): "
        f"p = {res['mcnemar_exact_p']:.3f}.",
        "",
    ]
    write_results(out_stem(args.out, "policy_success_cpu"), res, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

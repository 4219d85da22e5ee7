"""Cost of exact speculative sampling on the analytic Gaussian mixture, relative to ancestral.

Setup (SPEC §3): DDPM, linear betas 1e-4..0.02 over T = 1000, respaced to N = 200 steps
("leading" spacing, fixed_small variance, epsilon prediction); data make_gmm(D, K=8, seed=0)
with its exact denoiser; frozen-x0 draft with prefetched root. For each D and window L, a ragged
batch of B chains is sampled and compared with the ancestral chain (N sequential calls, B*N
evaluations):

* seq/chain : mean over chains of the sequential target calls that chain needs (the round it
              finishes in; one target call per round) / N            -- per-chain latency
* seq/batch : sequential target calls of the whole ragged batch / N   -- the batch's latency
* evals     : total target evaluations / (B * N)                      -- compute
* acc       : acceptance rate over all verified steps; steps/win: mean steps committed per window

Usage:  .venv/bin/python bench/gmm_ratios.py [--chains 32] [--dims 2 64 784] [--windows 4 8 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from specdiff_kernels.drafts import FrozenTargetDraft  # noqa: E402
from specdiff_kernels.models.gmm import GMMDenoiser, make_gmm  # noqa: E402
from specdiff_kernels.sampler import AncestralSampler, SpeculativeSampler  # noqa: E402
from specdiff_kernels.transitions import (alphas_cumprod_from_betas, ddpm_transitions,  # noqa: E402
                                          make_betas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 64, 784])
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--chains", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--components", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    abar = alphas_cumprod_from_betas(make_betas("linear", 1000))
    T = ddpm_transitions(abar, num_inference_steps=args.steps)
    N, B = T.num_steps, args.chains
    print(f"GMM (K={args.components}), DDPM linear T=1000 -> N={N} steps, frozen-x0 draft with "
          f"prefetched root, B={B} chains (ragged batch), float32 states, seed {args.seed}")
    print(f"{'D':>5} {'L':>3} | {'seq/chain':>9} {'seq/batch':>9} {'evals':>6} | {'acc':>5} "
          f"{'steps/win':>9} | {'spec s':>7} {'anc s':>6}")
    for D in args.dims:
        model = GMMDenoiser(make_gmm(D, K=args.components, seed=0), abar)
        anc = AncestralSampler(model, T).sample(B, (D,), generator=torch.Generator().manual_seed(args.seed))
        assert anc.stats.target_calls == N and anc.stats.target_evals == B * N
        for L in args.windows:
            t0 = time.perf_counter()
            res = SpeculativeSampler(model, T, FrozenTargetDraft("x0", prefetch_root=True), L).sample(
                B, (D,), generator=torch.Generator().manual_seed(args.seed))
            st = res.stats
            print(f"{D:>5} {L:>3} | {st.mean_chain_rounds / N:>9.3f} {st.target_calls / N:>9.3f} "
                  f"{st.target_evals / (B * N):>6.2f} | {st.acceptance_rate:>5.2f} "
                  f"{st.steps_per_window:>9.2f} | {time.perf_counter() - t0:>7.2f} "
                  f"{anc.stats.wall_time:>6.2f}")


if __name__ == "__main__":
    main()

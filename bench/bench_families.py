"""Where speculation pays, per sampler family: acceptance and sequential calls against the
dimension and the number of steps (not a test).

Every family of the registry (``specdiff_kernels.sampling.families.FAMILIES``, so a family added
later is measured without touching this script) runs speculatively (frozen-x0 draft, each fixed
window of ``--windows``) on:

* the Gaussian mixture with its exact network, ``models.load("gmm", dim=d)`` (8 components),
  for d in ``--dims`` at k = ``--k`` steps, and for k in ``--steps`` at d = ``--steps-dim``. A
  flow family (``Family.flow``) runs on the same mixture's exact rectified-flow velocity
  (:class:`specdiff_kernels.models.gmm.GMMVelocity`: x_t = (1 - t) x0 + t eps, v = (x_t -
  x0_hat) / t);
* the embedded digits networks at each k of ``--steps``: ``digits`` (DDPM, epsilon) for the
  diffusion families, ``digits-flow`` (rectified flow) for the flow families.

A family that does not build on a model (it needs another kind) is listed as skipped, with the
reason. DDIM runs with eta = 1 (eta = 0 has nothing to verify); every other option is the
family's default (flow-sde: noise level 0.7). Per cell: sequential target calls per chain at the
best window (the round in which each chain finished, mean over ``--chains`` chains), the
speed-up k / calls, and at the longest window the acceptance (accepted / attempted drafted
steps) and the mean accepted length per window. Fixed seeds: the numbers do not depend on the
machine's load.

    python bench/bench_families.py    # writes bench/results/families_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import time

import _common as common
import torch

from specdiff_kernels import SpeculativeSampler, models
from specdiff_kernels.models.gmm import GMMVelocity
from specdiff_kernels.sampling.families import FAMILIES

# what a family needs to be a stochastic chain (DDIM's default eta = 0 is deterministic)
FAMILY_OPTIONS = {"ddim": {"eta": 1.0}}


def is_flow(fam) -> bool:
    return bool(getattr(fam, "flow", False))


def gmm_models(d: int) -> dict:
    """The mixture at dimension d as a diffusion model and as a rectified-flow model."""
    vp = models.load("gmm", dim=d)
    flow = models.EmbeddedModel(
        name="gmm-flow",
        target=GMMVelocity(vp.target.gmm),
        draft=None,
        event_shape=(d,),
        alphas_cumprod=None,
        prediction="flow_prediction",
        description="the same mixture's exact rectified-flow velocity",
    )
    return {False: vp, True: flow}


def cell(m, fam, k: int, windows, chains: int, seed: int) -> dict:
    """One (model, family, k): calls per chain at each window; acceptance at the longest."""
    try:
        T = m.transitions(k, fam.name, **FAMILY_OPTIONS.get(fam.name, {}))
    except (ValueError, TypeError) as err:
        return dict(skipped=str(err))
    by_L, t0 = {}, time.perf_counter()
    for L in windows:
        st = (
            SpeculativeSampler(m.target, T, window=L)
            .sample(chains, tuple(m.event_shape), generator=torch.Generator().manual_seed(seed))
            .stats
        )
        hist = st.accepted_length_hist
        by_L[L] = dict(
            calls=sum(st.chain_rounds) / len(st.chain_rounds),
            acceptance=sum(st.accepted_by_position) / max(1, sum(st.attempted_by_position)),
            accepted_len=sum(a * h for a, h in enumerate(hist)) / max(1, sum(hist)),
            evals=st.target_evals / chains,
        )
    best = min(by_L, key=lambda L: by_L[L]["calls"])
    top = max(by_L)
    return dict(
        calls=by_L[best]["calls"],
        best_L=best,
        speedup=k / by_L[best]["calls"],
        acceptance=by_L[top]["acceptance"],
        accepted_len=by_L[top]["accepted_len"],
        evals=by_L[best]["evals"],
        by_L=by_L,
        seconds=time.perf_counter() - t0,
    )


def runs(a) -> list[tuple[str, int, int, object]]:
    """(model name, d, k, models) of the grid: GMM by dimension, GMM by steps, digits by steps."""
    out = []
    for d in a.dims:
        out.append(("gmm", d, a.k, gmm_models(d)))
    gmm_k = gmm_models(a.steps_dim)
    out += [("gmm", a.steps_dim, k, gmm_k) for k in a.steps if k != a.k]
    if not a.no_digits:
        dig = {False: models.load("digits"), True: models.load("digits-flow")}
        out += [("digits", 64, k, dig) for k in a.steps]
    return out


def num_chains(a, d: int) -> int:
    """``--chains``, fewer at high dimension (``--state-budget`` floats per round and window
    position), at least 64: the d = 1024 mixture's rounds cost ~ chains x L x 8 x d."""
    return max(64, min(a.chains, a.state_budget // d))


def table(rows: list[dict], title: str, vary: str) -> list[str]:
    md = [
        f"### {title}",
        "",
        f"| family | {vary} | calls / chain (best L) | speed-up k / calls | acceptance (L max) "
        "| accepted / window | evals / sample | chains |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            md.append(f"| {r['family']} | {r[vary]} | skipped: {r['skipped']} | | | | | |")
            continue
        md.append(
            f"| {r['family']} | {r[vary]} | {r['calls']:.1f} (L={r['best_L']}) | "
            f"{r['speedup']:.2f} | {r['acceptance']:.2f} | {r['accepted_len']:.2f} | "
            f"{r['evals']:.0f} | {r['chains']} |"
        )
    return md + [""]


def markdown(rows: list[dict], env: dict, a) -> str:
    md = [
        "# Where speculation pays, per sampler family",
        "",
        f"`{env['command']}`; {env['cpu']}, {env['cores']} cores, {env['threads']} thread, torch "
        f"{env['torch']}, {env['date']}; wall {env['wall_s']:.0f} s",
        "",
        f"{a.chains} chains per cell (fewer above d = {a.state_budget // a.chains}: chains x d <= "
        f"{a.state_budget}, at least 64), seed {a.seed}, frozen-x0 draft, windows L in {a.windows}; "
        "calls / chain at the best L (the ancestral chain takes k), acceptance and accepted "
        "steps per window at the longest L. GMM: 8 components, exact network (flow families: "
        "its exact velocity). DDIM: eta = 1; flow-sde: noise level 0.7.",
        "",
    ]
    by_dim = [r for r in rows if r["model"] == "gmm" and r["k"] == a.k]
    md += table(sorted(by_dim, key=lambda r: (r["order"], r["dim"])), f"GMM, k = {a.k}", "dim")
    by_k = [r for r in rows if r["model"] == "gmm" and r["dim"] == a.steps_dim]
    md += table(sorted(by_k, key=lambda r: (r["order"], r["k"])), f"GMM, d = {a.steps_dim}", "k")
    dig = [r for r in rows if r["model"] == "digits"]
    md += table(sorted(dig, key=lambda r: (r["order"], r["k"])), "digits networks", "k")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64, 256, 1024])
    ap.add_argument("--k", type=int, default=50, help="steps of the dimension sweep")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--steps-dim", type=int, default=64, help="dimension of the steps sweep")
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--chains", type=int, default=512, help="chains per cell (at most)")
    ap.add_argument("--state-budget", type=int, default=32768, help="see num_chains")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0, rows = time.perf_counter(), []
    for name, d, k, ms in runs(a):
        chains = num_chains(a, d)
        for order, fam in enumerate(FAMILIES):
            r = dict(model=name, dim=d, k=k, family=fam.name, order=order, chains=chains)
            r.update(cell(ms[is_flow(fam)], fam, k, a.windows, chains, a.seed))
            rows.append(r)
            common.log(
                f"{name} d={d} k={k} {fam.name}: "
                + (
                    f"skipped ({r['skipped']})"
                    if "skipped" in r
                    else f"{r['calls']:.1f} calls/chain (L={r['best_L']}), acceptance "
                    f"{r['acceptance']:.2f}, {r['seconds']:.1f}s"
                )
            )
    env = common.environment("cpu", __file__, argv)
    env["wall_s"] = time.perf_counter() - t0
    stem = common.out_stem(a.out, "families_cpu")
    common.write_results(stem, dict(environment=env, rows=rows), markdown(rows, env, a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end benchmark of exact speculative sampling vs the ancestral chain (issue #6).

For every cell (model, N steps, window L, draft) it measures, against the plain ancestral DDPM
chain over the same N steps (docs/design.md §10: all three costs, never only the flattering one):

* sequential target calls / N: of the whole ragged batch (``target_calls``) and per chain
  (``mean_chain_rounds`` x calls per round: the latency one chain alone would see);
* total target evaluations / (B N) (compute), rounds, mean accepted and committed steps per
  round, acceptance by window position and by sampling step;
* wall-clock / ancestral at B = 1 and B = 64 on this CPU: ancestral and speculative runs of a
  (model, N) group interleaved over ``--reps`` repetitions (random order per repetition),
  median ratio; the time inside target / draft network calls is recorded separately so the
  sampler's own overhead is visible;
* quality beside speed (``quality`` records): two-sample statistics (energy distance, sliced
  Wasserstein, two-sample p-value from :mod:`specdiff_kernels.testing.two_sample`) of the speculative samples
  vs an INDEPENDENT ancestral run at the same N (different seed: the samplers share random
  streams under one seed), of a second independent ancestral run (the null reference), and of
  ancestral with FEWER steps, M = the speculative per-chain sequential-call budget; plus the
  distance to exact samples (GMM: the mixture, with a KS test of log p(x) under the true
  mixture; digits: the data set, and the digit classifier's confidence).

Models: ``gmm<D>`` (analytic 8-component mixture, exact denoiser; draft model: moment-matched
Gaussian denoiser; ``gmm<D>k<K>`` for K components) and ``digits`` (embedded DDPM + independently trained smaller draft).
Drafts: ``x0+pf`` / ``eps+pf`` (frozen target x0-hat / eps-hat, prefetched root: one sequential
call per round), ``x0`` / ``eps`` (frozen, no prefetch: two calls per round), ``model`` (the
independent draft network; its n sequential calls per window are reported separately).

Usage:
    .venv/bin/python bench/bench_sampler.py --quick            # < 5 min on 2 cores
    .venv/bin/python bench/bench_sampler.py                    # full grid (resumable)
    .venv/bin/python bench/bench_sampler.py --models gmm784 --steps 1000   # one piece of it
    .venv/bin/python bench/bench_sampler.py --only quality     # quality records only
    .venv/bin/python bench/bench_sampler.py --report-only      # rebuild json/md/png
    .venv/bin/python bench/bench_sampler.py --latency [--device cuda ...]   # = bench/bench_latency.py
    # the former bench/gmm_ratios.py (cost ratios only, GMM, frozen x0 + prefetch), into /tmp:
    .venv/bin/python bench/bench_sampler.py --models gmm2 gmm64 gmm784 --steps 200 \
        --windows 4 8 16 --drafts x0+pf --only cost --batch 32 --reps 1 --big-reps 1 --out /tmp/r
Each finished (model, N) group and quality cell is appended to
``bench/results/sampler_<mode>_cells.jsonl``; a rerun skips what is there (``--fresh`` to redo).
The report (``sampler_<mode>.json``, ``.md``, ``_*.png``) is rebuilt from all records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import _common as common
import numpy as np
import torch

from specdiff_kernels import models
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.testing.two_sample import (
    energy_distance_statistic,
    sliced_wasserstein,
    two_sample_pvalue,
)

DRAFT_NAMES = ("x0+pf", "eps+pf", "x0", "eps", "model")
DRAFT_LABEL = {
    "x0+pf": "frozen x0, prefetched root",
    "eps+pf": "frozen eps, prefetched root",
    "x0": "frozen x0, no prefetch",
    "eps": "frozen eps, no prefetch",
    "model": "independent draft model",
}

MODES = {
    "quick": dict(
        models=["gmm64", "gmm784", "digits"],
        steps=[200],
        windows=[4, 8, 16],
        drafts=["x0+pf", "eps+pf", "x0", "model"],
        reps=3,
        big_reps=2,
        rep_budget=20,
        batch=64,
        q_n=256,
        q_steps=[200],
        q_drafts=["x0+pf"],
    ),
    "full": dict(
        models=["gmm2", "gmm64", "gmm784", "gmm3072", "digits"],
        steps=[50, 100, 200, 1000],
        windows=[2, 4, 8, 16, 32],
        drafts=list(DRAFT_NAMES),
        reps=3,
        big_reps=3,
        rep_budget=60,
        batch=64,
        q_n=1024,
        q_steps=[50, 200, 1000],
        q_drafts=["x0+pf", "model"],
    ),
}
# Full mode: the exact GMM denoiser at D >= 784 is slow enough (0.07 / 0.3 ms per state on one
# core, and weak drafts multiply the evaluations up to 10-20x at large L) that the whole grid would
# take hours; these (model, N) groups run only the listed drafts unless --drafts is given.
FULL_LIMITS = {
    ("gmm784", 1000): ["x0+pf", "x0", "model"],
    ("gmm3072", 50): ["x0+pf", "x0"],
    ("gmm3072", 100): ["x0+pf", "x0"],
    ("gmm3072", 1000): ["x0+pf", "x0"],
}
# quality cells skipped in full mode (sampling 4 x 512 chains at N=1000, D >= 784, is too slow)
FULL_QUALITY_SKIP = {("gmm784", 1000), ("gmm3072", 50), ("gmm3072", 1000)}
SEED = 1234
QSEED = 777


# ----------------------------------------------------------------------------- models
_MODEL_CACHE: dict = {}


def load_model(key: str):
    if key not in _MODEL_CACHE:
        if key.startswith("gmm"):  # gmm<D> or gmm<D>k<K> (K mixture components, default 8)
            dim, _, comp = key[3:].partition("k")
            _MODEL_CACHE[key] = models.load("gmm", dim=int(dim), components=int(comp or 8))
        elif key == "digits":
            _MODEL_CACHE[key] = models.load("digits")
        else:
            raise SystemExit(f"unknown model {key!r} (gmm<D> or digits)")
    return _MODEL_CACHE[key]


def micro_batch(m) -> int:
    """States per network call (larger calls are split). The GMM denoiser builds [B, K, D] float64
    temporaries: above ~2^15 / D states per call they leave the cache and the cost per state
    grows up to 3-5x (D=3072: 0.3 ms/state at 8 states, 1.7 ms at 256), so GMM calls are split
    into micro-batches -- for the ancestral and the speculative sampler alike. The digits MLP is
    evaluated whole (its cost per state is flat in the batch size)."""
    if m.name == "gmm":
        return max(8, 2**15 // int(np.prod(m.event_shape)))
    return 1 << 30


class Timed:
    """Wraps a network ``model(x, t)``: micro-batches of at most ``chunk`` states; accumulates
    the seconds spent inside the network."""

    def __init__(self, net, chunk: int = 1 << 30):
        self.net = net
        self.chunk = int(chunk)
        self.seconds = 0.0

    def __call__(self, x, t):
        t0 = time.perf_counter()
        if x.shape[0] <= self.chunk:
            out = self.net(x, t)
        else:
            t = torch.as_tensor(t)
            t = t.expand(x.shape[0]) if t.dim() == 0 else t
            out = torch.cat(
                [
                    self.net(x[i : i + self.chunk], t[i : i + self.chunk])
                    for i in range(0, x.shape[0], self.chunk)
                ]
            )
        self.seconds += time.perf_counter() - t0
        return out


def make_draft(name: str, m):
    if name == "x0+pf":
        return FrozenTargetDraft("x0", prefetch_root=True)
    if name == "eps+pf":
        return FrozenTargetDraft("eps", prefetch_root=True)
    if name == "x0":
        return FrozenTargetDraft("x0", prefetch_root=False)
    if name == "eps":
        return FrozenTargetDraft("eps", prefetch_root=False)
    if name == "model":
        return DraftModelDraft(m.draft)
    raise SystemExit(f"unknown draft {name!r}; one of {DRAFT_NAMES}")


def run_sampler(m, T, draft_name, L, B, seed, chain_ids=None):
    """One timed run; returns (wall seconds, stats, samples, target seconds, draft seconds)."""
    chunk = micro_batch(m)
    tgt = Timed(m.target, chunk)
    drf = None
    if draft_name is None:
        s = AncestralSampler(tgt, T)
    else:
        d = make_draft(draft_name, m)
        if isinstance(d, DraftModelDraft):
            drf = Timed(m.draft, chunk)
            d = DraftModelDraft(drf)
        s = SpeculativeSampler(tgt, T, d, L)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t0 = time.perf_counter()
        res = s.sample(B, m.event_shape, generator=g, chain_ids=chain_ids)
        wall = time.perf_counter() - t0
    return wall, res.stats, res.samples, tgt.seconds, (drf.seconds if drf else 0.0)


# ----------------------------------------------------------------------------- cost + timing
def stats_record(st, N, B) -> dict:
    calls_per_round = st.target_calls / st.rounds if st.rounds else math.nan
    return {
        "seq_calls_batch": st.target_calls,
        "seq_ratio_batch": st.target_calls / N,
        "rounds": st.rounds,
        "mean_chain_rounds": st.mean_chain_rounds,
        "calls_per_round": calls_per_round,
        # per-chain sequential target calls: rounds the chain took x calls per round (exactly
        # the rounds with a prefetched root or a draft model: one call per round)
        "seq_calls_chain": st.mean_chain_rounds * calls_per_round,
        "seq_ratio_chain": st.mean_chain_rounds * calls_per_round / N,
        "target_evals": st.target_evals,
        "evals_ratio": st.target_evals / (B * N),
        "draft_calls": st.draft_calls,
        "draft_evals": st.draft_evals,
        "draft_calls_ratio": st.draft_calls / N,
        "windows": st.windows,
        "mean_accepted_per_round": st.mean_accepted_length,
        "mean_committed_per_round": st.steps_per_window,
        "acceptance_rate": st.acceptance_rate,
        "acceptance_by_position": st.acceptance_by_position,
        "accepted_length_hist": st.accepted_length_hist,
        "acceptance_by_step": [round(a, 3) for a in st.acceptance_by_step],
        "direct_steps": st.direct_steps,
        "deterministic_steps": st.deterministic_steps,
        "speculative_steps": st.speculative_steps,
    }


def clean(v):
    """NaN -> None (strict JSON), floats to 6 significant digits, recursively."""
    if isinstance(v, float):
        return None if math.isnan(v) else float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


def med(xs):
    return statistics.median(xs) if xs else math.nan


def run_group(
    model_key, N, windows, drafts, reps, big_reps, batch, log, rep_budget=math.inf
) -> list[dict]:
    """All cells of one (model, N): stats from the B=batch run, interleaved timings.

    A further repetition (beyond the first) is skipped when the previous one of the same batch
    size took longer than ``rep_budget`` seconds (the records say how many were run)."""
    m = load_model(model_key)
    T = m.transitions(N)
    cells = [(L, d) for L in windows for d in drafts]
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    # warm-up (allocator, lazy imports, classifier-free paths)
    run_sampler(m, T, None, 1, 1, SEED)
    run_sampler(m, T, "x0+pf", 4, 1, SEED)
    if "model" in drafts:
        run_sampler(m, T, "model", 4, 1, SEED)
    times = {(c, b): [] for c in cells + [("anc", None)] for b in (1, batch)}
    split = {(c, b): [] for c in cells + [("anc", None)] for b in (1, batch)}
    calls_b1 = {c: [] for c in cells}
    stats_big = {}
    anc_big_stats = None
    done_reps = {}
    for b, nrep in ((1, reps), (batch, big_reps)):
        for r in range(nrep):
            t_rep = time.perf_counter()
            order = list(cells)
            random.Random(1000 * r + b).shuffle(order)
            seq = [("anc", None)] + order + [("anc", None)]
            for c in seq:
                if b == 1:  # a different single chain per repetition
                    ids = [r]
                else:
                    ids = None
                wall, st, _, tt, td = run_sampler(
                    m,
                    T,
                    None if c[0] == "anc" else c[1],
                    1 if c[0] == "anc" else c[0],
                    b,
                    SEED,
                    ids,
                )
                times[(c, b)].append(wall)
                split[(c, b)].append((tt, td))
                if c[0] != "anc" and b == 1:
                    calls_b1[c].append(st.target_calls)
                if b == batch and r == 0:
                    if c[0] == "anc":
                        anc_big_stats = st
                    else:
                        stats_big[c] = st
            done_reps[b] = r + 1
            dt = time.perf_counter() - t_rep
            log(
                f"  {model_key} N={N} B={b} rep {r + 1}/{nrep} done in {dt:.0f}s "
                f"(group {time.perf_counter() - t_start:.0f}s, load {os.getloadavg()[0]:.2f})"
            )
            if dt > rep_budget and r + 1 < nrep:
                log(
                    f"  {model_key} N={N} B={b}: stopping after {r + 1} rep(s) (a rep took {dt:.0f}s "
                    f"> {rep_budget:.0f}s)"
                )
                break
    assert anc_big_stats.target_calls == N and anc_big_stats.target_evals == batch * N
    anc = {b: med(times[(("anc", None), b)]) for b in (1, batch)}
    out = []
    for c in cells:
        L, d = c
        rec = {
            "kind": "cost",
            "model": model_key,
            "N": N,
            "L": L,
            "draft": d,
            "batch": batch,
            "reps": done_reps[1],
            "big_reps": done_reps[batch],
            "dim": int(np.prod(m.event_shape)),
        }
        rec.update(stats_record(stats_big[c], N, batch))
        rec["seq_calls_b1_runs"] = calls_b1[c]
        for b, tag in ((1, "b1"), (batch, "bB")):
            ts = times[(c, b)]
            rec[f"wall_{tag}"] = med(ts)
            rec[f"wall_{tag}_all"] = ts
            rec[f"anc_wall_{tag}"] = anc[b]
            rec[f"anc_wall_{tag}_all"] = times[(("anc", None), b)]
            rec[f"wall_ratio_{tag}"] = med(ts) / anc[b]
            rec[f"wall_ratio_{tag}_min"] = min(ts) / min(times[(("anc", None), b)])
            sp = split[(c, b)]
            rec[f"target_s_{tag}"] = med([s[0] for s in sp])
            rec[f"draft_s_{tag}"] = med([s[1] for s in sp])
            rec[f"anc_target_s_{tag}"] = med([s[0] for s in split[(("anc", None), b)]])
        rec["loadavg"] = [load0[0], os.getloadavg()[0]]
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- quality
def sample_many(m, T, draft, L, n, seed, chunk):
    """n chains (chunked; chain ids 0..n-1, so chunks = one batch); samples and merged stats."""
    xs, rounds = [], []
    for lo in range(0, n, chunk):
        ids = list(range(lo, min(n, lo + chunk)))
        _, st, x, _, _ = run_sampler(m, T, draft, L, len(ids), seed, ids)
        xs.append(x)
        rounds.extend(st.chain_rounds)
    return torch.cat(xs), sum(rounds) / len(rounds)


def gmm_of(m):
    return m.target.gmm


def gmm_spread(gmm, x) -> np.ndarray:
    """Per sample: ||x - mu_k||^2 / (D sigma_k^2) for its most likely component k (exact samples:
    chi2_D / D, mean 1). Samplers with too few steps give under-dispersed samples (< 1)."""
    from specdiff_kernels.models.gmm import _log_mix

    x = x.detach().double().reshape(x.shape[0], -1)
    var = gmm.stds**2
    k = _log_mix(x, gmm.means, var, gmm.weights).argmax(-1)
    return (((x - gmm.means[k]) ** 2 / var[k]).mean(-1)).numpy()


_REF_CACHE: dict = {}


def quality_cell(model_key, N, draft, L, n, log) -> dict:
    from scipy import stats as sps

    m = load_model(model_key)
    T = m.transitions(N)
    D = int(np.prod(m.event_shape))
    chunk = min(n, 256)
    t0 = time.perf_counter()
    key = (model_key, N, n)
    if key not in _REF_CACHE:  # shared by the drafts of one (model, N)
        _REF_CACHE.clear()
        _REF_CACHE[key] = (
            sample_many(m, T, None, 1, n, QSEED + 1, chunk)[0],  # independent reference
            sample_many(m, T, None, 1, n, QSEED + 2, chunk)[0],
        )  # 2nd ancestral (null)
    ref, null = _REF_CACHE[key]
    spec, rounds = sample_many(m, T, draft, L, n, QSEED + 3, chunk)  # speculative
    M = max(1, int(round(rounds)))
    few, _ = sample_many(m, m.transitions(M), None, 1, n, QSEED + 4, chunk)
    if model_key.startswith("gmm"):
        exact = gmm_of(m).sample(n, generator=torch.Generator().manual_seed(QSEED + 5)).float()
    else:
        exact = m.data(n, generator=torch.Generator().manual_seed(QSEED + 5))
    t_sample = time.perf_counter() - t0
    rec = {
        "kind": "quality",
        "model": model_key,
        "N": N,
        "draft": draft,
        "L": L,
        "n": n,
        "M_fewer_steps": M,
        "spec_chain_rounds": rounds,
        "dim": D,
    }
    sets = {"ancestral_indep": null, "speculative": spec, f"ancestral_{M}_steps": few}
    if model_key.startswith("gmm"):
        lp = lambda x: gmm_of(m).log_prob(x.double()).numpy()  # noqa: E731
        lp_ref = lp(ref)
        sp = lambda x: gmm_spread(gmm_of(m), x)  # noqa: E731
        sp_ref = sp(ref)
        rec["ref_spread_mean"] = float(sp_ref.mean())
        rec["exact_spread_mean"] = float(sp(exact).mean())
    else:
        from specdiff_kernels.models.digits_classifier import digit_confidence

        conf = lambda x: digit_confidence(x).numpy()  # noqa: E731
        c_ref = conf(ref)
        rec["ref_confidence_mean"] = float(c_ref.mean())
        rec["data_confidence_mean"] = float(conf(exact).mean())
    rec["ref_vs_exact"] = {
        "energy": energy_distance_statistic(ref, exact),
        "sliced_w1": sliced_wasserstein(ref, exact),
    }
    for name, x in sets.items():
        r = {
            "energy_vs_ref": energy_distance_statistic(x, ref),
            "sliced_w1_vs_ref": sliced_wasserstein(x, ref),
            "pvalue_vs_ref": two_sample_pvalue(x, ref, seed=0),
            "energy_vs_exact": energy_distance_statistic(x, exact),
            "sliced_w1_vs_exact": sliced_wasserstein(x, exact),
        }
        if model_key.startswith("gmm"):
            v = lp(x)
            r["loglik_ks_pvalue_vs_ref"] = float(sps.ks_2samp(v, lp_ref).pvalue)
            v = sp(x)
            r["spread_mean"] = float(v.mean())
            r["spread_ks_pvalue_vs_ref"] = float(sps.ks_2samp(v, sp_ref).pvalue)
        else:
            v = conf(x)
            r["confidence_mean"] = float(v.mean())
            r["confidence_ks_pvalue_vs_ref"] = float(sps.ks_2samp(v, c_ref).pvalue)
        rec[name] = r
    rec["seconds"] = {"sampling": t_sample, "total": time.perf_counter() - t0}
    log(
        f"  quality {model_key} N={N} {draft} L={L} M={M}: "
        + "; ".join(
            f"{k}: p={rec[k]['pvalue_vs_ref']:.3g} ED={rec[k]['energy_vs_ref']:.3g}" for k in sets
        )
        + f" ({rec['seconds']['total']:.0f}s)"
    )
    return rec


# ----------------------------------------------------------------------------- report
def fmt(v, spec=".3f"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def best_cell(cost, model, N, draft, key="seq_ratio_chain"):
    cs = [c for c in cost if c["model"] == model and c["N"] == N and c["draft"] == draft]
    return min(cs, key=lambda c: (c[key], c["L"])) if cs else None


def model_order(k):
    if k == "digits":
        return (1, 0, 0)
    dim, _, comp = k[3:].partition("k")
    return (0, int(dim), int(comp or 8))


def targets(cost, quality) -> list[tuple[str, str, str]]:
    rows = []
    dig = [c for c in cost if c["model"] == "digits" and c["N"] == 200]
    if dig:
        b = min(dig, key=lambda c: c["seq_ratio_chain"])
        rows.append(
            (
                "digits, N=200, best L: sequential target calls / ancestral <= 0.35",
                f"{b['seq_ratio_chain']:.3f} per chain ({b['seq_ratio_batch']:.3f} batch of "
                f"{b['batch']}), L={b['L']}, draft {b['draft']}",
                "met" if b["seq_ratio_chain"] <= 0.35 else "MISSED",
            )
        )
        bw = min(dig, key=lambda c: c["wall_ratio_b1"])
        rows.append(
            (
                "digits, N=200, wall-clock at B=1 / ancestral <= 0.6 (best L)",
                f"{bw['wall_ratio_b1']:.2f} (L={bw['L']}, draft {bw['draft']}; "
                f"median of {bw['reps']} interleaved reps)",
                "met" if bw["wall_ratio_b1"] <= 0.6 else "MISSED",
            )
        )
    g = [
        c
        for c in cost
        if c["model"] == "gmm784" and c["N"] == 200 and c["L"] == 8 and c["draft"] == "x0+pf"
    ]
    if g:
        c = g[0]
        rows.append(
            (
                "GMM D=784, N=200, L=8: sequential target calls / ancestral <= 0.30",
                f"{c['seq_ratio_chain']:.3f} per chain ({c['seq_ratio_batch']:.3f} batch), "
                f"frozen x0 + prefetch",
                "met" if c["seq_ratio_chain"] <= 0.30 else "MISSED",
            )
        )
    if quality:
        m = len(quality)
        ps = [q["speculative"]["pvalue_vs_ref"] for q in quality]
        bad = [p for p in ps if p < 0.01 / m]
        rows.append(
            (
                "exactness: speculative vs independent ancestral, two-sample p > 0.01 / m "
                f"(Bonferroni over the m = {m} quality cells)",
                f"{m - len(bad)}/{m} cells pass; min p = {min(ps):.3g}; "
                f"{sum(p < 0.01 for p in ps)} cell(s) below 0.01 (about {0.01 * m:.2f} expected "
                f"by chance)",
                "met" if not bad else "MISSED",
            )
        )

        def few_p(q):
            f = q[f"ancestral_{q['M_fewer_steps']}_steps"]
            k = "spread" if q["model"].startswith("gmm") else "confidence"
            return min(f["pvalue_vs_ref"], f[f"{k}_ks_pvalue_vs_ref"])

        det = [q for q in quality if few_p(q) < 0.01]
        miss = ", ".join(
            sorted(
                {
                    f"{q['model']} N={q['N']} (M={q['M_fewer_steps']}, p={few_p(q):.2g})"
                    for q in quality
                    if few_p(q) >= 0.01
                }
            )
        )
        rows.append(
            (
                "(contrast) ancestral with M = the speculative sequential-call budget is detected "
                "as a different law (two-sample or spread/confidence KS p < 0.01)",
                f"{len(det)}/{m} cells" + (f"; not detected: {miss}" if miss else ""),
                "info",
            )
        )
    return rows


def write_report(mode, cost, quality, meta, out: Path) -> None:
    cost = sorted(
        cost, key=lambda c: (model_order(c["model"]), c["N"], c["L"], DRAFT_NAMES.index(c["draft"]))
    )
    quality = sorted(quality, key=lambda q: (model_order(q["model"]), q["N"], q["draft"]))
    stem = f"sampler_{mode}"
    head = json.dumps({"meta": meta, "targets": targets(cost, quality)}, indent=1)[:-2]

    def slim(r):
        r = dict(r)
        if "acceptance_by_step" in r:
            r["acceptance_by_step"] = [
                None if a is None else round(a, 3) for a in r["acceptance_by_step"]
            ]
        return clean(r)

    body = ",\n".join(
        f' "{k}": [\n' + ",\n".join("  " + json.dumps(slim(r)) for r in recs) + "\n ]"
        for k, recs in (("cost", cost), ("quality", quality))
    )
    pngs = make_plots(stem, cost, out)
    L = []
    L.append(f"# Speculative vs ancestral sampling, end to end ({mode} mode)\n")
    L.append(
        f"Command: `{meta['command']}`. CPU: {meta['cpu']} ({meta['cores']} cores, shared with other "
        f"jobs: load average {meta['load']} during the run, so wall-clock numbers are medians of "
        f"interleaved repetitions and are noisy), torch {meta['torch']}, "
        f"{meta['threads']} torch thread(s). DDPM ancestral chain (linear betas, T=1000, "
        f"'leading' respacing to N steps, fixed_small variance, epsilon prediction; digits: x0 "
        f"clipped to [-1, 1]); float32 states. Ratios are speculative / ancestral at the same N. "
        f"Cost statistics: one ragged batch of B={meta['batch']} chains (seed {SEED}). GMM networks "
        f"are called in micro-batches of max(8, 32768 // D) states (ancestral and speculative "
        f"alike: the exact GMM denoiser's [B, K, D] float64 temporaries fall out of cache above "
        f"that and its cost per state grows 3-5x); the digits MLP is called whole.\n"
    )
    if mode == "full":
        L.append(
            "Full-mode grid limits (time on 2 shared cores): "
            + "; ".join(
                f"{mk} N={N}: drafts {', '.join(d)} only" for (mk, N), d in FULL_LIMITS.items()
            )
            + ". Quality cells skipped: "
            + ", ".join(f"{mk} N={N}" for mk, N in sorted(FULL_QUALITY_SKIP))
            + ". Timing repetitions at B=64 stop after the first when one repetition of a "
            "group took more than a minute (see `big_reps` per cell in the JSON).\n"
        )
    L.append(
        "Columns: **seq/chain** = sequential target calls one chain needs (mean over the batch; "
        "rounds x calls per round) / N -- the latency of B=1; **seq/batch** = sequential calls "
        "of the whole ragged batch / N; **evals** = total target evaluations / (B N) "
        "(compute); **acc/round** = mean accepted draft steps per round, **commit/round** = "
        "committed steps per round (accepted + the reflected one); **acc pos** = acceptance at "
        f"window positions 0, L/2, L-1; **wall B=1**, **wall B={meta['batch']}** = wall-clock / ancestral "
        "(median over interleaved reps); **net%** = share of the speculative wall time spent "
        "inside target+draft network calls at B=1 (the rest is sampler overhead). Draft "
        "`model`: **drafts** = sequential draft-network calls / N (not in seq/chain).\n"
    )
    L.append("## Targets\n")
    L.append("| target | measured | |\n|---|---|---|")
    for t, v, s in targets(cost, quality):
        L.append(f"| {t} | {v} | **{s}** |")
    L.append("")
    # headline: N=200, best L per (model, draft)
    L.append("## Best window per model and draft (N = 200)\n")
    L.append(headline_table(cost, 200))
    if quality:
        L.append("## Quality beside speed\n")
        L.append(
            "Every sample set is compared with an INDEPENDENT ancestral run at the same N "
            "(`ref`, its own seed). `ancestral (indep.)` is a second independent ancestral run "
            "(what a perfect sampler scores), `speculative` is the speculative sampler at the "
            "listed L, `ancestral M steps` is the plain chain with M = the speculative "
            "per-chain sequential-call budget. ED = energy distance, SW = sliced W1, p = "
            "two-sample p-value (per-coordinate KS + energy permutation test, Bonferroni). "
            "GMM: spread = mean over samples of ||x - mu_k||^2 / (D sigma_k^2) for the sample's most "
            "likely component k (exact mixture samples: 1; too few steps: under-dispersed) and "
            "the KS p-value of the per-sample spread against ref (the JSON also has a KS test of "
            "log p(x) under the true mixture); "
            "digits: mean classifier confidence and its KS p-value against ref. "
            "'vs exact': energy distance to exact mixture samples / the digits data set.\n"
        )
        L.append(quality_table(quality))
    L.append("## Where speculative sampling does not pay\n")
    L.append(negatives_text(cost))
    L.append("## Acceptance profile\n")
    L.append(acceptance_text(cost))
    if pngs:
        L.append("## Plots\n")
        for p in pngs:
            L.append(f"![{p}]({p})")
        L.append("")
    L.append("## All cells\n")
    L.append(full_table(cost))
    # the JSON with one record per line: diffs of a rerun show which cells changed
    common.write_results(out / stem, head + ",\n" + body + "\n}\n", "\n".join(L) + "\n")


def _row(c):
    acc = c["acceptance_by_position"]
    Lw = len(acc)
    pos = "/".join(fmt(acc[j], ".2f") for j in sorted({0, Lw // 2, Lw - 1}))
    net = (c["target_s_b1"] + c["draft_s_b1"]) / c["wall_b1"] * 100 if c["wall_b1"] else math.nan
    drafts = fmt(c["draft_calls_ratio"], ".2f") if c["draft"] == "model" else "-"
    return (
        f"| {c['model']} | {c['N']} | {c['L']} | {c['draft']} | {fmt(c['seq_ratio_chain'])} | "
        f"{fmt(c['seq_ratio_batch'])} | {fmt(c['evals_ratio'], '.2f')} | {drafts} | {c['rounds']} | "
        f"{fmt(c['mean_accepted_per_round'], '.2f')} | {fmt(c['mean_committed_per_round'], '.2f')} | "
        f"{pos} | {fmt(c['wall_ratio_b1'], '.2f')} | {fmt(c['wall_ratio_bB'], '.2f')} | {fmt(net, '.0f')} |"
    )


HEAD = (
    "| model | N | L | draft | seq/chain | seq/batch | evals | drafts | rounds | acc/round | "
    "commit/round | acc pos 0/mid/last | wall B=1 | wall B={B} | net% |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def headline_table(cost, N):
    rows = [HEAD.format(B=cost[0]["batch"])]
    for mk in sorted({c["model"] for c in cost}, key=model_order):
        for d in DRAFT_NAMES:
            b = best_cell(cost, mk, N, d)
            if b:
                rows.append(_row(b))
    return "\n".join(rows) + "\n\n(best L = smallest seq/chain.)\n"


def full_table(cost):
    return "\n".join([HEAD.format(B=cost[0]["batch"])] + [_row(c) for c in cost]) + "\n"


def quality_table(quality):
    rows = [
        "| model | N | draft, L | M | sample set | ED vs ref | SW vs ref | p vs ref | "
        "GMM spread / digits confidence (KS p vs ref) | ED vs exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for q in quality:
        gm = q["model"].startswith("gmm")
        refv = q["ref_spread_mean"] if gm else q["ref_confidence_mean"]
        rows.append(
            f"| {q['model']} (n={q['n']}) | {q['N']} | {q['draft']}, {q['L']} | {q['M_fewer_steps']} | ref "
            f"(ancestral, N={q['N']}) | 0 | 0 | - | {fmt(refv, '.3f')} | "
            f"{fmt(q['ref_vs_exact']['energy'], '.4f')} |"
        )
        for name in ("ancestral_indep", "speculative", f"ancestral_{q['M_fewer_steps']}_steps"):
            r = q[name]
            v = r["spread_mean"] if gm else r["confidence_mean"]
            kp = r["spread_ks_pvalue_vs_ref"] if gm else r["confidence_ks_pvalue_vs_ref"]
            label = {"ancestral_indep": "ancestral (indep.)", "speculative": "**speculative**"}.get(
                name, f"ancestral {q['M_fewer_steps']} steps"
            )
            rows.append(
                f"| | | | | {label} | {fmt(r['energy_vs_ref'], '.4f')} | "
                f"{fmt(r['sliced_w1_vs_ref'], '.4f')} | {fmt(r['pvalue_vs_ref'], '.3g')} | "
                f"{fmt(v, '.3f')} ({fmt(kp, '.2g')}) | {fmt(r['energy_vs_exact'], '.4f')} |"
            )
    return "\n".join(rows) + "\n"


def negatives_text(cost):
    out = []
    for mk in sorted({c["model"] for c in cost}, key=model_order):
        for N in sorted({c["N"] for c in cost if c["model"] == mk}):
            cs = [c for c in cost if c["model"] == mk and c["N"] == N]
            b1 = min(cs, key=lambda c: c["wall_ratio_b1"])
            bB = min(cs, key=lambda c: c["wall_ratio_bB"])
            bs = min(cs, key=lambda c: c["seq_ratio_chain"])
            out.append(
                f"- {mk}, N={N}: best seq/chain {bs['seq_ratio_chain']:.3f} (L={bs['L']}, "
                f"{bs['draft']}, evals x{bs['evals_ratio']:.2f}); best wall-clock B=1 "
                f"x{b1['wall_ratio_b1']:.2f} (L={b1['L']}, {b1['draft']}), best B={b1['batch']} "
                f"x{bB['wall_ratio_bB']:.2f} (L={bB['L']}, {bB['draft']}); ancestral "
                f"{b1['anc_wall_b1'] * 1e3 / N:.2f} ms/step at B=1 of which "
                f"{b1['anc_target_s_b1'] * 1e3 / N:.2f} ms in the network"
            )
    return "\n".join(out) + "\n"


def acceptance_text(cost):
    out = []
    for mk in sorted({c["model"] for c in cost}, key=model_order):
        cs = [
            c
            for c in cost
            if c["model"] == mk and c["N"] == 200 and c["draft"] == "x0+pf" and c["L"] == 8
        ]
        if not cs:
            continue
        a = np.array([np.nan if v is None else v for v in cs[0]["acceptance_by_step"]], dtype=float)
        N = len(a)
        parts = []
        for lo, hi in (
            (0, N // 4),
            (N // 4, N // 2),
            (N // 2, 3 * N // 4),
            (3 * N // 4, N - 10),
            (N - 10, N),
        ):
            parts.append(f"steps {lo}-{hi - 1}: {np.nanmean(a[lo:hi]):.2f}")
        out.append(
            f"- {mk} (N=200, L=8, frozen x0 + prefetch), acceptance by sampling step "
            f"(0 = noise end): " + ", ".join(parts)
        )
    return "\n".join(out) + "\n"


@dataclass
class PlotData:
    """The cost records and what every plot selects them by: the models, the drafts present and
    the N the plots show (200 where it was run)."""

    cost: list

    @property
    def Ns(self) -> list[int]:
        return sorted({c["N"] for c in self.cost})

    @property
    def N0(self) -> int:
        return 200 if 200 in self.Ns else self.Ns[0]

    @property
    def models(self) -> list[str]:
        return sorted({c["model"] for c in self.cost}, key=model_order)

    @property
    def drafts(self) -> list[str]:
        return [d for d in DRAFT_NAMES if any(c["draft"] == d for c in self.cost)]

    def cells(self, model: str, draft: str, **where) -> list[dict]:
        """The records of (model, N0, draft) matching ``where``, by increasing L."""
        cs = [
            c
            for c in self.cost
            if c["model"] == model
            and c["N"] == self.N0
            and c["draft"] == draft
            and all(c[k] == v for k, v in where.items())
        ]
        return sorted(cs, key=lambda c: c["L"])


def plot_ratio_vs_L(plt, data: PlotData):
    """Sequential calls and evaluations vs L per model, one column per draft."""
    drafts = data.drafts
    fig, axes = plt.subplots(
        2, len(drafts), figsize=(3.4 * len(drafts), 6.4), sharex=True, squeeze=False
    )
    for j, d in enumerate(drafts):
        for mk in data.models:
            cs = data.cells(mk, d)
            if not cs:
                continue
            Ls = [c["L"] for c in cs]
            lab = mk if mk == "digits" else f"GMM D={mk[3:]}".replace("k", ", K=")
            axes[0, j].plot(Ls, [c["seq_ratio_chain"] for c in cs], "o-", label=lab)
            axes[1, j].plot(Ls, [c["evals_ratio"] for c in cs], "o-", label=lab)
        axes[0, j].set_title(DRAFT_LABEL[d], fontsize=9)
        axes[0, j].axhline(0.5, color="gray", ls=":", lw=1)
        axes[1, j].axhline(1.0, color="gray", ls=":", lw=1)
        axes[1, j].set_xlabel("window L")
        axes[0, j].set_xscale("log", base=2)
        axes[0, j].set_ylim(0, max(1.05, axes[0, j].get_ylim()[1]))
    axes[0, 0].set_ylabel("sequential target calls / N\n(per chain)")
    axes[1, 0].set_ylabel("target evaluations / (B N)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"speculative / ancestral cost vs window, N={data.N0} (dotted: paper's 0.5; ancestral 1.0)"
    )
    return fig


def plot_acceptance(plt, data: PlotData, by: str):
    """Acceptance of the frozen-x0 and the draft-model drafts, ``by`` "position" in the window
    (largest L) or sampling "step" (L = 8: where rejections concentrate)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, d in zip(axes[0], ("x0+pf", "model")):
        for mk in data.models:
            if by == "position":
                cs = data.cells(mk, d)
                if cs:
                    acc = cs[-1]["acceptance_by_position"]
                    ax.plot(range(len(acc)), acc, "o-", ms=3, label=f"{mk} (L={cs[-1]['L']})")
            else:
                cs = data.cells(mk, d, L=8)
                if cs:
                    a = [np.nan if v is None else v for v in cs[0]["acceptance_by_step"]]
                    ax.plot(range(len(a)), a, "-", lw=1, label=mk)
        if by == "position":
            ax.set_title(f"{DRAFT_LABEL[d]}, N={data.N0}", fontsize=10)
            ax.set_xlabel("position j in the window")
            ax.set_ylabel("P(accept step j | steps < j accepted)")
        else:
            ax.set_title(f"{DRAFT_LABEL[d]}, N={data.N0}, L=8", fontsize=10)
            ax.set_xlabel("sampling step k (0 = pure noise, N-1 = data)")
            ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def plot_wall(plt, data: PlotData):
    """Wall-clock ratio vs L at B = 1 and B = batch."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, tag, b in zip(axes[0], ("b1", "bB"), ("1", str(data.cost[0]["batch"]))):
        for i, mk in enumerate(data.models):
            for d, ls in (("x0+pf", "o-"), ("model", "s--")):
                cs = data.cells(mk, d)
                if cs:
                    ax.plot(
                        [c["L"] for c in cs],
                        [c[f"wall_ratio_{tag}"] for c in cs],
                        ls,
                        ms=4,
                        color=f"C{i}",
                        label=f"{mk} {d}",
                    )
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("window L")
        ax.set_ylabel("wall-clock / ancestral")
        ax.set_title(f"B={b}, N={data.N0} (CPU, median of interleaved reps)", fontsize=10)
        ax.legend(fontsize=7)
    return fig


def plot_ratio_vs_N(plt, data: PlotData):
    """The best L's sequential calls per N (frozen x0 + prefetch)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for mk in data.models:
        pts = [(N, best_cell(data.cost, mk, N, "x0+pf")) for N in data.Ns]
        pts = [(N, c) for N, c in pts if c]
        ax.plot([N for N, _ in pts], [c["seq_ratio_chain"] for _, c in pts], "o-", label=mk)
    ax.set_xscale("log")
    ax.set_xlabel("N steps")
    ax.set_ylabel("best seq. target calls / N")
    ax.set_title("frozen x0 + prefetch, best L per N")
    ax.set_ylim(0, None)
    ax.legend(fontsize=8)
    return fig


def make_plots(stem, cost, out: Path) -> list[str]:
    """The report's PNGs, written beside it; their file names ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    data = PlotData(cost)
    plots = {
        "ratio_vs_L": lambda: plot_ratio_vs_L(plt, data),
        "acceptance_position": lambda: plot_acceptance(plt, data, "position"),
        "acceptance_step": lambda: plot_acceptance(plt, data, "step"),
        "wall": lambda: plot_wall(plt, data),
    }
    if len(data.Ns) > 1:
        plots["ratio_vs_N"] = lambda: plot_ratio_vs_N(plt, data)
    files = []
    for name, draw in plots.items():
        fig = draw()
        fig.tight_layout()
        files.append(f"{stem}_{name}.png")
        fig.savefig(out / files[-1], dpi=100)
        plt.close(fig)
    return files


# ----------------------------------------------------------------------------- main
class Store:
    """The records of finished cells, one JSON line each, so that a rerun skips what is there."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        if fresh and path.exists():
            path.unlink()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(clean(rec)) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="representative subset, < 5 min")
    ap.add_argument("--models", nargs="+", help="subset of the mode's models (gmm<D>, digits)")
    ap.add_argument("--steps", type=int, nargs="+", help="subset of N")
    ap.add_argument("--windows", type=int, nargs="+", help="override L")
    ap.add_argument("--drafts", nargs="+", choices=DRAFT_NAMES, help="override drafts")
    ap.add_argument("--only", choices=("cost", "quality"), help="run only this part")
    ap.add_argument("--reps", type=int, help="timing repetitions at B=1")
    ap.add_argument("--big-reps", type=int, help="timing repetitions at B=batch")
    ap.add_argument("--quality-n", type=int, help="samples per set in the quality cells")
    ap.add_argument(
        "--rep-budget",
        type=float,
        help="skip further timing reps of a group/batch "
        "size once one took longer than this many seconds",
    )
    ap.add_argument(
        "--batch", type=int, help="chains of the cost-statistics / big-batch timing run (64)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="discard stored records of this mode")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=str(common.RESULTS), help="output folder")
    return ap.parse_args(argv)


def mode_config(args: argparse.Namespace) -> tuple[str, dict]:
    """The mode ("quick" or "full") and its grid with the arguments' overrides."""
    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    for k in ("models", "steps", "windows", "drafts"):
        if getattr(args, k):
            cfg[k] = getattr(args, k)
    if args.steps:
        cfg["q_steps"] = [N for N in cfg["q_steps"] if N in args.steps]
    overrides = {
        "reps": args.reps,
        "big_reps": args.big_reps,
        "q_n": args.quality_n,
        "rep_budget": args.rep_budget,
        "batch": args.batch,
    }
    cfg.update({k: v for k, v in overrides.items() if v})
    return mode, cfg


def elapsed_log():
    """A log that prefixes each line with the seconds since it was made."""
    t0 = time.perf_counter()
    return lambda msg: common.log(f"[{time.perf_counter() - t0:7.1f}s] {msg}")


def available_models(cfg: dict, log) -> list[str]:
    avail = []
    for mk in cfg["models"]:
        try:
            load_model(mk)
            avail.append(mk)
        except (FileNotFoundError, OSError) as e:
            log(f"skipping {mk}: {e}")
    return avail


def run_cost(
    args, mode: str, cfg: dict, avail: list[str], store: Store, recs: list, loads: list, log
) -> None:
    """Every (model, N) group with a cell not yet in the store."""
    for mk in avail:
        for N in cfg["steps"]:
            have = {
                (r["L"], r["draft"])
                for r in recs
                if r["kind"] == "cost" and r["model"] == mk and r["N"] == N
            }
            drafts = cfg["drafts"]
            if mode == "full" and not args.drafts and (mk, N) in FULL_LIMITS:
                drafts = FULL_LIMITS[(mk, N)]
            Ls = [L for L in cfg["windows"] if any((L, d) not in have for d in drafts)]
            ds = [d for d in drafts if any((L, d) not in have for L in cfg["windows"])]
            if not Ls:
                continue
            log(f"cost group {mk} N={N}: L={Ls} drafts={ds}")
            for rec in run_group(
                mk, N, Ls, ds, cfg["reps"], cfg["big_reps"], cfg["batch"], log, cfg["rep_budget"]
            ):
                if (rec["L"], rec["draft"]) not in have:
                    store.append(rec)
                    recs.append(rec)
            loads.append(os.getloadavg()[0])


def run_quality(
    mode: str, cfg: dict, avail: list[str], store: Store, recs: list, loads: list, log
) -> None:
    """Every quality cell not yet in the store, at the best L of its cost cells."""
    for mk in avail:
        for N in cfg["q_steps"]:
            if mode == "full" and (mk, N) in FULL_QUALITY_SKIP:
                continue  # too slow on 2 cores (documented in the report)
            for d in cfg["q_drafts"]:
                if any(
                    r["kind"] == "quality" and r["model"] == mk and r["N"] == N and r["draft"] == d
                    for r in recs
                ):
                    continue
                b = best_cell([r for r in recs if r["kind"] == "cost"], mk, N, d)
                D = int(np.prod(load_model(mk).event_shape))
                n = cfg["q_n"] if D < 784 else min(cfg["q_n"], 512)
                rec = quality_cell(mk, N, d, b["L"] if b else 8, n, log)
                store.append(rec)
                recs.append(rec)
                loads.append(os.getloadavg()[0])


def report_meta(args, mode: str, cfg: dict, cost: list, loads: list) -> dict:
    allload = [x for r in cost for x in r.get("loadavg", [])] + loads
    cmd = (
        "python bench/bench_sampler.py --quick"
        if args.quick
        else "python bench/bench_sampler.py (resumable; may be run in pieces with --models / --steps)"
    )
    env = common.environment("cpu")
    return {
        "mode": mode,
        "command": cmd,
        "cpu": env["cpu"],
        "cores": env["cores"],
        "torch": env["torch"],
        "threads": env["threads"],
        "batch": cfg["batch"],
        "load": f"{min(allload):.1f}-{max(allload):.1f}",
        "config": cfg,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--latency"]:
        # the latency cells (static vs ragged round vs the fastest ancestral chain, own cost and
        # aten calls per round): bench/bench_latency.py, which takes the remaining arguments
        from bench_latency import main as latency_main

        return latency_main(argv[1:])
    args = parse_args(argv)
    mode, cfg = mode_config(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store, log = Store(out / f"sampler_{mode}_cells.jsonl", args.fresh), elapsed_log()
    loads = [os.getloadavg()[0]]
    if not args.report_only:
        avail, recs = available_models(cfg, log), store.read()
        if args.only in (None, "cost"):
            run_cost(args, mode, cfg, avail, store, recs, loads, log)
        if args.only in (None, "quality"):
            run_quality(mode, cfg, avail, store, recs, loads, log)
    recs = store.read()
    cost = [r for r in recs if r["kind"] == "cost"]
    quality = [r for r in recs if r["kind"] == "quality"]
    if not cost:
        log("no cost records; nothing to report")
        return 1
    write_report(mode, cost, quality, report_meta(args, mode, cfg, cost, loads), out)
    log(f"report of {len(cost)} cost cells and {len(quality)} quality cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())

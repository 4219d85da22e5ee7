"""Quality against cost of samplers on the embedded models: the frontier (not a test).

For each model, each sampler cell is run with a few seeds; its samples are scored against the
model's data law, and its cost is read three ways: sequential network calls per chain (latency
with ideal batching), network evaluations per sample (compute) and wall-clock per chain at B = 1
(this CPU, eager). Samplers:

* ancestral DDPM-N (the model's own schedule, fixed_small variance) and speculative DDPM-N
  (``SpeculativeSampler(window=L)``, frozen-x0 draft): same law, fewer sequential calls;
* deterministic few-step solvers, diffusers' own step loops on the model's betas, x0 clipped
  where the model clips (``--solver-clip``; without it the patches UNet's solvers overshoot: 2/3
  of the pixels of DPM++2M-20 land outside [-1, 1]): DDIM (eta = 0), DPM-Solver++ 2M
  (``DPMSolverMultistepScheduler``) and UniPC (``UniPCMultistepScheduler``, bh2), one network
  call per step;
* SDE-DPM-Solver++ 2M (``dpmsolver_sde_transitions``; default and Karras sigmas), ancestral and
  speculative (a multistep chain); it has no x0 clipping option, so it runs unclipped.

Metrics (each against a floor: the same statistic of exact data against the same reference;
digits and patches samples are clamped to [-1, 1] first, as their pipelines' outputs are):

* ``gmm16``, ``gmm64``: squared energy distance (V-statistic) between the samples and 20,000
  exact draws from the mixture; floor: fresh exact draws, same n;
* ``digits``: Fréchet distance of the embedded digit classifier's 11 logits between the samples
  and one half of the real digits (a fresh random split per seed); floor: the other half;
* ``patches``: sliced 1-Wasserstein distance (128 directions, pixels) to as many held-out crops;
  floor: training crops. The spectrum gap (mean |log10| ratio of the radial power spectrum to
  2,048 held-out crops') is kept beside it.

Seeds: a seed s runs every cell with ``torch.Generator().manual_seed(s)`` (the samplers' noise is
counter-based: an ancestral and a speculative chain of one schedule and seed start from the same
noise and stay together while the windows are accepted; after a rejection they part).

Grid: DDPM N in {50, 100, 200, 1000} (L = 8, 32), the solvers and SDE-DPM++2M at k in {10, 20,
50, 100} (SDE speculative L in {4, 8, 16, 32}; the best L per k, fewest calls per chain, is
marked). ``patches`` (a UNet, ~5-10 ms per evaluation here) runs a subset: DDPM-200 (ancestral,
L = 8), SDE-DPM++2M-20/50 (ancestral, L = 4: at D = 3072 its windows are mostly rejected at the
first steps, so a longer window only adds evaluations), DPM++2M-20 and UniPC-20. Default sizes
(samples per cell and seed): gmm16 3,000, gmm64 1,500, digits 898, patches 64; 3 seeds, patches
1 (no standard error there). A time estimate is printed first (``--estimate-only`` stops there).

Each (cell, seed) result and each wall-clock measurement is appended to
``bench/results/frontier_<tag>_cells.jsonl`` as it finishes; a rerun with the same tag and sizes
skips them (``--redo sde`` re-runs the cached results whose id contains "sde"; delete the file
to start over). Cells that fail are reported, not cached.

    OMP_NUM_THREADS=1 python bench/bench_frontier.py            # the full run (estimate printed)
    OMP_NUM_THREADS=1 python bench/bench_frontier.py --quick    # a smoke run, < 2 minutes
    python bench/bench_frontier.py --models gmm16 --estimate-only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import _common as common
import _frontier_metrics as FM
import numpy as np
import torch

from specdiff_kernels import AncestralSampler, FrozenTargetDraft, SpeculativeSampler, models
from specdiff_kernels.sampling.transitions import dpmsolver_sde_transitions

MODELS = ("gmm16", "gmm64", "digits", "patches")
DDPM_N = (50, 100, 200, 1000)
DDPM_L = (8, 32)
SOLVER_K = (10, 20, 50, 100)
SDE_L = (4, 8, 16, 32)
SOLVERS = ("ddim", "dpm++2m", "unipc")
SDES = ("sde", "sde-karras")
NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM (eta=0)",
    "dpm++2m": "DPM++2M",
    "unipc": "UniPC",
    "sde": "SDE-DPM++2M",
    "sde-karras": "SDE-DPM++2M Karras",
}
# samples per cell and seed: sized so that the full run takes about 25 minutes on an idle core
SIZES = {"gmm16": 3000, "gmm64": 1500, "digits": 898, "patches": 64}
QUICK_SIZES = {"gmm16": 400, "gmm64": 400, "digits": 300, "patches": 4}
GMM_REF = 20000
DIGITS_HALF = 898  # sklearn's 1,797 digits: halves of 899 (reference) and 898 (floor)
PATCHES_SPECTRUM_REF = 2048


# ---------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    model: str
    sampler: str  # ddpm | ddim | dpm++2m | unipc | sde | sde-karras
    steps: int  # N (DDPM) or k (solvers)
    window: int = 0  # 0: ancestral / deterministic loop; L: speculative

    @property
    def key(self) -> str:
        return f"{self.model}|{self.sampler}|{self.steps}|{self.window}"

    @property
    def speculative(self) -> bool:
        return self.window > 0

    @property
    def diffusers(self) -> bool:
        return self.sampler in SOLVERS

    @property
    def family(self) -> str:
        """The plot's line this cell belongs to."""
        if self.sampler == "ddpm":
            return f"DDPM spec L={self.window}" if self.speculative else "DDPM ancestral"
        if self.sampler in SDES:
            return NAMES[self.sampler] + (" spec" if self.speculative else " ancestral")
        return NAMES[self.sampler]

    @property
    def label(self) -> str:
        s = f"{NAMES[self.sampler]}-{self.steps}"
        return s + (f" spec L={self.window}" if self.speculative else "")


def grid(model: str, quick: bool) -> list[Cell]:
    if model == "patches":
        if quick:
            return [Cell(model, "dpm++2m", 10), Cell(model, "sde", 10), Cell(model, "sde", 10, 4)]
        cells = [Cell(model, "ddpm", 200), Cell(model, "ddpm", 200, 8)]
        # L = 4: at D = 3072 the frozen-x0 draft's SDE windows are mostly rejected at their first
        # steps, so L = 8 costs ~1.7x the evaluations of L = 4 for the same calls per chain
        cells += [Cell(model, "sde", k, L) for k in (20, 50) for L in (0, 4)]
        return cells + [Cell(model, "dpm++2m", 20), Cell(model, "unipc", 20)]
    if quick:
        cells = [Cell(model, "ddpm", 50), Cell(model, "ddpm", 50, 8)]
        cells += [Cell(model, s, 10) for s in SOLVERS]
        return cells + [Cell(model, s, 10, L) for s in SDES for L in (0, 8)]
    cells = [Cell(model, "ddpm", N, L) for N in DDPM_N for L in (0, *DDPM_L)]
    cells += [Cell(model, s, k) for s in SOLVERS for k in SOLVER_K]
    return cells + [Cell(model, s, k, L) for s in SDES for k in SOLVER_K for L in (0, *SDE_L)]


# ---------------------------------------------------------------- models and their metrics
@dataclass
class Ctx:
    """A model as the bench needs it: the network ``net(x, t)``, its DDPM chain, schedule and
    metric. ``score(x, seed)`` and ``floor(seed)`` return ``{metric name: value}``, the first
    entry the primary metric."""

    name: str
    net: Callable
    shape: tuple
    abar: torch.Tensor
    prediction: str
    clip: Optional[float]
    ddpm: Callable[[int], object]
    n: int
    metric: str
    reference: str
    score: Callable[[torch.Tensor, int], dict]
    floor: Callable[[int], dict]
    solver_clip: Optional[float] = None  # x0 clipping of the diffusers solvers (--solver-clip)

    def run_id(self, cell: Cell) -> str:
        """A cell's id in the cache: clipped solver runs are told apart from unclipped ones."""
        clipped = cell.diffusers or cell.sampler.startswith("sde")
        return cell.key + ("|clip" if clipped and self.solver_clip is not None else "")


def gmm_ctx(name: str, n: int, n_ref: int) -> Ctx:
    m = models.load("gmm", dim=int(name[3:]))
    ref = FM.EnergyReference(m.data(n_ref, generator=torch.Generator().manual_seed(10**6)))
    return Ctx(
        name,
        m.target,
        tuple(m.event_shape),
        m.alphas_cumprod,
        m.prediction,
        m.clip_sample,
        m.transitions,
        n,
        "energy distance",
        f"{n_ref:,} exact draws from the mixture",
        lambda x, seed: {"energy": ref.distance(x)},
        # exact draws, disjoint from the reference's stream (another generator seed)
        lambda seed: {
            "energy": ref.distance(m.data(n, generator=torch.Generator().manual_seed(seed + 1)))
        },
    )


def digits_ctx(n: int) -> Ctx:
    from specdiff_kernels.models.digits import digits_dataset

    m = models.load("digits")
    data = digits_dataset()
    if n > DIGITS_HALF:
        raise SystemExit(f"--n-digits must be <= {DIGITS_HALF} (half the real digits), got {n}")
    halves: dict = {}

    def split(seed: int):
        if seed not in halves:
            perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
            ref, other = data[perm[: data.shape[0] - DIGITS_HALF]], data[perm[-DIGITS_HALF:]]
            halves[seed] = (ref, FM.digits_features(ref), other[:n])
        return halves[seed]

    def score(x, seed):
        ref, ref_feat, _ = split(seed)
        x = x.clamp(-1, 1)  # as a pipeline's output (the data lie in [-1, 1])
        return {
            "fd_logits": FM.frechet_distance(FM.digits_features(x), ref_feat),
            "fd_pixels": FM.frechet_distance(
                x.reshape(x.shape[0], -1).double().numpy(), ref.reshape(ref.shape[0], -1).numpy()
            ),
        }

    return Ctx(
        "digits",
        m.target,
        tuple(m.event_shape),
        m.alphas_cumprod,
        m.prediction,
        m.clip_sample,
        m.transitions,
        n,
        "Fréchet distance (classifier logits)",
        f"a random half ({data.shape[0] - DIGITS_HALF}) of the 1,797 real digits, per seed",
        score,
        lambda seed: score(split(seed)[2], seed),
    )


def patches_ctx(n: int) -> Ctx:
    from patches_quality import spectrum_gap

    from specdiff_kernels.integrations.diffusers import from_pipeline
    from specdiff_kernels.models import patches as P
    from specdiff_kernels.testing import two_sample as S

    pipe = P.load_pipeline()
    net, _ = from_pipeline(pipe, 200)
    refs: dict = {}

    def ref(seed: int):
        if seed not in refs:
            held = P.heldout_crops(max(n, PATCHES_SPECTRUM_REF), seed=100 + seed)
            refs[seed] = (held[:n], P.radial_power_spectrum(held)[1])
        return refs[seed]

    def score(x, seed):
        held, spectrum = ref(seed)
        x = x.float().clamp(-1, 1)  # as the pipeline's output (the crops lie in [-1, 1])
        if not bool(torch.isfinite(x).all()):
            return {"sliced_w1": math.inf, "spectrum_gap": math.inf}
        return {
            "sliced_w1": S.sliced_wasserstein(x, held, seed=1),
            "spectrum_gap": spectrum_gap(P.radial_power_spectrum(x)[1], spectrum),
        }

    cfg = pipe.scheduler.config
    return Ctx(
        "patches",
        net,
        (3, P.CROP, P.CROP),
        pipe.scheduler.alphas_cumprod.double(),
        cfg.prediction_type,
        float(cfg.clip_sample_range) if cfg.clip_sample else None,
        lambda N: from_pipeline(pipe, N)[1],
        n,
        "sliced W1 (pixels)",
        f"{n} held-out crops per seed",
        score,
        lambda seed: score(P.random_crops(n, torch.Generator().manual_seed(200 + seed)), seed),
    )


def make_ctx(name: str, n: int, n_ref: int) -> Ctx:
    if name.startswith("gmm"):
        return gmm_ctx(name, n, n_ref)
    return digits_ctx(n) if name == "digits" else patches_ctx(n)


# ---------------------------------------------------------------- samplers
def betas_of(abar: torch.Tensor) -> np.ndarray:
    a = abar.double()
    return (1 - a / torch.cat([a.new_ones(1), a[:-1]])).numpy()


def scheduler(ctx: Ctx, sampler: str):
    """A fresh diffusers scheduler with the model's training schedule (its betas, recovered from
    alphas_cumprod) and prediction type. With ``ctx.solver_clip`` (the model's clipping range, or
    None) x0 is clipped to it: DDIM's ``clip_sample``; DPM++ / UniPC "thresholding" at ratio 1
    with ``sample_max_value`` = the range, which is plain clipping (the dynamic threshold
    quantile(|x0|, 1) is clamped into [1, range])."""
    import diffusers

    cfg = dict(
        num_train_timesteps=int(ctx.abar.numel()),
        trained_betas=betas_of(ctx.abar),
        prediction_type=ctx.prediction,
    )
    clip = ctx.solver_clip
    if sampler == "ddim":
        return diffusers.DDIMScheduler(
            **cfg, clip_sample=clip is not None, clip_sample_range=clip or 1.0
        )
    if clip is not None:
        cfg.update(thresholding=True, dynamic_thresholding_ratio=1.0, sample_max_value=clip)
    if sampler == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler(
            **cfg, algorithm_type="dpmsolver++", solver_order=2
        )
    return diffusers.UniPCMultistepScheduler(**cfg)


def transitions(ctx: Ctx, cell: Cell):
    if cell.sampler == "ddpm":
        return ctx.ddpm(cell.steps)
    if ctx.solver_clip is not None:
        # a model trained with clipping: diffusers' SDE-DPM-Solver++ clips x0 (thresholding at
        # ratio 1), current and previous prediction alike; not affine, so the ragged path
        import diffusers

        from specdiff_kernels.integrations.diffusers import diffusers_transitions

        sched = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=int(ctx.abar.numel()),
            trained_betas=betas_of(ctx.abar),
            prediction_type=ctx.prediction,
            algorithm_type="sde-dpmsolver++",
            use_karras_sigmas=cell.sampler == "sde-karras",
            thresholding=True,
            dynamic_thresholding_ratio=1.0,
            sample_max_value=ctx.solver_clip,
        )
        return diffusers_transitions(sched, cell.steps)
    return dpmsolver_sde_transitions(
        cell.steps,
        alphas_cumprod=ctx.abar,
        sigma_schedule="karras" if cell.sampler == "sde-karras" else "default",
        prediction=ctx.prediction,
    )


def chain_sampler(ctx: Ctx, cell: Cell):
    T = transitions(ctx, cell)
    if cell.speculative:
        return SpeculativeSampler(ctx.net, T, draft=FrozenTargetDraft("x0"), window=cell.window)
    return AncestralSampler(ctx.net, T)


def solver_loop(ctx: Ctx, sched, k: int, B: int, seed: int, timed: list | None = None):
    """The scheduler's own loop: x_T ~ N(0, init_noise_sigma^2), then one network call and one
    ``step`` per timestep. ``timed``: the loop's seconds are appended (set_timesteps excluded)."""
    g = torch.Generator().manual_seed(seed)
    sched.set_timesteps(k)
    x = torch.randn(B, *ctx.shape, generator=g) * sched.init_noise_sigma
    t0 = time.perf_counter()
    with torch.inference_mode():
        for t in sched.timesteps:
            out = ctx.net(sched.scale_model_input(x, t), t.expand(B))
            x = sched.step(out, t, x).prev_sample
    if timed is not None:
        timed.append(time.perf_counter() - t0)
    return x


def run_cell(ctx: Ctx, cell: Cell, seed: int) -> tuple[torch.Tensor, dict]:
    """Samples ``ctx.n`` chains of ``cell`` with ``seed``; the samples and the run's costs."""
    B = ctx.n
    t0 = time.perf_counter()
    if cell.diffusers:
        x = solver_loop(ctx, scheduler(ctx, cell.sampler), cell.steps, B, seed)
        info = dict(
            calls_per_chain=float(cell.steps),
            batch_calls=cell.steps,
            evals_per_sample=float(cell.steps),
            acceptance=None,
            steps_per_window=None,
        )
    else:
        res = chain_sampler(ctx, cell).sample(
            B, ctx.shape, generator=torch.Generator().manual_seed(seed)
        )
        st = res.stats
        x = res.samples
        info = dict(
            calls_per_chain=float(st.mean_chain_rounds),
            batch_calls=st.target_calls,
            evals_per_sample=st.target_evals / B,
            acceptance=None if math.isnan(st.acceptance_rate) else st.acceptance_rate,
            steps_per_window=None if math.isnan(st.steps_per_window) else st.steps_per_window,
        )
    info["sample_s"] = time.perf_counter() - t0
    return x, info


def wall_b1(ctx: Ctx, cell: Cell, chains: int) -> dict:
    """Seconds per chain of ``chains`` single-chain runs after one warm-up run (median, q20,
    q80): the latency of one sample on this CPU."""
    times: list[float] = []
    if cell.diffusers:
        sched = scheduler(ctx, cell.sampler)
        for c in range(chains + 1):
            solver_loop(ctx, sched, cell.steps, 1, 10_000 + c, times)
    else:
        s = chain_sampler(ctx, cell)
        for c in range(chains + 1):
            t0 = time.perf_counter()
            s.sample(1, ctx.shape, generator=torch.Generator().manual_seed(10_000 + c))
            times.append(time.perf_counter() - t0)
    t = common.Timing.of(times[1:])
    return {"wall_ms": t.median * 1e3, "wall_q20_ms": t.q20 * 1e3, "wall_q80_ms": t.q80 * 1e3}


# ---------------------------------------------------------------- time estimate
EVAL_FACTOR = {4: 1.4, 8: 1.6, 16: 2.0, 32: 2.6}  # evals / ancestral evals, rough, pessimistic
CALL_FACTOR = {4: 0.4, 8: 0.25, 16: 0.18, 32: 0.15}  # calls / chain over N, rough


def per_eval_seconds(ctx: Ctx, B: int) -> float:
    """Seconds per network evaluation inside a sampler at a batch of B chains: a short ancestral
    DDPM run (its network calls and its per-step work; the faster of 2 runs after a warm-up)."""
    steps = 4 if ctx.name == "patches" else 10
    s = AncestralSampler(ctx.net, ctx.ddpm(steps))
    times = []
    for seed in range(3):
        t0 = time.perf_counter()
        s.sample(B, ctx.shape, generator=torch.Generator().manual_seed(seed))
        times.append(time.perf_counter() - t0)
    return min(times[1:]) / (steps * B)


def estimate(ctx: Ctx, todo: list[Cell], seeds: list[int], walls: list[Cell], chains: int):
    """(sampling seconds, wall-clock seconds) of the uncached work, from one measured call."""
    per_eval, per_call = per_eval_seconds(ctx, ctx.n), per_eval_seconds(ctx, 1)

    def evals(c: Cell) -> float:
        if not c.speculative:
            return c.steps
        if ctx.name != "patches":
            return c.steps * EVAL_FACTOR.get(c.window, 3.0)
        # measured here: an evaluation inside a speculative round of the UNet costs ~2.3x one
        # of the ancestral chain; the SDE windows are mostly rejected early at D = 3072
        if c.sampler in SDES:
            return 2.3 * c.steps * 0.75 * (min(c.window, c.steps) + 1)
        return 2.3 * c.steps * EVAL_FACTOR.get(c.window, 3.0)

    def calls(c: Cell) -> float:
        return c.steps * (CALL_FACTOR.get(c.window, 0.15) if c.speculative else 1.0)

    sampling = sum(evals(c) for c in todo) * ctx.n * per_eval * len(seeds)
    # the speculative and scheduler loops' own per-step cost at B = 1 is about one small call
    wall = sum(calls(c) * 2 for c in walls) * per_call * (chains + 1)
    return sampling, wall


# ---------------------------------------------------------------- cache
class Cache:
    """The jsonl of finished (cell, seed) results, floors and wall-clock measurements."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.rows[r["id"]] = r

    def drop(self, patterns: list[str]) -> None:
        """Forgets (in this run; the file keeps them, later lines win) the results whose id
        contains one of ``patterns``."""
        for rid in [r for r in self.rows if any(p in r for p in patterns)]:
            del self.rows[rid]

    def get(self, rid: str) -> Optional[dict]:
        return self.rows.get(rid)

    def put(self, rid: str, row: dict) -> dict:
        row = {"id": rid, **row}
        self.rows[rid] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def size_tag(ctx: Ctx, n_ref: int) -> str:
    return f"n={ctx.n}" + (f"|ref={n_ref}" if ctx.name.startswith("gmm") else "")


# ---------------------------------------------------------------- aggregation
def mean_se(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None]
    if not v:
        return math.nan, math.nan
    m = statistics.fmean(v)
    return m, (statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else math.nan)


def aggregate(
    ctx: Ctx, cells: list[Cell], seeds: list[int], runs: dict, floors: list[dict], walls: dict
):
    names = list(floors[0]) if floors else []
    floor = {k: mean_se([f[k] for f in floors]) for k in names}
    rows = []
    for c in cells:
        rs = [runs[(c.key, s)] for s in seeds if (c.key, s) in runs]
        row = {
            "model": ctx.name,
            "sampler": c.sampler,
            "family": c.family,
            "label": c.label,
            "steps": c.steps,
            "window": c.window,
            "n": ctx.n,
            "seeds": [r["seed"] for r in rs if "error" not in r],
        }
        errors = [r["error"] for r in rs if "error" in r]
        ok = [r for r in rs if "error" not in r]
        if errors:
            row["error"] = errors[0]
        if ok:
            for k in names:
                m, se = mean_se([r["metrics"][k] for r in ok])
                row[k] = {"mean": m, "se": se, "values": [r["metrics"][k] for r in ok]}
            row["metric"] = row[names[0]]["mean"]
            row["metric_se"] = row[names[0]]["se"]
            for k in ("calls_per_chain", "evals_per_sample", "acceptance", "steps_per_window"):
                row[k] = mean_se([r[k] for r in ok])[0]
            row["batch_calls"] = max(r["batch_calls"] for r in ok)
            row["sample_s"] = sum(r["sample_s"] for r in ok)
            row["metric_s"] = sum(r.get("metric_s", 0.0) for r in ok)
        row.update(walls.get(c.key, {}))
        rows.append(row)
    for cost, tag in (("calls_per_chain", "pareto_calls"), ("evals_per_sample", "pareto_evals")):
        for r, p in zip(
            rows, FM.pareto([(r.get(cost, math.nan), r.get("metric", math.nan)) for r in rows])
        ):
            r[tag] = p
    for r, p in zip(
        rows, FM.pareto([(r.get("wall_ms", math.nan), r.get("metric", math.nan)) for r in rows])
    ):
        r["pareto_wall"] = p
    # speculative minus ancestral, seed by seed: the pair shares its noise until the first
    # rejection, so the paired difference resolves far less than either standard error would
    by_key = {(r["sampler"], r["steps"], r["window"]): r for r in rows}
    for r in rows:
        anc = by_key.get((r["sampler"], r["steps"], 0))
        if r["window"] and anc and "metric" in r and "metric" in anc:
            va = dict(zip(anc["seeds"], anc[names[0]]["values"]))
            d = [v - va[s] for s, v in zip(r["seeds"], r[names[0]]["values"]) if s in va]
            r["minus_ancestral"], r["minus_ancestral_se"] = mean_se(d)
    # the best speculative window of each SDE schedule and k: fewest sequential calls per chain
    for s in SDES:
        for k in {r["steps"] for r in rows if r["sampler"] == s}:
            spec = [r for r in rows if r["sampler"] == s and r["steps"] == k and r["window"] > 0]
            spec = [r for r in spec if "calls_per_chain" in r]
            if spec:
                min(spec, key=lambda r: r["calls_per_chain"])["best_window"] = True
    if names:  # every cell carries its model's floor (primary metric), for readers of the JSON
        for r in rows:
            r["floor"], r["floor_se"] = floor[names[0]]
    return rows, {k: {"mean": m, "se": se} for k, (m, se) in floor.items()}


# ---------------------------------------------------------------- output
def fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def finite_json(obj):
    """``obj`` with NaN / inf floats as None: strict JSON (json.dumps writes NaN otherwise)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def z_score(m: float, se: float, floor: float, floor_se: float) -> float:
    """The excess over the floor in joint standard errors: |z| < 2 is "at the floor"."""
    s = math.hypot(0 if math.isnan(se) else se, 0 if math.isnan(floor_se) else floor_se)
    return (m - floor) / s if s > 0 else math.nan


def paired(r: dict) -> str:
    if "minus_ancestral" not in r:
        return ""
    return f"{r['minus_ancestral']:+.2g} ± {fmt(r['minus_ancestral_se'], 2)}"


def markdown(meta: dict, results: dict) -> str:
    lines = [
        f"# Quality against cost: the samplers' frontier ({meta['cpu']}, cpu)",
        "",
        f"`{meta['command']}`; torch {meta['torch']}, {meta['threads']} thread(s), eager; "
        f"load average at the start {meta['load_average']} on {meta['cores']} cores (a loaded "
        f"machine slows the wall-clock column, not the metrics or counts); total "
        f"{meta['total_s']:.0f} s (the cells' own, cached ones included: {meta['cells_s']:.0f} s).",
        "",
        "Costs: **calls / chain** = sequential network calls one chain needs (speculative: the "
        "round in which it finished, mean over chains); **evals / sample** = states the network "
        "evaluated per sample; **wall B=1** = median seconds of one single-chain run after a "
        f"warm-up ({meta['wall_chains']} runs; patches {meta['wall_chains_patches']}). Metric: "
        "mean over seeds ± standard error (a seed is the same generator seed in every cell). "
        "**spec - anc**: the speculative cell's metric minus its ancestral chain's, seed by "
        "seed (mean ± s.e.): the two share their noise until a rejection, so this resolves "
        "what the plain s.e. cannot; speculative sampling is exact, so it should be ~0 (with "
        "3 seeds a ratio to its s.e. is a t with 2 degrees of freedom: |t| > 4.3 at 5%, and "
        "there are dozens of cells). **z**: (metric - floor) / joint s.e. (|z| < 2: "
        "indistinguishable from exact data at this n). **P**: Pareto-optimal in (calls, "
        "metric) / (evals, metric) / (wall, metric): c, e, w. Speculative: frozen-x0 draft, "
        "fixed window L.",
        "",
    ]
    for name, res in results.items():
        fl = res["floor"]
        primary = res["metric_key"]
        f = fl.get(primary, {"mean": math.nan, "se": math.nan})
        lines += [
            f"## {name}: {res['metric']} to {res['reference']}",
            "",
            f"n = {res['n']} samples per cell and seed, seeds {res['seeds']}; floor (exact data, "
            f"same n): **{fmt(f['mean'])}** ± {fmt(f['se'], 2)}"
            + "".join(
                f"; {k} floor {fmt(v['mean'])} ± {fmt(v['se'], 2)}"
                for k, v in fl.items()
                if k != primary
            )
            + ".",
            "",
            "| sampler | N / k | L | metric ± s.e. | z | spec - anc | calls / chain | "
            "evals / sample | wall B=1 [ms] | acceptance | P |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["cells"]:
            if "error" in r and "metric" not in r:
                lines.append(
                    f"| {NAMES[r['sampler']]} | {r['steps']} | {r['window'] or '-'} | "
                    f"FAILED: {r['error'][:120]} | | | | | | | |"
                )
                continue
            if "metric" not in r:
                continue
            marks = "".join(
                ch
                for ch, k in (("c", "pareto_calls"), ("e", "pareto_evals"), ("w", "pareto_wall"))
                if r.get(k)
            )
            best = " (best L)" if r.get("best_window") else ""
            z = z_score(r["metric"], r["metric_se"], f["mean"], f["se"])
            lines.append(
                f"| {NAMES[r['sampler']]} | {r['steps']} | {r['window'] or '-'}{best} | "
                f"{fmt(r['metric'])} ± {fmt(r['metric_se'], 2)} | {fmt(z, 2)} | "
                f"{paired(r)} | "
                f"{r['calls_per_chain']:.1f} | "
                f"{r['evals_per_sample']:.1f} | {fmt(r.get('wall_ms'), 3)} | "
                f"{fmt(r.get('acceptance'), 3)} | {('**' + marks + '**') if marks else ''} |"
            )
        lines.append("")
    acc = acceptance_table(results)
    if acc:
        lines += acc
    lines += [f"![frontier]({meta['png']})", ""]
    return "\n".join(lines)


def acceptance_table(results: dict) -> list[str]:
    """Speculative SDE-DPM++2M acceptance by dimension: one column per model."""
    dims = {"gmm16": 16, "gmm64": 64, "digits": 64, "patches": 3072}
    names = [
        m for m in results if any(r["sampler"] in SDES and r["window"] for r in results[m]["cells"])
    ]
    if not names:
        return []
    keys = sorted(
        {
            (r["sampler"], r["steps"], r["window"])
            for m in names
            for r in results[m]["cells"]
            if r["sampler"] in SDES and r["window"]
        }
    )
    out = [
        "## Speculative SDE-DPM++2M: acceptance rate by dimension",
        "",
        "| sampler | k | L | " + " | ".join(f"{m} (D={dims[m]})" for m in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for s, k, L in keys:
        vals = []
        for m in names:
            r = next(
                (
                    r
                    for r in results[m]["cells"]
                    if (r["sampler"], r["steps"], r["window"]) == (s, k, L)
                ),
                None,
            )
            vals.append(fmt(r.get("acceptance"), 3) if r else "")
        out.append(f"| {NAMES[s]} | {k} | {L} | " + " | ".join(vals) + " |")
    out += [
        "",
        "Best window per k (fewest sequential calls per chain; ties: the shorter window): "
        "L (its calls / chain; the ancestral chain makes k).",
        "",
        "| sampler | k | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for s, k in sorted({(s, k) for s, k, _ in keys}):
        vals = []
        for m in names:
            r = next(
                (
                    r
                    for r in results[m]["cells"]
                    if (r["sampler"], r["steps"]) == (s, k) and r.get("best_window")
                ),
                None,
            )
            vals.append(f"{r['window']} ({r['calls_per_chain']:.1f})" if r else "")
        out.append(f"| {NAMES[s]} | {k} | " + " | ".join(vals) + " |")
    return out + [""]


STYLE = {
    "DDPM ancestral": ("C0", "-", "o"),
    "DDPM spec L=8": ("C0", "--", "^"),
    "DDPM spec L=32": ("C0", ":", "v"),
    "DDIM (eta=0)": ("C1", "-", "s"),
    "DPM++2M": ("C2", "-", "D"),
    "UniPC": ("C3", "-", "P"),
    "SDE-DPM++2M ancestral": ("C4", "-", "o"),
    "SDE-DPM++2M spec": ("C4", "--", "^"),
    "SDE-DPM++2M Karras ancestral": ("C5", "-", "o"),
    "SDE-DPM++2M Karras spec": ("C5", "--", "^"),
}


AXES = (
    ("calls_per_chain", "pareto_calls", "sequential network calls per chain"),
    ("evals_per_sample", "pareto_evals", "network evaluations per sample"),
    ("wall_ms", "pareto_wall", "wall-clock per chain at B = 1 [ms] (this CPU)"),
)


def plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    names = list(results)
    walls = any("wall_ms" in r for res in results.values() for r in res["cells"])
    nrows = 3 if walls else 2
    fig, axes = plt.subplots(
        nrows, len(names), figsize=(max(8.0, 5.2 * len(names)), 5 * nrows), squeeze=False
    )
    for j, name in enumerate(names):
        res = results[name]
        rows = [r for r in res["cells"] if "metric" in r and math.isfinite(r["metric"])]
        f = res["floor"].get(res["metric_key"])
        for i, (cost, ptag, xlabel) in enumerate(AXES[: len(axes)]):
            ax = axes[i][j]
            crows = [r for r in rows if math.isfinite(r.get(cost, math.nan))]
            for fam, (color, ls, marker) in STYLE.items():
                pts = [r for r in crows if r["family"] == fam]
                if fam.endswith(" spec") and "SDE" in fam:
                    # the line joins each k's best window; the other windows are faint points
                    rest = [r for r in pts if not r.get("best_window")]
                    if rest:
                        ax.plot(
                            [r[cost] for r in rest],
                            [r["metric"] for r in rest],
                            marker,
                            color=color,
                            ms=3,
                            alpha=0.35,
                        )
                    pts = [r for r in pts if r.get("best_window")]
                    label = fam + " (best L)"
                else:
                    label = fam
                if not pts:
                    continue
                pts.sort(key=lambda r: r["steps"])
                ax.errorbar(
                    [r[cost] for r in pts],
                    [r["metric"] for r in pts],
                    yerr=[0 if math.isnan(r["metric_se"]) else r["metric_se"] for r in pts],
                    color=color,
                    ls=ls,
                    marker=marker,
                    ms=4,
                    lw=1.2,
                    capsize=2,
                    label=label,
                )
            front = sorted((r for r in crows if r.get(ptag)), key=lambda r: r[cost])
            if front:
                ax.plot(
                    [r[cost] for r in front],
                    [r["metric"] for r in front],
                    "o",
                    mfc="none",
                    mec="k",
                    ms=10,
                    mew=1.2,
                    label="Pareto front",
                )
            if f and math.isfinite(f["mean"]):
                ax.axhline(
                    f["mean"], color="gray", ls="--", lw=1, label="floor (exact data) ± 2 s.e."
                )
                if math.isfinite(f["se"]):
                    ax.axhspan(
                        f["mean"] - 2 * f["se"], f["mean"] + 2 * f["se"], color="gray", alpha=0.15
                    )
            ax.set_xscale("log")
            # labels at 1, 2, 5 x 10^k, written plainly: the default minor labels overlap
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            if rows and all(r["metric"] > 0 for r in rows) and (not f or f["mean"] > 0):
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(res["metric"])
            ax.set_title(f"{name}")
            ax.grid(alpha=0.3, which="both")
    # one legend for all panels, below them: inside a panel it hides points
    seen: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.suptitle("quality against cost (lower is better; circles: Pareto-optimal)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.legend(
        seen.values(),
        seen.keys(),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=2 if len(names) == 1 else 4,
        fontsize=8,
    )
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None, help="default: all")
    ap.add_argument("--quick", action="store_true", help="smoke run: gmm16 + digits, few cells")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; quick 1)")
    ap.add_argument("--patches-seeds", type=int, default=1, help="seeds of the patches cells")
    ap.add_argument("--n-gmm16", type=int, default=None)
    ap.add_argument("--n-gmm64", type=int, default=None)
    ap.add_argument("--n-digits", type=int, default=None)
    ap.add_argument("--n-patches", type=int, default=None)
    ap.add_argument("--gmm-ref", type=int, default=None, help=f"exact reference draws ({GMM_REF})")
    ap.add_argument(
        "--solver-clip",
        choices=("model", "none"),
        default="model",
        help="x0 clipping of DDIM / DPM++ / UniPC: the model's own (digits, patches: [-1, 1]; "
        "default) or none",
    )
    ap.add_argument("--wall-chains", type=int, default=8, help="timed B=1 runs per cell")
    ap.add_argument("--wall-chains-patches", type=int, default=3)
    ap.add_argument("--skip-wall", action="store_true", help="no wall-clock at B=1")
    ap.add_argument(
        "--redo",
        nargs="+",
        default=[],
        help="re-run cached results whose id contains any of these strings (e.g. sde)",
    )
    ap.add_argument("--estimate-only", action="store_true", help="print the time estimate, exit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--out-tag", default=None, help="frontier_<tag>.* (default cpu; quick cpu_quick)"
    )
    a = ap.parse_args(argv)
    for name in ("seeds", "patches_seeds", "n_gmm16", "n_gmm64", "n_digits", "n_patches"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("wall_chains", "wall_chains_patches", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    names = a.models or (["gmm16", "digits"] if a.quick else list(MODELS))
    seeds = list(range(a.seeds or (1 if a.quick else 3)))
    sizes = dict(QUICK_SIZES if a.quick else SIZES)
    for m in MODELS:
        if getattr(a, f"n_{m}") is not None:
            sizes[m] = getattr(a, f"n_{m}")
    n_ref = a.gmm_ref or (4000 if a.quick else GMM_REF)
    chains = 2 if a.quick else a.wall_chains
    tag = a.out_tag or ("cpu_quick" if a.quick else "cpu")
    stem = common.RESULTS / f"frontier_{tag}"
    cache = Cache(stem.parent / f"frontier_{tag}_cells.jsonl")
    cache.drop(a.redo)
    env = common.environment("cpu", __file__, argv)
    t_start = time.perf_counter()

    ctxs, plans, total_est = {}, {}, 0.0
    for name in names:
        t0 = time.perf_counter()
        ctx = make_ctx(name, sizes[name], n_ref)
        ctx.solver_clip = ctx.clip if a.solver_clip == "model" else None
        ctxs[name] = ctx
        mseeds = seeds[: a.patches_seeds] if name == "patches" else seeds
        cells = grid(name, a.quick)
        st = size_tag(ctx, n_ref)
        todo = [
            c
            for c in cells
            if any(cache.get(f"{ctx.run_id(c)}|{st}|seed={s}") is None for s in mseeds)
        ]
        mchains = min(chains, a.wall_chains_patches) if name == "patches" else chains
        walls = (
            []
            if a.skip_wall
            else [c for c in cells if cache.get(f"wall|{ctx.run_id(c)}|chains={mchains}") is None]
        )
        es, ew = estimate(ctx, todo, mseeds, walls, mchains)
        t1 = time.perf_counter()
        ctx.floor(mseeds[0])  # one metric evaluation: its cost, times the cells to score
        em = (time.perf_counter() - t1) * len(todo) * len(mseeds)
        total_est += es + ew + em
        plans[name] = (cells, mseeds, st, mchains)
        common.log(
            f"{name}: {len(cells)} cells x {len(mseeds)} seeds, n = {ctx.n}; to run: {len(todo)} "
            f"cells, {len(walls)} wall-clock cells; estimate {es:.0f} s sampling + {em:.0f} s "
            f"metrics + {ew:.0f} s wall-clock (set-up {time.perf_counter() - t0:.1f} s)"
        )
    common.log(
        f"estimate: {total_est / 60:.1f} min in all at the current load ({common.load_average()}; "
        f"sampling from a short measured run and rough speculative cost factors)"
    )
    if a.estimate_only:
        return 0

    results = {}
    for name in names:
        ctx = ctxs[name]
        cells, mseeds, st, mchains = plans[name]
        floors = []
        for s in mseeds:
            rid = f"floor|{name}|{st}|seed={s}"
            row = cache.get(rid) or cache.put(rid, {"metrics": ctx.floor(s)})
            floors.append(row["metrics"])
        common.log(f"{name} floor: {floors}")
        runs, walls = {}, {}
        for c in cells:
            t0 = time.perf_counter()
            for s in mseeds:
                rid = f"{ctx.run_id(c)}|{st}|seed={s}"
                row = cache.get(rid)
                if row is None:
                    try:
                        x, info = run_cell(ctx, c, s)
                        t1 = time.perf_counter()
                        metrics = ctx.score(x, s)
                        info["metric_s"] = time.perf_counter() - t1
                        row = cache.put(rid, {"seed": s, "metrics": metrics, **info})
                    except Exception as e:  # noqa: BLE001 -- a failing cell is reported, not fatal
                        msg = f"{type(e).__name__}: {e}".splitlines()[0]
                        common.log(f"  {c.label} seed {s} FAILED: {msg}")
                        traceback.print_exc(limit=3)
                        row = {"seed": s, "error": msg}
                runs[(c.key, s)] = row
            if not a.skip_wall:
                wid = f"wall|{ctx.run_id(c)}|chains={mchains}"
                w = cache.get(wid)
                if w is None and not any("error" in runs[(c.key, s)] for s in mseeds):
                    try:
                        w = cache.put(wid, wall_b1(ctx, c, mchains))
                    except Exception as e:  # noqa: BLE001
                        common.log(f"  {c.label} wall FAILED: {type(e).__name__}: {e}")
                if w is not None:
                    walls[c.key] = {k: w[k] for k in ("wall_ms", "wall_q20_ms", "wall_q80_ms")}
            ok = [runs[(c.key, s)] for s in mseeds if "error" not in runs[(c.key, s)]]
            if ok:
                key0 = next(iter(ok[0]["metrics"]))
                m = statistics.fmean(r["metrics"][key0] for r in ok)
                acc = ok[0]["acceptance"]
                common.log(
                    f"  {c.label:<34} {key0} {m:.5g}  calls/chain {ok[0]['calls_per_chain']:.1f}  "
                    f"evals {ok[0]['evals_per_sample']:.1f}  acc {fmt(acc, 3)}  "
                    f"wall {fmt(walls.get(c.key, {}).get('wall_ms'), 3)} ms  "
                    f"[{time.perf_counter() - t0:.1f} s; {time.perf_counter() - t_start:.0f} s]"
                )
        rows, floor = aggregate(ctx, cells, mseeds, runs, floors, walls)
        results[name] = {
            "metric": ctx.metric,
            "metric_key": next(iter(floors[0])),
            "reference": ctx.reference,
            "n": ctx.n,
            "seeds": mseeds,
            "floor": floor,
            "cells": rows,
        }

    meta = {
        **env,
        "total_s": time.perf_counter() - t_start,
        # the cells' own seconds, cached ones included (total_s counts only this run's)
        "cells_s": sum(
            r.get("sample_s", 0.0) + r.get("metric_s", 0.0)
            for res in results.values()
            for r in res["cells"]
        ),
        "sizes": {m: sizes[m] for m in names},
        "gmm_reference": n_ref,
        "wall_chains": chains,
        "wall_chains_patches": min(chains, a.wall_chains_patches),
        "png": f"frontier_{tag}.png",
    }
    common.write_results(
        stem,
        finite_json({"meta": meta, "models": results}),
        markdown(meta, results),
        plot=lambda p: plot(results, p),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

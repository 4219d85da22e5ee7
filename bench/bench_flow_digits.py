"""Speculative sampling of the embedded rectified-flow digits model beside the DDPM digits model
(not a test).

At each k in ``--steps`` (default 50 and 20), on ``--n`` chains per cell (seed ``--seed``):

* ``digits-flow`` (velocity prediction, ``models.load("digits-flow")``) with the stochastic flow
  families: ``flow-euler`` (diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
  step) and ``flow-sde`` (Flow-GRPO's reverse SDE) at each noise level of ``--noise-levels``;
  each ancestral (one target call per step), speculative with ``window="auto"`` and speculative
  at each fixed window of ``--windows`` (frozen-x0 draft);
* the flow user's real alternative: the deterministic flow Euler ODE, diffusers'
  ``FlowMatchEulerDiscreteScheduler`` (its default, shift 1) step loop, k calls;
* ``digits`` (the DDPM, epsilon prediction) with DPM-Solver++ 2M SDE (``dpm++2m-sde``), ancestral
  and speculative the same way.

Per cell: sequential target calls per chain (the round in which each chain finished: latency
with ideal batching), target evaluations per sample (compute), acceptance (accepted / attempted
drafted steps) and mean accepted length per window; quality with the digits metric of
``bench_frontier.py`` (``_frontier_metrics``): the Fréchet distance of the digits classifier's 11
logits to all 1,797 real digits, and the energy distance in pixels; samples clamped to [-1, 1]
first, as a pipeline's output. Both distances carry a bias that falls with n (the same for every
cell at the same n); the "data" row is one random half of the digits against all of them, for
scale. Wall-clock: the whole ``--n``-chain batch (throughput) and the median over
``--wall-chains`` single chains (B = 1: latency). 1 thread; the machine is shared, so the
wall-clock columns are noisy; calls, acceptance and quality are not (fixed seeds).

    python bench/bench_flow_digits.py    # writes bench/results/flow_digits_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass, field

import _common as common
import _frontier_metrics as FM
import torch

from specdiff_kernels import AncestralSampler, SpeculativeSampler, models
from specdiff_kernels.models.digits import digits_dataset


@dataclass(frozen=True)
class Cell:
    model: str  # "digits-flow" | "digits"
    sampler: str  # a family name, or "flow-ode"
    k: int
    window: object = None  # None: ancestral / ODE; "auto" or an int: speculative
    options: dict = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        opt = "".join(f" {k}={v}" for k, v in self.options.items())
        how = "ancestral" if self.window is None else f"spec L={self.window}"
        return f"{self.sampler}{opt} {'ODE' if self.sampler == 'flow-ode' else how}"


def grid(a) -> list[Cell]:
    cells = []
    for k in a.steps:
        cells.append(Cell("digits-flow", "flow-ode", k))
        chains = [("digits-flow", "flow-euler", {})]
        chains += [("digits-flow", "flow-sde", {"noise_level": s}) for s in a.noise_levels]
        chains += [("digits", "dpm++2m-sde", {})]
        for model, sampler, opts in chains:
            for window in (None, "auto", *a.windows):
                cells.append(Cell(model, sampler, k, window, opts))
    return cells


@torch.no_grad()
def flow_ode(m, k: int, n: int, seed: int) -> tuple[torch.Tensor, float]:
    """diffusers' FlowMatchEulerDiscreteScheduler (deterministic, shift 1) loop: k calls."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=m.num_train_timesteps)
    sch.set_timesteps(k)
    x = torch.randn(n, *m.event_shape, generator=torch.Generator().manual_seed(seed))
    for t in sch.timesteps:
        x = sch.step(m.target(x, t.expand(n)), t, x).prev_sample
    return x, float(k)


def run(m, cell: Cell, n: int, seed: int):
    """Samples, and the run's stats (None for the ODE)."""
    if cell.sampler == "flow-ode":
        return flow_ode(m, cell.k, n, seed)[0], None
    T = m.transitions(cell.k, cell.sampler, **cell.options)
    g = torch.Generator().manual_seed(seed)
    if cell.window is None:
        res = AncestralSampler(m.target, T).sample(n, m.event_shape, generator=g)
    else:
        res = SpeculativeSampler(m.target, T, window=cell.window).sample(
            n, m.event_shape, generator=g
        )
    return res.samples, res.stats


def counts(stats, n: int, k: int) -> dict:
    if stats is None:  # the ODE: one call per step
        return dict(calls=float(k), evals=float(k), acceptance=None, accepted_len=None)
    hist = stats.accepted_length_hist
    windows = sum(hist)
    return dict(
        calls=sum(stats.chain_rounds) / n,
        evals=stats.target_evals / n,
        acceptance=(
            sum(stats.accepted_by_position) / max(1, sum(stats.attempted_by_position))
            if windows
            else None
        ),
        accepted_len=sum(a * h for a, h in enumerate(hist)) / windows if windows else None,
    )


class Quality:
    """The digits metric against all 1,797 real digits (features computed once)."""

    def __init__(self):
        self.data = digits_dataset()
        self.feat = FM.digits_features(self.data)
        self.energy = FM.EnergyReference(self.data)

    def score(self, x: torch.Tensor) -> dict:
        x = x.clamp(-1, 1)
        return dict(
            fd_logits=FM.frechet_distance(FM.digits_features(x), self.feat),
            energy=self.energy.distance(x),
        )

    def data_row(self, seed: int) -> dict:
        half = self.data[
            torch.randperm(self.data.shape[0], generator=torch.Generator().manual_seed(seed))[:898]
        ]
        return dict(n=898, **self.score(half))


def measure(ms: dict, cell: Cell, a, q: Quality) -> dict:
    m = ms[cell.model]
    t0 = time.perf_counter()
    x, stats = run(m, cell, a.n, a.seed)
    batch_s = time.perf_counter() - t0
    walls = []
    for c in range(a.wall_chains):
        t0 = time.perf_counter()
        run(m, cell, 1, a.seed + 1 + c)
        walls.append(time.perf_counter() - t0)
    row = dict(
        model=cell.model,
        sampler=cell.sampler,
        options=cell.options,
        k=cell.k,
        window=cell.window,
        label=cell.label,
        **counts(stats, a.n, cell.k),
        **q.score(x),
        batch_s=batch_s,
        b1_ms=statistics.median(walls) * 1e3 if walls else None,
    )
    if stats is not None and stats.autopilot:
        row["auto_windows"] = stats.autopilot.get("window_hist")
    return row


def fmt(v, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def markdown(rows: list[dict], env: dict, a, data_row: dict) -> str:
    md = [
        "# Speculative sampling of the rectified-flow digits model beside the DDPM digits model",
        "",
        f"`{env['command']}`; {env['cpu']}, {env['cores']} cores, {env['threads']} thread, torch "
        f"{env['torch']}, {env['date']}, load average at the start {env['load_average']}",
        "",
        f"{a.n} chains per cell (seed {a.seed}); frozen-x0 draft; calls = sequential target calls "
        "per chain, evals = target evaluations per sample; acceptance over drafted steps, "
        "accepted = mean accepted steps per window. Quality: Fréchet distance of the digits "
        "classifier's logits (FD) and pixel energy distance (E) to all 1,797 real digits "
        f"(data, a random half of {data_row['n']}: FD {data_row['fd_logits']:.3g}, E "
        f"{data_row['energy']:.3g}; both fall with n). Wall: the {a.n}-chain batch, and the "
        f"median of {a.wall_chains} single chains (B = 1); the machine is shared, the wall "
        "columns are noisy, the others are not.",
        "",
        "| k | model | sampler | calls / chain | evals / sample | acceptance | accepted / window "
        "| FD logits | energy | batch s | B=1 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['k']} | {r['model']} | {r['label']} | {r['calls']:.1f} | {r['evals']:.1f} | "
            f"{fmt(r['acceptance'], '.2f')} | {fmt(r['accepted_len'], '.2f')} | "
            f"{fmt(r['fd_logits'])} | {fmt(r['energy'])} | {r['batch_s']:.1f} | "
            f"{fmt(r['b1_ms'], '.0f')} |"
        )
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 20])
    ap.add_argument("--noise-levels", type=float, nargs="+", default=[0.3, 0.7])
    ap.add_argument("--windows", type=int, nargs="+", default=[8])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--wall-chains", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    # window="auto" warns where it mostly ran ancestral steps: the rows record its window_hist
    warnings.filterwarnings("ignore", message="window='auto' took")
    ms = {name: models.load(name) for name in ("digits-flow", "digits")}
    q = Quality()
    rows = []
    for cell in grid(a):
        rows.append(measure(ms, cell, a, q))
        r = rows[-1]
        common.log(
            f"k={cell.k} {cell.model} {cell.label}: {r['calls']:.1f} calls/chain, acceptance "
            f"{fmt(r['acceptance'], '.2f')}, FD {r['fd_logits']:.3g}, batch {r['batch_s']:.1f}s"
        )
    env = common.environment("cpu", __file__, argv)
    data_row = q.data_row(a.seed)
    stem = common.out_stem(a.out, "flow_digits_cpu")
    common.write_results(
        stem, dict(environment=env, data=data_row, rows=rows), markdown(rows, env, a, data_row)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

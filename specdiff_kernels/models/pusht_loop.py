"""Closed-loop control with the embedded pusht policy: chunk planners and episodes.

A *planner* turns observation histories into action chunks with one sampler call: the ancestral
chain or the speculative sampler, on DDPM (the policy's own 100 steps), DDIM (eta = 0, what
Diffusion Policy users run for real time) or DPM-Solver++ 2M SDE. Every ``N_ACTION_STEPS``
control steps an episode plans again (receding horizon). With ``warm_start`` the speculative
planner passes the previous chunk's actions not yet executed, shifted and padded, as the
sampler's ``warm_start`` (docs/design.md §5.1): one sequential network call fewer per chunk; the
law of the chunks is unchanged.

:func:`run_episodes` runs E episodes as E chains of one planner (vectorised: throughput) or one
at a time (batch 1: latency); :func:`batch1_latency` times one planner at batch 1 on recorded
planning inputs. Every planner call is recorded (chains, sequential calls, evaluations,
seconds).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..sampling import families
from ..sampling.ancestral import AncestralSampler
from ..sampling.sampler import SpeculativeSampler
from ..sampling.transitions import GaussianTransitions
from .pusht import EVENT_SHAPE, MAX_STEPS, N_ACTION_STEPS, TRAIN_TIMESTEPS, make_env

#: the sampler families (sampling.families) a planner runs, with their default step counts
FAMILIES = {"ddpm": TRAIN_TIMESTEPS, "ddim": 10, "dpm++2m-sde": 10}
#: the options a planner's family runs with: DDIM with eta = 0, as Diffusion Policy users run it
OPTIONS = {"ddim": {"eta": 0.0}}


@dataclass(frozen=True)
class PlannerConfig:
    """What a planner samples with. ``window``: None for the ancestral chain, else the
    speculative sampler's window ("auto" or an int L)."""

    family: str = "ddpm"
    steps: int = TRAIN_TIMESTEPS
    window: int | str | None = "auto"
    warm_start: bool = False
    seed: int = 0
    compile: bool = False  # the ancestral chain's network under torch.compile

    def __post_init__(self):
        object.__setattr__(self, "family", families.canonical(self.family))  # an alias: its name
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {self.family!r}")
        if self.family == "ddim" and self.window is not None:
            raise ValueError(
                "family 'ddim' runs eta = 0: every step is deterministic, there is nothing to "
                "speculate over (window=None runs it)"
            )
        if self.compile and self.window is not None:
            raise ValueError(
                "compile compiles the ancestral chain's network (on a CPU the compiled network "
                "is slower on a speculative round's many states than the eager one)"
            )
        if self.warm_start and self.window is None:
            raise ValueError(
                "warm_start drafts the speculative sampler's first window: give a window"
            )

    @property
    def speculative(self) -> bool:
        return self.window is not None

    def label(self) -> str:
        name = f"{families.family(self.family).label}-{self.steps}"
        if not self.speculative:
            name = f"ancestral {name}" if self.family != "ddim" else name
            return name + (" (torch.compile)" if self.compile else "")
        warm = ", warm start" if self.warm_start else ""
        return f"speculative {name} (window {self.window}{warm})"


def policy_transitions(em, family: str, steps: int) -> GaussianTransitions:
    """The policy's chain of ``family`` over ``steps`` steps of its training schedule, with the
    family's :data:`OPTIONS` (DPM++ 2M SDE with diffusers' defaults: it has no clipping)."""
    name = families.family(family).name
    return em.transitions(steps, name, **OPTIONS.get(name, {}))


@dataclass(frozen=True)
class PlanRecord:
    """One planner call: chains planned, sequential network calls, states evaluated, seconds."""

    chains: int
    calls: int
    evals: int
    seconds: float


def shifted(chunks: Tensor, n: int = N_ACTION_STEPS) -> Tensor:
    """Chunks [B, H, A] advanced by the n actions executed since they were planned: the next
    chunk's guess (the last action repeats where the old chunk ends)."""
    tail = chunks[:, -1:].expand(-1, n, -1)
    return torch.cat([chunks[:, n:], tail], dim=1)


class ChunkPlanner:
    """Observation histories [B, 2, 5] -> normalised action chunks [B, 16, 2], one sampler call
    each, recorded in ``records``."""

    def __init__(self, em, config: PlannerConfig, device="cpu"):
        self.em, self.config = em, config
        self.device = torch.device(device)
        T = policy_transitions(em, config.family, config.steps)
        if config.speculative:
            self.sampler = SpeculativeSampler(em.target, T, window=config.window)
        else:
            self.sampler = AncestralSampler(em.target, T, compile=config.compile)
        self._seeds = torch.Generator().manual_seed(config.seed)
        self.records: list[PlanRecord] = []

    def plan(self, history: np.ndarray, previous: Optional[Tensor] = None) -> Tensor:
        """Chunks for ``history`` [B, 2, 5] (raw observations); ``previous``: the chunks these
        chains executed from (for the warm start; None at an episode's start)."""
        cond = self.em.obs_condition(history).to(self.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        kwargs = {}
        if self.config.warm_start and previous is not None:
            kwargs["warm_start"] = shifted(previous.to(self.device))
        t0 = time.perf_counter()
        res = self.sampler.sample(
            cond.shape[0],
            EVENT_SHAPE,
            generator=torch.Generator().manual_seed(seed),
            model_kwargs={"obs": cond},
            device=self.device,
            **kwargs,
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        st = res.stats
        self.records.append(PlanRecord(cond.shape[0], st.target_calls, st.target_evals, dt))
        return res.samples


@dataclass
class Episode:
    """One closed-loop episode: the environment's success and coverage, and the paths."""

    seed: int
    success: bool = False
    coverage: float = 0.0
    max_coverage: float = 0.0
    steps: int = 0
    agent: list = field(default_factory=list)  # agent xy after every control step (and at reset)
    block: list = field(default_factory=list)  # block x, y, angle likewise

    def observe(self, obs: np.ndarray) -> None:
        self.agent.append([float(obs[0]), float(obs[1])])
        self.block.append([float(obs[2]), float(obs[3]), float(obs[4])])


@dataclass
class PlanningInput:
    """What one chain's planner call saw (for batch-1 timing on the same inputs)."""

    history: np.ndarray  # [2, 5]
    previous: Optional[Tensor]  # [1, 16, 2] or None


def run_episodes(
    planner: ChunkPlanner,
    seeds: list[int],
    vectorised: bool = True,
    max_steps: int = MAX_STEPS,
    record_inputs: int = 0,
) -> tuple[list[Episode], list[PlanningInput]]:
    """Episodes from env seeds ``seeds``: every ``N_ACTION_STEPS`` steps the planner plans again
    for every live episode (all in one call when ``vectorised``, else one episode at a time); an
    episode ends at success (coverage > 0.95) or ``max_steps``. Also returns the first
    ``record_inputs`` planning inputs of the first episode(s), in order."""
    groups = [seeds] if vectorised else [[s] for s in seeds]
    episodes, inputs = [], []
    for group in groups:
        episodes += _run_group(planner, group, max_steps, inputs, record_inputs)
    return episodes, inputs


def _run_group(planner, seeds, max_steps, inputs, record_inputs) -> list[Episode]:
    envs = [make_env() for _ in seeds]
    eps = [Episode(seed=s) for s in seeds]
    hist, prev = [], [None] * len(seeds)
    for env, ep in zip(envs, eps):
        o, _ = env.reset(seed=ep.seed)
        ep.observe(o)
        hist.append([o, o])
    live = list(range(len(seeds)))
    while live:
        h = np.stack([np.stack(hist[i]) for i in live])
        p = None
        if all(prev[i] is not None for i in live):
            p = torch.stack([prev[i] for i in live])
        for j, i in enumerate(live):
            if len(inputs) < record_inputs:
                inputs.append(PlanningInput(h[j], None if prev[i] is None else prev[i][None]))
        chunks = planner.plan(h, p)
        actions = planner.em.policy.actions(chunks)
        still = []
        for j, i in enumerate(live):
            prev[i] = chunks[j]
            if _execute(envs[i], eps[i], hist[i], actions[j], max_steps):
                still.append(i)
        live = still
    return eps


def _execute(env, ep: Episode, hist: list, actions: np.ndarray, max_steps: int) -> bool:
    """Execute one chunk's actions; False once the episode has ended."""
    for a in actions:
        o, _, term, _, info = env.step(a)
        ep.steps += 1
        ep.observe(o)
        hist[:] = [hist[1], o]
        ep.coverage = float(info["coverage"])
        ep.max_coverage = max(ep.max_coverage, ep.coverage)
        if term:
            ep.success = True
        if term or ep.steps >= max_steps:
            return False
    return True


def batch1_latency(planner: ChunkPlanner, inputs: list[PlanningInput], warmup: int = 3) -> dict:
    """Seconds per chunk of ``planner`` at batch 1 on ``inputs`` (after ``warmup`` untimed
    calls: allocations, and window="auto"'s first measurements): median, mean, calls per chunk."""
    for inp in inputs[:warmup]:
        planner.plan(inp.history[None], inp.previous)
    start = len(planner.records)
    for inp in inputs:
        planner.plan(inp.history[None], inp.previous)
    return latency_summary(planner.records[start:])


def latency_summary(recs: list[PlanRecord]) -> dict:
    """Batch-1 planner calls -> chunks, median and mean seconds, calls and evaluations per
    chunk."""
    secs = [r.seconds for r in recs]
    return {
        "chunks": len(recs),
        "median_s": float(np.median(secs)),
        "mean_s": float(np.mean(secs)),
        "calls_per_chunk": float(np.mean([r.calls for r in recs])),
        "evals_per_chunk": float(np.mean([r.evals for r in recs])),
    }


def summarize(episodes: list[Episode], records: list[PlanRecord]) -> dict:
    """Success rate with its standard error, coverage, and the planner's cost per chunk (a
    chunk: one chain's plan; calls are sequential, so a vectorised call counts once)."""
    n = len(episodes)
    success = float(np.mean([e.success for e in episodes]))
    chunks = sum(r.chains for r in records)
    return {
        "episodes": n,
        "success_rate": success,
        "success_se": float(np.sqrt(success * (1 - success) / n)) if n > 1 else float("nan"),
        "mean_final_coverage": float(np.mean([e.coverage for e in episodes])),
        "mean_max_coverage": float(np.mean([e.max_coverage for e in episodes])),
        "mean_steps": float(np.mean([e.steps for e in episodes])),
        "planner_calls": len(records),
        "chunks": chunks,
        "calls_per_planner_call": float(np.mean([r.calls for r in records])),
        "evals_per_chunk": sum(r.evals for r in records) / max(chunks, 1),
        "planning_s": float(sum(r.seconds for r in records)),
    }


def episode_rows(episodes: list[Episode]) -> list[dict]:
    """Per-episode results without the paths (for JSON)."""
    return [{k: v for k, v in asdict(e).items() if k not in ("agent", "block")} for e in episodes]

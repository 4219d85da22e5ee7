"""Cost and acceptance accounting of a sampling run (docs/design.md §10): :class:`SamplerStats`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class SamplerStats:
    """Cost and acceptance accounting (docs/design.md §10). Counts are totals over all chains.

    * ``target_calls``: sequential (batched) target calls: latency. A call on n states counts once.
    * ``target_evals``: states evaluated by the target: compute. A call on n states counts n.
    * ``draft_calls`` / ``draft_evals``: the same for a draft network (0 for the frozen draft).
    * ``rounds``: loop iterations of the sampler (a shared ragged batch advances one round at a
      time; for the ancestral sampler, one per step).
    * ``windows``: verified windows (a chain taking part in a round with a window counts 1).
    * ``speculative_steps``: chain-steps committed by verified windows; ``direct_steps``: stochastic
      chain-steps run with the target alone (ancestral steps; frozen draft: the first step of a
      chain, before anything can be frozen); ``deterministic_steps``: chain-steps with std 0.
    * ``accepted_by_position[j]`` / ``attempted_by_position[j]``: window position j (a step is
      attempted when all earlier steps of its window were accepted).
    * ``accepted_length_hist[a]``: number of windows with a accepted steps (a = 0..L).
    * ``window_length_hist[n]``: number of windows of n drafted steps (n = 1..L; shorter than L
      near the end of the schedule, or chosen per chain by an adaptive window).
    * ``accepted_by_step[k]`` / ``attempted_by_step[k]``: the same by sampling step k.
    * ``chain_rounds[c]``: the round in which chain c finished, i.e. the sequential target calls
      (with one call per round) that chain c alone would have needed: per-chain latency.
    * ``max_batch``: the most states one network invocation held (a round's one logical call made
      in chunks of this size: the user's ``max_batch`` or the memory budget's); None: unchunked.
    * ``autopilot`` (``window="auto"``): the cost model at the run's start (``cost``: measured
      call sizes and seconds, ``calibration_s``, ``ratios``: earlier real rounds' measured /
      model seconds by window), ``window_hist`` (rounds per chosen window, 0: ancestral blocks),
      ``ancestral_steps``, ``ancestral_blocks`` ((decision index, steps) each), ``explored``
      (decisions made to measure an arm), ``predicted_s`` / ``measured_s`` per decision.
    """

    sampler: str
    num_chains: int
    num_steps: int
    window: int
    rounds: int = 0
    target_calls: int = 0
    target_evals: int = 0
    draft_calls: int = 0
    draft_evals: int = 0
    windows: int = 0
    speculative_steps: int = 0
    direct_steps: int = 0
    deterministic_steps: int = 0
    accepted_by_position: list = field(default_factory=list)
    attempted_by_position: list = field(default_factory=list)
    accepted_length_hist: list = field(default_factory=list)
    accepted_by_step: list = field(default_factory=list)
    attempted_by_step: list = field(default_factory=list)
    chain_rounds: list = field(default_factory=list)
    window_length_hist: list = field(default_factory=list)
    wall_time: float = 0.0
    max_batch: Optional[int] = None  # states per model invocation (None: calls not chunked)
    autopilot: Optional[dict] = None  # window="auto": the cost model and the windows chosen

    def __post_init__(self):
        L, N = self.window, self.num_steps
        for name, n in (
            ("accepted_by_position", L),
            ("attempted_by_position", L),
            ("accepted_length_hist", L + 1),
            ("window_length_hist", L + 1),
            ("accepted_by_step", N),
            ("attempted_by_step", N),
        ):
            if not getattr(self, name):
                setattr(self, name, [0] * n)

    @property
    def acceptance_by_position(self) -> list:
        return [
            a / t if t else math.nan
            for a, t in zip(self.accepted_by_position, self.attempted_by_position)
        ]

    @property
    def acceptance_by_step(self) -> list:
        return [
            a / t if t else math.nan for a, t in zip(self.accepted_by_step, self.attempted_by_step)
        ]

    @property
    def mean_accepted_length(self) -> float:
        """Mean number of accepted steps per verified window."""
        n = sum(self.accepted_length_hist)
        return sum(a * c for a, c in enumerate(self.accepted_length_hist)) / n if n else math.nan

    @property
    def steps_per_window(self) -> float:
        """Mean committed steps per verified window (accepted + the reflected one, if any)."""
        return self.speculative_steps / self.windows if self.windows else math.nan

    @property
    def mean_window_length(self) -> float:
        """Mean number of drafted steps per verified window."""
        n = sum(self.window_length_hist)
        return sum(a * c for a, c in enumerate(self.window_length_hist)) / n if n else math.nan

    @property
    def mean_chain_rounds(self) -> float:
        return sum(self.chain_rounds) / len(self.chain_rounds) if self.chain_rounds else math.nan

    @property
    def acceptance_rate(self) -> float:
        t = sum(self.attempted_by_position)
        return sum(self.accepted_by_position) / t if t else math.nan

    def relative_to(self, baseline: "SamplerStats") -> dict:
        """Ratios of this run's costs to a baseline run's (e.g. the ancestral sampler's)."""

        def r(a, b):
            return a / b if b else math.nan

        return {
            "target_calls": r(self.target_calls, baseline.target_calls),
            "target_evals": r(self.target_evals, baseline.target_evals),
            "wall_time": r(self.wall_time, baseline.wall_time),
        }

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            acceptance_by_position=self.acceptance_by_position,
            mean_chain_rounds=self.mean_chain_rounds,
            mean_accepted_length=self.mean_accepted_length,
            steps_per_window=self.steps_per_window,
            acceptance_rate=self.acceptance_rate,
            mean_window_length=self.mean_window_length,
        )
        return d

    def summary(self) -> str:
        acc = ", ".join("-" if math.isnan(a) else f"{a:.2f}" for a in self.acceptance_by_position)
        return (
            f"{self.sampler}: chains={self.num_chains} steps={self.num_steps} L={self.window} "
            f"rounds={self.rounds} target_calls={self.target_calls} "
            f"target_evals={self.target_evals} draft_calls={self.draft_calls} "
            f"draft_evals={self.draft_evals} steps/window={self.steps_per_window:.2f} "
            f"acceptance by position=[{acc}] wall={self.wall_time:.3f}s"
        )

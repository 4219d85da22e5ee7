"""The ancestral (baseline) and the speculative samplers (docs/design.md §3, §5, §10).

Both run the chain defined by a :class:`~specdiff_kernels.sampling.transitions.GaussianTransitions` and a
target ``model(x, t)``; both read their randomness from the same per-chain streams
(:mod:`specdiff_kernels.sampling.noise`), so with the same generator they use the same noise xi_k at
every sampling step k.

:class:`SpeculativeSampler` runs one of two paths (``path=``; "auto": the static round wherever
it applies):

* the STATIC round (:mod:`specdiff_kernels.sampling.static_round`): frozen-target draft with a prefetched
  root, fixed batch and window, every per-chain quantity on the device, one network call and a few
  fused ops per round, one host read per round; compiled and CUDA-graph captured on GPUs; eager on
  a CPU with B >= 2 its network call holds only the states the round reads, as the ragged one's;
* the RAGGED round (:mod:`specdiff_kernels.sampling.ragged_round`): every chain at its own step with its
  own window; any draft (frozen target with or without prefetch, a draft network), the adaptive
  window, a custom verify op; evaluates only the states a round needs and drops finished chains.

Each round of either path makes ONE sequential target call (two with
``FrozenTargetDraft(prefetch_root=False)``: the roots first, then the window states).

Randomness: xi_k and u_k of chain c at sampling step k are counter-based (Philox), pure functions
of (seed, chain id, k); the seed is one draw of the ``generator`` passed to ``sample`` (see
``chain_noise``). So the same
generator seed gives the same samples, and a chain's samples do not depend on the other chains of
its batch.

L = 1: with ``FrozenTargetDraft(prefetch_root=False)`` every window starts from the target's own
prediction at its root, so mq_0 == mp_0 bit for bit, the step is always accepted and
y_1 = mp_0 + s_k xi_k is computed by the same expression as the ancestral step: the speculative
sampler reproduces the ancestral one up to float rounding (the ancestral step is one fused kernel). With prefetching (the default) or a draft model
the L = 1 chains differ from the ancestral ones path by path (after a rejection the next frozen
prediction is stale, and rejected steps are reflected rather than drawn from xi_k directly) but not
in law.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from . import checks as _args
from ..ops import verify as ops
from .window import AdaptiveWindow, resolve_window
from .noise import ChainNoise, base_seed_from
from .drafts import Draft, DraftModelDraft, FrozenTargetDraft
from ..ops.reference import round as rr
from .ragged_round import DraftedWindows, RaggedChains, RaggedCounters, RootStatus, RoundPlan, TargetCall, WindowOutcome, affine_mean, plan_round, proposer_for
from .static_round import NO_BAD, LeanAncestral, StaticRound, stochastic_runs
from .transitions import GaussianTransitions, Model

VerifyFn = Callable[..., "ops.VerifyResult"]
PATHS = ("auto", "static", "ragged")
# On CPU the static round calls the network only on the states it reads (the ragged path's
# evaluations, with the static round's lower own cost) from this many chains: measured (digits,
# N = 200, L = 8, 1 thread, `bench/bench_compact.py` -> bench/results/compact_cpu.md) 0.97x the
# full call's wall-clock at B = 2, 0.84x at B = 16, 0.69x at B = 64; at B = 1 the two tie (1.01x)
# and the full call costs 73 aten calls a round instead of 133. With compile=True the network is
# then compiled alone (dynamic batch): B = 1024 4.53 s, against 6.53 s for the whole round
# compiled with the full call (bench/results/latency_cpu.md and the run before it).
COMPACT_MIN_CHAINS_CPU = 2


class NonFiniteError(FloatingPointError):
    """A model output or a log ratio was not finite; the message names the step and the chain."""


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

    def __post_init__(self):
        L, N = self.window, self.num_steps
        for name, n in (("accepted_by_position", L), ("attempted_by_position", L),
                        ("accepted_length_hist", L + 1), ("window_length_hist", L + 1),
                        ("accepted_by_step", N),
                        ("attempted_by_step", N)):
            if not getattr(self, name):
                setattr(self, name, [0] * n)

    @property
    def acceptance_by_position(self) -> list:
        return [a / t if t else math.nan for a, t in zip(self.accepted_by_position, self.attempted_by_position)]

    @property
    def acceptance_by_step(self) -> list:
        return [a / t if t else math.nan for a, t in zip(self.accepted_by_step, self.attempted_by_step)]

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
        return {"target_calls": r(self.target_calls, baseline.target_calls),
                "target_evals": r(self.target_evals, baseline.target_evals),
                "wall_time": r(self.wall_time, baseline.wall_time)}

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_by_position=self.acceptance_by_position,
                 mean_chain_rounds=self.mean_chain_rounds,
                 mean_accepted_length=self.mean_accepted_length,
                 steps_per_window=self.steps_per_window, acceptance_rate=self.acceptance_rate,
                 mean_window_length=self.mean_window_length)
        return d

    def summary(self) -> str:
        acc = ", ".join("-" if math.isnan(a) else f"{a:.2f}" for a in self.acceptance_by_position)
        return (f"{self.sampler}: chains={self.num_chains} steps={self.num_steps} L={self.window} "
                f"rounds={self.rounds} target_calls={self.target_calls} "
                f"target_evals={self.target_evals} draft_calls={self.draft_calls} "
                f"draft_evals={self.draft_evals} steps/window={self.steps_per_window:.2f} "
                f"acceptance by position=[{acc}] wall={self.wall_time:.3f}s")


@dataclass(frozen=True)
class Chains:
    """Who the chains of a run are: their ids (noise streams, error messages) and their
    conditioning (passed to every network call on their rows)."""

    ids: list                     # [B] int chain ids
    cond: "_args.ModelKwargs"     # per-chain network kwargs (empty: unconditional)


@dataclass
class SamplingResult:
    samples: Tensor        # [B, *E] final states
    stats: SamplerStats


def _inference(sample):
    """Run ``sample`` under ``torch.inference_mode()``: a model whose parameters require grad (a
    diffusers UNet outside its pipeline) must not build an autograd graph over N steps. The
    samples are cloned out of inference mode, so callers get ordinary tensors."""
    @functools.wraps(sample)
    def wrapper(self, *args, **kwargs) -> "SamplingResult":
        with torch.inference_mode():
            res = sample(self, *args, **kwargs)
        return SamplingResult(res.samples.clone(), res.stats)
    return wrapper


class _SamplerBase:
    name = "sampler"

    def __init__(self, model: Model, transitions: GaussianTransitions, *, progress: bool = False,
                 check_finite: bool = True):
        if not isinstance(transitions, GaussianTransitions):
            raise TypeError(f"transitions must be a GaussianTransitions, got {type(transitions).__name__}")
        self.model = model
        self.transitions = transitions
        self.progress = progress
        self.check_finite = bool(check_finite)

    # -------------------------------------------------------------- setup and helpers
    def _setup(self, num_chains, event_shape, generator, chain_ids, x_init, dtype, device,
               model_kwargs):
        # every argument is checked here, before the first model call
        _args.check_generator(generator)
        if num_chains is not None:
            num_chains = _args.as_count("num_chains", num_chains)
        if x_init is not None:
            x_init = torch.as_tensor(x_init)
            _args.check_x_init(x_init, self.check_finite)
            if num_chains is not None and num_chains != x_init.shape[0]:
                raise ValueError(f"num_chains={num_chains} but x_init has {x_init.shape[0]} rows")
            if event_shape is not None and _args.as_event_shape(event_shape) != tuple(x_init.shape[1:]):
                raise ValueError(f"event_shape={tuple(event_shape)} but x_init has rows of shape "
                                 f"{tuple(x_init.shape[1:])}")
            num_chains, event_shape = x_init.shape[0], tuple(x_init.shape[1:])
            dtype, device = x_init.dtype, x_init.device
        if num_chains is None or event_shape is None:
            raise ValueError("give num_chains and event_shape, or x_init")
        event_shape = _args.as_event_shape(event_shape)
        _args.check_state_dtype(dtype)
        device = _args.as_device(device)
        B = num_chains
        chains = Chains(_args.as_chain_ids(chain_ids, B),
                        _args.ModelKwargs.check(model_kwargs, B, device))
        base = base_seed_from(generator)
        noise = ChainNoise(base, chains.ids, event_shape, dtype, device)
        if x_init is None:
            x = (noise.initial * self.transitions.init_std).to(dtype)
        else:
            x = x_init.clone()
        return x, noise, chains

    def _nonfinite_output(self, role: str, step: int, chain: int) -> NonFiniteError:
        """The error for a non-finite network output, naming the step, its timestep and the chain
        (one message for every path)."""
        t = self.transitions.timesteps[min(step, self.transitions.num_steps - 1)].item()
        return NonFiniteError(f"{role} model returned a non-finite output at sampling step "
                              f"{step} (timestep t={t}) for chain {chain}")

    def _eval(self, model: Model, role: str, x: Tensor, k: Tensor, rows: Tensor,
              chains: "Chains") -> Tensor:
        """Raw x0-hat of ``model`` at states x [n, *E], steps k [n] of chains ``rows`` [n] (batch
        indices); raises on non-finite output."""
        cond = chains.cond.gather(rows.to(x.device)) if chains.cond else {}
        out = self.transitions.call_model(model, x, k, **cond)
        _args.check_model_output(role, out, x)
        # one reduction first (a finite sum has no inf or NaN term); the row-wise test only when
        # it is not finite (which a sum that overflows also gives)
        if self.check_finite and not bool(torch.isfinite(out.sum())):
            bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise self._nonfinite_output(role, int(k[i]), chains.ids[int(rows[i])])
        return self.transitions.x0_from_output(x, out, k)

    def _progress_bar(self, total: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=self.name, unit="step")


class AncestralSampler(_SamplerBase):
    """The plain chain: one batched target call per step (the baseline).

    ``sample`` has the same signature and randomness as :meth:`SpeculativeSampler.sample`.
    """

    name = "ancestral"

    def __init__(self, model: Model, transitions: GaussianTransitions, *, progress: bool = False,
                 check_finite: bool = True, compile: bool = False, backend: Optional[str] = None):
        super().__init__(model, transitions, progress=progress, check_finite=check_finite)
        self.compile = bool(compile)
        self.backend = backend

    @_inference
    def sample(self, num_chains: Optional[int] = None, event_shape=None, *,
               generator: Optional[torch.Generator] = None, chain_ids=None, x_init=None,
               dtype: torch.dtype = torch.float32, device=None,
               model_kwargs: Optional[dict] = None) -> SamplingResult:
        """Same arguments as :meth:`SpeculativeSampler.sample`."""
        t0 = time.perf_counter()
        T = self.transitions
        x, noise, chains = self._setup(num_chains, event_shape, generator, chain_ids, x_init,
                                       dtype, device, model_kwargs)
        ids = chains.ids
        B, N = x.shape[0], T.num_steps
        stats = SamplerStats(self.name, B, N, 1)
        chain = LeanAncestral(self.model, T, noise.seed, noise.chain_ids, dtype=x.dtype,
                              backend=self.backend, compile=self.compile,
                              cond=chains.cond.gather(torch.arange(B, device=x.device)))
        bar = self._progress_bar(B * N)
        x, bad = chain.run(x, self.check_finite, bar)
        if bar is not None:
            bar.close()
        if bad is not None:
            step, row = bad
            raise self._nonfinite_output("target", step, ids[row])
        n_det = int(T.deterministic.sum())
        stats.rounds = stats.target_calls = N
        stats.target_evals = B * N
        stats.deterministic_steps = B * n_det
        stats.direct_steps = B * (N - n_det)
        stats.chain_rounds = [N] * B
        stats.wall_time = time.perf_counter() - t0
        return SamplingResult(x, stats)


class SpeculativeSampler(_SamplerBase):
    """Exact speculative sampling of a Gaussian diffusion chain (docs/design.md §3, §5, §10).

    Args:
        model: the target network, ``model(x, t) -> prediction`` (t: ``[B]`` timesteps).
        transitions: the chain (:class:`GaussianTransitions`).
        draft: :class:`FrozenTargetDraft` (default ``FrozenTargetDraft("x0", prefetch_root=True)``)
            or :class:`DraftModelDraft`.
        window: L, the number of drafted steps per round (an int >= 1); or ``"adaptive"`` /
            an :class:`~specdiff_kernels.sampling.window.AdaptiveWindow`: each chain's window length is
            chosen before each of its rounds from its OWN past acceptance (exactness is kept: the
            length is a function of the past; see :mod:`specdiff_kernels.sampling.window`). The buffer
            length (``self.window``, ``stats.window``) is then the policy's ``max_window``. Either
            is clamped to the longest run of stochastic steps of ``transitions`` (no window can
            be longer).
        backend: passed to :func:`specdiff_kernels.speculative_verify` (None: by device).
        verify_fn: replaces the verify op (same signature and return type as
            :func:`specdiff_kernels.speculative_verify`, called with ``backend=`` as a keyword).
            A hook for testing and instrumentation; the default is the public op.
        progress: show a tqdm bar over steps completed (summed over chains).
        check_finite: check model outputs and log ratios (raise :class:`NonFiniteError`).
        path: ``"auto"``: the static round wherever it applies (a :class:`FrozenTargetDraft` with
            ``prefetch_root=True``, an integer window, the default verify op, transitions affine
            in x0-hat), else the ragged round; or ``"static"`` / ``"ragged"``.
        compile: ``"auto"`` (on CUDA only), True or False: compile the static round with
            ``torch.compile`` (on CUDA or at B = 1 the whole round, network included, fullgraph;
            on CPU from ``COMPACT_MIN_CHAINS_CPU`` chains the network alone, with a dynamic
            batch). True with the ragged round is refused: it runs eagerly.
    """

    name = "speculative"

    def __init__(self, model: Model, transitions: GaussianTransitions, draft: Optional[Draft] = None,
                 window: int | str | AdaptiveWindow = 8, *, backend: Optional[str] = None, verify_fn: Optional[VerifyFn] = None,
                 progress: bool = False, check_finite: bool = True, path: str = "auto",
                 compile: bool | str = "auto"):
        super().__init__(model, transitions, progress=progress, check_finite=check_finite)
        self.draft = FrozenTargetDraft() if draft is None else draft
        if not isinstance(self.draft, (FrozenTargetDraft, DraftModelDraft)):
            raise TypeError(f"draft must be a FrozenTargetDraft or DraftModelDraft, got {type(self.draft).__name__}")
        self.window, self.window_policy = resolve_window(window)
        self.backend = backend
        self.verify_fn = ops.speculative_verify if verify_fn is None else verify_fn
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if path == "static" and not self._static_capable():
            raise ValueError("path='static' needs a FrozenTargetDraft with prefetch_root=True, a "
                             "fixed integer window, the default verify op and transitions affine "
                             "in x0-hat (no dynamic thresholding); use path='ragged'")
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        if compile is True and (path == "ragged" or not self._static_capable()):
            raise ValueError("compile=True compiles the static round, but this sampler runs the "
                             "ragged round (path='ragged', a draft model, prefetch_root=False, an "
                             "adaptive window, a verify_fn or non-affine transitions), which runs "
                             "eagerly; leave compile at 'auto' or False")
        self.path = path
        self.compile = compile
        self._stoch_run = stochastic_runs(transitions)  # stochastic steps left before a det step/end
        # a window longer than the longest stochastic run would only be padding, and noise buffers
        # of that size (window=10000 on 200 steps: gigabytes)
        self.window = max(1, min(self.window, int(self._stoch_run.max())))

    def __repr__(self) -> str:
        w = self.window if self.window_policy is None else repr(self.window_policy)
        return f"SpeculativeSampler(window={w}, draft={self.draft!r}, transitions={self.transitions!r})"

    # -------------------------------------------------------------- public
    @_inference
    def sample(self, num_chains: Optional[int] = None, event_shape=None, *,
               generator: Optional[torch.Generator] = None, chain_ids=None, x_init=None,
               dtype: torch.dtype = torch.float32, device=None,
               model_kwargs: Optional[dict] = None) -> SamplingResult:
        """Run ``num_chains`` chains of shape ``event_shape`` to the end of the schedule.

        Args:
            num_chains, event_shape: batch size and state shape (or give ``x_init``).
            generator: seeds every chain's random stream (one draw); same seed, same samples.
            chain_ids: integer id of each chain (default 0..B-1): chain c's stream depends only on
                (generator seed, c), so a chain gives the same result in any batch.
            x_init: initial states ``[B, *E]`` (default: ``init_std * N(0, I)`` from the streams).
            dtype, device: of the states (ignored when ``x_init`` is given).
            model_kwargs: per-chain conditioning, ``{name: tensor with num_chains rows}`` (or a
                dict of such tensors): every network call (target and draft model) on states of
                chain c gets row c, as ``model(x, t, **kwargs)``; e.g. ``class_labels`` or
                ``encoder_hidden_states`` of a diffusers UNet. The law is that of the ancestral
                chain with the same conditioning.

        Returns:
            :class:`SamplingResult` (samples ``[B, *E]``, :class:`SamplerStats`).
        """
        t0 = time.perf_counter()
        x, noise, chains = self._setup(num_chains, event_shape, generator, chain_ids, x_init,
                                       dtype, device, model_kwargs)
        if self.resolve_path() == "static":
            return self._sample_static(x, noise, chains, t0)
        return self._sample_ragged(x, noise, chains, t0)

    # -------------------------------------------------------------- the ragged path
    def _sample_ragged(self, x: Tensor, noise: ChainNoise, info: Chains, t0: float) -> SamplingResult:
        """Every chain at its own step; see :mod:`specdiff_kernels.sampling.ragged_round`."""
        T, L = self.transitions, self.window
        B, N = x.shape[0], T.num_steps
        prop = proposer_for(self.draft, T)
        ch = RaggedChains(
            x=x, k=torch.zeros(B, dtype=torch.int64), root=torch.zeros(B, dtype=torch.int8),
            root_x0=torch.zeros_like(x) if prop.needs_frozen else None,
            frozen=torch.zeros_like(x) if prop.needs_frozen else None,
            finished_round=torch.zeros(B, dtype=torch.int64))
        stats = SamplerStats(self.name, B, N, L)
        counters = RaggedCounters(L, N)
        policy = self.window_policy
        budget = None if policy is None else policy.init_state(B)   # per-chain counts
        bar = self._progress_bar(B * N)

        def target(xs: Tensor, ks: Tensor, rows: Tensor) -> Tensor:
            """One sequential target call on states xs of chains rows."""
            x0 = self._eval(self.model, "target", xs, ks, rows, info)
            stats.target_calls += 1
            stats.target_evals += rows.numel()
            if budget is not None:
                budget["evals"] += torch.bincount(rows, minlength=B).to(torch.float64)
            return x0

        def advance(rows: Tensor, by: Tensor | int) -> None:
            ch.k[rows] += by
            if budget is not None:
                budget["steps"][rows] += by
            ch.finished_round[rows] = stats.rounds
            if bar is not None:
                bar.update(int(by.sum()) if isinstance(by, Tensor) else by * rows.numel())

        while True:
            if prop.needs_frozen:   # deterministic steps whose root prediction is known: free
                known = ((ch.k < N) & (ch.root == int(RootStatus.EXACT))
                         & T.deterministic[ch.k.clamp(max=N - 1)]).nonzero().squeeze(1)
                if known.numel():
                    self._det_steps(ch, prop, known, ch.root_x0[known.to(x.device)], stats)
                    advance(known, 1)
            plan = plan_round(ch.k, ch.root, T.deterministic, N, prop.prefetch)
            if plan.det.numel() + plan.boot.numel() + plan.spec.numel() == 0:
                break
            stats.rounds += 1
            if prop.needs_frozen and not prop.prefetch:
                plan = self._root_call(ch, prop, plan, target, stats, advance)
            win = None
            if plan.spec.numel():
                win = self._draft_windows(ch, prop, plan.spec, noise, self._lengths(ch, prop, plan.spec, budget),
                                          info, stats)
            call = TargetCall()
            call.add("det", ch.x[plan.det.to(x.device)], ch.k[plan.det], plan.det)
            call.add("boot", ch.x[plan.boot.to(x.device)], ch.k[plan.boot], plan.boot)
            if win is not None:
                evaluated = prop.needed_positions(win, N).nonzero(as_tuple=True)   # (window, position)
                wi, pi = evaluated
                call.add("window", win.Y[wi.to(x.device), pi.to(x.device)], win.k[wi] + pi, win.rows[wi])
            x0 = call.run(target)
            if plan.det.numel():
                self._det_steps(ch, prop, plan.det, x0["det"], stats)
                advance(plan.det, 1)
            if plan.boot.numel():
                self._first_step(ch, prop, plan.boot, x0["boot"], noise, stats)
                advance(plan.boot, 1)
            if win is not None:
                out = self._verify_windows(ch, prop, win, evaluated, x0["window"], info, stats, counters)
                advance(win.rows, out.advance)
                if policy is not None:
                    policy.update(budget, win.rows, win.exact, out.accepted, out.attempted)
        if bar is not None:
            bar.close()
        counters.fill(stats)
        stats.chain_rounds = ch.finished_round.tolist()
        stats.wall_time = time.perf_counter() - t0
        return SamplingResult(ch.x, stats)

    # -------------------------------------------------------------- the static path
    def _static_capable(self) -> bool:
        return (isinstance(self.draft, FrozenTargetDraft) and self.draft.prefetch_root
                and self.window_policy is None and self.verify_fn is ops.speculative_verify
                and self.transitions.affine)

    def resolve_path(self) -> str:
        """``"static"`` or ``"ragged"``: what ``sample`` runs (see ``path``)."""
        if self.path != "auto":
            return self.path
        return "static" if self._static_capable() else "ragged"

    def _sample_static(self, x: Tensor, noise, chains: Chains, t0: float) -> SamplingResult:
        T, L = self.transitions, self.window
        B, N = x.shape[0], T.num_steps
        cuda = x.device.type == "cuda"
        compile_ = cuda if self.compile == "auto" else bool(self.compile)
        # on CPU: call the network only on the states a round reads (its size is read on the
        # host, which costs nothing there; compile=True then compiles the network alone, with a
        # dynamic batch); on CUDA: the fixed B (L + 1) call, captured as a CUDA graph
        compact = not cuda and B >= COMPACT_MIN_CHAINS_CPU
        rnd = StaticRound(self.model, T, L, self.draft.freeze, noise.seed, noise.chain_ids,
                          dtype=x.dtype, backend=self.backend, compile=compile_, cuda_graph=cuda,
                          cond=chains.cond, compact=compact)
        bar = self._progress_bar(B * N)
        done_steps = 0
        s = rnd.start(x)
        while True:
            # the one host read of a round: the head of the counters (rounds, non-finite codes,
            # steps done, chains left)
            head = s.stats[:rr.STAT_HEAD].tolist()
            bad_out, bad_lr = head[rr.STAT_BAD_OUTPUT], head[rr.STAT_BAD_RATIO]
            if self.check_finite and (bad_out != NO_BAD or bad_lr != NO_BAD):
                self._raise_static_nonfinite(bad_out, bad_lr, chains.ids, N)
            if bar is not None:
                bar.update(head[rr.STAT_STEPS_DONE] - done_steps)
                done_steps = head[rr.STAT_STEPS_DONE]
            if head[rr.STAT_LIVE] == 0:
                break
            s = rnd.step(s)
        if bar is not None:
            bar.close()
        counts = s.stats.tolist()
        stats = SamplerStats(self.name, B, N, L)
        stats.rounds = stats.target_calls = counts[rr.STAT_ROUNDS]
        stats.target_evals = rnd.target_evals
        stats.direct_steps = 0 if bool(T.deterministic[0]) else B
        stats.windows = counts[rr.STAT_WINDOWS]
        stats.speculative_steps = counts[rr.STAT_SPEC_STEPS]
        stats.deterministic_steps = counts[rr.STAT_DET_STEPS]
        for name, part in rnd.layout.slices.items():
            setattr(stats, name, counts[part])
        stats.wall_time = time.perf_counter() - t0
        return SamplingResult(s.x, stats)

    def _raise_static_nonfinite(self, bad_out: int, bad_lr: int, ids: list, N: int) -> None:
        code = bad_out if bad_out != NO_BAD else bad_lr
        row, step = divmod(code, N + 1)
        if bad_out != NO_BAD:
            raise self._nonfinite_output("target", step, ids[row])
        t = self.transitions.timesteps[min(step, N - 1)].item()
        raise NonFiniteError(f"non-finite log ratio at sampling step {step} (timestep t={t}) for "
                             f"chain {ids[row]}")

    # -------------------------------------------------------------- pieces of a ragged round
    def _lengths(self, ch: RaggedChains, prop, rows: Tensor, budget) -> Optional[Tensor]:
        """The adaptive window's lengths for chains ``rows`` (None: fixed L)."""
        policy = self.window_policy
        if policy is None:
            return None
        exact = (ch.status(rows, RootStatus.EXACT) if prop.needs_frozen
                 else torch.zeros(rows.shape, dtype=torch.bool))
        # prefetching frozen draft: a stale root is evaluated in this round's call
        extra = ((~exact).to(torch.float64) if prop.prefetch
                 else torch.zeros(exact.shape, dtype=torch.float64))
        return policy.lengths(budget, rows, exact, extra, steps_left=self.transitions.num_steps - ch.k[rows])

    def _root_call(self, ch: RaggedChains, prop, plan: RoundPlan, target, stats, advance) -> RoundPlan:
        """FrozenTargetDraft(prefetch_root=False): a call at every root first (deterministic-step
        chains take their step; speculating chains freeze the exact prediction)."""
        dev = ch.x.device
        call = TargetCall()
        call.add("det", ch.x[plan.det.to(dev)], ch.k[plan.det], plan.det)
        call.add("spec", ch.x[plan.spec.to(dev)], ch.k[plan.spec], plan.spec)
        x0 = call.run(target)
        if plan.det.numel():
            self._det_steps(ch, prop, plan.det, x0["det"], stats)
            advance(plan.det, 1)
        sd = plan.spec.to(dev)
        ch.root_x0[sd] = x0["spec"]
        prop.freeze(ch, sd, ch.x[sd], x0["spec"], ch.k[plan.spec].to(dev))
        ch.set_status(plan.spec, RootStatus.EXACT)
        return RoundPlan(plan.det[:0], plan.boot, plan.spec)

    def _det_steps(self, ch: RaggedChains, prop, rows: Tensor, x0: Tensor, stats) -> None:
        """Deterministic steps (std 0) of chains ``rows`` given the target's x0 at their roots."""
        T = self.transitions
        rd = rows.to(ch.x.device)
        kr = ch.k[rows].to(ch.x.device)
        xr = ch.x[rd]
        if prop.needs_frozen:
            prop.freeze(ch, rd, xr, x0, kr)
            ch.set_status(rows, RootStatus.STALE)
        ch.x[rd] = T.mean_from_x0(xr, x0, kr)
        stats.deterministic_steps += rows.numel()

    def _first_step(self, ch: RaggedChains, prop, rows: Tensor, x0: Tensor, noise: ChainNoise,
                    stats) -> None:
        """One ancestral step of chains with nothing frozen yet, freezing the target's x0-hat."""
        T = self.transitions
        dev = ch.x.device
        rd = rows.to(dev)
        kr = ch.k[rows]
        kd = kr.to(dev)
        xi, _ = noise.window(rows, kr, 1)
        xr = ch.x[rd]
        mean = T.mean_from_x0(xr, x0, kd)
        prop.freeze(ch, rd, xr, x0, kd)
        ch.set_status(rows, RootStatus.STALE)
        ch.x[rd] = mean + T.coef("std", kd, xr) * xi[:, 0].to(dev)
        stats.direct_steps += rows.numel()

    def _draft_windows(self, ch: RaggedChains, prop, rows: Tensor, noise: ChainNoise,
                       lengths: Optional[Tensor], info: Chains, stats) -> DraftedWindows:
        """Draft y_1..y_n and mq_0..mq_{n-1} for chains ``rows`` (padded to L); ``lengths``: each
        chain's window length (adaptive window; default L)."""
        T, L = self.transitions, self.window
        dev = ch.x.device
        w = rows.numel()
        rd = rows.to(dev)
        kr = ch.k[rows]
        cap = torch.full_like(kr, L) if lengths is None else lengths.clamp(1, L)
        n = torch.minimum(self._stoch_run[kr], cap)                         # [w] >= 1
        exact = (ch.status(rows, RootStatus.EXACT) if prop.needs_frozen
                 else torch.zeros(w, dtype=torch.bool))
        if prop.fused:
            Y, MQ = prop.fused_draft(ch, rows, kr, n, noise, L, self.backend)
            return DraftedWindows(rows, Y, MQ, n, kr, noise.uniforms(rows, kr, L), exact)
        xi, u = noise.window(rows, kr, L)
        xi = xi.to(dev)
        kd, nd = kr.to(dev), n.to(dev)
        exact0 = exact.to(dev)

        def draft_eval(y: Tensor, k: Tensor, act: Tensor) -> Tensor:
            stats.draft_calls += 1
            stats.draft_evals += act.numel()
            return self._eval(self.draft.model, "draft", y, k, rows[act.cpu()], info)

        ys = [ch.x[rd]]
        mqs = []
        shape1 = (w,) + (1,) * (ch.x.dim() - 1)
        max_n = int(n.max())
        for j in range(L):
            yj = ys[j]
            if j >= max_n:
                mqs.append(yj)
                ys.append(yj)
                continue
            kj = kd + j
            active = nd > j
            x0j = prop.draft_x0(ch, rd, exact0, j, yj, kj, active, draft_eval)
            mq = T.mean_from_x0(yj, x0j, kj)
            ynext = mq + T.coef("std", kj, yj) * xi[:, j]
            mask = active.view(shape1)
            mqs.append(torch.where(mask, mq, yj))
            ys.append(torch.where(mask, ynext, yj))
        return DraftedWindows(rows, torch.stack(ys, 1), torch.stack(mqs, 1), n, kr, u, exact)

    def _verify_windows(self, ch: RaggedChains, prop, win: DraftedWindows, evaluated, x0_evals: Tensor,
                        info: Chains, stats, counters: RaggedCounters) -> WindowOutcome:
        T, L = self.transitions, self.window
        dev = ch.x.device
        rows = win.rows
        w = rows.numel()
        Y, MQ, n, kr = win.Y, win.MQ, win.n, win.k
        TP = torch.zeros_like(Y)                            # target raw x0 at y_0..y_L
        TP[evaluated[0].to(dev), evaluated[1].to(dev)] = x0_evals
        prop.root_x0(ch, win, TP)
        pos = torch.arange(L)
        kw = kr[:, None] + pos[None]                         # [w, L] step of each position
        active = (pos[None] < n[:, None])
        mean = functools.partial(affine_mean, T) if T.affine else T.mean_from_x0
        # positions past n hold anything finite: the verify op ignores steps >= num_steps
        MP = mean(Y[:, :L], TP[:, :L], kw.to(dev))
        sig_dtype = torch.float64 if ch.x.dtype == torch.float64 else torch.float32
        sigma = torch.where(active, T.step_std(kw), torch.ones((), dtype=torch.float64)).to(device=dev, dtype=sig_dtype)
        res = self.verify_fn(Y[:, 1:].contiguous(), MQ.contiguous(), MP.contiguous(), sigma,
                             win.u.to(dev), n.to(dev), backend=self.backend)
        na = res.num_accepted.to("cpu", torch.int64)
        attempted = active & (pos[None] <= na[:, None])
        accepted = pos[None] < na[:, None]
        if self.check_finite:
            lr = res.log_ratio.to("cpu")
            bad = attempted & ~torch.isfinite(lr)
            if bool(bad.any()):
                i, j = (int(v) for v in bad.nonzero()[0])
                step = int(kr[i]) + j
                t = T.timesteps[step].item()
                raise NonFiniteError(f"non-finite log ratio ({float(lr[i, j])}) at sampling step {step} "
                                     f"(timestep t={t}, window position {j}) for chain {info.ids[int(rows[i])]}")
        advance = na + (na < n).to(torch.int64)
        ch.x[rows.to(dev)] = res.next_state.to(ch.x.dtype)
        out = WindowOutcome(accepted, attempted, na, advance)
        counters.add(win, out)
        stats.windows += w
        stats.speculative_steps += int(advance.sum())
        prop.after_verify(ch, win, TP, out, T.num_steps)
        return out

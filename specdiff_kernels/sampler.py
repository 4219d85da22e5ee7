"""The ancestral (baseline) and the speculative samplers (SPEC §2-§4).

Both run the chain defined by a :class:`~specdiff_kernels.transitions.GaussianTransitions` and a
target ``model(x, t)``; both read their randomness from the same per-chain streams
(:mod:`specdiff_kernels.chain_noise`), so with the same generator they use the same noise xi_k at
every sampling step k.

:class:`SpeculativeSampler` runs RAGGED batches: every chain has its own step index. A round

1. runs, without any call, the deterministic steps (std 0) of chains whose target prediction at
   the current state is already known (prefetched);
2. drafts a window of n = min(L, stochastic steps left before the next deterministic step or the
   end) steps for every speculating chain (frozen-target draft: no network call; draft model: n
   sequential batched draft calls);
3. makes ONE batched target call over everything the round needs: the window states of every
   speculating chain (concatenated, shorter windows near the end of the schedule), the states of
   chains at a deterministic step, and (frozen draft, first round) the roots of chains that have
   no prediction yet to freeze (those take one plain ancestral step);
4. verifies all windows with the public op :func:`specdiff_kernels.speculative_verify` (windows
   shorter than L are padded and passed ``num_steps``), and advances each chain by its own
   number of committed steps. Finished chains leave the batch.

With ``FrozenTargetDraft(prefetch_root=False)`` a round makes two sequential calls instead: the
roots first (with the deterministic-step chains), then the window states y_1..y_{n-1}.

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

from . import _sample_args as _args
from . import ops
from .adaptive import AdaptiveWindow, resolve_window
from .chain_noise import ChainNoise, base_seed_from
from .drafts import Draft, DraftModelDraft, FrozenTargetDraft
from . import round_reference as rr
from .static_round import NO_BAD, LeanAncestral, StaticRound, stochastic_runs
from .transitions import GaussianTransitions, Model

VerifyFn = Callable[..., "ops.VerifyResult"]
PATHS = ("auto", "static", "ragged")
# The static round is the default up to this many chains on CPU; above it the ragged path, which
# evaluates only the states a round needs and drops finished chains, costs less. Measured (digits,
# N = 200, L = 8, 1 thread; bench/results/latency_cpu*.md): B = 1 static 19.7 vs ragged 32.8 ms,
# B = 16 98.5 vs 98.7 ms, B = 64 363 vs 298 ms, B = 256 1.47 vs 1.11 s. On CUDA always static.
STATIC_MAX_CHAINS_CPU = 16


class NonFiniteError(FloatingPointError):
    """A model output or a log ratio was not finite; the message names the step and the chain."""


@dataclass
class SamplerStats:
    """Cost and acceptance accounting (SPEC §4). Counts are totals over all chains.

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
class DraftedWindows:
    """The ragged round's drafted windows of chains ``rows`` (padded to L)."""

    Y: Tensor       # [w, L+1, *E] y_0..y_L (positions past n repeat the state)
    MQ: Tensor      # [w, L, *E] draft means mq_0..mq_{L-1}
    n: Tensor       # [w] int64 steps drafted (CPU)
    k: Tensor       # [w] int64 step at the root (CPU)
    u: Tensor       # [w, L] acceptance uniforms
    exact: Tensor   # [w] bool: the target's x0-hat at the root is known (CPU)


@dataclass(frozen=True)
class WindowOutcome:
    """What verifying the windows did, per chain (CPU tensors)."""

    accepted: Tensor   # [w, L] bool: position accepted
    attempted: Tensor  # [w, L] bool: position verified (all earlier ones accepted)
    advance: Tensor    # [w] int64 steps committed


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
        if self.check_finite:
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
    """Exact speculative sampling of a Gaussian diffusion chain (SPEC §2-§4).

    Args:
        model: the target network, ``model(x, t) -> prediction`` (t: ``[B]`` timesteps).
        transitions: the chain (:class:`GaussianTransitions`).
        draft: :class:`FrozenTargetDraft` (default ``FrozenTargetDraft("x0", prefetch_root=True)``)
            or :class:`DraftModelDraft`.
        window: L, the number of drafted steps per round (an int >= 1); or ``"adaptive"`` /
            an :class:`~specdiff_kernels.adaptive.AdaptiveWindow`: each chain's window length is
            chosen before each of its rounds from its OWN past acceptance (exactness is kept: the
            length is a function of the past; see :mod:`specdiff_kernels.adaptive`). The buffer
            length (``self.window``, ``stats.window``) is then the policy's ``max_window``. Either
            is clamped to the longest run of stochastic steps of ``transitions`` (no window can
            be longer).
        backend: passed to :func:`specdiff_kernels.speculative_verify` (None: by device).
        verify_fn: replaces the verify op (same signature and return type as
            :func:`specdiff_kernels.speculative_verify`, called with ``backend=`` as a keyword).
            A hook for testing and instrumentation; the default is the public op.
        progress: show a tqdm bar over steps completed (summed over chains).
        check_finite: check model outputs and log ratios (raise :class:`NonFiniteError`).
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
                             "fixed integer window and the default verify op; use path='ragged'")
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
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
        T = self.transitions
        L = self.window
        x, noise, chains = self._setup(num_chains, event_shape, generator, chain_ids, x_init,
                                       dtype, device, model_kwargs)
        if self.resolve_path(x.shape[0], x.device) == "static":
            return self._sample_static(x, noise, chains, t0)
        dev = x.device
        B, N = x.shape[0], T.num_steps
        stats = SamplerStats(self.name, B, N, L)
        frozen_mode = isinstance(self.draft, FrozenTargetDraft)
        prefetch = frozen_mode and self.draft.prefetch_root
        k = torch.zeros(B, dtype=torch.int64)                 # per-chain step index (CPU)
        root_exact = torch.zeros(B, dtype=torch.bool)         # target x0 at (x, k) known
        has_frozen = torch.zeros(B, dtype=torch.bool)
        root_x0 = torch.zeros_like(x) if frozen_mode else None
        frozen = torch.zeros_like(x) if frozen_mode else None
        sig_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        acc = {"pos_acc": torch.zeros(L, dtype=torch.int64), "pos_att": torch.zeros(L, dtype=torch.int64),
               "hist": torch.zeros(L + 1, dtype=torch.int64), "step_acc": torch.zeros(N, dtype=torch.int64),
               "step_att": torch.zeros(N, dtype=torch.int64), "wlen": torch.zeros(L + 1, dtype=torch.int64)}
        policy = self.window_policy
        ad_state = None if policy is None else policy.init_state(B)   # per-chain counts
        bar = self._progress_bar(B * N)
        det_table = T.deterministic

        chain_rounds = torch.zeros(B, dtype=torch.int64)

        def advance(rows: Tensor, by: Tensor | int):
            k[rows] += by
            if ad_state is not None:
                ad_state["steps"][rows] += by
            chain_rounds[rows] = stats.rounds
            if bar is not None:
                bar.update(int(by.sum()) if isinstance(by, Tensor) else by * rows.numel())

        while True:
            # 1. free deterministic steps: the target's prediction at the root is known
            if frozen_mode:
                m = (k < N) & root_exact
                m &= det_table[k.clamp(max=N - 1)]
                if bool(m.any()):
                    r = m.nonzero().squeeze(1)
                    self._det_steps(x, k, r, root_x0[r.to(dev)], frozen, has_frozen, root_exact, stats)
                    advance(r, 1)
            live = (k < N).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            stats.rounds += 1
            kl = k[live]
            is_det = det_table[kl]
            det_rows = live[is_det]
            spec_rows = live[~is_det]
            boot_rows = spec_rows[:0]
            if prefetch:
                boot_rows = spec_rows[~has_frozen[spec_rows]]
                spec_rows = spec_rows[has_frozen[spec_rows]]

            if frozen_mode and not prefetch:
                # root call: every speculating chain's root, plus the deterministic-step chains
                roots = torch.cat([det_rows, spec_rows])
                x0r = self._call_target(x, k, roots, chains, stats)
                if ad_state is not None:
                    ad_state["evals"][roots] += 1
                nd = det_rows.numel()
                self._det_steps(x, k, det_rows, x0r[:nd], frozen, has_frozen, root_exact, stats)
                if nd:
                    advance(det_rows, 1)
                sd = spec_rows.to(dev)
                root_x0[sd] = x0r[nd:]
                frozen[sd] = self.draft.freeze_value(T, x[sd], x0r[nd:], k[spec_rows].to(dev))
                root_exact[spec_rows] = True
                has_frozen[spec_rows] = True
                det_rows = det_rows[:0]

            # 2. draft the windows
            win = None
            if spec_rows.numel():
                lengths = None
                if policy is not None:
                    exact_root = (root_exact[spec_rows] if frozen_mode
                                  else torch.zeros(spec_rows.shape, dtype=torch.bool))
                    # prefetching frozen draft: a stale root is evaluated in this round's call
                    extra = (~exact_root).to(torch.float64) if prefetch else torch.zeros(exact_root.shape, dtype=torch.float64)
                    lengths = policy.lengths(ad_state, spec_rows, exact_root, extra,
                                             steps_left=N - k[spec_rows])
                win = self._draft_windows(x, k, spec_rows, noise, root_exact, root_x0, frozen, chains,
                                          stats, lengths)

            # 3. one batched target call: det roots, bootstrap roots, window states
            parts_x, parts_k, parts_rows = [], [], []
            for rows in (det_rows, boot_rows):
                parts_x.append(x[rows.to(dev)])
                parts_k.append(k[rows])
                parts_rows.append(rows)
            if win is not None:
                need = self._needed_positions(win, prefetch, frozen_mode, N)
                rr, pp = need.nonzero(as_tuple=True)      # (window, position) of each evaluation
                parts_x.append(win.Y[rr.to(dev), pp.to(dev)])
                parts_k.append(win.k[rr] + pp)
                parts_rows.append(spec_rows[rr])
            all_x = torch.cat(parts_x)
            if all_x.shape[0]:
                all_k = torch.cat(parts_k)
                all_rows = torch.cat(parts_rows)
                x0_all = self._eval(self.model, "target", all_x, all_k.to(dev), all_rows, chains)
                stats.target_calls += 1
                stats.target_evals += all_x.shape[0]
                if ad_state is not None:
                    ad_state["evals"] += torch.bincount(all_rows, minlength=B).to(torch.float64)

            else:
                x0_all = all_x
            nd, nb = det_rows.numel(), boot_rows.numel()
            if nd:
                self._det_steps(x, k, det_rows, x0_all[:nd], frozen, has_frozen, root_exact, stats)
                advance(det_rows, 1)
            if nb:
                bd = boot_rows.to(dev)
                kb = k[boot_rows]
                x0b = x0_all[nd:nd + nb]
                xi, _ = noise.window(boot_rows, kb, 1)
                xb = x[bd]
                mean = T.mean_from_x0(xb, x0b, kb.to(dev))
                frozen[bd] = self.draft.freeze_value(T, xb, x0b, kb.to(dev))
                has_frozen[boot_rows] = True
                root_exact[boot_rows] = False
                x[bd] = mean + T.coef("std", kb.to(dev), xb) * xi[:, 0].to(dev)
                stats.direct_steps += nb
                advance(boot_rows, 1)
            if win is not None:
                out = self._verify_windows(x, k, spec_rows, win, (rr, pp), x0_all[nd + nb:],
                                           root_exact, root_x0, frozen, has_frozen, prefetch,
                                           frozen_mode, sig_dtype, chains, stats, acc)
                advance(spec_rows, out.advance)
                if policy is not None:
                    policy.update(ad_state, spec_rows, win.exact, out.accepted, out.attempted)
        if bar is not None:
            bar.close()
        a = acc
        stats.accepted_by_position = a["pos_acc"].tolist()
        stats.attempted_by_position = a["pos_att"].tolist()
        stats.accepted_length_hist = a["hist"].tolist()
        stats.accepted_by_step = a["step_acc"].tolist()
        stats.attempted_by_step = a["step_att"].tolist()
        stats.window_length_hist = a["wlen"].tolist()
        stats.chain_rounds = chain_rounds.tolist()
        stats.wall_time = time.perf_counter() - t0
        return SamplingResult(x, stats)

    # -------------------------------------------------------------- the static path
    def _static_capable(self) -> bool:
        return (isinstance(self.draft, FrozenTargetDraft) and self.draft.prefetch_root
                and self.window_policy is None and self.verify_fn is ops.speculative_verify)

    def resolve_path(self, num_chains: int, device: torch.device) -> str:
        """``"static"`` or ``"ragged"``: what ``sample`` runs for this batch (see ``path``)."""
        if self.path != "auto":
            return self.path
        if not self._static_capable():
            return "ragged"
        if device.type == "cuda" or num_chains <= STATIC_MAX_CHAINS_CPU:
            return "static"
        return "ragged"

    def _sample_static(self, x: Tensor, noise, chains: Chains, t0: float) -> SamplingResult:
        T, L = self.transitions, self.window
        B, N = x.shape[0], T.num_steps
        cuda = x.device.type == "cuda"
        compile_ = cuda if self.compile == "auto" else bool(self.compile)
        rnd = StaticRound(self.model, T, L, self.draft.freeze, noise.seed, noise.chain_ids,
                          dtype=x.dtype, backend=self.backend, compile=compile_, cuda_graph=cuda,
                          cond=chains.cond)
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
        stats.target_evals = B + (stats.rounds - 1) * B * (L + 1)
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

    # -------------------------------------------------------------- pieces of a round
    def _call_target(self, x, k, rows, chains: Chains, stats) -> Tensor:
        if rows.numel() == 0:
            return x[:0]
        dev = x.device
        x0 = self._eval(self.model, "target", x[rows.to(dev)], k[rows].to(dev), rows, chains)
        stats.target_calls += 1
        stats.target_evals += rows.numel()
        return x0

    def _det_steps(self, x, k, rows, x0, frozen, has_frozen, root_exact, stats) -> None:
        """Deterministic steps (std 0) of chains ``rows`` given the target's x0 at their roots."""
        if rows.numel() == 0:
            return
        T = self.transitions
        rd = rows.to(x.device)
        kr = k[rows].to(x.device)
        xr = x[rd]
        if frozen is not None:
            frozen[rd] = self.draft.freeze_value(T, xr, x0, kr)
            has_frozen[rows] = True
            root_exact[rows] = False
        x[rd] = T.mean_from_x0(xr, x0, kr)
        stats.deterministic_steps += rows.numel()

    def _draft_windows(self, x, k, rows, noise, root_exact, root_x0, frozen, chains: Chains, stats,
                       lengths: Optional[Tensor] = None) -> DraftedWindows:
        """Draft y_1..y_n and mq_0..mq_{n-1} for chains ``rows`` (padded to L); ``lengths``: each
        chain's window length (adaptive window; default L)."""
        T = self.transitions
        L = self.window
        dev = x.device
        w = rows.numel()
        rd = rows.to(dev)
        kr = k[rows]
        cap = torch.full_like(kr, L) if lengths is None else lengths.clamp(1, L)
        n = torch.minimum(self._stoch_run[kr], cap)                         # [w] >= 1
        xi, u = noise.window(rows, kr, L)
        xi = xi.to(dev)
        kd = kr.to(dev)
        nd = n.to(dev)
        frozen_mode = isinstance(self.draft, FrozenTargetDraft)
        if frozen_mode:
            fr = frozen[rd]
            exact0 = root_exact[rows].to(dev)
            rx0 = root_x0[rd]
        ys = [x[rd]]
        mqs = []
        shape1 = (w,) + (1,) * (x.dim() - 1)
        max_n = int(n.max())
        for j in range(L):
            yj = ys[j]
            if j >= max_n:
                mqs.append(yj)
                ys.append(yj)
                continue
            kj = kd + j
            active = nd > j
            if frozen_mode:
                x0j = self.draft.x0_at(T, fr, yj, kj)
                if j == 0:
                    x0j = torch.where(exact0.view(shape1), rx0, x0j)
            else:
                act = active.nonzero().squeeze(1)
                x0j = torch.zeros_like(yj)
                x0j[act] = self._eval(self.draft.model, "draft", yj[act], kj[act],
                                      rows[act.cpu()], chains)
                stats.draft_calls += 1
                stats.draft_evals += act.numel()
            mq = T.mean_from_x0(yj, x0j, kj)
            ynext = mq + T.coef("std", kj, yj) * xi[:, j]
            mask = active.view(shape1)
            mqs.append(torch.where(mask, mq, yj))
            ys.append(torch.where(mask, ynext, yj))
        exact = root_exact[rows].clone() if frozen_mode else torch.zeros(w, dtype=torch.bool)
        return DraftedWindows(torch.stack(ys, 1), torch.stack(mqs, 1), n, kr, u, exact)

    def _needed_positions(self, win: DraftedWindows, prefetch, frozen_mode, N) -> Tensor:
        """[w, L+1] bool: window positions p whose state y_p the target must evaluate."""
        L = self.window
        n, kr = win.n, win.k
        p = torch.arange(L + 1)[None]
        need = (p >= 1) & (p < n[:, None])                 # y_1..y_{n-1}: means of steps 1..n-1
        if not frozen_mode:
            need |= p == 0                                 # draft model: the root as well
        elif prefetch:
            need |= (p == 0) & ~win.exact[:, None]           # stale frozen prediction: root needed
            need |= (p == n[:, None]) & ((kr + n) < N)[:, None]   # prefetch the next root
        return need

    def _verify_windows(self, x, k, rows, win: DraftedWindows, evaluated, x0_evals, root_exact,
                        root_x0, frozen, has_frozen, prefetch, frozen_mode, sig_dtype, chains, stats,
                        acc) -> WindowOutcome:
        T = self.transitions
        L = self.window
        dev = x.device
        w = rows.numel()
        Y, MQ, n, kr, u = win.Y, win.MQ, win.n, win.k, win.u
        rd = rows.to(dev)
        TP = torch.zeros_like(Y)                            # target raw x0 at y_0..y_L
        TP[evaluated[0].to(dev), evaluated[1].to(dev)] = x0_evals
        if frozen_mode:
            exact0 = root_exact[rows].to(dev).view((w,) + (1,) * (x.dim() - 1))
            TP[:, 0] = torch.where(exact0, root_x0[rd], TP[:, 0])
        pos = torch.arange(L)
        kw = kr[:, None] + pos[None]                         # [w, L] step of each position
        kwd = kw.to(dev)
        active = (pos[None] < n[:, None])
        MP = T.mean_from_x0(Y[:, :L], TP[:, :L], kwd)
        MP = torch.where(active.to(dev).view(w, L, *([1] * (x.dim() - 1))), MP, MQ)
        sigma = torch.where(active, T.step_std(kw), torch.ones((), dtype=torch.float64)).to(device=dev, dtype=sig_dtype)
        uniforms = u.to(dev)
        res = self.verify_fn(Y[:, 1:].contiguous(), MQ.contiguous(), MP.contiguous(), sigma, uniforms,
                             n.to(dev), backend=self.backend)
        na = res.num_accepted.to("cpu", torch.int64)
        lr = res.log_ratio.to("cpu")
        attempted = active & (pos[None] <= na[:, None])
        accepted = pos[None] < na[:, None]
        if self.check_finite:
            bad = attempted & ~torch.isfinite(lr)
            if bool(bad.any()):
                i, j = (int(v) for v in bad.nonzero()[0])
                step = int(kr[i]) + j
                t = T.timesteps[step].item()
                raise NonFiniteError(f"non-finite log ratio ({float(lr[i, j])}) at sampling step {step} "
                                     f"(timestep t={t}, window position {j}) for chain {chains.ids[int(rows[i])]}")
        rejected = na < n
        adv = na + rejected.to(torch.int64)
        x[rd] = res.next_state.to(x.dtype)
        # stats
        a = acc
        a["pos_acc"] += accepted.sum(0)
        a["pos_att"] += attempted.sum(0)
        a["hist"] += torch.bincount(na, minlength=L + 1)
        a["wlen"] += torch.bincount(n, minlength=L + 1)
        N = T.num_steps
        a["step_acc"] += torch.bincount(kw[accepted], minlength=N)[:N]
        a["step_att"] += torch.bincount(kw[attempted], minlength=N)[:N]
        stats.windows += w
        stats.speculative_steps += int(adv.sum())
        # next round's frozen prediction
        if frozen_mode:
            if prefetch:
                idx = torch.arange(w)
                src = torch.where(rejected, na, n)                  # parent of the rejected step, or y_n
                k_new = kr + adv
                exact = (~rejected) & (k_new < N)
                usable = rejected | exact
                srcd, idxd = src.to(dev), idx.to(dev)
                ysrc, x0src = Y[idxd, srcd], TP[idxd, srcd]
                fz = self.draft.freeze_value(T, ysrc, x0src, (kr + src).to(dev))
                ud = usable.to(dev).view((w,) + (1,) * (x.dim() - 1))
                frozen[rd] = torch.where(ud, fz, frozen[rd])
                root_x0[rd] = torch.where(ud, x0src, root_x0[rd])
                root_exact[rows] = exact
                has_frozen[rows] = has_frozen[rows] | usable
            else:
                root_exact[rows] = False
        return WindowOutcome(accepted, attempted, adv)

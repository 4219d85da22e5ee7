"""The speculative sampler (docs/design.md §3, §5, §8, §10); the ancestral baseline is in
:mod:`specdiff_kernels.sampling.ancestral`, what both share in
:mod:`specdiff_kernels.sampling.base`.

Both run the chain defined by a :class:`~specdiff_kernels.sampling.transitions.GaussianTransitions`
and a target ``model(x, t)``; both read their randomness from the same per-chain streams
(:mod:`specdiff_kernels.sampling.noise`), so with the same generator they use the same noise xi_k
at every sampling step k.

:class:`SpeculativeSampler` runs one of two paths (``path=``; "auto": the static round wherever
it applies):

* the STATIC round (:mod:`specdiff_kernels.sampling.static_round`): frozen-target draft with a
  prefetched root, fixed batch and window, every per-chain quantity on the device, one network
  call and a few fused ops per round, one host read per round; compiled and CUDA-graph captured on
  GPUs; eager on a CPU with B >= 2 its network call holds only the states the round reads, as the
  ragged one's;
* the RAGGED round (:mod:`specdiff_kernels.sampling.ragged_round`): every chain at its own step
  with its own window; runs every setting, in particular those
  :meth:`SpeculativeSampler.static_path_blockers` keeps off the static round (a draft network,
  no prefetch, the adaptive window, a custom verify op, non-affine transitions); evaluates only
  the states a round needs and drops finished chains.

Each round of either path makes ONE sequential target call (two with
``FrozenTargetDraft(prefetch_root=False)``: the roots first, then the window states).

L = 1: with ``FrozenTargetDraft(prefetch_root=False)`` every window starts from the target's own
prediction at its root, so mq_0 == mp_0 bit for bit, the step is always accepted and
y_1 = mp_0 + s_k xi_k is computed by the same expression as the ancestral step: the speculative
sampler reproduces the ancestral one up to float rounding (the ancestral step is one fused
kernel). With prefetching (the default) or a draft model the L = 1 chains differ from the ancestral
ones path by path (after a rejection the next frozen prediction is stale, and rejected steps are
reflected rather than drawn from xi_k directly) but not in law.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import layout
from ..ops import round as round_ops
from ..ops import verify as ops
from ..ops.round_spec import RoundChains
from ..validate import as_choice
from . import checks as _args
from .accounting import SamplerStats
from .ancestral import LeanAncestral
from .autopilot import AutoRounds, AutoWindow, CostModel, WindowController, calibrate
from .base import Chains, NonFiniteError, SamplerBase, SamplingResult, sample_in_inference_mode
from .drafts import Draft, DraftModelDraft, FrozenTargetDraft
from .network import NetworkCall
from .noise import ChainNoise
from .ragged_round import RaggedRound
from .static_round import StaticRound
from .transitions import GaussianTransitions, Model, round_spec, stochastic_runs
from .window import AdaptiveWindow

VerifyFn = Callable[..., "ops.VerifyResult"]
PATHS = ("auto", "static", "ragged")
# On CPU the static round calls the network only on the states it reads (the ragged path's
# evaluations, with the static round's lower own cost) from this many chains on: the smallest
# batch at which that compact call beats the full B (L + 1) call (bench/bench_compact.py ->
# bench/results/compact_cpu.md; compiled: bench/results/latency_cpu.md).
COMPACT_MIN_CHAINS_CPU = 2
# window="auto"'s measured cost models, per model (weakly: they go with the model), then per
# (shape, dtype, device, conditioning names, window, max_batch)
_COSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class SpeculativeSampler(SamplerBase):
    """Exact speculative sampling of a Gaussian diffusion chain (docs/design.md §3, §5, §10).

    Terms (defined in docs/design.md §13):

    * root: a chain's committed state at the start of a round, y_0;
    * window: the states y_1..y_n drafted from the root in a round and verified together; L
      (``window``) is the buffer length;
    * per-chain window length n (``lengths`` in the code and the round ops): the steps a chain
      drafts in a round, n <= L;
    * frozen value: the target's x0-hat (or eps-hat) at one state, which the frozen-target draft
      reuses at every drafted state of a window;
    * exact / stale root: the frozen value was computed at the root itself / at an earlier state
      (the root is then evaluated in the round's call);
    * prefetch: evaluating the target at y_n in the round's call, so the next root is exact;
    * committed steps: the steps a round advances a chain by (the accepted ones, plus the
      reflected one at a rejection);
    * deterministic step: a step with std 0, taken from the target's prediction, never drafted;
    * first step: the ancestral step a frozen-draft chain takes before anything is frozen
      (counted in ``stats.direct_steps`` with the ancestral sampler's steps);
    * round: draft, one batched target call, verify, commit;
    * call: one sequential (batched) network invocation; an evaluation is one state in it.

    Args:
        model: the target network, ``model(x, t) -> prediction`` (t: ``[B]`` timesteps).
        transitions: the chain (:class:`GaussianTransitions`).
        draft: :class:`FrozenTargetDraft` (default ``FrozenTargetDraft("x0", prefetch_root=True)``)
            or :class:`DraftModelDraft`.
        window: ``"auto"`` (the default): before each round a cost-aware controller
            (:mod:`specdiff_kernels.sampling.autopilot`, docs/design.md §9.1) picks the window
            with the most expected committed steps per second from the measured cost of the
            network's calls and the acceptance seen so far, including 0: plain ancestral steps,
            so a run is not slower than the ancestral chain where speculation does not pay. An
            int >= 1 fixes L, the number of drafted steps per round. ``"adaptive"`` / an
            :class:`~specdiff_kernels.sampling.window.AdaptiveWindow`: each chain's window
            length is chosen before each of its rounds from its OWN past acceptance under a cap
            on evaluations per step (exactness is kept: the length is a function of the past;
            see :mod:`specdiff_kernels.sampling.window`). The buffer length (``self.window``,
            ``stats.window``) is then the policy's ``max_window`` (32 for "auto"). Either is
            clamped to the longest run of stochastic steps of ``transitions`` (no window can be
            longer).
        backend: passed to :func:`specdiff_kernels.speculative_verify` (None: by device).
        verify_fn: replaces the verify op (same signature and return type as
            :func:`specdiff_kernels.speculative_verify`, called with ``backend=`` as a keyword).
            A hook for testing and instrumentation; the default is the public op.
        progress: show a tqdm bar over steps completed (summed over chains).
        check_finite: check model outputs and log ratios (raise :class:`NonFiniteError`).
        path: ``"auto"``: the static round unless :meth:`static_path_blockers` names a reason
            it cannot run, else the ragged round; ``"static"`` (refused where a blocker applies)
            or ``"ragged"`` (always applies). The blockers: a draft model (DraftModelDraft),
            FrozenTargetDraft(prefetch_root=False), an adaptive window, a custom verify_fn,
            transitions not affine in x0-hat (dynamic thresholding).
        compile: ``"auto"`` (on CUDA only), True or False: compile the static round with
            ``torch.compile`` (on CUDA or at B = 1 the whole round, network included, fullgraph;
            on CPU from ``COMPACT_MIN_CHAINS_CPU`` chains the network alone, with a dynamic
            batch). True with the ragged round is refused: it runs eagerly.
        cost: with ``window="auto"``, the network's cost instead of measuring it: a table
            ``{states: seconds}`` or a callable ``states -> seconds`` (e.g. a previous run's
            ``stats.autopilot["cost"]`` sizes and seconds): runs then repeat bit for bit across
            processes. Default: measured at the first ``sample()`` and cached per model.
        max_batch: the most states one model invocation may hold (None: no limit). A round's one
            logical network call on more states (B (L + 1) at most) is made in chunks of this
            size: the same samples, activation memory bounded by it.
    """

    name = "speculative"

    def __init__(
        self,
        model: Model,
        transitions: GaussianTransitions,
        draft: Optional[Draft] = None,
        window: int | str | AdaptiveWindow = "auto",
        *,
        backend: Optional[str] = None,
        verify_fn: Optional[VerifyFn] = None,
        progress: bool = False,
        check_finite: bool = True,
        path: str = "auto",
        compile: bool | str = "auto",
        max_batch: Optional[int] = None,
        cost=None,
    ):
        super().__init__(
            model, transitions, progress=progress, check_finite=check_finite, max_batch=max_batch
        )
        self.draft = _args.check_draft(transitions, draft)
        if window == "auto" or isinstance(window, AutoWindow):
            self.window_policy = window if isinstance(window, AutoWindow) else AutoWindow()
            self.window = self.window_policy.max_window
        else:
            self.window, self.window_policy = _args.as_window(window)
        self.autopilot = isinstance(self.window_policy, AutoWindow)
        if cost is not None and not self.autopilot:
            raise ValueError("cost= sets window='auto''s cost model: it needs window='auto'")
        if cost is not None:
            CostModel.from_user(cost, "cpu")  # checked here, made per device at sample()
        self.user_cost = cost
        self._costs: dict = {}  # (B, event shape, dtype, device) -> CostModel, measured once
        self.backend = backend
        self.verify_fn = (
            ops.speculative_verify if verify_fn is None else _args.check_verify_fn(verify_fn)
        )
        path = as_choice("path", path, PATHS)
        compile = _args.as_compile(compile)
        blockers = self.static_path_blockers()
        if path == "static" and blockers:
            raise ValueError(
                f"path='static' cannot run with {', '.join(blockers)}; use path='ragged' or 'auto'"
            )
        if compile is True and (path == "ragged" or blockers):
            why = ", ".join((["path='ragged'"] if path == "ragged" else []) + blockers)
            raise ValueError(
                f"compile=True compiles the static round, but this sampler runs the "
                f"ragged round ({why}), which runs eagerly; leave compile at 'auto' "
                f"or False"
            )
        self.path = path
        self.compile = compile
        # a window longer than the longest run of stochastic steps would only be padding, and
        # noise buffers of that size (a huge window on a short schedule: gigabytes)
        self.window = max(1, min(self.window, int(stochastic_runs(transitions).max())))

    def __repr__(self) -> str:
        w = self.window if self.window_policy is None else repr(self.window_policy)
        return (
            f"SpeculativeSampler(window={w}, draft={self.draft!r}, "
            f"transitions={self.transitions!r})"
        )

    # -------------------------------------------------------------- public
    @sample_in_inference_mode
    def sample(
        self,
        num_chains: Optional[int] = None,
        event_shape=None,
        *,
        generator: Optional[torch.Generator] = None,
        chain_ids=None,
        x_init=None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        model_kwargs: Optional[dict] = None,
        warm_start=None,
    ) -> SamplingResult:
        """Run ``num_chains`` chains of shape ``event_shape`` to the end of the schedule.

        Args:
            num_chains, event_shape: batch size and state shape (or give ``x_init``).
            generator: seeds every chain's random stream (one draw); same seed, same samples.
            chain_ids: integer id of each chain (default 0..B-1): chain c's stream depends only on
                (generator seed, c), so a chain gives the same result in any batch.
            x_init: initial states ``[B, *E]`` (default: ``init_std * N(0, I)`` from the streams).
            dtype, device: of the states (default float32, CPU). With a tensor ``x_init`` the
                states are x_init's: leave them out, or give x_init's own (another one is
                refused); an ``x_init`` that is not a tensor is made one of this dtype and device.
            model_kwargs: per-chain conditioning, ``{name: tensor with num_chains rows}`` (or a
                dict of such tensors): every network call (target and draft model) on states of
                chain c gets row c, as ``model(x, t, **kwargs)``; e.g. ``class_labels`` or
                ``encoder_hidden_states`` of a diffusers UNet. The law is that of the ancestral
                chain with the same conditioning.
            warm_start: a guess of each chain's sample ``[B, *E]`` (e.g. a robot policy's
                previous action chunk, shifted by the steps executed since): the frozen-target
                draft's first frozen x0-hat, in place of the first call at the starting states
                (one sequential call fewer; docs/design.md §5.1). Any guess keeps the law exact;
                a good one also lengthens the first windows. Needs the prefetching
                ``FrozenTargetDraft`` (the default draft).

        Returns:
            :class:`SamplingResult` (samples ``[B, *E]``, :class:`SamplerStats`).
        """
        t0 = time.perf_counter()
        x, noise, chains = self.setup(
            num_chains, event_shape, generator, chain_ids, x_init, dtype, device, model_kwargs
        )
        warm = self._checked_warm_start(warm_start, x)
        if self.resolve_path() == "static":
            res = self._sample_static(x, noise, chains, warm)
        else:
            if self.autopilot:  # per-chain windows from the cost model
                self.window_policy.cost = self.cost_model(x, noise, chains)
                self.window_policy.num_chains = x.shape[0]
            res = RaggedRound(self, x, noise, chains, warm).run()
            if self.autopilot:
                res.stats.autopilot = {"cost": self.window_policy.cost.as_dict()}
        res.stats.wall_time = time.perf_counter() - t0
        return res

    def _checked_warm_start(self, warm_start, x: Tensor) -> Optional[Tensor]:
        """``warm_start`` as a tensor like x (None stays None), refused in one line where it
        cannot be used."""
        if warm_start is None:
            return None
        draft = self.draft
        if not (isinstance(draft, FrozenTargetDraft) and draft.prefetch_root):
            raise ValueError(
                f"warm_start is the prefetching frozen-target draft's first frozen value; "
                f"{draft!r} has none to replace (it calls the target at every root)"
            )
        return _args.as_warm_start(warm_start, x)

    # -------------------------------------------------------------- which round
    def static_path_blockers(self) -> list[str]:
        """Why the static round cannot run this sampler, one reason per setting (empty: it can).

        The one statement of the rule: ``path="auto"`` runs the static round exactly when this is
        empty, and ``path="static"`` or ``compile=True`` are refused with these reasons."""
        draft = self.draft
        rule = (
            (isinstance(draft, DraftModelDraft), "a draft model (DraftModelDraft)"),
            (
                isinstance(draft, FrozenTargetDraft) and not draft.prefetch_root,
                "FrozenTargetDraft(prefetch_root=False)",
            ),
            (
                self.window_policy is not None and not self.autopilot,
                "an adaptive window",
            ),
            (self.verify_fn is not ops.speculative_verify, "a custom verify_fn"),
            (
                not self.transitions.affine,
                "transitions not affine in x0-hat (dynamic thresholding)",
            ),
        )
        return [reason for blocked, reason in rule if blocked]

    def resolve_path(self) -> str:
        """``"static"`` or ``"ragged"``: what ``sample`` runs (see ``path``)."""
        if self.path != "auto":
            return self.path
        return "ragged" if self.static_path_blockers() else "static"

    # -------------------------------------------------------------- the static path
    def _static_round(self, x: Tensor, noise: ChainNoise, chains: Chains) -> StaticRound:
        cuda = x.device.type == "cuda"
        # on CPU: call the network only on the states a round reads (its size is read on the
        # host, which costs nothing there; compile=True then compiles the network alone, with a
        # dynamic batch); on CUDA: the fixed B (L + 1) call, captured as a CUDA graph
        return StaticRound(
            self.model,
            self.transitions,
            self.window,
            self.draft.freeze,
            noise.seed,
            noise.chain_ids,
            dtype=x.dtype,
            backend=self.backend,
            compile=self._compiled(x),
            cuda_graph=cuda,
            cond=chains.cond,
            compact=not cuda and x.shape[0] >= COMPACT_MIN_CHAINS_CPU,
            max_batch=self.network_max_batch(x, chains),
        )

    def _compiled(self, x: Tensor) -> bool:
        return x.device.type == "cuda" if self.compile == "auto" else bool(self.compile)

    def _sample_static(
        self, x: Tensor, noise: ChainNoise, chains: Chains, warm: Optional[Tensor]
    ) -> SamplingResult:
        B, N = x.shape[0], self.transitions.num_steps
        rnd = self._static_round(x, noise, chains)
        auto = self._auto_rounds(rnd, x, noise, chains) if self.autopilot else None
        # the one host read of a round: the head of the counters (rounds, non-finite codes,
        # steps done, chains left); with window="auto" also the acceptance by position
        size = layout.STAT_HEAD if auto is None else auto.head_size()
        bar = self.progress_bar(B * N)
        done_steps = 0
        s = rnd.start(x, warm)
        while True:
            head = s.stats[:size].tolist()
            bad_out, bad_lr = head[layout.STAT_BAD_OUTPUT], head[layout.STAT_BAD_RATIO]
            if self.check_finite and (bad_out != layout.NO_BAD or bad_lr != layout.NO_BAD):
                self._raise_static_nonfinite(bad_out, bad_lr, chains.ids, N)
            if bar is not None:
                bar.update(head[layout.STAT_STEPS_DONE] - done_steps)
                done_steps = head[layout.STAT_STEPS_DONE]
            if head[layout.STAT_LIVE] == 0:
                break
            s = rnd.step(s) if auto is None else auto.next(s, head)
        if bar is not None:
            bar.update(B * N - done_steps)
            bar.close()
        stats = self._static_stats(rnd, s, B)
        if auto is not None:
            if self.check_finite and auto.bad is not None:
                step, row, what = auto.bad
                if what == "state":
                    raise self.nonfinite_state_error(step, chains.ids[row])
                raise self.nonfinite_output_error("target", step, chains.ids[row])
            auto.finish(stats)
            auto.warn_if_mostly_ancestral(stats)
        return SamplingResult(s.x, stats)

    def _static_stats(self, rnd: StaticRound, s, B: int) -> SamplerStats:
        T = self.transitions
        counts = s.stats.tolist()
        stats = SamplerStats(self.name, B, T.num_steps, self.window)
        stats.rounds = stats.target_calls = counts[layout.STAT_ROUNDS]
        stats.target_evals = rnd.target_evals
        stats.direct_steps = rnd.direct_steps
        stats.windows = counts[layout.STAT_WINDOWS]
        stats.speculative_steps = counts[layout.STAT_SPEC_STEPS]
        stats.deterministic_steps = counts[layout.STAT_DET_STEPS]
        rnd.layout.fill(stats, counts)
        return stats

    # -------------------------------------------------------------- window="auto"
    def cost_model(
        self, x: Tensor, noise: ChainNoise, chains: Chains, rnd: Optional[StaticRound] = None
    ) -> CostModel:
        """The cost model of runs like this one: measured at the first, then cached per model
        and (batch, event shape, dtype, device, conditioning, window, max_batch); ``cost=``
        replaces the measurement."""
        if self.user_cost is not None:
            return CostModel.from_user(self.user_cost, x.device.type)
        # shared by every sampler of this model in the process, with the corrections its real
        # rounds have measured: later runs start from them
        try:
            costs = _COSTS.setdefault(self.model, {})
        except TypeError:  # a model that cannot be weakly referenced: this sampler's own cache
            costs = self._costs
        cond = tuple(sorted(chains.cond.values)) if chains.cond else ()
        key = (
            tuple(x.shape),
            x.dtype,
            x.device,
            cond,
            self.window,
            self.network_max_batch(x, chains),
        )
        if key not in costs:
            costs[key] = self._calibrate(x, noise, chains, rnd)
        return costs[key]

    def _calibrate(
        self, x: Tensor, noise: ChainNoise, chains: Chains, rnd: Optional[StaticRound]
    ) -> CostModel:
        """The probes call the network as the run will: the static round's own network call and
        tables where there is one (``rnd``), else ones made here (the ragged path)."""
        T, B, W = self.transitions, x.shape[0], self.window
        dev = x.device
        net = (
            rnd.net
            if rnd is not None
            else NetworkCall(self.model, T, dev, x.dtype, self.network_max_batch(x, chains))
        )

        def call(b: int):
            rows = torch.arange(b, device=dev) % B
            cond = chains.cond.gather(rows) if chains.cond else {}
            return net(x.index_select(0, rows), torch.zeros(b, dtype=torch.int64, device=dev), cond)

        def draft():
            if not T.affine:
                return None
            k = torch.zeros(B, dtype=torch.int64, device=dev)
            spec = rnd.spec if rnd is not None else round_spec(T, noise.seed)
            chains = RoundChains(x, k, k + W, noise.chain_ids)
            return round_ops.dispatch_frozen_draft(self.backend, x, chains, spec, W)

        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        return calibrate(call, draft, B * (W + 1), B, B * (W + 1), T.num_steps, dev.type, sync)

    def _auto_rounds(self, rnd: StaticRound, x, noise: ChainNoise, chains: Chains) -> AutoRounds:
        B = x.shape[0]
        cost = self.cost_model(x, noise, chains, rnd)
        controller = WindowController(
            cost, self.window, B, rnd.compact, num_steps=self.transitions.num_steps
        )
        lean = LeanAncestral(
            self.model,
            self.transitions,
            noise.seed,
            noise.chain_ids,
            dtype=x.dtype,
            backend=self.backend,
            compile=self._compiled(x),
            cond=chains.cond.gather(torch.arange(B, device=x.device)),
            max_batch=self.network_max_batch(x, chains),
        )
        return AutoRounds(rnd, controller, lean, self.check_finite)

    def _raise_static_nonfinite(self, bad_out: int, bad_lr: int, ids: list, N: int) -> None:
        code = bad_out if bad_out != layout.NO_BAD else bad_lr
        row, step = divmod(code, N + 1)
        if bad_out != layout.NO_BAD:
            raise self.nonfinite_output_error("target", step, ids[row])
        t = self.transitions.timesteps[min(step, N - 1)].item()
        raise NonFiniteError(
            f"non-finite log ratio at sampling step {step} (timestep t={t}) for chain {ids[row]}"
        )

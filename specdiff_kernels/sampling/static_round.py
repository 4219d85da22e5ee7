"""The static-shape round: speculative sampling whose every round is the same few launches.

A round of the frozen-target draft with a prefetched root (docs/design.md §6, §8) on a FIXED batch:

1. ``n = min(L, stochastic steps left before a deterministic step)`` per chain, from a table on
   the device (0 for a chain at a deterministic step or finished);
2. ``Y = frozen_draft(x, frozen, k, n)``: the window, noise drawn in-kernel;
3. ONE network call on all ``B (L + 1)`` drafted states (positions past n are evaluated too: the
   call's shape never changes);
4. ``verify_frozen``: log ratios, first rejection, reflection, and the commit (next state, steps,
   next frozen value; a deterministic step right after an accepted window, or at a chain's root,
   is taken from the same call's prediction);
5. statistics accumulated on the device.

Finished chains have ``n = 0`` and stay idle; nothing in a round depends on values read back to
the host, so a round is one graph: ``torch.compile(fullgraph=True)`` traces it with the network,
and on CUDA it is captured once as a CUDA graph and replayed. The host reads one small tensor per
round: whether every chain has finished (and whether a non-finite value was seen).

The first round cannot draft (nothing is frozen yet): a bootstrap call at the roots takes one
plain ancestral step and freezes the prediction, as the ragged sampler does.

:class:`LeanAncestral` is the baseline held to the same standard: one network call and one fused
step (``frozen_draft`` with L = 1 and the network's own x0-hat) per sampling step, same noise.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import round as round_ops
from ..ops.reference import round as rr
from .checks import ModelKwargs, check_model_output
from ..ops.reference.round import FREEZE_X0
from .transitions import GaussianTransitions, Model
from .transitions import clip_value, round_tables


NO_BAD = rr.NO_BAD


def draft_op(backend: Optional[str], *args) -> Tensor:
    """``frozen_draft``: the dispatcher op directly (no Python checks: the round is a hot path and
    its arguments are built right), or the checked wrapper when a backend is named."""
    if backend is None:
        return torch.ops.specdiff.frozen_draft(*args)
    return round_ops.frozen_draft(*args, backend=backend)


def stochastic_runs(transitions: GaussianTransitions) -> Tensor:
    """``[N + 1]`` int64: stochastic steps from step k before the next deterministic step or the
    end (0 at a deterministic step and at k = N)."""
    det = transitions.deterministic.tolist()
    run = [0] * (transitions.num_steps + 1)
    for s in range(transitions.num_steps - 1, -1, -1):
        run[s] = 0 if det[s] else run[s + 1] + 1
    return torch.tensor(run, dtype=torch.int64)


class NetworkCall:
    """The target network as the round calls it: raw x0-hat at states x and steps k (clamped
    into the table), every table on the states' device. ``forward`` does no host work."""

    def __init__(self, model: Model, transitions: GaussianTransitions, device, dtype):
        T = transitions
        self.model = model
        self.N = T.num_steps
        self.sample_pred = T.prediction == "sample"
        self.input_scale = T._on("input_scale", device, dtype)
        self.timesteps = T._on("timesteps", device, T.timesteps.dtype)
        self.out_x = T._on("out_x", device, dtype)
        self.out_pred = T._on("out_pred", device, dtype)

    def __call__(self, x: Tensor, k: Tensor, cond: dict) -> tuple[Tensor, Tensor]:
        """(raw network output, x0-hat) at states x [M, *E] and steps k [M]; ``cond``: the rows'
        conditioning (network kwargs, gathered per row)."""
        kc = k.clamp(0, self.N - 1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        out = self.model(x * self.input_scale[kc].view(shape), self.timesteps[kc], **cond)
        check_model_output("target", out, x)   # shape and dtype only: traceable, no host read
        if self.sample_pred:
            return out, out
        return out, self.out_x[kc].view(shape) * x + self.out_pred[kc].view(shape) * out


@dataclass
class ChainBatch:
    """Every per-chain quantity of a static run, on the device (tensors only, so a round can be
    compiled and captured; the CUDA graph updates them in place)."""

    x: Tensor                  # [B, *E] states
    k: Tensor                  # [B] int64 sampling step (N: finished)
    frozen: Tensor             # [B, *E] frozen x0-hat (or eps-hat)
    exact: Tensor              # [B] bool: frozen is the target's own prediction at x (the last
                               # round evaluated x: its window was accepted whole)
    stats: Tensor              # int64 counters, laid out by round_reference.StatsLayout

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def copy_(self, other: "ChainBatch") -> None:
        for a, b in zip(self.tensors(), other.tensors()):
            a.copy_(b)


class StaticRound:
    """The static round of one speculative run (see the module docstring).

    Args:
        model, transitions: the target and the chain.
        window: L.
        freeze: ``"x0"`` or ``"eps"`` (the frozen-target draft's mode).
        seed, chain_ids: the chains' noise key and ids (int64 tensors on the device).
        backend: round-op backend (None: by device).
        compile: compile the round (network included) with ``torch.compile(fullgraph=True)``;
            with ``compact``, whose calls change size, only the network, with a dynamic batch.
        cuda_graph: on CUDA, capture the round once and replay it.
        cond: the chains' conditioning (:class:`~specdiff_kernels.sampling.checks.ModelKwargs`).
        compact: call the network only on the window positions a round reads (0..n of chains
            not finished, less position 0 where the root's prediction is already known), not on
            all B (L + 1): the call's size then changes from round to round and is read on the
            host, so it suits CPU runs (a host read costs nothing there, the network's work is
            proportional to its batch), not captured rounds.
    """

    def __init__(self, model: Model, transitions: GaussianTransitions, window: int, freeze: str,
                 seed: Tensor, chain_ids: Tensor, *, dtype: torch.dtype, backend: Optional[str] = None,
                 compile: bool = False, cuda_graph: bool = False,
                 cond: Optional[ModelKwargs] = None, compact: bool = False):
        device = chain_ids.device
        if compact and cuda_graph and device.type == "cuda":
            raise ValueError("compact=True sizes each network call on the host: it cannot be "
                             "captured as a CUDA graph")
        self.T = transitions
        self.cond = ModelKwargs({}) if cond is None else cond
        self._cond_roots: dict = {}    # the chains' kwargs for a call on their roots [B]
        self._cond_window: dict = {}   # ... on their windows [B (L + 1)], chain-major
        self.N = transitions.num_steps
        self.L = int(window)
        self.freeze = round_ops.FREEZE_MODES[freeze]
        self.seed, self.ids = seed, chain_ids
        self.backend = backend
        self.coef = round_tables(transitions, device)
        self.clip = clip_value(transitions)
        # each chain's window length by its step: the stochastic run ahead of it, capped at L
        self.window_lengths = stochastic_runs(transitions).clamp(max=self.L).to(device)
        # the last window position a round reads, by step (-1: finished, nothing to read)
        self.read_upto = torch.cat([self.window_lengths[:-1],
                                    torch.full((1,), -1, dtype=torch.int64, device=device)])
        self._pos: Optional[Tensor] = None    # arange(L + 1), made in start(): rounds only read it
        self.layout: Optional[rr.StatsLayout] = None
        if compile and compact:   # the round stays eager: its calls change size
            model = torch.compile(model, dynamic=True)
        self.net = NetworkCall(model, transitions, device, dtype)
        self.compile = compile
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.compact = compact
        self.target_evals = 0   # states the network has been called on (host count)
        self._round: Callable[[ChainBatch], ChainBatch] = (
            torch.compile(self._round_eager, fullgraph=True, dynamic=False)
            if compile and not compact else self._round_eager)
        self._graph = None
        self._static: Optional[ChainBatch] = None

    # ------------------------------------------------------------------ pieces
    def _draft(self, x, frozen, k, n, window, freeze):
        return draft_op(self.backend, x, frozen, k, n, self.coef, self.seed, self.ids, window,
                        freeze, self.clip)

    def _verify(self, Y, P, frozen, k, n):
        if self.backend is None:
            return round_ops.FrozenVerifyResult(*torch.ops.specdiff.verify_frozen(
                Y, P, frozen, k, n, self.coef, self.seed, self.ids, self.freeze, self.clip))
        return round_ops.verify_frozen(Y, P, frozen, k, n, self.coef, self.seed, self.ids,
                                       self.freeze, self.clip, backend=self.backend)

    def _freeze(self, y, p, k):
        B = y.shape[0]
        c = rr._rows(self.coef, k, y.dtype)
        return rr.freeze_value(c, y.reshape(B, -1), p.reshape(B, -1), self.freeze).reshape(y.shape)

    # ------------------------------------------------------------------ bootstrap
    def start(self, x: Tensor) -> ChainBatch:
        """The bootstrap round: one call at the roots, one ancestral step, the first frozen value."""
        B, L, N = x.shape[0], self.L, self.N
        dev = x.device
        i64 = dict(dtype=torch.int64, device=dev)
        self._pos = torch.arange(L + 1, **i64)
        chain = torch.arange(B, **i64)
        self._cond_roots = self.cond.gather(chain)
        self._cond_window = self.cond.gather(chain.repeat_interleave(L + 1))
        k = torch.zeros(B, **i64)
        out, p0 = self.net(x, k, self._cond_roots)
        self.target_evals = B
        ones = torch.ones(B, **i64) if N > 0 else k
        x1 = self._draft(x, p0, k, ones, 1, FREEZE_X0)[:, 1]
        self.layout = lay = rr.StatsLayout(L, N, B)
        stats = torch.zeros(lay.size, **i64)
        bad = ~torch.isfinite(out.reshape(B, -1)).all(-1)
        head = [1, 0, 0, B if bool(self.T.deterministic[0]) else 0, NO_BAD, NO_BAD, B if N else 0,
                B if N > 1 else 0]
        stats[:rr.STAT_HEAD] = torch.tensor(head, **i64)
        # the bootstrap's non-finite outputs: code = chain * (N + 1) + step 0
        stats[rr.STAT_BAD_OUTPUT] = (chain * (N + 1)).masked_fill(~bad, NO_BAD).amin()
        if N <= 1:
            lay.view(stats, "chain_rounds").fill_(1)
        return ChainBatch(x=x1, k=k + 1, frozen=self._freeze(x, p0, k),
                          exact=torch.zeros(B, dtype=torch.bool, device=dev), stats=stats)

    # ------------------------------------------------------------------ the round
    def _evaluate(self, Y: Tensor, s: ChainBatch) -> tuple[Tensor, Tensor]:
        """(raw output, x0-hat) at the window's states, both [B, L+1, *E]."""
        B, L1 = Y.shape[:2]
        k_pos = s.k[:, None] + self._pos[None]                       # [B, L+1] step of each position
        rows_y, rows_k = Y.reshape(B * L1, *Y.shape[2:]), k_pos.reshape(-1)
        if not self.compact:
            out, P = self.net(rows_y, rows_k, self._cond_window)
            return out.reshape(Y.shape), P.reshape(Y.shape)
        # the positions verify_frozen reads: 0..n of chains not finished (read_upto = -1 once
        # finished), from 1 where the root's prediction is the frozen value; the others stay 0
        first = s.exact.to(torch.int64)[:, None]
        need = (self._pos[None] >= first) & (self._pos[None] <= self.read_upto[s.k][:, None])
        rows = need.view(-1).nonzero().view(-1)
        self.target_evals += rows.numel()   # the round is eager when compact
        cond = self.cond.gather(rows // L1) if self.cond else {}
        o, p = self.net(rows_y.index_select(0, rows), rows_k.index_select(0, rows), cond)
        out = rows_y.new_zeros(rows_y.shape).index_copy_(0, rows, o).view(Y.shape)
        P = rows_y.new_zeros(rows_y.shape).index_copy_(0, rows, p).view(Y.shape)
        if bool(s.exact.any()):
            ex = s.exact.nonzero().view(-1)
            P[:, 0].index_copy_(0, ex, self._known_x0(s, ex))
        return out, P

    def _known_x0(self, s: ChainBatch, ex: Tensor) -> Tensor:
        """The target's x0-hat at the roots of chains ex, from their frozen value (which the
        last round computed from the network's prediction at that very state)."""
        f = s.frozen.index_select(0, ex)
        if self.freeze == FREEZE_X0:
            return f
        acc = rr._acc(f.dtype)
        c = rr._rows(self.coef, s.k.index_select(0, ex), acc)
        x = s.x.index_select(0, ex)
        x0 = rr.draft_x0(c, x.reshape(len(ex), -1).to(acc), f.reshape(len(ex), -1).to(acc),
                         self.freeze)
        return x0.to(f.dtype).reshape(f.shape)

    def _round_eager(self, s: ChainBatch) -> ChainBatch:
        L = self.L
        k = s.k
        n = self.window_lengths[k]                                   # k lies in 0..N
        Y = self._draft(s.x, s.frozen, k, n, L, self.freeze)
        out, P = self._evaluate(Y, s)
        res = self._verify(Y, P, s.frozen, k, n)
        stats = torch.ops.specdiff.round_stats(s.stats, k, n, res.num_accepted, res.committed,
                                               res.log_ratio, out, self.N)
        return ChainBatch(x=res.next_state, k=k + res.committed, frozen=res.next_frozen,
                          exact=res.root_exact, stats=stats)

    def step(self, s: ChainBatch) -> ChainBatch:
        """One round. With ``cuda_graph``, the first call captures the round on s's buffers and
        every later call replays it (s must be the batch returned by the previous call)."""
        if not self.compact:
            self.target_evals += s.x.shape[0] * (self.L + 1)
        if not self.cuda_graph:
            return self._round(s)
        if self._graph is None:
            self._static = s
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                # warm-up on the very batch the capture will read (the round is pure: s is not
                # changed), so compilation and autotuning finish before the capture starts
                self._round(s)
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                s.copy_(self._round(s))
        self._graph.replay()
        return self._static


class LeanAncestral:
    """The ancestral chain with the same care: per step one network call and one fused step
    (``frozen_draft`` with L = 1 on the network's own x0-hat: mean + std * xi(seed, c, k)), the
    same noise as the speculative sampler; optionally compiled (network included)."""

    def __init__(self, model: Model, transitions: GaussianTransitions, seed: Tensor,
                 chain_ids: Tensor, *, dtype: torch.dtype, backend: Optional[str] = None,
                 compile: bool = False, cond: Optional[dict] = None):
        device = chain_ids.device
        self.T = transitions
        self.N = transitions.num_steps
        self.seed, self.ids = seed, chain_ids
        self.cond = {} if cond is None else cond    # the chains' network kwargs, rows in order
        self.backend = backend
        # a mean that is not affine in x0-hat (dynamic thresholding) is stepped by the
        # transitions' own formula with the same counter-based noise
        self.coef = round_tables(transitions, device) if transitions.affine else None
        self.clip = clip_value(transitions)
        self.net = NetworkCall(model, transitions, device, dtype)
        # on CUDA, "reduce-overhead" replays each step as a CUDA graph: the fastest baseline
        self.cuda_graphs = compile and device.type == "cuda"
        mode = "reduce-overhead" if self.cuda_graphs else None
        self._step = torch.compile(self._step_eager, fullgraph=True, dynamic=False, mode=mode) \
            if compile else self._step_eager

    def _step_eager(self, x: Tensor, k: Tensor, ones: Tensor) -> tuple[Tensor, Tensor]:
        out, p = self.net(x, k, self.cond)
        bad = ~torch.isfinite(out.reshape(x.shape[0], -1)).all(-1)
        if self.coef is None:
            xi, _ = round_ops.chain_noise(self.seed, self.ids, k, 1, x.shape[1:], x.dtype)
            return self.T.mean_from_x0(x, p, k) + self.T.coef("std", k, x) * xi[:, 0], bad
        y = draft_op(self.backend, x, p, k, ones, self.coef, self.seed, self.ids, 1, FREEZE_X0,
                     self.clip)
        return y[:, 1].contiguous(), bad

    def run(self, x: Tensor, check_finite: bool = True, bar=None
            ) -> tuple[Tensor, Optional[tuple[int, int]]]:
        """All N steps from x; returns the samples and the first (step, chain row) whose network
        output was not finite (None if all were; read once, at the end)."""
        B = x.shape[0]
        k = torch.zeros(B, dtype=torch.int64, device=x.device)
        ones = torch.ones_like(k)
        flags = []
        graphs = self.cuda_graphs
        for _ in range(self.N):
            if graphs:   # each step replays a CUDA graph whose outputs the next replay overwrites
                torch.compiler.cudagraph_mark_step_begin()
            x, bad = self._step(x, k, ones)
            if graphs:
                x, bad = x.clone(), bad.clone()
            if check_finite:
                flags.append(bad)
            k = k + 1
            if bar is not None:
                bar.update(B)
        if check_finite and flags:
            bad = torch.stack(flags)                     # [N, B]
            if bool(bad.any()):
                step, row = (int(v) for v in bad.nonzero()[0])
                return x, (step, row)
        return x, None

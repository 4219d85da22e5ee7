"""The static-shape round: speculative sampling whose every round is the same few launches.

A round of the frozen-target draft with a prefetched root (docs/design.md §6, §8) on a FIXED batch:

1. the per-chain window length ``lengths = min(L, stochastic steps left before a deterministic
   step)``, from a table on the device (0 for a chain at a deterministic step or finished);
2. ``Y = frozen_draft(x, frozen, k, lengths)``: the window, noise drawn in-kernel;
3. ONE network call on all ``B (L + 1)`` drafted states (positions past a chain's window length
   are evaluated too: the call's shape never changes);
4. ``verify_frozen``: log ratios, first rejection, reflection, and the commit (next state, steps,
   next frozen value; a deterministic step right after an accepted window, or at a chain's root,
   is taken from the same call's prediction);
5. statistics accumulated on the device.

Finished chains have window length 0 and stay idle; nothing in a round depends on values read back
to the host, so a round is one graph: ``torch.compile(fullgraph=True)`` traces it with the network,
and on CUDA it is captured once as a CUDA graph and replayed. The host reads one small tensor per
round: whether every chain has finished (and whether a non-finite value was seen).

The first round cannot draft (nothing is frozen yet): its call at the roots takes each chain's
first step (one plain ancestral step) and freezes the prediction, as the ragged round does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import layout
from ..ops import round as round_ops
from ..ops.layout import FREEZE_X0, NO_BAD
from ..ops.round_spec import RoundChains, RoundSpec
from .checks import ModelKwargs
from .network import NetworkCall
from .transitions import GaussianTransitions, Model, round_spec, stochastic_runs


@dataclass
class ChainBatch:
    """Every per-chain quantity of a static run, on the device (tensors only, so a round can be
    compiled and captured; the CUDA graph updates them in place)."""

    x: Tensor  # [B, *E] states
    k: Tensor  # [B] int64 sampling step (N: finished)
    frozen: Tensor  # [B, *E] frozen x0-hat (or eps-hat)
    exact: Tensor  # [B] bool: frozen is the target's own prediction at x (the last
    # round evaluated x: its window was accepted whole)
    stats: Tensor  # int64 counters, laid out by ops.layout.StatsLayout
    prev: Tensor  # [B, *E] multistep chains: the target's x0-hat at x's parent; else empty [0]

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
        max_batch: the most states one model invocation holds (None: no limit); a larger call is
            made in chunks of this size, still one logical call of the round.
    """

    def __init__(
        self,
        model: Model,
        transitions: GaussianTransitions,
        window: int,
        freeze: str,
        seed: Tensor,
        chain_ids: Tensor,
        *,
        dtype: torch.dtype,
        backend: Optional[str] = None,
        compile: bool = False,
        cuda_graph: bool = False,
        cond: Optional[ModelKwargs] = None,
        compact: bool = False,
        max_batch: Optional[int] = None,
    ):
        device = chain_ids.device
        if compact and cuda_graph and device.type == "cuda":
            raise ValueError(
                "compact=True sizes each network call on the host: it cannot be "
                "captured as a CUDA graph"
            )
        self.T = transitions
        self.cond = ModelKwargs({}) if cond is None else cond
        self._cond_roots: dict = {}  # the chains' kwargs for a call on their roots [B]
        self._cond_window: dict = {}  # window W -> ... on their windows [B (W + 1)], chain-major
        self.N = transitions.num_steps
        self.L = int(window)
        self.ids = chain_ids
        self.backend = backend
        self.spec = round_spec(transitions, seed, freeze, device)
        self.multistep = transitions.multistep
        # each chain's window length by its step: the stochastic run ahead of it, capped at L
        self.lengths_by_step = stochastic_runs(transitions).clamp(max=self.L).to(device)
        self._pos: Optional[Tensor] = None  # arange(L + 1), made in start(): rounds only read it
        self.layout: Optional[layout.StatsLayout] = None
        if compile and compact:  # the round stays eager: its calls change size
            model = torch.compile(model, dynamic=True)
        self.net = NetworkCall(model, transitions, device, dtype, max_batch)
        self.compile = compile
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.compact = compact
        self.target_evals = 0  # states the network has been called on (host count)
        self.direct_steps = 0  # stochastic chain-steps the first round took (host count)
        self._round: Callable[[ChainBatch], ChainBatch] = (
            torch.compile(self._round_eager, fullgraph=True, dynamic=False)
            if compile and not compact
            else self._round_eager
        )
        self._graphs: dict = {}  # window -> captured CUDA graph (all on the same buffers)
        self._static: Optional[ChainBatch] = None
        self._tables: dict = {}  # window -> (lengths by step, last position read by step)
        self._finite_summary: Optional[Tensor] = None  # see _output_summary
        # a round may read a value on the host: eager (not traced whole), not captured, on a CPU
        self._host_reads = device.type == "cpu" and not (compile and not compact)

    # ------------------------------------------------------------------ pieces
    def _chains(self, frozen: Tensor, k: Tensor, lengths: Tensor, prev: Tensor) -> RoundChains:
        return RoundChains(frozen, k, lengths, self.ids, prev if self.multistep else None)

    def _draft(self, x, chains: RoundChains, window: int, spec: Optional[RoundSpec] = None):
        spec = self.spec if spec is None else spec
        return round_ops.dispatch_frozen_draft(self.backend, x, chains, spec, window)

    def _verify(self, Y, P, chains: RoundChains) -> round_ops.FrozenVerifyResult:
        return round_ops.dispatch_verify_frozen(self.backend, Y, P, chains, self.spec)

    def freeze_at(self, y, p, k):
        """The frozen value of the target's x0-hat p at states y (steps k)."""
        return round_ops.freeze_value(self.spec, y, p, k)

    # ------------------------------------------------------------------ the first step
    def start(self, x: Tensor, warm: Optional[Tensor] = None) -> ChainBatch:
        """The first round: one call at the roots, each chain's first step (ancestral), the first
        frozen value; with ``warm`` (a guess of each chain's x0-hat) no call: the guess is the
        first frozen value, at stale roots."""
        B, L, N = x.shape[0], self.L, self.N
        dev = x.device
        i64 = dict(dtype=torch.int64, device=dev)
        self._pos = torch.arange(L + 1, **i64)
        chain = torch.arange(B, **i64)
        self._cond_roots = self.cond.gather(chain)
        self._cond_window = {}
        k = torch.zeros(B, **i64)
        self.layout = lay = layout.StatsLayout(L, N, B)
        if warm is not None:
            self.target_evals = self.direct_steps = 0
            stats = self._new_stats({layout.STAT_LIVE: B if N else 0})
            return ChainBatch(
                x=x,
                k=k,
                frozen=self.freeze_at(x, warm, k),
                exact=torch.zeros(B, dtype=torch.bool, device=dev),
                stats=stats,
                # the first step is first order (c_prev[0] = 0): zeros are never read
                prev=torch.zeros_like(x) if self.multistep else x.new_empty((0,)),
            )
        out, p0 = self.net(x, k, self._cond_roots)
        self.target_evals = B
        first_deterministic = bool(self.T.deterministic[0])
        self.direct_steps = 0 if first_deterministic else B
        lengths = torch.ones(B, **i64) if N > 0 else k
        # a multistep chain's first step is first order (c_prev[0] = 0): no previous prediction
        no_prev = torch.zeros_like(x)
        first = self.spec._replace(freeze=FREEZE_X0)  # the step from the roots' own x0-hat
        x1 = self._draft(x, self._chains(p0, k, lengths, no_prev), 1, first)[:, 1]
        bad = ~torch.isfinite(out.reshape(B, -1)).all(-1)
        stats = self._new_stats(
            {
                layout.STAT_ROUNDS: 1,
                layout.STAT_DET_STEPS: B if first_deterministic else 0,
                layout.STAT_STEPS_DONE: B if N else 0,
                layout.STAT_LIVE: B if N > 1 else 0,
            }
        )
        # the first step's non-finite outputs: code = chain * (N + 1) + step 0
        stats[layout.STAT_BAD_OUTPUT] = (chain * (N + 1)).masked_fill(~bad, NO_BAD).amin()
        if N <= 1:
            lay.view(stats, "chain_rounds").fill_(1)
        return ChainBatch(
            x=x1,
            k=k + 1,
            frozen=self.freeze_at(x, p0, k),
            exact=torch.zeros(B, dtype=torch.bool, device=dev),
            stats=stats,
            # its own buffer: the frozen x0 is a view of p0, and a captured round copies into each
            prev=p0.clone() if self.multistep else x.new_empty((0,)),
        )

    def _new_stats(self, head: dict[int, int]) -> Tensor:
        """A stats vector (``self.layout``) on the device: the ``STAT_*`` slots in ``head`` set,
        the BAD slots "none seen", every other counter 0."""
        values = [0] * layout.STAT_HEAD
        values[layout.STAT_BAD_OUTPUT] = values[layout.STAT_BAD_RATIO] = NO_BAD
        for slot, value in head.items():
            values[slot] = value
        i64 = dict(dtype=torch.int64, device=self.ids.device)
        stats = torch.zeros(self.layout.size, **i64)
        stats[: layout.STAT_HEAD] = torch.tensor(values, **i64)
        return stats

    # ------------------------------------------------------------------ the round
    def tables(self, W: int) -> tuple[Tensor, Tensor]:
        """Each chain's window length by its step for a round of window W <= L, and the last
        window position such a round reads (-1: finished)."""
        if W not in self._cond_window and self._pos is not None:
            chain = torch.arange(len(self.ids), device=self._pos.device)
            self._cond_window[W] = self.cond.gather(chain.repeat_interleave(W + 1))
        if W not in self._tables:
            lengths = self.lengths_by_step.clamp(max=W)
            end = torch.full((1,), -1, dtype=torch.int64, device=lengths.device)
            self._tables[W] = (lengths, torch.cat([lengths[:-1], end]))
        return self._tables[W]

    def _evaluate(self, Y: Tensor, s: ChainBatch) -> tuple[Tensor, Tensor]:
        """(raw output, x0-hat) at the window's states, both [B, W+1, *E]."""
        B, L1 = Y.shape[:2]
        pos = self._pos[:L1]
        k_pos = s.k[:, None] + pos[None]  # [B, W+1] step of each position
        rows_y, rows_k = Y.reshape(B * L1, *Y.shape[2:]), k_pos.reshape(-1)
        if not self.compact:
            out, P = self.net(rows_y, rows_k, self._cond_window[L1 - 1])
            return out.reshape(Y.shape), P.reshape(Y.shape)
        # the positions verify_frozen reads: 0..n of chains not finished (read_upto = -1 once
        # finished), from 1 where the root's prediction is the frozen value; the others stay 0
        first = s.exact.to(torch.int64)[:, None]
        read_upto = self.tables(L1 - 1)[1]
        need = (pos[None] >= first) & (pos[None] <= read_upto[s.k][:, None])
        rows = need.view(-1).nonzero().view(-1)
        self.target_evals += rows.numel()  # the round is eager when compact
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
        if self.spec.freeze == FREEZE_X0:
            return f
        return round_ops.draft_x0(self.spec, s.x.index_select(0, ex), f, s.k.index_select(0, ex))

    def _round_eager(self, s: ChainBatch, W: int) -> ChainBatch:
        k = s.k
        lengths = self.tables(W)[0][k]  # k lies in 0..N
        chains = self._chains(s.frozen, k, lengths, s.prev)
        Y = self._draft(s.x, chains, W)
        out, P = self._evaluate(Y, s)
        res = self._verify(Y, P, chains)
        log_ratio = res.log_ratio
        if W < self.L:  # the stats vector is laid out for L: pad the window to it
            log_ratio = torch.nn.functional.pad(log_ratio, (0, self.L - W))
            out = self._output_summary(out, W)
        stats = torch.ops.specdiff.round_stats(
            s.stats, k, lengths, res.num_accepted, res.committed, log_ratio, out, self.N
        )
        return ChainBatch(
            x=res.next_state,
            k=k + res.committed,
            frozen=res.next_frozen,
            exact=res.root_exact,
            stats=stats,
            prev=res.next_prev if self.multistep else s.prev,
        )

    def _output_summary(self, out: Tensor, W: int) -> Tensor:
        """What round_stats reads of a window-W round's outputs, laid out for L: one value per
        state, NaN where the state's output is not finite (round_stats counts only finiteness)."""
        B = out.shape[0]
        if self._host_reads and bool(torch.isfinite(out.sum())):
            # eager rounds off the GPU: one reduction, then a zero summary made once (a finite
            # sum has no inf or NaN term; a sum that overflows takes the full path below)
            if self._finite_summary is None or self._finite_summary.dtype != out.dtype:
                self._finite_summary = out.new_zeros(B, self.L + 1, 1)
            return self._finite_summary
        ok = torch.isfinite(out.reshape(B, W + 1, -1)).all(-1)
        summary = torch.zeros(B, self.L + 1, 1, dtype=out.dtype, device=out.device)
        summary[:, : W + 1, 0] = torch.where(ok, 0.0, math.nan).to(out.dtype)
        return summary

    def step(self, s: ChainBatch, window: Optional[int] = None) -> ChainBatch:
        """One round of window ``window`` (default L; at most L). With ``cuda_graph``, the first
        call with a window captures its round on s's buffers and every later call replays it (s
        must be the batch returned by the previous call; every window's graph shares them)."""
        W = self.L if window is None else int(window)
        self.tables(W)  # made here: a compiled round only reads them
        if not self.compact:
            self.target_evals += s.x.shape[0] * (W + 1)
        if not self.cuda_graph:
            return self._round(s, W)
        if W not in self._graphs:
            if self._static is None:
                self._static = s
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                # warm-up on the very batch the capture will read (the round is pure: s is not
                # changed), so compilation and autotuning finish before the capture starts
                self._round(s, W)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                s.copy_(self._round(s, W))
            self._graphs[W] = graph
        self._graphs[W].replay()
        return self._static

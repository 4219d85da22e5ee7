"""The ancestral chain, the baseline: :class:`AncestralSampler` and its engine
:class:`LeanAncestral`, one network call and one fused step per sampling step, with the noise the
speculative sampler uses (docs/design.md §7), so both read the same xi_k at every step k.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor

from ..ops import round as round_ops
from ..ops.round_spec import RoundChains
from .accounting import SamplerStats
from .base import SamplerBase, SamplingResult, sample_in_inference_mode
from .network import NetworkCall
from .transitions import GaussianTransitions, Model, round_spec, step_mean


class LeanAncestral:
    """The ancestral chain with the same care: per step one network call and one fused step
    (``frozen_draft`` with L = 1 on the network's own x0-hat: mean + std * xi(seed, c, k)), the
    same noise as the speculative sampler; optionally compiled (network included)."""

    def __init__(
        self,
        model: Model,
        transitions: GaussianTransitions,
        seed: Tensor,
        chain_ids: Tensor,
        *,
        dtype: torch.dtype,
        backend: Optional[str] = None,
        compile: bool = False,
        cond: Optional[dict] = None,
        max_batch: Optional[int] = None,
    ):
        device = chain_ids.device
        self.T = transitions
        self.N = transitions.num_steps
        self.ids = chain_ids
        self.cond = {} if cond is None else cond  # the chains' network kwargs, rows in order
        self.backend = backend
        # a mean that is not affine in x0-hat (dynamic thresholding) is stepped by the
        # transitions' own formula with the same counter-based noise
        self.spec = round_spec(transitions, seed, device=device) if transitions.affine else None
        self.seed = seed
        # multistep chains carry the previous step's x0-hat (docs/design.md §2.1)
        self.multistep = transitions.multistep
        self.net = NetworkCall(model, transitions, device, dtype, max_batch)
        # on CUDA, "reduce-overhead" replays each step as a CUDA graph: the fastest baseline
        self.cuda_graphs = compile and device.type == "cuda"
        mode = "reduce-overhead" if self.cuda_graphs else None
        self._step = (
            torch.compile(self._step_eager, fullgraph=True, dynamic=False, mode=mode)
            if compile
            else self._step_eager
        )

    def _step_eager(
        self, x: Tensor, k: Tensor, lengths: Tensor, prev: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step of every chain: (new states, :func:`nonfinite_code`, the x0-hat at x, which
        is the next step's ``prev`` for multistep chains)."""
        out, p = self.net(x, k, self.cond)
        if self.spec is None:
            xi, _ = round_ops.chain_noise(self.seed, self.ids, k, 1, x.shape[1:], x.dtype)
            y = step_mean(self.T, x, p, k, prev) + self.T.coef("std", k, x) * xi[:, 0]
        else:
            chains = RoundChains(p, k, lengths, self.ids, prev)
            y = round_ops.dispatch_frozen_draft(self.backend, x, chains, self.spec, 1)
            y = y[:, 1].contiguous()
        return y, nonfinite_code(out, y), p

    def run(
        self, x: Tensor, check_finite: bool = True, bar=None
    ) -> tuple[Tensor, Optional[tuple[int, int, str]]]:
        """All N steps from x; returns the samples and the first (step, chain row, what) at which
        the network output (what = "output") or the new state (what = "state") was not finite
        (None if none was). The flags stay on the device: one read, at the end."""
        B, N = x.shape[0], self.N
        k = torch.zeros(B, dtype=torch.int64, device=x.device)
        lengths = torch.ones_like(k)  # a window of one step per chain
        # per chain, the first failure as 2 step + (1 if only the state failed); 2 N: none
        first = torch.full_like(k, 2 * N)
        graphs = self.cuda_graphs
        # the first step is first order (c_prev[0] = 0): its previous prediction is never read
        prev = torch.zeros_like(x) if self.multistep else None
        for _ in range(N):
            if graphs:  # each step replays a CUDA graph whose outputs the next replay overwrites
                torch.compiler.cudagraph_mark_step_begin()
            x, code, p = self._step(x, k, lengths, prev)
            if graphs:
                x, code, p = x.clone(), code.clone(), p.clone()
            if prev is not None:
                prev = p
            if check_finite:
                first = torch.where(code > 0, torch.minimum(first, 2 * k + (code == 1)), first)
            k = k + 1
            if bar is not None:
                bar.update(B)
        if check_finite and N:
            f = int(first.min())
            if f < 2 * N:
                row = int((first == f).nonzero()[0, 0])
                return x, (f // 2, row, "state" if f % 2 else "output")
        return x, None


def nonfinite_code(out: Tensor, y: Tensor) -> Tensor:
    """[B] int8, one reduction: 0 where the row of the network output ``out`` and of the new
    state ``y`` are finite, 1 where only the state is not (it overflowed), >= 2 where the output
    is not."""
    B = y.shape[0]
    bad_out = (~torch.isfinite(out)).reshape(B, -1).to(torch.int8) * 2
    return (bad_out | (~torch.isfinite(y)).reshape(B, -1).to(torch.int8)).amax(-1)


class AncestralSampler(SamplerBase):
    """The plain chain: one batched target call per step (the baseline).

    ``sample`` has the same signature and randomness as :meth:`SpeculativeSampler.sample`.
    """

    name = "ancestral"

    def __init__(
        self,
        model: Model,
        transitions: GaussianTransitions,
        *,
        progress: bool = False,
        check_finite: bool = True,
        compile: bool = False,
        backend: Optional[str] = None,
        max_batch: Optional[int] = None,
    ):
        super().__init__(
            model, transitions, progress=progress, check_finite=check_finite, max_batch=max_batch
        )
        self.compile = bool(compile)
        self.backend = backend

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
    ) -> SamplingResult:
        """Same arguments as :meth:`SpeculativeSampler.sample`."""
        t0 = time.perf_counter()
        T = self.transitions
        x, noise, chains = self.setup(
            num_chains, event_shape, generator, chain_ids, x_init, dtype, device, model_kwargs
        )
        ids = chains.ids
        B, N = x.shape[0], T.num_steps
        stats = SamplerStats(self.name, B, N, 1)
        chain = LeanAncestral(
            self.model,
            T,
            noise.seed,
            noise.chain_ids,
            dtype=x.dtype,
            backend=self.backend,
            compile=self.compile,
            cond=chains.cond.gather(torch.arange(B, device=x.device)),
            max_batch=self.network_max_batch(x, chains),
        )
        bar = self.progress_bar(B * N)
        x, bad = chain.run(x, self.check_finite, bar)
        if bar is not None:
            bar.close()
        if bad is not None:
            step, row, what = bad
            if what == "output":
                raise self.nonfinite_output_error("target", step, ids[row])
            raise self.nonfinite_state_error(step, ids[row])
        n_det = int(T.deterministic.sum())
        stats.rounds = stats.target_calls = N
        stats.target_evals = B * N
        stats.deterministic_steps = B * n_det
        stats.direct_steps = B * (N - n_det)
        stats.chain_rounds = [N] * B
        stats.wall_time = time.perf_counter() - t0
        return SamplingResult(x, stats)


__all__ = ["AncestralSampler", "LeanAncestral", "nonfinite_code"]

"""Per-chain random streams for the samplers: noise indexed by (chain, sampling step).

Every chain owns a ``torch.Generator`` seeded from (base seed, chain id). From it, in this order,
the chain draws its initial state, then blocks of ``block`` consecutive sampling steps, each block
one ``randn([block, *E])`` (the step noises xi_k) followed by one ``rand([block])`` (the step
uniforms u_k). So xi_k and u_k are fixed functions of (seed, chain id, k):

* a chain's result does not depend on which other chains share its batch (ragged batches);
* the ancestral and the speculative samplers read the SAME xi_k for step k. A speculative window
  at step k reads xi_k..xi_{k+L-1} and u_k..u_{k+L-1}; when the window is rejected at j, the next
  window starts at step k+j+1 and reads xi_{k+j+1}.. again. That reuse is exact: the verifier's
  outcome up to the first rejection depends only on xi_k..xi_{k+j} and u_k..u_{k+j} (a stopping
  time), so the re-read values are still fresh, independent noise for the steps they drive.

Blocks are generated lazily in increasing order and dropped once every live window has moved past
them; memory is ``chains * (ceil(L/block) + 1) * block`` states.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
DEFAULT_BLOCK = 16


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def base_seed_from(generator: Optional[torch.Generator]) -> int:
    """One 62-bit draw from ``generator`` (torch's default generator when None)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())


def chain_seed(base_seed: int, chain_id: int) -> int:
    """Seed of chain ``chain_id``'s generator (a splitmix64 hash; < 2^63)."""
    return _splitmix64(_splitmix64(int(base_seed) & _MASK64) ^ (int(chain_id) & _MASK64)) >> 1


class ChainNoise:
    """Lazily generated per-chain noise ``xi[c, k]`` (state dtype) and uniforms ``u[c, k]``.

    Args:
        seeds: one integer seed per chain.
        event_shape: shape of one state.
        dtype: state dtype (noise is drawn in float64 for float64 states, float32 otherwise,
            then cast; uniforms are float64 for float64 states, float32 otherwise).
        device: where generators and buffers live.
        window: the largest window L that :meth:`window` will be asked for.
        block: steps per generated block (both samplers must use the same value to share noise).
    """

    def __init__(self, seeds: Sequence[int], event_shape: Sequence[int], dtype: torch.dtype,
                 device, window: int = 1, block: int = DEFAULT_BLOCK):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.event_shape = tuple(int(s) for s in event_shape)
        self.dtype = dtype
        self.draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.block = int(block)
        if self.block < 1:
            raise ValueError("block must be >= 1")
        self.window_max = max(1, int(window))
        self.nblocks = -(-self.window_max // self.block) + 1
        B = len(seeds)
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(s))
            self.generators.append(g)
        W = self.nblocks * self.block
        self.xi = torch.zeros((B, W, *self.event_shape), dtype=dtype, device=self.device)
        self.u = torch.zeros((B, W), dtype=self.draw_dtype, device=self.device)
        self.first_block = [0] * B   # block held in buffer slot 0
        self.generated = [0] * B     # blocks generated so far
        self.initial = torch.stack([
            torch.randn(self.event_shape, generator=g, dtype=self.draw_dtype, device=self.device)
            for g in self.generators]) if B else torch.zeros((0, *self.event_shape), dtype=self.draw_dtype)

    # ``initial`` [B, *E]: the chains' standard-normal initial draws, in ``draw_dtype``.

    def _fill(self, c: int, first_needed: int, last_needed: int) -> None:
        """Make blocks first_needed..last_needed of chain c resident."""
        fb = self.first_block[c]
        if first_needed >= fb and last_needed < fb + self.nblocks and last_needed < self.generated[c]:
            return
        if first_needed < fb:
            raise ValueError(f"chain {c}: step noise of block {first_needed} was already dropped "
                             f"(steps of a chain must not decrease)")
        new_fb = first_needed
        if last_needed - new_fb >= self.nblocks:
            raise ValueError(f"window wider than the noise buffer ({self.nblocks} blocks)")
        if new_fb != fb:
            # keep resident blocks that are still needed, shifted to their new slots
            keep_lo, keep_hi = max(new_fb, fb), min(fb + self.nblocks, self.generated[c])
            if keep_hi > keep_lo:
                src = slice((keep_lo - fb) * self.block, (keep_hi - fb) * self.block)
                dst = slice((keep_lo - new_fb) * self.block, (keep_hi - new_fb) * self.block)
                self.xi[c, dst] = self.xi[c, src].clone()
                self.u[c, dst] = self.u[c, src].clone()
            self.first_block[c] = new_fb
        g = self.generators[c]
        while self.generated[c] <= last_needed:
            b = self.generated[c]
            xi = torch.randn((self.block, *self.event_shape), generator=g, dtype=self.draw_dtype,
                             device=self.device)
            u = torch.rand((self.block,), generator=g, dtype=self.draw_dtype, device=self.device)
            if b >= new_fb:  # blocks before the window are never read again: drawn, not stored
                sl = slice((b - new_fb) * self.block, (b - new_fb + 1) * self.block)
                self.xi[c, sl] = xi.to(self.dtype)
                self.u[c, sl] = u
            self.generated[c] = b + 1

    def window(self, rows: Tensor, steps: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Noise and uniforms of steps ``steps[i] .. steps[i] + length - 1`` for chains ``rows[i]``.

        Returns ``xi [n, length, *E]`` and ``u [n, length]``. Steps of a chain must not decrease
        between calls (earlier blocks are dropped).
        """
        if length > self.window_max:
            raise ValueError(f"window length {length} exceeds {self.window_max}")
        rows_l = rows.tolist()
        steps_l = steps.tolist()
        for c, k in zip(rows_l, steps_l):
            self._fill(c, k // self.block, (k + length - 1) // self.block)
        if not rows_l:
            return (self.xi.new_zeros((0, length, *self.event_shape)), self.u.new_zeros((0, length)))
        rows_t = rows.to(device=self.device, dtype=torch.int64)
        fb = torch.tensor([self.first_block[c] for c in rows_l], dtype=torch.int64, device=self.device)
        off = steps.to(device=self.device, dtype=torch.int64) - fb * self.block
        cols = off[:, None] + torch.arange(length, device=self.device)[None]
        xi = self.xi[rows_t[:, None], cols]
        u = self.u[rows_t[:, None], cols]
        return xi, u

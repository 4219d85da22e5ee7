"""A rough memory estimate of a run, to refuse a ``--batch`` that cannot fit before anything loads.

A speculative round evaluates up to B (L + 1) states in one network call: the states, their means,
noise and the verify's buffers (a few copies of B (L + 1) D floats), plus the network's activations
on the states of one invocation: ``--max-batch`` of them, or as many as the sampler's default
chunking allows (:meth:`specdiff_kernels.sampling.base.SamplerBase.budget_max_batch`: a quarter
of the free memory, on a CPU about B states). The per-state
activation sizes below were measured with ``/usr/bin/time -v`` (peak RSS) on this project's CPU
runs: the digits MLP about 7 KB per state, the patches UNet about 2.1 MB (about ten float32
copies of its feature maps). The estimate is meant to be within a factor of two: it refuses
batches that cannot fit at all, it does not plan a run to the last megabyte.
"""

from __future__ import annotations

from typing import Optional

import torch

STATE_COPIES = 8  # states, draft/target means, noise, network input and output, verify buffers
DIGITS_ACT_BYTES = 7 * 1024  # measured: peak RSS per state of a digits round (4096 x 17 states)
UNET_FEATURE_COPIES = 10  # measured: patches UNet, 2.1 MB per state for 54k floats of features
GENERIC_ACT_FLOATS_PER_DIM = 32  # gmm, langevin: a few [states, D] temporaries per state
ADAPTIVE_MAX_WINDOW = 32  # AdaptiveWindow's default cap (its buffer length)


def available_bytes(device: str) -> Optional[int]:
    """Free memory for this run: the CUDA device's free memory, else the system's available RAM
    (psutil if installed, else /proc/meminfo's MemAvailable); None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except RuntimeError:
            return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def unet_act_bytes(cfg: dict, bytes_per_float: int = 4) -> int:
    """Activation bytes per state of a diffusers UNet2DModel from its config: its feature maps at
    every level, and each attention block's score matrix."""
    size = cfg.get("sample_size", 32)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    channels = list(cfg.get("block_out_channels", (64,)))
    head_dim = cfg.get("attention_head_dim") or 8
    blocks = list(cfg.get("down_block_types", ()))
    floats = 0
    for level, c in enumerate(channels):
        hw = max(1, (int(h) >> level) * (int(w) >> level))
        floats += UNET_FEATURE_COPIES * int(c) * hw
        if level < len(blocks) and "Attn" in str(blocks[level]):
            floats += 2 * max(1, int(c) // int(head_dim)) * hw * hw
    return floats * bytes_per_float


def window_states(window, steps: int) -> int:
    """States per chain in one round's network call: L + 1."""
    # "auto" and "adaptive" draft into a buffer of their longest window
    L = min(ADAPTIVE_MAX_WINDOW, steps) if window in ("auto", "adaptive") else int(window)
    return L + 1


def invocation_states(
    batch: int, states: int, act_bytes: int, max_batch: Optional[int], free: int, device: str
) -> int:
    """The states one network invocation holds: ``max_batch``, or the sampler's default chunk."""
    if max_batch is not None:
        return min(states, max_batch)
    from ..sampling.base import CPU_CHUNK_MIN_BYTES, MEMORY_BUDGET_FRACTION, PROBE_MIN_STATES

    if states <= PROBE_MIN_STATES:
        return states
    chunk = max(1, int(free * MEMORY_BUDGET_FRACTION) // max(1, act_bytes))
    if torch.device(device).type != "cuda":
        chunk = min(chunk, max(batch, CPU_CHUNK_MIN_BYTES // max(1, act_bytes)))
    return min(states, chunk)


def estimate_bytes(states: int, invoked: int, event_size: int, act_bytes: int) -> int:
    """Peak bytes of one round: every state's buffers, and the activations of one invocation."""
    return states * event_size * 4 * STATE_COPIES + invoked * act_bytes


def gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MB"


def check_batch(
    batch: int,
    window,
    steps: int,
    event_size: int,
    act_bytes: int,
    max_batch: Optional[int],
    device: str,
    option: str = "--batch",
) -> Optional[str]:
    """The ``option`` (the chains' flag) error when the estimate exceeds the free memory (None:
    fits, or unknown)."""
    free = available_bytes(device)
    if free is None:
        return None
    states = batch * window_states(window, steps)
    invoked = invocation_states(batch, states, act_bytes, max_batch, free, device)
    need = estimate_bytes(states, invoked, event_size, act_bytes)
    if need <= free:
        return None
    hint = f"a smaller {option}"
    if invoked > 1:
        chunk = max(1, invoked // 16)
        with_chunks = estimate_bytes(states, chunk, event_size, act_bytes)
        if with_chunks <= free:
            hint += f", or --max-batch {chunk} (about {gb(with_chunks)})"
    return (
        f"argument {option}: {batch} chains need about {gb(need)} ({states} states of "
        f"{event_size} values per round, {invoked} per network call; estimated) but {gb(free)} "
        f"is free on {device}; use {hint}"
    )


def warmup_states(batch: int, act_bytes: int, max_batch: Optional[int], device: str) -> int:
    """The states of the CLI's warm-up call: the ancestral call's B, within one invocation's
    memory (a batch that runs in chunks must not fail in its warm-up)."""
    free = available_bytes(device)
    if free is None:
        return batch if max_batch is None else min(batch, max_batch)
    return max(1, invocation_states(batch, batch, act_bytes, max_batch, free, device))

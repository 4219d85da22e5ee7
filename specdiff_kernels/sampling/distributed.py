"""Multi-process sampling on ``torch.distributed``: many chains sharded across ranks.

Every chain's random stream is a function of (seed, GLOBAL chain id) only
(:mod:`specdiff_kernels.sampling.noise`), the samplers' batches are ragged (each chain has its own
step index) and a chain's adaptive window depends on its own past only, so a chain's result does not
depend on which other chains share its process. Sharding the global ids 0..n-1 over the ranks and
passing them as ``chain_ids=`` therefore gives the SAME union of samples for any number of ranks
(up to floating-point differences of batched model calls on different batch sizes: bit-for-bit for
the element-wise parts, ~1e-7 relative at worst for batched matmuls).

Results are gathered on rank 0 (``gather=True``: padded ``torch.distributed.gather``, then the rows
are put back in global-id order) or written per rank (``out_dir``: ``rank{r}.pt`` with the shard's
ids, samples and stats; :func:`load_shards` reassembles them). Stats are merged on rank 0 by
:func:`merge_stats`: counts of work (evaluations, windows, steps, acceptance tables) are SUMMED over
ranks; sequential quantities (``rounds``, ``target_calls``, ``draft_calls``, ``wall_time``) are the
MAX over ranks, because ranks run in parallel (the sum of calls is reported separately as
``total_target_calls``). Since a chain's rounds do not depend on its batch, the merged stats equal
the single-process run's (except wall time).

Launch (CPU: gloo; GPU: nccl, one GPU per rank)::

    torchrun --nproc_per_node 4 -m specdiff_kernels.cli.distributed --model gmm --dim 64 \\
        --chains 4096 --steps 200 --window 8 --seed 0 --out samples.pt

or call :func:`sample_distributed` from your own torchrun script after
``torch.distributed.init_process_group``. Without an initialised process group it runs as a
single process (world size 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .accounting import SamplerStats
from .base import SamplingResult

__all__ = ["DistributedResult", "shard_chains", "merge_stats", "sample_distributed", "load_shards"]

# SamplerStats fields merged by max (sequential / latency) rather than summed
_MAX_FIELDS = {"rounds", "target_calls", "draft_calls", "wall_time"}
_SAME_FIELDS = {"sampler", "num_steps", "window"}


@dataclass
class DistributedResult:
    """Output of :func:`sample_distributed`.

    * ``samples``: rank 0 with ``gather=True``: all ``[num_chains, *E]`` in global-id order; other
      ranks (or ``gather=False``): this rank's shard.
    * ``chain_ids``: the global ids of the rows of ``samples``.
    * ``stats``: merged over ranks (rank 0, ``gather=True``), else this rank's.
    * ``rank_stats``: every rank's stats (rank 0, ``gather=True``), else ``[stats]``.
    * ``total_target_calls``: sum over ranks of the sequential target calls (rank 0).
    """

    samples: Tensor
    chain_ids: list
    stats: SamplerStats
    rank: int
    world_size: int
    rank_stats: list
    total_target_calls: int


def shard_chains(num_chains: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced shard of the global chain ids 0..num_chains-1 for ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    start = rank * num_chains // world_size
    stop = (rank + 1) * num_chains // world_size
    return range(start, stop)


def merge_stats(
    stats: Sequence[SamplerStats], chain_ids: Optional[Sequence[Sequence[int]]] = None
) -> SamplerStats:
    """Merge per-rank stats: work summed, sequential quantities maxed, ``chain_rounds`` put in
    global-id order (``chain_ids[r]``: the global ids of rank r's chains; default: concatenated)."""
    stats = [s for s in stats if s is not None]
    if not stats:
        raise ValueError("no stats to merge")
    first = stats[0]
    for s in stats[1:]:
        for name in _SAME_FIELDS:
            if getattr(s, name) != getattr(first, name):
                raise ValueError(
                    f"cannot merge stats with different {name}: "
                    f"{getattr(first, name)!r} vs {getattr(s, name)!r}"
                )
    kw = {}
    for f in dataclasses.fields(SamplerStats):
        name = f.name
        vals = [getattr(s, name) for s in stats]
        if name in _SAME_FIELDS:
            kw[name] = vals[0]
        elif name == "chain_rounds":
            continue
        elif name == "autopilot":  # window="auto": each shard's controller, side by side
            kw[name] = None if all(v is None for v in vals) else {"shards": vals}
        elif name == "max_batch":  # the largest invocation of any rank (None: one unchunked)
            kw[name] = None if None in vals else max(vals)
        elif name in _MAX_FIELDS:
            kw[name] = max(vals)
        elif isinstance(vals[0], list):
            n = max(len(v) for v in vals)
            kw[name] = [sum(v[i] for v in vals if i < len(v)) for i in range(n)]
        else:
            kw[name] = sum(vals)
    if chain_ids is None:
        kw["chain_rounds"] = [r for s in stats for r in s.chain_rounds]
    else:
        pairs = sorted(
            (c, r) for ids, s in zip(chain_ids, stats) for c, r in zip(ids, s.chain_rounds)
        )
        kw["chain_rounds"] = [r for _, r in pairs]
    return SamplerStats(**kw)


def _base_sampler(sampler):
    """The ``sample(num_chains, event_shape, *, generator, chain_ids, x_init, dtype, device)``
    sampler behind ``sampler`` (Langevin wrappers hold one)."""
    return getattr(sampler, "sampler", sampler)


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sample_distributed(
    sampler,
    num_chains: int,
    event_shape,
    *,
    seed: int,
    dtype: Optional[torch.dtype] = None,
    device=None,
    x_init: Optional[Tensor] = None,
    gather: bool = True,
    out_dir: Optional[str] = None,
    group=None,
) -> DistributedResult:
    """Sample ``num_chains`` chains sharded over the ranks of ``group`` (default: the world).

    Args:
        sampler: a :class:`~specdiff_kernels.sampling.sampler.SpeculativeSampler` /
            :class:`~specdiff_kernels.sampling.ancestral.AncestralSampler` (or a Langevin wrapper),
            the same on every rank.
        num_chains, event_shape: the GLOBAL number of chains and the state shape.
        seed: one integer seed, the same on every rank; chain c's stream depends on (seed, c) only.
        dtype, device: of this rank's states (e.g. ``cuda:LOCAL_RANK`` with nccl).
        x_init: optional global initial states ``[num_chains, *E]`` (each rank takes its rows).
        gather: gather samples and stats on rank 0 (collective: every rank must call).
        out_dir: also write this rank's shard to ``out_dir/rank{r}.pt`` (see :func:`load_shards`).
        group: process group (None: default group; no initialised group: single process).
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    ids = list(shard_chains(int(num_chains), rank, world))
    if isinstance(event_shape, int):
        event_shape = (event_shape,)
    event_shape = tuple(int(s) for s in event_shape)
    xi = None if x_init is None else torch.as_tensor(x_init)[ids[0] : ids[-1] + 1] if ids else None
    samples, stats = _sample_shard(
        _base_sampler(sampler), ids, event_shape, seed, dtype, device, xi
    )
    if out_dir is not None:
        _save_shard(out_dir, ids, samples, stats, rank, world, int(num_chains))
    local = DistributedResult(
        samples, ids, stats, rank, world, [stats], stats.target_calls if stats is not None else 0
    )
    if not distributed or not gather:
        return local
    return _gather(local, int(num_chains), group)


def _sample_shard(base, ids: list, event_shape: tuple, seed: int, dtype, device, xi):
    """(samples, stats) of this rank's chains ``ids`` (stats None when it has none)."""
    if not ids:  # more ranks than chains
        dev = torch.device("cpu") if device is None else torch.device(device)
        dtype = (torch.float32 if dtype is None else dtype) if xi is None else xi.dtype
        return torch.zeros((0, *event_shape), dtype=dtype, device=dev), None
    gen = torch.Generator().manual_seed(int(seed))
    res: SamplingResult = base.sample(
        len(ids),
        event_shape,
        generator=gen,
        chain_ids=ids,
        x_init=xi,
        dtype=dtype,
        device=device,
    )
    return res.samples, res.stats


def _save_shard(out_dir: str, ids: list, samples, stats, rank: int, world: int, num_chains: int):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    shard = {
        "chain_ids": ids,
        "samples": samples.cpu(),
        "stats": stats,
        "rank": rank,
        "world_size": world,
        "num_chains": num_chains,
    }
    torch.save(shard, Path(out_dir) / f"rank{rank}.pt")


def _gather(local: DistributedResult, num_chains: int, group) -> DistributedResult:
    """Every rank's samples and stats on rank 0 (collective: padded tensors, then the stats
    objects); the other ranks get ``local``, their own shard, back."""
    rank, world, samples = local.rank, local.world_size, local.samples
    cdev = _comm_device(group)
    per = max(len(shard_chains(num_chains, r, world)) for r in range(world))
    buf = torch.zeros((per, *samples.shape[1:]), dtype=samples.dtype, device=cdev)
    buf[: len(local.chain_ids)] = samples.to(cdev)
    bufs = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
    dist.gather(buf, bufs, dst=_global_rank(0, group), group=group)
    objs = [None] * world if rank == 0 else None
    dist.gather_object(local.stats, objs, dst=_global_rank(0, group), group=group)
    if rank != 0:
        return local
    shards = [list(shard_chains(num_chains, r, world)) for r in range(world)]
    all_samples = torch.cat([b[: len(s)] for b, s in zip(bufs, shards)]).to(samples.device)
    merged = merge_stats(
        [o for o in objs if o is not None], [s for s, o in zip(shards, objs) if o is not None]
    )
    total_calls = sum(o.target_calls for o in objs if o is not None)
    return DistributedResult(
        all_samples, list(range(num_chains)), merged, rank, world, objs, total_calls
    )


def _global_rank(group_rank: int, group) -> int:
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def load_shards(out_dir: str) -> tuple[Tensor, SamplerStats]:
    """Reassemble the per-rank files of ``sample_distributed(..., out_dir=...)``: samples in
    global-id order and merged stats."""
    files = sorted(Path(out_dir).glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise FileNotFoundError(f"no rank*.pt files in {out_dir}")
    parts = [torch.load(f, weights_only=False) for f in files]
    world = parts[0]["world_size"]
    if len(parts) != world:
        raise ValueError(f"{out_dir} holds {len(parts)} shards for world size {world}")
    pairs = sorted((c, p["samples"][i]) for p in parts for i, c in enumerate(p["chain_ids"]))
    samples = torch.stack([s for _, s in pairs]) if pairs else torch.zeros(0)
    with_stats = [p for p in parts if p["stats"] is not None]
    return samples, merge_stats(
        [p["stats"] for p in with_stats], [p["chain_ids"] for p in with_stats]
    )

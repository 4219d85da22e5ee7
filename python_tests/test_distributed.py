"""Multi-process sampling (``specdiff_kernels.sampling.distributed``): the union of the ranks' samples equals
the single-process result for the same seed, whatever the number of ranks.

In-process tests check sharding, stats merging and the world-size-1 path; two launches of
``torchrun`` (gloo on CPU, loopback only: 127.0.0.1 and a free port) check 2 ranks with gathering on
rank 0 and 3 ranks writing per-rank files (adaptive windows, speculative Langevin).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from preamble import SINGLE_THREAD

from specdiff_kernels.cli.commands import distributed_main as main
from specdiff_kernels.models import load
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.distributed import (
    load_shards,
    merge_stats,
    sample_distributed,
    shard_chains,
)
from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.langevin import SpeculativeLangevin, banana_energy
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.window import AdaptiveWindow

ROOT = Path(__file__).resolve().parents[1]


pytestmark = SINGLE_THREAD


def assert_stats_equal(a, b, skip=("wall_time",)):
    for f in dataclasses.fields(a):
        if f.name not in skip:
            assert getattr(a, f.name) == getattr(b, f.name), f.name


# ----------------------------------------------------------------------------- in process
def test_shard_chains_partition():
    for n in (0, 1, 7, 13, 100):
        for w in (1, 2, 3, 8):
            shards = [shard_chains(n, r, w) for r in range(w)]
            ids = [c for s in shards for c in s]
            assert ids == list(range(n))  # contiguous, disjoint, complete
            sizes = [len(s) for s in shards]
            assert max(sizes) - min(sizes) <= 1  # balanced
    with pytest.raises(ValueError):
        shard_chains(4, 2, 2)


def gmm_sampler(window=4, draft="frozen", D=16, steps=30):
    m = load("gmm", dim=D)
    d = FrozenTargetDraft("x0") if draft == "frozen" else DraftModelDraft(m.draft)
    return SpeculativeSampler(m.target, m.transitions(steps), d, window)


@pytest.mark.parametrize(
    "window,draft", [(4, "frozen"), ("adaptive", "frozen"), (AdaptiveWindow(8, 1.5), "model")]
)
def test_split_batches_merge_to_the_single_run(window, draft):
    """Sampling chain ids 0..6 and 7..12 in two calls and merging = one call on 0..12: samples
    and every stat but wall time (a chain's rounds and work do not depend on its batch)."""
    s = gmm_sampler(window, draft)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    full = s.sample(13, (16,), generator=g(), dtype=torch.float64)
    a = s.sample(7, (16,), generator=g(), chain_ids=range(7), dtype=torch.float64)
    b = s.sample(6, (16,), generator=g(), chain_ids=range(7, 13), dtype=torch.float64)
    torch.testing.assert_close(torch.cat([a.samples, b.samples]), full.samples, rtol=0, atol=1e-9)
    merged = merge_stats([b.stats, a.stats], [list(range(7, 13)), list(range(7))])
    # A round's sequential draft calls are its longest window among the batch's chains, so the
    # shards' (run side by side: the max over shards) can be fewer than one batch's, never more.
    # Evaluations are per chain on both paths (the static round's compact call on CPU evaluates
    # only the states each chain reads, as the ragged round does).
    assert_stats_equal(merged, full.stats, skip=("wall_time", "draft_calls"))
    assert merged.draft_calls <= full.stats.draft_calls
    if draft == "frozen":
        assert merged.draft_calls == full.stats.draft_calls == 0


def test_merge_stats_rules():
    s = gmm_sampler()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a = s.sample(3, (16,), generator=g(), chain_ids=[0, 1, 2]).stats
    b = s.sample(2, (16,), generator=g(), chain_ids=[3, 4]).stats
    m = merge_stats([a, b])
    assert m.num_chains == 5 and m.target_evals == a.target_evals + b.target_evals
    assert m.target_calls == max(a.target_calls, b.target_calls)
    assert m.accepted_by_position == [
        x + y for x, y in zip(a.accepted_by_position, b.accepted_by_position)
    ]
    assert m.chain_rounds == a.chain_rounds + b.chain_rounds
    other = AncestralSampler(s.model, s.transitions).sample(2, (16,), generator=g()).stats
    with pytest.raises(ValueError, match="different"):
        merge_stats([a, other])


def test_world_size_one_equals_plain_sample(tmp_path):
    assert not dist.is_initialized()
    s = gmm_sampler()
    res = sample_distributed(s, 9, 16, seed=3, out_dir=str(tmp_path))
    ref = s.sample(9, (16,), generator=torch.Generator().manual_seed(3))
    assert (
        torch.equal(res.samples, ref.samples)
        and res.world_size == 1
        and res.chain_ids == list(range(9))
    )
    samples, stats = load_shards(str(tmp_path))
    assert torch.equal(samples, ref.samples)
    assert_stats_equal(stats, ref.stats)
    # a Langevin wrapper, with a global x_init
    lv = SpeculativeLangevin(banana_energy(), step_size=0.05, num_steps=20, window=4)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    r = sample_distributed(lv, 5, 3, seed=1, x_init=x0)
    torch.testing.assert_close(
        r.samples, lv.sample(x0, generator=torch.Generator().manual_seed(1)).samples, rtol=0, atol=0
    )


def test_load_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_shards(str(tmp_path))


# ----------------------------------------------------------------------------- torchrun
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "specdiff_kernels.cli.distributed",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def single(args: list, tmp_path: Path) -> dict:
    out = tmp_path / "single.pt"
    assert main([*args, "--out", str(out)]) == 0
    return torch.load(out, weights_only=False)


def test_torchrun_two_ranks_gather_equals_single_process(tmp_path):
    args = [
        "--model",
        "gmm",
        "--dim",
        "16",
        "--chains",
        "13",
        "--steps",
        "30",
        "--window",
        "4",
        "--seed",
        "7",
    ]
    ref = single(args, tmp_path)
    out = tmp_path / "two.pt"
    proc = torchrun(2, [*args, "--out", str(out)])
    assert "on 2 rank(s)" in proc.stdout
    got = torch.load(out, weights_only=False)
    assert got["world_size"] == 2 and got["chain_ids"] == list(range(13))
    torch.testing.assert_close(got["samples"], ref["samples"], rtol=0, atol=1e-6)
    # 13 chains run the static round, which evaluates finished chains until its batch is done:
    # two ranks' smaller batches evaluate no more states than the single batch
    assert_stats_equal(got["stats"], ref["stats"], skip=("wall_time", "target_evals"))
    assert got["stats"].target_evals <= ref["stats"].target_evals


def test_torchrun_three_ranks_per_rank_files_adaptive_langevin(tmp_path):
    args = [
        "--model",
        "banana",
        "--dim",
        "3",
        "--chains",
        "10",
        "--steps",
        "40",
        "--window",
        "adaptive",
        "--seed",
        "11",
        "--dtype",
        "float64",
    ]
    ref = single(args, tmp_path)
    shard_dir = tmp_path / "shards"
    torchrun(3, [*args, "--per-rank-dir", str(shard_dir)])
    assert sorted(p.name for p in shard_dir.iterdir()) == ["rank0.pt", "rank1.pt", "rank2.pt"]
    samples, stats = load_shards(str(shard_dir))
    torch.testing.assert_close(samples, ref["samples"], rtol=0, atol=1e-9)
    assert_stats_equal(stats, ref["stats"])

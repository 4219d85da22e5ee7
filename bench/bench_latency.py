"""Latency of the samplers at small batches: the static round vs the ragged round vs the lean
ancestral chain (eager and compiled), on CPU or CUDA (not a test).

For each (model, B): every sampler configuration is warmed up once (compilation, autotuning,
CUDA-graph capture happen there), then timed over ``--reps`` interleaved repetitions in a random
order per repetition; medians. Reported per configuration:

* wall-clock and its ratio to the FASTEST ancestral configuration measured in the same run;
* sequential target calls and rounds;
* the sampler's own cost per round: (wall - the time the network alone takes for the same calls,
  measured in the same compile mode) / rounds;
* aten calls per round outside the network (CPU, torch.profiler; the network's own aten calls,
  profiled alone, subtracted).

    python bench/bench_latency.py                      # CPU: digits and gmm784 (the 784-dim mixture), B = 1; digits B = 1024
    python bench/bench_latency.py --device cuda        # CUDA: digits, B = 1 and 16
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import _common as common
import torch

from specdiff_kernels import models
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.sampler import COMPACT_MIN_CHAINS_CPU, SpeculativeSampler

# the configurations whose aten calls per round are counted (CPU, B <= ATEN_MAX_B)
ATEN_CONFIGS = (
    "static_eager",
    "static_compiled",
    "ancestral_eager",
    "ancestral_compiled",
    "ragged",
    "default",
)
ATEN_MAX_B = 64


class DiffusersLoop:
    """diffusers' own sampling loop on the same network and schedule: DDPMScheduler with the
    model's training betas, ``leading`` respacing, fixed_small variance and its clipping;
    ``scheduler.step`` per step (what a pipeline's ``__call__`` does), under inference_mode."""

    def __init__(self, m, N: int):
        from diffusers import DDPMScheduler

        abar = m.alphas_cumprod
        betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        self.sched = DDPMScheduler(
            num_train_timesteps=abar.numel(),
            trained_betas=betas.numpy(),
            prediction_type=m.prediction,
            variance_type="fixed_small",
            clip_sample=m.clip_sample is not None,
            clip_sample_range=m.clip_sample or 1.0,
            timestep_spacing="leading",
        )
        self.sched.set_timesteps(N)
        self.net, self.N = m.target, N

    def sample(self, B, shape, generator=None, device=None):
        import types

        x = torch.randn(B, *shape, generator=generator).to(device)
        with torch.inference_mode():
            for t in self.sched.timesteps:
                out = self.net(x, torch.full((B,), int(t), device=device))
                x = self.sched.step(out, t, x, generator=generator).prev_sample
        st = types.SimpleNamespace(target_calls=self.N, rounds=self.N, target_evals=B * self.N)
        return types.SimpleNamespace(samples=x, stats=st)


def configs(net, T, L, device, with_compile: bool, m=None) -> dict:
    """On CUDA the static round is always CUDA-graph captured ("static_eager" = captured, not
    compiled) and the default configuration is "static_compiled" (not timed twice)."""
    out = {
        "ancestral_eager": AncestralSampler(net, T),
        "static_eager": SpeculativeSampler(net, T, window=L, path="static", compile=False),
        "ragged": SpeculativeSampler(net, T, window=L, path="ragged"),
    }
    if device.type == "cpu":
        out["default"] = SpeculativeSampler(net, T, window=L)
        try:
            out["ancestral_diffusers_loop"] = DiffusersLoop(m, T.num_steps)
        except ImportError:
            pass
    if with_compile:
        out["ancestral_compiled"] = AncestralSampler(net, T, compile=True)
        out["static_compiled"] = SpeculativeSampler(net, T, window=L, path="static", compile=True)
    return out


def run_once(sampler, B, shape, device, seed=0):
    common.sync(device)
    t0 = time.perf_counter()
    res = sampler.sample(B, shape, generator=torch.Generator().manual_seed(seed), device=device)
    common.sync(device)
    return time.perf_counter() - t0, res.stats


def net_time(net, shape, batch, device, compiled: bool, reps=30) -> float:
    """Seconds per call of the network alone at this batch (eager, or compiled the same way)."""
    f = torch.compile(net, fullgraph=True, dynamic=False) if compiled else net
    x = torch.randn(batch, *shape, device=device)
    t = torch.full((batch,), 500, device=device)
    with torch.inference_mode():
        for _ in range(3):
            f(x, t)
        return common.per_call(lambda: f(x, t), reps, device)


class TimedNetwork(torch.nn.Module):
    """The network with a stopwatch around each call (eager runs only: a compiled graph has no
    call boundary); on CUDA it synchronises around each call, so use it in separate runs."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seconds = net, 0.0

    def forward(self, x, t):
        common.sync(x.device)
        t0 = time.perf_counter()
        out = self.net(x, t)
        common.sync(x.device)
        self.seconds += time.perf_counter() - t0
        return out


def aten_calls(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


@dataclass
class Cell:
    """One (model, B) of the run: the network, its transitions and the sampler settings."""

    key: str
    m: object
    net: object
    T: object
    B: int
    N: int
    L: int
    device: torch.device

    @property
    def shape(self):
        return self.m.event_shape

    def configs(self, net=None, with_compile: bool = False) -> dict:
        return configs(
            self.net if net is None else net, self.T, self.L, self.device, with_compile, self.m
        )


def load_cell(key: str, B: int, N: int, L: int, device: torch.device) -> Cell:
    gmm_dim = key[3:] if key.startswith("gmm") else ""
    m = models.load("gmm", dim=int(gmm_dim)) if gmm_dim else models.load(key)
    net = m.target.to(device) if isinstance(m.target, torch.nn.Module) else m.target
    return Cell(key, m, net, m.transitions(N), B, N, L, device)


def is_compiled(cell: Cell, name: str, sampler) -> bool:
    if name == "default":
        return sampler.compile is True or cell.device.type == "cuda"
    return name.endswith("compiled")


def own_cost(cell: Cell, name: str, compiled: bool, st, wall: float, anc_wall: float) -> dict:
    """The sampler's own cost per round (wall minus the time inside the network) and the ratio it
    would have at no own cost ("floor"), where it can be estimated."""
    B, N, L, dev = cell.B, cell.N, cell.L, cell.device
    if (
        not compiled
        and name != "ancestral_diffusers_loop"
        and isinstance(cell.net, torch.nn.Module)
    ):
        timed = TimedNetwork(cell.net)  # one instrumented run
        wall_timed, st_timed = run_once(cell.configs(timed)[name], B, cell.shape, dev)
        return {
            "own_per_round_ms": (wall_timed - timed.seconds) / st_timed.rounds * 1e3,
            "network_floor_ratio": timed.seconds / anc_wall,
        }
    if (compiled and dev.type == "cuda") or name == "ancestral_diffusers_loop":
        return {}  # own cost is a CPU target; compiling the network alone again costs device time
    if compiled and name.startswith("static") and B >= COMPACT_MIN_CHAINS_CPU:
        return {}  # compact calls of changing size: no fixed-batch network time to subtract
    if name.startswith("ancestral"):
        t_call = net_time(cell.net, cell.shape, B, dev, compiled)
        return {"own_per_round_ms": (wall - N * t_call) / N * 1e3}
    if name == "ragged":
        return {}
    t_root = net_time(cell.net, cell.shape, B, dev, compiled)
    t_round = net_time(cell.net, cell.shape, B * (L + 1), dev, compiled)
    rounds = st.rounds
    return {
        "own_per_round_ms": (wall - t_root - (rounds - 1) * t_round) / max(rounds - 1, 1) * 1e3,
        "net_per_round_ms": t_round * 1e3,
        "network_floor_ratio": (t_root + (rounds - 1) * t_round) / anc_wall,
    }


def aten_outside_network(cell: Cell, sampler, compiled: bool, st) -> float:
    """aten calls per round outside the network: the run's, less the network's own aten calls
    profiled alone in the same mode (compiled: Inductor's extern kernels such as addmm still show
    as aten calls)."""
    B, L = cell.B, cell.L
    total = aten_calls(lambda: run_once(sampler, B, cell.shape, cell.device))
    f = torch.compile(cell.net, fullgraph=True, dynamic=False) if compiled else cell.net
    x, tt = torch.randn(B, *cell.shape), torch.full((B,), 500)
    xw, tw = torch.randn(B * (L + 1), *cell.shape), torch.full((B * (L + 1),), 500)
    with torch.inference_mode():
        f(x, tt), f(xw, tw)
        per_root = aten_calls(lambda: f(x, tt))
        per_round_net = aten_calls(lambda: f(xw, tw))
    if isinstance(sampler, AncestralSampler):
        net_calls = cell.N * per_root
    else:
        net_calls = per_root + (st.rounds - 1) * per_round_net
    return (total - net_calls) / st.rounds


def bench_model(key, B, N, L, device, reps, with_compile) -> dict:
    cell = load_cell(key, B, N, L, device)
    cfgs = cell.configs(with_compile=with_compile)
    stats = {}
    for name, s in cfgs.items():  # warm-up: compile, autotune, capture
        t, stats[name] = run_once(s, B, cell.shape, device)
        common.log(f"  {key} B={B} warm-up {name}: {t:.3f} s ({stats[name].target_calls} calls)")
    times = common.interleaved(
        lambda name: run_once(cfgs[name], B, cell.shape, device)[0], cfgs, reps
    )
    wall = common.medians(times)
    fastest_anc = min((n for n in wall if n.startswith("ancestral")), key=wall.get)
    rows = {}
    for name, s in cfgs.items():
        st, compiled = stats[name], is_compiled(cell, name, s)
        row = {
            "wall_s": wall[name],
            "ratio_vs_fastest_ancestral": wall[name] / wall[fastest_anc],
            "target_calls": st.target_calls,
            "rounds": st.rounds,
            "target_evals": st.target_evals,
            "reps": len(times[name]),
            **own_cost(cell, name, compiled, st, wall[name], wall[fastest_anc]),
        }
        if device.type == "cpu" and name in ATEN_CONFIGS and B <= ATEN_MAX_B:
            row["aten_calls_per_round_outside_network"] = aten_outside_network(
                cell, s, compiled, st
            )
        rows[name] = row
        common.log(
            f"  {key} B={B} {name}: wall {wall[name]:.4f} s, ratio "
            f"{row['ratio_vs_fastest_ancestral']:.3f}, own/round "
            f"{row.get('own_per_round_ms', float('nan')):.3f} ms, aten/round "
            f"{row.get('aten_calls_per_round_outside_network', float('nan')):.0f}"
        )
    return {"model": key, "B": B, "N": N, "L": L, "fastest_ancestral": fastest_anc, "configs": rows}


def to_markdown(res) -> str:
    lines = [
        f"# Sampler latency ({res['device_name']}, {res['device']}, {res['threads']} threads, "
        f"torch {res['torch']})",
        "",
        "Medians of interleaved repetitions; ratio = wall / the fastest ancestral configuration "
        "of the same run. own/round: wall minus the time inside the network, per round "
        "(eager: measured around each call in a separate instrumented run; compiled: the "
        "network alone, compiled the same way, at the same batch sizes, subtracted). aten/round: aten calls per round outside the network (CPU). "
        "floor: the ratio this sampler would have if its own cost were zero (its time inside "
        "the network / the fastest ancestral wall): a ratio target below it cannot be met by "
        "the sampler, only by a cheaper network call at batch B (L + 1). On CPU, static_eager "
        "and default run the static round eagerly, whose network call holds only the states a "
        "round reads from B = 2 (the compact call, `sampler.COMPACT_MIN_CHAINS_CPU`); "
        "static_compiled compiles the whole round with the full B (L + 1) call at B = 1, and "
        "from B = 2 makes the compact call with the network alone compiled (dynamic batch; "
        "no own cost is estimated for it).",
        "",
    ]
    for cell in res["cells"]:
        lines += [
            f"## {cell['model']}, B = {cell['B']}, N = {cell['N']}, L = {cell['L']} "
            f"(fastest ancestral: {cell['fastest_ancestral']})",
            "",
            "| sampler | wall [s] | ratio | floor | calls | rounds | own/round [ms] | aten/round |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in cell["configs"].items():
            own = r.get("own_per_round_ms")
            at = r.get("aten_calls_per_round_outside_network")
            fl = r.get("network_floor_ratio")
            lines.append(
                f"| {name} | {r['wall_s']:.4f} | {r['ratio_vs_fastest_ancestral']:.3f} | "
                f"{'-' if fl is None else f'{fl:.3f}'} | "
                f"{r['target_calls']} | {r['rounds']} | "
                f"{'-' if own is None else f'{own:.3f}'} | {'-' if at is None else f'{at:.0f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--cells",
        nargs="*",
        default=None,
        help="model:B pairs (default CPU: digits:1 gmm784:1 digits:1024; CUDA: digits:1 digits:16)",
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled configurations")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        common.require_cuda(p)
    torch.set_num_threads(args.threads)
    cells = args.cells or (
        ["digits:1", "digits:16"]
        if device.type == "cuda"
        else ["digits:1", "gmm784:1", "digits:1024"]
    )
    out = common.out_stem(args.out, f"latency_{args.device}")
    res = {**common.environment(device, __file__, argv), "cells": []}
    for cell in cells:
        key, B = cell.split(":")
        res["cells"].append(
            bench_model(
                key, int(B), args.steps, args.window, device, args.reps, not args.no_compile
            )
        )
        common.write_results(
            out, res, to_markdown(res)
        )  # after every cell: a cut-off run keeps them
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

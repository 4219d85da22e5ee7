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
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from specdiff_kernels import models
from specdiff_kernels.sampling.sampler import COMPACT_MIN_CHAINS_CPU, AncestralSampler, SpeculativeSampler

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class DiffusersLoop:
    """diffusers' own sampling loop on the same network and schedule: DDPMScheduler with the
    model's training betas, ``leading`` respacing, fixed_small variance and its clipping;
    ``scheduler.step`` per step (what a pipeline's ``__call__`` does), under inference_mode."""

    def __init__(self, m, N: int):
        from diffusers import DDPMScheduler
        abar = m.alphas_cumprod
        betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        self.sched = DDPMScheduler(num_train_timesteps=abar.numel(), trained_betas=betas.numpy(),
                                   prediction_type=m.prediction, variance_type="fixed_small",
                                   clip_sample=m.clip_sample is not None,
                                   clip_sample_range=m.clip_sample or 1.0,
                                   timestep_spacing="leading")
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
    out = {"ancestral_eager": AncestralSampler(net, T),
           "static_eager": SpeculativeSampler(net, T, window=L, path="static", compile=False),
           "ragged": SpeculativeSampler(net, T, window=L, path="ragged")}
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
    sync(device)
    t0 = time.perf_counter()
    res = sampler.sample(B, shape, generator=torch.Generator().manual_seed(seed), device=device)
    sync(device)
    return time.perf_counter() - t0, res.stats


def net_time(net, shape, batch, device, compiled: bool, reps=30) -> float:
    """Seconds per call of the network alone at this batch (eager, or compiled the same way)."""
    f = torch.compile(net, fullgraph=True, dynamic=False) if compiled else net
    x = torch.randn(batch, *shape, device=device)
    t = torch.full((batch,), 500, device=device)
    with torch.inference_mode():
        for _ in range(3):
            f(x, t)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            f(x, t)
        sync(device)
    return (time.perf_counter() - t0) / reps


class TimedNetwork(torch.nn.Module):
    """The network with a stopwatch around each call (eager runs only: a compiled graph has no
    call boundary); on CUDA it synchronises around each call, so use it in separate runs."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seconds = net, 0.0

    def forward(self, x, t):
        dev = x.device
        sync(dev)
        t0 = time.perf_counter()
        out = self.net(x, t)
        sync(dev)
        self.seconds += time.perf_counter() - t0
        return out


def own_cost_per_round(make, B, shape, device) -> tuple[float, float]:
    """((wall - time inside the network) / rounds in ms, time inside the network in s), from one
    instrumented run."""
    timed_sampler, timed = make()
    wall, st = run_once(timed_sampler, B, shape, device)
    return (wall - timed.seconds) / st.rounds * 1e3, timed.seconds


def aten_calls(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def bench_model(key, B, N, L, device, reps, with_compile, log) -> dict:
    m = models.load("gmm", dim=int(key[3:])) if key.startswith("gmm") and key[3:] else models.load(key)
    net = m.target.to(device) if isinstance(m.target, torch.nn.Module) else m.target
    T = m.transitions(N)
    shape = m.event_shape
    cfgs = configs(net, T, L, device, with_compile, m)
    stats, times = {}, {name: [] for name in cfgs}
    for name, s in cfgs.items():                       # warm-up: compile, autotune, capture
        t, st = run_once(s, B, shape, device)
        log(f"  {key} B={B} warm-up {name}: {t:.3f} s ({st.target_calls} calls)")
        stats[name] = st
    for _ in range(reps):
        order = list(cfgs)
        random.shuffle(order)
        for name in order:
            times[name].append(run_once(cfgs[name], B, shape, device)[0])
    wall = {name: statistics.median(ts) for name, ts in times.items()}
    anc = [n for n in wall if n.startswith("ancestral")]
    fastest_anc = min(anc, key=lambda n: wall[n])
    rows = {}
    for name, s in cfgs.items():
        st = stats[name]
        compiled = name.endswith("compiled") or (name == "default" and s.compile is True) or (
            name == "default" and device.type == "cuda")
        row = {"wall_s": wall[name], "ratio_vs_fastest_ancestral": wall[name] / wall[fastest_anc],
               "target_calls": st.target_calls, "rounds": st.rounds, "target_evals": st.target_evals,
               "reps": len(times[name])}
        if not compiled and name != "ancestral_diffusers_loop" and isinstance(net, torch.nn.Module):
            def make(name=name):
                timed = TimedNetwork(net)
                return configs(timed, T, L, device, False, m)[name], timed
            row["own_per_round_ms"], net_s = own_cost_per_round(make, B, shape, device)
            row["network_floor_ratio"] = net_s / wall[fastest_anc]
        elif (compiled and device.type == "cuda") or name == "ancestral_diffusers_loop":
            pass   # own cost is a CPU target; compiling the network alone again costs device time
        elif compiled and name.startswith("static") and B >= COMPACT_MIN_CHAINS_CPU:
            pass   # compact calls of changing size: no fixed-batch network time to subtract
        elif name.startswith("ancestral"):
            t_call = net_time(net, shape, B, device, compiled)
            row["own_per_round_ms"] = (wall[name] - N * t_call) / N * 1e3
        elif name != "ragged":
            t_root = net_time(net, shape, B, device, compiled)
            t_round = net_time(net, shape, B * (L + 1), device, compiled)
            rounds = st.rounds
            row["own_per_round_ms"] = (wall[name] - t_root - (rounds - 1) * t_round) / max(rounds - 1, 1) * 1e3
            row["net_per_round_ms"] = t_round * 1e3
            row["network_floor_ratio"] = (t_root + (rounds - 1) * t_round) / wall[fastest_anc]
        if device.type == "cpu" and name in ("static_eager", "static_compiled", "ancestral_eager",
                                             "ancestral_compiled", "ragged", "default") and B <= 64:
            total = aten_calls(lambda: run_once(s, B, shape, device))
            # the network's own aten calls, alone, in the same mode (compiled: Inductor's extern
            # kernels such as addmm still show as aten calls)
            f = torch.compile(net, fullgraph=True, dynamic=False) if compiled else net
            x = torch.randn(B, *shape)
            tt = torch.full((B,), 500)
            xw = torch.randn(B * (L + 1), *shape)
            tw = torch.full((B * (L + 1),), 500)
            with torch.inference_mode():
                f(x, tt), f(xw, tw)
                per_root = aten_calls(lambda: f(x, tt))
                per_round_net = aten_calls(lambda: f(xw, tw))
            if name.startswith("ancestral"):
                net_calls = N * per_root
            else:
                net_calls = per_root + (st.rounds - 1) * per_round_net
            row["aten_calls_per_round_outside_network"] = (total - net_calls) / st.rounds
        rows[name] = row
        log(f"  {key} B={B} {name}: wall {wall[name]:.4f} s, ratio {row['ratio_vs_fastest_ancestral']:.3f}"
            f", own/round {row.get('own_per_round_ms', float('nan')):.3f} ms, aten/round "
            f"{row.get('aten_calls_per_round_outside_network', float('nan')):.0f}")
    return {"model": key, "B": B, "N": N, "L": L, "fastest_ancestral": fastest_anc, "configs": rows}


def to_markdown(res) -> str:
    lines = [f"# Sampler latency ({res['device_name']}, {res['device']}, {res['threads']} threads, "
             f"torch {res['torch']})", "",
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
             "no own cost is estimated for it).", ""]
    for cell in res["cells"]:
        lines += [f"## {cell['model']}, B = {cell['B']}, N = {cell['N']}, L = {cell['L']} "
                  f"(fastest ancestral: {cell['fastest_ancestral']})", "",
                  "| sampler | wall [s] | ratio | floor | calls | rounds | own/round [ms] | aten/round |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in cell["configs"].items():
            own = r.get("own_per_round_ms")
            at = r.get("aten_calls_per_round_outside_network")
            fl = r.get("network_floor_ratio")
            lines.append(f"| {name} | {r['wall_s']:.4f} | {r['ratio_vs_fastest_ancestral']:.3f} | "
                         f"{'-' if fl is None else f'{fl:.3f}'} | "
                         f"{r['target_calls']} | {r['rounds']} | "
                         f"{'-' if own is None else f'{own:.3f}'} | {'-' if at is None else f'{at:.0f}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cells", nargs="*", default=None,
                   help="model:B pairs (default CPU: digits:1 gmm784:1 digits:1024; CUDA: digits:1 digits:16)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled configurations")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    cells = args.cells or (["digits:1", "digits:16"] if device.type == "cuda"
                           else ["digits:1", "gmm784:1", "digits:1024"])
    out = Path(args.out) if args.out else RESULTS / f"latency_{args.device}"
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    res = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name() if device.type == "cuda"
           else platform.processor() or platform.machine(), "cells": []}
    for cell in cells:
        key, B = cell.split(":")
        res["cells"].append(bench_model(key, int(B), args.steps, args.window, device, args.reps,
                                        not args.no_compile, log))
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

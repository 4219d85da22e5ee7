"""What the benchmarks share: timing (medians and quantiles, interleaved repetitions), the
environment a run records (machine, threads, versions, command) and writing its results (JSON,
markdown and an optional PNG under one path stem)."""

from __future__ import annotations

import json
import os
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable, TypeVar

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# `python bench/<script>.py` from a checkout: the package beside bench/ imports without installing
if str(HERE.parent) not in sys.path:
    sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402

K = TypeVar("K", bound=Hashable)


# ---------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the 20% / 80% quantiles of the timed calls; ``reps`` is
    how many calls were timed (None where the timer does not say)."""

    median: float
    q20: float
    q80: float
    reps: int | None = None

    @classmethod
    def of(cls, times: Iterable[float], reps: int | None = None) -> Timing:
        ts = sorted(times)

        def q(p: float) -> float:
            return ts[int(p * (len(ts) - 1))]

        return cls(statistics.median(ts), q(0.2), q(0.8), len(ts) if reps is None else reps)

    def ms(self, quantile_suffix: str = "") -> dict:
        """``{"ms", "q20<suffix>", "q80<suffix>"}`` in milliseconds, as the result files keep them."""
        return {
            "ms": self.median * 1e3,
            f"q20{quantile_suffix}": self.q20 * 1e3,
            f"q80{quantile_suffix}": self.q80 * 1e3,
        }


def time_cpu(fn: Callable[[], object], min_run_time: float = 0.5) -> Timing:
    """``torch.utils.benchmark``'s blocked autorange after one warm-up call: each timed block
    holds enough calls to drown the timer's own cost."""
    import torch.utils.benchmark as tbench

    fn()
    m = tbench.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    ).blocked_autorange(min_run_time=min_run_time)
    return Timing.of(m.times, reps=len(m.times) * m.number_per_run)


def time_cuda(fn: Callable[[], object], rep_ms: int = 100) -> Timing:
    """``triton.testing.do_bench`` (its own warm-up, the L2 cache flushed between calls) after one
    untimed call (compile, autotune)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    q20, med, q80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return Timing(med * 1e-3, q20 * 1e-3, q80 * 1e-3)


def time_calls(fn: Callable[[], object], calls: int = 3) -> Timing:
    """One warm-up call, then each call timed alone: for dry runs, whose numbers mean nothing."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing.of(times)


def timer(device: torch.device | str) -> Callable[..., Timing]:
    return time_cuda if torch.device(device).type == "cuda" else time_cpu


def sync(device: torch.device | str) -> None:
    """Waits for the device's queue (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def per_call(
    fn: Callable[[], object],
    calls: int,
    device: torch.device | str = "cpu",
    host_only: bool = False,
) -> float:
    """Seconds per call of ``calls`` back-to-back calls, the device's queue drained first. The
    clock stops after the queue is drained again (what a caller waits for) or, with
    ``host_only``, before (the launch path's own cost)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    sync(device)
    return (host if host_only else time.perf_counter() - t0) / calls


def interleaved(
    run: Callable[[K], float],
    keys: Iterable[K],
    reps: int,
    times: dict[K, list[float]] | None = None,
) -> dict[K, list[float]]:
    """``reps`` timings ``run(key)`` per key, the keys in a fresh random order in every repetition
    so that drift and other jobs' load fall on all of them alike. A key that already holds
    timings in ``times`` (a warm-up kept as a repetition) runs that many times fewer."""
    times = {k: [] for k in keys} if times is None else times
    for _ in range(reps):
        order = [k for k in times if len(times[k]) < reps]
        random.shuffle(order)
        for k in order:
            times[k].append(run(k))
    return times


def interleaved_per_call(
    impls: dict[str, Callable[[], object]], reps: int, sample_s: float = 2e-3
) -> dict[str, list[float]]:
    """Seconds per call of each implementation, ``reps`` samples each, interleaved (see
    ``interleaved``); a sample times as many back-to-back calls as last about ``sample_s``
    (counted after three warm-up calls, the first of which may compile)."""
    calls = {}
    for key, fn in impls.items():
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        calls[key] = max(1, round(sample_s / max(time.perf_counter() - t0, 1e-7)))

    def run(key: str) -> float:
        fn, n = impls[key], calls[key]
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    return interleaved(run, list(impls), reps)


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Median and 20-80% quantiles of ``num[i] / den[i]``: the ratio within each repetition of
    interleaved timings, whose calls ran close together under the same load."""
    t = Timing.of([a / b for a, b in zip(num, den)])
    return {"median": t.median, "q20": t.q20, "q80": t.q80}


def medians(times: dict[K, list[float]]) -> dict[K, float]:
    return {k: statistics.median(ts) for k, ts in times.items()}


def cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph after a warm-up on a side stream; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def read_bandwidth(device: torch.device | str, numel: int, time_fn: Callable[..., Timing]) -> float:
    """Bytes/s of a large fp32 ``x.sum()``: the device's practical read bandwidth."""
    x = torch.randn(numel, device=device)
    return numel * 4 / time_fn(lambda: x.sum()).median


class Deadline:
    """A time budget counted from its creation; ``seconds=None``: none."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


# ---------------------------------------------------------------- environment
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def card_slug(name: str) -> str:
    """A device name as a file-name part: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def command_line(script: str, argv: list[str] | None) -> str:
    """How the run was started, as ``python bench/<script> <arguments>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([f"python bench/{Path(script).name}", *args])


def environment(
    device: torch.device | str = "cpu", script: str | None = None, argv: list[str] | None = None
) -> dict:
    """What a result depends on besides the code: the device, this machine's CPU and cores,
    torch's threads (set them first), the versions (triton where it is imported), the command,
    the date and the load average when the run started."""
    device = torch.device(device)
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if "triton" in sys.modules:
        env["triton"] = sys.modules["triton"].__version__
    if script is not None:
        env["command"] = command_line(script, argv)
    env["date"] = time.strftime("%Y-%m-%d")
    env["load_average"] = load_average()
    return env


def log(msg: str) -> None:
    print(msg, flush=True)


def require_cuda(parser, hint: str = "") -> None:
    """Exits through ``parser.error`` where there is no CUDA device."""
    if not torch.cuda.is_available():
        parser.error("no CUDA device is available" + hint)


# ---------------------------------------------------------------- results
def out_stem(out: str | None, default: str) -> Path:
    """Where a run's files go: the ``--out`` path stem, or bench/results/<default>."""
    return Path(out) if out else RESULTS / default


def write_results(
    stem: Path, data: dict | str, markdown: str, plot: Callable[[Path], None] | None = None
) -> None:
    """``stem``.json (``data``; a string is written as it is), ``stem``.md and, where matplotlib
    is installed, ``stem``.png drawn by ``plot(path)``; parent folders are created."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data, indent=1) + "\n"
    stem.with_suffix(".json").write_text(text)
    stem.with_suffix(".md").write_text(markdown)
    written = [".json", ".md"]
    if plot is not None:
        try:
            import matplotlib
        except ImportError:
            log("note: matplotlib is not installed, so the PNG is skipped")
        else:
            matplotlib.use("Agg")
            plot(stem.with_suffix(".png"))
            written.append(".png")
    log(f"wrote {stem}{{{','.join(written)}}}")

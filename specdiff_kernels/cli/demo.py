"""``specdiff demo``: ancestral vs speculative sampling of an embedded model, side by side.

Prints the cost table (docs/design.md §10: sequential target calls, total evaluations, rounds, acceptance by
window position, wall time), a two-sample p-value between the two sample sets (the law must be
the same; skipped, with a note, for a single chain), and writes two PNGs (both sample sets, and
acceptance by window position) and the stats, named after the model (``demo_digits_stats.json``).

The arguments arrive checked and with their defaults filled in (``specdiff_kernels.cli.commands``).
matplotlib (the PNGs) and scikit-learn (the digit classifier) are optional: without them the demo
says so in one line before it starts and skips that part (``pip install specdiff_kernels[demo]``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import models
from ..sampling.accounting import SamplerStats
from ..sampling.ancestral import AncestralSampler
from ..sampling.drafts import DraftModelDraft, FrozenTargetDraft
from ..sampling.sampler import SpeculativeSampler
from ..testing.two_sample import two_sample_pvalue
from .output import RunOutput, demo_files

DRAFTS = ("frozen-x0", "frozen-eps", "model")


def make_draft(kind: str, model: "models.EmbeddedModel"):
    if kind == "frozen-x0":
        return FrozenTargetDraft("x0", prefetch_root=True)
    if kind == "frozen-eps":
        return FrozenTargetDraft("eps", prefetch_root=True)
    if kind == "model":
        if model.draft is None:
            raise SystemExit(f"model {model.name!r} ships no draft network")
        return DraftModelDraft(model.draft)
    raise SystemExit(f"--draft must be one of {DRAFTS}, got {kind!r}")


def _fmt(v, spec=".3g"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


@dataclass
class WarmTimes:
    """Wall seconds of warm runs of both samplers, interleaved (``reps`` each, same threads)."""

    ancestral: list
    speculative: list
    threads: int

    @property
    def medians(self) -> tuple[float, float]:
        return statistics.median(self.ancestral), statistics.median(self.speculative)

    @property
    def ratio(self) -> float:
        """Speculative / ancestral: the median of the ratios of runs made next to each other (the
        machine's speed drifts between pairs more than within one)."""
        return statistics.median(s / a for a, s in zip(self.ancestral, self.speculative))


def warm_times(run_ancestral, run_speculative, reps: int) -> WarmTimes:
    """``reps`` runs of each, interleaved with alternating order (a slow spell of the machine or
    a drift falls on both)."""
    anc, spec = [], []
    with warnings.catch_warnings():  # the first runs said it already
        warnings.simplefilter("ignore")
        for i in range(reps):
            pair = ((run_ancestral, anc), (run_speculative, spec))
            for run, out in pair if i % 2 == 0 else pair[::-1]:
                out.append(run().stats.wall_time)
    return WarmTimes(anc, spec, torch.get_num_threads())


def acceptance_line(spec: SamplerStats) -> str:
    """Acceptance by window position, up to the longest window verified."""
    acc = spec.acceptance_by_position
    seen = [j for j, a in enumerate(acc) if not math.isnan(a)]
    if not seen:
        return "acceptance by window position: no window was verified (every step ancestral)"
    shown = "  ".join(f"{j}:{_fmt(a, '.2f')}" for j, a in enumerate(acc[: seen[-1] + 1]))
    return f"acceptance by window position: {shown}"


def cost_table(anc: SamplerStats, spec: SamplerStats, warm: Optional[WarmTimes] = None) -> str:
    """The cost table; ``warm``: its wall-time row from warm interleaved runs (medians; the ratio
    is the median of the pairs' ratios), the first runs' times on a line of their own."""
    rel = spec.relative_to(anc)
    wall = ("wall time [s]", anc.wall_time, spec.wall_time)
    wall_ratio = spec.wall_time / anc.wall_time
    if warm is not None:
        n = len(warm.ancestral)
        wall = (f"wall time [s], median of {n} warm runs", *warm.medians)
        wall_ratio = warm.ratio
    rows = [
        (
            "sequential target calls (batch)",
            anc.target_calls,
            spec.target_calls,
            rel["target_calls"],
        ),
        (
            "sequential target calls / chain (mean)",
            anc.mean_chain_rounds,
            spec.mean_chain_rounds,
            spec.mean_chain_rounds / anc.mean_chain_rounds,
        ),
        ("total target evaluations", anc.target_evals, spec.target_evals, rel["target_evals"]),
        ("draft calls / evaluations", "0 / 0", f"{spec.draft_calls} / {spec.draft_evals}", None),
        (*wall, wall_ratio),
        ("mean accepted steps per round", None, spec.mean_accepted_length, None),
        ("mean committed steps per round", 1.0, spec.steps_per_window, None),
    ]
    w = max(len(r[0]) for r in rows)
    out = [
        f"{'':{w}}  {'ancestral':>12}  {'speculative':>12}  {'ratio':>8}",
        f"{'-' * w}  {'-' * 12}  {'-' * 12}  {'-' * 8}",
    ]
    for name, a, s, r in rows:
        fa = a if isinstance(a, str) else _fmt(a, ".4g")
        fs = s if isinstance(s, str) else _fmt(s, ".4g")
        out.append(f"{name:{w}}  {fa:>12}  {fs:>12}  {_fmt(r, '.3f'):>8}")
    out.append(
        f"speed-up (ancestral / speculative): sequential calls x{1 / rel['target_calls']:.2f}, "
        f"wall time x{1 / wall_ratio:.2f}"
        + ("" if warm is None else f" ({warm.threads} thread{'s' * (warm.threads > 1)})")
    )
    if warm is not None:
        out.append(
            f"first runs: ancestral {anc.wall_time:.4g} s, speculative {spec.wall_time:.4g} s "
            f"(x{anc.wall_time / spec.wall_time:.2f}; the speculative one measures the cost model)"
        )
    out.append(acceptance_line(spec))
    if spec.autopilot and "window_hist" in spec.autopilot:
        ap = spec.autopilot
        hist = ", ".join(f"{w}: {n}" for w, n in sorted(ap["window_hist"].items()))
        share = ap["ancestral_steps"] / max(1, spec.num_chains * spec.num_steps)
        out.append(
            f"window='auto': rounds per window {{{hist}}} (0: blocks of ancestral steps, "
            f"{share:.0%} of the steps); cost model measured in "
            f"{ap['cost']['calibration_s'] * 1e3:.1f} ms"
        )
    return "\n".join(out)


def _mean_se(x: torch.Tensor) -> str:
    x = x.double()
    se = float(x.std() / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return f"{float(x.mean()):.3f} +- {_fmt(se, '.3f')}"


def save_sample_grids(path: Path, anc, spec, event_shape, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax, x, name in ((axes[0], anc, "ancestral"), (axes[1], spec, "speculative")):
        x = x.detach().float().cpu()
        if len(event_shape) == 3:  # images: a grid of up to 64
            n = min(64, x.shape[0])
            side = int(math.ceil(math.sqrt(n)))
            C, H, W = event_shape
            grid = torch.full((side * (H + 1), side * (W + 1)), -1.0)
            for i in range(n):
                r, c = divmod(i, side)
                grid[r * (H + 1) : r * (H + 1) + H, c * (W + 1) : c * (W + 1) + W] = x[i].mean(0)
            ax.imshow(
                grid.clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest"
            )
            ax.set_xticks([]), ax.set_yticks([])
        else:  # vectors: the first two coordinates
            flat = x.reshape(x.shape[0], -1)
            ax.scatter(flat[:, 0], flat[:, 1 if flat.shape[1] > 1 else 0], s=6, alpha=0.6)
            ax.set_xlabel("x[0]"), ax.set_ylabel("x[1]")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_acceptance_plot(path: Path, spec: SamplerStats, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = spec.acceptance_by_position
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(len(acc)), [0 if math.isnan(a) else a for a in acc], color="tab:blue")
    ax.set_xlabel("position in the draft window")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    for j, a in enumerate(acc):
        if not math.isnan(a):
            ax.text(j, a + 0.01, f"{a:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def two_sample_or_note(x: torch.Tensor, y: torch.Tensor, seed: int):
    """(p-value, None), or (None, the reason) when a sample set is too small for the test."""
    n = min(x.shape[0], y.shape[0])
    if n < 2:
        return None, f"skipped: the two-sample test needs at least 2 samples per run, got {n}"
    return two_sample_pvalue(x, y, seed=seed), None


def optional_module(module: str, what: str) -> bool:
    """Whether ``module`` can be imported; if not, a one-line notice that ``what`` is skipped."""
    if importlib.util.find_spec(module) is not None:
        return True
    print(
        f"note: {module} is not installed, so the {what} is skipped "
        f"(pip install 'specdiff_kernels[demo]' adds it)"
    )
    return False


def run_demo(args) -> int:
    plots = optional_module("matplotlib", "PNG output")
    classify = args.model == "digits" and optional_module("sklearn", "digit classifier")
    device = torch.device(args.device)
    model = models.load(args.model, **({"dim": args.dim} if args.model == "gmm" else {}))
    model.target = model.target.to(device)
    if model.draft is not None:
        model.draft = model.draft.to(device)
    transitions = model.transitions(args.steps)
    draft = make_draft(args.draft, model)
    print(f"model: {model.name} ({model.description})")
    threads = torch.get_num_threads()
    print(
        f"chain: {transitions!r}; batch {args.batch}, window L={args.window}, draft {draft!r}, "
        f"seed {args.seed}, device {device}, {threads} CPU thread{'s' * (threads > 1)}"
    )
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731

    def samplers(progress: bool):
        anc = AncestralSampler(
            model.target, transitions, progress=progress, max_batch=args.max_batch
        )
        spec = SpeculativeSampler(
            model.target,
            transitions,
            draft=draft,
            window=args.window,
            backend=args.backend,
            progress=progress,
            max_batch=args.max_batch,
        )

        def run(sampler):
            return lambda: sampler.sample(
                args.batch, model.event_shape, generator=gen(), device=device
            )

        return run(anc), run(spec)

    first_anc, first_spec = samplers(not args.no_progress)
    anc, spec = first_anc(), first_spec()
    warm = warm_times(*samplers(False), args.reps)
    print()
    print(cost_table(anc.stats, spec.stats, warm))
    # The two runs share their random streams: compare against an independent ancestral run so the
    # p-value tests the law, not a coupling of the two sample sets.
    t0 = time.perf_counter()
    indep = AncestralSampler(model.target, transitions, max_batch=args.max_batch).sample(
        args.batch,
        model.event_shape,
        generator=torch.Generator().manual_seed(args.seed + 10_007),
        device=device,
    )
    p, note = two_sample_or_note(spec.samples, indep.samples, args.seed)
    if p is None:
        print(f"two-sample test: {note}")
    else:
        verdict = "no evidence of a difference" if p > 0.01 else "DIFFERENT"
        print(
            f"two-sample test, speculative vs an independent ancestral run (per-coordinate KS + "
            f"energy distance, Bonferroni): p = {p:.3f} ({verdict}; "
            f"{time.perf_counter() - t0:.1f}s)"
        )
    if classify:
        from ..models.digits_classifier import digit_confidence

        a, b = (digit_confidence(r.samples.cpu()) for r in (anc, spec))
        print(
            f"digit classifier mean confidence (+- s.e., {len(a)} samples each; the same law, so "
            f"a difference within the errors is sampling noise): ancestral {_mean_se(a)}, "
            f"speculative {_mean_se(b)}"
        )
    samples_png, acceptance_png, stats_json = demo_files(args.model)
    with RunOutput(args.out, args.overwrite) as out:
        if plots:
            title = f"{model.name}, N={args.steps}, L={args.window}, draft {args.draft}"
            save_sample_grids(
                out.path(samples_png), anc.samples, spec.samples, model.event_shape, title
            )
            save_acceptance_plot(out.path(acceptance_png), spec.stats, title)
        # last: a folder with the stats holds a complete run
        out.path(stats_json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "ancestral": anc.stats.as_dict(),
                    "speculative": spec.stats.as_dict(),
                    "warm_wall_time_s": {
                        "ancestral": warm.ancestral,
                        "speculative": warm.speculative,
                        "threads": warm.threads,
                        "ratio": warm.ratio,
                    },
                    "two_sample_pvalue": p,
                    "two_sample_note": note,
                },
                indent=1,
                default=str,
            )
        )
    print(f"wrote {', '.join(map(str, out.written))}")
    return 0 if p is None or p > 1e-3 else 1


# --------------------------------------------------------------------------- specdiff demo --model langevin
def _fmt_acc(vals) -> str:
    return " ".join("  -" if math.isnan(v) else f"{v:.2f}" for v in vals)


def run_langevin_demo(
    *,
    seed: int = 0,
    batch: int = 1000,
    window=8,
    steps: int = 200,
    dim: int = 4,
    step_size: float = 0.05,
    backend: Optional[str] = None,
    progress: bool = False,
    out: Optional[str] = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> int:
    """``specdiff demo --model langevin``: speculative vs plain ULA on a banana target.

    ``batch`` chains of dimension ``dim`` (>= 2), ``steps`` ULA steps of size ``step_size``, window
    ``window`` (an int or ``"adaptive"``). Prints a table (sequential gradient calls of the batch
    and per chain, total gradient evaluations, draft calls, wall time, two-sample p-value) for plain
    ULA, speculative ULA with the frozen-gradient draft (window L, and adaptive windows), and with
    a cheap surrogate gradient (the banana's Gaussian part only, ``b = 0``), then the acceptance by
    window position; writes ``demo_langevin_stats.json`` into ``out`` (if given; ``overwrite``:
    replacing an earlier run's files, see :mod:`.output`). The p-value (per-coordinate KS + energy
    distance, Bonferroni) is against an independent plain-ULA run; with one chain the test is
    skipped (p-values None, with a note). Returns 0, or 1 when a p-value is below 1e-3.
    """
    from ..sampling.langevin import LangevinSampler, SpeculativeLangevin, banana_energy, banana_grad

    if dim < 2:
        raise ValueError(f"dim: the banana target needs at least 2 dimensions, got {dim}")
    B, L, N, D, g = batch, window, steps, dim, step_size
    U = banana_energy()
    surrogate = banana_grad(b=0.0)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    print(
        f"Speculative ULA on a banana target (a=1.5, b=0.5), D={D}, {B} chains, N={N} steps, "
        f"g={g}, window L={L}, float32; gradient by autograd"
    )
    plain = LangevinSampler(U, step_size=g, num_steps=N, progress=progress)
    ref = plain.sample(
        num_chains=B, event_shape=(D,), generator=gen(seed + 1), device=device
    )  # independent
    base = plain.sample(num_chains=B, event_shape=(D,), generator=gen(seed), device=device)
    if B < 2:
        print(f"two-sample tests: skipped: they need at least 2 samples per run, got {B}")
    pvalue = lambda x: two_sample_pvalue(x, ref.samples) if B >= 2 else None  # noqa: E731
    rows = [("plain ULA", base, pvalue(base.samples))]
    configs = [(f"frozen gradient, L={L}", L, "frozen")]
    if not isinstance(L, str):
        configs.append(("frozen gradient, adaptive", "adaptive", "frozen"))
    configs.append((f"surrogate gradient, L={L}", L, surrogate))
    for name, w, draft in configs:
        s = SpeculativeLangevin(
            U, step_size=g, num_steps=N, window=w, draft=draft, backend=backend, progress=progress
        )
        res = s.sample(num_chains=B, event_shape=(D,), generator=gen(seed), device=device)
        rows.append((name, res, pvalue(res.samples)))
    print(
        f"{'sampler':<27} {'seq grad calls':>14} {'/N batch':>8} {'/N chain':>8} {'grad evals':>10} "
        f"{'/(B*N)':>6} {'draft calls':>11} {'wall s':>7} {'p vs ULA':>9}"
    )
    for name, res, p in rows:
        st = res.stats
        print(
            f"{name:<27} {st.target_calls:>14d} {st.target_calls / N:>8.3f} "
            f"{st.mean_chain_rounds / N:>8.3f} {st.target_evals:>10d} {st.target_evals / (B * N):>6.2f} "
            f"{st.draft_calls:>11d} {st.wall_time:>7.2f} {_fmt(p):>9}"
        )
    print("acceptance by window position (j = 0..L-1):")
    for name, res, _ in rows[1:]:
        st = res.stats
        acc = st.acceptance_by_position
        shown = acc if len(acc) <= 16 else acc[:16]
        more = f" ... ({len(acc)} positions)" if len(acc) > 16 else ""
        print(
            f"  {name:<27} [{_fmt_acc(shown)}{more}]  mean window {st.mean_window_length:.1f}, "
            f"mean steps/window {st.steps_per_window:.2f}"
        )
    print(
        f"(/N batch: sequential gradient calls of the whole ragged batch / N; /N chain: mean over "
        f"chains of the calls each chain needed. p vs ULA: two-sample test against an independent "
        f"plain-ULA run with seed {seed + 1}; the plain row is the test's own null check. "
        f"Speculative ULA is exact w.r.t. the ULA chain, so these p-values are Uniform(0,1) "
        f"under correct code.)"
    )
    ps = [p for _, _, p in rows if p is not None]
    record = {
        "args": {
            "seed": seed,
            "batch": B,
            "window": L,
            "steps": N,
            "dim": D,
            "step_size": g,
            "backend": backend,
            "device": str(device),
        },
        "rows": [
            {"sampler": name, "stats": res.stats.as_dict(), "two_sample_pvalue": p}
            for name, res, p in rows
        ],
        "two_sample_note": None
        if ps
        else f"skipped: the two-sample test needs at least 2 samples per run, got {B}",
    }
    if out is not None:
        with RunOutput(out, overwrite) as o:
            path = o.path(demo_files("langevin")[0])
            path.write_text(json.dumps(record, indent=1, default=str))
        print(f"wrote {path}")
    return 0 if not ps or min(ps) > 1e-3 else 1

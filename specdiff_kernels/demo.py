"""``specdiff demo``: ancestral vs speculative sampling of an embedded model, side by side.

Prints the cost table (SPEC §4: sequential target calls, total evaluations, rounds, acceptance by
window position, wall time), a two-sample p-value between the two sample sets (the law must be
the same), and writes two PNGs: both sample sets, and acceptance by window position.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from . import models
from .drafts import DraftModelDraft, FrozenTargetDraft
from .sampler import AncestralSampler, SamplerStats, SpeculativeSampler
from .stats import two_sample_pvalue

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


def cost_table(anc: SamplerStats, spec: SamplerStats) -> str:
    rel = spec.relative_to(anc)
    rows = [
        ("sequential target calls (batch)", anc.target_calls, spec.target_calls, rel["target_calls"]),
        ("sequential target calls / chain (mean)", anc.mean_chain_rounds, spec.mean_chain_rounds,
         spec.mean_chain_rounds / anc.mean_chain_rounds),
        ("total target evaluations", anc.target_evals, spec.target_evals, rel["target_evals"]),
        ("draft calls / evaluations", "0 / 0", f"{spec.draft_calls} / {spec.draft_evals}", None),
        ("wall time [s]", anc.wall_time, spec.wall_time, rel["wall_time"]),
        ("mean accepted steps per round", None, spec.mean_accepted_length, None),
        ("mean committed steps per round", 1.0, spec.steps_per_window, None),
    ]
    w = max(len(r[0]) for r in rows)
    out = [f"{'':{w}}  {'ancestral':>12}  {'speculative':>12}  {'ratio':>8}",
           f"{'-' * w}  {'-' * 12}  {'-' * 12}  {'-' * 8}"]
    for name, a, s, r in rows:
        fa = a if isinstance(a, str) else _fmt(a, ".4g")
        fs = s if isinstance(s, str) else _fmt(s, ".4g")
        out.append(f"{name:{w}}  {fa:>12}  {fs:>12}  {_fmt(r, '.3f'):>8}")
    out.append(f"speed-up (ancestral / speculative): sequential calls x{1 / rel['target_calls']:.2f}, "
               f"wall time x{1 / rel['wall_time']:.2f}")
    acc = "  ".join(f"{j}:{_fmt(a, '.2f')}" for j, a in enumerate(spec.acceptance_by_position))
    out.append(f"acceptance by window position: {acc}")
    return "\n".join(out)


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
                grid[r * (H + 1):r * (H + 1) + H, c * (W + 1):c * (W + 1) + W] = x[i].mean(0)
            ax.imshow(grid.clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
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


def run_demo(args) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.batch is None:
        args.batch = 192
    model = models.load(args.model, **({"dim": args.dim or 64} if args.model == "gmm" else {}))
    transitions = model.transitions(args.steps)
    draft = make_draft(args.draft, model)
    print(f"model: {model.name} ({model.description})")
    print(f"chain: {transitions!r}; batch {args.batch}, window L={args.window}, draft {draft!r}, "
          f"seed {args.seed}")
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
    anc = AncestralSampler(model.target, transitions, progress=not args.no_progress
                           ).sample(args.batch, model.event_shape, generator=gen())
    spec = SpeculativeSampler(model.target, transitions, draft=draft, window=args.window,
                              backend=args.backend, progress=not args.no_progress
                              ).sample(args.batch, model.event_shape, generator=gen())
    print()
    print(cost_table(anc.stats, spec.stats))
    # The two runs share their random streams: compare against an independent ancestral run so the
    # p-value tests the law, not a coupling of the two sample sets.
    t0 = time.perf_counter()
    indep = AncestralSampler(model.target, transitions).sample(
        args.batch, model.event_shape, generator=torch.Generator().manual_seed(args.seed + 10_007))
    p = two_sample_pvalue(spec.samples, indep.samples, seed=args.seed)
    print(f"two-sample test, speculative vs an independent ancestral run (per-coordinate KS + energy "
          f"distance, Bonferroni): p = {p:.3f} ({'no evidence of a difference' if p > 0.01 else 'DIFFERENT'}"
          f"; {time.perf_counter() - t0:.1f}s)")
    if model.name == "digits":
        from .models.digits_classifier import digit_confidence
        print(f"digit classifier mean confidence: ancestral {float(digit_confidence(anc.samples).mean()):.3f}, "
              f"speculative {float(digit_confidence(spec.samples).mean()):.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model.name}, N={args.steps}, L={args.window}, draft {args.draft}"
    save_sample_grids(out / "demo_samples.png", anc.samples, spec.samples, model.event_shape, title)
    save_acceptance_plot(out / "demo_acceptance.png", spec.stats, title)
    (out / "demo_stats.json").write_text(json.dumps(
        {"args": vars(args), "ancestral": anc.stats.as_dict(), "speculative": spec.stats.as_dict(),
         "two_sample_pvalue": p}, indent=1, default=str))
    print(f"wrote {out / 'demo_samples.png'}, {out / 'demo_acceptance.png'}, {out / 'demo_stats.json'}")
    return 0 if p > 1e-3 else 1

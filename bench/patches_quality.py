"""Quality figure of the embedded ``patches`` pipeline (no download needed).

Samples the packaged diffusers ``DDPMPipeline`` (``specdiff_kernels.models.patches``) with this
project's samplers through the diffusers adapter (N DDPM steps, the scheduler's own step
tabulated by ``from_pipeline``): an ancestral run and an independent speculative run (another
seed; frozen-x0 draft, window L). Compares against held-out crops (image regions never trained
on) and, as a yardstick of how far two sets of real crops lie apart, training crops:

* per-channel mean / std (``channel_stats``);
* the radially averaged power spectrum (``radial_power_spectrum``), summarised as the mean
  |log10 ratio| to the held-out spectrum over the radii r = 1..16;
* sliced 1-Wasserstein distances between the sets (pixels as 3072-vectors);
* a two-sample test of speculative vs ancestral samples, which must NOT reject (speculative
  sampling is exact): ``specdiff_kernels.testing.two_sample.two_sample_pvalue`` (per-pixel KS + energy
  permutation test) and KS on per-image statistics (channel means, contrast, high-frequency
  power fraction), Bonferroni over all.

Writes ``bench/results/patches_quality_<tag>.{json,md,png}``.

    OMP_NUM_THREADS=1 python bench/patches_quality.py [--n 192] [--steps 200] [--window 8]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import _common as common
import numpy as np
import torch
from scipy import stats as sps

from specdiff_kernels import AncestralSampler, SpeculativeSampler
from specdiff_kernels.integrations.diffusers import from_pipeline
from specdiff_kernels.models import patches as P
from specdiff_kernels.testing import two_sample as S

ROOT = Path(__file__).resolve().parent.parent


def per_image_stats(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Scalar statistics of each image: channel means, contrast, high-frequency power fraction."""
    a = x.detach().double().cpu().numpy()
    out = {f"mean_{c}": a[:, i].mean(axis=(1, 2)) for i, c in enumerate("RGB")}
    out["std"] = a.std(axis=(1, 2, 3))
    F = np.abs(np.fft.fft2(a - a.mean(axis=(2, 3), keepdims=True), axes=(-2, -1))) ** 2
    H, W = a.shape[-2:]
    k = np.sqrt((np.fft.fftfreq(H) * H)[:, None] ** 2 + (np.fft.fftfreq(W) * W)[None, :] ** 2)
    hi = (F * (k >= H / 4)).sum(axis=(1, 2, 3))
    out["hf_fraction"] = hi / np.maximum(F.sum(axis=(1, 2, 3)), 1e-12)
    return out


def spectrum_gap(p: np.ndarray, ref: np.ndarray) -> float:
    """Mean |log10(p / ref)| over radii 1.. (DC excluded: it is the mean, reported separately)."""
    return float(np.mean(np.abs(np.log10(p[1:] / ref[1:]))))


@dataclass
class Runs:
    """The two samplers' runs and the reference crops they are compared with."""

    anc: object
    spec: object
    heldout: torch.Tensor
    train: torch.Tensor

    @property
    def sets(self) -> dict[str, torch.Tensor]:
        return {
            "ancestral": self.anc.samples.float(),
            "speculative": self.spec.samples.float(),
            "heldout": self.heldout,
            "train": self.train,
        }


def sample(args: argparse.Namespace) -> Runs:
    pipe = P.load_pipeline()
    model, transitions = from_pipeline(pipe, num_inference_steps=args.steps)
    shape = (3, P.CROP, P.CROP)
    anc = AncestralSampler(model, transitions).sample(
        args.n, shape, generator=torch.Generator().manual_seed(args.seed)
    )
    common.log(f"ancestral: {anc.stats.wall_time:.1f}s")
    # another seed: the samplers read the same counter-based noise, so the same seed would give
    # nearly the same images and the test would say nothing about the law
    spec = SpeculativeSampler(model, transitions, window=args.window).sample(
        args.n, shape, generator=torch.Generator().manual_seed(args.seed + 1)
    )
    common.log(f"speculative: {spec.stats.wall_time:.1f}s")
    return Runs(
        anc,
        spec,
        P.heldout_crops(args.n_ref, seed=args.seed + 100),
        P.random_crops(args.n_ref, torch.Generator().manual_seed(args.seed + 200)),
    )


def compare(runs: Runs, n: int, seed: int) -> dict:
    """Channel statistics, spectra, sliced W1 and the two-sample tests of the sets."""
    sets = runs.sets
    xa, xs, held, train = sets["ancestral"], sets["speculative"], runs.heldout, runs.train
    spectra = {k: P.radial_power_spectrum(x)[1] for k, x in sets.items()}
    sw = {
        "ancestral_vs_heldout": S.sliced_wasserstein(xa, held[:n], seed=1),
        "speculative_vs_heldout": S.sliced_wasserstein(xs, held[:n], seed=1),
        "train_vs_heldout": S.sliced_wasserstein(train[:n], held[:n], seed=1),
        "speculative_vs_ancestral": S.sliced_wasserstein(xs, xa, seed=1),
    }
    t1 = time.perf_counter()
    p_pixels = S.two_sample_pvalue(xs, xa, seed=seed)
    ia, is_ = per_image_stats(xa), per_image_stats(xs)
    p_stats = {k: float(sps.ks_2samp(is_[k], ia[k]).pvalue) for k in ia}
    return {
        "channel_stats": {
            k: {m: [round(float(v), 4) for v in arr] for m, arr in P.channel_stats(x).items()}
            for k, x in sets.items()
        },
        "freq": P.radial_power_spectrum(held[:1])[0],
        "spectra": spectra,
        "gaps": {
            k: round(spectrum_gap(spectra[k], spectra["heldout"]), 4)
            for k in ("ancestral", "speculative", "train")
        },
        "sw": {k: round(v, 4) for k, v in sw.items()},
        "p_pixels": p_pixels,
        "p_stats": p_stats,
        "p_all": S.bonferroni([p_pixels] + list(p_stats.values())),
        # the same machinery on model vs real crops, to show the test has power where laws differ
        "p_model_vs_heldout": S.two_sample_pvalue(xa, held[:n], seed=seed),
        "test_time_s": time.perf_counter() - t1,
    }


def record(args: argparse.Namespace, runs: Runs, c: dict, argv, total_s: float) -> dict:
    st, anc = runs.spec.stats, runs.anc.stats
    env = common.environment("cpu", __file__, argv)
    return {
        "pipeline": str(P.pipeline_dir().relative_to(ROOT)),
        "num_inference_steps": args.steps,
        "window": args.window,
        "n_samples_per_sampler": args.n,
        "n_reference_crops": args.n_ref,
        "seeds": {"ancestral": args.seed, "speculative": args.seed + 1},
        "channel_stats": c["channel_stats"],
        "radial_power_spectrum": {
            "freq_cycles_per_pixel": [round(float(f), 5) for f in c["freq"]],
            **{k: [float(f"{v:.5g}") for v in s] for k, s in c["spectra"].items()},
        },
        "spectrum_mean_abs_log10_ratio_to_heldout": c["gaps"],
        "sliced_wasserstein": c["sw"],
        "two_sample_speculative_vs_ancestral": {
            "pixels_ks_energy_p": round(c["p_pixels"], 4),
            "per_image_stat_ks_p": {k: round(v, 4) for k, v in c["p_stats"].items()},
            "combined_bonferroni_p": round(c["p_all"], 4),
        },
        "two_sample_ancestral_vs_heldout_p": float(f"{c['p_model_vs_heldout']:.3g}"),
        "speculative_stats": {
            "sequential_target_calls": st.target_calls,
            "target_evals": st.target_evals,
            "ancestral_target_evals": anc.target_evals,
            "wall_time_s": round(st.wall_time, 2),
            "ancestral_wall_time_s": round(anc.wall_time, 2),
        },
        "test_time_s": round(c["test_time_s"], 1),
        "total_time_s": round(total_s, 1),
        **env,
    }


def to_markdown(args: argparse.Namespace, runs: Runs, c: dict, command: str) -> str:
    cstats, gaps, st, anc = c["channel_stats"], c["gaps"], runs.spec.stats, runs.anc.stats
    lines = [
        f"# patches pipeline quality ({args.tag})",
        "",
        f"`{command}`: {args.n} ancestral + {args.n} speculative samples (N = "
        f"{args.steps} DDPM steps, L = {args.window}, frozen-x0 draft) of the packaged "
        f"`DDPMPipeline`, against {args.n_ref} held-out and {args.n_ref} training crops.",
        "",
        "| set | mean R | mean G | mean B | std R | std G | std B | spectrum gap* |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in ("ancestral", "speculative", "heldout", "train"):
        m, s = cstats[k]["mean"], cstats[k]["std"]
        lines.append(
            f"| {k} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {s[0]:.3f} | {s[1]:.3f} "
            f"| {s[2]:.3f} | {gaps.get(k, 0.0):.3f} |"
        )
    lines += [
        "",
        "*mean |log10 ratio| of the radially averaged power spectrum to the held-out one, radii "
        "1..16 (0 = identical; 0.1 = 26% off on average).",
        "",
        "Sliced 1-Wasserstein (pixels): " + ", ".join(f"{k} {v}" for k, v in c["sw"].items()) + ".",
        "",
        f"Two-sample test, speculative vs an independent ancestral run: per-pixel KS + energy "
        f"p = {c['p_pixels']:.3f}; per-image statistics KS "
        + ", ".join(f"{k} {v:.3f}" for k, v in c["p_stats"].items())
        + f"; Bonferroni-combined p = {c['p_all']:.3f}. Same test, ancestral vs held-out crops: "
        f"p = {c['p_model_vs_heldout']:.2g}.",
        "",
        f"Speculative: {st.target_calls} sequential target calls (ancestral {args.steps}), "
        f"{st.target_evals} target evaluations (ancestral {anc.target_evals}); wall "
        f"{st.wall_time:.1f} s vs {anc.wall_time:.1f} s ({args.threads} thread(s), "
        f"shared CPU).",
        "",
        f"![samples and spectra](patches_quality_{args.tag}.png)",
        "",
    ]
    return "\n".join(lines)


def grid(x: torch.Tensor) -> np.ndarray:
    """Up to 8 x 8 images in a grid with a one-pixel white border."""
    rows = min(8, int(np.sqrt(x.shape[0])))
    x = ((x[: rows * rows].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    pad = np.ones((rows * rows, P.CROP + 2, P.CROP + 2, 3))
    pad[:, 1:-1, 1:-1] = x
    return (
        pad.reshape(rows, rows, P.CROP + 2, P.CROP + 2, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * (P.CROP + 2), rows * (P.CROP + 2), 3)
    )


def plot(args: argparse.Namespace, runs: Runs, c: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sets, freq, spectra = runs.sets, c["freq"], c["spectra"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 5.4))
    for ax, (k, title) in zip(
        axes[:3],
        [
            ("ancestral", "ancestral samples"),
            ("speculative", f"speculative samples (L={args.window})"),
            ("heldout", "held-out crops"),
        ],
    ):
        ax.imshow(grid(sets[k]))
        ax.set_title(title)
        ax.axis("off")
    ax = axes[3]
    for k, style in (
        ("heldout", "k-"),
        ("train", "k:"),
        ("ancestral", "C0-"),
        ("speculative", "C1--"),
    ):
        ax.loglog(freq[1:], spectra[k][1:], style, label=k)
    # log-axis minor tick labels overlap at this width: label only the decades' mantissas we set
    ax.set_xticks([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2])
    ax.xaxis.set_major_formatter(
        matplotlib.ticker.FixedFormatter(["1/32", "1/16", "1/8", "1/4", "1/2"])
    )
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("frequency [cycles / pixel]")
    ax.set_ylabel("radially averaged power")
    ax.set_title("power spectrum")
    ax.legend()
    fig.suptitle(
        f"patches DDPMPipeline, N={args.steps}; speculative vs ancestral p = {c['p_all']:.3f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=192, help="samples per sampler (default 192)")
    ap.add_argument("--n-ref", type=int, default=2048, help="held-out / training crops")
    ap.add_argument("--steps", type=int, default=200, help="DDPM sampling steps N (default 200)")
    ap.add_argument("--window", type=int, default=8, help="speculative window L (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", type=str, default="cpu")
    ap.add_argument("--out", type=str, default=str(common.RESULTS), help="output folder")
    args = ap.parse_args(argv)
    for name in ("n", "n_ref", "steps", "window", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = sample(args)
    c = compare(runs, args.n, args.seed)
    res = record(args, runs, c, argv, time.perf_counter() - t0)
    md = to_markdown(args, runs, c, res["command"])
    common.write_results(
        Path(args.out) / f"patches_quality_{args.tag}",
        res,
        md,
        plot=lambda png: plot(args, runs, c, png),
    )
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

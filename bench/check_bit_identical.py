"""Bit-identity proof for refactors: hash every sampler output over a grid of configurations.

    python bench/check_bit_identical.py --out before.json          # on the old tree
    python bench/check_bit_identical.py --out after.json           # on the new tree
    python bench/check_bit_identical.py --compare before.json after.json

Each configuration runs in float64 with a fixed seed; the JSON holds, per configuration, the
SHA-256 of the samples' bytes and of every field of the result's SamplerStats (wall_time excepted:
it is a timing), or "refused: <error type>" when the sampler rejects the configuration. --compare
prints one line per configuration and exits 1 if any hash differs.

Only the public API is imported (``specdiff_kernels`` and ``specdiff_kernels.models``), so the
same script runs on both sides of a move of the package's internal modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import sys
import time

import torch
from torch import nn

# The C++ kernels dispatch on the CPU's instruction sets (read when the package is imported): pin
# the portable variant so that runs on different machines hash the same bytes (the environment
# may override it).
os.environ.setdefault("SPECDIFF_CPU_CAPABILITY", "default")
os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton configs run on CPU tensors

import specdiff_kernels  # noqa: E402
from specdiff_kernels import (  # noqa: E402
    AncestralSampler,
    DraftModelDraft,
    FrozenTargetDraft,
    SpeculativeSampler,
    ddim_transitions,
    ddpm_transitions,
    dpmsolver_sde_transitions,
    euler_ancestral_transitions,
    models,
)

DTYPE = torch.float64
SEED = 20240611


def cosine_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, betas capped at 0.999 (written out here: the
    package's schedule helpers are not public API)."""

    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor(
        [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64
    )
    return torch.cumprod(1 - betas, 0)


class Reparam(nn.Module):
    """An eps network re-expressed as an x0 ("sample") or v network on its own training schedule,
    so the embedded models exercise the sampler's other parametrisations. Integral t only."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, prediction: str):
        super().__init__()
        self.net, self.prediction = net, prediction
        self.register_buffer("abar", alphas_cumprod.to(torch.float64))

    def forward(self, x, t):
        a = self.abar[t.long()].to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        eps = self.net(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return x0 if self.prediction == "sample" else a.sqrt() * eps - (1 - a).sqrt() * x0


def dpmpp_2m_sde(alphas_cumprod, num_inference_steps, **kwargs):
    return dpmsolver_sde_transitions(num_inference_steps, alphas_cumprod=alphas_cumprod, **kwargs)


# name -> (constructor, schedule, keyword arguments). "cos" runs the linear-schedule networks off
# their schedule on purpose: only determinism matters here.
FAMILIES = {
    "ddpm-eps-lin": (ddpm_transitions, "model", {}),
    "ddpm-x0-lin-clip": (ddpm_transitions, "model", {"prediction": "sample", "clip_sample": 1.0}),
    "ddpm-v-cos": (ddpm_transitions, "cos", {"prediction": "v_prediction"}),
    "ddpm-eps-cos-clip-large": (
        ddpm_transitions,
        "cos",
        {"clip_sample": 1.0, "variance": "fixed_large"},
    ),
    "ddim-eta0.6-eps-clip": (ddim_transitions, "model", {"eta": 0.6, "clip_sample": 1.0}),
    "euler-a-eps": (euler_ancestral_transitions, "model", {}),
    "dpmpp-2m-sde-eps": (dpmpp_2m_sde, "model", {}),
    "dpmpp-2m-sde-x0-karras": (
        dpmpp_2m_sde,
        "model",
        {"prediction": "sample", "sigma_schedule": "karras"},
    ),
}
# name -> (model, load kwargs, chains B, steps N, chain ids or None for 0..B-1)
PROBLEMS = {
    "gmm2": ("gmm", {"dim": 2, "components": 3, "seed": 1}, 3, 20, None),
    "gmm16": ("gmm", {"dim": 16, "components": 8, "seed": 2}, 8, 32, list(range(100, 116, 2))),
    "digits": ("digits", {"dtype": DTYPE}, 4, 20, None),
}
# "-warm": the frozen-x0 draft with a warm start (a fixed guess of the first prediction)
DRAFTS = ("frozen-x0", "frozen-eps", "frozen-x0-noprefetch", "frozen-x0-warm", "model")
WINDOWS = (1, 4, 8, "adaptive")
PATHS = ("static", "ragged", "auto")
BACKENDS = ("cpp", "reference")

CONFIGS = (
    [
        (p, f, d, w, path, b)
        for p, f, d, w, path, b in itertools.product(
            PROBLEMS, FAMILIES, DRAFTS, WINDOWS, PATHS, BACKENDS
        )
    ]
    # the ancestral sampler has no draft, window or path
    + [
        (p, f, "-", "-", "ancestral", b)
        for p, f, b in itertools.product(PROBLEMS, FAMILIES, BACKENDS)
    ]
    # Triton kernels run by the interpreter on CPU tensors: slow, so the smallest problem only
    + [
        ("gmm2", f, d, 4, path, "triton")
        for f, d, path in itertools.product(FAMILIES, ("frozen-x0", "frozen-eps"), PATHS[:2])
    ]
)

_models: dict = {}


def networks(problem: str, prediction: str):
    """(target, draft network) of a problem in the given parametrisation, and its schedule."""
    name, kwargs, *_ = PROBLEMS[problem]
    if problem not in _models:
        _models[problem] = models.load(name, **kwargs)
    m = _models[problem]
    if prediction == "epsilon":
        return m.target, m.draft, m.alphas_cumprod
    return (
        Reparam(m.target, m.alphas_cumprod, prediction),
        Reparam(m.draft, m.alphas_cumprod, prediction),
        m.alphas_cumprod,
    )


def make_draft(kind: str, draft_net):
    if kind == "model":
        return DraftModelDraft(draft_net)
    freeze = kind.split("-")[1]
    return FrozenTargetDraft(freeze, prefetch_root=not kind.endswith("noprefetch"))


def warm_guess(draft: str, B: int, event_shape) -> torch.Tensor | None:
    """The warm start of a "-warm" draft: a fixed guess of the first x0-hat, off the data."""
    if not draft.endswith("warm"):
        return None
    g = torch.Generator().manual_seed(SEED + 1)
    return 0.5 * torch.randn(B, *event_shape, generator=g, dtype=DTYPE)


def digest(value) -> str:
    """SHA-256 of a tensor (dtype, shape and raw bytes) or of a number / list / dict (canonical
    JSON; floats in repr form, so exact; NaN spelled out)."""
    h = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    else:
        h.update(json.dumps(value, sort_keys=True, default=lambda v: v.tolist()).encode())
    return h.hexdigest()


def run(problem, family, draft, window, path, backend) -> dict:
    _, _, B, N, chain_ids = PROBLEMS[problem]
    make, schedule, kwargs = FAMILIES[family]
    target, draft_net, abar = networks(problem, kwargs.get("prediction", "epsilon"))
    abar = cosine_alphas_cumprod() if schedule == "cos" else abar
    transitions = make(abar, num_inference_steps=N, **kwargs)
    event_shape = _models[problem].event_shape
    try:
        if path == "ancestral":
            sampler = AncestralSampler(target, transitions, backend=backend, compile=False)
        else:
            sampler = SpeculativeSampler(
                target,
                transitions,
                make_draft(draft, draft_net),
                window=window,
                backend=backend,
                path=path,
                compile=False,
            )
        res = sampler.sample(
            B,
            event_shape,
            generator=torch.Generator().manual_seed(SEED),
            chain_ids=chain_ids,
            dtype=DTYPE,
            **({} if path == "ancestral" else {"warm_start": warm_guess(draft, B, event_shape)}),
        )
    except Exception as err:  # a refused combination is a result too: it must stay refused
        return {"status": f"refused: {type(err).__name__}"}
    out = {"status": "ran", "samples": digest(res.samples)}
    # every stat, the derived ones of as_dict() included; wall_time is a timing
    stats = res.stats.as_dict()
    for key in sorted(stats):
        if key != "wall_time":
            out[f"stats.{key}"] = digest(stats[key])
    # anything else a result might carry (a field added later is hashed, not silently skipped)
    for f in dataclasses.fields(res):
        if f.name not in ("samples", "stats"):
            out[f.name] = digest(getattr(res, f.name))
    return out


def config_name(cfg) -> str:
    return "/".join(str(c) for c in cfg)


def produce(path_out: str) -> None:
    torch.set_num_threads(1)  # one thread: reductions in one order
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    results = {}
    for i, cfg in enumerate(CONFIGS):
        results[config_name(cfg)] = run(*cfg)
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{len(CONFIGS)} configs, {time.perf_counter() - t0:.0f} s", flush=True)
    meta = {
        "specdiff_kernels": specdiff_kernels.__file__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "SPECDIFF_CPU_CAPABILITY": os.environ["SPECDIFF_CPU_CAPABILITY"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path_out)), exist_ok=True)
    with open(path_out, "w") as fh:
        json.dump({"meta": meta, "configs": results}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    refused = sum(r["status"] != "ran" for r in results.values())
    print(
        f"{len(results)} configs ({len(results) - refused} ran, {refused} refused) in "
        f"{meta['seconds']} s -> {path_out}"
    )


def compare(path_a: str, path_b: str) -> int:
    a, b = (json.load(open(p)) for p in (path_a, path_b))
    for key in ("torch", "aten_cpu_capability", "SPECDIFF_CPU_CAPABILITY"):
        if a["meta"].get(key) != b["meta"].get(key):
            print(f"warning: {key} differs: {a['meta'].get(key)} vs {b['meta'].get(key)}")
    ca, cb = a["configs"], b["configs"]
    diffs = []
    width = max(map(len, ca | cb))
    print(f"{'config':<{width}}  {'result':<24}  match")
    for name in sorted(ca | cb):
        ra, rb = ca.get(name), cb.get(name)
        status = "missing" if ra is None or rb is None else ra["status"]
        if ra is None or rb is None:
            bad = ["<config missing in " + (path_a if ra is None else path_b) + ">"]
        else:
            bad = sorted(k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k))
        diffs += [(name, k) for k in bad]
        print(f"{name:<{width}}  {status:<24}  {'DIFFERS' if bad else 'ok'}")
    if not diffs:
        print(f"bit-identical: {len(ca)} configs, every sample and stat hash equal")
        return 0
    print(f"{len({n for n, _ in diffs})} configs differ:")
    for name, field in diffs:
        if name in ca and name in cb:
            field += f"  ({ca[name].get(field)} vs {cb[name].get(field)})"
        print(f"  {name}: {field}")
    return 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the hashes of every configuration to this JSON file")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two such files")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("give --out FILE or --compare A B")
    produce(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

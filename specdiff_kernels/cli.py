"""The ``specdiff`` command line (also ``python -m specdiff_kernels``)."""
from __future__ import annotations

import argparse
import sys

import torch


def cmd_info(args: argparse.Namespace) -> int:
    import specdiff_kernels as sk
    from specdiff_kernels import ops

    print(f"specdiff_kernels {sk.__version__}")
    print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
    print(f"backends: {', '.join(sk.available_backends())}")
    if ops.HAS_CPP:
        info = ops._C.build_info()
        print(f"C++ build: {info['compiler']} [{info['build_type']}] flags '{info['cxx_flags'].strip()}', "
              f"OpenMP {info['openmp']}, SIMD {'/'.join(info['simd']) or 'none'}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    return 0


def _window(value: str):
    if value == "adaptive":
        return value
    try:
        L = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"window must be a positive integer or 'adaptive', got {value!r}")
    if L < 1:
        raise argparse.ArgumentTypeError(f"window must be >= 1, got {L}")
    return L


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model == "langevin":
        from .langevin import run_langevin_demo
        return run_langevin_demo(args)
    from .demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specdiff", description="Exact speculative sampling for diffusion models")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="ancestral vs speculative sampling of an embedded model")
    demo.add_argument("--model", default="digits", choices=["digits", "gmm", "langevin"])
    demo.add_argument("--steps", type=int, default=200, help="sampling steps N")
    demo.add_argument("--window", type=_window, default=8,
                      help="draft window L, or 'adaptive' (per-chain, from its own acceptance)")
    demo.add_argument("--draft", default="frozen-x0", choices=["frozen-x0", "frozen-eps", "model"])
    demo.add_argument("--batch", type=int, default=None,
                      help="chains per sampler (default: 192; langevin: 1000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dim", type=int, default=None,
                      help="dimension of the gmm (default 64) or langevin banana (default 4) model")
    demo.add_argument("--step-size", type=float, default=None, help="langevin step size g (default 0.05)")
    demo.add_argument("--backend", default=None, help="verify backend (default: by device)")
    demo.add_argument("--out", default="out", help="directory for the PNGs and JSON")
    demo.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="version, build and backends")
    info.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

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


def cmd_verify_example(args: argparse.Namespace) -> int:
    """One speculative verify round on random Gaussian windows, each backend side by side."""
    import specdiff_kernels as sk

    g = torch.Generator().manual_seed(args.seed)
    B, L, D = args.batch, args.window, 64
    mq = torch.randn(B, L, D, generator=g)
    mp = mq + 0.15 * torch.randn(B, L, D, generator=g)
    sigma = torch.full((L,), 1.0)
    y = mq + sigma[None, :, None] * torch.randn(B, L, D, generator=g)
    u = torch.rand(B, L, generator=g)
    print(f"speculative_verify on B={B} chains, window L={L}, D={D}")
    for backend in [b for b in sk.available_backends()]:
        res = sk.speculative_verify(y, mq, mp, sigma, u, backend=backend)
        print(f"  {backend:>9}: accepted per chain {res.num_accepted.tolist()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specdiff", description="Exact speculative sampling for diffusion models")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--window", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_verify_example)
    info = sub.add_parser("info", help="version, build and backends")
    info.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

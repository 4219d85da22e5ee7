"""The command lines: ``specdiff`` (also ``python -m specdiff_kernels``) and
``python -m specdiff_kernels.cli.distributed``.

Every argument is checked here, before any model is loaded or any chain sampled: a bad value, or a
flag that does not apply to the chosen model, ends the command with ONE line on stderr,
``specdiff sample: error: argument --flag: ...``, and exit code 2 (no usage block, no traceback).
The same holds for what only loading can tell (weights that do not match their config): exit 2,
naming the flag. A run that fails (a non-finite network output, out of memory) ends with one line
and exit 1; Ctrl-C with ``specdiff sample: interrupted`` and exit 130, after removing what the run
had half-written. The library functions behind the commands take explicit values (no
``or default`` that would turn a 0 into the default).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..argtypes import SEED_MAX, OneLineParser, check_dir, positive_int, seed_int  # noqa: F401
from .policy import add_policy_arguments, check_policy_args

DIFFUSION_MODELS = ("digits", "gmm")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class CommandError(Exception):
    """An input the checks could not see before the run started (weights that do not load): one
    line naming ``option``, exit 2, as an argument error."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


# ----------------------------------------------------------------------------- argument types
def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def eta_float(text: str) -> float:
    """DDIM's eta in (0, 1]: 0 is deterministic (nothing to speculate), and above 1 the step's
    variance can exceed 1 - alpha_bar_prev, where DDIM's direction term has no real value."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def window_arg(text: str):
    if text in ("auto", "adaptive"):
        return text
    try:
        L = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto', a positive integer or 'adaptive', got {text!r}"
        ) from None
    if L < 1:
        raise argparse.ArgumentTypeError(
            f"must be 'auto', a positive integer or 'adaptive', got {L}"
        )
    return L


def device_arg(text: str) -> str:
    """cpu, cuda or cuda:N, refused here when this process cannot use it."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r} is not available: torch.cuda.is_available() is False (use --device cpu)"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not available: this machine has {n} CUDA "
                f"device(s), cuda:0..cuda:{n - 1}"
            )
    return str(dev)


# ----------------------------------------------------------------------------- shared checks
def _not_applicable(args, model: str, flags) -> Optional[str]:
    """``flags``: (option, dest, models it applies to); the first one given for another model."""
    for option, dest, models in flags:
        if getattr(args, dest) is not None and model not in models:
            return (
                f"argument {option}: does not apply to --model {model} "
                f"(only to {', '.join(models)})"
            )
    return None


def _check_steps_window(steps: int, window, max_steps: Optional[int]) -> Optional[str]:
    if max_steps is not None and steps > max_steps:
        return (
            f"argument --steps: must be at most {max_steps} (the model's training timesteps), "
            f"got {steps}"
        )
    if isinstance(window, int) and window > steps:
        return f"argument --window: must be at most --steps ({steps}), got {window}"
    return None


_check_dir = check_dir


def _check_file(option: str, path: str) -> Optional[str]:
    p = Path(path)
    if p.is_dir():
        return f"argument {option}: {path!r} is a directory"
    return _check_dir(option, str(p.parent) if str(p.parent) else ".")


def _check_verify_backend(name: Optional[str], device: str = "cpu") -> Optional[str]:
    if name is None:
        return None
    from ..ops import verify as ops

    try:
        ops.get_backend(name, torch.device(device))
    except (ValueError, RuntimeError) as err:
        return f"argument --backend: {err}"
    return None


def _error(parser: argparse.ArgumentParser, message: Optional[str]) -> None:
    if message is not None:
        parser.error(message)  # prints usage and "error: ...", exits 2


# ----------------------------------------------------------------------------- specdiff info
def cmd_info(args: argparse.Namespace) -> int:
    import specdiff_kernels as sk
    from specdiff_kernels.ops import backends

    print(f"specdiff_kernels {sk.__version__}")
    print(
        f"torch {torch.__version__} (its CPU kernels: "
        f"{torch.backends.cpu.get_cpu_capability()}); CUDA available: {torch.cuda.is_available()}"
    )
    print(f"backends: {', '.join(sk.available_backends())}")
    if backends.HAS_CPP:
        for line in _cpp_info_lines(backends._C.build_info(), backends._C):
            print(line)
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    return 0


def _cpp_info_lines(info: dict, ext) -> list[str]:
    """Two lines on the C++ kernels: how they were compiled (the instruction sets every function
    may use: the compiler's baseline unless the build was tuned, SPECDIFF_NATIVE=1), then the
    instruction set this CPU supports and the variant the kernels dispatch to at run time."""
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    simd = "/".join(info["simd"])
    baseline = simd or ("x86-64 baseline (SSE2)" if x86 else "the compiler's baseline")
    lines = [
        f"C++ build: compiler {info['compiler']} [{info['build_type']}] flags "
        f"'{info['cxx_flags'].strip()}', OpenMP {info['openmp']}; compiled for {baseline}"
        + (", with avx2 and avx512 variants of the kernels picked at run time" if x86 else "")
    ]
    active = ext.cpu_capability()
    if not x86:
        lines.append(f"C++ kernels run the {active} variant (one variant on {platform.machine()})")
        return lines
    supported = ext.supported_cpu_capability()
    env = os.environ.get("SPECDIFF_CPU_CAPABILITY")
    why = (
        f"capped by SPECDIFF_CPU_CAPABILITY={env}"
        if env and active != supported
        else "SPECDIFF_CPU_CAPABILITY=default|avx2 caps it"
    )
    lines.append(
        f"C++ kernels run the {active} variant (the widest this CPU supports: {supported}; {why})"
    )
    return lines


# ----------------------------------------------------------------------------- specdiff demo
# (option, dest, models it applies to); given for another model, the demo refuses to start
DEMO_MODEL_FLAGS = (
    ("--dim", "dim", ("gmm", "langevin")),
    ("--step-size", "step_size", ("langevin",)),
    ("--draft", "draft", DIFFUSION_MODELS),
    ("--max-batch", "max_batch", DIFFUSION_MODELS),
    ("--reps", "reps", DIFFUSION_MODELS),
)
DEMO_DEFAULTS = {
    # 16 digits: a batch at which speculation pays on a CPU (the network is latency-bound there)
    "digits": {"batch": 16, "draft": "frozen-x0", "reps": 5},
    "gmm": {"batch": 192, "draft": "frozen-x0", "dim": 64, "reps": 5},
    "langevin": {"batch": 1000, "dim": 4, "step_size": 0.05},
}


def _per_model_defaults(dest: str) -> str:
    """``digits 16, gmm 192, langevin 1000``: the demo's default of ``dest`` for each model that
    has one (the --help text, so that it cannot drift from DEMO_DEFAULTS)."""
    return ", ".join(f"{m} {d[dest]}" for m, d in DEMO_DEFAULTS.items() if dest in d)


@contextlib.contextmanager
def torch_threads(n: int):
    """Every run of a command on ``n`` intra-op threads (timings compare like with like); the
    caller's count is restored after (the CLI is also called in-process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_demo_args(args: argparse.Namespace) -> Optional[str]:
    """Fill the model's defaults into ``args``; the error message for the first bad argument."""
    from . import memory
    from .output import check_out

    err = _not_applicable(args, args.model, DEMO_MODEL_FLAGS)
    if err:
        return err
    for dest, value in DEMO_DEFAULTS[args.model].items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.model == "langevin" and args.dim < 2:
        return f"argument --dim: the langevin banana target needs at least 2 dimensions, got {args.dim}"
    from .. import models

    max_steps = models.TRAIN_TIMESTEPS if args.model in DIFFUSION_MODELS else None
    size = 64 if args.model == "digits" else args.dim
    act = (
        memory.DIGITS_ACT_BYTES
        if args.model == "digits"
        else memory.GENERIC_ACT_FLOATS_PER_DIM * 4 * size
    )
    return (
        _check_steps_window(args.steps, args.window, max_steps)
        or _check_verify_backend(args.backend, args.device)
        or memory.check_batch(
            args.batch, args.window, args.steps, size, act, args.max_batch, args.device
        )
        or check_out("--out", args.out, args.overwrite)
    )


def cmd_demo(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        if args.model == "langevin":
            from .demo import run_langevin_demo

            return run_langevin_demo(
                seed=args.seed,
                batch=args.batch,
                window=args.window,
                steps=args.steps,
                dim=args.dim,
                step_size=args.step_size,
                backend=args.backend,
                progress=not args.no_progress,
                out=args.out,
                device=args.device,
                overwrite=args.overwrite,
            )
        from .demo import run_demo

        return run_demo(args)


# ----------------------------------------------------------------------------- specdiff policy
def cmd_policy(args: argparse.Namespace) -> int:
    from .policy import run_policy

    with torch_threads(args.threads):
        return run_policy(args)


# ----------------------------------------------------------------------------- specdiff sample
def add_sample_arguments(sample: argparse.ArgumentParser) -> None:
    from ..sampling.families import FAMILIES, NAMES, canonical
    from .sample import EMBEDDED

    sample.add_argument(
        "--pipeline",
        required=True,
        metavar="PATH|" + "|".join(EMBEDDED),
        help="a diffusers save_pretrained folder (unconditional UNet2DModel + "
        "scheduler), or an embedded model: " + ", ".join(EMBEDDED),
    )
    sample.add_argument(
        "--scheduler",
        default=None,
        type=canonical,
        choices=NAMES,
        help="the sampler family (default: the pipeline's own; digits: ddpm; digits-flow: flow-euler): "
        + "; ".join(
            f"{f.name}: {f.label}, "
            + (f"diffusers' {f.scheduler_text}" if f.scheduler else "no diffusers scheduler")
            + (" (rectified-flow models)" if f.flow else "")
            for f in FAMILIES
        ),
    )
    sample.add_argument(
        "--karras",
        action="store_true",
        help="Karras sigmas (use_karras_sigmas, replacing another sigma schedule the scheduler "
        "config names); --scheduler dpm++2m-sde only",
    )
    sample.add_argument(
        "--eta",
        type=eta_float,
        default=None,
        help="DDIM's eta (in (0, 1]; default 1.0); --scheduler ddim only",
    )
    sample.add_argument(
        "--steps", type=positive_int, default=200, help="sampling steps N (default 200)"
    )
    sample.add_argument(
        "--window",
        type=window_arg,
        default="auto",
        help="'auto' (default: chosen per round from the measured cost, ancestral steps where "
        "speculation does not pay), a fixed draft window L (at most N), or 'adaptive'",
    )
    sample.add_argument(
        "--draft",
        default="frozen-x0",
        choices=["frozen-x0", "frozen-eps", "model"],
        help="frozen target (training-free) or the draft network (digits only)",
    )
    sample.add_argument("--batch", type=positive_int, default=16, help="chains (default 16)")
    sample.add_argument(
        "--max-batch",
        type=positive_int,
        default=None,
        help="the most states one network invocation holds (a round's call is made in chunks; "
        "default: the sampler's)",
    )
    sample.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    sample.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="the network's precision; the chains' states stay float32 (float16: CUDA only)",
    )
    sample.add_argument("--seed", type=seed_int, default=0, help="in 0..2^63-1 (default 0)")
    sample.add_argument(
        "--out", default="out", help="directory for samples.png and stats.json (default ./out)"
    )
    sample.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier run in --out (other files are kept)",
    )
    sample.add_argument(
        "--compare",
        action="store_true",
        help="also run the ancestral chain (independent seed): cost table and two-sample p-value",
    )
    sample.add_argument(
        "--reps",
        type=positive_int,
        default=3,
        help="with --compare: warm timed runs of each sampler after the first, interleaved; the "
        "wall times in the table are their medians (default 3)",
    )
    sample.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads for every run (default 1)",
    )
    sample.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def check_sample_args(args: argparse.Namespace) -> Optional[str]:
    """The first bad argument's message; on success ``args.resolved`` holds the checked pipeline
    (its transitions already built, no weights loaded)."""
    from .sample import PipelineError, resolve_pipeline

    if args.dtype == "float16" and args.device == "cpu":
        return (
            "argument --dtype: float16 needs --device cuda (on CPU it is slower than float32 and "
            "some kernels lack it); use float32 or bfloat16 on CPU"
        )
    try:
        spec = resolve_pipeline(
            args.pipeline, args.scheduler, args.steps, args.eta, karras=args.karras
        )
    except PipelineError as err:
        return f"argument {err.option}: {err}"
    if args.draft == "model" and not spec.has_draft_model:
        return (
            "argument --draft: 'model' needs a draft network, which only --pipeline digits "
            "and digits-flow ship; use frozen-x0 or frozen-eps"
        )
    from . import memory
    from .output import check_out

    err = (
        _check_steps_window(args.steps, args.window, None)
        or memory.check_batch(
            args.batch,
            args.window,
            args.steps,
            math.prod(spec.event_shape),
            spec.act_bytes,
            args.max_batch,
            args.device,
        )
        or check_out("--out", args.out, args.overwrite)
    )
    if err is None:
        args.resolved = spec
    return err


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import run_sample

    spec = args.resolved
    del args.resolved
    with torch_threads(args.threads):
        return run_sample(args, spec)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = OneLineParser(
        prog="specdiff",
        description="Exact speculative sampling for diffusion models.",
        epilog="python -m specdiff_kernels runs the same commands; every flag: docs/cli.md.",
    )
    p.add_argument("--version", action="version", version=f"specdiff_kernels {__version__}")
    sub = p.add_subparsers(
        dest="command",
        required=True,
        title="commands",
        metavar="COMMAND",
        help="'specdiff COMMAND --help' lists its flags",
    )
    demo = sub.add_parser(
        "demo",
        help="ancestral vs speculative sampling of a shipped model, side by side",
        description="Ancestral vs speculative sampling of a shipped model (digits, gmm) or "
        "speculative Langevin (langevin), side by side: prints the cost table (sequential target "
        "calls, evaluations, acceptance, wall time) and a two-sample test; writes "
        "demo_<model>_samples.png, demo_<model>_acceptance.png and demo_<model>_stats.json to "
        "--out.",
    )
    demo.add_argument(
        "--model",
        default="digits",
        choices=["digits", "gmm", "langevin"],
        help="the digits DDPM (default), the Gaussian mixture with its exact denoiser, or "
        "speculative Langevin on a banana target",
    )
    demo.add_argument(
        "--steps", type=positive_int, default=200, help="sampling steps N (default 200)"
    )
    demo.add_argument(
        "--window",
        type=window_arg,
        default="auto",
        help="'auto' (default: chosen per round from the measured cost), a fixed draft window "
        "L (at most N), or 'adaptive' (per-chain, from its own acceptance)",
    )
    demo.add_argument(
        "--draft",
        default=None,
        choices=["frozen-x0", "frozen-eps", "model"],
        help="digits, gmm: the frozen target (training-free) or the draft network "
        "(default frozen-x0)",
    )
    demo.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        help="chains per sampler (default: " + _per_model_defaults("batch") + ")",
    )
    demo.add_argument(
        "--max-batch",
        type=positive_int,
        default=None,
        help="digits, gmm: the most states one network invocation holds (default: the sampler's)",
    )
    demo.add_argument("--seed", type=seed_int, default=0, help="in 0..2^63-1 (default 0)")
    demo.add_argument(
        "--dim",
        type=positive_int,
        default=None,
        help="gmm, langevin: the dimension (default: "
        + _per_model_defaults("dim")
        + "; langevin: at least 2)",
    )
    demo.add_argument(
        "--step-size",
        type=positive_float,
        default=None,
        help=f"langevin: the ULA step size g (default {DEMO_DEFAULTS['langevin']['step_size']})",
    )
    demo.add_argument(
        "--backend",
        default=None,
        help="verify backend: reference, cpp or triton (default: by device)",
    )
    demo.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    demo.add_argument(
        "--out", default="out", help="directory for the PNGs and JSON (default ./out)"
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier run in --out (other files are kept)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    demo.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads for every run (default 1: two threads slow down many times "
        "when another process is busy on a 2-core machine)",
    )
    demo.add_argument(
        "--reps",
        type=positive_int,
        default=None,
        help="digits, gmm: warm timed runs of each sampler after the first, interleaved; the "
        "wall times printed are their medians (default 5)",
    )
    demo.set_defaults(func=cmd_demo, check=check_demo_args)
    sample = sub.add_parser(
        "sample",
        help="speculative sampling of a diffusers pipeline folder or a shipped model",
        description="Speculative sampling of a diffusers pipeline folder (an unconditional "
        "UNet2DModel with its scheduler) or a shipped model (digits, patches): writes "
        "samples.png and stats.json to --out; --compare also runs the ancestral chain and "
        "prints the cost table and a two-sample test.",
    )
    add_sample_arguments(sample)
    sample.set_defaults(func=cmd_sample, check=check_sample_args)
    policy = sub.add_parser(
        "policy",
        help="the pusht diffusion policy in closed loop (success, calls and wall-clock per chunk)",
        description="The shipped pusht diffusion policy (Diffusion Policy on gym-pusht, state "
        "observations) in closed loop with a chosen sampler: runs --episodes episodes "
        "vectorised, then times the planner at batch 1 next to the ancestral DDPM-100 "
        "baseline; prints success +- s.e., coverage, sequential network calls and evaluations "
        "per action chunk, wall-clock per chunk and the control rate; writes "
        "policy_pusht.json and policy_pusht.png (the rollouts) to --out. Needs the [policy] "
        "extra (gym-pusht).",
    )
    add_policy_arguments(policy)
    policy.set_defaults(func=cmd_policy, check=check_policy_args)
    info = sub.add_parser(
        "info",
        help="versions, the C++ build and the available backends",
        description="Prints the version, torch and CUDA, the available verify backends, the C++ "
        "build (compiler, flags, OpenMP, the instruction sets it was compiled for), the "
        "instruction-set variant the C++ kernels run on this CPU, and the Triton version.",
    )
    info.set_defaults(func=cmd_info, check=None)
    p.subcommands = {"demo": demo, "sample": sample, "policy": policy, "info": info}
    return p


def _fail(prog: str, message: str, code: int) -> int:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"{prog}: error: {first}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    prog = parser.prog
    if not (sys.argv[1:] if argv is None else argv):
        # a bare ``specdiff``: the usage with the commands, as argparse's missing-argument error
        # (stderr, exit 2), rather than one line naming a COMMAND it does not list
        parser.print_help(sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
        try:  # a bad SPECDIFF_CPU_CAPABILITY: one line and exit 2, before anything runs
            from ..ops.backends import check_cpu_capability

            check_cpu_capability()
        except ValueError as err:
            parser.error(str(err))
        prog = parser.subcommands[args.command].prog
        check, func = args.check, args.func
        del args.check, args.func
        if check is not None:
            _error(parser.subcommands[args.command], check(args))
        return _run(func, args, parser.subcommands[args.command])
    except KeyboardInterrupt:
        # the run has removed what it half-wrote (output.RunOutput); a traceback says nothing here
        _close_progress_bars()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _close_progress_bars() -> None:
    """End an open tqdm bar's line, so that the message after it starts a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        bar.close()


def _run(func, args, parser) -> int:
    """``func(args)``; an input only the run could judge is an argument error (exit 2), a failed
    run one line and exit 1. Anything else is a bug and keeps its traceback."""
    from ..sampling.base import NonFiniteError
    from .sample import PipelineError

    try:
        return func(args)
    except (CommandError, PipelineError) as err:
        _error(parser, f"argument {err.option}: {err}")
    except NonFiniteError as err:
        return _fail(parser.prog, err, 1)
    except (MemoryError, torch.OutOfMemoryError) as err:
        return _fail(
            parser.prog,
            f"out of memory ({type(err).__name__}); use a smaller --batch or --max-batch",
            1,
        )


# ----------------------------------------------------------------------------- distributed
DIST_MODEL_FLAGS = (("--dim", "dim", ("gmm", "banana")), ("--step-size", "step_size", ("banana",)))
DIST_DEFAULTS = {"dim": 64, "step_size": 0.05}


def build_distributed_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m specdiff_kernels.cli.distributed",
        description="Sample many chains across torchrun processes (gloo on "
        "CPU, nccl on GPU); the union is the same for any "
        "number of ranks.",
    )
    p.add_argument(
        "--model",
        default="gmm",
        choices=["gmm", "digits", "banana"],
        help="embedded diffusion model (gmm, digits) or 'banana' (speculative Langevin)",
    )
    p.add_argument(
        "--dim", type=positive_int, default=None, help="dimension (gmm, banana; default 64)"
    )
    p.add_argument("--chains", type=positive_int, default=1024, help="total chains over all ranks")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument(
        "--window",
        type=window_arg,
        default=8,
        help="window L (default 8: a chain's result does not depend on its rank), 'auto' or "
        "'adaptive'",
    )
    p.add_argument(
        "--draft",
        default="frozen",
        choices=["frozen", "model"],
        help="frozen target (training-free) or the model's draft network "
        "(banana: a surrogate gradient)",
    )
    p.add_argument("--sampler", default="speculative", choices=["speculative", "ancestral"])
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument(
        "--step-size",
        type=positive_float,
        default=None,
        help="banana: ULA step size (default 0.05)",
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=["gloo", "nccl", "mpi", "ucc"],
        help="process-group backend (default: nccl with CUDA, else gloo)",
    )
    p.add_argument("--out", default=None, help="rank 0 saves {samples, chain_ids, stats} here")
    p.add_argument(
        "--per-rank-dir", default=None, help="each rank writes rank{r}.pt here instead of gathering"
    )
    return p


def check_distributed_args(args: argparse.Namespace) -> Optional[str]:
    err = _not_applicable(args, args.model, DIST_MODEL_FLAGS)
    if err:
        return err
    for dest, value in DIST_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.model == "banana" and args.dim < 2:
        return f"argument --dim: the banana target needs at least 2 dimensions, got {args.dim}"
    if args.out is not None and args.per_rank_dir is not None:
        return "argument --out: not allowed with --per-rank-dir (ranks then write their own files)"
    from .. import models
    from . import memory

    max_steps = None if args.model == "banana" else models.TRAIN_TIMESTEPS
    err = _check_steps_window(args.steps, args.window, max_steps)
    if err is None:
        # each rank holds its share of the chains; the ranks of one machine share its memory
        size = 64 if args.model == "digits" else args.dim
        act = (
            memory.DIGITS_ACT_BYTES
            if args.model == "digits"
            else memory.GENERIC_ACT_FLOATS_PER_DIM * 4 * size
        )
        device = "cuda" if torch.cuda.is_available() and args.backend != "gloo" else "cpu"
        err = memory.check_batch(
            args.chains, args.window, args.steps, size, act, None, device, option="--chains"
        )
    if err is None and args.out is not None:
        err = _check_file("--out", args.out)
    if err is None and args.per_rank_dir is not None:
        err = _check_dir("--per-rank-dir", args.per_rank_dir)
    return err


def build_distributed_sampler(args, device):
    """(sampler, event_shape) for the checked arguments of ``python -m specdiff_kernels.cli.distributed``."""
    from ..sampling.ancestral import AncestralSampler
    from ..sampling.drafts import DraftModelDraft, FrozenTargetDraft
    from ..sampling.sampler import SpeculativeSampler

    if args.model == "banana":
        from ..sampling.langevin import (
            LangevinSampler,
            SpeculativeLangevin,
            banana_energy,
            banana_grad,
        )

        if args.sampler == "ancestral":
            return LangevinSampler(
                banana_energy(), step_size=args.step_size, num_steps=args.steps
            ), (args.dim,)
        draft = "frozen" if args.draft == "frozen" else banana_grad(b=0.0)
        return SpeculativeLangevin(
            banana_energy(),
            step_size=args.step_size,
            num_steps=args.steps,
            window=args.window,
            draft=draft,
        ), (args.dim,)
    from ..models import load

    kw = {"dim": args.dim} if args.model == "gmm" else {"device": device}
    m = load(args.model, **kw)
    target = m.target.to(device)
    T = m.transitions(args.steps)
    if args.sampler == "ancestral":
        return AncestralSampler(target, T), m.event_shape
    draft = (
        FrozenTargetDraft("x0") if args.draft == "frozen" else DraftModelDraft(m.draft.to(device))
    )
    return SpeculativeSampler(target, T, draft, args.window), m.event_shape


def distributed_main(argv: Optional[list] = None) -> int:
    try:
        return _distributed_main(argv)
    except KeyboardInterrupt:
        print("python -m specdiff_kernels.cli.distributed: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _distributed_main(argv: Optional[list]) -> int:
    import torch.distributed as dist

    from ..sampling.distributed import sample_distributed

    parser = build_distributed_parser()
    args = parser.parse_args(argv)
    try:  # a bad SPECDIFF_CPU_CAPABILITY: one line and exit 2, as specdiff's
        from ..ops.backends import check_cpu_capability

        check_cpu_capability()
    except ValueError as err:
        parser.error(str(err))
    _error(parser, check_distributed_args(args))
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    own_group = False
    if launched and not dist.is_initialized():
        backend = (
            args.backend
            if args.backend is not None
            else ("nccl" if torch.cuda.is_available() else "gloo")
        )
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
        own_group = True
    try:
        distributed = dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        world = dist.get_world_size() if distributed else 1
        if distributed and dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        sampler, event_shape = build_distributed_sampler(args, device)
        dtype = getattr(torch, args.dtype)
        t0 = time.perf_counter()
        res = sample_distributed(
            sampler,
            args.chains,
            event_shape,
            seed=args.seed,
            dtype=dtype,
            device=device,
            gather=args.per_rank_dir is None,
            out_dir=args.per_rank_dir,
        )
        wall = time.perf_counter() - t0
        if rank == 0:
            st = res.stats
            if args.per_rank_dir is None and st is not None:
                print(
                    f"{args.model}: {args.chains} chains on {world} rank(s), {args.steps} steps, "
                    f"window {args.window}, {args.sampler}: sequential target calls (max over "
                    f"ranks) {st.target_calls}, summed {res.total_target_calls}; target evals "
                    f"{st.target_evals}; acceptance {st.acceptance_rate:.3f}; wall {wall:.2f}s"
                )
            else:
                print(
                    f"rank 0 wrote its shard of {len(res.chain_ids)} chains to {args.per_rank_dir}"
                )
            if args.out is not None and args.per_rank_dir is None:
                torch.save(
                    {
                        "samples": res.samples.cpu(),
                        "chain_ids": res.chain_ids,
                        "stats": st,
                        "world_size": world,
                        "args": vars(args),
                    },
                    args.out,
                )
        return 0
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

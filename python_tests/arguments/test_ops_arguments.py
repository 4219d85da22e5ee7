"""Every dispatcher entry point of ``torch.ops.specdiff`` refuses arguments it cannot compute with,
before allocating: one argument on another device (meta here; CUDA where there is one) or of a
dtype outside the op's contract gives a one-line error that names the op and the argument.

A meta tensor among CPU tensors dispatches to the op's Meta kernel (the fake registered for
torch.compile), not to the CPU kernel: the fakes check what the kernels check. The CPU kernels are
also called directly (redispatch to the CPU key) and the Triton launchers directly (they are the
CUDA kernels; here interpreted on CPU tensors), since those entries are reached without the fakes.
An all-meta call still works: it is what torch.compile traces.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from round_cases import make_case
from verify_cases import make_window

import specdiff_kernels  # noqa: F401  (registers the C++ ops and their fakes)
from specdiff_kernels.ops import backends, layout, round_spec
from specdiff_kernels.ops import round as ro

try:  # registers the specdiff::triton_* ops (interpreted on CPU: conftest sets TRITON_INTERPRET)
    from specdiff_kernels.ops.triton import round as triton_round
    from specdiff_kernels.ops.triton import verify as triton_verify

    HAS_TRITON_OPS = True
except ImportError:  # pragma: no cover - triton not installed
    HAS_TRITON_OPS = False

if not backends.HAS_CPP:  # pragma: no cover
    pytest.skip("the C++ extension is not built", allow_module_level=True)

B, L, E = 2, 3, (5,)
N_ROUND = 40  # steps of round_cases' dpm2m_sde family


# ---------------------------------------------------------------- valid arguments of every op
def _verify_args(name: str) -> tuple:
    gen = torch.Generator().manual_seed(7)
    y, mq, mp, sigma, u = make_window(B, L, E, torch.float32, gen)
    n = torch.tensor([L, 1], dtype=torch.int64)
    return {
        "speculative_verify": (y, mq, mp, sigma, u, n),
        "gaussian_log_ratio": (y, mq, mp, sigma),
        "reflect_resample": (y[:, 0], mq[:, 0], mp[:, 0]),
        "first_rejection": (torch.randn(B, L, generator=gen), u, n),
    }[name]


def _round_case():
    # a multistep family: the round ops' calls carry their optional prev, checked like the rest
    case = make_case(B, L, E, torch.float32, "dpm2m_sde", layout.FREEZE_X0, torch.Generator())
    case.steps = torch.tensor([0, 5], dtype=torch.int64)
    case.lengths = torch.tensor([L, 1], dtype=torch.int64)
    return case


def _round_args(name: str) -> tuple:
    case = _round_case()
    if name == "chain_noise":
        return (case.seed, case.chain_ids, case.steps, L, math.prod(E), torch.float32)
    if name == "frozen_draft":
        return case.draft_flat()
    if name == "verify_frozen":
        Y = ro.frozen_draft(*case.draft_args())
        return case.verify_flat(Y, Y + 0.01)
    assert name == "round_stats"
    gen = torch.Generator().manual_seed(3)
    stats = torch.zeros(layout.StatsLayout(L, N_ROUND, B).size, dtype=torch.int64)
    stats[layout.STAT_BAD_OUTPUT] = stats[layout.STAT_BAD_RATIO] = layout.NO_BAD
    n = case.lengths
    na = torch.tensor([1, 1], dtype=torch.int64)
    committed = na + (na < n).long()
    lr = torch.randn(B, L, generator=gen)
    out = torch.randn(B, L + 1, *E, generator=gen)
    return (stats, case.steps, n, na, committed, lr, out, N_ROUND)


def valid_args(op_name: str) -> tuple:
    base = op_name.removeprefix("triton_")
    if base in backends.FAMILIES["verify"]:
        return _verify_args(base)
    return _round_args(base)


def specdiff_ops() -> list[str]:
    """Every op of the specdiff namespace in this process (C++-defined and Triton)."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::")[1] for n in names if n.startswith("specdiff::"))


def op_of(name: str):
    return getattr(torch.ops.specdiff, name).default


def tensor_params(name: str) -> list[tuple[int, str]]:
    """(position, name) of the op's tensor arguments, from its schema."""
    args = op_of(name)._schema.arguments
    return [(i, a.name) for i, a in enumerate(args) if "Tensor" in str(a.type)]


# dtypes outside each argument's contract (the C++ schemas' comments and ops/_checks.py):
# states share one floating dtype (float16 among float32 states is refused); sigma, uniforms and
# log ratios may be any floating dtype; verify's lengths any integer dtype; the round ops' indices
# and the seed int64; the coefficient table float64.
BAD_DTYPES = {
    "draft_states": (torch.int32, torch.float16),
    "draft_means": (torch.int32, torch.float16),
    "target_means": (torch.int32, torch.float16),
    "draft_state": (torch.int32, torch.float16),
    "draft_mean": (torch.int32, torch.float16),
    "target_mean": (torch.int32, torch.float16),
    "sigma": (torch.int32,),
    "uniforms": (torch.int64,),
    "log_ratio": (torch.int32,),
    "root": (torch.int32, torch.float16),
    "frozen": (torch.int32, torch.float16),
    "states": (torch.int32, torch.float16),
    "x0_hat": (torch.int32, torch.float16),
    "prev": (torch.int32, torch.float16),
    "coef": (torch.float32,),
    "seed": (torch.int32,),
    "chain_ids": (torch.int32,),
    "steps": (torch.int32,),
    "stats": (torch.int32,),
    "num_accepted": (torch.int32,),
    "committed": (torch.int32,),
    "output": (torch.int32,),
}
VERIFY_LENGTHS_BAD = (torch.float32, torch.bool)
ROUND_LENGTHS_BAD = (torch.int32,)


def bad_dtypes(op_name: str, arg: str) -> tuple:
    if arg == "lengths":
        verify = op_name.removeprefix("triton_") in backends.FAMILIES["verify"]
        return VERIFY_LENGTHS_BAD if verify else ROUND_LENGTHS_BAD
    return BAD_DTYPES[arg]


OPS = specdiff_ops()
CPP_OPS = [n for n in OPS if not n.startswith("triton_")]
ARG_PARAMS = [(op, i, arg) for op in OPS for i, arg in tensor_params(op)]
CPP_ARG_PARAMS = [p for p in ARG_PARAMS if p[0] in CPP_OPS]
DTYPE_PARAMS = [(op, i, arg, dt) for op, i, arg in ARG_PARAMS for dt in bad_dtypes(op, arg)]


def _ids(p) -> str:
    return "-".join(str(x).replace("torch.", "") for x in p)


def replaced(args: tuple, i: int, value) -> tuple:
    return args[:i] + (value,) + args[i + 1 :]


def assert_refused(fn, op_name: str, arg: str) -> None:
    """fn() raises a one-line error naming the op and the argument."""
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        fn()
    msg = str(info.value).strip()
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert re.search(rf"\b{arg}\b", msg), f"does not name {arg}: {msg!r}"
    assert op_name.removeprefix("triton_") in msg, f"does not name the op: {msg!r}"


def outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


# ---------------------------------------------------------------- tests
def test_every_op_is_covered():
    """A new op without valid arguments here fails this test (rather than going unchecked)."""
    expected = {
        "chain_noise",
        "first_rejection",
        "frozen_draft",
        "gaussian_log_ratio",
        "reflect_resample",
        "round_stats",
        "speculative_verify",
        "verify_frozen",
    }
    assert set(CPP_OPS) == expected
    if HAS_TRITON_OPS:
        expected |= {
            f"triton_{n}" for n in (*backends.FAMILIES["verify"], *backends.FAMILIES["round"])
        }
    assert set(OPS) == expected
    for name in OPS:
        assert tensor_params(name), name
        for _, arg in tensor_params(name):
            assert bad_dtypes(name, arg)


@pytest.mark.parametrize("op_name", OPS)
def test_valid_call_works(op_name):
    out = outputs(op_of(op_name)(*valid_args(op_name)))
    assert out and all(t.device.type == "cpu" for t in out)
    assert all(torch.isfinite(t.float()).all() for t in out if t.dtype.is_floating_point)


@pytest.mark.parametrize("op_name,i,arg", ARG_PARAMS, ids=map(_ids, ARG_PARAMS))
def test_meta_argument_is_refused(op_name, i, arg):
    args = valid_args(op_name)
    assert_refused(lambda: op_of(op_name)(*replaced(args, i, args[i].to("meta"))), op_name, arg)


@pytest.mark.parametrize("op_name,i,arg,dtype", DTYPE_PARAMS, ids=map(_ids, DTYPE_PARAMS))
def test_wrong_dtype_is_refused(op_name, i, arg, dtype):
    args = valid_args(op_name)
    assert_refused(lambda: op_of(op_name)(*replaced(args, i, args[i].to(dtype))), op_name, arg)


@pytest.mark.parametrize("op_name,i,arg,dtype", DTYPE_PARAMS, ids=map(_ids, DTYPE_PARAMS))
def test_wrong_dtype_is_refused_on_meta(op_name, i, arg, dtype):
    """The fakes (what torch.compile traces with) refuse what the kernels refuse."""
    args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in valid_args(op_name))
    assert_refused(lambda: op_of(op_name)(*replaced(args, i, args[i].to(dtype))), op_name, arg)


@pytest.mark.parametrize("op_name", OPS)
def test_all_meta_call_matches_the_kernel(op_name):
    """All-meta arguments run the fake: outputs of the kernel's shapes and dtypes, on meta."""
    args = valid_args(op_name)
    want = outputs(op_of(op_name)(*args))
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    got = outputs(op_of(op_name)(*meta))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.device.type == "meta"
        assert (g.shape, g.dtype) == (w.shape, w.dtype)


@pytest.mark.parametrize("op_name,i,arg", CPP_ARG_PARAMS, ids=map(_ids, CPP_ARG_PARAMS))
def test_cpu_kernel_refuses_meta_argument(op_name, i, arg):
    """The C++ kernel itself (redispatched to the CPU key, past the Meta kernel) refuses too."""
    args = valid_args(op_name)
    bad = replaced(args, i, args[i].to("meta"))
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    assert_refused(lambda: op_of(op_name).redispatch(keys, *bad), op_name, arg)


def test_chain_noise_refuses_a_dtype_without_a_kernel():
    args = valid_args("chain_noise")
    for name in ["chain_noise"] + (["triton_chain_noise"] if HAS_TRITON_OPS else []):
        for dtype in (torch.int32, torch.float8_e4m3fn, torch.complex64):
            assert_refused(lambda: op_of(name)(*replaced(args, 5, dtype)), name, "dtype")
            meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
            assert_refused(lambda: op_of(name)(*replaced(meta, 5, dtype)), name, "dtype")


@pytest.mark.parametrize("op_name,i,arg", CPP_ARG_PARAMS, ids=map(_ids, CPP_ARG_PARAMS))
def test_cuda_argument_is_refused(op_name, i, arg):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device for a real tensor on another device")
    args = valid_args(op_name)
    assert_refused(lambda: op_of(op_name)(*replaced(args, i, args[i].to("cuda"))), op_name, arg)


# ---------------------------------------------------------------- Triton launchers
def _launchers() -> dict:
    """Each Triton launcher, called with its op's flat schema arguments."""
    if not HAS_TRITON_OPS:
        return {}
    return {
        "speculative_verify": triton_verify.speculative_verify,
        "gaussian_log_ratio": triton_verify.gaussian_log_ratio,
        "reflect_resample": triton_verify.reflect_resample,
        "first_rejection": triton_verify.first_rejection,
        "chain_noise": triton_round.chain_noise,
        "frozen_draft": lambda *a: triton_round.frozen_draft(*round_spec.draft_parts(*a)),
        "verify_frozen": lambda *a: triton_round.verify_frozen(*round_spec.verify_parts(*a)),
    }


LAUNCHERS = _launchers()


LAUNCHER_PARAMS = [(name, i, arg) for name in LAUNCHERS for i, arg in tensor_params(name)]


@pytest.mark.skipif(not HAS_TRITON_OPS, reason="triton is not installed")
@pytest.mark.parametrize("op_name,i,arg", LAUNCHER_PARAMS, ids=map(_ids, LAUNCHER_PARAMS))
def test_triton_launcher_refuses_meta_argument(op_name, i, arg):
    """The launchers are the CUDA kernels of the specdiff::* ops (a CUDA tensor among CPU ones
    reaches them, past the fakes): they check devices themselves."""
    args = valid_args(op_name)
    bad = replaced(args, i, args[i].to("meta"))
    assert_refused(lambda: LAUNCHERS[op_name](*bad), op_name, arg)


@pytest.mark.skipif(not HAS_TRITON_OPS, reason="triton is not installed")
def test_round_stats_cuda_kernel_checks_devices():
    """round_stats' CUDA kernel is a Python composition (registered for the CUDA key)."""
    args = valid_args("round_stats")
    kernel = ro.round_stats_cuda
    for i, arg in tensor_params("round_stats"):
        assert_refused(lambda: kernel(*replaced(args, i, args[i].to("meta"))), "round_stats", arg)


# ---------------------------------------------------------------- SPECDIFF_CPU_CAPABILITY
CAPABILITY_MSG = "SPECDIFF_CPU_CAPABILITY must be one of default, avx2, avx512, got 'avx9000'"


def _run(argv):
    env = dict(os.environ, SPECDIFF_CPU_CAPABILITY="avx9000")
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [["info"], ["demo", "--model", "gmm"]])
def test_bad_cpu_capability_cli_is_one_line_exit_2(command):
    r = _run([sys.executable, "-m", "specdiff_kernels", *command])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"specdiff: error: {CAPABILITY_MSG}"]
    assert r.stdout == ""


LIBRARY_SCRIPT = """
import torch
import specdiff_kernels as sk
from specdiff_kernels.ops import backends
x = torch.zeros(1, 1, 2)
for call in (
    lambda: sk.speculative_verify(x, x, x, 1.0, torch.zeros(1, 1)),
    lambda: torch.ops.specdiff.reflect_resample(x[:, 0], x[:, 0], x[:, 0] + 1),
    backends.cpu_capabilities,
):
    try:
        call()
        print("no error")
    except (ValueError, RuntimeError) as err:
        print(type(err).__name__, "|", str(err).strip().replace(chr(10), "<newline>"))
"""


def test_bad_cpu_capability_library_error_is_one_line():
    """The library imports (an import error would print a traceback even from the CLI); the first
    use of the C++ backend, by the public ops, the raw op or the backend query, is refused with
    one line; never a silent fallback."""
    r = _run([sys.executable, "-c", LIBRARY_SCRIPT])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == f"ValueError | {CAPABILITY_MSG}"
    assert lines[1].startswith("RuntimeError | ") and lines[1].endswith(CAPABILITY_MSG)
    assert lines[2] == f"ValueError | {CAPABILITY_MSG}"
    assert r.stderr == ""

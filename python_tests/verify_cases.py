"""Shared input generation and comparison helpers for the verify-op test suites."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import zlib

import torch

from specdiff_kernels import VerifyResult
from specdiff_kernels.ops.reference import verify as reference

# Accumulation tolerance, relative to the sum of absolute terms: fp32 accumulation for every
# narrower dtype, fp64 for fp64 inputs.
ACC_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def stable_seed(*key) -> int:
    """A seed from test parameters that does not change between processes (unlike hash())."""
    return zlib.crc32(repr(key).encode()) & 0x7FFFFFFF


def make_window(
    B: int,
    L: int,
    event: tuple[int, ...],
    dtype: torch.dtype,
    gen: torch.Generator,
    sigma_scale: float = 0.7,
):
    """Random window inputs with a mix of accepted and rejected steps.

    The mean gap per step is ||d|| / s = c with c log-uniform in [0.2, 4], so acceptance
    probabilities 2 Phi(-c/2) range from ~0.92 down to ~0.05.
    """
    D = math.prod(event)
    shape = (B, L, *event)
    mq = torch.randn(shape, generator=gen, dtype=torch.float64)
    sigma = sigma_scale * (0.5 + torch.rand(B, L, generator=gen, dtype=torch.float64))
    c = torch.exp(
        torch.empty(B, L, dtype=torch.float64).uniform_(math.log(0.2), math.log(4.0), generator=gen)
    )
    per = (sigma * c / math.sqrt(D)).view(B, L, *([1] * len(event)))
    mp = mq + per * torch.randn(shape, generator=gen, dtype=torch.float64)
    y = mq + sigma.view(B, L, *([1] * len(event))) * torch.randn(
        shape, generator=gen, dtype=torch.float64
    )
    u = torch.rand(B, L, generator=gen, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return (
        cast(y),
        cast(mq),
        cast(mp),
        sigma.to(torch.float32 if dtype != torch.float64 else dtype),
        u.to(torch.float32 if dtype != torch.float64 else dtype),
    )


def log_ratio_tolerance(y, mq, mp, sigma, dtype) -> torch.Tensor:
    """Per-step absolute tolerance for log ratios: ACC_RTOL x (sum |d r| + |d|^2 / 2) / s^2."""
    B, L = y.shape[:2]
    y64, q64, p64 = (t.reshape(B, L, -1).double() for t in (y, mq, mp))
    d = p64 - q64
    r = y64 - q64
    mag = (d * r).abs().sum(-1) + 0.5 * (d * d).sum(-1)
    s = sigma.double().expand(B, L)
    return ACC_RTOL[dtype] * mag / (s * s) + 1e-30


def reference64(y, mq, mp, sigma, u, lengths=None):
    """The oracle: the reference backend on the same (already rounded) inputs, in float64."""
    return VerifyResult(
        *reference.speculative_verify(
            y.double(), mq.double(), mp.double(), sigma.double(), u.double(), lengths
        )
    )


# ---- docs/design.md §3 step 3 transcribed literally, one chain and one step at a time, in float64 Python
# loops; written apart from ``specdiff_kernels.ops.reference.verify`` so that they can check the reference too.
def log_ratio_loop(y, mq, mp, sigma):
    """[B, L] float64: (<d, r> - |d|^2 / 2) / s^2, d = mp - mq, r = y - mq."""
    B, L = y.shape[:2]
    Y, MQ, MP = (t.double().reshape(B, L, -1) for t in (y, mq, mp))
    S = torch.as_tensor(sigma).double().expand(B, L)
    lr = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for j in range(L):
            d = MP[b, j] - MQ[b, j]
            r = Y[b, j] - MQ[b, j]
            lr[b, j] = (float(torch.dot(d, r)) - float(torch.dot(d, d)) / 2) / float(S[b, j]) ** 2
    return lr


def first_rejection_loop(lr, u, lengths=None):
    """[B] int64: the first j < n with a non-finite ratio or log(u_j) > ratio_j, else n."""
    B, L = lr.shape
    n = [L] * B if lengths is None else [int(v) for v in lengths]
    out = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        out[b] = n[b]
        for j in range(n[b]):
            ratio, uj = float(lr[b, j]), float(u[b, j])
            log_u = math.log(uj) if uj > 0 else -math.inf
            if not (math.isfinite(ratio) and log_u <= ratio):
                out[b] = j
                break
    return out


def reflect_loop(y, mq, mp):
    """[B, D] float64: mp + (I - 2 e e^T)(y - mq), e = d / |d| (the second form of docs/design.md §3); y
    where d = 0."""
    B = y.shape[0]
    Y, MQ, MP = (t.double().reshape(B, -1) for t in (y, mq, mp))
    out = Y.clone()
    for b in range(B):
        d = MP[b] - MQ[b]
        norm = float(torch.linalg.vector_norm(d))
        if norm > 0:
            e = d / norm
            r = Y[b] - MQ[b]
            out[b] = MP[b] + r - 2 * float(torch.dot(e, r)) * e
    return out


def spec_loop(y, mq, mp, sigma, u, lengths=None) -> VerifyResult:
    """The fused verify by the loops above: (num_accepted, next_state [float64], log_ratio
    [float64])."""
    B, L = y.shape[:2]
    lr = log_ratio_loop(y, mq, mp, sigma)
    nacc = first_rejection_loop(lr, u, lengths)
    n = torch.full((B,), L) if lengths is None else lengths.to(torch.int64)
    rows = torch.arange(B)
    rejected = nacc < n
    j = torch.where(rejected, nacc, n - 1)
    state = torch.where(
        rejected[:, None],
        reflect_loop(y[rows, j], mq[rows, j], mp[rows, j]),
        y[rows, j].double().reshape(B, -1),
    )
    return VerifyResult(nacc, state.reshape(B, *y.shape[2:]), lr)


def assert_decisions_match(got_acc, ref_acc, lr_ref64, u, tol):
    """Accept counts equal the reference's except where the decisive step sits on the threshold."""
    margin = (torch.log(u.double()) - lr_ref64).abs()
    for b in torch.nonzero(got_acc != ref_acc).flatten().tolist():
        m = int(min(got_acc[b], ref_acc[b]))
        assert margin[b, m] <= 4 * tol[b, m], (
            f"chain {b}: accepted {int(got_acc[b])} vs reference {int(ref_acc[b])}, and step {m} "
            f"is not within rounding of the threshold (margin {float(margin[b, m]):.3g}, "
            f"tol {float(tol[b, m]):.3g})"
        )


def assert_state_close(got, ref64, y_decisive, dtype):
    """next_state vs the float64 reference: output rounding plus accumulation error of the
    reflection coefficient (which scales |x - y| = |c d|)."""
    got64 = got.double()
    eps = torch.finfo(dtype).eps
    subnormal = torch.finfo(dtype).tiny * eps  # spacing of the dtype near zero
    tol = (
        eps * ref64.abs()
        + subnormal
        + 10 * ACC_RTOL[dtype] * (y_decisive.double().abs() + (ref64 - y_decisive.double()).abs())
    )
    err = (got64 - ref64).abs()
    bad = err > tol + 1e-300
    assert not bool(bad.any()), (
        f"next_state differs from the float64 reference at {int(bad.sum())} elements; worst "
        f"error {float(err.max()):.3g}, worst relative error "
        f"{float((err / (ref64.abs() + 1e-30)).max()):.3g}"
    )


def assert_verify_matches_reference(got, y, mq, mp, sigma, u, lengths, dtype, oracle="reference"):
    """A fused-verify result (any device) against the float64 oracle on the same rounded inputs
    (``oracle``: ``"reference"``, the reference backend in float64, or ``"spec_loop"``, the
    literal loop above, for small cases): output dtypes and shapes, log ratios within accumulation
    tolerance, accept decisions (up to threshold ties), the next state, and y_n bit-for-bit for
    fully accepted chains. Returns the oracle's result."""
    y, mq, mp, sigma, u = (t.cpu() for t in (y, mq, mp, sigma, u))
    n = None if lengths is None else lengths.cpu()
    nacc, state, lr = (t.cpu() for t in got)
    B, L = y.shape[:2]
    assert nacc.dtype == torch.int64 and nacc.shape == (B,)
    assert state.dtype == dtype and state.shape == (B, *y.shape[2:])
    assert lr.dtype == torch.float32 and lr.shape == (B, L)
    if oracle == "spec_loop":
        ref = spec_loop(y, mq, mp, sigma, u, n)
        lr64 = ref.log_ratio
    else:
        ref = reference64(y, mq, mp, sigma, u, n)
        lr64 = reference._log_ratio_acc(y.double(), mq.double(), mp.double(), sigma.double())
    tol = log_ratio_tolerance(y, mq, mp, sigma, dtype)
    lr_err = (lr.double() - lr64).abs()
    assert bool((lr_err <= tol + torch.finfo(torch.float32).eps * lr64.abs()).all()), (
        f"log ratio relative error too large: {float((lr_err / (lr64.abs() + 1e-30)).max()):.3g}"
    )
    assert_decisions_match(nacc, ref.num_accepted, lr64, u, tol)
    same = nacc == ref.num_accepted
    nn = torch.full((B,), L) if n is None else n.to(torch.int64)
    j = torch.where(ref.num_accepted < nn, ref.num_accepted, nn - 1)
    y_dec = y[torch.arange(B), j]
    assert_state_close(state[same], ref.next_state[same], y_dec[same], dtype)
    all_acc = same & (ref.num_accepted == nn)
    assert torch.equal(state[all_acc], y_dec[all_acc]), "all accepted: y_n bit-for-bit"
    return ref


# The ahead-of-time (no GPU) checks of the Triton kernels run a script in a subprocess without
# TRITON_INTERPRET. Where a script says "# @AOT_STANDIN@", a stand-in driver reports an sm_90
# target (the script's T) and 132 SMs, so Inductor's tracing and Triton's mutation analysis run
# on a CPU machine, under a FakeTensorMode ``mode``; ``trace_hops(f, *args)`` returns the forward
# graph AOTAutograd makes of ``f`` and its triton kernel HOPs.
AOT_STANDIN = """class _Driver:
    def get_current_target(self):
        return T
triton.runtime.driver.set_active(_Driver())
import specdiff_kernels.ops.triton._launch as _launch
_launch._num_sms_of = lambda t, i: 132
import warnings
from torch._subclasses import FakeTensorMode
from functorch.compile import aot_function
mode = FakeTensorMode(allow_non_fake_inputs=True)

def trace_hops(f, *args):
    graphs = []
    def fw(gm, ins):
        graphs.append(gm)
        return gm
    with mode, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            aot_function(f, fw_compiler=fw)(*args)
        except RuntimeError as err:  # a CPU-only torch cannot run the fake graph; tracing is done
            if "not linked with support for cuda" not in str(err) or not graphs:
                raise
    gm = graphs[0]
    return gm, [nd for nd in gm.graph.nodes if "triton_kernel_wrapper" in str(nd.target)]
"""


def run_aot_script(script: str, cwd, ok_marker: str) -> None:
    """Run an AOT check script (see AOT_STANDIN) and assert it printed ``ok_marker``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = textwrap.dedent(script).replace("# @AOT_STANDIN@\n", AOT_STANDIN)
    proc = subprocess.run(
        [sys.executable, "-c", src], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and ok_marker in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-6000:]
    )


def poison_empty(monkeypatch) -> None:
    """Allocations made while patched start as NaN / -7: a kernel's outputs must be written in
    full to pass a comparison."""
    orig_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = orig_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)

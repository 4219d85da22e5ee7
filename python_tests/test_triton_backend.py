"""Triton-specific tests: both launch strategies forced, odd sizes, B=1 with a large event, L=1,
lengths (and its in-kernel clamp), poisoned outputs, the launch rule, opcheck and
torch.compile(fullgraph=True) on the interpreted CPU path, and an ahead-of-time check of the
compiled (GPU) path that needs no GPU.

The backend-agnostic suite (test_ops.py) runs on backend="triton" too. Here everything runs on CPU
tensors through the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small.
Dtypes: fp32 and fp64, plus fp16 (the interpreter computes it through numpy's float16 and the
kernels upcast to fp32 before any arithmetic). bf16 has no numpy type, so bf16 runs on GPU only:
test_gpu.py covers bf16 and fp16 on CUDA, and the AOT check below compiles the bf16 kernels for sm_90.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import verify_cases as vc  # noqa: E402

import specdiff_kernels as sk  # noqa: E402
from specdiff_kernels.ops import backends  # noqa: E402
from specdiff_kernels.ops import verify as ops  # noqa: E402
from specdiff_kernels.ops.reference import verify as reference

tk = pytest.importorskip("specdiff_kernels.ops.triton.verify")

if not tk.INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True
    )

DEVICE = "cpu" if tk.INTERPRET else "cuda"
STRATEGIES = ["per_chain", "split"]
DTYPES = [torch.float32, torch.float64, torch.float16]
ROOT = Path(__file__).resolve().parents[1]

verify_op = torch.ops.specdiff.triton_speculative_verify.default
log_ratio_op = torch.ops.specdiff.triton_gaussian_log_ratio.default
reflect_op = torch.ops.specdiff.triton_reflect_resample.default
first_rej_op = torch.ops.specdiff.triton_first_rejection.default


def _window(B, L, E, dtype, seed_key, sigma_form="full"):
    gen = torch.Generator().manual_seed(vc.stable_seed(*seed_key))
    y, mq, mp, sigma, u = vc.make_window(B, L, E, dtype, gen)
    sigma = {
        "full": sigma,
        "window": sigma[0].contiguous(),
        "scalar": sigma[0, 0],
        "chain": sigma[:, :1].contiguous(),
    }[sigma_form]
    return gen, [t.to(DEVICE) for t in (y, mq, mp, sigma, u)]


def _check_verify(got, y, mq, mp, sigma, u, n, dtype):
    """Compare a fused-verify result with the float64 reference on the same rounded inputs."""
    return vc.assert_verify_matches_reference(got, y, mq, mp, sigma, u, n, dtype)


# ---------------------------------------------------------------- both strategies, forced
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,L,E,sigma_form",
    [
        (3, 4, (123,), "full"),  # D not a multiple of the block
        (2, 3, (5, 123), "window"),  # several blocks (and split chunks), ragged tail
        (4, 1, (7,), "scalar"),  # L = 1
        (5, 2, (1,), "chain"),  # D = 1, sigma [B, 1]
    ],
)
def test_verify_matches_reference(strategy, dtype, B, L, E, sigma_form):
    gen, (y, mq, mp, sigma, u) = _window(B, L, E, dtype, (strategy, dtype, B, L, E), sigma_form)
    got = verify_op(y, mq, mp, sigma, u, None, strategy)
    _check_verify(got, y, mq, mp, sigma, u, None, dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_b1_large_event(strategy):
    """The B=1 latency case: one chain, a large event (2^14 elements), many blocks and chunks."""
    dtype = torch.float32
    _, (y, mq, mp, sigma, u) = _window(1, 4, (1 << 14,), dtype, ("b1", strategy))
    if strategy == "split":  # the split really spreads the row over several chunks here
        assert -(-(1 << 14) // tk.split_chunk(1, 4, 1 << 14, tk.num_sms(y.device))) > 1
    got = verify_op(y, mq, mp, sigma, u, None, strategy)
    _check_verify(got, y, mq, mp, sigma, u, None, dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lengths(strategy, dtype):
    B, L = 6, 5
    gen, (y, mq, mp, sigma, u) = _window(B, L, (3, 11), dtype, ("n", strategy, dtype))
    n = torch.tensor([1, 5, 2, 3, 5, 4], dtype=torch.int32, device=DEVICE)
    got = verify_op(y, mq, mp, sigma, u, n, strategy)
    _check_verify(got, y, mq, mp, sigma, u, n, dtype)
    # later steps never matter: make them certain rejections, they must change nothing
    mp2 = mp.clone()
    for b in range(B):
        mp2[b, int(n[b]) :] += 100.0
    got2 = verify_op(y, mq, mp2, sigma, u, n, strategy)
    assert torch.equal(got2[0], got[0]) and torch.equal(got2[1], got[1])
    assert torch.equal(got2[2][:, :1], got[2][:, :1])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lengths_clamped_in_kernel(strategy):
    """The op does not validate lengths on device (no host sync): out-of-range values are
    clamped into 1..L in-kernel. (The public API rejects them on CPU before the kernel.)"""
    B, L = 4, 3
    _, (y, mq, mp, sigma, u) = _window(B, L, (9,), torch.float32, ("clamp", strategy))
    bad = torch.tensor([0, -5, 4, 99], device=DEVICE)
    got = verify_op(y, mq, mp, sigma, u, bad, strategy)
    want = verify_op(y, mq, mp, sigma, u, bad.clamp(1, L), strategy)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_agree_on_decisions(strategy):
    """Per-chain and split sum in different orders; decisions agree away from the threshold."""
    dtype = torch.float32
    gen, (y, mq, mp, sigma, u) = _window(16, 6, (3, 17), dtype, ("agree",))
    n = torch.randint(1, 7, (16,), generator=gen).to(DEVICE)
    other = "split" if strategy == "per_chain" else "per_chain"
    a, b = verify_op(y, mq, mp, sigma, u, n, strategy), verify_op(y, mq, mp, sigma, u, n, other)
    tol = vc.log_ratio_tolerance(y.cpu(), mq.cpu(), mp.cpu(), sigma.cpu(), dtype)
    vc.assert_decisions_match(a[0].cpu(), b[0].cpu(), a[2].cpu().double(), u.cpu(), tol)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- edge values
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_edge_values(strategy):
    """u = 0 accepts any finite ratio; b = 0 (p = q) gives log ratio 0 and is accepted; a
    non-finite log ratio is a rejection whose reflected state is non-finite, like the reference."""
    B, L, D = 4, 3, 10
    _, (y, mq, mp, sigma, u) = _window(B, L, (D,), torch.float32, ("edge", strategy))
    mp = mq.clone()
    mp[0] += 5.0  # chain 0: huge gap but u = 0 -> all accepted
    u = u.clone()
    u[0] = 0.0
    mp[1, 1, 4] = float("nan")  # chain 1: NaN at step 1
    mp[2, 0, 0] = float("inf")  # chain 2: inf at step 0
    mp[3, 2] += 50.0  # chain 3: p = q at steps 0, 1; certain rejection at 2
    got = verify_op(y, mq, mp, sigma, u, None, strategy)
    ref = vc.reference64(*(t.cpu() for t in (y, mq, mp, sigma, u)))
    assert got[0].cpu().tolist() == ref.num_accepted.tolist() == [3, 1, 0, 2]
    torch.testing.assert_close(
        got[2].cpu()[:, :], ref.log_ratio.float(), equal_nan=True, rtol=1e-5, atol=1e-4
    )
    assert got[2][3, 0] == 0 and got[2][3, 1] == 0
    assert torch.equal(got[1][0], y[0, -1])
    assert bool(torch.isnan(got[1][1]).any()) and not bool(torch.isfinite(got[1][2]).all())
    vc.assert_state_close(got[1][3:].cpu(), ref.next_state[3:], y[3:, 2].cpu(), torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_poisoned_outputs_are_fully_written(strategy, monkeypatch):
    """Every element of every output (and the split partial buffer) is written by the kernels:
    allocations made during the call are filled with NaN / -7 first."""
    B, L, E = 3, 4, (2, 150)
    _, (y, mq, mp, sigma, u) = _window(B, L, E, torch.float32, ("poison", strategy))
    n = torch.tensor([4, 1, 2], device=DEVICE)
    vc.poison_empty(monkeypatch)
    got = verify_op(y, mq, mp, sigma, u, n, strategy)
    lr = log_ratio_op(y, mq, mp, sigma, strategy)
    rr = reflect_op(y[:, 1].contiguous(), mq[:, 1].contiguous(), mp[:, 1].contiguous(), strategy)
    fr = first_rej_op(lr, u, n)
    monkeypatch.undo()
    for t in (*got, lr, rr):
        assert bool(torch.isfinite(t).all())
    assert bool(((fr >= 0) & (fr <= 4)).all()) and torch.equal(fr, got[0])
    _check_verify(got, y, mq, mp, sigma, u, n, torch.float32)


# ---------------------------------------------------------------- standalone ops
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_log_ratio_and_reflect(strategy, dtype):
    B, L, E = 3, 2, (3, 41)
    _, (y, mq, mp, sigma, u) = _window(B, L, E, dtype, ("parts", strategy, dtype))
    lr = log_ratio_op(y, mq, mp, sigma, strategy).cpu()
    lr64 = reference._log_ratio_acc(*(t.cpu().double() for t in (y, mq, mp, sigma)))
    tol = vc.log_ratio_tolerance(*(t.cpu() for t in (y, mq, mp, sigma)), dtype)
    assert lr.dtype == torch.float32 and bool(
        ((lr.double() - lr64).abs() <= tol + 1.2e-7 * lr64.abs()).all()
    )
    ys, qs, ps = y[:, 1].contiguous(), mq[:, 1].contiguous(), mp[:, 1].contiguous()
    ps[0] = qs[0]  # d = 0: the identity, never a division by zero
    rr = reflect_op(ys, qs, ps, strategy)
    assert rr.dtype == dtype and rr.shape == ys.shape
    rr64 = reference.reflect_resample(ys.cpu().double(), qs.cpu().double(), ps.cpu().double())
    vc.assert_state_close(rr.cpu(), rr64, ys.cpu(), dtype)
    assert torch.equal(rr[0], ys[0])


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_first_rejection(lr_dtype):
    gen = torch.Generator().manual_seed(21)
    B, L = 37, 40  # > one block of chains, > one column tile
    lr = (torch.randn(B, L, generator=gen) * 2).to(lr_dtype)
    u = torch.rand(B, L, generator=gen, dtype=torch.float64)
    lr[3, 5] = float("nan")
    lr[4, 0] = float("inf")
    lr[5, :] = float("-inf")
    u[6, :] = 0.0
    n = torch.randint(1, L + 1, (B,), generator=gen).to(torch.int16)
    for args in ((lr, u, None), (lr, u, n)):
        got = first_rej_op(*(None if a is None else a.to(DEVICE) for a in args))
        assert torch.equal(got.cpu(), reference.first_rejection(*args))
    # strided (non-contiguous) inputs are read through their strides
    lr_t = lr.t().contiguous().t()
    u_t = u.t().contiguous().t()
    assert not lr_t.is_contiguous()
    assert torch.equal(
        first_rej_op(lr_t.to(DEVICE), u_t.to(DEVICE), None).cpu(), reference.first_rejection(lr, u)
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_inputs(strategy):
    """Transposed event dims and every other window step (strided views of all inputs, sigma and
    uniforms included) against the float64 oracles on the same views: whatever the launcher does
    with the strides, the result must be the views' verify."""
    _, (y, mq, mp, sigma, u) = _window(5, 8, (6, 10), torch.float32, ("nc", strategy))
    yt, qt, pt = (t.transpose(2, 3)[:, ::2] for t in (y, mq, mp))  # [B, 4, 10, 6] views
    st, ut = sigma[:, ::2], u[:, ::2]
    assert not any(t.is_contiguous() for t in (yt, qt, pt, st, ut))
    n = torch.tensor([4, 1, 3, 2, 4], device=DEVICE)
    got = verify_op(yt, qt, pt, st, ut, n, strategy)
    vc.assert_verify_matches_reference(
        got, yt, qt, pt, st, ut, n, torch.float32, oracle="spec_loop"
    )
    lr = log_ratio_op(yt, qt, pt, st, strategy).cpu()
    lr64 = vc.log_ratio_loop(*(t.cpu() for t in (yt, qt, pt, st)))
    tol = (
        vc.log_ratio_tolerance(*(t.cpu() for t in (yt, qt, pt, st)), torch.float32)
        + 1.2e-7 * lr64.abs()
    )
    assert bool(((lr.double() - lr64).abs() <= tol).all())
    y1, q1, p1 = yt[:, 1], qt[:, 1], pt[:, 1]
    rr = reflect_op(y1, q1, p1, strategy)
    vc.assert_state_close(
        rr.cpu(),
        vc.reflect_loop(y1.cpu(), q1.cpu(), p1.cpu()).reshape(rr.shape),
        y1.cpu(),
        torch.float32,
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_batch(strategy):
    _, (y, mq, mp, sigma, u) = _window(2, 3, (4,), torch.float32, ("empty",))
    nacc, state, lr = verify_op(y[:0], mq[:0], mp[:0], sigma[:0], u[:0], None, strategy)
    assert nacc.shape == (0,) and state.shape == (0, 4) and lr.shape == (0, 3)
    assert reflect_op(y[:0, 0], mq[:0, 0], mp[:0, 0], strategy).shape == (0, 4)


# ---------------------------------------------------------------- the launch rule
def test_strategy_rule():
    sms = 132
    rule = functools.partial(tk.choose_strategy, sms=sms)
    assert rule(1024, 8, 3 * 64 * 64) == "per_chain"  # many chains
    assert rule(132, 16, 3 * 256 * 256) == "per_chain"  # one chain per SM already fills it
    assert rule(1, 4, 1024) == "per_chain"  # tiny window
    assert rule(1, 8, 3 * 256 * 256) == "split"  # the B=1 latency case
    assert rule(8, 16, 3 * 256 * 256) == "split"
    # split's extra launch pays only for long windows (>= 8 MiB read per chain)
    assert rule(64, 8, 3 * 64 * 64) == "per_chain"
    assert rule(1, 4, 3 * 256 * 256, elt=4) == "split"  # 9.4 MB read
    assert rule(1, 4, 3 * 256 * 256, elt=2) == "per_chain"  # 4.7 MB read
    for B, L, D in [(1, 4, 3072), (1, 16, 196608), (256, 16, 196608), (7, 3, 1 << 20)]:
        c = tk.split_chunk(B, L, D, sms)
        assert c & (c - 1) == 0 and tk._CHUNK_MIN <= c <= tk._CHUNK_MAX
    with pytest.raises(ValueError, match="strategy must be"):
        _, (y, mq, mp, sigma, u) = _window(1, 1, (3,), torch.float32, ("bad",))
        verify_op(y, mq, mp, sigma, u, None, "warp-speed")


def test_backend_registration():
    assert "triton" in sk.available_backends()
    backend = ops.get_backend("triton", torch.device(DEVICE))
    assert backend.devices == (("cpu", "cuda") if tk.INTERPRET else ("cuda",))
    assert backends.default_backend(torch.device("cuda")) == "triton"
    for name in ("gaussian_log_ratio", "first_rejection", "reflect_resample", "speculative_verify"):
        if backends.HAS_CPP:  # the C++-defined op has a CUDA kernel, and it is Triton
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"specdiff::{name}", "CUDA")
        assert hasattr(torch.ops.specdiff, f"triton_{name}")


# ---------------------------------------------------------------- torch.library integration
def _samples():
    _, (y, mq, mp, sigma, u) = _window(3, 4, (2, 5), torch.float32, ("opcheck",))
    n = torch.tensor([4, 2, 1], device=DEVICE)
    lr = reference.gaussian_log_ratio(y, mq, mp, sigma)
    y0, q0, p0 = (t[:, 0].contiguous() for t in (y, mq, mp))
    return y, mq, mp, sigma, u, n, lr, y0, q0, p0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_opcheck(strategy):
    y, mq, mp, sigma, u, n, lr, y0, q0, p0 = _samples()
    torch.library.opcheck(verify_op, (y, mq, mp, sigma, u, n, strategy))
    torch.library.opcheck(verify_op, (y, mq, mp, sigma[0], u, None, strategy))
    torch.library.opcheck(log_ratio_op, (y, mq, mp, sigma, strategy))
    torch.library.opcheck(reflect_op, (y0, q0, p0, strategy))
    if strategy == "split":
        torch.library.opcheck(first_rej_op, (lr, u, n))


def test_torch_compile_fullgraph_all_ops():
    """One compiled function calling every Triton-backed op: no graph break (fullgraph=True) and
    results that match the docs/design.md §3 loops (not the eager call: in interpreted mode the ops are
    opaque, so compiled and eager run the same kernels)."""
    torch._dynamo.reset()
    y, mq, mp, sigma, u, n, lr, y0, q0, p0 = _samples()

    def f(y, mq, mp, sigma, u, n, y0, q0, p0):
        res = sk.speculative_verify(y, mq, mp, sigma, u, n, backend="triton")
        lr = sk.gaussian_log_ratio(y, mq, mp, sigma, backend="triton")
        fr = sk.first_rejection(lr, u, n, backend="triton")
        rr = sk.reflect_resample(y0, q0, p0, backend="triton")
        return res.num_accepted, res.next_state * 1.0, res.log_ratio, lr, fr, rr

    nacc, state, lr_f, lr, fr, rr = torch.compile(f, fullgraph=True)(
        y, mq, mp, sigma, u, n, y0, q0, p0
    )
    cpu = [t.cpu() for t in (y, mq, mp, sigma, u, n, y0, q0, p0)]
    yc, qc, pc, sc, uc, nc, y0c, q0c, p0c = cpu
    vc.assert_verify_matches_reference(
        (nacc, state, lr_f), yc, qc, pc, sc, uc, nc, torch.float32, oracle="spec_loop"
    )
    lr64 = vc.log_ratio_loop(yc, qc, pc, sc)
    tol = vc.log_ratio_tolerance(yc, qc, pc, sc, torch.float32) + 1.2e-7 * lr64.abs()
    assert bool(((lr.cpu().double() - lr64).abs() <= tol).all())
    assert torch.equal(fr.cpu(), vc.first_rejection_loop(lr.cpu(), uc, nc))
    vc.assert_state_close(
        rr.cpu(), vc.reflect_loop(y0c, q0c, p0c).reshape(rr.shape), y0c, torch.float32
    )


# ---------------------------------------------------------------- the compiled path, without GPU
_AOT_SCRIPT = r"""
import os, sys, warnings
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from specdiff_kernels.ops.triton import verify as tk
assert not tk.INTERPRET and tk.DEVICES == ("cuda",)
T = GPUTarget("cuda", 90, 32)

def compile_(fn, sig, consts, **opts):
    # as at launch on real tensors: 16-byte aligned pointers, D (and CHUNK) divisible by 16
    names = list(sig)
    div = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
           if sig[a].startswith("*") or a in ("D", "CHUNK")}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts,
                    attrs=div)
    return triton.compile(src, target=T, options=opts)

# 1. every kernel (every mode, bf16 included) compiles to a cubin for sm_90
win = lambda dt: dict(y_ptr=f"*{dt}", mq_ptr=f"*{dt}", mp_ptr=f"*{dt}")
for dt, acc in (("bf16", False), ("fp16", False), ("fp32", False), ("fp64", True)):
    part = "*fp64" if acc else "*fp32"
    k = compile_(tk._split_partials_raw, {**win(dt), "part_ptr": part, "D": "i32", "CHUNK": "i32",
                 "NB": "i32"}, dict(ACC_FP64=acc, BLOCK_D=1024, NUM_STAGES=3), num_warps=4, num_stages=3)
    assert "cp.async" in k.asm["ptx"]  # NUM_STAGES=3 really pipelines the streaming loads
    for mode, has_n in ((0, False), (1, False), (2, True)) if dt in ("bf16", "fp32") else ((2, False),):
        io = dict(sig_ptr="*fp32", u_ptr="*fp32", n_ptr="*i64", nacc_ptr="*i64", out_ptr=f"*{dt}",
                  lr_ptr="*fp32")
        k = compile_(tk._per_chain_raw, {**win(dt), **io, "L": "i32", "D": "i32", "sig_sb": "i32",
                     "sig_sl": "i32", "B_BUCKET": "i32"},
                     dict(MODE=mode, HAS_N=has_n, ACC_FP64=acc, BLOCK_D=4096, NUM_STAGES=1), num_warps=8)
        assert "cubin" in k.asm
        compile_(tk._split_finalize_raw, {**win(dt), "part_ptr": part, **io, "L": "i32", "D": "i32",
                 "NB": "i32", "sig_sb": "i32", "sig_sl": "i32"},
                 dict(MODE=mode, HAS_N=has_n, ACC_FP64=acc, BLOCK_NB=1 if mode else 64, BLOCK_D=2048),
                 num_warps=4, num_stages=1)
compile_(tk._first_rejection_raw, dict(lr_ptr="*fp32", u_ptr="*fp32", n_ptr="*i32", out_ptr="*i64",
         B="i32", L="i32", lr_sb="i32", lr_sl="i32", u_sb="i32", u_sl="i32"),
         dict(HAS_N=True, CMP_FP64=False, BLOCK_B=128, BLOCK_L=16))

# 2. what Inductor sees: AOTAutograd decomposes the triton_ops into triton kernel HOPs, and Triton's
#    own mutation analysis (run for sm_90 by a stand-in driver) finds that only outputs and the
#    partial buffer are written: no input is cloned or mutated.
# @AOT_STANDIN@
with mode:
    y = torch.empty(1, 8, 3, 256, 256, device="cuda", dtype=torch.bfloat16)  # 9.4 MB: auto = split
    y0 = torch.empty(1, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    u = torch.empty(1, 8, device="cuda"); s = torch.empty(8, device="cuda")
    n = torch.empty(1, dtype=torch.int32, device="cuda")

def f(y, u, s, n, y0):
    a = torch.ops.specdiff.triton_speculative_verify(y, y, y, s, u, n)          # auto: split
    b = torch.ops.specdiff.triton_speculative_verify(y, y, y, s, u, None, "per_chain")
    c = torch.ops.specdiff.triton_reflect_resample(y0, y0, y0)
    d = torch.ops.specdiff.triton_first_rejection(a[2], u, n)
    e = torch.ops.specdiff.triton_gaussian_log_ratio(y, y, y, s, "split")
    return a, b, c, d, e

gm, hops = trace_hops(f, y, u, s, n, y0)
assert len(hops) == 7, len(hops)  # split 2 + per_chain 1 + reflect 1 + first_rejection 1 + split 2
outputs = {"part_ptr", "nacc_ptr", "out_ptr", "lr_ptr"}
for nd in hops:
    clone = set(nd.kwargs["tensors_to_clone"])
    assert clone and clone <= outputs, clone
assert not any(nd.op == "call_function" and "copy_" in str(nd.target) for nd in gm.graph.nodes)
print("AOT-OK", len(hops))
"""


@pytest.mark.skipif(
    not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
    reason="Triton's NVIDIA backend (ptxas) is not installed",
)
def test_compiled_path_without_gpu():
    """Ahead-of-time check of the GPU path on a CPU machine, in a subprocess without
    TRITON_INTERPRET: the kernels compile to sm_90 cubins (fp16/bf16/fp32/fp64), and the
    triton_ops decompose for Inductor into kernel calls that write only their outputs."""
    vc.run_aot_script(_AOT_SCRIPT, ROOT, "AOT-OK")

"""The verify ops on every available backend against the float64 reference (docs/design.md §3, §4).

One suite for all backends: C++ (CPU) and, where importable, Triton (interpreted on CPU, so it gets
interpreter-sized shapes). Properties run on the reference too.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from verify_cases import (
    assert_decisions_match,
    assert_state_close,
    assert_verify_matches_reference,
    first_rejection_loop,
    log_ratio_loop,
    log_ratio_tolerance,
    make_window,
    reflect_loop,
    stable_seed,
)

import specdiff_kernels as sk
from specdiff_kernels.ops.reference import verify as reference

KERNEL_BACKENDS = [b for b in sk.available_backends() if b != "reference"]
ALL_BACKENDS = ["reference"] + KERNEL_BACKENDS
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Elements per input tensor that each backend is exercised with (the Triton interpreter is slow).
MAX_ELEMS = {"cpp": 1 << 23, "triton": 1 << 13}
TRITON_DTYPES = (
    torch.float16,
    torch.float32,
    torch.float64,
)  # no bf16 arithmetic in the interpreter


def _supported(backend, dtype, numel=0):
    """bf16 Triton arithmetic runs on GPU only (test_gpu.py covers it); each backend gets
    the sizes its CPU execution can afford (the interpreter is slow)."""
    if backend == "triton" and dtype not in TRITON_DTYPES:
        return False
    return numel <= MAX_ELEMS.get(backend, 1 << 30)


def _poison_heap(*shapes_dtypes):
    """Fill and free blocks the size of the outputs, so memory an op forgot to write holds NaN
    or garbage rather than zeros."""
    blocks = [
        torch.full(s, float("nan") if d.is_floating_point else -7, dtype=d)
        for s, d in shapes_dtypes
    ]
    del blocks
    gc.collect()


SHAPES = [
    (B, L, E)
    for B in (1, 3, 64)
    for L in (1, 2, 8, 17)
    for E in ((1,), (7,), (3, 5, 7), (4096,), (1 << 16,))
]
FUSED_CASES = [
    pytest.param(
        backend, dtype, B, L, E, id=f"{backend}-{str(dtype)[6:]}-B{B}-L{L}-E{'x'.join(map(str, E))}"
    )
    for backend in KERNEL_BACKENDS
    for dtype in DTYPES
    for (B, L, E) in SHAPES
    if _supported(backend, dtype, B * L * math.prod(E))
]


@pytest.mark.parametrize("backend,dtype,B,L,E", FUSED_CASES)
def test_fused_matches_reference(backend, dtype, B, L, E):
    gen = torch.Generator().manual_seed(stable_seed(B, L, E, str(dtype)))
    y, mq, mp, sigma, u = make_window(B, L, E, dtype, gen)
    n = torch.randint(1, L + 1, (B,), generator=gen) if L > 1 else None
    _poison_heap(((B, *E), dtype), ((B, L), torch.float32), ((B,), torch.int64))
    got = sk.speculative_verify(y, mq, mp, sigma, u, n, backend=backend)
    ref = assert_verify_matches_reference(got, y, mq, mp, sigma, u, n, dtype)
    nn = torch.full((B,), L) if n is None else n
    # the mix of outcomes makes the comparison meaningful
    if B * L >= 64:
        assert 0 < int((ref.num_accepted < nn).sum()) < B


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,L,E", [(3, 8, (3, 5, 7)), (64, 2, (4096,)), (1, 17, (1 << 16,))])
def test_cpp_matches_reference_per_capability(cpu_capability, dtype, B, L, E):
    """The fused op and the parts on each instruction-set variant of the C++ kernels."""
    gen = torch.Generator().manual_seed(stable_seed(B, L, E, str(dtype), cpu_capability))
    y, mq, mp, sigma, u = make_window(B, L, E, dtype, gen)
    n = torch.randint(1, L + 1, (B,), generator=gen)
    _poison_heap(((B, *E), dtype), ((B, L), torch.float32), ((B,), torch.int64))
    got = sk.speculative_verify(y, mq, mp, sigma, u, n, backend="cpp")
    assert_verify_matches_reference(got, y, mq, mp, sigma, u, n, dtype)
    lr = sk.gaussian_log_ratio(y, mq, mp, sigma, backend="cpp")
    lr64 = reference._log_ratio_acc(y.double(), mq.double(), mp.double(), sigma.double())
    tol = log_ratio_tolerance(y, mq, mp, sigma, dtype) + 1.2e-7 * lr64.abs()
    assert bool(((lr.double() - lr64).abs() <= tol).all())
    rr = sk.reflect_resample(y[:, 0], mq[:, 0], mp[:, 0], backend="cpp")
    rr_ref = reference.reflect_resample(y[:, 0].double(), mq[:, 0].double(), mp[:, 0].double())
    assert_state_close(rr, rr_ref, y[:, 0], dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parts_match_reference(backend, dtype):
    if not _supported(backend, dtype):
        pytest.skip("bf16 Triton arithmetic runs on GPU only (covered by test_gpu.py)")
    gen = torch.Generator().manual_seed(7)
    B, L, E = 5, 6, (5, 123)
    y, mq, mp, sigma, u = make_window(B, L, E, dtype, gen)
    lr = sk.gaussian_log_ratio(y, mq, mp, sigma, backend=backend)
    lr64 = reference._log_ratio_acc(y.double(), mq.double(), mp.double(), sigma.double())
    tol = log_ratio_tolerance(y, mq, mp, sigma, dtype) + 1.2e-7 * lr64.abs()
    assert bool(((lr.double() - lr64).abs() <= tol).all())

    n = torch.tensor([1, 6, 3, 2, 6])
    fr = sk.first_rejection(lr, u, n, backend=backend)
    fr_ref = reference.first_rejection(lr.double(), u.double(), n)
    assert torch.equal(fr, fr_ref)

    rr = sk.reflect_resample(y[:, 2], mq[:, 2], mp[:, 2], backend=backend)
    rr_ref = reference.reflect_resample(y[:, 2].double(), mq[:, 2].double(), mp[:, 2].double())
    assert_state_close(rr, rr_ref, y[:, 2], dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("sigma_form", ["full", "window", "scalar"])
def test_every_backend_matches_the_spec_loop(backend, dtype, sigma_form):
    """The reference included: every op against docs/design.md §3 transcribed as plain loops
    (verify_cases.spec_loop), which share no code with specdiff_kernels.ops.reference.verify."""
    if not _supported(backend, dtype):
        pytest.skip("not on this backend on CPU")
    gen = torch.Generator().manual_seed(stable_seed("spec", str(dtype), sigma_form))
    B, L, E = 12, 5, (3, 7)
    y, mq, mp, sigma, u = make_window(B, L, E, dtype, gen)
    sigma = {"full": sigma, "window": sigma[0], "scalar": sigma[0, 0]}[sigma_form]
    mp[0, 1] = mq[0, 1]  # d = 0: log ratio 0, always accepted
    u[1, :2] = 0.0  # u = 0 accepts any finite ratio
    n = torch.randint(1, L + 1, (B,), generator=gen)
    got = sk.speculative_verify(y, mq, mp, sigma, u, n, backend=backend)
    ref = assert_verify_matches_reference(got, y, mq, mp, sigma, u, n, dtype, oracle="spec_loop")
    assert 0 < int((ref.num_accepted < n).sum()) < B  # both outcomes are exercised

    lr = sk.gaussian_log_ratio(y, mq, mp, sigma, backend=backend)
    lr64 = log_ratio_loop(y, mq, mp, sigma)
    tol = log_ratio_tolerance(y, mq, mp, sigma, dtype) + 1.2e-7 * lr64.abs()
    assert bool(((lr.double() - lr64).abs() <= tol).all())
    assert lr[0, 1] == 0
    assert torch.equal(
        sk.first_rejection(lr, u, n, backend=backend), first_rejection_loop(lr, u, n)
    )
    rr = sk.reflect_resample(y[:, 2], mq[:, 2], mp[:, 2], backend=backend)
    assert_state_close(
        rr, reflect_loop(y[:, 2], mq[:, 2], mp[:, 2]).reshape(rr.shape), y[:, 2], dtype
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_equals_composition_of_parts(backend, dtype):
    """The fused kernel against the same backend's separate part kernels (separate code). Not for
    the reference, whose fused op is built from its parts: the spec-loop test covers it."""
    gen = torch.Generator().manual_seed(11)
    B, L, E = 16, 5, (3, 7)
    y, mq, mp, sigma, u = make_window(B, L, E, dtype, gen)
    n = torch.randint(1, L + 1, (B,), generator=gen)
    fused = sk.speculative_verify(y, mq, mp, sigma, u, n, backend=backend)
    lr = sk.gaussian_log_ratio(y, mq, mp, sigma, backend=backend)
    acc = sk.first_rejection(lr, u, n, backend=backend)
    torch.testing.assert_close(fused.log_ratio, lr, rtol=0, atol=0)
    tol = log_ratio_tolerance(y, mq, mp, sigma, dtype)
    assert_decisions_match(fused.num_accepted, acc, lr.double(), u, tol)
    rows = torch.arange(B)
    rejected = acc < n
    j = torch.where(rejected, acc, n - 1)
    expect = torch.where(
        rejected.view(B, 1, 1),
        sk.reflect_resample(y[rows, j], mq[rows, j], mp[rows, j], backend=backend),
        y[rows, j],
    )
    same = fused.num_accepted == acc
    assert int(same.sum()) >= B - 1
    torch.testing.assert_close(fused.next_state[same], expect[same], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_identical_means_accept_everything(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    y, mq, _, sigma, u = make_window(4, 6, (33,), dtype, gen)
    res = sk.speculative_verify(y, mq, mq.clone(), sigma, u, backend=backend)
    assert torch.equal(res.num_accepted, torch.full((4,), 6))
    assert torch.equal(res.next_state, y[:, -1])
    assert torch.equal(res.log_ratio, torch.zeros(4, 6))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_huge_mean_gap_rejects_at_step_zero(backend):
    gen = torch.Generator().manual_seed(4)
    y, mq, mp, sigma, u = make_window(5, 4, (17,), torch.float32, gen)
    mp = mq + 1e3
    res = sk.speculative_verify(y, mq, mp, sigma, u, backend=backend)
    assert torch.equal(res.num_accepted, torch.zeros(5, dtype=torch.int64))
    # the reflected sample is a draw around the target mean: r = y - mq reflected about d
    torch.testing.assert_close(
        (res.next_state - mp[:, 0]).norm(dim=-1),
        (y[:, 0] - mq[:, 0]).norm(dim=-1),
        rtol=1e-4,
        atol=1e-3,
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reflection_keeps_distance_and_stays_on_line(backend):
    gen = torch.Generator().manual_seed(5)
    B, D = 8, 50
    y = torch.randn(B, D, generator=gen, dtype=torch.float64)
    mq = torch.randn(B, D, generator=gen, dtype=torch.float64)
    mp = mq + 0.3 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    x = sk.reflect_resample(y, mq, mp, backend=backend)
    torch.testing.assert_close((x - mp).norm(dim=-1), (y - mq).norm(dim=-1), rtol=1e-12, atol=0)
    d = mp - mq
    step = x - y
    # x - y is parallel to d: its component orthogonal to d vanishes
    along = (step * d).sum(-1, keepdim=True) / (d * d).sum(-1, keepdim=True) * d
    torch.testing.assert_close(step, along, rtol=0, atol=1e-12)
    # and it is the mirror image: x = mp + (I - 2 e e^T)(y - mq)
    e = d / d.norm(dim=-1, keepdim=True)
    r = y - mq
    torch.testing.assert_close(x, mp + r - 2 * (r * e).sum(-1, keepdim=True) * e)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_uniform_always_accepts(backend):
    gen = torch.Generator().manual_seed(6)
    y, mq, mp, sigma, _ = make_window(6, 5, (9,), torch.float32, gen)
    mp = mq + 3.0  # log ratios are very negative
    u = torch.zeros(6, 5)
    res = sk.speculative_verify(y, mq, mp, sigma, u, backend=backend)
    assert bool((res.log_ratio < -10).all())
    assert torch.equal(res.num_accepted, torch.full((6,), 5))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_log_ratio_is_a_rejection(backend):
    gen = torch.Generator().manual_seed(8)
    y, mq, mp, sigma, u = make_window(3, 4, (10,), torch.float32, gen)
    mp, u = mq.clone(), torch.zeros(3, 4)  # everything would be accepted...
    mp[1, 2, 3] = float("nan")  # ...but chain 1 has a NaN at step 2
    mp[2, 0, 0] = float("inf")  # and chain 2 an inf at step 0
    res = sk.speculative_verify(y, mq, mp, sigma, u, backend=backend)
    assert res.num_accepted.tolist() == [4, 2, 0]
    assert not bool(torch.isfinite(res.log_ratio[1, 2]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_lengths_ignores_later_steps(backend):
    gen = torch.Generator().manual_seed(9)
    y, mq, mp, sigma, u = make_window(4, 6, (12,), torch.float32, gen)
    mp[:, 3:] = mq[:, 3:] + 100.0  # certain rejection at steps 3.. if they counted
    u[:, :3] = 0.0  # certain acceptance of steps 0..2
    n = torch.tensor([1, 2, 3, 3])
    res = sk.speculative_verify(y, mq, mp, sigma, u, n, backend=backend)
    assert res.num_accepted.tolist() == [1, 2, 3, 3]
    assert torch.equal(res.next_state, y[torch.arange(4), n - 1])
    assert bool((res.log_ratio[:, 3:] < -100).all()), "log ratios of all L steps are reported"


# ---------------------------------------------------------------- fuzz
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    B=st.integers(1, 9),
    L=st.integers(1, 9),
    event=st.lists(st.integers(1, 13), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    use_n=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    sigma_form=st.sampled_from(["full", "window", "scalar"]),
)
def test_fuzz_against_reference(backend, B, L, event, dtype, use_n, seed, sigma_form):
    if backend == "triton" and dtype not in TRITON_DTYPES:
        dtype = torch.float32
    gen = torch.Generator().manual_seed(seed)
    y, mq, mp, sigma, u = make_window(B, L, tuple(event), dtype, gen)
    sigma = {"full": sigma, "window": sigma[0], "scalar": sigma[0, 0]}[sigma_form]
    n = torch.randint(1, L + 1, (B,), generator=gen) if use_n else None
    got = sk.speculative_verify(y, mq, mp, sigma, u, n, backend=backend)
    assert_verify_matches_reference(got, y, mq, mp, sigma, u, n, dtype)


# ---------------------------------------------------------------- torch.library integration
def _op_samples(dtype=torch.float32):
    gen = torch.Generator().manual_seed(10)
    y, mq, mp, sigma, u = make_window(3, 4, (2, 5), dtype, gen)
    n = torch.tensor([4, 2, 1])
    lr = reference.gaussian_log_ratio(y, mq, mp, sigma)
    return {
        "gaussian_log_ratio": (y, mq, mp, sigma),
        "first_rejection": (lr, u, n),
        "reflect_resample": (y[:, 0], mq[:, 0], mp[:, 0]),
        "speculative_verify": (y, mq, mp, sigma, u, n),
    }


@pytest.mark.skipif("cpp" not in KERNEL_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize(
    "name", ["gaussian_log_ratio", "first_rejection", "reflect_resample", "speculative_verify"]
)
def test_opcheck(name):
    op = getattr(torch.ops.specdiff, name).default
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(op, _op_samples(dtype)[name])
    if name == "speculative_verify":
        y, mq, mp, sigma, u, _ = _op_samples()[name]
        torch.library.opcheck(op, (y, mq, mp, sigma, u, None))


def assert_op_matches_spec_loop(name, out, args):
    """One op's output against the docs/design.md §3 loops (verify_cases)."""
    if name == "speculative_verify":
        y, mq, mp, sigma, u, n = args
        assert_verify_matches_reference(out, y, mq, mp, sigma, u, n, y.dtype, oracle="spec_loop")
    elif name == "gaussian_log_ratio":
        y, mq, mp, sigma = args
        lr64 = log_ratio_loop(*args)
        tol = log_ratio_tolerance(y, mq, mp, sigma, y.dtype) + 1.2e-7 * lr64.abs()
        assert out.dtype == torch.float32 and bool(((out.double() - lr64).abs() <= tol).all())
    elif name == "first_rejection":
        assert torch.equal(out, first_rejection_loop(*args))
    else:
        y = args[0]
        assert out.dtype == y.dtype
        assert_state_close(out, reflect_loop(*args).reshape(y.shape), y, y.dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "name", ["gaussian_log_ratio", "first_rejection", "reflect_resample", "speculative_verify"]
)
def test_torch_compile_fullgraph(backend, name):
    """One graph (fullgraph=True: no break around the op) whose output is right: checked
    against the spec loops, not against the eager call, which for an opaque op is the same
    kernel."""
    torch._dynamo.reset()
    fn = getattr(sk, name)
    args = _op_samples()[name]

    def f(*a):
        return fn(*a, backend=backend)

    out = torch.compile(f, fullgraph=True, backend="inductor")(*args)
    assert_op_matches_spec_loop(name, out, args)


# ---------------------------------------------------------------- bad input
def _good(dtype=torch.float32):
    gen = torch.Generator().manual_seed(12)
    return make_window(2, 3, (4,), dtype, gen)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "case,match",
    [
        ("rank", "draft_states must have shape"),
        ("shape", "draft_means shape"),
        ("dtype", "target_means dtype"),
        ("int_dtype", "draft_states must have a floating dtype"),
        ("device", "target_means is on meta"),
        ("empty_window", "window length L"),
        ("sigma_shape", "sigma must be a scalar"),
        ("sigma_nonpositive", "sigma must be finite and > 0"),
        ("sigma_nan", "sigma must be finite and > 0"),
        ("uniforms_shape", "uniforms must have shape"),
        ("uniforms_range", r"uniforms must lie in \[0, 1\)"),
        ("lengths_shape", "lengths must have shape"),
        ("lengths_dtype", "lengths must be an integer tensor"),
        ("lengths_zero", "lengths values must lie in 1..L"),
        ("lengths_big", "lengths values must lie in 1..L"),
    ],
)
def test_bad_input_names_the_argument(backend, case, match):
    y, mq, mp, sigma, u = _good()
    n = None
    if case == "rank":
        y, mq, mp = y[:, 0, 0], mq[:, 0, 0], mp[:, 0, 0]
    elif case == "shape":
        mq = mq[:, :2]
    elif case == "dtype":
        mp = mp.double()
    elif case == "int_dtype":
        y = y.to(torch.int32)
    elif case == "device":
        mp = mp.to("meta")
    elif case == "empty_window":
        y, mq, mp = y[:, :0], mq[:, :0], mp[:, :0]
        u = u[:, :0]
    elif case == "sigma_shape":
        sigma = torch.ones(5)
    elif case == "sigma_nonpositive":
        sigma = sigma.clone()
        sigma[1, 1] = 0.0
    elif case == "sigma_nan":
        sigma = sigma.clone()
        sigma[0, 2] = float("nan")
    elif case == "uniforms_shape":
        u = u[:, :2]
    elif case == "uniforms_range":
        u = u.clone()
        u[1, 0] = 1.0
    elif case == "lengths_shape":
        n = torch.tensor([1, 2, 3])
    elif case == "lengths_dtype":
        n = torch.tensor([1.0, 2.0])
    elif case == "lengths_zero":
        n = torch.tensor([0, 2])
    elif case == "lengths_big":
        n = torch.tensor([1, 4])
    with pytest.raises((ValueError, TypeError), match=match):
        sk.speculative_verify(y, mq, mp, sigma, u, n, backend=backend)


def test_unknown_backend_and_wrong_device():
    y, mq, mp, sigma, u = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.speculative_verify(y, mq, mp, sigma, u, backend="cuda-magic")
    with pytest.raises(TypeError, match="draft_states must be a torch.Tensor"):
        sk.speculative_verify(y.numpy(), mq, mp, sigma, u)


@pytest.mark.skipif("cpp" not in KERNEL_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize(
    "case,match",
    [
        ("rank", "draft_states must have shape"),
        ("shape", "draft_means shape"),
        ("dtype", "must share a dtype"),
        ("sigma", "sigma must be finite and > 0"),
        ("uniforms", r"uniforms must lie in \[0, 1\)"),
        ("lengths", "lengths values must lie in 1..L"),
        ("lengths_float", "lengths must be an integer tensor"),
    ],
)
def test_cpp_op_checks_its_arguments(case, match):
    """torch.ops callers bypass the Python checks: the C++ kernel must still refuse bad input."""
    y, mq, mp, sigma, u = _good()
    n = None
    if case == "rank":
        y = y[:, 0, 0]
    elif case == "shape":
        mq = mq[:1]
    elif case == "dtype":
        mp = mp.double()
    elif case == "sigma":
        sigma = -sigma
    elif case == "uniforms":
        u = u + 1.0
    elif case == "lengths":
        n = torch.tensor([2, 7])
    elif case == "lengths_float":
        n = torch.tensor([2.0, 1.0])
    with pytest.raises(RuntimeError, match=match):
        torch.ops.specdiff.speculative_verify(y, mq, mp, sigma, u, n)


def test_build_info_reports_the_build():
    if "cpp" not in KERNEL_BACKENDS:
        pytest.skip("C++ extension not built")
    from specdiff_kernels import _C

    info = _C.build_info()
    assert {"compiler", "cxx_flags", "openmp", "simd", "parallel_info", "cpu_capability"} <= set(
        info
    )
    assert info["cpu_capability"] == _C.cpu_capability()
    if not os.environ.get("SPECDIFF_CPU_CAPABILITY"):  # else the variable caps it
        assert info["cpu_capability"] == _C.supported_cpu_capability()
    assert "-O3" in info["cxx_flags"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch(backend):
    y, mq, mp, sigma, u = _good()
    res = sk.speculative_verify(y[:0], mq[:0], mp[:0], sigma[:0], u[:0], backend=backend)
    assert res.num_accepted.shape == (0,) and res.next_state.shape == (0, 4)
    assert res.log_ratio.shape == (0, 3)

"""CUDA-only tests of the compiled Triton backend (skipped, with the reason, without a GPU).

Run on a CUDA machine with the kernels compiled (not interpreted):

    SPECDIFF_TEST_GPU=1 .venv/bin/python -m pytest python_tests/test_gpu.py

(conftest.py sets TRITON_INTERPRET=1 unless SPECDIFF_TEST_GPU is set; with it, it sets
SPECDIFF_TRITON_AUTOTUNE=0 so kernels use one default config: every config is checked by
test_every_config and the autotuned set by test_autotuned_kernels.) Covers fp32/fp16/bf16 (and
fp64) against the float64 reference with both launch strategies forced and the automatic rule, the
dispatcher path (torch.ops.specdiff.* on CUDA tensors runs Triton), the default backend on CUDA,
opcheck, torch.compile(fullgraph=True) through Inductor (which sees into the triton_ops),
CUDA-graph capture/replay, and the absence of host synchronisation.
"""

from __future__ import annotations

import pytest
import torch
from preamble import skip_unless_compiled_triton

skip_unless_compiled_triton("test_gpu.py", on_cpu="test_triton_backend.py")

from verify_cases import (  # noqa: E402
    assert_decisions_match,
    assert_state_close,
    assert_verify_matches_reference,
    log_ratio_tolerance,
    make_window,
    stable_seed,
)

import specdiff_kernels as sk  # noqa: E402
from specdiff_kernels.ops import backends  # noqa: E402
from specdiff_kernels.ops.reference import verify as reference
from specdiff_kernels.ops.triton import verify as tk  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
STRATEGIES = ["per_chain", "split", "auto"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ("gaussian_log_ratio", "first_rejection", "reflect_resample", "speculative_verify")

verify_op = torch.ops.specdiff.triton_speculative_verify.default


def _window(B, L, E, dtype, key, with_n=False):
    gen = torch.Generator().manual_seed(stable_seed(*key))
    y, mq, mp, sigma, u = make_window(B, L, E, dtype, gen)
    n = torch.randint(1, L + 1, (B,), generator=gen) if with_n else None
    return [t.to(DEV) for t in (y, mq, mp, sigma, u)] + [None if n is None else n.to(DEV)]


def _check(got, y, mq, mp, sigma, u, n, dtype):
    assert_verify_matches_reference(got, y, mq, mp, sigma, u, n, dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,L,E",
    [
        (1, 8, (3, 64, 64)),  # the B=1 latency case
        (1, 4, (3, 256, 256)),  # B=1, large image: many split chunks
        (64, 4, (3, 32, 32)),
        (5, 3, (123,)),  # odd D
        (3, 1, (5, 123)),  # L = 1
        (600, 2, (7,)),  # many chains: auto picks per_chain
    ],
)
def test_verify_matches_reference(strategy, dtype, B, L, E):
    y, mq, mp, sigma, u, n = _window(B, L, E, dtype, ("gpu", dtype, B, L, E), with_n=L > 1)
    got = verify_op(y, mq, mp, sigma, u, n, strategy)
    _check(got, y, mq, mp, sigma, u, n, dtype)


def _use_kernels(monkeypatch, kernels):
    monkeypatch.setattr(tk, "_per_chain_kernel", kernels["per_chain"])
    monkeypatch.setattr(tk, "_split_partials_kernel", kernels["split_partials"])
    monkeypatch.setattr(tk, "_split_finalize_kernel", kernels["split_finalize"])


def test_every_config(monkeypatch):
    """Each autotune config gives correct results (the autotuner may pick any of them on some card
    and size): every streaming config through both strategies, every finalize config through split.
    D = 3*333 is not a multiple of any block; B*L*D spans several split chunks. (The dtype only
    changes the loads; fp16/bf16 are covered with the default config above.)"""
    dtype = torch.float32
    cases = [
        _window(3, 4, (3, 333), dtype, ("cfg", dtype, 0), True),
        _window(1, 3, (5, 4099), dtype, ("cfg", dtype, 1), True),
    ]
    configs = [(s, tk.DEFAULT_FINALIZE_CONFIG) for s in tk._STREAM_CONFIGS]
    configs += [(tk.DEFAULT_STREAM_CONFIG, f) for f in tk._FINALIZE_CONFIGS]
    for stream_cfg, fin_cfg in configs:
        _use_kernels(monkeypatch, tk.make_kernels([stream_cfg], [fin_cfg]))
        for y, mq, mp, sigma, u, n in cases:
            for strategy in ("per_chain", "split"):
                got = verify_op(y, mq, mp, sigma, u, n, strategy)
                _check(got, y, mq, mp, sigma, u, n, dtype)


@pytest.mark.parametrize("strategy", ["per_chain", "split", "auto"])
def test_autotuned_kernels(monkeypatch, strategy):
    """The autotuned kernel set (the default outside the tests) benchmarks its configs and then
    gives the same correct results."""
    _use_kernels(monkeypatch, tk.make_kernels())
    for B, L, E in [(2, 8, (3, 64, 64)), (40, 4, (777,))]:
        y, mq, mp, sigma, u, n = _window(B, L, E, torch.float32, ("autotune", B, strategy), True)
        _check(verify_op(y, mq, mp, sigma, u, n, strategy), y, mq, mp, sigma, u, n, torch.float32)


@pytest.mark.parametrize("strategy", ["per_chain", "split"])
def test_fp64_and_sigma_forms(strategy):
    y, mq, mp, sigma, u, n = _window(4, 5, (3, 333), torch.float64, ("fp64", strategy), True)
    for s in (sigma, sigma[0].contiguous(), sigma[0, 0], sigma[:, :1].contiguous()):
        _check(verify_op(y, mq, mp, s, u, n, strategy), y, mq, mp, s, u, n, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parts_and_dispatcher(dtype):
    """The public API defaults to Triton on CUDA, and torch.ops.specdiff.* on CUDA tensors (the
    C++-defined schemas) run the same Triton kernels."""
    assert backends.default_backend(DEV) == "triton"
    y, mq, mp, sigma, u, n = _window(6, 4, (3, 50), dtype, ("parts", dtype), True)
    pub = sk.speculative_verify(y, mq, mp, sigma, u, n)
    via_op = verify_op(y, mq, mp, sigma, u, n)
    for a, b in zip(pub, via_op):
        assert torch.equal(a, b)
    _check(pub, y, mq, mp, sigma, u, n, dtype)
    lr = sk.gaussian_log_ratio(y, mq, mp, sigma)
    fr = sk.first_rejection(lr, u, n)
    rr = sk.reflect_resample(y[:, 1], mq[:, 1], mp[:, 1])
    assert torch.equal(lr, pub.log_ratio) or torch.allclose(lr, pub.log_ratio, rtol=1e-6, atol=1e-6)
    assert torch.equal(fr.cpu(), reference.first_rejection(lr.cpu().double(), u.cpu(), n.cpu()))
    rr64 = reference.reflect_resample(*(t[:, 1].cpu().double() for t in (y, mq, mp)))
    assert_state_close(rr.cpu(), rr64, y[:, 1].cpu(), dtype)
    if backends.HAS_CPP:
        disp = torch.ops.specdiff.speculative_verify(y, mq, mp, sigma, u, n)
        for a, b in zip(disp, via_op):
            assert torch.equal(a, b)
        assert torch.equal(torch.ops.specdiff.gaussian_log_ratio(y, mq, mp, sigma), lr)
        assert torch.equal(torch.ops.specdiff.first_rejection(lr, u, n), fr)
        assert torch.equal(torch.ops.specdiff.reflect_resample(y[:, 1], mq[:, 1], mp[:, 1]), rr)


def test_opcheck():
    y, mq, mp, sigma, u, n = _window(3, 4, (2, 70), torch.float32, ("opcheck",), True)
    lr = reference.gaussian_log_ratio(y, mq, mp, sigma)
    y0, q0, p0 = (t[:, 0].contiguous() for t in (y, mq, mp))
    samples = {
        "gaussian_log_ratio": (y, mq, mp, sigma),
        "first_rejection": (lr, u, n),
        "reflect_resample": (y0, q0, p0),
        "speculative_verify": (y, mq, mp, sigma, u, n),
    }
    for name in OPS:
        torch.library.opcheck(getattr(torch.ops.specdiff, f"triton_{name}").default, samples[name])
        if backends.HAS_CPP:
            torch.library.opcheck(getattr(torch.ops.specdiff, name).default, samples[name])
    for strategy in ("per_chain", "split"):
        torch.library.opcheck(verify_op, (y, mq, mp, sigma, u, None, strategy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,L,E", [(1, 8, (3, 64, 64)), (300, 4, (3, 8, 8))])
def test_torch_compile_fullgraph(dtype, B, L, E):
    """Inductor traces into the triton_ops (no graph break, no opaque call) and the compiled
    function agrees with eager."""
    torch._dynamo.reset()
    y, mq, mp, sigma, u, n = _window(B, L, E, dtype, ("compile", dtype, B), True)

    def f(y, mq, mp, sigma, u, n):
        res = sk.speculative_verify(y, mq, mp, sigma, u, n)
        lr = sk.gaussian_log_ratio(y, mq, mp, sigma)
        return res.num_accepted, res.next_state * 2, res.log_ratio, sk.first_rejection(lr, u, n)

    eager = f(y, mq, mp, sigma, u, n)
    comp = torch.compile(f, fullgraph=True)(y, mq, mp, sigma, u, n)
    tol = log_ratio_tolerance(*(t.cpu() for t in (y, mq, mp, sigma)), dtype)
    assert_decisions_match(comp[0].cpu(), eager[0].cpu(), eager[2].cpu().double(), u.cpu(), tol)
    torch.testing.assert_close(comp[2], eager[2], rtol=1e-5, atol=1e-4)
    same = comp[0] == eager[0]
    torch.testing.assert_close(comp[1][same].float(), eager[1][same].float(), rtol=2e-2, atol=1e-2)
    _check((comp[0], comp[1] / 2, comp[2]), y, mq, mp, sigma, u, n, dtype)


@pytest.mark.parametrize("strategy", ["per_chain", "split", "auto"])
def test_cuda_graph_capture_and_replay(strategy):
    """After a warm-up (autotuning runs eagerly), the op is capturable: replays on new inputs
    copied into the static buffers give the eager results."""
    B, L, E, dtype = 2, 6, (3, 32, 32), torch.float32
    static = _window(B, L, E, dtype, ("graph", 0), True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            verify_op(*static, strategy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = verify_op(*static, strategy)
    for k in range(1, 4):
        fresh = _window(B, L, E, dtype, ("graph", k), True)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want = verify_op(*fresh, strategy)
        for a, b in zip(out, want):
            assert torch.equal(a, b)
        _check(tuple(t.clone() for t in out), *fresh, dtype)


@pytest.mark.parametrize("strategy", ["per_chain", "split"])
def test_no_host_sync(strategy):
    y, mq, mp, sigma, u, n = _window(1, 8, (3, 64, 64), torch.float16, ("sync", strategy), True)
    verify_op(y, mq, mp, sigma, u, n, strategy)  # warm-up: compile + autotune
    sk.speculative_verify(y, mq, mp, sigma, u, n)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        verify_op(y, mq, mp, sigma, u, n, strategy)
        sk.speculative_verify(y, mq, mp, sigma, u, n)  # the public API too (sigma is a tensor)
    finally:
        torch.cuda.set_sync_debug_mode(prev)

"""CUDA-only tests of the compiled Triton round ops (``specdiff_kernels.ops.triton.round``), skipped,
with the reason, without a GPU.

Run on a CUDA machine with the kernels compiled (not interpreted):

    SPECDIFF_TEST_GPU=1 .venv/bin/python -m pytest python_tests/test_gpu_round.py

Covers fp32/fp16/bf16/fp64 against the float64 ``round_reference`` (the checks of
test_round_triton.py, on CPU copies of the CUDA results) at B in {1, 3, 64}, L in {1, 2, 8, 17},
D in {3, 37, 3072 (flat and 3x32x32)}, both freeze modes, clip on and off; every draft block size
(32..512 counters); the dispatcher path (``torch.ops.specdiff.chain_noise / frozen_draft /
verify_frozen`` on CUDA tensors run Triton) and the default round backend on CUDA; opcheck;
torch.compile(fullgraph=True) through Inductor (which sees into the triton_ops); CUDA-graph
capture and replay; and the absence of host synchronisation.
"""

from __future__ import annotations

import math

import pytest
import torch
from preamble import skip_unless_compiled_triton

skip_unless_compiled_triton("test_gpu_round.py", on_cpu="test_round_triton.py")

from test_round_triton import (  # noqa: E402
    XI_ERR,
    _gen,
    _inputs,
    _table,
    _x0_hat,
    assert_draft_matches,
    assert_verify_matches,
)

from specdiff_kernels.ops import layout  # noqa: E402
from specdiff_kernels.ops import round as round_ops  # noqa: E402
from specdiff_kernels.ops.reference import round as R  # noqa: E402
from specdiff_kernels.ops.round_spec import (  # noqa: E402
    RoundChains,
    RoundSpec,
    draft_parts,
    verify_parts,
)
from specdiff_kernels.ops.triton import round as tr  # noqa: E402
from specdiff_kernels.ops.triton import verify as tk  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TABLES = ["ddpm_clip", "ddim_eta", "euler_a"]

noise_op = torch.ops.specdiff.triton_chain_noise.default
draft_op = torch.ops.specdiff.triton_frozen_draft.default
verify_op = torch.ops.specdiff.triton_verify_frozen.default


def _cuda(*ts):
    return tuple(t.to(DEV) for t in ts)


def _cpu(ts):
    return tuple(t.cpu() for t in ts)


def _chains(B, L, N, gen):
    """Steps and window lengths: chain 0 drafts a full window from step 0; the others start at
    random steps (the table's end included) with windows that stop before the deterministic last
    step, some cut short, some 0."""
    k = torch.randint(0, N + 1, (B,), generator=gen)
    k[0] = 0
    n = torch.minimum(torch.full((B,), L), (N - 1 - k).clamp_min(0))
    cut = torch.randint(0, L + 1, (B,), generator=gen)
    use = torch.rand(B, generator=gen) < 0.3
    use[0] = False
    n = torch.where(use, torch.minimum(n, cut), n)
    return k.to(torch.int64), n.to(torch.int64)


def _round_inputs(B, L, E, dtype, table, key):
    N = max(8, L + 4)
    coef, clip = _table(table, N)
    gen = _gen("gpu-round", key)
    steps, lengths = _chains(B, L, N, gen)
    root, frozen, ids, seed = _inputs(B, E, dtype, gen)
    return coef, clip, steps, lengths, root, frozen, ids, seed, gen


# ---------------------------------------------------------------- noise
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", [(3, 3), (64, 37), (1, 3072), (3, 3 * 32 * 32 + 1)])
def test_chain_noise_matches_reference(dtype, B, D):
    gen = _gen("gpu-noise", dtype, B, D)
    _, _, ids, seed = _inputs(B, (1,), torch.float32, gen)
    steps = torch.randint(-1, 1000, (B,), generator=gen)
    steps[0] = 2**32 - 2**20 - 5
    W = 3
    xi, u = _cpu(noise_op(*_cuda(seed, ids, steps), W, D, dtype))
    assert xi.dtype == dtype and xi.shape == (B, W, D) and u.dtype == torch.float32
    xr, ur = R.chain_noise(seed, ids, steps, W, D, torch.float64)
    assert torch.equal(u, ur.float()), "u must equal the reference bit for bit"
    acc = layout.acc_dtype(dtype)
    err = (xi.double() - xr).abs()
    tol = torch.finfo(dtype).eps * xr.abs() + XI_ERR[acc]
    assert bool((err <= tol).all()), f"xi worst error {float(err.max()):.3g}"


# ---------------------------------------------------------------- the round
SHAPES = [  # (B, L, E)
    (1, 8, (3, 32, 32)),
    (1, 17, (3072,)),
    (3, 1, (37,)),
    (3, 2, (3,)),
    (3, 17, (37,)),
    (64, 8, (3, 32, 32)),
    (64, 2, (37,)),
    (64, 1, (3,)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_round_matches_reference(dtype, case):
    """frozen_draft then verify_frozen on CUDA, both checked against the float64 reference."""
    B, L, E = SHAPES[case]
    table = TABLES[case % 3]
    freeze = case % 2
    coef, clip, steps, lengths, root, frozen, ids, seed, gen = _round_inputs(
        B, L, E, dtype, table, (dtype, case)
    )
    args = _cuda(root, frozen, steps, lengths, coef, seed, ids)
    Y = draft_op(*args, L, freeze, clip).cpu()
    assert_draft_matches(Y, root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip)
    P = _x0_hat(Y, frozen, steps, coef, freeze, gen)
    got = _cpu(verify_op(*_cuda(Y, P, frozen, steps, lengths, coef, seed, ids), freeze, clip))
    assert_verify_matches(got, Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip)


@pytest.mark.parametrize("clip", [1.0, 0.37, math.inf])
@pytest.mark.parametrize("freeze", [layout.FREEZE_X0, layout.FREEZE_EPS])
def test_clip_and_wide_blocks(freeze, clip):
    """Clip bounds (0.37 is not an fp32 number: fp64 states clip at the exact float64 bound) and
    the widest draft blocks (B * Q large)."""
    for dtype, (B, L, E) in ((torch.float64, (3, 2, (37,))), (torch.float32, (64, 2, (3, 64, 64)))):
        coef, _, steps, lengths, root, frozen, ids, seed, gen = _round_inputs(
            B, L, E, dtype, "ddpm_clip", ("clip", freeze, clip, dtype)
        )
        frozen = frozen * 3
        args = _cuda(root, frozen, steps, lengths, coef, seed, ids)
        Y = draft_op(*args, L, freeze, clip).cpu()
        assert_draft_matches(Y, root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip)
        P = _x0_hat(Y, frozen, steps, coef, freeze, gen) * 2
        got = _cpu(verify_op(*_cuda(Y, P, frozen, steps, lengths, coef, seed, ids), freeze, clip))
        assert_verify_matches(got, Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip)
    D = 3 * 64 * 64
    assert tr.draft_block(64, D // 4, tk.num_sms(DEV)) == tr._DRAFT_BLOCK_MAX


def test_dispatcher_and_default_backend():
    """The public API defaults to Triton on CUDA, and torch.ops.specdiff.* (the C++-defined
    schemas) on CUDA tensors run the same kernels."""
    assert round_ops.get_backend(None, DEV).name == "triton"
    B, L, E, dtype = 3, 4, (5, 7), torch.float32
    coef, clip, steps, lengths, root, frozen, ids, seed, gen = _round_inputs(
        B, L, E, dtype, "ddpm_clip", "dispatch"
    )
    c = _cuda(root, frozen, steps, lengths, coef, seed, ids)
    Y = round_ops.frozen_draft(*draft_parts(*c, L, 1, clip))
    assert torch.equal(Y, draft_op(*c, L, 1, clip))
    P = _x0_hat(Y.cpu(), frozen, steps, coef, 1, gen).to(DEV)
    vargs = (Y, P) + c[1:]
    res = round_ops.verify_frozen(*verify_parts(*vargs, 1, clip))
    for a, b in zip(res, verify_op(*vargs, 1, clip)):
        assert torch.equal(a, b)
    xi, u = round_ops.chain_noise(c[5], c[6], c[2], L, E, dtype)
    xo, uo = noise_op(c[5], c[6], c[2], L, 35, dtype)
    assert torch.equal(xi.reshape(xo.shape), xo) and torch.equal(u, uo)
    if round_ops.HAS_CPP:
        assert torch.equal(torch.ops.specdiff.frozen_draft(*c, L, 1, clip), Y)
        for a, b in zip(torch.ops.specdiff.verify_frozen(*vargs, 1, clip), res):
            assert torch.equal(a, b)
        for a, b in zip(torch.ops.specdiff.chain_noise(c[5], c[6], c[2], L, 35, dtype), (xo, uo)):
            assert torch.equal(a, b)


def _small(dtype=torch.float32, freeze=1):
    B, L, E = 3, 3, (2, 70)
    coef, clip, steps, lengths, root, frozen, ids, seed, gen = _round_inputs(
        B, L, E, dtype, "ddpm_clip", ("small", dtype, freeze)
    )
    c = _cuda(root, frozen, steps, lengths, coef, seed, ids)
    Y = draft_op(*c, L, freeze, clip)
    P = _x0_hat(Y.cpu(), frozen, steps, coef, freeze, gen).to(DEV)
    return c, L, freeze, clip, Y, P


def test_opcheck():
    c, L, freeze, clip, Y, P = _small()
    root, frozen, steps, lengths, coef, seed, ids = c
    samples = {
        "chain_noise": (seed, ids, steps, L, 140, torch.float16),
        "frozen_draft": (*c, L, freeze, clip),
        "verify_frozen": (Y, P, frozen, steps, lengths, coef, seed, ids, freeze, math.inf),
    }
    for name, args in samples.items():
        torch.library.opcheck(getattr(torch.ops.specdiff, f"triton_{name}").default, args)
        if round_ops.HAS_CPP:
            torch.library.opcheck(getattr(torch.ops.specdiff, name).default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_fullgraph(dtype):
    """Inductor traces into the triton_ops (no graph break) and the compiled draft + verify give
    the eager results (the same kernels: bit for bit)."""
    torch._dynamo.reset()
    c, L, freeze, clip, Y, P = _small(dtype, 0)

    def f(root, frozen, steps, lengths, coef, seed, ids, P):
        chains = RoundChains(frozen, steps, lengths, ids)
        spec = RoundSpec(coef, seed, freeze, clip)
        Yd = round_ops.frozen_draft(root, chains, spec, L)
        res = round_ops.verify_frozen(Yd, P, chains, spec)
        xi, u = round_ops.chain_noise(
            seed, ids, steps + res.committed, 1, root.shape[1:], root.dtype
        )
        return (Yd, *res, xi, u, res.next_state * 2)

    eager = f(*c, P)
    comp = torch.compile(f, fullgraph=True)(*c, P)
    for e, g in zip(eager[:-1], comp[:-1]):
        assert torch.equal(e, g)
    torch.testing.assert_close(comp[-1], eager[-1])


def test_cuda_graph_capture_and_replay():
    """Draft + verify + noise captured in one CUDA graph: replays on new inputs copied into the
    static buffers give the eager results, bit for bit."""
    B, L, E, dtype = 3, 5, (3, 16, 16), torch.float32

    def inputs(k):
        coef, clip, steps, lengths, root, frozen, ids, seed, gen = _round_inputs(
            B, L, E, dtype, "ddpm_clip", ("graph", k)
        )
        P = _x0_hat(torch.cat([root[:, None]] * (L + 1), 1), frozen, steps, coef, 1, gen)
        return [t.to(DEV) for t in (root, frozen, steps, lengths, coef, seed, ids, P)], clip

    static, clip = inputs(0)

    def run(root, frozen, steps, lengths, coef, seed, ids, P):
        Y = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, 1, clip)
        res = verify_op(Y, P, frozen, steps, lengths, coef, seed, ids, 1, clip)
        xi, u = noise_op(seed, ids, steps, 2, Y[0, 0].numel(), dtype)
        return (Y, *res, xi, u)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(*static)
    for k in range(1, 4):
        fresh, _ = inputs(k)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want = run(*fresh)
        for a, b in zip(out, want):
            assert torch.equal(a, b)


def test_no_host_sync():
    c, L, freeze, clip, Y, P = _small(torch.float16)
    root, frozen, steps, lengths, coef, seed, ids = c

    def run():
        draft_op(*c, L, freeze, clip)
        verify_op(Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip)
        noise_op(seed, ids, steps, L, 140, torch.float16)
        round_ops.frozen_draft(*draft_parts(*c, L, freeze, clip))
        round_ops.verify_frozen(
            *verify_parts(Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip)
        )
        round_ops.chain_noise(seed, ids, steps, L, (2, 70), torch.float16)

    run()  # warm-up: compile
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(prev)


@pytest.mark.parametrize("seed", range(6))
def test_round_stats_cuda_equals_cpu(seed):
    """The counters op on CUDA (the reference composition) equals the C++ CPU kernel, with
    non-finite outputs and log ratios, finished chains and chains at a deterministic step."""
    from test_round_ops import _stats_case

    args = _stats_case(seed, 5 + seed, 1 + seed % 5, 9 + 2 * seed, nonfinite=seed % 2 == 0)
    want = torch.ops.specdiff.round_stats(*args)
    got = torch.ops.specdiff.round_stats(
        *[a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args]
    )
    assert torch.equal(got.cpu(), want)


# ---------------------------------------------------------------- multistep (docs/design.md §6.1)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [0, 2, 4, 5])
def test_multistep_round_matches_reference(dtype, case):
    """frozen_draft and verify_frozen with ``prev`` (DPM-Solver++ 2M SDE tables) on CUDA against
    the float64 reference, next_prev included."""
    from specdiff_kernels.sampling.transitions import dpmsolver_sde_transitions, round_tables

    B, L, E = SHAPES[case]
    freeze = case % 2
    N = max(8, L + 4)
    T = dpmsolver_sde_transitions(N)
    coef, clip = round_tables(T), math.inf
    gen = _gen("gpu-multistep", dtype, case)
    steps, lengths = _chains(B, L, N, gen)
    root, frozen, ids, seed = _inputs(B, E, dtype, gen)
    prev = (0.5 * torch.randn(root.shape, generator=gen, dtype=torch.float64)).to(dtype)
    args = _cuda(root, frozen, steps, lengths, coef, seed, ids)
    Y = draft_op(*args, L, freeze, clip, prev.to(DEV)).cpu()
    assert_draft_matches(Y, root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip, prev)
    P = _x0_hat(Y, frozen, steps, coef, freeze, gen)
    vargs = _cuda(Y, P, frozen, steps, lengths, coef, seed, ids)
    got = _cpu(verify_op(*vargs, freeze, clip, prev.to(DEV)))
    assert_verify_matches(got, Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip, prev)

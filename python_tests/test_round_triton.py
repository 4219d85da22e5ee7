"""Triton round ops (``specdiff_kernels.ops.triton.round``) on the interpreted CPU path, against the
PyTorch oracle ``round_reference`` evaluated in float64.

* the Philox4x32-10 integer stream bit for bit (all four words, both streams, negative and 64-bit
  seeds, chain ids up to 2^32 - 1, step -1), u bit for bit, xi within the rounding of its fp32 /
  fp64 Box-Muller evaluation;
* frozen_draft step by step (each drafted state against one float64 draft step from the PREVIOUS
  STORED state, so the tolerance stays the rounding of one step), positions past n repeated bit for
  bit, Y[:, 0] = root bit for bit;
* verify_frozen: log ratios within accumulation error (0 past n), decisions equal up to threshold
  ties, committed / root_exact exact, next_state and next_frozen (bit for bit where the reference
  copies: y_n, f, P_n), at the table's end (deterministic last step; a stochastic last step with
  k + n == N), n = 0 (deterministic step taken from P_0, or idle), lengths / steps clamped
  in-kernel, NaN past n ignored, and a forced rejection whose reflection coefficient is checked
  tightly enough that 1 - a/b (instead of 1 - 2a/b) fails;
* multistep rounds (``prev``; DPM-Solver++ 2M SDE tables): the draft's H q term, d_j's
  H (P_{j-1} - q_{j-1}), every commit kind and next_prev bit for bit, outputs poisoned, one chain
  with a long window over several blocks / chunks / scan tiles;
* both freeze modes, clip on / off, fp32 / fp64 / fp16 (bf16 has no numpy type: GPU only,
  test_gpu_round.py), several blocks and partial-sum chunks (D = 130: 2 blocks of 32 counters),
  the finalize scan over several tiles (L = 17; forced 2-step / 1-chunk tiles);
* opcheck of the three ops and torch.compile(fullgraph=True) (opaque custom ops when interpreting);
* the compiled path without a GPU (subprocess, no TRITON_INTERPRET): sm_90 cubins, Inductor's view
  of the triton_ops (only outputs written) and the kernel source Inductor generates.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from verify_cases import poison_empty, run_aot_script  # noqa: E402

from specdiff_kernels.ops import layout  # noqa: E402
from specdiff_kernels.ops import round as round_ops  # noqa: E402
from specdiff_kernels.ops.reference import round as R  # noqa: E402
from specdiff_kernels.ops.round_spec import (  # noqa: E402
    RoundChains,
    RoundSpec,
    draft_parts,
    verify_parts,
)
from specdiff_kernels.sampling.transitions import (  # noqa: E402
    ddim_transitions,
    ddpm_transitions,
    dpmsolver_sde_transitions,
    euler_ancestral_transitions,
    flow_euler_transitions,
)

tr = pytest.importorskip("specdiff_kernels.ops.triton.round")
from specdiff_kernels.ops.triton import verify as tk  # noqa: E402
from specdiff_kernels.sampling.transitions import clip_value, round_tables

# (not a module-level skip: test_gpu_round.py imports the checking helpers below)
pytestmark = pytest.mark.skipif(
    not tk.INTERPRET,
    reason="compiled Triton kernels: the round ops are tested on CUDA by "
    "test_gpu_round.py (this module runs them interpreted, TRITON_INTERPRET=1)",
)

noise_op = torch.ops.specdiff.triton_chain_noise.default
draft_op = torch.ops.specdiff.triton_frozen_draft.default
verify_op = torch.ops.specdiff.triton_verify_frozen.default

ROOT = Path(__file__).resolve().parents[1]
N_STEPS = 8
# Absolute error of one normal of the Box-Muller evaluation (2 pi t rounded in fp32 times a radius
# <= 5.77 gives ~2e-6), per accumulation dtype.
XI_ERR = {torch.float64: 1e-13, torch.float32: 4e-6}
C_ACC = 16  # rounding steps allowed per term


def _eps_acc(dtype):
    return torch.finfo(layout.acc_dtype(dtype)).eps


# ---------------------------------------------------------------- tables
def _table(name: str, N: int = N_STEPS):
    """(coef, clip) of a real transition family with N steps; every one has a deterministic last
    step (std 0) and only stochastic steps before it."""
    if name == "ddpm_clip":
        T = ddpm_transitions(num_inference_steps=N, clip_sample=1.0)
    elif name == "ddim_eta":
        T = ddim_transitions(num_inference_steps=N, eta=0.7)
    elif name == "euler_a":
        T = euler_ancestral_transitions(num_inference_steps=N)
    elif name == "flow_euler":  # rectified flow: X0_Y = X0_F = 0 at step 0 (t = 1)
        T = flow_euler_transitions(N, shift=3.0)
    else:
        raise ValueError(name)
    coef = round_tables(T)
    assert coef[layout.ROW_STD, -1] == 0 and bool((coef[layout.ROW_STD, :-1] > 0).all())
    return coef, clip_value(T)


def _gen(*key):
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _inputs(B, E, dtype, gen):
    root = (0.8 * torch.randn((B, *E), generator=gen, dtype=torch.float64)).to(dtype)
    frozen = (0.6 * torch.randn((B, *E), generator=gen, dtype=torch.float64)).to(dtype)
    ids = torch.randperm(4 * B + 7, generator=gen)[:B].to(torch.int64)
    seed = round_ops.seed_tensor(int(torch.randint(-(2**62), 2**62, (1,), generator=gen)))
    return root, frozen, ids, seed


def _x0_hat(Y, frozen, steps, coef, freeze, gen, gap_lo=0.1, gap_hi=4.0):
    """A target x0-hat at the drafted states with mean gap ||d|| / s log-uniform in [gap_lo, gap_hi]
    per position (acceptance ~0.96 .. ~0.05); gap 0 gives P = the draft's x0-hat (d = 0)."""
    B, L1 = Y.shape[:2]
    D = Y[0, 0].numel()
    Yd = Y.double().reshape(B, L1, D)
    f = frozen.double().reshape(B, 1, D)
    kk = (steps[:, None] + torch.arange(L1)[None]).clamp(0, coef.shape[1] - 1)
    c = coef[:, kk][..., None]  # [8, B, L1, 1]
    base = (
        f.expand(B, L1, D)
        if freeze == layout.FREEZE_X0
        else c[layout.ROW_X0_Y] * Yd - c[layout.ROW_X0_F] * f
    )
    if gap_hi == 0:
        return base.to(Y.dtype).reshape(Y.shape)
    gap = torch.exp(
        torch.empty(B, L1, 1, dtype=torch.float64).uniform_(
            math.log(gap_lo), math.log(gap_hi), generator=gen
        )
    )
    scale = (
        gap
        * c[layout.ROW_STD].clamp_min(1e-3)
        / ((c[layout.ROW_A].abs() + c[layout.ROW_E].abs() + 1e-3) * math.sqrt(D))
    )
    return (
        (base + scale * torch.randn((B, L1, D), generator=gen, dtype=torch.float64))
        .to(Y.dtype)
        .reshape(Y.shape)
    )


# ---------------------------------------------------------------- float64 oracle pieces
def _pq_and_mag(c, y, f, freeze):
    """The draft's x0-hat at y and the magnitude of its terms."""
    if freeze == layout.FREEZE_X0:
        return f, f.abs()
    a, b = c[layout.ROW_X0_Y] * y, c[layout.ROW_X0_F] * f
    return a - b, a.abs() + b.abs()


def _step64(coef, k, y, f, seed, ids, freeze, clip, D):
    """One float64 step quantities at drafted state y (rows of step k, clamped like the ops)."""
    c = R._rows(coef, k, torch.float64)
    xi = R.normal_noise(seed, ids, k, D, torch.float64)
    pq, pq_mag = _pq_and_mag(c, y, f, freeze)
    mq = R.affine_mean(c, pq, y, clip)
    mq_mag = (c[layout.ROW_A].abs() + c[layout.ROW_E].abs()) * (pq.abs() + pq_mag) + (
        c[layout.ROW_G] * y
    ).abs()
    return c, xi, pq, pq_mag, mq, mq_mag


def _out_tol(dtype, want):
    return torch.finfo(dtype).eps * want.abs() + torch.finfo(dtype).tiny


def assert_draft_matches(
    Y, root, frozen, steps, lengths, coef, seed, ids, window, freeze, clip, prev=None
):
    """Each drafted state against one float64 step from the previous STORED state, rounded to the
    state dtype; past n the state repeats bit for bit; Y[:, 0] is the root bit for bit. With
    ``prev`` (multistep) the step adds H q, q = prev at j = 0, else the draft's x0-hat at the
    stored Y[:, j - 1]."""
    dtype = root.dtype
    B = root.shape[0]
    D = root[0].numel()
    assert Y.dtype == dtype and Y.shape == (B, window + 1, *root.shape[1:])
    assert torch.equal(Y[:, 0], root)
    Yd = Y.double().reshape(B, window + 1, D)
    f = frozen.double().reshape(B, D)
    n = lengths.clamp(0, window)
    q = None if prev is None else prev.double().reshape(B, D)
    q_mag = None if prev is None else q.abs()
    for j in range(window):
        c, xi, pq, pq_mag, mq, mq_mag = _step64(
            coef, steps + j, Yd[:, j], f, seed, ids, freeze, clip, D
        )
        if q is not None:
            mq = mq + c[layout.ROW_H] * q
            mq_mag = mq_mag + c[layout.ROW_H].abs() * (q.abs() + q_mag)
            q, q_mag = pq, pq_mag
        s = c[layout.ROW_STD]
        want = mq + s * xi
        tol = (
            _out_tol(dtype, want)
            + C_ACC * _eps_acc(dtype) * (mq_mag + (s * xi).abs())
            + s * XI_ERR[layout.acc_dtype(dtype)]
        )
        live = (j < n)[:, None]
        err = (Yd[:, j + 1] - want).abs()
        bad = live & ~(err <= tol)
        assert not bool(bad.any()), (
            f"Y[:, {j + 1}]: {int(bad.sum())} elements off the float64 "
            f"draft step; worst error {float(err[bad].max()):.3g}"
        )
        held = ~live[:, 0]
        assert torch.equal(Y[held, j + 1], Y[held, j]), "positions past n must repeat the state"


def _verify_oracle(Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip, prev=None):
    """The float64 reference result plus per-step error scales (tolerances) of the log ratio;
    multistep (``prev``): d_j includes H (P_{j-1} - p_q(y_{j-1})) for j >= 1."""
    want = R.verify_frozen(
        *verify_parts(
            Y.double(),
            P.double(),
            frozen.double(),
            steps,
            lengths,
            coef,
            seed,
            ids,
            freeze,
            clip,
            None if prev is None else prev.double(),
        )
    )
    dtype = Y.dtype
    B, L1 = Y.shape[:2]
    L = L1 - 1
    D = Y[0, 0].numel()
    Yd, Pd = Y.double().reshape(B, L1, D), P.double().reshape(B, L1, D)
    f = frozen.double().reshape(B, D)
    lr_tol = torch.zeros(B, L, dtype=torch.float64)
    parts = []
    for j in range(L1):
        c, xi, pq, pq_mag, mq, mq_mag = _step64(
            coef, steps + j, Yd[:, j], f, seed, ids, freeze, clip, D
        )
        A, E = c[layout.ROW_A], c[layout.ROW_E]
        d = A * (R._clip(Pd[:, j], clip) - R._clip(pq, clip)) + E * (Pd[:, j] - pq)
        dmag = (A.abs() + E.abs()) * (Pd[:, j].abs() + pq.abs() + pq_mag) + d.abs()
        if prev is not None and j > 0:
            H, pq_m, pq_mag_m = c[layout.ROW_H], parts[j - 1][2], parts[j - 1][3]
            d = d + H * (Pd[:, j - 1] - pq_m)
            dmag = dmag + H.abs() * (Pd[:, j - 1].abs() + pq_m.abs() + pq_mag_m)
        s = c[layout.ROW_STD]
        parts.append((c, xi, pq, pq_mag, mq, mq_mag, d, dmag))
        if j < L:
            ss = torch.where(s > 0, s, torch.ones_like(s))
            rounding = (dmag * (xi.abs() / ss + d.abs() / ss**2)).sum(-1)
            lr_tol[:, j] = C_ACC * _eps_acc(dtype) * rounding + XI_ERR[layout.acc_dtype(dtype)] * (
                d.abs() / ss
            ).sum(-1)
    return want, lr_tol, parts


def assert_verify_matches(
    got, Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip, prev=None
):
    """A verify_frozen result against the float64 reference on the same (rounded) inputs; with
    ``prev`` (multistep) also next_prev (a copy of P_j, P_{j-1} or prev: bit for bit)."""
    dtype = Y.dtype
    B, L1 = Y.shape[:2]
    L = L1 - 1
    D = Y[0, 0].numel()
    nacc, comm, state, nfz, exact, lr = got[:6]
    assert nacc.dtype == torch.int64 and comm.dtype == torch.int64 and exact.dtype == torch.bool
    assert lr.dtype == torch.float32 and lr.shape == (B, L)
    assert state.dtype == dtype and nfz.dtype == dtype
    assert state.shape == frozen.shape and nfz.shape == frozen.shape
    assert len(got) == 7, f"verify_frozen returns 7 outputs, got {len(got)}"
    nprev = got[6]
    assert nprev.dtype == dtype
    if prev is None:
        assert nprev.shape == (0,), f"next_prev must be empty without prev, got {nprev.shape}"
    else:
        assert nprev.shape == frozen.shape, f"next_prev shape {tuple(nprev.shape)}"
    want, lr_tol, parts = _verify_oracle(
        Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip, prev
    )
    w_nacc, w_comm, w_state, w_nfz, w_exact, _, w_nprev = want
    n = lengths.clamp(0, L)
    live = torch.arange(L)[None] < n[:, None]
    # the float64 log ratios (want[5] is float32)
    lr_ref = torch.zeros(B, L, dtype=torch.float64)
    for j in range(L):
        c, xi, d = parts[j][0], parts[j][1], parts[j][6]
        s = c[layout.ROW_STD][:, 0]
        lr_ref[:, j] = torch.where(
            j < n, (d * xi).sum(-1) / s - (d * d).sum(-1) / (2 * s * s), torch.zeros_like(s)
        )
    tol = lr_tol + 2 * torch.finfo(torch.float32).eps * lr_ref.abs() + 1e-30
    err = (lr.double() - lr_ref).abs()
    assert bool((err[live] <= tol[live]).all()), (
        f"log ratio off the float64 reference: worst error {float(err[live].max()):.3g}, "
        f"tolerance there {float(tol[live][err[live].argmax()]):.3g}"
    )
    assert bool((lr[~live] == 0).all()), "log ratios past n must be 0"
    # decisions: equal except where the decisive step sits on the threshold
    u = torch.stack([R.uniform_noise(seed, ids, steps + j) for j in range(L)], 1).double()
    margin = (torch.log(u) - lr_ref).abs()
    same = nacc == w_nacc
    for b in torch.nonzero(~same).flatten().tolist():
        m = int(min(nacc[b], w_nacc[b]))
        assert margin[b, m] <= 4 * tol[b, m], (
            f"chain {b}: accepted {int(nacc[b])} vs reference {int(w_nacc[b])}; step {m} is not "
            f"within rounding of the threshold (margin {float(margin[b, m]):.3g})"
        )
    assert torch.equal(comm[same], w_comm[same]), f"committed {comm.tolist()} vs {w_comm.tolist()}"
    assert torch.equal(exact[same], w_exact[same]), "root_exact differs from the reference"
    # states, per commit kind (bit for bit where the reference copies)
    N = coef.shape[1]
    rejected = w_nacc < n
    pos = torch.where(rejected, w_nacc, n)
    kn = steps + n
    det = ~rejected & (kn < N) & (coef[layout.ROW_STD, kn.clamp(0, N - 1)] == 0)
    keep = ((n == 0) & ~det) | (~rejected & ~(kn < N))
    Yf, Pf = Y.reshape(B, L1, D), P.reshape(B, L1, D)
    sd, fd = state.reshape(B, D), nfz.reshape(B, D)
    ws, wf = w_state.reshape(B, D), w_nfz.reshape(B, D)
    eps = _eps_acc(dtype)
    for b in torch.nonzero(same).flatten().tolist():
        j = int(pos[b])
        c, xi, pq, pq_mag, mq, mq_mag, d, dmag = (
            t[b] if t.dim() == 2 else t[:, b] for t in parts[j]
        )
        y, p = Yf[b, j].double(), Pf[b, j].double()
        if prev is not None:
            # the previous predictions (target tp, draft dp) and what they add to the magnitudes
            H = c[layout.ROW_H]
            if j == 0:
                tp = dp = prev.reshape(B, D)[b].double()
                dp_mag = dp.abs()
            else:
                tp = Pf[b, j - 1].double()
                dp, dp_mag = parts[j - 1][2][b], parts[j - 1][3][b]
            mq_mag = mq_mag + H.abs() * (dp.abs() + dp_mag)
            # next_prev: a copy of the target's x0-hat at the new state's parent
            parent = Pf[b, j] if (rejected[b] or det[b]) else tp.to(dtype)
            assert torch.equal(nprev.reshape(B, D)[b], parent), (
                f"chain {b}: next_prev must be P[b, {j}], P[b, {j - 1}] or prev (commit at {j})"
            )
            assert torch.equal(nprev.reshape(B, D)[b].double(), w_nprev.reshape(B, D)[b])
        if rejected[b]:
            s = c[layout.ROW_STD]
            a_ = float(((d * xi).sum() * s).item())
            b_ = float((d * d).sum().item())
            cr = 1 - 2 * a_ / b_ if b_ > 0 else 1.0
            err_a = C_ACC * eps * float((dmag * (s * xi).abs()).sum()) + float(
                s * XI_ERR[layout.acc_dtype(dtype)] * d.abs().sum()
            )
            err_b = C_ACC * eps * float((dmag * d.abs()).sum())
            err_cr = 2 * (err_a + abs(a_ / b_) * err_b) / b_ if b_ > 0 else 0.0
            tol_s = (
                _out_tol(dtype, ws[b])
                + C_ACC * eps * (mq_mag + (s * xi).abs() + abs(cr) * dmag)
                + s * XI_ERR[layout.acc_dtype(dtype)]
                + err_cr * d.abs()
            )
            errs = (sd[b].double() - ws[b]).abs()
            assert bool((errs <= tol_s).all()), (
                f"chain {b}: reflected state off the reference by {float(errs.max()):.3g} "
                f"(tolerance {float(tol_s[errs.argmax()]):.3g})"
            )
        elif det[b]:
            m_mag = (c[layout.ROW_A].abs() + c[layout.ROW_E].abs()) * p.abs() + (
                c[layout.ROW_G] * y
            ).abs()
            if prev is not None:
                m_mag = m_mag + (c[layout.ROW_H] * tp).abs()
            tol_s = _out_tol(dtype, ws[b]) + C_ACC * eps * m_mag
            errs = (sd[b].double() - ws[b]).abs()
            assert bool((errs <= tol_s).all()), (
                f"chain {b}: deterministic step off by {float(errs.max()):.3g}"
            )
        else:
            assert torch.equal(sd[b], Yf[b, j]), (
                f"chain {b}: next_state must be Y[b, {j}] bit for bit"
            )
        if keep[b]:
            assert torch.equal(fd[b], frozen.reshape(B, D)[b]), (
                f"chain {b}: frozen value must be kept"
            )
        elif freeze == layout.FREEZE_X0:
            assert torch.equal(fd[b], Pf[b, j]), f"chain {b}: next_frozen must be P[b, {j}]"
        else:
            mag = (c[layout.ROW_EPS_Y] * y).abs() + (c[layout.ROW_EPS_P] * p).abs()
            errf = (fd[b].double() - wf[b]).abs()
            assert bool((errf <= _out_tol(dtype, wf[b]) + C_ACC * eps * mag).all()), (
                f"chain {b}: next_frozen (eps) off by {float(errf.max()):.3g}"
            )
    return want


def _window_cases(L, N=N_STEPS):
    """(steps, lengths) of chains whose windows stay on stochastic steps: a full window, a cut
    one, n = 0 at a stochastic step (idle) and a window that ends right before the deterministic
    last step (which is then taken)."""
    steps = torch.tensor([0, 1, 2, N - 1 - min(L, 3)], dtype=torch.int64)
    lengths = torch.tensor([L, max(L - 2, 1), 0, min(L, 3)], dtype=torch.int64)
    return steps, lengths


# ---------------------------------------------------------------- noise
@triton.jit
def _words_kernel(
    seed_ptr, step_ptr, chain_ptr, out_ptr, STREAM: tl.constexpr, BLOCK: tl.constexpr
):
    k0, k1 = tr._philox_key(seed_ptr)
    i = tl.arange(0, BLOCK)
    x0, x1, x2, x3 = tr._philox(k0, k1, i, tl.load(step_ptr), tl.load(chain_ptr), STREAM)
    tl.store(out_ptr + i, x0.to(tl.int64))
    tl.store(out_ptr + BLOCK + i, x1.to(tl.int64))
    tl.store(out_ptr + 2 * BLOCK + i, x2.to(tl.int64))
    tl.store(out_ptr + 3 * BLOCK + i, x3.to(tl.int64))


@pytest.mark.parametrize(
    "seed,step,chain",
    [
        (0, -1, 0),
        (-1, 0, 2**32 - 1),
        (-(2**63), 12345, 7),
        (2**63 - 1, 2**32 - 2**20 - 2, 2**31),
        (0x0123456789ABCDEF, 3, 123456789),
    ],
)
def test_philox_words_bit_identical(seed, step, chain):
    """All four Philox4x32-10 words of both streams, bit for bit with round_reference.philox4x32
    (key = low/high words of the int64 seed; counter (i, k + 1, chain, stream))."""
    s = round_ops.seed_tensor(seed)
    k0, k1 = R.seed_key(s)
    st, ch = torch.tensor([step]), torch.tensor([chain])
    c1, c2 = R._counter_words(ch, st)
    block = 16
    for stream in (layout.STREAM_NORMAL, layout.STREAM_UNIFORM):
        out = torch.empty(4 * block, dtype=torch.int64)
        _words_kernel[(1,)](s, st, ch, out, STREAM=stream, BLOCK=block)
        want = R.philox4x32(torch.arange(block), c1, c2, torch.full_like(c1, stream), k0, k1)
        for w in range(4):
            assert torch.equal(out[w * block : (w + 1) * block] & R.MASK32, want[w]), (stream, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("D", [1, 5, 37, 130])
def test_chain_noise_matches_reference(dtype, D):
    gen = _gen("noise", dtype, D)
    B, W = 3, 2
    _, _, ids, seed = _inputs(B, (D,), torch.float32, gen)
    ids[0] = 2**32 - 1
    steps = torch.tensor([-1, 0, 2**31 + 5], dtype=torch.int64)
    xi, u = noise_op(seed, ids, steps, W, D, dtype)
    assert xi.dtype == dtype and xi.shape == (B, W, D) and u.dtype == torch.float32
    xr, ur = R.chain_noise(seed, ids, steps, W, D, torch.float64)
    assert torch.equal(u, ur.float()), "u must equal the reference bit for bit"
    assert bool(((u >= 0) & (u < 1)).all())
    err = (xi.double() - xr).abs()
    tol = torch.finfo(dtype).eps * xr.abs() + XI_ERR[layout.acc_dtype(dtype)]
    assert bool((err <= tol).all()), f"xi worst error {float(err.max()):.3g}"
    # lane layout: a wrong quarter (e.g. interleaved) layout is far off
    assert float(err.max()) < 1e-3


def test_chain_noise_public_api():
    """round_ops.chain_noise(backend="triton") reshapes to the event shape; the same numbers."""
    gen = _gen("noise-api")
    _, _, ids, seed = _inputs(2, (3, 5), torch.float32, gen)
    steps = torch.tensor([4, 9])
    xi, u = round_ops.chain_noise(seed, ids, steps, 3, (3, 5), torch.float32, backend="triton")
    xo, uo = noise_op(seed, ids, steps, 3, 15, torch.float32)
    assert xi.shape == (2, 3, 3, 5) and torch.equal(xi.reshape(2, 3, 15), xo) and torch.equal(u, uo)


# ---------------------------------------------------------------- frozen_draft
DRAFT_CASES = [  # (table, freeze, dtype, event)
    ("ddpm_clip", layout.FREEZE_X0, torch.float32, (37,)),
    ("ddpm_clip", layout.FREEZE_EPS, torch.float32, (2, 65)),
    ("ddim_eta", layout.FREEZE_X0, torch.float64, (2, 65)),
    ("ddim_eta", layout.FREEZE_EPS, torch.float64, (37,)),
    ("euler_a", layout.FREEZE_EPS, torch.float16, (37,)),
    ("ddpm_clip", layout.FREEZE_X0, torch.float16, (2, 65)),
    ("ddpm_clip", layout.FREEZE_EPS, torch.float64, (5,)),
    ("euler_a", layout.FREEZE_X0, torch.float32, (1,)),
    ("flow_euler", layout.FREEZE_EPS, torch.float32, (37,)),
    ("flow_euler", layout.FREEZE_X0, torch.float64, (2, 65)),
]


@pytest.mark.parametrize("table,freeze,dtype,E", DRAFT_CASES, ids=str)
def test_frozen_draft_matches_reference(table, freeze, dtype, E):
    coef, clip = _table(table)
    gen = _gen("draft", table, freeze, dtype, E)
    L = 5
    steps, lengths = _window_cases(L)
    B = steps.shape[0]
    root, frozen, ids, seed = _inputs(B, E, dtype, gen)
    Y = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip)
    assert_draft_matches(Y, root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip)


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1.0), (torch.float64, 0.37)], ids=str)
def test_frozen_draft_clip_matters_and_public_api(dtype, bound):
    """Clipping changes the draft (so the clip path is exercised); fp64 clips at the exact float64
    bound (0.37 is not a float32 number: its fp32 rounding is off by 1e-8, far beyond fp64
    tolerance); the public wrapper is the op; L = 1."""
    coef, _ = _table("ddpm_clip")
    gen = _gen("draft-clip", dtype)
    B, E, L = 2, (37,), 1
    root, frozen, ids, seed = _inputs(B, E, dtype, gen)
    frozen = frozen * 4  # well outside [-bound, bound]
    steps, lengths = torch.tensor([0, 3]), torch.tensor([1, 1])
    y_clip = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, 0, bound)
    y_off = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, 0, math.inf)
    assert not torch.equal(y_clip, y_off)
    for clip, y in ((bound, y_clip), (math.inf, y_off)):
        assert_draft_matches(y, root, frozen, steps, lengths, coef, seed, ids, L, 0, clip)
    args = (root, frozen, steps, lengths, coef, seed, ids, L, 0, bound)
    pub = round_ops.frozen_draft(*draft_parts(*args), backend="triton")
    assert torch.equal(pub, y_clip)


# ---------------------------------------------------------------- verify_frozen
VERIFY_CASES = [  # (table, freeze, dtype, event, L)
    ("ddpm_clip", layout.FREEZE_X0, torch.float32, (37,), 5),
    ("ddpm_clip", layout.FREEZE_EPS, torch.float32, (2, 65), 2),
    ("ddim_eta", layout.FREEZE_X0, torch.float64, (2, 65), 5),
    ("ddim_eta", layout.FREEZE_EPS, torch.float64, (37,), 1),
    ("euler_a", layout.FREEZE_EPS, torch.float16, (37,), 5),
    ("ddpm_clip", layout.FREEZE_X0, torch.float16, (2, 65), 2),
    ("euler_a", layout.FREEZE_X0, torch.float32, (1,), 5),
    ("ddpm_clip", layout.FREEZE_EPS, torch.float64, (5,), 5),
    ("flow_euler", layout.FREEZE_EPS, torch.float32, (37,), 5),
    ("flow_euler", layout.FREEZE_X0, torch.float64, (2, 65), 2),
]


@pytest.mark.parametrize("table,freeze,dtype,E,L", VERIFY_CASES, ids=str)
def test_verify_frozen_matches_reference(table, freeze, dtype, E, L):
    coef, clip = _table(table)
    gen = _gen("verify", table, freeze, dtype, E, L)
    steps, lengths = _window_cases(L)
    B = steps.shape[0]
    root, frozen, ids, seed = _inputs(B, E, dtype, gen)
    Y = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip)
    P = _x0_hat(Y, frozen, steps, coef, freeze, gen)
    got = verify_op(Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip)
    want = assert_verify_matches(got, Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip)
    # the window cases: chain 2 is idle, chain 3 takes the deterministic last step unless rejected
    assert int(got[1][2]) == 0 and torch.equal(got[2][2], root[2])
    assert torch.equal(got[3][2], frozen[2])
    if int(want[0][3]) == int(lengths[3]):
        assert int(got[1][3]) == int(lengths[3]) + 1 and not bool(got[4][3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("freeze", [layout.FREEZE_X0, layout.FREEZE_EPS])
def test_verify_all_accepted_and_table_end(dtype, freeze):
    """d = 0 everywhere (P = the draft's x0-hat): every step is accepted (log ratio 0). Commits at
    the table's end: k + n == N with a stochastic last step (frozen kept, committed n), a window
    ending before the deterministic last step (it is taken: committed n + 1, next_state = m_p(Y_n)),
    n = 0 at the deterministic step (taken from P_0), n = 0 elsewhere or at k = N (idle)."""
    coef_det, clip = _table("ddpm_clip")
    coef_sto = coef_det.clone()
    coef_sto[layout.ROW_STD, -1] = 0.05  # a stochastic last step
    N, L = N_STEPS, 3
    gen = _gen("end", dtype, freeze)
    for coef in (coef_det, coef_sto):
        last_det = bool(coef[layout.ROW_STD, -1] == 0)
        steps = torch.tensor([0, N - 1 - L, N - L, N - 1, N, 2])
        lengths = torch.tensor([L, L, L if not last_det else L - 1, 0, 0, 0])
        B = steps.shape[0]
        root, frozen, ids, seed = _inputs(B, (37,), dtype, gen)
        Y = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip)
        P = _x0_hat(Y, frozen, steps, coef, freeze, gen, gap_hi=0)
        got = verify_op(Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip)
        assert_verify_matches(got, Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip)
        nacc, comm, state, nfz, exact, lr, _ = got
        n = lengths
        assert torch.equal(nacc, n), "d = 0: every step is accepted"
        if freeze == layout.FREEZE_X0:  # P = f exactly (eps: P is the draft's x0 rounded, d ~ 0)
            assert bool((lr == 0).all())
        kn = steps + n
        det = (kn < N) & (coef[layout.ROW_STD, kn.clamp(max=N - 1)] == 0)
        assert torch.equal(comm, n + det.long())
        assert torch.equal(exact, (kn < N) & ~det & (n > 0))
        if not last_det:  # chain 2: k + n == N, stochastic last step: state Y_n, frozen kept
            assert int(kn[2]) == N and torch.equal(state[2], Y[2, L])
            assert torch.equal(nfz[2], frozen[2])
        assert bool(det[3]) == last_det  # n = 0 at the last step
        for b in (4, 5):  # idle
            assert int(comm[b]) == 0 and torch.equal(state[b], root[b])
            assert torch.equal(nfz[b], frozen[b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forced_rejection_reflection(dtype):
    """A huge gap at every step forces a rejection at j = 0: next_state must be the reflection
    m_q + r + (1 - 2<d, r>/||d||^2) d. The check is tight enough that the wrong coefficients
    1 - <d, r>/||d||^2 and 1 + 2<d, r>/||d||^2 fail it."""
    coef, clip = _table("ddim_eta")
    gen = _gen("reject", dtype)
    B, E, L = 3, (2, 65), 2
    root, frozen, ids, seed = _inputs(B, E, dtype, gen)
    steps, lengths = torch.tensor([0, 2, 4]), torch.tensor([2, 2, 1])
    Y = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, 0, clip)
    P = _x0_hat(Y, frozen, steps, coef, 0, gen, gap_lo=60.0, gap_hi=80.0)
    got = verify_op(Y, P, frozen, steps, lengths, coef, seed, ids, 0, clip)
    assert_verify_matches(got, Y, P, frozen, steps, lengths, coef, seed, ids, 0, clip)
    nacc, comm, state, nfz, exact, lr, nprev = got
    assert nacc.tolist() == [0] * B and comm.tolist() == [1] * B
    assert not bool(exact.any()) and torch.equal(nfz, P[:, 0])
    # the reflection coefficient, and what a wrong one would give
    D = Y[0, 0].numel()
    y, p, f = (t.double().reshape(B, D) for t in (Y[:, 0], P[:, 0], frozen))
    c = R._rows(coef, steps, torch.float64)
    xi = R.normal_noise(seed, ids, steps, D, torch.float64)
    d = c[layout.ROW_A] * (p - f) + c[layout.ROW_E] * (p - f)
    r = c[layout.ROW_STD] * xi
    mq = R.affine_mean(c, f, y, clip)
    a_, b_ = (d * r).sum(-1, keepdim=True), (d * d).sum(-1, keepdim=True)
    right = mq + r + (1 - 2 * a_ / b_) * d
    err = (state.double().reshape(B, D) - right).abs()
    tol = 1e-4 * (right.abs() + 1) if dtype == torch.float32 else 1e-10 * (right.abs() + 1)
    assert bool((err <= tol).all()), float(err.max())
    for wrong_c in (1 - a_ / b_, 1 + 2 * a_ / b_):
        wrong = mq + r + wrong_c * d
        assert not bool(((wrong - right).abs() <= tol).all()), (
            "the check could not see a wrong coefficient"
        )
        with pytest.raises(AssertionError, match="reflected state"):
            bad = (nacc, comm, wrong.to(dtype).reshape(state.shape), nfz, exact, lr, nprev)
            assert_verify_matches(bad, Y, P, frozen, steps, lengths, coef, seed, ids, 0, clip)


@pytest.mark.parametrize("tiles", ["natural", "forced"])
def test_verify_tiled_scan(monkeypatch, tiles):
    """The finalize kernel's tiles over window steps (BLOCK_L) and over partial-sum chunks
    (BLOCK_NB): a window of 17 > 16 steps; or, forced with 2-step / 1-chunk tiles, every chain
    scanned over several tiles, with rejections in later tiles after earlier ones."""
    coef, clip = _table("euler_a")
    if tiles == "natural":
        L, E, B = 17, (5,), 3
        coef = coef[:, [0] * (L + 4)].clone()  # a longer table (column 0 repeated)
        steps, lengths = torch.tensor([0, 1, 0]), torch.tensor([L, L - 3, L])
        reject_at = [(0, 16), (1, 5), (1, 15), (2, 17)]  # (chain, position) of huge gaps
    else:
        monkeypatch.setattr(tr, "_BLOCK_L_MAX", 2)
        monkeypatch.setattr(tr, "_BLOCK_NB_MAX", 1)
        L, E, B = 5, (2, 65), 2
        steps, lengths = torch.tensor([0, 1]), torch.tensor([5, 4])
        reject_at = [(0, 3), (1, 1), (1, 3)]
    gen = _gen("tiles", tiles)
    root, frozen, ids, seed = _inputs(B, E, torch.float32, gen)
    Y = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, 0, clip)
    small = _x0_hat(Y, frozen, steps, coef, 0, gen, gap_lo=0.001, gap_hi=0.002)
    huge = _x0_hat(Y, frozen, steps, coef, 0, gen, gap_lo=60.0, gap_hi=80.0)
    pick = torch.zeros(B, L + 1, *([1] * len(E)), dtype=torch.bool)
    for b, j in reject_at:
        pick[b, j] = True
    P = torch.where(pick, huge, small)
    got = verify_op(Y, P, frozen, steps, lengths, coef, seed, ids, 0, clip)
    assert_verify_matches(got, Y, P, frozen, steps, lengths, coef, seed, ids, 0, clip)
    first = [
        min([j for c, j in reject_at if c == b and j < int(lengths[b])] + [int(lengths[b])])
        for b in range(B)
    ]
    assert got[0].tolist() == first
    if tiles == "forced":
        D = Y[0, 0].numel()
        assert tr.partial_chunk(B * L, -(-D // 4), tk.num_sms(Y.device)) < -(-D // 4), (
            "the case should have several partial-sum chunks"
        )


def test_clamped_lengths_steps_and_poison_past_n():
    """Raw op (no argument checks): lengths < 0 or > L and steps past the table are clamped
    in-kernel as the reference does; NaN in Y / P past position n changes nothing."""
    coef, clip = _table("ddpm_clip")
    gen = _gen("clamp")
    L, E = 3, (37,)
    steps = torch.tensor([0, 1, N_STEPS + 3, 2])
    lengths = torch.tensor([-2, L + 4, 2, 1])
    B = steps.shape[0]
    root, frozen, ids, seed = _inputs(B, E, torch.float32, gen)
    n = lengths.clamp(0, L)
    Y = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, 1, clip)
    assert_draft_matches(Y, root, frozen, steps, lengths, coef, seed, ids, L, 1, clip)
    P = _x0_hat(Y, frozen, steps, coef, 1, gen)
    got = verify_op(Y, P, frozen, steps, lengths, coef, seed, ids, 1, clip)
    want = R.verify_frozen(
        *verify_parts(
            Y.double(), P.double(), frozen.double(), steps, lengths, coef, seed, ids, 1, clip
        )
    )
    for g, w in zip(got[:2], want[:2]):
        assert torch.equal(g, w)
    assert torch.equal(got[4], want[4])
    # chain 2 drafts past the table: the clamped last column is deterministic (std 0), so its log
    # ratios are not finite, as the reference's
    assert torch.equal(torch.isfinite(got[5]), torch.isfinite(want[5]))
    assert not bool(torch.isfinite(got[5][2, :2]).any())
    Yp, Pp = Y.clone(), P.clone()
    for b in range(B):
        Yp[b, int(n[b]) + 1 :] = float("nan")
        Pp[b, int(n[b]) + 1 :] = float("nan")
    again = verify_op(Yp, Pp, frozen, steps, lengths, coef, seed, ids, 1, clip)
    for g, a in zip(got, again):
        torch.testing.assert_close(g, a, rtol=0, atol=0, equal_nan=True)


def test_public_api_and_backend():
    coef, clip = _table("ddpm_clip")
    gen = _gen("api")
    L, E = 2, (3, 5)
    steps, lengths = torch.tensor([0, 4]), torch.tensor([2, 1])
    root, frozen, ids, seed = _inputs(2, E, torch.float32, gen)
    assert round_ops.get_backend("triton", torch.device("cpu")).name == "triton"
    chains = RoundChains(frozen, steps, lengths, ids)
    spec = RoundSpec(coef, seed, 0, clip)
    Y = round_ops.frozen_draft(root, chains, spec, L, backend="triton")
    P = _x0_hat(Y, frozen, steps, coef, 0, gen)
    res = round_ops.verify_frozen(Y, P, chains, spec, backend="triton")
    raw = verify_op(Y, P, frozen, steps, lengths, coef, seed, ids, 0, clip)
    for a, b in zip(res, raw):
        assert torch.equal(a, b)
    assert res.next_state.shape == (2, 3, 5) and res.next_prev.shape == (0,)
    # multistep: prev is the last field of RoundChains (and of the schema); next_prev the 7th
    prev = frozen.flip(0).contiguous()
    chains = chains._replace(prev=prev)
    Ym = round_ops.frozen_draft(root, chains, spec, L, backend="triton")
    assert torch.equal(
        Ym, draft_op(root, frozen, steps, lengths, coef, seed, ids, L, 0, clip, prev)
    )
    res = round_ops.verify_frozen(Ym, P, chains, spec, backend="triton")
    raw = verify_op(Ym, P, frozen, steps, lengths, coef, seed, ids, 0, clip, prev)
    for a, b in zip(res, raw):
        assert torch.equal(a, b)
    assert res.next_prev.shape == (2, 3, 5)


# ---------------------------------------------------------------- multistep (prev)
N_MS = 40  # dpmsolver_sde_transitions(N_MS): stochastic steps, then a deterministic last one


def _ms_table(mix: bool):
    """The table of DPM-Solver++ 2M SDE (H != 0 from step 1; A = 0). ``mix``: half of E moved to
    A (the same means without clipping) and H tripled, so that clipping and the H term weigh; the
    deterministic last step gets an H term too (the family's is 0)."""
    coef = round_tables(dpmsolver_sde_transitions(N_MS))
    assert coef.shape == (layout.NUM_ROWS, N_MS)
    assert bool((coef[layout.ROW_H, 1:-1] != 0).all()) and coef[layout.ROW_STD, -1] == 0
    if mix:
        coef = coef.clone()
        coef[layout.ROW_A] = 0.5 * coef[layout.ROW_E]
        coef[layout.ROW_E] = 0.5 * coef[layout.ROW_E]
        coef[layout.ROW_H] *= 3
        coef[layout.ROW_H, -1] = coef[layout.ROW_H, -2]
    return coef


# role: (step, window length) of a chain for window L, and its expected (num_accepted,
# committed, root_exact); "reject" has a huge gap at position L - 1, the others tiny gaps
_ROLES = {
    "reject": (lambda L: (20, L), lambda L: (L - 1, L, False)),
    "accept": (lambda L: (12, L), lambda L: (L, L, True)),
    "det": (lambda L: (N_MS - 1 - L, L), lambda L: (L, L + 1, False)),  # then the last step
    "idle": (lambda L: (15, 0), lambda L: (0, 0, False)),
    "det0": (lambda L: (N_MS - 1, 0), lambda L: (0, 1, False)),  # n = 0 at the last step
    "end": (lambda L: (N_MS, 0), lambda L: (0, 0, False)),  # finished
}


def _ms_round(monkeypatch, freeze, dtype, clip_on, L, E, roles, key):
    """Draft (checked step by step) and verify a multistep round with poisoned outputs; returns
    the inputs and the verify result."""
    coef = _ms_table(mix=clip_on)
    clip = 1.0 if clip_on else math.inf
    B = len(roles)
    gen = _gen("multistep", key, freeze, dtype, clip_on, L, E, roles)
    root, frozen, ids, seed = _inputs(B, E, dtype, gen)
    if clip_on and freeze == layout.FREEZE_X0:
        frozen = (frozen.double() * 3).to(dtype)  # partly outside [-1, 1]
    prev = (1.5 * torch.randn((B, *E), generator=gen, dtype=torch.float64)).to(dtype)
    steps = torch.tensor([_ROLES[r][0](L)[0] for r in roles], dtype=torch.int64)
    lengths = torch.tensor([_ROLES[r][0](L)[1] for r in roles], dtype=torch.int64)
    with monkeypatch.context() as mp:
        poison_empty(mp)
        Y = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip, prev)
    assert_draft_matches(Y, root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip, prev)
    small = _x0_hat(Y, frozen, steps, coef, freeze, gen, gap_lo=0.001, gap_hi=0.002)
    huge = _x0_hat(Y, frozen, steps, coef, freeze, gen, gap_lo=60.0, gap_hi=80.0)
    pick = torch.zeros(B, L + 1, *([1] * len(E)), dtype=torch.bool)
    for b, r in enumerate(roles):
        pick[b, L - 1] = r == "reject"
    P = torch.where(pick, huge, small)
    with monkeypatch.context() as mp:
        poison_empty(mp)
        got = verify_op(Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip, prev)
    args = (Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip)
    return args, prev, got


MS_CASES = [  # (freeze, dtype, clip on, L, event, chain roles)
    (layout.FREEZE_X0, torch.float64, False, 3, (37,), ("reject", "det", "idle")),
    (layout.FREEZE_EPS, torch.float64, True, 3, (2, 65), ("accept", "det0", "reject")),
    (layout.FREEZE_X0, torch.float64, True, 1, (5,), ("reject", "det", "det0")),
    (layout.FREEZE_EPS, torch.float64, False, 1, (37,), ("det", "end", "accept")),
    (layout.FREEZE_X0, torch.float32, True, 3, (2, 65), ("det",)),
    (layout.FREEZE_EPS, torch.float32, False, 1, (37,), ("det", "reject", "idle")),
    (layout.FREEZE_EPS, torch.float32, True, 3, (37,), ("reject",)),
    (layout.FREEZE_X0, torch.float32, False, 3, (2, 65), ("accept", "reject", "det0")),
    (layout.FREEZE_EPS, torch.float16, False, 3, (37,), ("reject", "det", "idle")),
    (layout.FREEZE_X0, torch.float16, True, 1, (1,), ("accept",)),
]


@pytest.mark.parametrize("freeze,dtype,clip_on,L,E,roles", MS_CASES, ids=str)
def test_multistep_round_matches_reference(monkeypatch, freeze, dtype, clip_on, L, E, roles):
    """frozen_draft and verify_frozen with ``prev`` against the float64 reference: every drafted
    state (with its H q term), the log ratios (with H (P_{j-1} - q_{j-1})), the commits of every
    kind (rejection at L - 1, accepted window, deterministic step after it or at n = 0, idle,
    finished) and next_prev bit for bit; outputs poisoned before the kernels write them."""
    args, prev, got = _ms_round(monkeypatch, freeze, dtype, clip_on, L, E, roles, "cases")
    assert_verify_matches(got, *args, prev=prev)
    want = [_ROLES[r][1](L) for r in roles]
    assert got[0].tolist() == [w[0] for w in want]
    assert got[1].tolist() == [w[1] for w in want]
    assert got[4].tolist() == [w[2] for w in want]
    for t in got[2:4] + got[6:]:
        assert bool(torch.isfinite(t).all())
    # without prev: the single-step round (no H term), and an empty next_prev
    plain = verify_op(*args)
    assert plain[6].shape == (0,) and plain[6].dtype == dtype
    assert_verify_matches(plain, *args)


@pytest.mark.parametrize("freeze", [layout.FREEZE_X0, layout.FREEZE_EPS])
def test_multistep_split_event_and_tiled_scan(monkeypatch, freeze):
    """One chain, a long window (L = 5) and an event of 130 (33 counters): the draft and the
    finalize over 2 blocks, the partial sums over 2 chunks, the finalize scan forced into 2-step
    / 1-chunk tiles; a rejection at position 4 (its d and the reflection read position 3)."""
    monkeypatch.setattr(tr, "_BLOCK_L_MAX", 2)
    monkeypatch.setattr(tr, "_BLOCK_NB_MAX", 1)
    L, E = 5, (2, 65)
    Q = -(-130 // 4)
    assert tr.draft_block(1, Q, tk.num_sms(torch.device("cpu"))) < Q
    assert tr.partial_chunk(L, Q, tk.num_sms(torch.device("cpu"))) < Q
    args, prev, got = _ms_round(
        monkeypatch, freeze, torch.float32, True, L, E, ("reject",), "split"
    )
    assert_verify_matches(got, *args, prev=prev)
    assert got[0].tolist() == [L - 1] and got[1].tolist() == [L]
    assert torch.equal(got[6], args[1][:, L - 1])


def test_multistep_checks_can_fail(monkeypatch):
    """The multistep checks see a missing H term and a wrong next_prev."""
    roles = ("reject", "det", "idle")
    args, prev, got = _ms_round(
        monkeypatch, layout.FREEZE_EPS, torch.float64, True, 3, (37,), roles, "fail"
    )
    Y, P, frozen, steps, lengths, coef, seed, ids, freeze, clip = args
    # the draft without its H term
    root = Y[:, 0].contiguous()
    Y0 = draft_op(root, frozen, steps, lengths, coef, seed, ids, 3, freeze, clip)
    with pytest.raises(AssertionError, match="off the float64 draft step"):
        assert_draft_matches(
            Y0, root, frozen, steps, lengths, coef, seed, ids, 3, freeze, clip, prev
        )
    # next_prev from the wrong position / the wrong chain
    for wrong in (P[:, 2].clone(), prev.flip(0)):
        bad = (*got[:6], wrong)
        with pytest.raises(AssertionError, match="next_prev"):
            assert_verify_matches(bad, *args, prev=prev)
    # the verify without its H term (d_j, the reflection, the deterministic step)
    P2 = _x0_hat(Y, frozen, steps, coef, freeze, _gen("fail-gap"), gap_lo=0.5, gap_hi=1.0)
    args2 = (Y, P2) + args[2:]
    plain = verify_op(*args2)
    assert_verify_matches(plain, *args2)
    with pytest.raises(AssertionError, match="log ratio"):
        assert_verify_matches((*plain[:6], got[6]), *args2, prev=prev)


# ---------------------------------------------------------------- opcheck / torch.compile
def _small_round(freeze=1):
    coef, clip = _table("ddpm_clip")
    gen = _gen("small", freeze)
    L, E = 2, (2, 5)
    steps, lengths = torch.tensor([0, 5, 3]), torch.tensor([2, 1, 0])
    root, frozen, ids, seed = _inputs(3, E, torch.float32, gen)
    Y = draft_op(root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip)
    P = _x0_hat(Y, frozen, steps, coef, freeze, gen)
    return root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip, Y, P


def test_opcheck():
    root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip, Y, P = _small_round()
    torch.library.opcheck(noise_op, (seed, ids, steps, L, 10, torch.float32))
    torch.library.opcheck(
        draft_op, (root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip)
    )
    torch.library.opcheck(
        verify_op, (Y, P, frozen, steps, lengths, coef, seed, ids, freeze, math.inf)
    )
    # multistep: prev in, next_prev out
    prev = frozen.flip(0).contiguous()
    torch.library.opcheck(
        draft_op, (root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip, prev)
    )
    torch.library.opcheck(
        verify_op, (Y, P, frozen, steps, lengths, coef, seed, ids, freeze, math.inf, prev)
    )


@pytest.mark.parametrize("multistep", [False, True])
def test_torch_compile_fullgraph(multistep):
    """Draft + verify in one compiled function: no graph break (the interpreted ops are opaque
    custom ops with fake kernels) and the eager results, bit for bit; multistep: with prev."""
    torch._dynamo.reset()
    root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip, Y, P = _small_round(0)
    prev = frozen.flip(0).contiguous() if multistep else None

    def f(root, frozen, steps, lengths, coef, seed, ids, P, prev):
        Yd = torch.ops.specdiff.triton_frozen_draft(
            root, frozen, steps, lengths, coef, seed, ids, L, freeze, clip, prev
        )
        res = torch.ops.specdiff.triton_verify_frozen(
            Yd, P, frozen, steps, lengths, coef, seed, ids, freeze, clip, prev
        )
        return (Yd,) + tuple(res)

    args = (root, frozen, steps, lengths, coef, seed, ids, P, prev)
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True)(*args)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


# ---------------------------------------------------------------- the compiled path, without GPU
_AOT_SCRIPT = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from specdiff_kernels.ops.triton import verify as tk, round as tr
assert not tk.INTERPRET and tr.DEVICES == ("cuda",)
T = GPUTarget("cuda", 90, 32)

def compile_(fn, sig, consts):
    names = list(sig)  # as at launch: 16-byte aligned pointers, D and Q divisible by 16
    div = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
           if sig[a].startswith("*") or a in ("D", "Q")}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                    constexprs=consts, attrs=div)
    return triton.compile(src, target=T, options=dict(num_warps=4, num_stages=1))

# 1. every kernel compiles to an sm_90 cubin (bf16: conversions; fp64: fp64 transcendentals),
#    with the clip bound typed fp32 (a direct launch) or fp64 (how Inductor passes Python floats:
#    on an H200 an fp64 bound once promoted the fp32 accumulators and failed to compile)
ids = dict(steps_ptr="*i64", len_ptr="*i64", coef_ptr="*fp64", seed_ptr="*i64", ids_ptr="*i64")
#    with and without the multistep term (HAS_PREV)
for dt, acc, clip_t, ms in (("bf16", False, "fp32", False), ("bf16", False, "fp64", True),
                            ("fp32", False, "fp64", False), ("fp64", True, "fp64", True)):
    clip = dict(clip_hi=clip_t, clip_mid=clip_t, clip_lo=clip_t)
    part = "*fp64" if acc else "*fp32"
    io = dict(y_ptr=f"*{dt}", p_ptr=f"*{dt}", frozen_ptr=f"*{dt}", **ids, part_ptr=part)
    c = dict(FREEZE=1, HAS_CLIP=True, HAS_PREV=ms, ACC_FP64=acc, BLOCK=256)
    compile_(tr._chain_noise_kernel, dict(seed_ptr="*i64", ids_ptr="*i64", steps_ptr="*i64",
             xi_ptr=f"*{dt}", u_ptr="*fp32", W="i32", D="i32", Q="i32"),
             dict(ACC_FP64=acc, BLOCK=256))
    compile_(tr._frozen_draft_kernel, dict(root_ptr=f"*{dt}", frozen_ptr=f"*{dt}", **ids,
             prev_ptr=f"*{dt}", y_ptr=f"*{dt}", W="i32", N="i32", D="i32", Q="i32", **clip), c)
    compile_(tr._verify_partials_kernel, dict(**io, L="i32", N="i32", D="i32", Q="i32",
             CHUNK="i32", NB="i32", **clip), c)
    out = dict(nacc_ptr="*i64", comm_ptr="*i64", next_ptr=f"*{dt}", nfz_ptr=f"*{dt}",
               exact_ptr="*i1", lr_ptr="*fp32", prev_ptr=f"*{dt}", nprev_ptr=f"*{dt}")
    k = compile_(tr._verify_finalize_kernel, dict(**io, **out, L="i32", N="i32", D="i32", Q="i32",
                 NB="i32", **clip), dict(c, BLOCK_L=8, BLOCK_NB=16))
    assert "cubin" in k.asm

# 2. what Inductor sees: the triton_ops decompose into kernel calls whose mutation analysis (run
#    for sm_90 by a stand-in driver) finds that only outputs and the partial buffer are written
# @AOT_STANDIN@
with mode:
    d = dict(device="cuda")
    x = torch.empty(2, 3, 32, 32, dtype=torch.bfloat16, **d)
    Y = torch.empty(2, 9, 3, 32, 32, dtype=torch.bfloat16, **d)
    st = torch.empty(2, dtype=torch.int64, **d)
    sd = torch.empty((), dtype=torch.int64, **d)
    coef = torch.empty(9, 50, dtype=torch.float64, **d)

def f(x, Y, st, sd, coef):
    a = torch.ops.specdiff.triton_frozen_draft(x, x, st, st, coef, sd, st, 8, 1, 0.37)
    b = torch.ops.specdiff.triton_verify_frozen(Y, Y, x, st, st, coef, sd, st, 0, 1.0)
    c = torch.ops.specdiff.triton_chain_noise(sd, st, st, 8, 3072, torch.bfloat16)
    # multistep (prev): next_prev is one more output
    a2 = torch.ops.specdiff.triton_frozen_draft(x, x, st, st, coef, sd, st, 8, 0, 0.37, x)
    b2 = torch.ops.specdiff.triton_verify_frozen(Y, Y, x, st, st, coef, sd, st, 1, 1.0, x)
    return a, b, c, a2, b2

gm, hops = trace_hops(f, x, Y, st, sd, coef)
assert len(hops) == 7, len(hops)
outputs = {"y_ptr", "part_ptr", "nacc_ptr", "comm_ptr", "next_ptr", "nfz_ptr", "exact_ptr",
           "lr_ptr", "xi_ptr", "u_ptr", "nprev_ptr"}
for nd in hops:
    clone = set(nd.kwargs["tensors_to_clone"])
    assert clone and clone <= outputs, clone
assert not any(nd.op == "call_function" and "copy_" in str(nd.target) for nd in gm.graph.nodes)

# 3. Inductor copies each kernel's source and its @jit dependencies into a generated module:
#    that module must import (a dependency whose default argument names a global breaks it, as
#    triton.language.random.philox_impl's does)
import importlib.util, os, tempfile
from torch._inductor.codegen.wrapper import \
    user_defined_triton_kernel_transitive_closure_source_code as closure
tmp = tempfile.mkdtemp()
for kern in (tr._chain_noise_kernel, tr._frozen_draft_kernel, tr._verify_partials_kernel,
             tr._verify_finalize_kernel):
    path = os.path.join(tmp, kern.fn.__name__ + ".py")
    with open(path, "w") as fh:
        fh.write("import triton\nimport triton.language as tl\n" + closure(kern))
    spec = importlib.util.spec_from_file_location(kern.fn.__name__, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print("AOT-OK", len(hops))
"""


@pytest.mark.skipif(
    not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
    reason="Triton's NVIDIA backend (ptxas) is not installed",
)
def test_compiled_path_without_gpu():
    """Ahead-of-time check of the GPU path on a CPU machine, in a subprocess without
    TRITON_INTERPRET: the kernels compile to sm_90 cubins (bf16, fp64); the triton_ops decompose
    for Inductor into kernel calls that write only their outputs (Triton's mutation analysis
    succeeds: it fails, and Inductor then clones every input, on kernel code that only works with
    runtime scalars); and the kernel source Inductor generates imports."""
    run_aot_script(_AOT_SCRIPT, ROOT, "AOT-OK")


# ---------------------------------------------------------------- the static sampler on these kernels
def test_static_sampler_on_triton_kernels_follows_the_cpp_kernels():
    """The static sampler with backend="triton" runs the round a GPU runs (Triton draft and verify,
    interpreted here; no CUDA graph): chain by chain the same rounds, decisions and samples (float64,
    up to rounding) as with the C++ kernels, on the embedded digits network and DDPM."""
    from specdiff_kernels import models
    from specdiff_kernels.sampling.sampler import SpeculativeSampler

    digits = models.load("digits")
    net = digits.target.double()
    T = digits.transitions(30)
    runs = {}
    try:
        for backend in ("cpp", "triton"):
            runs[backend] = SpeculativeSampler(
                net, T, window=4, path="static", compile=False, backend=backend
            ).sample(
                6,
                digits.event_shape,
                generator=torch.Generator().manual_seed(5),
                dtype=torch.float64,
            )
    finally:
        digits.target.float()
    cpp, tri = runs["cpp"], runs["triton"]
    assert tri.stats.rounds == cpp.stats.rounds
    assert tri.stats.accepted_by_position == cpp.stats.accepted_by_position
    assert 0 < sum(cpp.stats.accepted_by_position) < sum(cpp.stats.attempted_by_position)
    diff = (tri.samples - cpp.samples).flatten(1).abs().amax(1)
    # a flipped accept decision would move a chain by O(0.1); fp64 kernels agree to ~1e-12
    assert bool((diff < 1e-9).all()), diff

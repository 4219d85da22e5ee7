"""Triton backend of the round ops (docs/design.md §6): ``torch.ops.specdiff.triton_chain_noise`` /
``triton_frozen_draft`` / ``triton_verify_frozen``, the CUDA kernels of ``specdiff::chain_noise`` /
``frozen_draft`` / ``verify_frozen``, and registration as round backend ``"triton"``.

Semantics: :mod:`specdiff_kernels.ops.reference.round` (the oracle). Conventions as
:mod:`._launch`: ``triton_op`` + ``wrap_triton`` when compiled (Inductor sees the kernels; the
body is the fake), opaque ``custom_op`` + fake under ``TRITON_INTERPRET=1`` (CPU tensors).

Noise
-----
Philox4x32-10 (the rounds of ``tl.randint4x``; bit-identical to ``reference.round.philox4x32``)
keyed by the int64 seed read in-kernel (k0 = low word, k1 = high word). A program owns a block of
counters ``i`` of a D-vector in the quarter layout (Q = ceil(D/4), element ``lane * Q + i``): one
Philox call per counter gives the four lanes (two Box-Muller pairs), stored / read as four
contiguous runs. Box-Muller and every sum run in fp32 (fp64 for fp64 states).

Kernels
-------
* ``_chain_noise``: grid (B * window, cdiv(Q, BLOCK)); the i-block 0 program of a row writes u.
* ``_frozen_draft``: grid (B, cdiv(Q, BLOCK)); each program keeps its counters' four lane vectors of
  the state in registers and loops over the window (a runtime loop), rounding each drafted state to
  the state dtype before drafting from it (as the reference). BLOCK adapts to B * Q so that small
  problems still spread over the SMs (the loop is latency-bound).
* ``verify_frozen``: two launches. ``_verify_partials``: grid (B * L, chunks) partial
  (<d_j, xi_j>, ||d_j||^2) of one (chain, step) row over a chunk of counters (rows j >= n write 0
  and read nothing; per lane ``_row_sums_lane``). ``_verify_finalize``: grid (B, cdiv(Q, BLOCK)),
  three passes: ``_scan``: every program of a chain reduces the chain's partials in the same fixed
  order (bit-identical sums in all of them), forms the log ratios, draws u_j and finds the first
  rejection; ``_decide``: the round's outcome; ``_commit_lane`` (per lane): its block of
  next_state / next_frozen per the reference's commit rules (xi regenerated in-kernel for the
  reflection). Block 0 also writes num_accepted, committed, root_exact and log_ratio.

Multistep (``prev`` given; constexpr HAS_PREV, so without it nothing more is read or computed):
the draft carries its previous x0-hat in registers (prev, then its own); a partial-sum row j >= 1
also reads position j - 1 (P_{j-1}, and y_{j-1} for freeze eps) for d_j's H term; the finalize
reads prev or position j - 1 at the deciding position and writes next_prev. Without prev the
kernels get placeholders (frozen for prev, the empty next_prev) that they never touch.

Nothing is read back to the host: steps / lengths are clamped in-kernel, the seed is read from its
tensor, and the clip bound travels as three float32 arguments that sum to it exactly in float64
(fp64 states clip at the exact bound; the others at its fp32 rounding, as torch's clamp does). So
the ops are CUDA-graph capturable and ``torch.compile(fullgraph=True)`` traces them (Inductor sees
the kernels through ``wrap_triton``). No autotuning: the kernels are a
Philox + elementwise stream (chain_noise, finalize, partials) or a latency-bound loop (draft), and a
fixed block per role does as well; under the interpreter blocks are small (32 counters) so the
multi-block and multi-chunk paths run on small shapes.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks, layout
from .. import round as round_ops
from ..backends import REGISTRY, Backend
from ..layout import acc_dtype
from ..round_spec import RoundChains, RoundSpec, draft_parts, verify_parts, with_schema
from ._launch import (
    DEVICES,
    INTERPRET,
    accept,
    contig,
    define,
    next_pow2,
    num_sms,
    quiet,
    reflect_coef,
    register_cuda,
    wrap_triton,
)

# Table rows (coef[ROW, step]) as compile-time constants of the kernels.
_ROW_A = tl.constexpr(layout.ROW_A)
_ROW_E = tl.constexpr(layout.ROW_E)
_ROW_G = tl.constexpr(layout.ROW_G)
_ROW_STD = tl.constexpr(layout.ROW_STD)
_ROW_X0_Y = tl.constexpr(layout.ROW_X0_Y)
_ROW_X0_F = tl.constexpr(layout.ROW_X0_F)
_ROW_EPS_Y = tl.constexpr(layout.ROW_EPS_Y)
_ROW_EPS_P = tl.constexpr(layout.ROW_EPS_P)
_ROW_H = tl.constexpr(layout.ROW_H)
_STREAM_NORMAL = tl.constexpr(layout.STREAM_NORMAL)
_STREAM_UNIFORM = tl.constexpr(layout.STREAM_UNIFORM)
_PHILOX_M0 = tl.constexpr(layout.PHILOX_M0)
_PHILOX_M1 = tl.constexpr(layout.PHILOX_M1)
_PHILOX_W0 = tl.constexpr(layout.PHILOX_W0)
_PHILOX_W1 = tl.constexpr(layout.PHILOX_W1)
_TWO_PI = tl.constexpr(2.0 * math.pi)
_TWO_M24 = tl.constexpr(2.0**-24)

# Blocks, in Philox counters (4 elements each). Interpreter: small, so tests hit several blocks.
if INTERPRET:
    _NOISE_BLOCK = _FIN_BLOCK = _PART_BLOCK = 32
    _DRAFT_BLOCK_MIN = _DRAFT_BLOCK_MAX = 32
    _CHUNK_MAX = 64
else:
    _NOISE_BLOCK = _FIN_BLOCK = _PART_BLOCK = 256
    _DRAFT_BLOCK_MIN, _DRAFT_BLOCK_MAX = 32, 512
    _CHUNK_MAX = 8192
_BLOCK_L_MAX = 16  # window steps per tile of the finalize scan
_BLOCK_NB_MAX = 64  # partial-sum chunks per tile of the finalize reduction


# ---------------------------------------------------------------- device helpers
# The four lanes of a counter block (elements lane * Q + i) are a tl.static_range loop over lane
# (unrolled at compile time: the same code as four written-out calls). Values that travel together
# between the passes are Triton tuples, unpacked by position (compile-time structure only):
#   key    (k0, k1): the Philox key words (_philox_key);
#   ns     the four lanes' normals at counters i (_normals), lane l = ns[l]; ys, fs, qs likewise;
#   ch     (b, k, chain, n): the program's chain (row b, first step k, chain id, clamped window
#          length n);
#   io     the tensor pointers a lane reads (and writes), in the order its docstring gives;
#   rows   (row, frow, mrow): element offsets of y_j / P_j, of the per-chain [B, *E] tensors, and
#          of position j - 1 (multistep; read only past the root);
#   cf     the table rows of the step (and the clip bound), as the consuming lane lists them;
#   dec    (reflection coefficient, rejected, det, keep_frozen, at_root): the commit's decision.
@triton.jit
def _philox_key(seed_ptr):
    """Key words (k0, k1) = (low, high) 32 bits of the int64 seed."""
    s = tl.load(seed_ptr)
    return s.to(tl.uint32), (s >> 32).to(tl.uint32)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 words (the rounds of ``tl.randint4x``, i.e. of
    ``triton.language.random.philox_impl``, which Inductor cannot copy into its generated code: its
    default argument names a module global)."""
    m0 = tl.full((), _PHILOX_M0, tl.uint32)
    m1 = tl.full((), _PHILOX_M1, tl.uint32)
    for _ in tl.static_range(10):
        a0, a2 = c0, c2
        c0 = tl.umulhi(m1, a2) ^ c1 ^ k0
        c2 = tl.umulhi(m0, a0) ^ c3 ^ k1
        c1 = m1 * a2
        c3 = m0 * a0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _philox(k0, k1, c0, step, chain, STREAM: tl.constexpr):
    """Philox4x32-10 of counter (c0, step + 1, chain, STREAM), words mod 2^32 (c0: the shape)."""
    w0 = c0.to(tl.uint32)
    z = w0 * 0
    w1 = z + (step + 1).to(tl.uint32)
    w2 = z + chain.to(tl.uint32)
    w3 = z + STREAM
    return _philox4x32_10(w0, w1, w2, w3, k0, k1)


@triton.jit
def _box_muller(xa, xb, ACC_FP64: tl.constexpr):
    """sqrt(-2 ln v) (cos 2 pi t, sin 2 pi t), v = (2 (xa >> 9) + 1) 2^-24, t = (xb >> 8) 2^-24."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    v = (2 * (xa >> 9) + 1).to(acc_t) * _TWO_M24
    t = (xb >> 8).to(acc_t) * _TWO_M24
    r = tl.sqrt(-2.0 * tl.log(v))
    th = tl.full((), _TWO_PI, acc_t) * t
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _normals(key, i, step, chain, ACC_FP64: tl.constexpr):
    """The four lanes of xi(seed, chain, step) at counters i (lane l is element l * Q + i)."""
    x0, x1, x2, x3 = _philox(key[0], key[1], i, step, chain, _STREAM_NORMAL)
    n0, n1 = _box_muller(x0, x1, ACC_FP64)
    n2, n3 = _box_muller(x2, x3, ACC_FP64)
    return n0, n1, n2, n3


@triton.jit
def _uniform(key, step, chain):
    """u(seed, chain, step) in [0, 1), float32 (exact); step may be a scalar or a block."""
    x0, _, _, _ = _philox(key[0], key[1], step * 0, step, chain, _STREAM_UNIFORM)
    return (x0 >> 8).to(tl.float32) * _TWO_M24


@triton.jit
def _lane(lane: tl.constexpr, i, mi, Q, D):
    """The quarter layout: lane ``lane`` of counters i is elements lane * Q + i -> (offsets, mask);
    mi: the counters' own bound."""
    off = lane * Q + i
    return off, mi & (off < D)


@triton.jit
def _load_lanes(ptr, i, mi, Q, D):
    """The four lanes at counters i of the D-vector at ptr (masked elements 0), in its dtype."""
    vals = ()
    for lane in tl.static_range(4):
        _, m = _lane(lane, i, mi, Q, D)
        vals = vals + (tl.load(ptr + lane * Q + i, mask=m, other=0.0),)
    return vals


@triton.jit
def _store_lanes(ptr, vals, i, mi, Q, D):
    """Store the four lanes vals at counters i of the D-vector at ptr (in ptr's dtype)."""
    for lane in tl.static_range(4):
        _, m = _lane(lane, i, mi, Q, D)
        tl.store(ptr + lane * Q + i, vals[lane].to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _clip_value(clip_hi, clip_mid, clip_lo, ACC_FP64: tl.constexpr):
    """The clip bound from its three-float32 split (fp64: the exact float64 value; else the fp32
    rounding, as torch's clamp of a float tensor). Written so that it also traces with the
    arguments as Python constants (Inductor's mutation analysis)."""
    # Inductor passes Python floats as fp64 scalars: cast, or fp32 kernels would promote to fp64
    # (measured on an H200: "loop-carried variable a_vec ... re-assigned to fp64")
    if ACC_FP64:
        c = (((tl.zeros((), tl.float64) + clip_hi) + clip_mid) + clip_lo).to(tl.float64)
    else:
        c = (tl.zeros((), tl.float32) + clip_hi).to(tl.float32)
    return c


@triton.jit
def _clip(p, c, HAS_CLIP: tl.constexpr):
    if HAS_CLIP:
        p = tl.minimum(
            tl.maximum(p, -c, propagate_nan=tl.PropagateNan.ALL),
            c,
            propagate_nan=tl.PropagateNan.ALL,
        )
    return p


@triton.jit
def _coef(coef_ptr, row: tl.constexpr, kc, N, ACC_FP64: tl.constexpr):
    """coef[row, kc] in the accumulation dtype (kc already clamped into the table)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    return tl.load(coef_ptr + row * N + kc).to(acc_t)


@triton.jit
def _draft_coefs(coef_ptr, kc, N, ACC_FP64: tl.constexpr):
    """The table rows a drafted step reads at column kc: A, E, G, std, X0_Y, X0_F."""
    return (
        _coef(coef_ptr, _ROW_A, kc, N, ACC_FP64),
        _coef(coef_ptr, _ROW_E, kc, N, ACC_FP64),
        _coef(coef_ptr, _ROW_G, kc, N, ACC_FP64),
        _coef(coef_ptr, _ROW_STD, kc, N, ACC_FP64),
        _coef(coef_ptr, _ROW_X0_Y, kc, N, ACC_FP64),
        _coef(coef_ptr, _ROW_X0_F, kc, N, ACC_FP64),
    )


@triton.jit
def _prev_coefs(coef_ptr, kc, k, N, a, ACC_FP64: tl.constexpr, HAS_PREV: tl.constexpr):
    """The multistep rows of step k (column kc): (H, and X0_Y, X0_F of step k - 1, which convert
    the draft's previous x0-hat); without prev, placeholders (a) that are never read."""
    if HAS_PREV:
        h = _coef(coef_ptr, _ROW_H, kc, N, ACC_FP64)
        kcm = _step_index(k - 1, N)
        x0y_m = _coef(coef_ptr, _ROW_X0_Y, kcm, N, ACC_FP64)
        x0f_m = _coef(coef_ptr, _ROW_X0_F, kcm, N, ACC_FP64)
    else:
        h, x0y_m, x0f_m = a, a, a
    return h, x0y_m, x0f_m


@triton.jit
def _step_index(k, N):
    """The table column of sampling step k (clamped into 0..N-1, as the reference)."""
    return tl.minimum(tl.maximum(k, 0), N - 1)


@triton.jit
def _draft_x0(y, f, x0y, x0f, FREEZE: tl.constexpr):
    """The frozen draft's x0-hat at y: f (freeze x0) or X0_Y y - X0_F f (freeze eps)."""
    if FREEZE == 0:
        return f
    else:
        return x0y * y - x0f * f


@triton.jit
def _affine(p, x, a, e, g, cl, HAS_CLIP: tl.constexpr):
    """m = A clip(p) + E p + G x."""
    return a * _clip(p, cl, HAS_CLIP) + e * p + g * x


@triton.jit
def _gap(p, pq, a, e, cl, HAS_CLIP: tl.constexpr):
    """d = m_p - m_q = A (clip(p) - clip(pq)) + E (p - pq)."""
    return a * (_clip(p, cl, HAS_CLIP) - _clip(pq, cl, HAS_CLIP)) + e * (p - pq)


@triton.jit
def _prev_lane(
    y_ptr, p_ptr, mrow, off, mm, f, x0y_m, x0f_m, ACC_FP64: tl.constexpr, FREEZE: tl.constexpr
):
    """Multistep, one lane at window position j - 1 (row mrow, read where mm): (P_{j-1}, the
    draft's x0-hat at y_{j-1})."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pm = tl.load(p_ptr + mrow + off, mask=mm, other=0.0).to(acc_t)
    if FREEZE == 0:
        qm = f  # (y_{j-1} is not needed: the draft's x0-hat is f everywhere)
    else:
        ym = tl.load(y_ptr + mrow + off, mask=mm, other=0.0).to(acc_t)
        qm = _draft_x0(ym, f, x0y_m, x0f_m, FREEZE)
    return pm, qm


# ---------------------------------------------------------------- chain_noise / frozen_draft
@triton.jit(do_not_specialize=["W"])
def _chain_noise_kernel(
    seed_ptr,
    ids_ptr,
    steps_ptr,
    xi_ptr,
    u_ptr,
    W,
    D,
    Q,
    ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row = b * W + j, i-block): xi of step steps[b] + j at its counters; block 0: u."""
    row = tl.program_id(0).to(tl.int64)
    ib = tl.program_id(1)
    b = row // W
    k = tl.load(steps_ptr + b) + row % W
    chain = tl.load(ids_ptr + b)
    key = _philox_key(seed_ptr)
    i = ib * BLOCK + tl.arange(0, BLOCK)
    ns = _normals(key, i, k, chain, ACC_FP64)
    _store_lanes(xi_ptr + row * D, ns, i, i < Q, Q, D)
    tl.store(u_ptr + row, _uniform(key, k, chain), mask=ib == 0)


@triton.jit
def _draft_lane(
    y,
    f,
    q,
    xi,
    cf,
    out_ty: tl.constexpr,
    FREEZE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    """One drafted lane: (m_q(y) + s xi rounded to the state dtype, back in the acc dtype; the
    draft's x0-hat at y). Multistep: m_q adds H q (q: the draft's previous x0-hat). cf: the step's
    (A, E, G, std, X0_Y, X0_F, H, clip bound)."""
    a, e, g, s, x0y, x0f, h, cl = cf
    pq = _draft_x0(y, f, x0y, x0f, FREEZE)
    mq = _affine(pq, y, a, e, g, cl, HAS_CLIP)
    if HAS_PREV:
        mq = mq + h * q
    return (mq + s * xi).to(out_ty).to(y.dtype), pq


@triton.jit
def _draft_step(
    ys,
    fs,
    qs,
    ns,
    cf,
    out_ty: tl.constexpr,
    FREEZE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    """One drafted step of the four lanes -> (the drafted states, the draft's x0-hats at ys)."""
    new_ys = ()
    ps = ()
    for lane in tl.static_range(4):
        y, p = _draft_lane(
            ys[lane], fs[lane], qs[lane], ns[lane], cf, out_ty, FREEZE, HAS_CLIP, HAS_PREV
        )
        new_ys = new_ys + (y,)
        ps = ps + (p,)
    return new_ys, ps


@triton.jit(do_not_specialize=["W", "N"])
def _frozen_draft_kernel(
    root_ptr,
    frozen_ptr,
    steps_ptr,
    len_ptr,
    coef_ptr,
    seed_ptr,
    ids_ptr,
    prev_ptr,
    y_ptr,
    W,
    N,
    D,
    Q,
    clip_hi,
    clip_mid,
    clip_lo,
    FREEZE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_PREV: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (chain b, i-block): Y[b, 0] = root, then the window's drafted states (its
    counters). Multistep (HAS_PREV): the draft's previous x0-hat q (prev, then its own) rides
    along in registers."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    ty = y_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mi = i < Q
    src = b * D
    dst = b * (W + 1) * D
    roots = _load_lanes(root_ptr + src, i, mi, Q, D)
    _store_lanes(y_ptr + dst, roots, i, mi, Q, D)
    ys = [r.to(acc_t) for r in roots]
    fs = [f.to(acc_t) for f in _load_lanes(frozen_ptr + src, i, mi, Q, D)]
    if HAS_PREV:
        qs = [q.to(acc_t) for q in _load_lanes(prev_ptr + src, i, mi, Q, D)]
    else:  # (placeholders, never read)
        qs = fs
    k = tl.load(steps_ptr + b)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), W)
    chain = tl.load(ids_ptr + b)
    key = _philox_key(seed_ptr)
    cl = _clip_value(clip_hi, clip_mid, clip_lo, ACC_FP64)
    for j in range(0, W):
        if j < n:
            kc = _step_index(k + j, N)
            a, e, g, s, x0y, x0f = _draft_coefs(coef_ptr, kc, N, ACC_FP64)
            if HAS_PREV:
                h = _coef(coef_ptr, _ROW_H, kc, N, ACC_FP64)
            else:
                h = a  # (never read)
            ns = _normals(key, i, k + j, chain, ACC_FP64)
            cf = (a, e, g, s, x0y, x0f, h, cl)
            ys, ps = _draft_step(ys, fs, qs, ns, cf, ty, FREEZE, HAS_CLIP, HAS_PREV)
            if HAS_PREV:
                qs = ps
        _store_lanes(y_ptr + (dst + (j + 1) * D), ys, i, mi, Q, D)


# ---------------------------------------------------------------- verify_frozen: partial sums
@triton.jit
def _row_sums_lane(
    io,
    rows,
    off,
    m,
    xi,
    cf,
    has_m,
    ACC_FP64: tl.constexpr,
    FREEZE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    """(d xi, d d) of one lane (masked elements give 0). io: (y, P, f) pointers; cf: the step's
    (A, E, X0_Y, X0_F, H, X0_Y and X0_F of step k + j - 1, clip bound). Multistep: d adds
    H (P_{j-1} - p_q(y_{j-1})) where has_m (j >= 1)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    y_ptr, p_ptr, f_ptr = io
    row, frow, mrow = rows
    a, e, x0y, x0f, h, x0y_m, x0f_m, cl = cf
    y = tl.load(y_ptr + row + off, mask=m, other=0.0).to(acc_t)
    p = tl.load(p_ptr + row + off, mask=m, other=0.0).to(acc_t)
    f = tl.load(f_ptr + frow + off, mask=m, other=0.0).to(acc_t)
    d = _gap(p, _draft_x0(y, f, x0y, x0f, FREEZE), a, e, cl, HAS_CLIP)
    if HAS_PREV:
        pm, qm = _prev_lane(y_ptr, p_ptr, mrow, off, m & has_m, f, x0y_m, x0f_m, ACC_FP64, FREEZE)
        d = tl.where(has_m, d + h * (pm - qm), d)
    d = tl.where(m, d, 0.0)
    return d * xi, d * d


@triton.jit(do_not_specialize=["L", "N", "NB"])
def _verify_partials_kernel(
    y_ptr,
    p_ptr,
    frozen_ptr,
    steps_ptr,
    len_ptr,
    coef_ptr,
    seed_ptr,
    ids_ptr,
    part_ptr,
    L,
    N,
    D,
    Q,
    CHUNK,
    NB,
    clip_hi,
    clip_mid,
    clip_lo,
    FREEZE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_PREV: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row = b * L + j, chunk): partial (<d_j, xi_j>, ||d_j||^2) over counters
    [chunk * CHUNK, (chunk + 1) * CHUNK) at part[(row * NB + chunk) * 2 + {0, 1}]; 0 for j >= n.
    Multistep (HAS_PREV): d_j's H term reads position j - 1 too (nothing at j = 0)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    ck = tl.program_id(1)
    b = row // L
    j = row % L
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), L)
    a_vec = tl.zeros([BLOCK], acc_t)
    b_vec = tl.zeros([BLOCK], acc_t)
    if j < n:
        k = tl.load(steps_ptr + b) + j
        chain = tl.load(ids_ptr + b)
        key = _philox_key(seed_ptr)
        kc = _step_index(k, N)
        a = _coef(coef_ptr, _ROW_A, kc, N, ACC_FP64)
        e = _coef(coef_ptr, _ROW_E, kc, N, ACC_FP64)
        x0y = _coef(coef_ptr, _ROW_X0_Y, kc, N, ACC_FP64)
        x0f = _coef(coef_ptr, _ROW_X0_F, kc, N, ACC_FP64)
        cl = _clip_value(clip_hi, clip_mid, clip_lo, ACC_FP64)
        h, x0y_m, x0f_m = _prev_coefs(coef_ptr, kc, k, N, a, ACC_FP64, HAS_PREV)
        cf = (a, e, x0y, x0f, h, x0y_m, x0f_m, cl)
        has_m = j > 0
        yrow = (b * (L + 1) + j) * D
        rows = (yrow, b * D, tl.where(has_m, yrow - D, yrow))
        io = (y_ptr, p_ptr, frozen_ptr)
        start = ck * CHUNK
        stop = tl.minimum(start + CHUNK, Q)
        for i0 in range(start, stop, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            ns = _normals(key, i, k, chain, ACC_FP64)
            for lane in tl.static_range(4):
                off, m = _lane(lane, i, i < stop, Q, D)
                da, db = _row_sums_lane(
                    io, rows, off, m, ns[lane], cf, has_m, ACC_FP64, FREEZE, HAS_CLIP, HAS_PREV
                )
                a_vec += da
                b_vec += db
    out = part_ptr + (row * NB + ck) * 2
    tl.store(out, tl.sum(a_vec, axis=0))
    tl.store(out + 1, tl.sum(b_vec, axis=0))


# ---------------------------------------------------------------- verify_frozen: finalize
@triton.jit
def _tile_sums(
    part_ptr, b, j, mj, L, NB, ACC_FP64: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_NB: tl.constexpr
):
    """(<d_j, xi_j>, ||d_j||^2) of chain b's window positions j (where mj): its partials summed
    over the chunks in a fixed order, so every program of the chain gets the same bits."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    cc = tl.arange(0, BLOCK_NB)
    a2 = tl.zeros([BLOCK_L, BLOCK_NB], acc_t)  # (reduced after the loop: a reduction
    b2 = tl.zeros([BLOCK_L, BLOCK_NB], acc_t)  # accumulated inside it crashes a Triton pass)
    for c0 in range(0, NB, BLOCK_NB):
        m2 = mj[:, None] & ((c0 + cc) < NB)[None, :]
        off = ((b * L + j)[:, None] * NB + (c0 + cc)[None, :]) * 2
        a2 += tl.load(part_ptr + off, mask=m2, other=0.0)
        b2 += tl.load(part_ptr + off + 1, mask=m2, other=0.0)
    return tl.sum(a2, axis=1), tl.sum(b2, axis=1)


@triton.jit
def _scan(
    part_ptr,
    coef_ptr,
    lr_ptr,
    key,
    ch,
    ib,
    L,
    N,
    NB,
    ACC_FP64: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    """The chain's scan, in tiles of BLOCK_L window positions (the same in all its programs; block
    ib = 0 stores the log ratios) -> (first rejected position or n, <d, r> and ||d||^2 there)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    b, k, chain, n = ch
    first = n
    a_first = tl.zeros((), acc_t)  # <d, r> = s <d, xi> of the first rejected step
    b_first = tl.zeros((), acc_t)  # ||d||^2 of it
    jj = tl.arange(0, BLOCK_L)
    for j0 in range(0, L, BLOCK_L):
        j = j0 + jj
        mj = j < L
        sa, sb = _tile_sums(part_ptr, b, j, mj, L, NB, ACC_FP64, BLOCK_L, BLOCK_NB)
        live = j < n
        s = tl.load(coef_ptr + _ROW_STD * N + _step_index(k + j, N), mask=mj, other=1.0).to(acc_t)
        s = tl.where(live, s, 1.0)
        lr = tl.where(live, sa / s - sb / (2.0 * s * s), 0.0)
        tl.store(lr_ptr + b * L + j, lr.to(tl.float32), mask=mj & (ib == 0))
        u = _uniform(key, k + j, chain).to(acc_t)
        cand = tl.min(tl.where(live & ~accept(lr, u), j, L), axis=0)
        newly = (first == n) & (cand < n)
        a_first = tl.where(newly, tl.sum(tl.where(j == cand, sa * s, 0.0), axis=0), a_first)
        b_first = tl.where(newly, tl.sum(tl.where(j == cand, sb, 0.0), axis=0), b_first)
        first = tl.where(newly, cand, first)
    return first, a_first, b_first


@triton.jit
def _decide(coef_ptr, ch, scan, N, outs, ib):
    """The round's outcome from its scan (first rejected position, <d, r> and ||d||^2 there) ->
    (rejected, the reflection coefficient, the deciding window position js, its step ks and table
    column kc, det: the step after the window is deterministic, keep_frozen: next_frozen is f).
    Block ib = 0 stores the chain's num_accepted, committed and root_exact (outs)."""
    b, k, chain, n = ch
    first, a_first, b_first = scan
    nacc_ptr, comm_ptr, exact_ptr = outs
    rejected = first < n
    coef_r = reflect_coef(a_first, b_first)
    js = tl.where(rejected, first, n)
    ks = k + js
    kc = _step_index(ks, N)
    kn = k + n
    live_next = kn < N
    det = live_next & (tl.load(coef_ptr + _ROW_STD * N + _step_index(kn, N)) == 0)
    det = det & ~rejected
    committed = tl.where(rejected, first + 1, n + det.to(tl.int32))
    idle = (n == 0) & ~det
    keep_frozen = idle | (~rejected & ~live_next)
    root_exact = ~rejected & live_next & ~det & (n > 0)
    blk0 = ib == 0
    tl.store(nacc_ptr + b, first.to(tl.int64), mask=blk0)
    tl.store(comm_ptr + b, committed.to(tl.int64), mask=blk0)
    tl.store(exact_ptr + b, root_exact, mask=blk0)
    return rejected, coef_r, js, ks, kc, det, keep_frozen


@triton.jit
def _commit_coefs(
    coef_ptr, kc, ks, N, clip_hi, clip_mid, clip_lo, ACC_FP64: tl.constexpr, HAS_PREV: tl.constexpr
):
    """The rows the commit reads at the deciding step ks (table column kc): (A, E, G, std, X0_Y,
    X0_F, EPS_Y, EPS_P, H, X0_Y and X0_F of step ks - 1, clip bound)."""
    a, e, g, s, x0y, x0f = _draft_coefs(coef_ptr, kc, N, ACC_FP64)
    epy = _coef(coef_ptr, _ROW_EPS_Y, kc, N, ACC_FP64)
    epp = _coef(coef_ptr, _ROW_EPS_P, kc, N, ACC_FP64)
    cl = _clip_value(clip_hi, clip_mid, clip_lo, ACC_FP64)
    h, x0y_m, x0f_m = _prev_coefs(coef_ptr, kc, ks, N, a, ACC_FP64, HAS_PREV)
    return a, e, g, s, x0y, x0f, epy, epp, h, x0y_m, x0f_m, cl


@triton.jit
def _reflection_noise(key, i, ks, chain, rejected, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """The four lanes of the draft's noise of the rejected step ks (the reflection needs it);
    zeros when nothing was rejected (not drawn)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    if rejected:
        ns = _normals(key, i, ks, chain, ACC_FP64)
    else:
        z = tl.zeros([BLOCK], acc_t)
        ns = (z, z, z, z)
    return ns


@triton.jit
def _commit_lane(
    io,
    rows,
    off,
    m,
    xi,
    cf,
    dec,
    ACC_FP64: tl.constexpr,
    FREEZE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    """One lane of next_state / next_frozen (/ next_prev) from y_j, P_j (row) and f (frow);
    multistep: the previous predictions are prev (frow) at the root, else row mrow (j - 1).
    io: (y, P, f, prev, next_state, next_frozen, next_prev) pointers; cf: _commit_coefs;
    dec: (reflection coefficient, rejected, det, keep_frozen, at_root)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    y_ptr, p_ptr, f_ptr, prev_ptr, next_ptr, nfz_ptr, nprev_ptr = io
    row, frow, mrow = rows
    a, e, g, s, x0y, x0f, epy, epp, h, x0y_m, x0f_m, cl = cf
    coef_r, rejected, det, keep_frozen, at_root = dec
    y = tl.load(y_ptr + row + off, mask=m, other=0.0).to(acc_t)
    p = tl.load(p_ptr + row + off, mask=m, other=0.0).to(acc_t)
    f = tl.load(f_ptr + frow + off, mask=m, other=0.0).to(acc_t)
    pq = _draft_x0(y, f, x0y, x0f, FREEZE)
    mq = _affine(pq, y, a, e, g, cl, HAS_CLIP)
    gap = _gap(p, pq, a, e, cl, HAS_CLIP)
    det_mean = _affine(p, y, a, e, g, cl, HAS_CLIP)
    if HAS_PREV:
        # the target's previous x0-hat tp and the draft's dp: prev at the root, else P_{j-1} and
        # the draft's x0-hat at y_{j-1}
        pv = tl.load(prev_ptr + frow + off, mask=m & at_root, other=0.0).to(acc_t)
        pm, qm = _prev_lane(
            y_ptr, p_ptr, mrow, off, m & ~at_root, f, x0y_m, x0f_m, ACC_FP64, FREEZE
        )
        tp = tl.where(at_root, pv, pm)
        dp = tl.where(at_root, pv, qm)
        mq = mq + h * dp
        gap = gap + h * (tp - dp)
        det_mean = det_mean + h * tp
        # the new state's parent is y_j after a rejection or a deterministic step, else y_{j-1}
        nprev = nprev_ptr + frow + off
        tl.store(nprev, tl.where(rejected | det, p, tp).to(nprev.dtype.element_ty), mask=m)
    res = tl.where(det, det_mean, y)
    # rejection: the draft's step reflected about the hyperplane orthogonal to d
    refl = mq + s * xi + coef_r * gap
    res = tl.where(rejected, refl, res)
    if FREEZE == 0:
        fz = p
    else:
        fz = epy * y - epp * p
    tl.store(next_ptr + frow + off, res.to(next_ptr.dtype.element_ty), mask=m)
    nfz = nfz_ptr + frow + off
    tl.store(nfz, tl.where(keep_frozen, f, fz).to(nfz.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["L", "N", "NB"])
def _verify_finalize_kernel(
    y_ptr,
    p_ptr,
    frozen_ptr,
    steps_ptr,
    len_ptr,
    coef_ptr,
    seed_ptr,
    ids_ptr,
    part_ptr,
    nacc_ptr,
    comm_ptr,
    next_ptr,
    nfz_ptr,
    exact_ptr,
    lr_ptr,
    prev_ptr,
    nprev_ptr,
    L,
    N,
    D,
    Q,
    NB,
    clip_hi,
    clip_mid,
    clip_lo,
    FREEZE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_PREV: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    """Program (chain b, i-block): the chain's scan (identical in all its programs), its decision,
    then the commit of its block of next_state / next_frozen (/ next_prev); block 0 writes the
    per-chain outputs and the log ratios."""
    b = tl.program_id(0).to(tl.int64)
    ib = tl.program_id(1)
    k = tl.load(steps_ptr + b)
    chain = tl.load(ids_ptr + b)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), L).to(tl.int32)
    key = _philox_key(seed_ptr)
    ch = (b, k, chain, n)
    scan = _scan(part_ptr, coef_ptr, lr_ptr, key, ch, ib, L, N, NB, ACC_FP64, BLOCK_L, BLOCK_NB)
    outs = (nacc_ptr, comm_ptr, exact_ptr)
    rejected, coef_r, js, ks, kc, det, keep_frozen = _decide(coef_ptr, ch, scan, N, outs, ib)
    # the commit, at the deciding position js
    cf = _commit_coefs(coef_ptr, kc, ks, N, clip_hi, clip_mid, clip_lo, ACC_FP64, HAS_PREV)
    at_root = js == 0
    dec = (coef_r, rejected, det, keep_frozen, at_root)
    row = (b * (L + 1) + js) * D
    mrow = tl.where(at_root, row, row - D)  # (read only past the root)
    i = ib * BLOCK + tl.arange(0, BLOCK)
    mi = i < Q
    ns = _reflection_noise(key, i, ks, chain, rejected, ACC_FP64, BLOCK)
    rows = (row, b * D, mrow)
    io = (y_ptr, p_ptr, frozen_ptr, prev_ptr, next_ptr, nfz_ptr, nprev_ptr)
    for lane in tl.static_range(4):
        off, m = _lane(lane, i, mi, Q, D)
        _commit_lane(io, rows, off, m, ns[lane], cf, dec, ACC_FP64, FREEZE, HAS_CLIP, HAS_PREV)


# ---------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=None)
def _configured(kernel, block: int):
    """The kernel with its block: under the interpreter, the plain kernel (BLOCK passed at launch);
    compiled, a single-config ``triton.autotune`` (no benchmarking) holding BLOCK and the warps,
    wrapped by ``wrap_triton``. Built once per (kernel, block): launch options passed per call
    would make ``wrap_triton`` build a new autotuner at every launch (~100 us of host time)."""
    if INTERPRET:
        return kernel
    cfg = triton.Config({"BLOCK": block}, num_warps=min(4, max(1, block // 32)), num_stages=1)
    return triton.autotune(configs=[cfg], key=[])(kernel)


def _launch_kernel(kernel, block: int, grid, *args, **kwargs) -> None:
    k = _configured(kernel, block)
    if INTERPRET:
        k[grid](*args, BLOCK=block, **kwargs)
    else:
        wrap_triton(k)[grid](*args, **kwargs)


def _quarter(D: int) -> int:
    return -(-D // 4)


def _f32(x: float) -> float:
    """x rounded to float32 (to nearest; inf past the float32 range)."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _clip_args(clip: float) -> dict:
    """HAS_CLIP and the clip bound as three float32 kernel arguments whose float64 sum is the bound
    exactly (3 x 24 >= 53 mantissa bits; a bound past the float32 range clips nothing). Floats,
    not the int64 bits of the double: Inductor cannot pass ints >= 2^31 to a user kernel, and
    Triton passes Python floats as float32. inf: no clipping."""
    clip = float(clip)
    hi = _f32(clip)
    if math.isinf(hi):
        return {"HAS_CLIP": False, "clip_hi": 0.0, "clip_mid": 0.0, "clip_lo": 0.0}
    mid = _f32(clip - hi)
    return {"HAS_CLIP": True, "clip_hi": hi, "clip_mid": mid, "clip_lo": _f32(clip - hi - mid)}


def draft_block(B: int, Q: int, sms: int) -> int:
    """Counters per frozen_draft program: the loop over the window is latency-bound, so aim at
    ~2 programs per SM before making blocks wider (32..512 counters, 128..2048 elements)."""
    want = next_pow2(-(-B * Q // max(2 * sms, 1)))
    return int(min(max(want, _DRAFT_BLOCK_MIN), _DRAFT_BLOCK_MAX))


def partial_chunk(rows: int, Q: int, sms: int) -> int:
    """Counters per partial-sum program of verify_frozen: aim at ~4 programs per SM (a power of
    two, a whole number of blocks)."""
    per_row = max(1, -(-4 * sms // max(rows, 1)))
    chunk = next_pow2(-(-Q // per_row))
    return int(min(max(chunk, _PART_BLOCK), _CHUNK_MAX))


def chain_noise(
    seed: Tensor,
    chain_ids: Tensor,
    steps: Tensor,
    window: int,
    event_numel: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """xi [B, window, D] (dtype) and u [B, window] (float32) of steps ``steps[b] + j``."""
    _checks.entry_chain_noise("chain_noise", seed, chain_ids, steps, dtype)
    B, D = chain_ids.shape[0], int(event_numel)
    dev = chain_ids.device
    xi = torch.empty((B, window, D), device=dev, dtype=dtype)
    u = torch.empty((B, window), device=dev, dtype=torch.float32)
    if B > 0:
        Q = _quarter(D)
        grid = (B * window, triton.cdiv(Q, _NOISE_BLOCK))
        with quiet():
            _launch_kernel(
                _chain_noise_kernel,
                _NOISE_BLOCK,
                grid,
                seed,
                contig(chain_ids),
                contig(steps),
                xi,
                u,
                window,
                D,
                Q,
                ACC_FP64=acc_dtype(dtype) == torch.float64,
            )
    return xi, u


def frozen_draft(root: Tensor, chains: RoundChains, spec: RoundSpec, window: int) -> Tensor:
    """Drafted states Y [B, window + 1, *E] (semantics: reference.round.frozen_draft)."""
    _checks.entry_frozen_draft("frozen_draft", root, chains, spec)
    frozen, steps, lengths, chain_ids, prev = chains
    coef, seed, freeze, clip = spec
    B = root.shape[0]
    y = torch.empty((B, window + 1, *root.shape[1:]), device=root.device, dtype=root.dtype)
    if B > 0:
        D = root.numel() // B
        Q = _quarter(D)
        block = draft_block(B, Q, num_sms(root.device))
        grid = (B, triton.cdiv(Q, block))
        f = contig(frozen)
        with quiet():
            _launch_kernel(
                _frozen_draft_kernel,
                block,
                grid,
                contig(root),
                f,
                contig(steps),
                contig(lengths),
                contig(coef),
                seed,
                contig(chain_ids),
                f if prev is None else contig(prev),  # (no prev: a placeholder, never read)
                y,
                window,
                coef.shape[1],
                D,
                Q,
                **_clip_args(clip),
                FREEZE=int(freeze),
                HAS_PREV=prev is not None,
                ACC_FP64=acc_dtype(root.dtype) == torch.float64,
            )
    return y


def verify_frozen(
    states: Tensor, x0_hat: Tensor, chains: RoundChains, spec: RoundSpec
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(num_accepted, committed, next_state, next_frozen, root_exact, log_ratio, next_prev)
    (semantics: reference.round.verify_frozen; next_prev is an empty [0] tensor without prev)."""
    _checks.entry_verify_frozen("verify_frozen", states, x0_hat, chains, spec)
    frozen, steps, lengths, chain_ids, prev = chains
    coef, seed, freeze, clip = spec
    B, L1 = states.shape[:2]
    L = L1 - 1
    E = states.shape[2:]
    dev = states.device
    nacc = torch.empty((B,), device=dev, dtype=torch.int64)
    committed = torch.empty((B,), device=dev, dtype=torch.int64)
    next_state = torch.empty((B, *E), device=dev, dtype=states.dtype)
    next_frozen = torch.empty((B, *E), device=dev, dtype=states.dtype)
    root_exact = torch.empty((B,), device=dev, dtype=torch.bool)
    lr = torch.empty((B, L), device=dev, dtype=torch.float32)
    has_prev = prev is not None
    next_prev = torch.empty((B, *E) if has_prev else (0,), device=dev, dtype=states.dtype)
    if B == 0:
        return nacc, committed, next_state, next_frozen, root_exact, lr, next_prev
    D = states.numel() // (B * L1)
    Q = _quarter(D)
    N = coef.shape[1]
    acc = acc_dtype(states.dtype)
    acc64 = acc == torch.float64
    clip_args = _clip_args(clip)
    y, p, f = contig(states), contig(x0_hat), contig(frozen)
    pv = contig(prev) if has_prev else f  # (no prev: a placeholder, never read)
    st, ln, cf, ids = contig(steps), contig(lengths), contig(coef), contig(chain_ids)
    rows = max(B * L, 1)
    chunk = partial_chunk(rows, Q, num_sms(dev))
    nb = triton.cdiv(Q, chunk)
    part = torch.empty((rows * nb * 2,), device=dev, dtype=acc)
    with quiet():
        if L > 0:
            _launch_kernel(
                _verify_partials_kernel,
                _PART_BLOCK,
                (B * L, nb),
                y,
                p,
                f,
                st,
                ln,
                cf,
                seed,
                ids,
                part,
                L,
                N,
                D,
                Q,
                chunk,
                nb,
                **clip_args,
                FREEZE=int(freeze),
                HAS_PREV=has_prev,
                ACC_FP64=acc64,
            )
        _launch_kernel(
            _verify_finalize_kernel,
            _FIN_BLOCK,
            (B, triton.cdiv(Q, _FIN_BLOCK)),
            y,
            p,
            f,
            st,
            ln,
            cf,
            seed,
            ids,
            part,
            nacc,
            committed,
            next_state,
            next_frozen,
            root_exact,
            lr,
            pv,
            next_prev,  # (no prev: [0], never written)
            L,
            N,
            D,
            Q,
            nb,
            **clip_args,
            FREEZE=int(freeze),
            HAS_PREV=has_prev,
            ACC_FP64=acc64,
            BLOCK_L=min(next_pow2(L), _BLOCK_L_MAX),
            BLOCK_NB=min(next_pow2(nb), _BLOCK_NB_MAX),
        )
    return nacc, committed, next_state, next_frozen, root_exact, lr, next_prev


# ---------------------------------------------------------------- ops
# The Triton ops take the dispatcher's flat schemas (round_spec.SCHEMAS); their fake impls
# (interpreted mode; compiled, the triton_op body is its own fake) are the C++-defined ops' ones
# (ops/round.py).
triton_chain_noise = define("specdiff::triton_chain_noise", chain_noise, round_ops.fake_chain_noise)
triton_frozen_draft = define(
    "specdiff::triton_frozen_draft",
    with_schema("frozen_draft", draft_parts, frozen_draft),
    round_ops.fake_frozen_draft,
)
triton_verify_frozen = define(
    "specdiff::triton_verify_frozen",
    with_schema("verify_frozen", verify_parts, verify_frozen),
    round_ops.fake_verify_frozen,
)

# the CUDA kernels of specdiff::chain_noise / frozen_draft / verify_frozen (schemas from the C++
# extension, csrc/registration.cpp), and backend "triton"
_CUDA_LIB = (
    register_cuda(
        {
            name: getattr(torch.ops.specdiff, "triton_" + name).default
            for name in ("chain_noise", "frozen_draft", "verify_frozen")
        }
    )
    if round_ops.HAS_CPP
    else None
)
REGISTRY.register(Backend("round", "triton", round_ops.schema_ops("triton_"), devices=DEVICES))

"""The Triton backend of the verify ops (docs/design.md §3, §4): kernels, launch rule, launchers,
and the ops ``torch.ops.specdiff.triton_*`` that are the CUDA kernels of ``specdiff::*`` and backend
``"triton"`` of :mod:`specdiff_kernels.ops.verify` (importing this module registers them).

Every op reduces, for each chain c and window step j, the two sums over all event dims

    a_j = <d_j, r_j>,   b_j = ||d_j||^2,   d_j = mp_j - mq_j,   r_j = y_{j+1} - mq_j

(accumulated in fp32, fp64 for fp64 inputs), turns them into log ratios (a_j - b_j / 2) / s_j^2,
scans for the first rejection and writes the reflected state (or y_n). Two launch strategies:

* ``per_chain``: one program per chain loops over the L steps and the event blocks, scans as it
  goes, then writes the output. One launch; best with many chains (they fill the GPU).
* ``split``: ``_split_partials_kernel`` computes partial a, b for every (chain, step, event chunk)
  in parallel; ``_split_finalize_kernel`` (one program per (chain, output block)) reduces the
  partials in a fixed order, scans for the first rejection and writes its block of the output. Two
  launches, but the whole GPU works on a single chain: the B=1 latency case.

:func:`choose_strategy` is the plain Python rule between them (no ``triton.heuristics``: it breaks
under ``torch.compile``). Launchers take an explicit ``strategy`` so tests can force either.

Compiled (GPU) kernels are ``triton.autotune``-d over block size, warps and pipeline stages, keyed
on the sizes that matter (``SPECDIFF_TRITON_AUTOTUNE=0`` uses one default config instead: no
benchmarking at first launch; the GPU tests use it and check every config explicitly). Under
``TRITON_INTERPRET=1`` (CPU tensors) autotuning is pointless, so a fixed small block is used and
kernels are launched directly (``torch.library.wrap_triton`` refuses interpreted kernels). Kernel
sizes that vary at run time without changing the code (L, the number of chunks, broadcast strides,
the batch bucket) are ``do_not_specialize``; D keeps Triton's
divisibility-by-16 specialisation (two variants at most, not one per value) because it is what lets
row starts be proven aligned and loads vectorised. The kernels take no float scalar arguments (sigma
and the uniforms are read from tensors in-kernel), so there is nothing to pin to fp32.

Semantics match :mod:`specdiff_kernels.ops.reference.verify`: step j is accepted iff its log ratio
is finite and ``log(u_j) <= log_ratio_j`` (compared in the accumulation dtype); ``b = 0`` gives
the reflection coefficient 1; steps at or beyond ``lengths`` (clamped into 1..L in-kernel, no host
sync) are ignored; ``next_state`` is written in the input dtype; ``log_ratio`` is float32 for all L
steps.

Ops: ``specdiff::triton_gaussian_log_ratio``, ``triton_first_rejection``,
``triton_reflect_resample`` and ``triton_speculative_verify`` run the launchers below; all but
``first_rejection`` take a trailing ``strategy: str = "auto"`` so tests and benchmarks can force a
launch strategy. How they are defined in each mode: :mod:`._launch`. The CUDA kernels of the
C++-defined ``specdiff::gaussian_log_ratio`` / ``first_rejection`` / ``reflect_resample`` /
``speculative_verify`` call them, so ``torch.ops.specdiff.speculative_verify`` on CUDA tensors runs
Triton. Nothing synchronises with the host (lengths are clamped in-kernel), so the ops are
CUDA-graph capturable once autotuning has run (warm up first).
"""

from __future__ import annotations

import inspect
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from .. import verify as ops
from .._checks import check_strategy
from ..backends import REGISTRY, Backend
from ..layout import acc_dtype
from ._launch import (
    DEVICES,
    INTERPRET,
    accept,
    contig,
    define,
    launchable,
    next_pow2,
    num_sms,
    quiet,
    reflect_coef,
    register_cuda,
)

STRATEGIES = ("per_chain", "split")

# Modes of the shared kernels (constexpr): which op they compute.
MODE_LOG_RATIO = 0  # gaussian_log_ratio: log ratios only
MODE_REFLECT = 1  # reflect_resample: a window of one step that is always rejected
MODE_VERIFY = 2  # speculative_verify: log ratios, first rejection, next state


# ---------------------------------------------------------------- device helpers
# Groups that travel together (Triton tuples, unpacked by position; compile-time structure only):
#   ins      (y, mq, mp) pointers of the [B, L, *E] inputs;
#   chain    (c, L, n): the chain, the window size and the chain's clamped length;
#   step_io  (sigma, its strides along B and L, uniforms, log ratios): what a step's decision reads
#            and writes;
#   scan     (first rejected step or n, its reflection coefficient): the running scan state.
@triton.jit
def _load_lengths(n_ptr, c, L, HAS_N: tl.constexpr):
    if HAS_N:
        n = tl.load(n_ptr + c).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 1), L)
    else:
        n = tl.zeros((), tl.int32) + L
    return n


@triton.jit
def _dr_terms(ins, row, idx, m, ACC_FP64: tl.constexpr):
    """(d r, d d) at elements row + idx (masked: 0), d = mp - mq, r = y - mq (accumulation dtype)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    y_ptr, mq_ptr, mp_ptr = ins
    q = tl.load(mq_ptr + row + idx, mask=m, other=0.0).to(acc_t)
    d = tl.load(mp_ptr + row + idx, mask=m, other=0.0).to(acc_t) - q
    r = tl.load(y_ptr + row + idx, mask=m, other=0.0).to(acc_t) - q
    return d * r, d * d


@triton.jit
def _decide_step(
    a, b, j, scan, chain, step_io, store_lr, MODE: tl.constexpr, ACC_FP64: tl.constexpr
):
    """Fold step j (sums a, b) into the running scan state (first rejection, its coefficient)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    first, coef = scan
    c, L, n = chain
    sig_ptr, sig_sb, sig_sl, u_ptr, lr_ptr = step_io
    if MODE == 1:
        reject = j >= 0  # reflect_resample: the single step is always "rejected"
    else:
        s = tl.load(sig_ptr + c * sig_sb + j * sig_sl).to(acc_t)
        lr = (a - 0.5 * b) / (s * s)
        tl.store(lr_ptr + c * L + j, lr.to(tl.float32), mask=store_lr)
        if MODE == 2:
            u = tl.load(u_ptr + c * L + j).to(acc_t)
            reject = ~accept(lr, u)
        else:
            reject = j < 0  # log ratios only: nothing is scanned
    newly = (first == n) & (j < n) & reject
    coef = tl.where(newly, reflect_coef(a, b), coef)
    first = tl.where(newly, j, first)
    return first, coef


@triton.jit
def _decision(first, chain, nacc_ptr, store_mask, MODE: tl.constexpr):
    """After the scan: num_accepted stored (verify mode; where store_mask) -> (rejected, the window
    step whose row next_state comes from: the first rejected one, else the last, n - 1)."""
    c, L, n = chain
    if MODE == 2:
        tl.store(nacc_ptr + c, first.to(tl.int64), mask=store_mask)
    rejected = first < n
    step = tl.where(rejected, first, n - 1).to(tl.int64)
    return rejected, step


@triton.jit
def _write_state(ins, out_ptr, in_off, out_off, mask, rejected, coef, ACC_FP64: tl.constexpr):
    """One block of next_state: y + coef * (mp - mq) at a rejection, else an exact copy of y."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    y_ptr, mq_ptr, mp_ptr = ins
    y = tl.load(y_ptr + in_off, mask=mask, other=0.0)
    if rejected:
        q = tl.load(mq_ptr + in_off, mask=mask, other=0.0).to(acc_t)
        p = tl.load(mp_ptr + in_off, mask=mask, other=0.0).to(acc_t)
        res = y.to(acc_t) + coef * (p - q)
        tl.store(out_ptr + out_off, res.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + out_off, y, mask=mask)


# ---------------------------------------------------------------- per-chain strategy
@triton.jit(do_not_specialize=["L", "sig_sb", "sig_sl", "B_BUCKET"])
def _per_chain_raw(
    y_ptr,
    mq_ptr,
    mp_ptr,
    sig_ptr,
    u_ptr,
    n_ptr,  # inputs
    nacc_ptr,
    out_ptr,
    lr_ptr,  # outputs
    L,
    D,
    sig_sb,
    sig_sl,
    B_BUCKET,  # unused in the body: an autotune key (bucketed chain count)
    MODE: tl.constexpr,
    HAS_N: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """One program per chain: all L steps' sums, the scan, then the output row. Inputs [B, L, D].
    NUM_STAGES > 1 software-pipelines the streaming loads (cp.async prefetch of later blocks)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    n = _load_lengths(n_ptr, c, L, HAS_N)
    ins = (y_ptr, mq_ptr, mp_ptr)
    chain = (c, L, n)
    step_io = (sig_ptr, sig_sb, sig_sl, u_ptr, lr_ptr)
    scan = (n, tl.full((), 1.0, acc_t))
    for j in range(0, L):
        row = (c * L + j) * D
        a_vec = tl.zeros([BLOCK_D], acc_t)
        b_vec = tl.zeros([BLOCK_D], acc_t)
        for k in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
            idx = k + offs
            dr, dd = _dr_terms(ins, row, idx, idx < D, ACC_FP64)
            a_vec += dr
            b_vec += dd
        a = tl.sum(a_vec, axis=0)
        b = tl.sum(b_vec, axis=0)
        scan = _decide_step(a, b, j, scan, chain, step_io, j >= 0, MODE, ACC_FP64)
    if MODE != 0:
        first, coef = scan
        rejected, step = _decision(first, chain, nacc_ptr, None, MODE)
        in_row = (c * L + step) * D
        out_row = c * D
        for k in range(0, D, BLOCK_D):
            idx = k + offs
            _write_state(
                ins, out_ptr, in_row + idx, out_row + idx, idx < D, rejected, coef, ACC_FP64
            )


# ---------------------------------------------------------------- split-event strategy
@triton.jit(do_not_specialize=["NB"])
def _split_partials_raw(
    y_ptr,
    mq_ptr,
    mp_ptr,
    part_ptr,
    D,
    CHUNK,
    NB,
    ACC_FP64: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Program (row = c*L + j, chunk k): partial a, b over elements [k*CHUNK, (k+1)*CHUNK) of the
    row, stored at part[row*NB + k] = (a, b). CHUNK is a power of two (a BLOCK_D above it is
    masked)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    row = pid // NB
    start = (pid % NB) * CHUNK
    lim = tl.minimum(start + CHUNK, D)
    base = row * D
    offs = tl.arange(0, BLOCK_D)
    a_vec = tl.zeros([BLOCK_D], acc_t)
    b_vec = tl.zeros([BLOCK_D], acc_t)
    for k in tl.range(0, CHUNK, BLOCK_D, num_stages=NUM_STAGES):
        idx = start + k + offs
        dr, dd = _dr_terms((y_ptr, mq_ptr, mp_ptr), base, idx, idx < lim, ACC_FP64)
        a_vec += dr
        b_vec += dd
    tl.store(part_ptr + 2 * pid, tl.sum(a_vec, axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(b_vec, axis=0))


@triton.jit(do_not_specialize=["L", "NB", "sig_sb", "sig_sl"])
def _split_finalize_raw(
    y_ptr,
    mq_ptr,
    mp_ptr,
    part_ptr,
    sig_ptr,
    u_ptr,
    n_ptr,
    nacc_ptr,
    out_ptr,
    lr_ptr,
    L,
    D,
    NB,
    sig_sb,
    sig_sl,
    MODE: tl.constexpr,
    HAS_N: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (chain c, output block ob): reduce the partials of chain c in a fixed order (every
    block of the chain gets bit-identical sums), scan for the first rejection, write block ob of
    next_state. Block 0 also writes the chain's log ratios and num_accepted. MODE 0: grid (B,)."""
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    if MODE == 0:
        c = pid
        ob = pid * 0
    else:
        nob = tl.cdiv(D, BLOCK_D)
        c = pid // nob
        ob = pid % nob
    n = _load_lengths(n_ptr, c, L, HAS_N)
    chain = (c, L, n)
    step_io = (sig_ptr, sig_sb, sig_sl, u_ptr, lr_ptr)
    scan = (n, tl.full((), 1.0, acc_t))
    kk = tl.arange(0, BLOCK_NB)
    for j in range(0, L):
        prow = (c * L + j) * NB
        a_vec = tl.zeros([BLOCK_NB], acc_t)
        b_vec = tl.zeros([BLOCK_NB], acc_t)
        for k0 in range(0, NB, BLOCK_NB):
            m = k0 + kk < NB
            a_vec += tl.load(part_ptr + 2 * (prow + k0 + kk), mask=m, other=0.0)
            b_vec += tl.load(part_ptr + 2 * (prow + k0 + kk) + 1, mask=m, other=0.0)
        a = tl.sum(a_vec, axis=0)
        b = tl.sum(b_vec, axis=0)
        scan = _decide_step(a, b, j, scan, chain, step_io, ob == 0, MODE, ACC_FP64)
    if MODE != 0:
        first, coef = scan
        rejected, step = _decision(first, chain, nacc_ptr, ob == 0, MODE)
        idx = ob * BLOCK_D + tl.arange(0, BLOCK_D)
        in_off = (c * L + step) * D + idx
        ins = (y_ptr, mq_ptr, mp_ptr)
        _write_state(ins, out_ptr, in_off, c * D + idx, idx < D, rejected, coef, ACC_FP64)


# ---------------------------------------------------------------- first_rejection alone
@triton.jit(do_not_specialize=["B", "L", "lr_sb", "lr_sl", "u_sb", "u_sl"])
def _first_rejection_raw(
    lr_ptr,
    u_ptr,
    n_ptr,
    out_ptr,
    B,
    L,
    lr_sb,
    lr_sl,
    u_sb,
    u_sl,
    HAS_N: tl.constexpr,
    CMP_FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """BLOCK_B chains per program; the window is scanned in column tiles of BLOCK_L."""
    cmp_t: tl.constexpr = tl.float64 if CMP_FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    if HAS_N:
        n = tl.load(n_ptr + rows, mask=rmask, other=1).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 1), L)
    else:
        n = tl.zeros([BLOCK_B], tl.int32) + L
    first = n
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        m = rmask[:, None] & (cols[None, :] < L)
        lr = tl.load(lr_ptr + rows[:, None] * lr_sb + cols[None, :] * lr_sl, mask=m, other=0.0)
        u = tl.load(u_ptr + rows[:, None] * u_sb + cols[None, :] * u_sl, mask=m, other=0.0)
        reject = (~accept(lr.to(cmp_t), u.to(cmp_t))) & m & (cols[None, :] < n[:, None])
        cand = tl.min(tl.where(reject, cols[None, :], L), axis=1)
        first = tl.minimum(first, cand)
    tl.store(out_ptr + rows, first.to(tl.int64), mask=rmask)


# ---------------------------------------------------------------- autotuning / fixed configs
# Under the interpreter: small fixed blocks (every path, multi-block included, runs on small
# shapes).
_INTERP_BLOCK_D = 128
# Split chunk bounds (elements of one (chain, step) row per partial-sum program; a power of two, so
# a whole number of blocks for every BLOCK_D config up to it; larger blocks are simply masked).
_CHUNK_MIN, _CHUNK_MAX = (256, 4096) if INTERPRET else (4096, 65536)
_FIRST_REJ_BLOCK_B = 16 if INTERPRET else 128


# Streaming configs: wide blocks without pipelining, or narrower blocks with 3-stage cp.async
# prefetch (more bytes in flight when few programs share an SM: the latency-bound cases). Configs
# that do not fit in shared memory / registers are skipped by the autotuner.
_STREAM_CONFIGS = [
    triton.Config({"BLOCK_D": bd, "NUM_STAGES": st}, num_warps=w, num_stages=st)
    for bd, w, st in (
        (1024, 4, 1),
        (2048, 4, 1),
        (2048, 8, 1),
        (4096, 8, 1),
        (8192, 8, 1),
        (8192, 16, 1),
        (1024, 4, 3),
        (1024, 8, 3),
        (2048, 8, 3),
    )
]
_FINALIZE_CONFIGS = [
    triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=1)
    for bd in (1024, 2048, 4096)
    for w in (4, 8)
]


# One config per kernel when autotuning is off (SPECDIFF_TRITON_AUTOTUNE=0): no benchmarking at the
# first launch of each size, so start-up is fast and the choice is deterministic (tests use it).
DEFAULT_STREAM_CONFIG = triton.Config({"BLOCK_D": 2048, "NUM_STAGES": 1}, num_warps=8, num_stages=1)
DEFAULT_FINALIZE_CONFIG = triton.Config({"BLOCK_D": 1024}, num_warps=4, num_stages=1)
AUTOTUNE = os.environ.get("SPECDIFF_TRITON_AUTOTUNE", "1").strip().lower() not in (
    "0",
    "false",
    "off",
)


def _autotune_bench(kernel_call, quantiles):
    """Shorter than Triton's default (25 ms warm-up, 100 ms timed per config): the kernels are
    memory-bound streams whose timings settle fast, and every new key pays this once per config."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def make_kernels(
    stream_configs: Optional[list] = None, finalize_configs: Optional[list] = None
) -> dict:
    """The three window kernels wrapped in ``triton.autotune`` over the given configs (default: all
    of them). A single config means no benchmarking: it is simply used. Keys: the sizes the best
    config depends on. Tests build single-config sets to check every config."""
    stream = _STREAM_CONFIGS if stream_configs is None else stream_configs
    finalize = _FINALIZE_CONFIGS if finalize_configs is None else finalize_configs
    extra = {}
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        extra["do_bench"] = _autotune_bench
    return {
        "per_chain": triton.autotune(configs=stream, key=["L", "D", "B_BUCKET", "MODE"], **extra)(
            _per_chain_raw
        ),
        "split_partials": triton.autotune(configs=stream, key=["D", "CHUNK", "NB"], **extra)(
            _split_partials_raw
        ),
        "split_finalize": triton.autotune(configs=finalize, key=["L", "D", "NB", "MODE"], **extra)(
            _split_finalize_raw
        ),
    }


if INTERPRET:
    _per_chain_kernel = _per_chain_raw
    _split_partials_kernel = _split_partials_raw
    _split_finalize_kernel = _split_finalize_raw
    _FIXED_STREAM = {"BLOCK_D": _INTERP_BLOCK_D, "NUM_STAGES": 1}
    _FIXED_FINALIZE = {"BLOCK_D": _INTERP_BLOCK_D}
else:
    _KERNELS = (
        make_kernels()
        if AUTOTUNE
        else make_kernels([DEFAULT_STREAM_CONFIG], [DEFAULT_FINALIZE_CONFIG])
    )
    _per_chain_kernel = _KERNELS["per_chain"]
    _split_partials_kernel = _KERNELS["split_partials"]
    _split_finalize_kernel = _KERNELS["split_finalize"]
    _FIXED_STREAM = {}
    _FIXED_FINALIZE = {}


# ---------------------------------------------------------------- launch rule
# The launch rule's constants, measured on an NVIDIA H200 (bench/results/verify_cuda_nvidia_h200.md
# and launch_overhead_nvidia_h200.md): one per_chain program streams ~100-120 GB/s, so a chain's
# window takes about 3*L*D*elt / 110 GB/s of GPU time; split streams at near copy bandwidth, but its
# second launch and partial-sum buffer cost 40-90 us more host time per call (123 vs 79 us, and
# 232 vs 141 us on a slower host, through the op), so eagerly split pays only once a chain's window
# is ~8 MiB of reads.
SPLIT_MIN_CHAIN_BYTES = 8 << 20
PER_CHAIN_MAX_WINDOW = 16384


def choose_strategy(B: int, L: int, D: int, sms: int, elt: int = 4) -> str:
    """The launch-strategy rule (plain Python, evaluated once per launch / trace).

    * ``per_chain`` when the chains alone fill the device (B >= number of SMs): one launch, no
      partial buffer, and on the H200 as fast as or faster than split at every such size measured.
    * ``per_chain`` when a chain's window is short (L * D <= 16384 elements).
    * ``split`` when one chain's window is at least 8 MiB of reads (3 * L * D * elt bytes): there
      per_chain's single-program stream costs more GPU time than split's extra host time (the
      B=1, D=3*256*256, L=8 fp32 case is above it); ``per_chain`` below.

    The rule does not look at CUDA-graph capture, so a captured call runs the same kernels as an
    eager one (bit-identical results, and nothing left to autotune during capture). Inside a graph
    host time is free and ``split`` is faster from L * D > 16384 on (e.g. B=64, L=8, D=16384:
    34 vs 45 us on the H200); force it with ``torch.ops.specdiff.triton_speculative_verify(...,
    "split")``.
    """
    if B >= sms or L * D <= PER_CHAIN_MAX_WINDOW:
        return "per_chain"
    return "split" if 3 * L * D * elt >= SPLIT_MIN_CHAIN_BYTES else "per_chain"


def split_chunk(B: int, L: int, D: int, sms: int) -> int:
    """Elements of a (chain, step) row per partial-sum program: aim at ~4 programs per SM."""
    rows = max(B * L, 1)
    per_row = max(1, -(-4 * sms // rows))  # programs wanted per row
    chunk = next_pow2(-(-D // per_row))
    return int(min(max(chunk, _CHUNK_MIN), _CHUNK_MAX))


def _resolve_strategy(strategy: Optional[str], B: int, L: int, D: int, elt: int, device) -> str:
    if strategy is None or strategy == "auto":
        return choose_strategy(B, L, D, num_sms(device), elt)
    return strategy


# ---------------------------------------------------------------- launchers
def _sigma_strides(sigma: Tensor, B: int, L: int) -> tuple[int, int]:
    """Strides of sigma broadcast to [B, L] (0 along broadcast dims); the data pointer is
    sigma's."""
    return tuple(sigma.expand(B, L).stride())  # type: ignore[return-value]


def _window_launch(
    mode: int,
    y: Tensor,
    mq: Tensor,
    mp: Tensor,
    sigma: Tensor,
    uniforms: Tensor,
    lengths: Optional[Tensor],
    nacc: Tensor,
    out: Tensor,
    lr: Tensor,
    strategy: Optional[str],
) -> None:
    """Launch the window kernels of ``mode`` on contiguous [B, L, *E] inputs (B >= 1)."""
    B, L = y.shape[0], y.shape[1]
    D = y.numel() // (B * L)
    sig_sb, sig_sl = (0, 0) if mode == MODE_REFLECT else _sigma_strides(sigma, B, L)
    has_n = lengths is not None
    n_arg = lengths if has_n else y  # dummy pointer, never read without HAS_N
    acc = acc_dtype(y.dtype)
    acc64 = acc == torch.float64
    strat = _resolve_strategy(strategy, B, L, D, y.element_size(), y.device)
    if strat == "per_chain":
        k = launchable(_per_chain_kernel)
        k[(B,)](
            y,
            mq,
            mp,
            sigma,
            uniforms,
            n_arg,
            nacc,
            out,
            lr,
            L,
            D,
            sig_sb,
            sig_sl,
            min(next_pow2(B), 1024),
            MODE=mode,
            HAS_N=has_n,
            ACC_FP64=acc64,
            **_FIXED_STREAM,
        )
        return
    sms = num_sms(y.device)
    chunk = split_chunk(B, L, D, sms)
    nb = -(-D // chunk)
    part = torch.empty((B * L * nb * 2,), device=y.device, dtype=acc)
    kp = launchable(_split_partials_kernel)
    kp[(B * L * nb,)](y, mq, mp, part, D, chunk, nb, ACC_FP64=acc64, **_FIXED_STREAM)
    block_nb = min(next_pow2(nb), 128)
    if mode == MODE_LOG_RATIO:
        grid = (B,)
    elif INTERPRET:
        grid = (B * triton.cdiv(D, _INTERP_BLOCK_D),)
    else:

        def grid(meta):
            return (B * triton.cdiv(D, meta["BLOCK_D"]),)

    kf = launchable(_split_finalize_kernel)
    kf[grid](
        y,
        mq,
        mp,
        part,
        sigma,
        uniforms,
        n_arg,
        nacc,
        out,
        lr,
        L,
        D,
        nb,
        sig_sb,
        sig_sl,
        MODE=mode,
        HAS_N=has_n,
        ACC_FP64=acc64,
        BLOCK_NB=block_nb,
        **_FIXED_FINALIZE,
    )


def speculative_verify(
    draft_states: Tensor,
    draft_means: Tensor,
    target_means: Tensor,
    sigma: Tensor,
    uniforms: Tensor,
    lengths: Optional[Tensor] = None,
    strategy: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused verify (docs/design.md §4) -> (num_accepted [B] int64, next_state [B, *E],
    log_ratio [B, L] fp32).

    Arguments are assumed validated (``specdiff_kernels.ops._checks``); sigma is any shape that
    broadcasts to [B, L]. ``strategy``: "per_chain", "split", or None/"auto"
    (:func:`choose_strategy`).
    """
    _checks.entry_speculative_verify(
        "speculative_verify", draft_states, draft_means, target_means, sigma, uniforms, lengths
    )
    check_strategy(strategy, STRATEGIES)
    y, mq, mp = contig(draft_states), contig(draft_means), contig(target_means)
    B, L = y.shape[0], y.shape[1]
    nacc = torch.empty((B,), device=y.device, dtype=torch.int64)
    out = torch.empty((B, *y.shape[2:]), device=y.device, dtype=y.dtype)
    lr = torch.empty((B, L), device=y.device, dtype=torch.float32)
    if B > 0:
        with quiet():
            _window_launch(
                MODE_VERIFY,
                y,
                mq,
                mp,
                sigma,
                contig(uniforms),
                None if lengths is None else contig(lengths),
                nacc,
                out,
                lr,
                strategy,
            )
    return nacc, out, lr


def gaussian_log_ratio(
    draft_states: Tensor,
    draft_means: Tensor,
    target_means: Tensor,
    sigma: Tensor,
    strategy: str = "auto",
) -> Tensor:
    """[B, L] float32 log ratios (a - b/2) / s^2 of every step (docs/design.md §3)."""
    _checks.entry_gaussian_log_ratio(
        "gaussian_log_ratio", draft_states, draft_means, target_means, sigma
    )
    check_strategy(strategy, STRATEGIES)
    y, mq, mp = contig(draft_states), contig(draft_means), contig(target_means)
    B, L = y.shape[0], y.shape[1]
    lr = torch.empty((B, L), device=y.device, dtype=torch.float32)
    if B > 0:
        # uniforms/num_accepted/next_state are never touched in this mode: the (read-only) input
        # stands in as a dummy pointer.
        with quiet():
            _window_launch(MODE_LOG_RATIO, y, mq, mp, sigma, y, None, y, y, lr, strategy)
    return lr


def reflect_resample(
    draft_state: Tensor, draft_mean: Tensor, target_mean: Tensor, strategy: str = "auto"
) -> Tensor:
    """Reflection-coupling resample y + (1 - 2<d, y - mq>/||d||^2) d of [B, *E] states (input
    dtype)."""
    _checks.entry_reflect_resample("reflect_resample", draft_state, draft_mean, target_mean)
    check_strategy(strategy, STRATEGIES)
    y, mq, mp = contig(draft_state), contig(draft_mean), contig(target_mean)
    B = y.shape[0]
    out = torch.empty(y.shape, device=y.device, dtype=y.dtype)
    if B > 0:
        shape3 = (B, 1, y.numel() // B)
        y3, mq3, mp3 = y.view(shape3), mq.view(shape3), mp.view(shape3)
        # A window of one always-rejected step; sigma/uniforms/num_accepted/log_ratio are never
        # touched: the (read-only) input stands in as a dummy pointer.
        with quiet():
            _window_launch(MODE_REFLECT, y3, mq3, mp3, y3, y3, None, y3, out, y3, strategy)
    return out


def first_rejection(
    log_ratio: Tensor, uniforms: Tensor, lengths: Optional[Tensor] = None
) -> Tensor:
    """[B] int64 index of the first rejected step, or the chain's length (default L) if none is."""
    _checks.entry_first_rejection("first_rejection", log_ratio, uniforms, lengths)
    B, L = log_ratio.shape
    out = torch.empty((B,), device=log_ratio.device, dtype=torch.int64)
    if B == 0:
        return out
    has_n = lengths is not None
    n_arg = contig(lengths) if has_n else out
    block_l = min(next_pow2(L), 32)
    grid = (triton.cdiv(B, _FIRST_REJ_BLOCK_B),)
    k = launchable(_first_rejection_raw)
    with quiet():
        k[grid](
            log_ratio,
            uniforms,
            n_arg,
            out,
            B,
            L,
            log_ratio.stride(0),
            log_ratio.stride(1),
            uniforms.stride(0),
            uniforms.stride(1),
            HAS_N=has_n,
            CMP_FP64=acc_dtype(log_ratio.dtype) == torch.float64,
            BLOCK_B=_FIRST_REJ_BLOCK_B,
            BLOCK_L=block_l,
        )
    return out


# ---------------------------------------------------------------- ops
# fake impls (interpreted mode): the ones of the C++-defined ops (ops/verify.py)
triton_speculative_verify = define(
    "specdiff::triton_speculative_verify", speculative_verify, ops.fake_speculative_verify
)
triton_gaussian_log_ratio = define(
    "specdiff::triton_gaussian_log_ratio", gaussian_log_ratio, ops.fake_gaussian_log_ratio
)
triton_reflect_resample = define(
    "specdiff::triton_reflect_resample", reflect_resample, ops.fake_reflect_resample
)
triton_first_rejection = define(
    "specdiff::triton_first_rejection", first_rejection, ops.fake_first_rejection
)


# ---------------------------------------------------------------- forwarding to the Triton ops
# (the CUDA kernels of specdiff::* and the "triton" backend entry)
def _fwd_speculative_verify(draft_states, draft_means, target_means, sigma, uniforms, lengths=None):
    return torch.ops.specdiff.triton_speculative_verify(
        draft_states, draft_means, target_means, sigma, uniforms, lengths
    )


def _fwd_gaussian_log_ratio(draft_states, draft_means, target_means, sigma):
    return torch.ops.specdiff.triton_gaussian_log_ratio(
        draft_states, draft_means, target_means, sigma
    )


def _fwd_reflect_resample(draft_state, draft_mean, target_mean):
    return torch.ops.specdiff.triton_reflect_resample(draft_state, draft_mean, target_mean)


def _fwd_first_rejection(log_ratio, uniforms, lengths=None):
    return torch.ops.specdiff.triton_first_rejection(log_ratio, uniforms, lengths)


_FORWARD = {
    "gaussian_log_ratio": _fwd_gaussian_log_ratio,
    "first_rejection": _fwd_first_rejection,
    "reflect_resample": _fwd_reflect_resample,
    "speculative_verify": _fwd_speculative_verify,
}
# the schemas come from the C++ extension (csrc/registration.cpp)
_CUDA_LIB = register_cuda(_FORWARD) if ops.HAS_CPP else None
# the same forwarding functions serve the backend entry (any device the kernels run on)
REGISTRY.register(Backend("verify", "triton", _FORWARD, devices=DEVICES))

"""Plain PyTorch reference of the round ops (docs/design.md §6): counter-based noise, the
frozen-draft rollout and the frozen verify. Every other backend (C++, Triton) is tested against
this module, evaluated in float64. Written for clarity; it runs on any device.

Counter-based noise
-------------------
Philox4x32-10 (Salmon et al., SC'11; Random123's ``philox4x32_10``, the generator behind
``tl.randn`` and cuRAND's Philox) maps a 128-bit counter and a 64-bit key to four 32-bit words.
The key is the 64-bit ``seed`` (low word k0, high word k1). For chain ``c`` at sampling step ``k``:

* the step noise ``xi(seed, c, k)`` in R^D: element ``e`` with ``Q = ceil(D / 4)``,
  ``i = e mod Q``, ``lane = e div Q`` is output ``lane`` of the Box-Muller pairs of
  ``Philox(counter = (i, k + 1, c, 0))``: words (x0, x1) give lanes 0, 1 and (x2, x3) lanes 2, 3 as
  ``sqrt(-2 ln v) * (cos 2 pi t, sin 2 pi t)`` with ``v = (2 (x_a >> 9) + 1) 2^-24`` (in (0, 1))
  and ``t = (x_b >> 8) 2^-24`` (in [0, 1)); both are exact in fp32, so every backend feeds the
  same numbers to the transcendental functions. The quarter layout (lane-major) lets a kernel make
  one Philox call per four elements and store four contiguous runs;
* the acceptance uniform ``u(seed, c, k) = (x0 >> 8) 2^-24`` (in [0, 1), exact in fp32) of
  ``Philox(counter = (0, k + 1, c, 1))``;
* the initial state of chain c is ``xi(seed, c, -1)`` (counter word 1 is ``k + 1 = 0``).

The radius uniform has 23 bits: |xi| <= sqrt(2 ln 2^24) = 5.77, so each Box-Muller pair differs from
N(0, I_2) by at most 2^-24 = 6e-8 in total variation (cuRAND's and ``tl.randn``'s are of the same
order). The integer stream is bit-identical on every backend; the normals agree to rounding.

The frozen round (docs/design.md §6)
--------------------------
Per-step tables (``coef``, float64 ``[9, N]``, rows named by
``ops.layout.ROW_*``) describe the affine mean
``m(x, k) = A clip(p) + E p + G x (+ H p_prev)`` of the network's x0-hat p, the step std, the
conversions between x0 and eps that the frozen-eps draft needs, and the multistep term of the
previous step's x0-hat p_prev. ``freeze``: 0 freezes x0-hat (the draft's x0 at every drafted state
is f), 1 freezes eps-hat (the draft's x0 at y is ``X0_Y y - X0_F f``).

Multistep chains (docs/design.md §2.1, §6.1) pass ``prev``, the target's x0-hat at each chain's
previous state; ``H`` is read only then. The draft's previous prediction at window position 0 is
``prev`` and at position j >= 1 the draft's own x0-hat at position j - 1; the target's is ``prev``
at position 0 and its x0-hat P_{j-1} at position j >= 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..layout import (
    FREEZE_X0,
    NO_BAD,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_W0,
    PHILOX_W1,
    ROW_A,
    ROW_E,
    ROW_EPS_P,
    ROW_EPS_Y,
    ROW_G,
    ROW_H,
    ROW_STD,
    ROW_X0_F,
    ROW_X0_Y,
    STAT_BAD_OUTPUT,
    STAT_BAD_RATIO,
    STAT_DET_STEPS,
    STAT_LIVE,
    STAT_ROUNDS,
    STAT_SPEC_STEPS,
    STAT_STEPS_DONE,
    STAT_WINDOWS,
    STREAM_UNIFORM,
    StatsLayout,
    acc_dtype,
)
from ..round_spec import RoundChains, RoundSpec

# ---------------------------------------------------------------- Philox4x32-10
MASK32 = 0xFFFFFFFF
TWO_PI = 2.0 * math.pi


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low words of the 64-bit product a * b (a < 2^32 constant, b int64 in [0, 2^32)),
    in 16-bit limbs so no int64 product overflows."""
    al, ah = a & 0xFFFF, a >> 16
    bl, bh = b & 0xFFFF, b >> 16
    mid = al * bh + ah * bl
    lo_full = al * bl + ((mid & 0xFFFF) << 16)
    hi = ah * bh + (mid >> 16) + (lo_full >> 32)
    return hi & MASK32, lo_full & MASK32


def philox4x32(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor, rounds: int = 10
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 on int64 tensors holding uint32 values (broadcasting)."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def seed_key(seed: Tensor) -> tuple[Tensor, Tensor]:
    """The Philox key words (k0, k1) of an int64 seed tensor (any shape; taken as 64 raw bits)."""
    s = seed.reshape(()).to(torch.int64)
    return s & MASK32, (s >> 32) & MASK32


def _counter_words(chain_ids: Tensor, steps: Tensor) -> tuple[Tensor, Tensor]:
    """Counter words 1 (k + 1) and 2 (chain id), each mod 2^32."""
    return (steps.to(torch.int64) + 1) & MASK32, chain_ids.to(torch.int64) & MASK32


def normal_uniforms(xa: Tensor, xb: Tensor) -> tuple[Tensor, Tensor]:
    """Box-Muller's radius uniform v in (0, 1) and angle uniform t in [0, 1), as float64 (exact)."""
    v = (2 * (xa >> 9) + 1).to(torch.float64) * 2.0**-24
    t = (xb >> 8).to(torch.float64) * 2.0**-24
    return v, t


def box_muller(xa: Tensor, xb: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    v, t = normal_uniforms(xa, xb)
    v, t = v.to(dtype), t.to(dtype)
    r = torch.sqrt(-2.0 * torch.log(v))
    th = TWO_PI * t
    return r * torch.cos(th), r * torch.sin(th)


def normal_noise(
    seed: Tensor, chain_ids: Tensor, steps: Tensor, D: int, dtype: torch.dtype = torch.float64
) -> Tensor:
    """xi(seed, chain_ids[b], steps[b]) for every b: [B, D] in ``dtype`` (computed in ``dtype``)."""
    k0, k1 = seed_key(seed)
    c1, c2 = _counter_words(chain_ids, steps)
    Q = -(-D // 4)
    i = torch.arange(Q, device=chain_ids.device, dtype=torch.int64)[None, :]
    zero = torch.zeros_like(i)
    words = philox4x32(i, c1[:, None], c2[:, None], zero, k0, k1)
    x0, x1, x2, x3 = (w.expand(-1, Q) for w in words)
    n0, n1 = box_muller(x0, x1, dtype)
    n2, n3 = box_muller(x2, x3, dtype)
    return torch.cat([n0, n1, n2, n3], dim=1)[:, :D]


def uniform_noise(seed: Tensor, chain_ids: Tensor, steps: Tensor) -> Tensor:
    """u(seed, chain_ids[b], steps[b]): [B] float32 (exact)."""
    k0, k1 = seed_key(seed)
    c1, c2 = _counter_words(chain_ids, steps)
    zero = torch.zeros_like(c1)
    x0, _, _, _ = philox4x32(zero, c1, c2, zero + STREAM_UNIFORM, k0, k1)
    return ((x0 >> 8).to(torch.float64) * 2.0**-24).to(torch.float32)


def chain_noise(
    seed: Tensor,
    chain_ids: Tensor,
    steps: Tensor,
    window: int,
    event_numel: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """xi [B, window, D] (``dtype``) and u [B, window] (float32) of steps ``steps[b] + j``."""
    B = chain_ids.shape[0]
    j = torch.arange(window, device=chain_ids.device, dtype=torch.int64)
    k = (steps.to(torch.int64)[:, None] + j[None, :]).reshape(-1)
    c = chain_ids.to(torch.int64)[:, None].expand(B, window).reshape(-1)
    xi = normal_noise(seed, c, k, event_numel, acc_dtype(dtype)).to(dtype)
    xi = xi.reshape(B, window, event_numel)
    u = uniform_noise(seed, c, k).reshape(B, window)
    return xi, u


# ---------------------------------------------------------------- the frozen round
def _clip(p: Tensor, clip: float) -> Tensor:
    return p if math.isinf(clip) else p.clamp(-clip, clip)


def _rows(coef: Tensor, k: Tensor, acc: torch.dtype) -> Tensor:
    """coef[:, k] as [NUM_ROWS, B, 1] in acc (k clamped into the table)."""
    N = coef.shape[1]
    return coef[:, k.clamp(0, N - 1)].to(acc)[..., None]


def draft_x0(c: Tensor, y: Tensor, f: Tensor, freeze: int) -> Tensor:
    """The frozen draft's x0-hat at drafted state y (c: coef rows at the step)."""
    return f if freeze == FREEZE_X0 else c[ROW_X0_Y] * y - c[ROW_X0_F] * f


def affine_mean(c: Tensor, p: Tensor, x: Tensor, clip: float) -> Tensor:
    return c[ROW_A] * _clip(p, clip) + c[ROW_E] * p + c[ROW_G] * x


def freeze_value(c: Tensor, y: Tensor, p: Tensor, freeze: int) -> Tensor:
    """The frozen quantity from the target's x0-hat p at state y."""
    return p if freeze == FREEZE_X0 else c[ROW_EPS_Y] * y - c[ROW_EPS_P] * p


def frozen_draft(root: Tensor, chains: RoundChains, spec: RoundSpec, window: int) -> Tensor:
    """Drafted states Y [B, window + 1, *E]: Y[:, 0] = root; for j < lengths[b],
    ``Y[b, j+1] = m_q(Y[b, j], k+j) + std[k+j] xi(seed, c, k+j)``; beyond, Y[b, j+1] = Y[b, j].
    Each drafted state is rounded to the state dtype before the next step drafts from it (the
    verify recomputes m_q from the stored states). With ``prev`` (multistep), m_q adds
    ``H[k+j] q_{j-1}``: q_{-1} = prev, q_j the draft's x0-hat at Y[b, j]."""
    frozen, steps, lengths, chain_ids, prev = chains
    coef, seed, freeze, clip = spec
    B = root.shape[0]
    D = root[0].numel() if B else 0
    acc = acc_dtype(root.dtype)
    y = root.reshape(B, D).to(acc)
    f = frozen.reshape(B, D).to(acc)
    q_prev = None if prev is None else prev.reshape(B, D).to(acc)
    k = steps.to(torch.int64)
    n = lengths.to(torch.int64).clamp(0, window)
    ys = [root.reshape(B, D)]
    for j in range(window):
        c = _rows(coef, k + j, acc)
        xi = normal_noise(seed, chain_ids, k + j, D, acc)
        pq = draft_x0(c, y, f, freeze)
        mq = affine_mean(c, pq, y, clip)
        if q_prev is not None:
            mq = mq + c[ROW_H] * q_prev
            q_prev = pq
        y_new = (mq + c[ROW_STD] * xi).to(root.dtype)
        live = (j < n)[:, None]
        ys.append(torch.where(live, y_new, ys[-1]))
        y = ys[-1].to(acc)
    return torch.stack(ys, 1).reshape(B, window + 1, *root.shape[1:])


def verify_frozen(
    states: Tensor, x0_hat: Tensor, chains: RoundChains, spec: RoundSpec
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Verify a frozen-draft window and commit the round (docs/design.md §6).

    With d_j = m_p(y_j) - m_q(y_j) = A (clip(P_j) - clip(p_q)) + E (P_j - p_q) and r_j = s xi_j:
    log_ratio_j = <d_j, xi_j> / s - ||d_j||^2 / (2 s^2) for j < n (0 beyond); step j is accepted
    iff the ratio is finite and log u_j <= log_ratio_j. Commit per chain:

    * rejection at j: next_state = m_q(y_j) + r_j + (1 - 2 <d_j, r_j> / ||d_j||^2) d_j (the
      reflection), committed j + 1, next_frozen = freeze(y_j, P_j), root_exact False;
    * all n accepted: next_state = y_n, committed n; if k + n < N: next_frozen = freeze(y_n, P_n)
      and root_exact True, and if step k + n is deterministic (std 0) it is taken too
      (next_state = m_p(y_n), committed n + 1, root_exact False); if k + n >= N the frozen value is
      kept;
    * n = 0: a chain at a deterministic step k < N takes it from P_0 (committed 1,
      next_frozen = freeze(y_0, P_0)); any other chain is left as it is (committed 0).

    Multistep (``prev`` given, docs/design.md §6.1): both means add ``H[k+j]`` times their previous
    prediction (target: ``prev`` at j = 0, P_{j-1} after; draft: ``prev`` at j = 0, its own x0-hat
    at y_{j-1} after), so d_j gains ``H (P_{j-1} - p_q(y_{j-1}))`` for j >= 1; ``next_prev`` is the
    target's x0-hat at the new state's parent: P_j after a rejection at j or a deterministic step
    from y_j, P_{n-1} after an accepted window, ``prev`` for an idle chain.

    Returns (num_accepted [B] int64, committed [B] int64, next_state [B, *E] (state dtype),
    next_frozen [B, *E] (state dtype), root_exact [B] bool, log_ratio [B, L] float32,
    next_prev [B, *E] (state dtype; an empty [0] tensor without ``prev``)).
    """
    w = _Window.of(states, x0_hat, chains, spec)
    lr, ab, PQ = _partial_sums(w, spec)
    first, rejected = _decide(w, spec, lr)
    return _commit(w, spec, ab, PQ, first, rejected, lr)


class _Window(NamedTuple):
    """verify_frozen's inputs as the passes read them (flattened to [B, ..., D], in acc)."""

    Y: Tensor  # [B, L+1, D] drafted states
    P: Tensor  # [B, L+1, D] the target's x0-hat at them
    f: Tensor  # [B, D] frozen values
    prev: Optional[Tensor]  # [B, D] multistep: the previous prediction at the root
    k: Tensor  # [B] first steps
    n: Tensor  # [B] window lengths, in 0..L
    ids: Tensor  # [B] chain ids
    like: Tensor  # the states as given (dtype, event shape, device)

    @staticmethod
    def of(states: Tensor, x0_hat: Tensor, chains: RoundChains, spec: RoundSpec) -> "_Window":
        B, L1 = states.shape[:2]
        D = states[0, 0].numel() if B else 0
        acc = acc_dtype(states.dtype)
        prev = chains.prev
        return _Window(
            states.reshape(B, L1, D).to(acc),
            x0_hat.reshape(B, L1, D).to(acc),
            chains.frozen.reshape(B, D).to(acc),
            None if prev is None else prev.reshape(B, D).to(acc),
            chains.steps.to(torch.int64),
            chains.lengths.to(torch.int64).clamp(0, L1 - 1),  # L >= 1 (the wrappers check it)
            chains.chain_ids,
            states,
        )


def _gap(c: Tensor, p: Tensor, pq: Tensor, clip: float) -> Tensor:
    """The mean gap's x0-hat terms A (clip(p) - clip(pq)) + E (p - pq)."""
    return c[ROW_A] * (_clip(p, clip) - _clip(pq, clip)) + c[ROW_E] * (p - pq)


def _partial_sums(w: _Window, spec: RoundSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1, per window position j: the log ratio l_j, the sums a_j = <d_j, r_j> and
    b_j = ||d_j||^2 (stacked [2, B, L]) and the draft's x0-hat by position ([B, L+1, D])."""
    B, L1, D = w.Y.shape
    L, acc, dev = L1 - 1, w.Y.dtype, w.Y.device
    lr = torch.zeros(B, L, dtype=acc, device=dev)
    ab = torch.zeros(2, B, L, dtype=acc, device=dev)
    PQ = torch.zeros(B, L1, D, dtype=acc, device=dev)
    for j in range(L):
        c = _rows(spec.coef, w.k + j, acc)
        pq = draft_x0(c, w.Y[:, j], w.f, spec.freeze)
        PQ[:, j] = pq
        d = _gap(c, w.P[:, j], pq, spec.clip)
        if w.prev is not None and j > 0:
            d = d + c[ROW_H] * (w.P[:, j - 1] - PQ[:, j - 1])
        xi = normal_noise(spec.seed, w.ids, w.k + j, D, acc)
        a, b = (d * xi).sum(-1), (d * d).sum(-1)
        s = c[ROW_STD][:, 0]
        live = j < w.n
        safe_s = torch.where(live, s, torch.ones_like(s))
        lr[:, j] = torch.where(live, a / safe_s - b / (2 * safe_s * safe_s), torch.zeros_like(s))
        ab[0, :, j], ab[1, :, j] = a * safe_s, b  # <d, r> and ||d||^2
    return lr, ab, PQ


def _decide(w: _Window, spec: RoundSpec, lr: Tensor) -> tuple[Tensor, Tensor]:
    """Pass 2: each chain's first rejected position (n if none) and whether it rejected."""
    B, L = lr.shape
    dev = lr.device
    u = torch.stack([uniform_noise(spec.seed, w.ids, w.k + j) for j in range(L)], 1)
    pos = torch.arange(L, device=dev)
    accept = torch.isfinite(lr) & (torch.log(u.to(lr.dtype)) <= lr)
    reject = (~accept) & (pos[None] < w.n[:, None])
    first = torch.where(
        reject, pos[None].expand(B, L), torch.full_like(reject, L, dtype=torch.int64)
    )
    first = torch.minimum(first.min(1).values, w.n)
    return first, first < w.n


def _commit(
    w: _Window, spec: RoundSpec, ab: Tensor, PQ: Tensor, first: Tensor, rejected: Tensor, lr
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pass 3: the round's outcome per chain at the deciding position (the table in
    docs/design.md §6)."""
    coef, clip, freeze = spec.coef, spec.clip, spec.freeze
    B, L1, D = w.Y.shape
    L, N, acc = L1 - 1, coef.shape[1], w.Y.dtype
    k, n, ar = w.k, w.n, torch.arange(B, device=w.Y.device)
    j = torch.where(rejected, first, n).clamp(0, L)  # the position that decides
    c = _rows(coef, k + j, acc)
    yj, pj = w.Y[ar, j], w.P[ar, j]
    # rejection: reflect the draft's step j about the hyperplane orthogonal to d_j
    pq = draft_x0(c, yj, w.f, freeze)
    mq = affine_mean(c, pq, yj, clip)
    d = _gap(c, pj, pq, clip)
    det_mean = affine_mean(c, pj, yj, clip)
    if w.prev is not None:
        at_root = (j == 0)[:, None]
        jm = (j - 1).clamp(min=0)
        target_prev = torch.where(at_root, w.prev, w.P[ar, jm])  # P_{j-1}, prev at the root
        draft_prev = torch.where(at_root, w.prev, PQ[ar, jm])
        mq = mq + c[ROW_H] * draft_prev
        d = d + c[ROW_H] * (target_prev - draft_prev)
        det_mean = det_mean + c[ROW_H] * target_prev
    r = c[ROW_STD] * normal_noise(spec.seed, w.ids, k + j, D, acc)
    jc = j.clamp(max=L - 1)  # (only read at a rejection, j < n)
    a_j, b_j = ab[0, ar, jc][:, None], ab[1, ar, jc][:, None]
    pos_b = b_j > 0
    coef_r = torch.where(
        pos_b, 1 - 2 * a_j / torch.where(pos_b, b_j, torch.ones_like(b_j)), torch.ones_like(b_j)
    )
    reflected = mq + r + coef_r * d
    # acceptance of all n steps (or n = 0): y_n, and a deterministic step from y_n if one is next
    kn = k + n
    live_next = kn < N
    det_next = live_next & (coef[ROW_STD, kn.clamp(0, N - 1)] == 0)
    accepted_state = torch.where(det_next[:, None], det_mean, yj)

    next_state = torch.where(rejected[:, None], reflected, accepted_state)
    committed = torch.where(rejected, first + 1, n + det_next.to(torch.int64))
    # n = 0 and not deterministic: nothing happens (finished chain, or masked out)
    idle = (n == 0) & ~det_next
    fz = freeze_value(c, yj, pj, freeze)
    keep_frozen = idle | (~rejected & ~live_next)
    next_frozen = torch.where(keep_frozen[:, None], w.f, fz)
    root_exact = ~rejected & live_next & ~det_next & (n > 0)
    states = w.like
    E = states.shape[2:]
    if w.prev is not None:
        parent_is_j = (rejected | det_next)[:, None]
        next_prev = torch.where(parent_is_j, pj, target_prev).to(states.dtype).reshape(B, *E)
    else:
        next_prev = states.new_empty((0,))
    return (
        first.to(torch.int64),
        committed,
        next_state.to(states.dtype).reshape(B, *E),
        next_frozen.to(states.dtype).reshape(B, *E),
        root_exact,
        lr.to(torch.float32),
        next_prev,
    )


# ---------------------------------------------------------------- round statistics
def round_stats(
    stats: Tensor,
    steps: Tensor,
    lengths: Tensor,
    num_accepted: Tensor,
    committed: Tensor,
    log_ratio: Tensor,
    output: Tensor,
    num_steps: int,
) -> Tensor:
    """The stats vector after one static round (a new tensor; ``stats`` is not changed).

    Args:
        stats: int64 ``[StatsLayout(L, N, B).size]`` before the round.
        steps, lengths: ``[B]`` int64 each chain's step k before the round and its window length n
            (0: the chain did not speculate: finished, or at a deterministic step).
        num_accepted, committed: ``[B]`` int64 from ``verify_frozen``.
        log_ratio: ``[B, L]`` from ``verify_frozen``.
        output: ``[B, L+1, ...]`` the network's raw output at the window's states (positions
            ``0..n`` were read by verify_frozen, for chains not finished).
        num_steps: N.
    """
    B, L = log_ratio.shape
    N = int(num_steps)
    lay = StatsLayout(L, N, B)
    out = stats.clone()
    k, n, na = steps, lengths, num_accepted
    pos = torch.arange(L + 1, device=k.device)
    code = torch.arange(B, device=k.device)[:, None] * (N + 1) + k[:, None] + pos[None]
    live = pos[None, :L] < n[:, None]
    attempted = live & (pos[None, :L] <= na[:, None])
    accepted = pos[None, :L] < na[:, None]
    spec = (n > 0).to(torch.int64)
    spec_steps = (na + (na < n).to(torch.int64)) * spec
    k_new = k + committed
    read = (pos[None] <= n[:, None]) & (k < N)[:, None]
    out_bad = ~torch.isfinite(output.reshape(B, L + 1, -1)).all(-1) & read
    ratio_bad = ~torch.isfinite(log_ratio) & attempted

    def first(prev: Tensor, bad: Tensor, codes: Tensor) -> Tensor:
        return torch.minimum(prev, codes.masked_fill(~bad, NO_BAD).amin())

    rounds = out[STAT_ROUNDS] + 1
    out[STAT_ROUNDS] = rounds
    out[STAT_WINDOWS] += spec.sum()
    out[STAT_SPEC_STEPS] += spec_steps.sum()
    out[STAT_DET_STEPS] += (committed - spec_steps).sum()
    out[STAT_BAD_OUTPUT] = first(out[STAT_BAD_OUTPUT], out_bad, code)
    out[STAT_BAD_RATIO] = first(out[STAT_BAD_RATIO], ratio_bad, code[:, :L])
    out[STAT_STEPS_DONE] = k_new.clamp(max=N).sum()
    out[STAT_LIVE] = (k_new < N).sum()
    i64 = torch.int64
    lay.view(out, "accepted_by_position").add_(accepted.sum(0))
    lay.view(out, "attempted_by_position").add_(attempted.sum(0))
    lay.view(out, "accepted_length_hist").scatter_add_(0, na, spec)
    lay.view(out, "window_length_hist").scatter_add_(0, n, spec)
    kw = (k[:, None] + pos[None, :L]).clamp(max=N - 1).reshape(-1)
    lay.view(out, "accepted_by_step").scatter_add_(0, kw, accepted.reshape(-1).to(i64))
    lay.view(out, "attempted_by_step").scatter_add_(0, kw, attempted.reshape(-1).to(i64))
    cr = lay.view(out, "chain_rounds")
    cr.copy_(torch.where((k < N) & (k_new >= N), rounds, cr))
    return out

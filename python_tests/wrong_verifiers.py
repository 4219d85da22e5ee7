"""Deliberately WRONG verifiers, injected through the samplers' ``verify_fn=`` hook: the exactness
tests must reject them (proof that those tests can fail)."""

from __future__ import annotations

import torch

import specdiff_kernels
from specdiff_kernels import VerifyResult


def verify_always_accept(
    draft_states, draft_means, target_means, sigma, uniforms, lengths=None, *, backend=None
):
    """WRONG: accepts every drafted step (the output is the draft chain)."""
    B, L = draft_states.shape[:2]
    n = torch.full((B,), L, dtype=torch.int64) if lengths is None else lengths.to(torch.int64)
    y_n = draft_states[torch.arange(B), n - 1]
    lr = specdiff_kernels.gaussian_log_ratio(draft_states, draft_means, target_means, sigma)
    return VerifyResult(n, y_n, lr)


def verify_keep_draft_on_reject(
    draft_states, draft_means, target_means, sigma, uniforms, lengths=None, *, backend=None
):
    """WRONG: on the first rejection keeps the drafted y_{j+1} instead of reflecting it."""
    res = specdiff_kernels.speculative_verify(
        draft_states, draft_means, target_means, sigma, uniforms, lengths, backend=backend
    )
    B, L = draft_states.shape[:2]
    j = res.num_accepted.clamp(max=L - 1)
    return VerifyResult(res.num_accepted, draft_states[torch.arange(B), j], res.log_ratio)


class VerifyFreshFromP:
    """WRONG: on the first rejection draws a fresh sample from p instead of the reflection (the
    residual law (p - q)_+ / TV is not p)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        draft_states,
        draft_means,
        target_means,
        sigma,
        uniforms,
        lengths=None,
        *,
        backend=None,
    ):
        res = specdiff_kernels.speculative_verify(
            draft_states, draft_means, target_means, sigma, uniforms, lengths, backend=backend
        )
        B, L = draft_states.shape[:2]
        n = torch.full((B,), L, dtype=torch.int64) if lengths is None else lengths.to(torch.int64)
        rejected = res.num_accepted < n
        j = res.num_accepted.clamp(max=L - 1)
        idx = torch.arange(B)
        s = torch.as_tensor(sigma).expand(B, L)[idx, j].to(draft_states.dtype)
        fresh = target_means[idx, j] + s.view(B, *([1] * (draft_states.dim() - 2))) * torch.randn(
            draft_states[idx, j].shape, generator=self.gen, dtype=draft_states.dtype
        )
        mask = rejected.view(B, *([1] * (draft_states.dim() - 2)))
        return VerifyResult(
            res.num_accepted, torch.where(mask, fresh, res.next_state), res.log_ratio
        )


WRONG = {"always_accept": verify_always_accept, "keep_draft": verify_keep_draft_on_reject}


def wrong_verifier(name: str, fresh_seed: int):
    """``WRONG[name]``, or for ``"fresh_from_p"`` a ``VerifyFreshFromP(fresh_seed)``."""
    return VerifyFreshFromP(fresh_seed) if name == "fresh_from_p" else WRONG[name]


# ---------------------------------------------------------------- the static path's verify
# The static round calls the fused ``verify_frozen`` op (StaticRound._verify), not ``verify_fn``:
# these WRONG variants replace that method (tests patch it with monkeypatch).
def _mean_gap_and_step(rnd, Y, P, chains, j):
    """m_p, the draft step's r = s xi and the mean gap d at window position j (float64)."""
    from specdiff_kernels.ops.layout import ROW_STD
    from specdiff_kernels.ops.reference import round as rr

    spec, k = rnd.spec, chains.steps
    B = Y.shape[0]
    idx = torch.arange(B, device=Y.device)
    D = Y[0, 0].numel()
    c = rr._rows(spec.coef, k + j, torch.float64)
    yj = Y.reshape(B, Y.shape[1], D)[idx, j].double()
    pj = P.reshape(B, Y.shape[1], D)[idx, j].double()
    f = chains.frozen.reshape(B, D).double()
    pq = rr.draft_x0(c, yj, f, spec.freeze)
    mp = rr.affine_mean(c, pj, yj, spec.clip)
    mq = rr.affine_mean(c, pq, yj, spec.clip)
    r = c[ROW_STD] * rr.normal_noise(spec.seed, chains.chain_ids, k + j, D, torch.float64)
    return mp, mq, r, c[ROW_STD]


def static_wrong_verify(kind: str, seed: int = 0):
    """A WRONG replacement of StaticRound._verify: ``always_accept`` (commits the whole drafted
    window), ``keep_draft`` (keeps y_{j+1} at a rejection), ``fresh_from_p`` (a fresh draw from p
    at a rejection) or ``half_reflection`` (reflection coefficient 1 - a/b instead of 1 - 2a/b)."""
    from specdiff_kernels.sampling.static_round import StaticRound

    real = StaticRound._verify
    gen = torch.Generator().manual_seed(seed)

    def verify(self, Y, P, chains):
        res = real(self, Y, P, chains)
        n = chains.lengths
        B, L1 = Y.shape[:2]
        idx = torch.arange(B, device=Y.device)
        rejected = res.num_accepted < n
        j = res.num_accepted.clamp(max=L1 - 2)
        shape = (B,) + (1,) * (Y.dim() - 2)
        mask = rejected.view(shape)
        if kind == "always_accept":
            return res._replace(
                num_accepted=torch.where(rejected, n, res.num_accepted),
                committed=torch.where(rejected, n, res.committed),
                next_state=torch.where(mask, Y[idx, n], res.next_state),
            )
        if kind == "keep_draft":
            return res._replace(next_state=torch.where(mask, Y[idx, j + 1], res.next_state))
        mp, mq, r, s = _mean_gap_and_step(self, Y, P, chains, j)
        if kind == "fresh_from_p":
            wrong = mp + s * torch.randn(mp.shape, generator=gen, dtype=torch.float64)
        elif kind == "half_reflection":
            d = mp - mq
            a = (d * r).sum(-1, keepdim=True)
            b = (d * d).sum(-1, keepdim=True).clamp_min(1e-300)
            wrong = mq + r + (1 - a / b) * d
        else:
            raise ValueError(kind)
        wrong = wrong.to(Y.dtype).reshape(res.next_state.shape)
        return res._replace(next_state=torch.where(mask, wrong, res.next_state))

    return verify


# (fresh_from_p is not in this list: the frozen drafts reject too rarely in this chain for its small
# error to show at these sample sizes; test_round_ops.py rejects it with the one-step law test.)
STATIC_WRONG = ("always_accept", "keep_draft", "half_reflection")


# ---------------------------------------------------------------- multistep verify_frozen variants
# verify_frozen (with ``prev``) composed from the coefficient table's means, materialised, and the
# general verify op; ``kind`` injects one bug of the multistep term (kind "correct": none, so a
# test can show that the composition itself is right and the bug is all that differs).
MULTISTEP_WRONG = (
    "target_prev_is_prev",
    "target_prev_is_draft_x0",
    "draft_prev_is_prev",
    "next_prev_is_draft_x0",
)


def multistep_verify_frozen(kind: str = "correct"):
    """A verify_frozen(states, x0_hat, chains, spec) (``chains.prev`` given) in float64. WRONG kinds: ``target_prev_is_prev`` (the target's previous prediction is
    prev at every position, not P_{j-1}), ``target_prev_is_draft_x0`` (the target's previous
    prediction is the draft's, so the mean gap has no H term), ``draft_prev_is_prev`` (the draft's
    previous prediction is prev at every position; the draft
    then no longer matches frozen_draft's rollout) and ``next_prev_is_draft_x0`` (next_prev is the
    draft's x0-hat at the deciding position, not the target's)."""
    from specdiff_kernels.ops.layout import ROW_H, ROW_STD
    from specdiff_kernels.ops.reference import round as rr
    from specdiff_kernels.ops.reference import verify as reference

    if kind not in ("correct", *MULTISTEP_WRONG):
        raise ValueError(kind)

    def verify(states, x0_hat, chains, spec):
        frozen, steps, lengths, chain_ids, prev = chains
        coef, seed, freeze, clip = spec
        B, L1 = states.shape[:2]
        L, N = L1 - 1, coef.shape[1]
        D = states[0, 0].numel()
        f64 = torch.float64
        Y = states.reshape(B, L1, D).to(f64)
        P = x0_hat.reshape(B, L1, D).to(f64)
        f = frozen.reshape(B, D).to(f64)
        q = prev.reshape(B, D).to(f64)
        k, n = steps.to(torch.int64), lengths.to(torch.int64)
        xi, u = rr.chain_noise(seed, chain_ids, k, L, D, f64)
        mq, mp, pq = [], [], []
        for j in range(L1):  # position L: the deterministic step after a full window
            c = rr._rows(coef, k + j, f64)
            pq.append(rr.draft_x0(c, Y[:, j], f, freeze))
            first = j == 0
            d_prev = q if first or kind == "draft_prev_is_prev" else pq[j - 1]
            t_prev = q if first or kind == "target_prev_is_prev" else P[:, j - 1]
            if kind == "target_prev_is_draft_x0":
                t_prev = d_prev
            mq.append(rr.affine_mean(c, pq[j], Y[:, j], clip) + c[ROW_H] * d_prev)
            mp.append(rr.affine_mean(c, P[:, j], Y[:, j], clip) + c[ROW_H] * t_prev)
        MQ, MP = torch.stack(mq[:L], 1), torch.stack(mp[:L], 1)
        pos_l = torch.arange(L, device=states.device)
        live = pos_l[None] < n[:, None]
        S = coef[ROW_STD][(k[:, None] + pos_l[None]).clamp(max=N - 1)].to(f64)
        S = torch.where(live, S, torch.ones_like(S))
        MP = torch.where(live[..., None], MP, MQ)
        prop = MQ + S[..., None] * xi
        nacc, reflected, _ = reference.speculative_verify(prop, MQ, MP, S, u.to(f64), n.clamp(1))
        lr = torch.where(live, reference._log_ratio_acc(prop, MQ, MP, S), torch.zeros_like(S))
        nacc = torch.where(n > 0, nacc, torch.zeros_like(n))
        rejected = nacc < n
        pos = torch.where(rejected, nacc, n)
        ar = torch.arange(B, device=states.device)
        y_pos, p_pos = Y[ar, pos], P[ar, pos]
        c = rr._rows(coef, k + pos, f64)
        live_next = k + n < N
        det_next = live_next & (coef[ROW_STD, (k + n).clamp(max=N - 1)] == 0)
        det = torch.stack(mp, 1)[ar, pos]
        state = torch.where(
            rejected[:, None], reflected, torch.where(det_next[:, None], det, y_pos)
        )
        keep = (~rejected & ~live_next) | ((n == 0) & ~det_next)
        next_frozen = torch.where(keep[:, None], f, rr.freeze_value(c, y_pos, p_pos, freeze))
        committed = torch.where(rejected, nacc + 1, n + det_next.to(torch.int64))
        root_exact = ~rejected & live_next & ~det_next & (n > 0)
        before = torch.where((pos == 0)[:, None], q, P[ar, (pos - 1).clamp(min=0)])
        next_prev = torch.where((rejected | det_next)[:, None], p_pos, before)
        if kind == "next_prev_is_draft_x0":
            next_prev = torch.stack(pq, 1)[ar, pos]
        dt, E = states.dtype, states.shape[2:]
        return (
            nacc,
            committed,
            state.to(dt).reshape(B, *E),
            next_frozen.to(dt).reshape(B, *E),
            root_exact,
            lr.to(torch.float32),
            next_prev.to(dt).reshape(B, *E),
        )

    return verify

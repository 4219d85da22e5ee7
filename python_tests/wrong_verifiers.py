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


# ---------------------------------------------------------------- the static path's verify
# The static round calls the fused ``verify_frozen`` op (StaticRound._verify), not ``verify_fn``:
# these WRONG variants replace that method (tests patch it with monkeypatch).
def _mean_gap_and_step(rnd, Y, P, frozen, k, j):
    """m_p, the draft step's r = s xi and the mean gap d at window position j (float64)."""
    from specdiff_kernels.ops.layout import ROW_STD
    from specdiff_kernels.ops.reference import round as rr

    B = Y.shape[0]
    idx = torch.arange(B, device=Y.device)
    D = Y[0, 0].numel()
    c = rr._rows(rnd.coef, k + j, torch.float64)
    yj = Y.reshape(B, Y.shape[1], D)[idx, j].double()
    pj = P.reshape(B, Y.shape[1], D)[idx, j].double()
    f = frozen.reshape(B, D).double()
    pq = rr.draft_x0(c, yj, f, rnd.freeze)
    mp = rr.affine_mean(c, pj, yj, rnd.clip)
    mq = rr.affine_mean(c, pq, yj, rnd.clip)
    r = c[ROW_STD] * rr.normal_noise(rnd.seed, rnd.ids, k + j, D, torch.float64)
    return mp, mq, r, c[ROW_STD]


def static_wrong_verify(kind: str, seed: int = 0):
    """A WRONG replacement of StaticRound._verify: ``always_accept`` (commits the whole drafted
    window), ``keep_draft`` (keeps y_{j+1} at a rejection), ``fresh_from_p`` (a fresh draw from p
    at a rejection) or ``half_reflection`` (reflection coefficient 1 - a/b instead of 1 - 2a/b)."""
    from specdiff_kernels.sampling.static_round import StaticRound

    real = StaticRound._verify
    gen = torch.Generator().manual_seed(seed)

    def verify(self, Y, P, frozen, k, n):
        res = real(self, Y, P, frozen, k, n)
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
        mp, mq, r, s = _mean_gap_and_step(self, Y, P, frozen, k, j)
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

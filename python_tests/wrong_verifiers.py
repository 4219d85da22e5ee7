"""Deliberately WRONG verifiers, injected through the samplers' ``verify_fn=`` hook: the exactness
tests must reject them (proof that those tests can fail)."""
from __future__ import annotations

import torch

import specdiff_kernels
from specdiff_kernels import VerifyResult


def verify_always_accept(draft_states, draft_means, target_means, sigma, uniforms, num_steps=None, *,
                         backend=None):
    """WRONG: accepts every drafted step (the output is the draft chain)."""
    B, L = draft_states.shape[:2]
    n = torch.full((B,), L, dtype=torch.int64) if num_steps is None else num_steps.to(torch.int64)
    y_n = draft_states[torch.arange(B), n - 1]
    lr = specdiff_kernels.gaussian_log_ratio(draft_states, draft_means, target_means, sigma)
    return VerifyResult(n, y_n, lr)


def verify_keep_draft_on_reject(draft_states, draft_means, target_means, sigma, uniforms,
                                num_steps=None, *, backend=None):
    """WRONG: on the first rejection keeps the drafted y_{j+1} instead of reflecting it."""
    res = specdiff_kernels.speculative_verify(draft_states, draft_means, target_means, sigma,
                                              uniforms, num_steps, backend=backend)
    B, L = draft_states.shape[:2]
    j = res.num_accepted.clamp(max=L - 1)
    return VerifyResult(res.num_accepted, draft_states[torch.arange(B), j], res.log_ratio)


class VerifyFreshFromP:
    """WRONG: on the first rejection draws a fresh sample from p instead of the reflection (the
    residual law (p - q)_+ / TV is not p)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, draft_states, draft_means, target_means, sigma, uniforms, num_steps=None, *,
                 backend=None):
        res = specdiff_kernels.speculative_verify(draft_states, draft_means, target_means, sigma,
                                                  uniforms, num_steps, backend=backend)
        B, L = draft_states.shape[:2]
        n = torch.full((B,), L, dtype=torch.int64) if num_steps is None else num_steps.to(torch.int64)
        rejected = res.num_accepted < n
        j = res.num_accepted.clamp(max=L - 1)
        idx = torch.arange(B)
        s = torch.as_tensor(sigma).expand(B, L)[idx, j].to(draft_states.dtype)
        fresh = target_means[idx, j] + s.view(B, *([1] * (draft_states.dim() - 2))) * torch.randn(
            draft_states[idx, j].shape, generator=self.gen, dtype=draft_states.dtype)
        mask = rejected.view(B, *([1] * (draft_states.dim() - 2)))
        return VerifyResult(res.num_accepted, torch.where(mask, fresh, res.next_state), res.log_ratio)


WRONG = {"always_accept": verify_always_accept, "keep_draft": verify_keep_draft_on_reject}

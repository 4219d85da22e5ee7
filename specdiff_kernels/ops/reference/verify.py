"""Plain PyTorch reference for the speculative-verify ops (docs/design.md §3, §4).

Written for clarity, not speed: every other backend is tested against this one, evaluated in
float64. It is traceable by ``torch.compile`` (no host synchronisation, no data-dependent shapes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..layout import acc_dtype


def _flat_window(x: Tensor) -> Tensor:
    """[B, L, *E] -> [B, L, D]"""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _expand_sigma(sigma: Tensor, batch: int, window: int) -> Tensor:
    return sigma.expand(batch, window)


def _log_ratio_acc(
    draft_states: Tensor, draft_means: Tensor, target_means: Tensor, sigma: Tensor
) -> Tensor:
    """(<d, r> - ||d||^2 / 2) / s^2 per step, [B, L], in the accumulation dtype."""
    acc = acc_dtype(draft_states.dtype)
    B, L = draft_states.shape[:2]
    d = _flat_window(target_means).to(acc) - _flat_window(draft_means).to(acc)
    r = _flat_window(draft_states).to(acc) - _flat_window(draft_means).to(acc)
    s = _expand_sigma(sigma, B, L).to(acc)
    return ((d * r).sum(-1) - 0.5 * (d * d).sum(-1)) / (s * s)


def gaussian_log_ratio(
    draft_states: Tensor, draft_means: Tensor, target_means: Tensor, sigma: Tensor
) -> Tensor:
    """log p(y_{j+1}|y_j) - log q(y_{j+1}|y_j) = (<d, r> - ||d||^2 / 2) / s^2, as float32 [B, L]."""
    return _log_ratio_acc(draft_states, draft_means, target_means, sigma).to(torch.float32)


def first_rejection(log_ratio: Tensor, uniforms: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Index of the first rejected step per chain ([B] int64), or ``lengths`` (default L).

    Step j is accepted iff log(u_j) <= log_ratio_j and log_ratio_j is finite; u = 0 always
    accepts a finite ratio. Steps at or beyond ``lengths`` are ignored.
    """
    B, L = log_ratio.shape
    cmp = acc_dtype(log_ratio.dtype)
    lr = log_ratio.to(cmp)
    accept = torch.isfinite(lr) & (torch.log(uniforms.to(cmp)) <= lr)
    steps = torch.arange(L, device=log_ratio.device)
    if lengths is None:
        n = torch.full((B,), L, dtype=torch.int64, device=log_ratio.device)
    else:
        n = lengths.to(torch.int64)
    reject = (~accept) & (steps[None, :] < n[:, None])
    # first True index, or L when none: argmax over a padded column that is always True
    padded = torch.cat([reject, torch.ones(B, 1, dtype=torch.bool, device=reject.device)], dim=1)
    first = torch.argmax(padded.to(torch.uint8), dim=1)
    return torch.minimum(first, n)


def reflect_resample(draft_state: Tensor, draft_mean: Tensor, target_mean: Tensor) -> Tensor:
    """Reflection-maximal-coupling resample: y + (1 - 2<d, y - mq>/||d||^2) d, d = mp - mq.

    Equivalently mp + (I - 2 e e^T)(y - mq) with e = d/||d||. When d = 0 (p = q) returns y.
    Inputs [B, *E]; output in the input dtype.
    """
    acc = acc_dtype(draft_state.dtype)
    B = draft_state.shape[0]
    D = math.prod(draft_state.shape[1:])
    y = draft_state.reshape(B, D).to(acc)
    mq = draft_mean.reshape(B, D).to(acc)
    mp = target_mean.reshape(B, D).to(acc)
    d = mp - mq
    a = (d * (y - mq)).sum(-1, keepdim=True)
    b = (d * d).sum(-1, keepdim=True)
    safe_b = torch.where(b > 0, b, torch.ones_like(b))
    coef = torch.where(b > 0, 1.0 - 2.0 * a / safe_b, torch.ones_like(b))
    out = y + coef * d
    return out.to(draft_state.dtype).reshape(draft_state.shape)


def speculative_verify(
    draft_states: Tensor,
    draft_means: Tensor,
    target_means: Tensor,
    sigma: Tensor,
    uniforms: Tensor,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused verify = first_rejection(gaussian_log_ratio) + reflect_resample at that step."""
    B, L = draft_states.shape[:2]
    lr_acc = _log_ratio_acc(draft_states, draft_means, target_means, sigma)
    num_accepted = first_rejection(lr_acc, uniforms, lengths)
    n = (
        torch.full((B,), L, dtype=torch.int64, device=draft_states.device)
        if lengths is None
        else lengths.to(torch.int64)
    )
    rejected = num_accepted < n
    # gather the step that decides the state: the rejected one, else the last accepted (n-1)
    j = torch.where(rejected, num_accepted, n - 1).clamp(0, L - 1)
    idx = j.view(B, 1, *([1] * (draft_states.dim() - 2))).expand(B, 1, *draft_states.shape[2:])
    y_j = draft_states.gather(1, idx).squeeze(1)
    mq_j = draft_means.gather(1, idx).squeeze(1)
    mp_j = target_means.gather(1, idx).squeeze(1)
    reflected = reflect_resample(y_j, mq_j, mp_j)
    mask = rejected.view(B, *([1] * (draft_states.dim() - 2)))
    next_state = torch.where(mask, reflected, y_j)
    return num_accepted, next_state, lr_acc.to(torch.float32)

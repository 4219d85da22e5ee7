"""Argument validation shared by every backend: clear errors that name the argument.

Only metadata is inspected here (shapes, dtypes, devices), so the checks cost no device
synchronisation and trace cleanly under torch.compile. Value checks (sigma > 0, uniforms in [0, 1),
num_steps in 1..L) run where they are free: CPU tensors in eager mode (the C++ kernels repeat them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layout import FLOAT_DTYPES

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _need_tensor(x: object, op: str, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _need_float(x: Tensor, op: str, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must have a floating dtype in "
                         f"{[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")


def _same_device(x: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def _values_checkable(t: Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def as_sigma(sigma: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(sigma, (int, float)):
        return torch.tensor(float(sigma), dtype=torch.float32, device=like.device)
    return sigma


def check_window(op: str, draft_states: Tensor, draft_means: Tensor, target_means: Tensor) -> None:
    for x, name in ((draft_states, "draft_states"), (draft_means, "draft_means"),
                    (target_means, "target_means")):
        _need_tensor(x, op, name)
        _need_float(x, op, name)
    if draft_states.dim() < 3:
        raise ValueError(f"{op}: draft_states must have shape [B, L, *E] with at least one event "
                         f"dim, got {tuple(draft_states.shape)}")
    for x, name in ((draft_means, "draft_means"), (target_means, "target_means")):
        if x.shape != draft_states.shape:
            raise ValueError(f"{op}: {name} shape {tuple(x.shape)} must equal draft_states shape "
                             f"{tuple(draft_states.shape)}")
        if x.dtype != draft_states.dtype:
            raise ValueError(f"{op}: {name} dtype {x.dtype} must equal draft_states dtype "
                             f"{draft_states.dtype}")
        _same_device(x, draft_states, op, name, "draft_states")
    if draft_states.shape[1] == 0:
        raise ValueError(f"{op}: window length L = draft_states.shape[1] must be >= 1, got 0")
    if any(s == 0 for s in draft_states.shape[2:]):
        raise ValueError(f"{op}: event shape {tuple(draft_states.shape[2:])} has no elements")


def check_sigma(op: str, sigma: Tensor, batch: int, window: int, like: Tensor) -> None:
    _need_tensor(sigma, op, "sigma")
    _need_float(sigma, op, "sigma")
    _same_device(sigma, like, op, "sigma", "draft_states")
    shape = tuple(sigma.shape)
    ok = (sigma.dim() == 0
          or (sigma.dim() == 1 and shape[0] in (window, 1))
          or (sigma.dim() == 2 and shape[0] in (batch, 1) and shape[1] in (window, 1)))
    if not ok:
        raise ValueError(f"{op}: sigma must be a scalar, [L] or [B, L] broadcastable to "
                         f"[{batch}, {window}], got shape {shape}")
    if _values_checkable(sigma):
        bad = ~(torch.isfinite(sigma) & (sigma > 0))
        if bool(bad.any()):
            raise ValueError(f"{op}: sigma must be finite and > 0 everywhere; got "
                             f"{sigma[bad].flatten()[:4].tolist()}")


def check_uniforms(op: str, uniforms: Tensor, batch: int, window: int, like: Tensor) -> None:
    _need_tensor(uniforms, op, "uniforms")
    _need_float(uniforms, op, "uniforms")
    _same_device(uniforms, like, op, "uniforms", "draft_states")
    if tuple(uniforms.shape) != (batch, window):
        raise ValueError(f"{op}: uniforms must have shape [B, L] = [{batch}, {window}], got "
                         f"{tuple(uniforms.shape)}")
    if _values_checkable(uniforms):
        bad = ~((uniforms >= 0) & (uniforms < 1))
        if bool(bad.any()):
            raise ValueError(f"{op}: uniforms must lie in [0, 1); got "
                             f"{uniforms[bad].flatten()[:4].tolist()}")


def check_num_steps(op: str, num_steps: Tensor | None, batch: int, window: int, like: Tensor) -> None:
    if num_steps is None:
        return
    _need_tensor(num_steps, op, "num_steps")
    if num_steps.dtype not in INT_DTYPES:
        raise ValueError(f"{op}: num_steps must be an integer tensor, got {num_steps.dtype}")
    _same_device(num_steps, like, op, "num_steps", "draft_states")
    if tuple(num_steps.shape) != (batch,):
        raise ValueError(f"{op}: num_steps must have shape [B] = [{batch}], got "
                         f"{tuple(num_steps.shape)}")
    if _values_checkable(num_steps) and batch > 0:
        lo, hi = int(num_steps.min()), int(num_steps.max())
        if lo < 1 or hi > window:
            raise ValueError(f"{op}: num_steps values must lie in 1..L = 1..{window}, got "
                             f"min {lo}, max {hi}")


def check_log_ratio(op: str, log_ratio: Tensor) -> None:
    _need_tensor(log_ratio, op, "log_ratio")
    _need_float(log_ratio, op, "log_ratio")
    if log_ratio.dim() != 2:
        raise ValueError(f"{op}: log_ratio must have shape [B, L], got {tuple(log_ratio.shape)}")
    if log_ratio.shape[1] == 0:
        raise ValueError(f"{op}: window length L = log_ratio.shape[1] must be >= 1, got 0")


def check_state_triplet(op: str, draft_state: Tensor, draft_mean: Tensor, target_mean: Tensor) -> None:
    for x, name in ((draft_state, "draft_state"), (draft_mean, "draft_mean"),
                    (target_mean, "target_mean")):
        _need_tensor(x, op, name)
        _need_float(x, op, name)
    if draft_state.dim() < 2:
        raise ValueError(f"{op}: draft_state must have shape [B, *E], got "
                         f"{tuple(draft_state.shape)}")
    for x, name in ((draft_mean, "draft_mean"), (target_mean, "target_mean")):
        if x.shape != draft_state.shape:
            raise ValueError(f"{op}: {name} shape {tuple(x.shape)} must equal draft_state shape "
                             f"{tuple(draft_state.shape)}")
        if x.dtype != draft_state.dtype:
            raise ValueError(f"{op}: {name} dtype {x.dtype} must equal draft_state dtype "
                             f"{draft_state.dtype}")
        _same_device(x, draft_state, op, name, "draft_state")
    if any(s == 0 for s in draft_state.shape[1:]):
        raise ValueError(f"{op}: event shape {tuple(draft_state.shape[1:])} has no elements")

"""The network and the fused draft as the fused paths call them (the static round, the lean
ancestral chain, the ragged round's fused draft): no host work per call."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops import round as round_ops
from .checks import check_model_output
from .transitions import GaussianTransitions, Model


def draft_op(backend: Optional[str], *args) -> Tensor:
    """``frozen_draft``: the dispatcher op directly (no Python checks: the round is a hot path and
    its arguments are built right), or the checked wrapper when a backend is named."""
    if backend is None:
        return torch.ops.specdiff.frozen_draft(*args)
    return round_ops.frozen_draft(*args, backend=backend)


def chunked_call(model: Model, x: Tensor, t: Tensor, cond: dict, max_batch: Optional[int]):
    """``model(x, t, **cond)`` as one logical call, invoked on at most ``max_batch`` rows at a time
    (bounded activation memory); the rows' results are concatenated in order."""
    M = x.shape[0]
    if max_batch is None or M <= max_batch:
        return model(x, t, **cond)

    def rows(v, a: int):  # conditioning values are tensors or dicts of them (added_cond_kwargs)
        if isinstance(v, dict):
            return {name: rows(w, a) for name, w in v.items()}
        return v[a : a + max_batch]

    outs = []
    for a in range(0, M, max_batch):
        part = {name: rows(v, a) for name, v in cond.items()}
        outs.append(model(x[a : a + max_batch], t[a : a + max_batch], **part))
    return torch.cat(outs)


class NetworkCall:
    """The target network as the round calls it: raw x0-hat at states x and steps k (clamped
    into the table), every table on the states' device. A call does no host work."""

    def __init__(
        self,
        model: Model,
        transitions: GaussianTransitions,
        device,
        dtype,
        max_batch: Optional[int] = None,
    ):
        T = transitions
        self.model = model
        self.max_batch = max_batch  # states per model invocation (None: the whole call at once)
        self.N = T.num_steps
        self.sample_pred = T.prediction == "sample"
        self.input_scale = T._on("input_scale", device, dtype)
        self.timesteps = T._on("timesteps", device, T.timesteps.dtype)
        self.out_x = T._on("out_x", device, dtype)
        self.out_pred = T._on("out_pred", device, dtype)

    def __call__(self, x: Tensor, k: Tensor, cond: dict) -> tuple[Tensor, Tensor]:
        """(raw network output, x0-hat) at states x [M, *E] and steps k [M]; ``cond``: the rows'
        conditioning (network kwargs, gathered per row)."""
        kc = k.clamp(0, self.N - 1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        # a fresh tensor: a model that changes its input in place cannot touch the states
        xin = x * self.input_scale[kc].view(shape)
        out = chunked_call(self.model, xin, self.timesteps[kc], cond, self.max_batch)
        check_model_output("target", out, x)  # shape and dtype only: traceable, no host read
        if self.sample_pred:
            return out, out
        return out, self.out_x[kc].view(shape) * x + self.out_pred[kc].view(shape) * out

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


class NetworkCall:
    """The target network as the round calls it: raw x0-hat at states x and steps k (clamped
    into the table), every table on the states' device. A call does no host work."""

    def __init__(self, model: Model, transitions: GaussianTransitions, device, dtype):
        T = transitions
        self.model = model
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
        out = self.model(x * self.input_scale[kc].view(shape), self.timesteps[kc], **cond)
        check_model_output("target", out, x)  # shape and dtype only: traceable, no host read
        if self.sample_pred:
            return out, out
        return out, self.out_x[kc].view(shape) * x + self.out_pred[kc].view(shape) * out

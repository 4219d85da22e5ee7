"""Draft strategies for the speculative sampler (docs/design.md §5).

A draft proposes the window y_1..y_L with Gaussian steps of the TARGET's std, y_{j+1} = mq_j +
s_{k+j} xi_{k+j}; only its means mq_j differ from the target's. Exactness does not depend on the
draft (any draft gives the ancestral chain's law); only the acceptance rate does.

* :class:`FrozenTargetDraft` (default, training-free): freezes the target network's OUTPUT at one
  state, as x0-hat (``freeze="x0"``) or eps-hat (``freeze="eps"``), and recomputes the affine
  transition mean at every drafted state: ``mq_j = mean_from_x0(y_j, x0_frozen, k+j)`` (for eps,
  x0 = x0_from_eps(y_j, eps_frozen, k+j) first). With ``prefetch_root=True`` the verify call also
  evaluates the target at y_n (the window's last state), so after an accepted window the next
  frozen prediction is exact at the new root and after a rejection at j it is the target's at
  y_j (the parent of the rejected step): every round costs exactly ONE sequential target call.
  With ``prefetch_root=False`` every round first calls the target at its root (two sequential
  calls per round: root, then the verify call on y_1..y_{n-1}).
* :class:`DraftModelDraft`: an independent, cheaper network with the target's parametrisation
  (same ``model(x, t)`` interface and prediction type); n sequential cheap calls per window.
"""

from __future__ import annotations

from torch import Tensor

from ..ops.layout import FREEZE_MODES
from ..validate import as_flag
from .transitions import GaussianTransitions, Model


class Draft:
    """Base class of the draft strategies (a tag the sampler dispatches on)."""


class FrozenTargetDraft(Draft):
    """Frozen-target draft: reuse the target's x0-hat or eps-hat across the window.

    Args:
        freeze: ``"x0"`` (freeze x0-hat) or ``"eps"`` (freeze eps-hat; x0 is re-derived at every
            drafted state).
        prefetch_root: evaluate the target at the window's last state inside the verify call
            (one sequential target call per round).
    """

    def __init__(self, freeze: str = "x0", prefetch_root: bool = True):
        if freeze not in FREEZE_MODES:
            raise ValueError(f"freeze must be one of {tuple(FREEZE_MODES)}, got {freeze!r}")
        self.freeze = freeze
        self.prefetch_root = as_flag("prefetch_root", prefetch_root)

    def __repr__(self) -> str:
        return f"FrozenTargetDraft(freeze={self.freeze!r}, prefetch_root={self.prefetch_root})"

    def freeze_value(
        self, transitions: GaussianTransitions, x: Tensor, x0: Tensor, k: Tensor
    ) -> Tensor:
        """The frozen quantity from the target's raw x0-hat at state x, step k."""
        if self.freeze == "x0":
            return x0
        return transitions.eps_from_x0(x, x0, k)

    def x0_at(
        self, transitions: GaussianTransitions, frozen: Tensor, y: Tensor, k: Tensor
    ) -> Tensor:
        """Draft x0-hat at drafted state y, step k."""
        if self.freeze == "x0":
            return frozen
        return transitions.x0_from_eps(y, frozen, k)


class DraftModelDraft(Draft):
    """Independent draft network ``draft_model(x, t)`` with the target's parametrisation."""

    def __init__(self, draft_model: Model):
        if not callable(draft_model):
            raise TypeError(
                f"draft_model must be a callable network draft_model(x, t), got "
                f"{type(draft_model).__name__}"
            )
        self.model = draft_model

    def __repr__(self) -> str:
        return f"DraftModelDraft({type(self.model).__name__})"

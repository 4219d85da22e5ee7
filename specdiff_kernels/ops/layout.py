"""The constants and layouts every backend of the ops shares (docs/design.md §6).

The PyTorch oracle, the Triton kernels, the op wrappers and the samplers above read these names from
here; the C++ kernels spell the same numbers in ``csrc/`` (the tests compare the backends bit for
bit, so a mismatch cannot go unnoticed).

* the coefficient table ``coef[ROW_*, step]`` (float64 ``[NUM_ROWS, N]``) of the frozen round;
* the freeze modes of the frozen-target draft;
* the counter layout of the Philox noise (multipliers, key increments, stream words);
* the static round's stats vector (``STAT_*`` head slots, then :class:`StatsLayout`'s parts);
* the floating dtypes the kernels take, and the one rule for the dtype they compute in.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ---------------------------------------------------------------- table rows (coef[ROW, step])
# affine mean A clip(p) + E p + G x of the network's x0-hat p, the step std, and the conversions
# between x0 and eps the frozen-eps draft needs: x0 = X0_Y y - X0_F eps, eps = EPS_Y y - EPS_P x0,
# and the multistep term H p_prev of the previous step's x0-hat (0 for one-step samplers)
ROW_A, ROW_E, ROW_G, ROW_STD, ROW_X0_Y, ROW_X0_F, ROW_EPS_Y, ROW_EPS_P, ROW_H = range(9)
NUM_ROWS = 9

# ---------------------------------------------------------------- freeze modes
# what the frozen-target draft holds fixed over a window: the target's x0-hat, or its eps-hat
FREEZE_X0, FREEZE_EPS = 0, 1
FREEZE_MODES = {"x0": FREEZE_X0, "eps": FREEZE_EPS}  # user-facing name -> the ops' code

# ---------------------------------------------------------------- Philox4x32-10 counter layout
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
STREAM_NORMAL, STREAM_UNIFORM = 0, 1  # counter word 3: step noise, acceptance uniform

# ---------------------------------------------------------------- dtypes
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums, noise and comparisons of ``dtype`` states are computed in: float64 states
    keep float64, every narrower dtype works in float32 (docs/design.md §4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- round statistics
# The static round's counters live in ONE int64 vector (read back once per round: its head; once
# per run: the rest). Head slots, then the per-position, per-length, per-step and per-chain parts.
(
    STAT_ROUNDS,
    STAT_WINDOWS,
    STAT_SPEC_STEPS,
    STAT_DET_STEPS,
    STAT_BAD_OUTPUT,
    STAT_BAD_RATIO,
    STAT_STEPS_DONE,
    STAT_LIVE,
) = range(8)
STAT_HEAD = 8
NO_BAD = torch.iinfo(torch.int64).max  # "no non-finite value seen" in the BAD slots


class StatsLayout:
    """Where each counter of a run with window L, N steps and B chains lies in the stats vector:
    the head (``STAT_*``), then ``accepted_by_position [L]``, ``attempted_by_position [L]``,
    ``accepted_length_hist [L+1]``, ``window_length_hist [L+1]``, ``accepted_by_step [N]``,
    ``attempted_by_step [N]``, ``chain_rounds [B]``. The BAD slots hold the smallest code
    ``chain * (N + 1) + step`` whose network output / log ratio was not finite (NO_BAD: none)."""

    PARTS = (
        "accepted_by_position",
        "attempted_by_position",
        "accepted_length_hist",
        "window_length_hist",
        "accepted_by_step",
        "attempted_by_step",
        "chain_rounds",
    )

    def __init__(self, L: int, N: int, B: int):
        self.L, self.N, self.B = L, N, B
        sizes = (L, L, L + 1, L + 1, N, N, B)
        self.slices = {}
        start = STAT_HEAD
        for name, size in zip(self.PARTS, sizes):
            self.slices[name] = slice(start, start + size)
            start += size
        self.size = start

    def view(self, stats: Tensor, name: str) -> Tensor:
        return stats[self.slices[name]]

    def fill(self, target, counts: list) -> None:
        """Set each part of ``counts`` (the vector read to the host) as the attribute of the same
        name of ``target`` (a ``SamplerStats``)."""
        for name, part in self.slices.items():
            setattr(target, name, counts[part])

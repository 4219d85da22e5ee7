"""Argument validation of every op, both families and every backend: clear errors that name the
argument. The public wrappers (:mod:`.verify`, :mod:`.round`) call the full checks; the entry
points of ``torch.ops.specdiff`` that are not C++ kernels (the fakes, the Triton launchers) call
the ``entry_*`` checks at the end of this module.

Only metadata is inspected here (shapes, dtypes, devices), so the checks cost no device
synchronisation and trace cleanly under torch.compile. Value checks (sigma > 0, uniforms in [0, 1),
lengths in 1..L) run where they are free: CPU tensors in eager mode (the C++ kernels repeat them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import (
    FLOAT_DTYPES,
    FREEZE_EPS,
    FREEZE_MODES,
    FREEZE_X0,
    NUM_ROWS,
    ROW_STD,
    StatsLayout,
)
from .round_spec import RoundChains, RoundSpec

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _need_tensor(x: object, op: str, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _need_float(x: Tensor, op: str, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {name} must have a floating dtype in "
            f"{[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}"
        )


def _same_device(x: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def _values_checkable(t: Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def as_sigma(sigma: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(sigma, (int, float)):
        return torch.tensor(float(sigma), dtype=torch.float32, device=like.device)
    return sigma


def _matching_floats(
    op: str, names: tuple[str, ...], tensors: tuple, min_dim: int, shape: str
) -> None:
    """Floating tensors of one shape, dtype and device as the first, of rank >= ``min_dim``."""
    for x, name in zip(tensors, names):
        _need_tensor(x, op, name)
        _need_float(x, op, name)
    first, first_name = tensors[0], names[0]
    if first.dim() < min_dim:
        raise ValueError(f"{op}: {first_name} must have shape {shape}, got {tuple(first.shape)}")
    for x, name in zip(tensors[1:], names[1:]):
        if x.shape != first.shape:
            raise ValueError(
                f"{op}: {name} shape {tuple(x.shape)} must equal {first_name} shape "
                f"{tuple(first.shape)}"
            )
        if x.dtype != first.dtype:
            raise ValueError(
                f"{op}: {name} dtype {x.dtype} must equal {first_name} dtype {first.dtype}"
            )
        _same_device(x, first, op, name, first_name)


def _nonempty_events(op: str, x: Tensor, first_event_dim: int) -> None:
    if any(s == 0 for s in x.shape[first_event_dim:]):
        raise ValueError(f"{op}: event shape {tuple(x.shape[first_event_dim:])} has no elements")


def check_window(op: str, draft_states: Tensor, draft_means: Tensor, target_means: Tensor) -> None:
    _matching_floats(
        op,
        ("draft_states", "draft_means", "target_means"),
        (draft_states, draft_means, target_means),
        3,
        "[B, L, *E] with at least one event dim",
    )
    if draft_states.shape[1] == 0:
        raise ValueError(f"{op}: window length L = draft_states.shape[1] must be >= 1, got 0")
    _nonempty_events(op, draft_states, 2)


def check_window_sigma(
    op: str, draft_states: Tensor, draft_means: Tensor, target_means: Tensor, sigma: Tensor | float
) -> Tensor:
    """The window and its step std; returns sigma as a tensor."""
    check_window(op, draft_states, draft_means, target_means)
    sigma = as_sigma(sigma, draft_states)
    B, L = draft_states.shape[:2]
    check_sigma(op, sigma, B, L, draft_states)
    return sigma


def check_sigma(op: str, sigma: Tensor, batch: int, window: int, like: Tensor) -> None:
    _need_tensor(sigma, op, "sigma")
    _need_float(sigma, op, "sigma")
    _same_device(sigma, like, op, "sigma", "draft_states")
    shape = tuple(sigma.shape)
    ok = (
        sigma.dim() == 0
        or (sigma.dim() == 1 and shape[0] in (window, 1))
        or (sigma.dim() == 2 and shape[0] in (batch, 1) and shape[1] in (window, 1))
    )
    if not ok:
        raise ValueError(
            f"{op}: sigma must be a scalar, [L] or [B, L] broadcastable to "
            f"[{batch}, {window}], got shape {shape}"
        )
    if _values_checkable(sigma):
        bad = ~(torch.isfinite(sigma) & (sigma > 0))
        if bool(bad.any()):
            raise ValueError(
                f"{op}: sigma must be finite and > 0 everywhere; got "
                f"{sigma[bad].flatten()[:4].tolist()}"
            )


def check_uniforms(op: str, uniforms: Tensor, batch: int, window: int, like: Tensor) -> None:
    _need_tensor(uniforms, op, "uniforms")
    _need_float(uniforms, op, "uniforms")
    _same_device(uniforms, like, op, "uniforms", "draft_states")
    if tuple(uniforms.shape) != (batch, window):
        raise ValueError(
            f"{op}: uniforms must have shape [B, L] = [{batch}, {window}], got "
            f"{tuple(uniforms.shape)}"
        )
    if _values_checkable(uniforms):
        bad = ~((uniforms >= 0) & (uniforms < 1))
        if bool(bad.any()):
            raise ValueError(
                f"{op}: uniforms must lie in [0, 1); got {uniforms[bad].flatten()[:4].tolist()}"
            )


def check_lengths(op: str, lengths: Tensor | None, batch: int, window: int, like: Tensor) -> None:
    if lengths is None:
        return
    _need_tensor(lengths, op, "lengths")
    if lengths.dtype not in INT_DTYPES:
        raise ValueError(f"{op}: lengths must be an integer tensor, got {lengths.dtype}")
    _same_device(lengths, like, op, "lengths", "draft_states")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(
            f"{op}: lengths must have shape [B] = [{batch}], got {tuple(lengths.shape)}"
        )
    if _values_checkable(lengths) and batch > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > window:
            raise ValueError(
                f"{op}: lengths values must lie in 1..L = 1..{window}, got min {lo}, max {hi}"
            )


def check_log_ratio(op: str, log_ratio: Tensor) -> None:
    _need_tensor(log_ratio, op, "log_ratio")
    _need_float(log_ratio, op, "log_ratio")
    if log_ratio.dim() != 2:
        raise ValueError(f"{op}: log_ratio must have shape [B, L], got {tuple(log_ratio.shape)}")
    if log_ratio.shape[1] == 0:
        raise ValueError(f"{op}: window length L = log_ratio.shape[1] must be >= 1, got 0")


def check_state_triplet(
    op: str, draft_state: Tensor, draft_mean: Tensor, target_mean: Tensor
) -> None:
    _matching_floats(
        op,
        ("draft_state", "draft_mean", "target_mean"),
        (draft_state, draft_mean, target_mean),
        2,
        "[B, *E]",
    )
    _nonempty_events(op, draft_state, 1)


def check_strategy(strategy: str | None, strategies: tuple[str, ...]) -> None:
    """A Triton launch strategy: one of ``strategies``, or "auto" / None (the launch rule)."""
    if strategy is not None and strategy != "auto" and strategy not in strategies:
        raise ValueError(f"strategy must be one of {strategies} or 'auto'/None, got {strategy!r}")


# ---------------------------------------------------------------- round family
def _int_vector(op: str, name: str, t: Tensor, B: int, like: Tensor) -> None:
    _need_tensor(t, op, name)
    if t.dtype != torch.int64:
        raise ValueError(f"{op}: {name} must be an int64 tensor, got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{op}: {name} must have shape [B] = [{B}], got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the states are on {like.device}")


def _window(op: str, window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{op}: window must be an int >= 1, got {window!r}")


def _seed(op: str, seed: Tensor, like: Tensor) -> None:
    if not isinstance(seed, Tensor):
        raise TypeError(
            f"{op}: seed must be an int64 tensor with one element "
            f"(ops.seed_tensor(int)), got {type(seed).__name__}"
        )
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(
            f"{op}: seed must be an int64 tensor with one element, got "
            f"{seed.dtype} of shape {tuple(seed.shape)}"
        )
    if seed.device != like.device:
        raise ValueError(f"{op}: seed is on {seed.device} but the states are on {like.device}")


def _ids_steps(
    op: str, chain_ids: Tensor, steps: Tensor, B: int, like: Tensor, first_step: int
) -> None:
    _int_vector(op, "chain_ids", chain_ids, B, like)
    _int_vector(op, "steps", steps, B, like)
    if _values_checkable(chain_ids) and B:
        if int(chain_ids.min()) < 0 or int(chain_ids.max()) >= 1 << 32:
            raise ValueError(
                f"{op}: chain_ids must lie in [0, 2^32), got min "
                f"{int(chain_ids.min())}, max {int(chain_ids.max())}"
            )
        if int(steps.min()) < first_step or int(steps.max()) >= (1 << 32) - 1 - (1 << 20):
            raise ValueError(
                f"{op}: steps must lie in [{first_step}, 2^32 - 2^20), got min "
                f"{int(steps.min())}, max {int(steps.max())}"
            )


def _states(op: str, name: str, x: Tensor, min_dim: int) -> None:
    _need_tensor(x, op, name)
    _need_float(x, op, name)
    if x.dim() < min_dim or any(s == 0 for s in x.shape[min_dim - 1 :]):
        raise ValueError(f"{op}: {name} must have a non-empty event shape, got {tuple(x.shape)}")


def _bundles(op: str, chains, spec) -> None:
    if not isinstance(chains, RoundChains):
        raise TypeError(
            f"{op}: chains must be a RoundChains (frozen, steps, lengths, chain_ids, prev), got "
            f"{type(chains).__name__}"
        )
    if not isinstance(spec, RoundSpec):
        raise TypeError(
            f"{op}: spec must be a RoundSpec (coef, seed, freeze, clip; "
            f"sampling.transitions.round_spec), got {type(spec).__name__}"
        )


def _round(op: str, root: Tensor, chains: RoundChains, spec: RoundSpec, window: int) -> None:
    """What frozen_draft and verify_frozen share (their windows start at ``root``)."""
    frozen, steps, lengths, chain_ids, prev = chains
    coef, seed, freeze, clip = spec
    B = root.shape[0]
    for name, t in (("frozen", frozen), ("prev", prev)):
        if t is None and name == "prev":
            continue
        _states(op, name, t, 2)
        if t.shape != root.shape or t.dtype != root.dtype or t.device != root.device:
            raise ValueError(
                f"{op}: {name} must match the root states (shape {tuple(root.shape)}, "
                f"{root.dtype}, {root.device}); got {tuple(t.shape)}, {t.dtype}, {t.device}"
            )
    _seed(op, seed, root)
    _ids_steps(op, chain_ids, steps, B, root, 0)
    _int_vector(op, "lengths", lengths, B, root)
    if (
        not isinstance(coef, Tensor)
        or coef.dtype != torch.float64
        or coef.dim() != 2
        or coef.shape[0] != NUM_ROWS
        or coef.shape[1] < 1
    ):
        raise ValueError(
            f"{op}: coef must be the float64 [{NUM_ROWS}, N] table of round_tables(transitions)"
        )
    if coef.device != root.device:
        raise ValueError(f"{op}: coef is on {coef.device} but the states are on {root.device}")
    _window(op, window)
    if freeze not in FREEZE_MODES.values():
        raise ValueError(
            f"{op}: freeze must be {FREEZE_X0} (x0) or {FREEZE_EPS} (eps), got {freeze!r}"
        )
    if not (clip > 0):
        raise ValueError(f"{op}: clip must be > 0 (math.inf: no clipping), got {clip!r}")
    if _values_checkable(lengths) and B:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > window:
            raise ValueError(
                f"{op}: lengths must lie in 0..window = 0..{window}, got min {lo}, max {hi}"
            )
        N = coef.shape[1]
        if int(steps.max()) > N:
            raise ValueError(
                f"{op}: steps must lie in 0..N = 0..{N} (N: the table length), got "
                f"max {int(steps.max())}"
            )


def check_chain_noise(
    seed: Tensor, chain_ids: Tensor, steps: Tensor, window: int, event_shape, dtype: torch.dtype
) -> tuple[int, ...]:
    """Returns ``event_shape`` as a tuple of ints."""
    op = "chain_noise"
    _need_tensor(chain_ids, op, "chain_ids")
    _seed(op, seed, chain_ids)
    _ids_steps(
        op, chain_ids, steps, chain_ids.shape[0] if chain_ids.dim() == 1 else -1, chain_ids, -1
    )
    _window(op, window)
    event_shape = tuple(int(s) for s in event_shape)
    if not event_shape or math.prod(event_shape) < 1:
        raise ValueError(
            f"{op}: event_shape must be non-empty with positive sizes, got {event_shape}"
        )
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}"
        )
    return event_shape


def check_frozen_draft(root: Tensor, chains: RoundChains, spec: RoundSpec, window: int) -> None:
    op = "frozen_draft"
    _bundles(op, chains, spec)
    _states(op, "root", root, 2)
    _round(op, root, chains, spec, window)


def check_verify_frozen(
    states: Tensor, x0_hat: Tensor, chains: RoundChains, spec: RoundSpec
) -> None:
    op = "verify_frozen"
    _bundles(op, chains, spec)
    _states(op, "states", states, 3)
    if (
        not isinstance(x0_hat, Tensor)
        or x0_hat.shape != states.shape
        or x0_hat.dtype != states.dtype
        or x0_hat.device != states.device
    ):
        raise ValueError(
            f"{op}: x0_hat must match states (shape {tuple(states.shape)}, "
            f"{states.dtype}, {states.device})"
        )
    if states.shape[1] < 2:
        raise ValueError(f"{op}: states must hold L + 1 >= 2 positions, got {states.shape[1]}")
    window = states.shape[1] - 1
    _round(op, states[:, 0], chains, spec, window)
    steps, lengths, coef = chains.steps, chains.lengths, spec.coef
    if _values_checkable(lengths) and states.shape[0]:
        # a verified window covers stochastic steps only (std > 0, before the end of the
        # schedule); a draft step with std 0 is the deterministic step itself
        N = coef.shape[1]
        idx = steps[:, None] + torch.arange(window)[None]
        live = torch.arange(window)[None] < lengths[:, None]
        std = coef[ROW_STD, idx.clamp(0, N - 1)]
        bad = live & ((idx >= N) | ~(std > 0))
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{op}: lengths[{b}] = {int(lengths[b])} from step {int(steps[b])} "
                f"reaches a deterministic step or the end of the schedule (N = {N}); "
                f"windows must cover stochastic steps only"
            )


def check_round_stats(
    stats: Tensor,
    steps: Tensor,
    lengths: Tensor,
    num_accepted: Tensor,
    committed: Tensor,
    log_ratio: Tensor,
    output: Tensor,
    num_steps: int,
) -> None:
    op = "round_stats"
    if not isinstance(log_ratio, Tensor) or log_ratio.dim() != 2:
        raise ValueError(f"{op}: log_ratio must be a [B, L] tensor")
    B, L = log_ratio.shape
    for name, t in (
        ("steps", steps),
        ("lengths", lengths),
        ("num_accepted", num_accepted),
        ("committed", committed),
    ):
        _int_vector(op, name, t, B, log_ratio)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{op}: num_steps must be an int >= 1, got {num_steps!r}")
    size = StatsLayout(L, num_steps, B).size
    if not isinstance(stats, Tensor) or stats.dtype != torch.int64 or tuple(stats.shape) != (size,):
        raise ValueError(
            f"{op}: stats must be the int64 [{size}] vector of StatsLayout(L={L}, "
            f"N={num_steps}, B={B})"
        )
    if not isinstance(output, Tensor) or output.dim() < 2 or tuple(output.shape[:2]) != (B, L + 1):
        raise ValueError(f"{op}: output must have shape [B, L+1, ...] = [{B}, {L + 1}, ...]")
    if output.device != log_ratio.device or stats.device != log_ratio.device:
        raise ValueError(f"{op}: stats, output and log_ratio must be on one device")


# ---------------------------------------------------------------- dispatcher entry points
# What every entry point of ``torch.ops.specdiff`` checks before allocating, where the C++ kernels
# do not run: the fakes (a meta tensor among CPU ones dispatches to the Meta kernel, the fake;
# torch.compile traces with it), the Triton launchers (the CUDA kernels) and round_stats' CUDA
# composition. One device, and the dtypes of the op's contract (the C++ kernels check the same).
# Metadata only: no host sync, no launch; shapes and values are the public wrappers' and the
# kernels' concern.
STATE = "state"  # a floating kernel dtype, the same for every STATE argument of the op
FLOAT = "float"  # any floating kernel dtype (converted by the kernel)
INT = "int"  # any integer dtype (converted by the kernel)
INT64 = "int64"
FLOAT64 = "float64"

_KIND_DTYPES = {
    STATE: FLOAT_DTYPES,
    FLOAT: FLOAT_DTYPES,
    INT: INT_DTYPES,
    INT64: (torch.int64,),
    FLOAT64: (torch.float64,),
}


_KIND_NAMES = {
    STATE: "a float16, bfloat16, float32 or float64 tensor",
    FLOAT: "a float16, bfloat16, float32 or float64 tensor",
    INT: "an integer tensor (int8, int16, int32, int64 or uint8)",
    INT64: "an int64 tensor",
    FLOAT64: "a float64 tensor",
}


def check_entry(op: str, *args: tuple[str, Tensor | None, str]) -> None:
    """``args``: (name, tensor or None for an omitted optional, kind) in schema order; every
    tensor on the first one's device, each of its kind's dtypes, STATE tensors of one dtype.
    One pass, comparisons only (it runs at every launch of a Triton op)."""
    first_name, first, _ = args[0]
    device = first.device
    state_name, state = None, None
    for name, t, kind in args:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {device}")
        dtype = t.dtype
        if dtype not in _KIND_DTYPES[kind]:
            raise ValueError(f"{op}: {name} must be {_KIND_NAMES[kind]}, got {dtype}")
        if kind == STATE:
            if state is None:
                state_name, state = name, dtype
            elif dtype != state:
                raise ValueError(
                    f"{op}: {name} dtype {dtype} must equal {state_name} dtype {state} "
                    "(the states must share a dtype)"
                )


def entry_gaussian_log_ratio(op, draft_states, draft_means, target_means, sigma) -> None:
    check_entry(
        op,
        ("draft_states", draft_states, STATE),
        ("draft_means", draft_means, STATE),
        ("target_means", target_means, STATE),
        ("sigma", sigma, FLOAT),
    )


def entry_first_rejection(op, log_ratio, uniforms, lengths) -> None:
    check_entry(
        op,
        ("log_ratio", log_ratio, FLOAT),
        ("uniforms", uniforms, FLOAT),
        ("lengths", lengths, INT),
    )


def entry_reflect_resample(op, draft_state, draft_mean, target_mean) -> None:
    check_entry(
        op,
        ("draft_state", draft_state, STATE),
        ("draft_mean", draft_mean, STATE),
        ("target_mean", target_mean, STATE),
    )


def entry_speculative_verify(
    op, draft_states, draft_means, target_means, sigma, uniforms, lengths
) -> None:
    check_entry(
        op,
        ("draft_states", draft_states, STATE),
        ("draft_means", draft_means, STATE),
        ("target_means", target_means, STATE),
        ("sigma", sigma, FLOAT),
        ("uniforms", uniforms, FLOAT),
        ("lengths", lengths, INT),
    )


def entry_chain_noise(op, seed, chain_ids, steps, dtype) -> None:
    check_entry(op, ("seed", seed, INT64), ("chain_ids", chain_ids, INT64), ("steps", steps, INT64))
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}"
        )


def _entry_round(op: str, first: tuple, chains: RoundChains, spec: RoundSpec) -> None:
    check_entry(
        op,
        *first,
        ("frozen", chains.frozen, STATE),
        ("steps", chains.steps, INT64),
        ("lengths", chains.lengths, INT64),
        ("coef", spec.coef, FLOAT64),
        ("seed", spec.seed, INT64),
        ("chain_ids", chains.chain_ids, INT64),
        ("prev", chains.prev, STATE),
    )


def entry_frozen_draft(op, root, chains: RoundChains, spec: RoundSpec) -> None:
    _entry_round(op, (("root", root, STATE),), chains, spec)


def entry_verify_frozen(op, states, x0_hat, chains: RoundChains, spec: RoundSpec) -> None:
    _entry_round(op, (("states", states, STATE), ("x0_hat", x0_hat, STATE)), chains, spec)


def entry_round_stats(op, stats, steps, lengths, num_accepted, committed, log_ratio, output):
    check_entry(
        op,
        ("stats", stats, INT64),
        ("steps", steps, INT64),
        ("lengths", lengths, INT64),
        ("num_accepted", num_accepted, INT64),
        ("committed", committed, INT64),
        ("log_ratio", log_ratio, FLOAT),
        ("output", output, FLOAT),
    )

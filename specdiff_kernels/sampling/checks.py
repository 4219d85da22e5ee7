"""Checks of the samplers' arguments and of what the user's model returns.

Everything a sampler's constructor or a ``sample()`` call is given is checked before the first
model call, with a one-line error that names the argument; a model's output is checked at its
first call (a tuple, an output object, another dtype or device), before anything is done with it.
Scalars go through the coercers of :mod:`specdiff_kernels.validate` (one convention for every
layer); this module holds the checks that know the samplers' own types. The transitions' tables
are checked by their builders (``transitions.py``), which this module's users import.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..ops.verify import VerifyResult
from ..validate import as_int
from .drafts import Draft, DraftModelDraft, FrozenTargetDraft
from .transitions import GaussianTransitions
from .window import AdaptiveWindow

WINDOW_FORMS = "'auto', an int >= 1, 'adaptive' or an AdaptiveWindow"


# ----------------------------------------------------------------------------- sampler arguments
def check_draft(transitions: GaussianTransitions, draft: Optional[Draft]) -> Draft:
    """The draft (default: frozen x0), after checking there is something to speculate over."""
    if bool(transitions.deterministic.all()):
        raise ValueError(
            f"every step of {transitions.name} is deterministic (std 0): there is no noise to "
            f"speculate over; use its stochastic variant (DDIM eta > 0, DDPM, Euler-ancestral, "
            f"DPM-Solver++ 2M SDE) or AncestralSampler"
        )
    draft = FrozenTargetDraft() if draft is None else draft
    if not isinstance(draft, (FrozenTargetDraft, DraftModelDraft)):
        raise TypeError(
            f"draft must be a FrozenTargetDraft or DraftModelDraft, got {type(draft).__name__}"
        )
    return draft


def as_window(window) -> tuple[int, Optional[AdaptiveWindow]]:
    """``window`` (any form but ``"auto"``, which the sampler resolves) -> (buffer length L,
    per-chain policy or None)."""
    if isinstance(window, AdaptiveWindow):
        return window.max_window, window
    if isinstance(window, str):
        if window != "adaptive":
            raise ValueError(f"window must be {WINDOW_FORMS}, got {window!r}")
        policy = AdaptiveWindow()
        return policy.max_window, policy
    try:
        return as_int("window", window, 1), None  # True would mean L = 1: refused
    except TypeError:
        raise TypeError(f"window must be {WINDOW_FORMS}, got {window!r}") from None


def check_verify_fn(verify_fn) -> Callable:
    if not callable(verify_fn):
        raise TypeError(
            f"verify_fn must be callable like specdiff_kernels.speculative_verify, got "
            f"{type(verify_fn).__name__}"
        )
    return verify_fn


def as_compile(compile) -> Union[bool, str]:
    """True, False or "auto" (1 or "yes" are not flags)."""
    if isinstance(compile, (bool, np.bool_)):
        return bool(compile)
    if compile == "auto" and isinstance(compile, str):
        return compile
    err = ValueError if isinstance(compile, str) else TypeError
    raise err(f"compile must be True, False or 'auto', got {compile!r}")


# ----------------------------------------------------------------------------- sample() arguments


def as_event_shape(event_shape) -> tuple[int, ...]:
    if isinstance(event_shape, int) and not isinstance(event_shape, bool):
        event_shape = (event_shape,)
    try:
        dims = tuple(event_shape)
    except TypeError:
        raise TypeError(
            f"event_shape must be a tuple of positive ints, got {event_shape!r}"
        ) from None
    if len(dims) == 0:
        raise ValueError("event_shape must have at least one dimension")
    for d in dims:
        if isinstance(d, bool):
            raise TypeError(f"event_shape must be a tuple of positive ints, got {event_shape!r}")
        try:
            ok = operator.index(d) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"event_shape must be a tuple of positive ints, got {event_shape!r}")
    return tuple(operator.index(d) for d in dims)


# a chain id is one 32-bit word of its noise stream's Philox counter (docs/design.md, "Counter")
MAX_CHAIN_ID = (1 << 32) - 1


def as_chain_ids(chain_ids, num_chains: int) -> list[int]:
    """Distinct ints in 0..``MAX_CHAIN_ID``, one per chain: each id seeds one chain's random
    stream, so a repeated id would give two copies of one chain."""
    if chain_ids is None:
        return list(range(num_chains))
    if isinstance(chain_ids, Tensor) and chain_ids.is_floating_point():
        raise TypeError(f"chain_ids must be integers, got a {chain_ids.dtype} tensor")
    ids = []
    for c in chain_ids:
        if isinstance(c, bool):
            raise TypeError(f"chain_ids must be integers, got {c!r}")
        try:
            ids.append(operator.index(c))
        except TypeError:
            raise TypeError(f"chain_ids must be integers, got {c!r}") from None
    if len(ids) != num_chains:
        raise ValueError(f"chain_ids has {len(ids)} entries for {num_chains} chains")
    seen = set()
    for c in ids:
        if c < 0:
            raise ValueError(f"chain_ids must be >= 0, got {c}")
        if c > MAX_CHAIN_ID:
            raise ValueError(
                f"chain_ids must be in 0..2**32-1 (a chain id is a 32-bit word of its noise "
                f"stream's counter), got {c}"
            )
        if c in seen:
            raise ValueError(
                f"chain_ids must be distinct (each id seeds one chain's stream), got {c} twice"
            )
        seen.add(c)
    return ids


def check_generator(generator) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got "
            f"{type(generator).__name__} {generator!r} (use "
            f"torch.Generator().manual_seed(seed))"
        )
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (it only seeds the chains' "
            f"streams), got one on {generator.device}"
        )


def as_device(device) -> torch.device:
    """A device this process can allocate on (``"cuda"`` without a GPU is refused here, not by a
    raw torch error deep inside the sampler)."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device: {err}") from None
    if dev.type == "meta":
        raise ValueError(
            "device='meta' holds shapes without values: sample on a device with data "
            "(e.g. 'cpu' or 'cuda')"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(dev)!r} is not available: torch.cuda.is_available() is False"
        )
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"device={str(dev)!r} is not available: {first}") from None
    return dev


def check_state_dtype(dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def check_x_init(x_init: Tensor, check_finite: bool) -> None:
    if x_init.device.type == "meta":
        raise ValueError(
            "x_init is on the meta device (a shape without values): give a tensor with data"
        )
    if x_init.layout != torch.strided:
        raise ValueError(
            f"x_init must be a dense tensor, got layout {x_init.layout} (use x_init.to_dense())"
        )
    if not x_init.is_floating_point():
        raise TypeError(f"x_init must be a floating-point tensor, got dtype {x_init.dtype}")
    if x_init.dim() < 2 or x_init.shape[0] == 0 or x_init.numel() == 0:
        raise ValueError(
            f"x_init must have shape [num_chains, *event_shape] with at least one "
            f"chain and one element, got {tuple(x_init.shape)}"
        )
    if check_finite:
        bad = ~torch.isfinite(x_init.reshape(x_init.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero()[:, 0].tolist()
            raise ValueError(
                f"x_init has non-finite values in {len(rows)} row(s), the first is row {rows[0]}"
            )


def check_matches_x_init(x_init: Tensor, dtype, device) -> None:
    """An explicit ``dtype`` / ``device`` given with a tensor ``x_init`` must be x_init's own (the
    states are x_init's: another one would be silently ignored). None: not given."""
    if dtype is not None and dtype != x_init.dtype:
        raise ValueError(
            f"dtype={dtype} but x_init has dtype {x_init.dtype}: leave dtype out (x_init's is "
            f"used) or pass x_init.to({dtype})"
        )
    if device is not None:
        dev = as_device(device)
        own = x_init.device
        same = dev.type == own.type and (
            dev.index is None or own.index is None or dev.index == own.index
        )
        if not same:
            raise ValueError(
                f"device={str(dev)!r} but x_init is on {x_init.device}: leave device out "
                f"(x_init's is used) or pass x_init.to({str(dev)!r})"
            )


def as_warm_start(warm_start, x: Tensor) -> Tensor:
    """``sample(warm_start=...)`` as a tensor like the states x: floating point, x's shape,
    finite."""
    if not isinstance(warm_start, Tensor) or not warm_start.is_floating_point():
        got = warm_start.dtype if isinstance(warm_start, Tensor) else type(warm_start).__name__
        raise TypeError(f"warm_start must be a floating-point tensor, got {got}")
    if tuple(warm_start.shape) != tuple(x.shape):
        raise ValueError(
            f"warm_start must have the states' shape {tuple(x.shape)}, got "
            f"{tuple(warm_start.shape)}"
        )
    warm = warm_start.to(device=x.device, dtype=x.dtype)
    if not bool(torch.isfinite(warm).all()):
        raise ValueError("warm_start has non-finite values")
    return warm


def check_verify_result(res) -> None:
    """What ``verify_fn`` returned must be a :class:`~specdiff_kernels.ops.VerifyResult` (or have
    its tensor fields)."""
    if isinstance(res, VerifyResult):
        return
    for field in VerifyResult._fields:
        if not isinstance(getattr(res, field, None), Tensor):
            raise TypeError(
                f"verify_fn returned {type(res).__name__}, which has no tensor {field!r}: it must "
                f"return a VerifyResult{VerifyResult._fields} like "
                f"specdiff_kernels.speculative_verify"
            )


def check_model_output(role: str, out, x: Tensor) -> None:
    """``out`` = ``model(x, t)`` must be a tensor of x's shape, dtype and device."""
    if not isinstance(out, Tensor):
        kind = type(out).__name__
        if isinstance(out, (tuple, list)):
            hint = "for a model that returns a tuple, pass e.g. lambda x, t: model(x, t)[0]"
        elif hasattr(out, "sample"):
            hint = (
                "for a diffusers model, wrap it in "
                "specdiff_kernels.integrations.diffusers.DiffusersModel"
            )
        else:
            hint = "wrap the model so that it returns the prediction tensor"
        raise TypeError(
            f"{role} model returned {kind} instead of a tensor: model(x, t) must "
            f"return the prediction as a tensor shaped like x ({hint})"
        )
    if out.shape != x.shape:
        raise ValueError(
            f"{role} model returned shape {tuple(out.shape)} for input {tuple(x.shape)}"
        )
    if out.dtype != x.dtype:
        raise TypeError(
            f"{role} model returned dtype {out.dtype} for a {x.dtype} input: it must "
            f"return its input's dtype (cast inside the model, or sample with "
            f"dtype={out.dtype})"
        )
    if out.device != x.device:
        raise ValueError(
            f"{role} model returned a tensor on {out.device} for an input on {x.device}"
        )


class ModelKwargs:
    """Per-chain conditioning: keyword arguments of the network (``class_labels``,
    ``encoder_hidden_states``, ...), each a tensor with one row per chain, or a dict of such
    tensors (``added_cond_kwargs``). A network call on rows of chains ``rows`` receives
    ``model(x, t, **kwargs.gather(rows))``: every row gets its own chain's conditioning, whatever
    window position or draft state it holds."""

    def __init__(self, values: dict):
        self.values = values

    @staticmethod
    def check(model_kwargs, num_chains: int, device: torch.device) -> "ModelKwargs":
        if model_kwargs is None:
            return ModelKwargs({})
        if not isinstance(model_kwargs, dict):
            raise TypeError(
                f"model_kwargs must be a dict of per-chain tensors, got "
                f"{type(model_kwargs).__name__}"
            )

        def one(where: str, value):
            if isinstance(value, dict):
                return {k: one(f"{where}[{k!r}]", v) for k, v in value.items()}
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"{where} must be a tensor with one row per chain (or a dict of "
                    f"such tensors), got {type(value).__name__}"
                )
            if value.dim() == 0 or value.shape[0] != num_chains:
                raise ValueError(
                    f"{where} must have num_chains={num_chains} rows (one per "
                    f"chain), got shape {tuple(value.shape)}"
                )
            return value.to(device)

        for name in model_kwargs:
            if not isinstance(name, str):
                raise TypeError(f"model_kwargs keys must be strings, got {name!r}")
        return ModelKwargs(
            {name: one(f"model_kwargs[{name!r}]", v) for name, v in model_kwargs.items()}
        )

    def gather(self, rows: Tensor) -> dict:
        """The kwargs of a call whose i-th row belongs to chain ``rows[i]``."""

        def pick(v):
            return {k: pick(w) for k, w in v.items()} if isinstance(v, dict) else v[rows]

        return {name: pick(v) for name, v in self.values.items()}

    def __bool__(self) -> bool:
        return bool(self.values)

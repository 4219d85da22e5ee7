"""The round ops' arguments as two typed bundles (docs/design.md §6).

A frozen-draft round reads the same constants every round of a run and a few per-chain tensors
that change each round. Every Python layer (the public wrappers, their checks, the PyTorch oracle,
the Triton launchers, the samplers) passes them as:

* :class:`RoundSpec`, the per-run constants: the coefficient table, the noise key, the freeze mode
  and the clip bound (built once per run: ``sampling.transitions.round_spec``);
* :class:`RoundChains`, where each chain of the round stands: its frozen value, step, window
  length, noise id and (multistep chains) previous prediction.

Both are NamedTuples, so ``torch.compile`` and CUDA graphs see them as pytrees of tensors. The
dispatcher's schemas (``torch.ops.specdiff.frozen_draft`` / ``verify_frozen``, spelled in
``csrc/registration.cpp`` and in :data:`SCHEMAS`; a test checks the two agree) take the flat
argument list: :func:`draft_args` / :func:`verify_args` flatten the bundles into it, and
:func:`draft_parts` / :func:`verify_parts` are their inverses for the kernels behind the schemas
(the fakes and the Triton ops).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple, Optional

from torch import Tensor

from .layout import FREEZE_X0


class RoundSpec(NamedTuple):
    """The constants of every round of one run."""

    coef: Tensor  # float64 [NUM_ROWS, N]: the coefficient table (rows ops.layout.ROW_*)
    seed: Tensor  # int64, one element: the Philox key of the run's noise
    freeze: int = FREEZE_X0  # what the frozen-target draft holds fixed (ops.layout.FREEZE_*)
    clip: float = math.inf  # the x0-hat clip bound (inf: none)


class RoundChains(NamedTuple):
    """Where each of the round's B chains stands (tensors on the states' device)."""

    frozen: Tensor  # [B, *E] the frozen value (x0-hat or eps-hat)
    steps: Tensor  # [B] int64 the first step of each chain's window
    lengths: Tensor  # [B] int64 each chain's window length (0: idle)
    chain_ids: Tensor  # [B] int64 each chain's noise id
    prev: Optional[Tensor] = None  # [B, *E] multistep chains: the previous step's x0-hat


# The dispatcher's schemas, without the op name (C++ spelling: csrc/registration.cpp).
SCHEMAS = {
    "frozen_draft": (
        "(Tensor root, Tensor frozen, Tensor steps, Tensor lengths, Tensor coef, Tensor seed, "
        "Tensor chain_ids, int window, int freeze, float clip, Tensor? prev=None) -> Tensor"
    ),
    "verify_frozen": (
        "(Tensor states, Tensor x0_hat, Tensor frozen, Tensor steps, Tensor lengths, "
        "Tensor coef, Tensor seed, Tensor chain_ids, int freeze, float clip, "
        "Tensor? prev=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
}


def draft_args(root: Tensor, chains: RoundChains, spec: RoundSpec, window: int) -> tuple:
    """``frozen_draft``'s arguments in schema order."""
    frozen, steps, lengths, chain_ids, prev = chains
    coef, seed, freeze, clip = spec
    return (root, frozen, steps, lengths, coef, seed, chain_ids, window, freeze, float(clip), prev)


def draft_parts(
    root, frozen, steps, lengths, coef, seed, chain_ids, window, freeze, clip, prev=None
) -> tuple[Tensor, RoundChains, RoundSpec, int]:
    """:func:`draft_args`' inverse: ``(root, chains, spec, window)``."""
    chains = RoundChains(frozen, steps, lengths, chain_ids, prev)
    return root, chains, RoundSpec(coef, seed, freeze, clip), window


def verify_args(states: Tensor, x0_hat: Tensor, chains: RoundChains, spec: RoundSpec) -> tuple:
    """``verify_frozen``'s arguments in schema order."""
    frozen, steps, lengths, chain_ids, prev = chains
    coef, seed, freeze, clip = spec
    return (
        states,
        x0_hat,
        frozen,
        steps,
        lengths,
        coef,
        seed,
        chain_ids,
        freeze,
        float(clip),
        prev,
    )


def verify_parts(
    states, x0_hat, frozen, steps, lengths, coef, seed, chain_ids, freeze, clip, prev=None
) -> tuple[Tensor, Tensor, RoundChains, RoundSpec]:
    """:func:`verify_args`' inverse: ``(states, x0_hat, chains, spec)``."""
    chains = RoundChains(frozen, steps, lengths, chain_ids, prev)
    return states, x0_hat, chains, RoundSpec(coef, seed, freeze, clip)


_TYPES = {"Tensor": Tensor, "Tensor?": Optional[Tensor], "int": int, "float": float}


def schema_signature(op: str) -> inspect.Signature:
    """The Python signature of op's schema (what ``torch.library`` infers a schema from)."""
    args, returns = SCHEMAS[op][1:].split(") -> ")
    params = []
    for arg in args.split(", "):
        kind, name = arg.split(" ")
        name, _, default = name.partition("=")
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None if default else inspect.Parameter.empty,
                annotation=_TYPES[kind],
            )
        )
    n_out = returns.count("Tensor")
    out = Tensor if n_out == 1 else tuple[(Tensor,) * n_out]
    return inspect.Signature(params, return_annotation=out)


def with_schema(op: str, parts: Callable, impl: Callable) -> Callable:
    """``impl`` (spec form) as a function of op's flat schema arguments, carrying the schema's
    signature: for ``torch.library.triton_op`` / ``custom_op``, which infer the schema from it."""
    sig = schema_signature(op)

    def flat(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return impl(*parts(*bound.args))

    flat.__signature__ = sig
    return flat

"""What every sampler of this package shares: argument checks and the chains' noise
(:meth:`SamplerBase.setup`), the checked network evaluation, the error for a non-finite value, the
result types.

Randomness: xi_k and u_k of chain c at sampling step k are counter-based (Philox), pure functions
of (seed, chain id, k); the seed is one draw of the ``generator`` passed to ``sample`` (see
``chain_noise``). So the same generator seed gives the same samples, and a chain's samples do not
depend on the other chains of its batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..validate import as_flag, as_int
from . import checks as _args
from .accounting import SamplerStats
from .network import available_memory, chunked_call, probe_call_bytes
from .noise import ChainNoise, base_seed_from
from .transitions import GaussianTransitions, Model, check_transitions

# The default max_batch (max_batch=None; docs/design.md, "Memory"): calls of at most this many
# states are never chunked and nothing is probed (every small run, whatever its network)
PROBE_MIN_STATES = 1024
PROBE_STATES = 8  # the probe call's states (its peak per state sizes the chunks)
MEMORY_BUDGET_FRACTION = 0.25  # of the free device memory (CUDA) or available RAM (CPU)
# On a CPU the network's work is proportional to its states: chunks of B states (the ancestral
# call) cost no throughput, so a speculative run's activations are kept to about the ancestral
# run's (or this many bytes, if more) even where the budget would allow more
CPU_CHUNK_MIN_BYTES = 16 << 20


class NonFiniteError(FloatingPointError):
    """A model output or a log ratio was not finite; the message names the step and the chain."""


@dataclass(frozen=True)
class Chains:
    """Who the chains of a run are: their ids (noise streams, error messages) and their
    conditioning (passed to every network call on their rows)."""

    ids: list  # [B] int chain ids
    cond: "_args.ModelKwargs"  # per-chain network kwargs (empty: unconditional)


@dataclass
class SamplingResult:
    samples: Tensor  # [B, *E] final states
    stats: SamplerStats


def sample_in_inference_mode(sample):
    """Run ``sample`` under ``torch.inference_mode()``: a model whose parameters require grad (a
    diffusers UNet outside its pipeline) must not build an autograd graph over N steps. The
    samples are cloned out of inference mode, so callers get ordinary tensors."""

    @functools.wraps(sample)
    def wrapper(self, *args, **kwargs) -> "SamplingResult":
        self._max_batch_used = self.max_batch
        with torch.inference_mode():
            res = sample(self, *args, **kwargs)
        res.stats.max_batch = self._max_batch_used
        return SamplingResult(res.samples.clone(), res.stats)

    return wrapper


class SamplerBase:
    """The model, the transitions and the settings every sampler has; see the module docstring."""

    name = "sampler"

    def __init__(
        self,
        model: Model,
        transitions: GaussianTransitions,
        *,
        progress: bool = False,
        check_finite: bool = True,
        max_batch: Optional[int] = None,
    ):
        check_transitions(transitions)
        self.model = model
        self.transitions = transitions
        self.progress = progress
        self.check_finite = as_flag("check_finite", check_finite)
        self.max_batch = None if max_batch is None else as_int("max_batch", max_batch, 1)
        self._max_batch_used = self.max_batch  # what the last run used (stats.max_batch)
        self._budget_limits: dict = {}  # default max_batch by (B, call, shape, dtype, device)

    # -------------------------------------------------------------- setup and helpers
    def setup(
        self, num_chains, event_shape, generator, chain_ids, x_init, dtype, device, model_kwargs
    ):
        """The initial states, the chains' noise and the chains, every argument checked before
        the first model call. ``dtype`` / ``device`` None: not given (float32 / CPU, or x_init's);
        given with a tensor ``x_init``, they must be x_init's (they are not silently ignored); an
        ``x_init`` that is not a tensor (a list, an array) is made one of that dtype and device."""
        _args.check_generator(generator)
        if num_chains is not None:
            num_chains = as_int("num_chains", num_chains, 1)
        if dtype is not None:
            _args.check_state_dtype(dtype)
        if x_init is not None:
            if isinstance(x_init, Tensor):
                _args.check_x_init(x_init, self.check_finite)
                _args.check_matches_x_init(x_init, dtype, device)
            else:
                dev = None if device is None else _args.as_device(device)
                x_init = torch.as_tensor(x_init, dtype=dtype, device=dev)
                _args.check_x_init(x_init, self.check_finite)
            if num_chains is not None and num_chains != x_init.shape[0]:
                raise ValueError(f"num_chains={num_chains} but x_init has {x_init.shape[0]} rows")
            rows_shape = tuple(x_init.shape[1:])
            if event_shape is not None and _args.as_event_shape(event_shape) != rows_shape:
                raise ValueError(
                    f"event_shape={tuple(event_shape)} but x_init has rows of shape "
                    f"{tuple(x_init.shape[1:])}"
                )
            num_chains, event_shape = x_init.shape[0], tuple(x_init.shape[1:])
            dtype, device = x_init.dtype, x_init.device
        if num_chains is None or event_shape is None:
            raise ValueError("give num_chains and event_shape, or x_init")
        event_shape = _args.as_event_shape(event_shape)
        dtype = torch.float32 if dtype is None else dtype
        _args.check_state_dtype(dtype)
        device = _args.as_device(device)
        B = num_chains
        chains = Chains(
            _args.as_chain_ids(chain_ids, B), _args.ModelKwargs.check(model_kwargs, B, device)
        )
        base = base_seed_from(generator)
        noise = ChainNoise(base, chains.ids, event_shape, dtype, device)
        if x_init is None:
            x = (noise.initial * self.transitions.init_std).to(dtype)
        else:
            x = x_init.clone()
        return x, noise, chains

    def network_max_batch(self, x: Tensor, chains: "Chains") -> Optional[int]:
        """The most states one model invocation may hold in this run (None: no limit): a round's
        one logical network call on more states is made in chunks of this size. The user's
        ``max_batch``, else one from the memory budget (:meth:`budget_max_batch`)."""
        limit = self.max_batch
        if limit is None:
            limit = self.budget_max_batch(x, chains)
        self._max_batch_used = limit
        return limit

    def budget_max_batch(self, x: Tensor, chains: "Chains") -> Optional[int]:
        """The default ``max_batch`` of a run on chains ``chains`` with states like x: None when
        its largest call (B (L + 1) states) is small or fits; else as many states as
        ``MEMORY_BUDGET_FRACTION`` of the free memory holds, by the per-state peak of one probe
        call, and on a CPU at most max(B, ``CPU_CHUNK_MIN_BYTES`` worth). Measured once per
        (B, state shape, dtype, device)."""
        B = len(chains.ids)
        largest = B * (int(getattr(self, "window", 0)) + 1)
        if largest <= PROBE_MIN_STATES:
            return None
        key = (B, largest, tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._budget_limits:
            per_state = self.probe_state_bytes(x, chains)
            free = available_memory(x.device)
            limit = None
            if per_state is not None and free is not None:
                limit = max(1, int(free * MEMORY_BUDGET_FRACTION) // per_state)
                if x.device.type != "cuda":
                    limit = min(limit, max(B, CPU_CHUNK_MIN_BYTES // per_state))
                limit = None if largest <= limit else limit
            self._budget_limits[key] = limit
        return self._budget_limits[key]

    def probe_state_bytes(self, x: Tensor, chains: "Chains") -> Optional[int]:
        """Peak bytes per state of one target call on the first ``PROBE_STATES`` rows of x (at
        step 0), its input and output included; None if the probe call fails (the run's own
        first call then reports what is wrong)."""
        n = min(x.shape[0], PROBE_STATES)
        k = torch.zeros(n, dtype=torch.int64, device=x.device)
        xin = self.transitions.model_input(x[:n], k).clone()
        cond = chains.cond.gather(torch.arange(n, device=x.device)) if chains.cond else {}
        try:
            peak = probe_call_bytes(self.model, xin, self.transitions.t(k), cond)
        except Exception:  # noqa: BLE001 - any failure of the user's model: no estimate
            return None
        return max(1, -(-peak // n) + 2 * xin[0].nbytes)

    def nonfinite_output_error(self, role: str, step: int, chain: int) -> NonFiniteError:
        """The error for a non-finite network output, naming the step, its timestep and the chain
        (one message for every path)."""
        t = self.transitions.timesteps[min(step, self.transitions.num_steps - 1)].item()
        return NonFiniteError(
            f"{role} model returned a non-finite output at sampling step "
            f"{step} (timestep t={t}) for chain {chain}"
        )

    def nonfinite_state_error(self, step: int, chain: int) -> NonFiniteError:
        """The error for a state that overflowed at a step whose network output was finite (the
        speculative paths see it as a non-finite log ratio)."""
        t = self.transitions.timesteps[min(step, self.transitions.num_steps - 1)].item()
        return NonFiniteError(
            f"non-finite state (the step's result overflowed its dtype) at sampling step {step} "
            f"(timestep t={t}) for chain {chain}"
        )

    def evaluate(
        self, model: Model, role: str, x: Tensor, k: Tensor, rows: Tensor, chains: "Chains"
    ) -> Tensor:
        """Raw x0-hat of ``model`` at states x [n, *E], steps k [n] of chains ``rows`` [n] (batch
        indices); raises on non-finite output."""
        cond = chains.cond.gather(rows.to(x.device)) if chains.cond else {}
        T = self.transitions
        # a fresh input: a model that changes its input in place must not touch the states
        xin, t = T.model_input(x, k), T.t(k).to(x.device)
        if xin is x:
            xin = x.clone()
        out = chunked_call(model, xin, t, cond, self.network_max_batch(x, chains))
        _args.check_model_output(role, out, x)
        # one reduction first (a finite sum has no inf or NaN term); the row-wise test only when
        # it is not finite (which a sum that overflows also gives)
        if self.check_finite and not bool(torch.isfinite(out.sum())):
            bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise self.nonfinite_output_error(role, int(k[i]), chains.ids[int(rows[i])])
        return self.transitions.x0_from_output(x, out, k)

    def progress_bar(self, total: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=self.name, unit="step")

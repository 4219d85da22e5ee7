"""The network as the fused paths call it (the static round, the lean ancestral chain): no host
work per call."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .checks import check_model_output
from .transitions import GaussianTransitions, Model


class CastNet(torch.nn.Module):
    """The network in a lower precision, the chain's states in float32: the verify's log-density
    ratio sums over every coordinate, and the network, not the state update, is the cost
    (``specdiff sample --dtype``, ``SpeculativePipeline`` on a half-precision pipeline)."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return self.net(x.to(self.dtype), t, **cond).to(x.dtype)


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


# ------------------------------------------------------------------ memory
def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a run may still take: the CUDA device's free memory, else the system's available RAM
    (psutil if installed, else /proc/meminfo's MemAvailable); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _PeakLiveBytes(TorchDispatchMode):
    """Bytes of the tensors an operation sequence allocates, tracked while they are alive; its
    ``peak``. Storages the operations were given (inputs, parameters, views of them) are not
    counted."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch would wrap __torch_dispatch__ in dynamo.disable, importing dynamo on the first
        # call: 2.5 s and 150 MB for a probe that compiles nothing
        return False

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._ptrs: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {
            a.untyped_storage().data_ptr()
            for a in tree_leaves((args, kwargs))
            if isinstance(a, Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            ptr, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if n and ptr not in given and ptr not in self._ptrs:
                self._ptrs.add(ptr)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, ptr, n)
        return out

    def _free(self, ptr: int, n: int) -> None:
        self._ptrs.discard(ptr)
        self.live -= n


def probe_call_bytes(model: Model, x: Tensor, t: Tensor, cond: dict) -> int:
    """Peak bytes one ``model(x, t, **cond)`` call takes beyond its inputs: on CUDA the
    allocator's peak; elsewhere the tensors the call's operations allocate, while alive (a lower
    bound: a library's internal workspace is not seen)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        model(x, t, **cond)
        torch.cuda.synchronize(x.device)
        return max(0, torch.cuda.max_memory_allocated(x.device) - base)
    with _PeakLiveBytes() as mode:
        model(x, t, **cond)
    return mode.peak

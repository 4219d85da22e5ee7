"""A network that changes its input in place (``x.div_(2)`` inside ``forward``, common in user
code) must not change what the sampler holds: on every path (static, ragged, draft model,
adaptive window, ancestral, Langevin), with and without chunked calls.

* exactly: a mutating model and its non-mutating twin (the same outputs for the same inputs) give
  bit-identical samples on the same path with the same seed;
* in law: the mutating model's speculative samples against the ancestral chain of the clean model
  (scipy two-sample tests, fixed seeds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from preamble import ABAR, SINGLE_THREAD, gen
from scipy import stats
from torch import nn

from specdiff_kernels.models.gmm import GMMDenoiser, make_gmm
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.langevin import LangevinSampler, SpeculativeLangevin, banana_grad
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.transitions import ddpm_transitions
from specdiff_kernels.testing.two_sample import two_sample_pvalue

pytestmark = SINGLE_THREAD

D = 2
STEPS = 20
ALPHA = 1e-3


class Mutating(nn.Module):
    """``base`` behind a forward that halves its input (and shifts its timesteps) in place first:
    the same output as ``base`` for the same input, since x / 2 * 2 is exact."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x, t):
        x.div_(2)
        t.add_(1)
        return self.base(x * 2, t - 1)


def target():
    return GMMDenoiser(make_gmm(D, K=3, seed=0), ABAR)


def draft():
    return GMMDenoiser(make_gmm(D, K=3, seed=5), ABAR)


def transitions():
    return ddpm_transitions(ABAR, num_inference_steps=STEPS)


def chunks(max_batch):
    # max_batch only when given: the unchunked cases also run on code without the option
    return {} if max_batch is None else {"max_batch": max_batch}


# (sampler factory given (target, draft model), ...): every path a model call can come from
PATHS = {
    "ancestral": lambda m, d, mb: AncestralSampler(m, transitions(), **chunks(mb)),
    "static": lambda m, d, mb: SpeculativeSampler(
        m, transitions(), window=4, path="static", **chunks(mb)
    ),
    "ragged": lambda m, d, mb: SpeculativeSampler(
        m, transitions(), window=4, path="ragged", **chunks(mb)
    ),
    "ragged_noprefetch": lambda m, d, mb: SpeculativeSampler(
        m, transitions(), FrozenTargetDraft("eps", prefetch_root=False), 4, **chunks(mb)
    ),
    "draft_model": lambda m, d, mb: SpeculativeSampler(
        m, transitions(), DraftModelDraft(d), 4, **chunks(mb)
    ),
    "adaptive": lambda m, d, mb: SpeculativeSampler(
        m, transitions(), window="adaptive", **chunks(mb)
    ),
}


@pytest.mark.parametrize("max_batch", [None, 7])
@pytest.mark.parametrize("path", list(PATHS))
def test_mutating_model_bit_identical_to_its_clean_twin(path, max_batch):
    make = PATHS[path]
    clean = make(target(), draft(), max_batch).sample(
        40, (D,), generator=gen(1), dtype=torch.float64
    )
    dirty = make(Mutating(target()), Mutating(draft()), max_batch).sample(
        40, (D,), generator=gen(1), dtype=torch.float64
    )
    assert torch.equal(clean.samples, dirty.samples), path
    assert clean.stats.target_evals == dirty.stats.target_evals


@pytest.mark.parametrize("path", [p for p in PATHS if p != "ancestral"])
def test_mutating_model_samples_the_ancestral_law(path):
    n = 600
    ref = PATHS["ancestral"](target(), None, None).sample(n, (D,), generator=gen(11)).samples
    got = PATHS[path](Mutating(target()), Mutating(draft()), None).sample(
        n, (D,), generator=gen(12)
    )
    x, y = ref.double().numpy(), got.samples.double().numpy()
    # the failure this guards against shrinks the samples (std 0.02 instead of 0.63)
    assert np.std(y) == pytest.approx(np.std(x), rel=0.15)
    assert stats.levene(x[:, 0], y[:, 0]).pvalue > ALPHA
    assert two_sample_pvalue(x, y, seed=0) > ALPHA, path


# ----------------------------------------------------------------------------- Langevin
def mutating_grad(grad):
    def g(x):
        x.mul_(0.5)
        return grad(x * 2)

    return g


LANGEVIN = {
    "plain": lambda g, s: LangevinSampler(grad_U=g, step_size=0.05, num_steps=30),
    "frozen": lambda g, s: SpeculativeLangevin(grad_U=g, step_size=0.05, num_steps=30, window=6),
    "frozen_noprefetch": lambda g, s: SpeculativeLangevin(
        grad_U=g, step_size=0.05, num_steps=30, window=6, prefetch=False
    ),
    "surrogate": lambda g, s: SpeculativeLangevin(
        grad_U=g, step_size=0.05, num_steps=30, window=6, draft=s
    ),
}


def surrogate_grad(x):
    return x * 0.8


@pytest.mark.parametrize("path", list(LANGEVIN))
def test_mutating_gradient_bit_identical_to_its_clean_twin(path):
    start = torch.tensor([[1.5, -0.5, 0.2, 0.0]], dtype=torch.float64).repeat(64, 1)
    clean = LANGEVIN[path](banana_grad(), surrogate_grad).sample(start, generator=gen(3))
    dirty = LANGEVIN[path](mutating_grad(banana_grad()), mutating_grad(surrogate_grad)).sample(
        start, generator=gen(3)
    )
    assert torch.equal(clean.samples, dirty.samples), path

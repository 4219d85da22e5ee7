"""Memory bounded by design: the GMM without a D x D matrix; chunked network calls (``max_batch``,
explicit or from the memory budget) give the unchunked samples and never exceed their size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from preamble import ABAR, SINGLE_THREAD, gen

from specdiff_kernels import models
from specdiff_kernels.models.gmm import GaussianMixture, GMMDenoiser, make_gmm
from specdiff_kernels.sampling import base as base_module
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.base import (
    MEMORY_BUDGET_FRACTION,
    PROBE_MIN_STATES,
    Chains,
    SamplerBase,
)
from specdiff_kernels.sampling.checks import ModelKwargs
from specdiff_kernels.sampling.drafts import DraftModelDraft
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.transitions import ddpm_transitions

pytestmark = SINGLE_THREAD


# ----------------------------------------------------------------------------- the GMM
@pytest.mark.parametrize("dim", [16, 64])
def test_gmm_variance_is_the_diagonal_of_cov(dim):
    g = make_gmm(dim, K=8, seed=3)
    # the D x D product sums over components in BLAS order: equal up to one rounding
    torch.testing.assert_close(g.variance(), torch.diagonal(g.cov()), rtol=4e-16, atol=0)


@pytest.mark.parametrize("dim", [16, 64])
def test_gmm_model_unchanged_by_the_diagonal_construction(dim):
    """models.load("gmm") against the old construction (the draft's stds from the diagonal of
    the full covariance), done here inline."""
    m = models.load("gmm", dim=dim)
    gmm = make_gmm(dim, K=8, seed=0)
    old_draft = GMMDenoiser(
        GaussianMixture(gmm.mean()[None], torch.diagonal(gmm.cov()).sqrt()[None]),
        m.alphas_cumprod,
        prediction="epsilon",
    )
    x = torch.randn(32, dim, generator=gen(0), dtype=torch.float64)
    t = torch.randint(0, 1000, (32,), generator=gen(1))
    assert torch.equal(m.target(x, t), GMMDenoiser(gmm, m.alphas_cumprod)(x, t))
    torch.testing.assert_close(m.draft(x, t), old_draft(x, t), rtol=1e-13, atol=1e-13)
    T = m.transitions(20)

    def run(draft):
        s = SpeculativeSampler(m.target, T, DraftModelDraft(draft), 4)
        return s.sample(64, (dim,), generator=gen(2), dtype=torch.float64)

    new, old = run(m.draft), run(old_draft)
    # the same decisions; a rejected step's reflection reads the draft's mean (one rounding)
    assert new.stats.accepted_by_step == old.stats.accepted_by_step
    torch.testing.assert_close(new.samples, old.samples, rtol=0, atol=1e-14)


LOAD_BIG = """
import json, resource, time
import torch
from specdiff_kernels import models
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
m = models.load("gmm", dim=65536)
dt = time.perf_counter() - t0
m.target(torch.zeros(1, 65536), torch.tensor([500]))
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "grown_mb": (rss1 - rss0) / 1024}))
"""


def test_gmm_dim_65536_loads_small_and_fast():
    """It asked for the D x D float64 covariance: 34 GB."""
    out = subprocess.run(
        [sys.executable, "-c", LOAD_BIG], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["grown_mb"] < 100, r
    assert r["seconds"] < 5, r  # < 1 s on an idle machine; loaded CI machines are slower


# ----------------------------------------------------------------------------- chunked calls
D = 5


class Recording(torch.nn.Module):
    """A GMM denoiser that records the batch size of every invocation."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.base = GMMDenoiser(make_gmm(D, K=3, seed=seed), ABAR)
        self.sizes: list[int] = []

    def forward(self, x, t):
        self.sizes.append(x.shape[0])
        return self.base(x, t)


def transitions():
    return ddpm_transitions(ABAR, num_inference_steps=25)


SAMPLERS = {
    "ancestral": lambda m, mb: AncestralSampler(m, transitions(), max_batch=mb),
    "static": lambda m, mb: SpeculativeSampler(
        m, transitions(), window=5, path="static", max_batch=mb
    ),
    "ragged": lambda m, mb: SpeculativeSampler(
        m, transitions(), window=5, path="ragged", max_batch=mb
    ),
    "draft_model": lambda m, mb: SpeculativeSampler(
        m, transitions(), DraftModelDraft(Recording(seed=4)), 5, max_batch=mb
    ),
}


@pytest.mark.parametrize("path", list(SAMPLERS))
def test_chunked_calls_same_samples_and_bounded(path):
    B, mb = 23, 7
    whole, chunked = Recording(), Recording()
    a = SAMPLERS[path](whole, None).sample(B, (D,), generator=gen(5), dtype=torch.float64)
    s = SAMPLERS[path](chunked, mb)
    b = s.sample(B, (D,), generator=gen(5), dtype=torch.float64)
    # the network's float arithmetic depends on its batch size: equal within 1e-12, not bitwise
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=1e-12)
    assert a.stats.target_evals == b.stats.target_evals
    assert max(chunked.sizes) <= mb < max(whole.sizes)
    assert len(chunked.sizes) > b.stats.target_calls  # logical calls were split
    assert sum(chunked.sizes) == b.stats.target_evals
    assert b.stats.max_batch == mb and a.stats.max_batch is None
    if path == "draft_model":
        dm = s.draft.model
        assert dm.sizes and max(dm.sizes) <= mb


def budget(monkeypatch, per_state: int, free: int, probes: list):
    def probe(self, x, chains):
        probes.append(x.shape)
        return per_state

    monkeypatch.setattr(SamplerBase, "probe_state_bytes", probe)
    monkeypatch.setattr(base_module, "available_memory", lambda device: free)


@pytest.mark.parametrize("path", ["static", "ragged", "ancestral"])
def test_default_max_batch_fits_the_budget(monkeypatch, path):
    """max_batch=None: as many states per invocation as a quarter of the free memory holds."""
    probes: list = []
    budget(monkeypatch, per_state=1000, free=4 * 1000 * 50, probes=probes)
    B = 1100  # more than PROBE_MIN_STATES states per call, even for the ancestral chain
    assert B > PROBE_MIN_STATES and MEMORY_BUDGET_FRACTION == 0.25
    model = Recording()
    s = SAMPLERS[path](model, None)
    res = s.sample(B, (D,), generator=gen(6), dtype=torch.float64)
    assert res.stats.max_batch == 50 and max(model.sizes) <= 50
    ref = SAMPLERS[path](Recording(), 10**9).sample(B, (D,), generator=gen(6), dtype=torch.float64)
    torch.testing.assert_close(res.samples, ref.samples, rtol=0, atol=1e-12)
    s.sample(B, (D,), generator=gen(7), dtype=torch.float64)
    assert len(probes) == 1  # measured once per (B, shape, dtype, device)


def test_default_max_batch_on_cpu_at_least_the_ancestral_call(monkeypatch):
    """Plenty of memory, 1 MB per state: a speculative call of B (L + 1) states is made in
    chunks of B (the ancestral call's size); the ancestral call itself is not chunked."""
    probes: list = []
    budget(monkeypatch, per_state=1 << 20, free=1 << 40, probes=probes)
    B = 300
    spec, anc = Recording(), Recording()
    st = SAMPLERS["static"](spec, None).sample(B, (D,), generator=gen(8)).stats
    assert st.max_batch == B and max(spec.sizes) == B
    sa = AncestralSampler(anc, transitions()).sample(B * 4, (D,), generator=gen(8)).stats
    assert sa.max_batch is None and set(anc.sizes) == {B * 4}


def test_small_runs_never_probed_nor_chunked(monkeypatch):
    probes: list = []
    budget(monkeypatch, per_state=1 << 30, free=1, probes=probes)
    model = Recording()
    st = SAMPLERS["ragged"](model, None).sample(9, (D,), generator=gen(9)).stats
    assert probes == [] and st.max_batch is None
    assert len(model.sizes) == st.target_calls


def test_probe_measures_the_call_peak():
    """A network whose call holds a [n, 4000] float64 temporary: at least 32 kB per state."""

    class Wide(torch.nn.Module):
        def forward(self, x, t):
            h = torch.ones(x.shape[0], 4000, dtype=torch.float64)
            return x + h.sum(1, keepdim=True).to(x.dtype) * 0

    s = AncestralSampler(Wide(), transitions())
    x = torch.zeros(16, D)
    chains = Chains(list(range(16)), ModelKwargs({}))
    per_state = s.probe_state_bytes(x, chains)
    assert 32000 <= per_state < 4 * 32000

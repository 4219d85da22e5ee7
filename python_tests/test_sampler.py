"""Non-statistical behaviour of the samplers: seeding, ragged batches, errors, stats accounting,
hooks. (The laws are tested in test_sampler_exactness.py.)"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from preamble import ABAR, SINGLE_THREAD, gen

import specdiff_kernels
from specdiff_kernels.models.gmm import GMMDenoiser, make_gmm
from specdiff_kernels.sampling.accounting import SamplerStats
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.base import NonFiniteError
from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.noise import ChainNoise
from specdiff_kernels.sampling.sampler import COMPACT_MIN_CHAINS_CPU, SpeculativeSampler
from specdiff_kernels.sampling.transitions import (
    ddim_transitions,
    ddpm_transitions,
    euler_ancestral_transitions,
)

D = 6
STEPS = 30


pytestmark = SINGLE_THREAD


def setup(steps=STEPS, kind="ddpm"):
    model = GMMDenoiser(make_gmm(D, K=3, seed=0), ABAR)
    if kind == "ddpm":
        T = ddpm_transitions(ABAR, num_inference_steps=steps)
    elif kind == "ddim0":
        T = ddim_transitions(ABAR, num_inference_steps=steps, eta=0.0)
    else:
        T = euler_ancestral_transitions(ABAR, num_inference_steps=steps)
    return model, T


def draft_model():
    return GMMDenoiser(make_gmm(D, K=3, seed=5), ABAR)


DRAFTS = {
    "frozen_x0": lambda: FrozenTargetDraft("x0"),
    "frozen_eps": lambda: FrozenTargetDraft("eps"),
    "frozen_x0_noprefetch": lambda: FrozenTargetDraft("x0", prefetch_root=False),
    "draft_model": lambda: DraftModelDraft(draft_model()),
}


# ----------------------------------------------------------------------------- seeding
@pytest.mark.parametrize("draft", list(DRAFTS))
def test_same_seed_same_samples(draft):
    model, T = setup()
    a = SpeculativeSampler(model, T, DRAFTS[draft](), 4).sample(16, (D,), generator=gen(1))
    b = SpeculativeSampler(model, T, DRAFTS[draft](), 4).sample(16, (D,), generator=gen(1))
    c = SpeculativeSampler(model, T, DRAFTS[draft](), 4).sample(16, (D,), generator=gen(2))
    assert torch.equal(a.samples, b.samples)
    assert not torch.allclose(a.samples, c.samples)
    assert a.stats.accepted_by_position == b.stats.accepted_by_position


def test_ancestral_same_seed_same_samples():
    model, T = setup()
    a = AncestralSampler(model, T).sample(8, (D,), generator=gen(1))
    b = AncestralSampler(model, T).sample(8, (D,), generator=gen(1))
    assert torch.equal(a.samples, b.samples)


@pytest.mark.parametrize("draft", list(DRAFTS))
@pytest.mark.parametrize("kind", ["ddpm", "euler_ancestral"])
def test_chain_result_independent_of_batch(draft, kind):
    """Chains 0..7 together vs chain 3 alone vs chains [6, 3] : chain 3 is the same."""
    model, T = setup(kind=kind)
    s = SpeculativeSampler(model, T, DRAFTS[draft](), 5)
    together = s.sample(8, (D,), generator=gen(3), dtype=torch.float64)
    alone = s.sample(1, (D,), generator=gen(3), chain_ids=[3], dtype=torch.float64)
    pair = s.sample(2, (D,), generator=gen(3), chain_ids=[6, 3], dtype=torch.float64)
    torch.testing.assert_close(alone.samples[0], together.samples[3], rtol=0, atol=1e-6)
    torch.testing.assert_close(pair.samples[1], together.samples[3], rtol=0, atol=1e-6)
    torch.testing.assert_close(pair.samples[0], together.samples[6], rtol=0, atol=1e-6)
    # ragged: each chain progresses at its own pace; chain 3 finishes in the same round either way
    assert together.stats.chain_rounds[3] == alone.stats.rounds == alone.stats.chain_rounds[0]
    assert together.stats.rounds == max(together.stats.chain_rounds)


def test_ancestral_chain_independent_of_batch():
    model, T = setup()
    together = AncestralSampler(model, T).sample(8, (D,), generator=gen(3), dtype=torch.float64)
    alone = AncestralSampler(model, T).sample(
        1, (D,), generator=gen(3), chain_ids=[3], dtype=torch.float64
    )
    torch.testing.assert_close(alone.samples[0], together.samples[3], rtol=0, atol=1e-6)


def test_chain_noise_indexed_by_step():
    """xi_k of a chain does not depend on how the steps were requested (single steps, overlapping
    windows with jumps, in any order), nor on the other rows."""
    a = ChainNoise(11, [4, 9], (3,), torch.float32, "cpu")
    b = ChainNoise(11, [9, 4, 2], (3,), torch.float32, "cpu")
    xs_a = [a.window(torch.tensor([0, 1]), torch.tensor([k, k]), 1) for k in range(20)]
    for k in (12, 0, 3, 4, 9):  # windows of 8 that overlap, with jumps
        xi, u = b.window(torch.tensor([1, 0]), torch.tensor([k, k]), 8)
        for j in range(8):
            if k + j < 20:
                assert torch.equal(xi[0, j], xs_a[k + j][0][0, 0]), (k, j)
                assert torch.equal(xi[1, j], xs_a[k + j][0][1, 0]), (k, j)
                assert torch.equal(u[0, j], xs_a[k + j][1][0, 0]), (k, j)
    assert torch.equal(a.initial, b.initial[[1, 0]])
    assert not torch.equal(a.initial[0], a.window(torch.tensor([0]), torch.tensor([0]), 1)[0][0, 0])


# ------------------------------------------------------------------ L = 1, deterministic samplers
def test_window_one_without_prefetch_is_ancestral():
    model, T = setup()
    """Every window starts from the target's own prediction at its root, so every step is accepted
    and is the ancestral step with the same noise: same samples (the ancestral step is one fused
    kernel, the ragged round eager ops: equal up to float64 rounding) and one call per step."""
    anc = AncestralSampler(model, T).sample(12, (D,), generator=gen(4), dtype=torch.float64)
    spec = SpeculativeSampler(model, T, FrozenTargetDraft("eps", prefetch_root=False), 1).sample(
        12, (D,), generator=gen(4), dtype=torch.float64
    )
    torch.testing.assert_close(anc.samples, spec.samples, rtol=1e-12, atol=1e-12)
    assert spec.stats.acceptance_rate == 1.0
    assert spec.stats.target_evals == anc.stats.target_evals


def test_all_deterministic_sampler_is_refused():
    """DDIM eta = 0: every step has std 0, nothing to speculate over: one line pointing at the
    stochastic variants (the ancestral sampler runs it)."""
    model, T = setup(kind="ddim0")
    for draft in ("frozen_x0", "frozen_x0_noprefetch", "draft_model"):
        with pytest.raises(ValueError, match="deterministic.*stochastic variant") as err:
            SpeculativeSampler(model, T, DRAFTS[draft](), 8)
        assert "\n" not in str(err.value)
    assert AncestralSampler(model, T).sample(5, (D,), generator=gen(5)).samples.shape == (5, D)


# ----------------------------------------------------------------------------- errors
class NaNAt(torch.nn.Module):
    """Wraps a model: non-finite output for rows with |x|_inf > bound, or at timestep t_bad."""

    def __init__(self, model, bound=None, t_bad=None):
        super().__init__()
        self.model, self.bound, self.t_bad = model, bound, t_bad

    def forward(self, x, t):
        out = self.model(x, t).clone()
        bad = torch.zeros(x.shape[0], dtype=torch.bool)
        if self.bound is not None:
            bad |= x.reshape(x.shape[0], -1).abs().amax(1) > self.bound
        if self.t_bad is not None:
            bad |= t == self.t_bad
        out[bad] = float("nan")
        return out


@pytest.mark.parametrize("draft", list(DRAFTS))
def test_nonfinite_target_output_names_step_and_chain(draft):
    model, T = setup()
    x = torch.randn(6, D, generator=gen(0))
    x[4] = 1000.0
    s = SpeculativeSampler(NaNAt(model, bound=100.0), T, DRAFTS[draft](), 4)
    with pytest.raises(NonFiniteError, match=r"target model .* sampling step 0 .* chain 4$"):
        s.sample(x_init=x, generator=gen(0), chain_ids=[0, 1, 2, 3, 4, 5])
    with pytest.raises(NonFiniteError, match=r"sampling step 0 .* chain 4"):
        AncestralSampler(NaNAt(model, bound=100.0), T).sample(x_init=x, generator=gen(0))


def test_nonfinite_target_output_at_later_step():
    model, T = setup()
    t_bad = int(T.timesteps[7])
    s = SpeculativeSampler(NaNAt(model, t_bad=t_bad), T, FrozenTargetDraft(), 4)
    with pytest.raises(
        NonFiniteError, match=rf"sampling step 7 \(timestep t={t_bad}\) for chain \d+"
    ):
        s.sample(4, (D,), generator=gen(0))


def test_nonfinite_draft_output_names_step_and_chain():
    model, T = setup()
    x = torch.randn(3, D, generator=gen(0))
    x[2] = 1000.0
    s = SpeculativeSampler(model, T, DraftModelDraft(NaNAt(draft_model(), bound=100.0)), 4)
    with pytest.raises(NonFiniteError, match=r"draft model .* sampling step 0 .* chain 12"):
        s.sample(x_init=x, generator=gen(0), chain_ids=[10, 11, 12])


def test_nonfinite_log_ratio_names_step_and_chain():
    """A finite but enormous draft mean overflows the float32 log ratio: the sampler raises."""
    model, T = setup()

    class Huge(torch.nn.Module):
        def forward(self, x, t):
            return torch.full_like(x, 1e30)

    T_sample = ddpm_transitions(ABAR, num_inference_steps=STEPS, prediction="sample")
    s = SpeculativeSampler(
        GMMDenoiser(make_gmm(D, K=3, seed=0), ABAR, "sample"), T_sample, DraftModelDraft(Huge()), 4
    )
    with pytest.raises(NonFiniteError, match=r"non-finite log ratio .* sampling step 0 .* chain 0"):
        s.sample(2, (D,), generator=gen(0), dtype=torch.float64)


class BigEps(torch.nn.Module):
    """A finite eps output (``value`` on the rows whose state exceeds ``above``, else 0) that
    makes the state overflow its dtype within a few steps (no clipping)."""

    def __init__(self, value: float, above: float = -1.0):
        super().__init__()
        self.value, self.above = value, above

    def forward(self, x, t):
        big = x.reshape(x.shape[0], -1).abs().amax(1) > self.above
        return torch.where(big.view(-1, 1), torch.full_like(x, self.value), torch.zeros_like(x))


NONFINITE_FORM = r"at sampling step (\d+) \(timestep t=[^)]*\) for chain (\d+)"


@pytest.mark.parametrize("dtype, value", [(torch.float16, 500.0), (torch.float32, 3e38)])
def test_ancestral_state_overflow_raises_like_the_speculative_paths(dtype, value):
    """Finite network outputs, states past the dtype's range: every sampler raises NonFiniteError
    naming a step and a chain in one form (the ancestral one used to return NaN samples)."""
    T = ddpm_transitions(ABAR, num_inference_steps=STEPS)
    assert T.clip_sample is None
    x = torch.randn(3, D, generator=gen(0)).to(dtype)
    x[2] = 30.0
    kw = dict(x_init=x, generator=gen(0), chain_ids=[10, 11, 12])
    samplers = {
        "ancestral": AncestralSampler(BigEps(value, above=20.0), T),
        "static": SpeculativeSampler(BigEps(value, above=20.0), T, window=4, path="static"),
        "ragged": SpeculativeSampler(BigEps(value, above=20.0), T, window=4, path="ragged"),
    }
    for name, s in samplers.items():
        with pytest.raises(NonFiniteError, match=NONFINITE_FORM) as err:
            s.sample(**kw)
        assert err.value.args[0].count("\n") == 0
        assert re.search(NONFINITE_FORM, str(err.value)).group(2) == "12", name
    with pytest.raises(NonFiniteError, match=r"^non-finite state .* at sampling step \d+ "):
        AncestralSampler(BigEps(value), T).sample(**kw)
    # unchecked, the overflow is returned as it is
    out = AncestralSampler(BigEps(value), T, check_finite=False).sample(**kw).samples
    assert not bool(torch.isfinite(out).all())


def test_ancestral_nonfinite_output_reported_before_the_state_it_made():
    """At the step whose output is NaN the state is NaN too: the error names the output."""
    model, T = setup()
    t_bad = int(T.timesteps[5])
    with pytest.raises(NonFiniteError, match=r"^target model .* sampling step 5 "):
        AncestralSampler(NaNAt(model, t_bad=t_bad), T).sample(4, (D,), generator=gen(0))


def test_bad_arguments():
    model, T = setup()
    with pytest.raises(ValueError, match="window"):
        SpeculativeSampler(model, T, window=0)
    with pytest.raises(TypeError, match="draft"):
        SpeculativeSampler(model, T, draft="frozen")
    with pytest.raises(ValueError, match="freeze"):
        FrozenTargetDraft("v")
    with pytest.raises(ValueError, match="num_chains and event_shape"):
        SpeculativeSampler(model, T).sample(4)
    with pytest.raises(ValueError, match="backend"):
        SpeculativeSampler(model, T, backend="nope").sample(2, (D,), generator=gen(0))


# ----------------------------------------------------------------------------- stats
def test_ancestral_stats():
    model, T = setup()
    st = AncestralSampler(model, T).sample(7, (D,), generator=gen(0)).stats
    assert st.target_calls == STEPS and st.rounds == STEPS and st.target_evals == 7 * STEPS
    assert st.target_calls == model.num_calls and st.target_evals == model.num_evals
    assert st.direct_steps + st.deterministic_steps == 7 * STEPS
    assert st.deterministic_steps == 7  # the final DDPM step
    assert st.draft_calls == st.draft_evals == 0 and st.wall_time > 0


def _check_common(st: SamplerStats, B: int):
    L = st.window
    assert st.speculative_steps + st.direct_steps + st.deterministic_steps == B * st.num_steps
    assert sum(st.accepted_length_hist) == st.windows
    assert st.mean_accepted_length * st.windows == pytest.approx(
        sum(a * c for a, c in enumerate(st.accepted_length_hist))
    )
    assert sum(st.accepted_by_position) == sum(st.accepted_by_step)
    assert sum(st.attempted_by_position) == sum(st.attempted_by_step)
    # committed steps = accepted + one reflected step per window that rejected
    rejected_windows = sum(st.attempted_by_position) - sum(st.accepted_by_position)
    assert st.speculative_steps == sum(st.accepted_by_position) + rejected_windows
    assert st.attempted_by_position[0] == st.windows
    for j in range(L - 1):
        assert st.attempted_by_position[j + 1] <= st.accepted_by_position[j]
    assert all(0 <= a <= t for a, t in zip(st.accepted_by_position, st.attempted_by_position))


@pytest.mark.parametrize("path", ["static", "ragged"])
@pytest.mark.parametrize("L", [1, 3, 8])
@pytest.mark.parametrize("B", [1, 9])
def test_prefetch_stats_one_call_per_round(L, B, path):
    model, T = setup()
    st = (
        SpeculativeSampler(model, T, FrozenTargetDraft("x0"), L, path=path)
        .sample(B, (D,), generator=gen(L))
        .stats
    )
    _check_common(st, B)
    assert st.target_calls == st.rounds  # exactly one call per round
    assert st.target_calls == model.num_calls and st.target_evals == model.num_evals
    assert st.direct_steps == B  # the first step of every chain
    assert st.deterministic_steps == B  # final DDPM step (t = 0)
    assert st.draft_calls == st.draft_evals == 0
    if B == 1:
        # one chain: one window per round, except the first-step round and (if the last window
        # ended in a rejection, so nothing was prefetched) a round for the final DDPM step
        assert st.rounds - 2 <= st.windows <= st.rounds - 1
    if B == 1 and path == "ragged":
        # evals per window: y_1..y_n plus y_0 when the root is stale plus y_n prefetch
        assert st.target_evals <= 1 + st.windows * (L + 1)
    if path == "static":
        full = B + (st.rounds - 1) * B * (L + 1)  # every round evaluating all L + 1 positions
        if B < COMPACT_MIN_CHAINS_CPU:
            assert st.target_evals == full
        else:  # eager on CPU: only the states the round reads, which are the ragged round's
            ragged = (
                SpeculativeSampler(model, T, FrozenTargetDraft("x0"), L, path="ragged")
                .sample(B, (D,), generator=gen(L))
                .stats
            )
            assert st.target_evals == ragged.target_evals < full


def test_noprefetch_stats_two_calls_per_round():
    model, T = setup()
    B, L = 4, 6
    st = (
        SpeculativeSampler(model, T, FrozenTargetDraft("x0", prefetch_root=False), L)
        .sample(B, (D,), generator=gen(0))
        .stats
    )
    _check_common(st, B)
    assert st.rounds <= st.target_calls <= 2 * st.rounds
    assert st.target_calls == model.num_calls and st.target_evals == model.num_evals
    assert st.direct_steps == 0
    assert st.accepted_by_position[0] == st.attempted_by_position[0]  # exact root: step 0 is p


def test_draft_model_stats():
    model, T = setup()
    dm = draft_model()
    B, L = 5, 4
    sampler = SpeculativeSampler(model, T, DraftModelDraft(dm), L)
    st = sampler.sample(B, (D,), generator=gen(0)).stats
    _check_common(st, B)
    assert st.target_calls == st.rounds == model.num_calls
    assert st.target_evals == model.num_evals
    assert st.draft_calls == dm.num_calls and st.draft_evals == dm.num_evals
    assert st.draft_calls <= L * st.rounds
    # every drafted step is evaluated by the target (y_0..y_{n-1}) plus one det step per chain
    assert st.target_evals == st.draft_evals + st.deterministic_steps
    ratios = st.relative_to(AncestralSampler(model, T).sample(B, (D,), generator=gen(0)).stats)
    assert set(ratios) == {"target_calls", "target_evals", "wall_time"}


def test_stats_summary_and_dict():
    model, T = setup()
    st = SpeculativeSampler(model, T, window=4).sample(3, (D,), generator=gen(0)).stats
    acc = [a / t for a, t in zip(st.accepted_by_position, st.attempted_by_position)]
    assert st.summary() == (
        f"speculative: chains=3 steps={STEPS} L=4 rounds={st.rounds} "
        f"target_calls={st.target_calls} target_evals={st.target_evals} draft_calls=0 "
        f"draft_evals=0 steps/window={st.speculative_steps / st.windows:.2f} "
        f"acceptance by position=[{', '.join(f'{a:.2f}' for a in acc)}] wall={st.wall_time:.3f}s"
    )
    d = json.loads(json.dumps(st.as_dict()))
    assert d["rounds"] == st.rounds and d["target_calls"] == model.num_calls
    assert d["acceptance_by_position"] == pytest.approx(acc, rel=1e-15)
    hist = st.accepted_length_hist
    assert d["mean_accepted_length"] == pytest.approx(
        sum(a * c for a, c in enumerate(hist)) / sum(hist), rel=1e-15
    )
    assert d["mean_chain_rounds"] == pytest.approx(sum(st.chain_rounds) / 3, rel=1e-15)
    assert d["acceptance_rate"] == pytest.approx(
        sum(st.accepted_by_position) / sum(st.attempted_by_position), rel=1e-15
    )
    by_step = st.acceptance_by_step
    assert len(by_step) == STEPS
    for k in range(STEPS):
        if st.attempted_by_step[k]:
            assert by_step[k] == st.accepted_by_step[k] / st.attempted_by_step[k]
        else:
            assert math.isnan(by_step[k])


# ----------------------------------------------------------------------------- hooks
def test_backend_passthrough_and_verify_fn_hook():
    model, T = setup()
    seen = []

    def spy(*args, backend=None):
        seen.append((args[0].shape, backend))
        return specdiff_kernels.speculative_verify(*args, backend=backend)

    s_ref = SpeculativeSampler(model, T, window=4, backend="reference", verify_fn=spy)
    r_ref = s_ref.sample(6, (D,), generator=gen(0), dtype=torch.float64)
    assert seen and all(b == "reference" and shp[1] == 4 and shp[2] == D for shp, b in seen)
    r_cpp = SpeculativeSampler(model, T, window=4, backend="cpp").sample(
        6, (D,), generator=gen(0), dtype=torch.float64
    )
    torch.testing.assert_close(r_ref.samples, r_cpp.samples)


def test_multidim_event_and_progress_bar(capsys):
    model, T = setup()
    s = SpeculativeSampler(model, T, window=4, progress=True)
    r = s.sample(3, (2, 3), generator=gen(0))
    assert r.samples.shape == (3, 2, 3) and r.samples.dtype == torch.float32
    flat = SpeculativeSampler(model, T, window=4).sample(3, (D,), generator=gen(0))
    torch.testing.assert_close(r.samples.reshape(3, D), flat.samples)
    assert "speculative" in capsys.readouterr().err


def test_x_init_is_the_starting_state():
    """Deterministic chain (DDIM eta = 0): the samples are the hand-run chain from x_init."""
    model, T = setup(steps=6, kind="ddim0")
    x = torch.randn(4, D, generator=gen(0), dtype=torch.float64)
    expect = x.clone()
    for k in range(T.num_steps):
        expect = T.mean(model, expect, torch.full((4,), k))
    for sampler in (AncestralSampler(model, T),):
        got = sampler.sample(x_init=x, generator=gen(1)).samples
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)


class FirstInput(torch.nn.Module):
    """Records the states of its first call (DDPM: input_scale = 1, so they are the states)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.first = model, None

    def forward(self, x, t):
        if self.first is None:
            self.first = x.clone()
        return self.model(x, t)


@pytest.mark.parametrize("sampler_cls", [SpeculativeSampler, AncestralSampler])
def test_x_init_equal_to_the_default_start_gives_the_same_samples(sampler_cls):
    """Stochastic chain: passing the default start (the states of the ancestral sampler's first
    call) as x_init reproduces the default run bit for bit, and another x_init changes it."""
    model, T = setup()
    rec = FirstInput(model)
    AncestralSampler(rec, T).sample(5, (D,), generator=gen(1))
    start = rec.first
    # a fixed window: window="auto"'s windows follow measured timings, so its samples do not
    # repeat bit for bit from run to run (their law does)
    make = (
        (lambda: sampler_cls(model, T, window=4))
        if sampler_cls is SpeculativeSampler
        else (lambda: sampler_cls(model, T))
    )
    default = make().sample(5, (D,), generator=gen(1)).samples
    given = make().sample(x_init=start, generator=gen(1)).samples
    assert torch.equal(given, default)
    shifted = make().sample(x_init=start + 0.5, generator=gen(1)).samples
    assert not torch.allclose(shifted, default, atol=1e-3)


# ----------------------------------------------------------------------------- autograd
@pytest.mark.parametrize(
    "make",
    [
        lambda m, T: AncestralSampler(m, T),
        lambda m, T: SpeculativeSampler(m, T, FrozenTargetDraft("x0"), 4, path="static"),
        lambda m, T: SpeculativeSampler(m, T, FrozenTargetDraft("x0"), 4, path="ragged"),
        lambda m, T: SpeculativeSampler(m, T, DraftModelDraft(lambda x, t: m(x, t) * 0.9), 4),
    ],
)
def test_no_autograd_graph_with_grad_requiring_parameters(make):
    """A network whose parameters require grad (a diffusers UNet outside its pipeline) is run
    under inference mode: no autograd graph over the N steps, ordinary output tensors."""
    _, T = setup()
    net = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(), torch.nn.Linear(32, D))
    assert all(p.requires_grad for p in net.parameters())
    modes = []

    def model(x, t):
        modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return net(x)

    res = make(model, T).sample(6, (D,), generator=gen(2))
    assert modes and all(not grad and inference for grad, inference in modes)
    assert res.samples.grad_fn is None and not res.samples.requires_grad
    assert not torch.is_inference(res.samples)  # usable in autograd afterwards
    (res.samples * 2).sum()  # an ordinary tensor


# ----------------------------------------------------------------------------- compiled paths
@pytest.mark.parametrize("B", [1, 3])
def test_compiled_static_round_and_ancestral_equal_eager(B):
    """compile=True gives the eager paths' samples and statistics: at B = 1 the whole static round
    under torch.compile(fullgraph=True) (network, draft, verify and the counters op); at B = 3,
    on CPU, the compact round with the network alone compiled (a dynamic batch: its calls change
    size); and the lean ancestral step compiled."""
    model, T = setup(steps=25)
    kw = dict(generator=None, dtype=torch.float64)
    for make in (
        lambda c: SpeculativeSampler(model, T, window=4, path="static", compile=c),
        lambda c: AncestralSampler(model, T, compile=c),
    ):
        eager = make(False).sample(B, (D,), **{**kw, "generator": gen(4)})
        torch._dynamo.reset()  # a fresh compile, whatever other tests compiled before
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = make(True).sample(B, (D,), **{**kw, "generator": gen(4)})
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
        torch.testing.assert_close(compiled.samples, eager.samples, rtol=1e-9, atol=1e-9)
        a, b = compiled.stats.as_dict(), eager.stats.as_dict()
        a.pop("wall_time"), b.pop("wall_time")
        assert a == b


# ----------------------------------------------------------------------------- which round runs
def custom_verify(*args, **kwargs):  # the public op behind a hook: not the default verify op
    return specdiff_kernels.speculative_verify(*args, **kwargs)


BLOCKERS = {  # settings the static round cannot run -> the reason static_path_blockers() gives
    "draft_model": (
        lambda: dict(draft=DraftModelDraft(draft_model())),
        "a draft model (DraftModelDraft)",
    ),
    "noprefetch": (
        lambda: dict(draft=FrozenTargetDraft("x0", prefetch_root=False)),
        "FrozenTargetDraft(prefetch_root=False)",
    ),
    "adaptive": (lambda: dict(window="adaptive"), "an adaptive window"),
    "verify_fn": (lambda: dict(verify_fn=custom_verify), "a custom verify_fn"),
}


def test_static_path_blockers_empty_where_the_static_round_runs():
    model, T = setup()
    sampler = SpeculativeSampler(model, T, FrozenTargetDraft("eps"), 4)
    assert sampler.static_path_blockers() == [] and sampler.resolve_path() == "static"


@pytest.mark.parametrize("blocker", list(BLOCKERS))
def test_static_path_blockers_state_the_rule_for_auto_errors_and_docs(blocker):
    """One reason per blocking setting, the same text in the path='static' and compile=True
    refusals (one line each) and in the SpeculativeSampler docstring."""
    model, T = setup()
    kwargs, reason = BLOCKERS[blocker]
    sampler = SpeculativeSampler(model, T, **kwargs())
    assert sampler.static_path_blockers() == [reason]
    assert sampler.resolve_path() == "ragged"
    assert reason in " ".join(SpeculativeSampler.__doc__.split())
    for bad in (dict(path="static"), dict(compile=True)):
        with pytest.raises(ValueError) as err:
            SpeculativeSampler(model, T, **kwargs(), **bad)
        msg = str(err.value)
        assert reason in msg and "\n" not in msg
        assert msg.startswith(
            "path='static' cannot run with"
            if "path" in bad
            else "compile=True compiles the static round"
        )


def test_static_path_blockers_list_every_reason():
    model, T = setup()
    s = SpeculativeSampler(
        model,
        T,
        FrozenTargetDraft("x0", prefetch_root=False),
        window="adaptive",
        verify_fn=custom_verify,
    )
    assert s.static_path_blockers() == [
        BLOCKERS[b][1] for b in ("noprefetch", "adaptive", "verify_fn")
    ]
    with pytest.raises(
        ValueError,
        match=r"^compile=True compiles the static round, but this "
        r"sampler runs the ragged round \(path='ragged'\), which "
        r"runs eagerly; leave compile at 'auto' or False$",
    ):
        SpeculativeSampler(model, T, path="ragged", compile=True)


# ----------------------------------------------------------------------------- ragged round pieces
def test_plan_round_splits_live_chains():
    from specdiff_kernels.sampling.ragged_round import RootStatus, plan_round

    N = 6
    det = torch.tensor([False, False, True, False, False, True])
    k = torch.tensor([0, 2, 6, 5, 3, 1])
    root = torch.tensor(
        [
            RootStatus.NONE,
            RootStatus.EXACT,
            RootStatus.STALE,
            RootStatus.STALE,
            RootStatus.NONE,
            RootStatus.STALE,
        ],
        dtype=torch.int8,
    )
    plan = plan_round(k, root, det, N, first_steps=True)
    assert plan.det.tolist() == [1, 3]  # steps 2 and 5 are deterministic; chain 2 finished
    assert plan.first_step.tolist() == [0, 4]  # nothing frozen yet
    assert plan.spec.tolist() == [5]
    plan = plan_round(k, root, det, N, first_steps=False)
    assert plan.first_step.numel() == 0 and plan.spec.tolist() == [0, 4, 5]


def test_target_call_segments_come_back_by_name():
    from specdiff_kernels.sampling.ragged_round import TargetCall

    call = TargetCall()
    call.add("a", torch.full((2, 3), 1.0), torch.tensor([4, 5]), torch.tensor([0, 1]))
    call.add(
        "empty",
        torch.zeros(0, 3),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
    )
    call.add("b", torch.full((1, 3), 2.0), torch.tensor([7]), torch.tensor([9]))
    seen = []

    def evaluate(x, k, rows):
        seen.append((x.shape[0], k.tolist(), rows.tolist()))
        return x * 10 + k[:, None]

    out = call.run(evaluate)
    assert seen == [(3, [4, 5, 7], [0, 1, 9])]  # one call
    assert out["a"].tolist() == [[14.0] * 3, [15.0] * 3]
    assert out["empty"].shape == (0, 3)
    assert out["b"].tolist() == [[27.0] * 3]
    empty = TargetCall()
    empty.add(
        "a", torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    )
    assert empty.run(lambda *a: pytest.fail("no call for an empty round"))["a"].shape == (0, 3)


@pytest.mark.parametrize(
    "family",
    [
        "ddpm_eps_clip",
        "ddpm_large_noclip",
        "ddim_eta",
        "ddim_clipped_eps",
        "euler_a",
        "ula",
        "flow_euler",
        "flow_sde",
    ],
)
def test_affine_mean_equals_the_general_formula(family):
    """The ops' table form A clip(p) + E p + G y (the ragged round's draft and target means)
    equals mean_from_x0, in float64, for windows [w, L, *E] with per-position steps."""
    from round_cases import FAMILIES

    from specdiff_kernels.ops.round import affine_mean, seed_tensor
    from specdiff_kernels.sampling.transitions import round_spec

    T = FAMILIES[family]()
    spec = round_spec(T, seed_tensor(0))
    g = torch.Generator().manual_seed(1)
    y = torch.randn(5, 3, 2, 7, generator=g, dtype=torch.float64)
    p = 2 * torch.randn(5, 3, 2, 7, generator=g, dtype=torch.float64)  # |p| > clip often
    k = torch.randint(0, T.num_steps, (5, 3), generator=g)
    torch.testing.assert_close(
        affine_mean(spec, y, p, k), T.mean_from_x0(y, p, k), rtol=1e-10, atol=1e-10
    )


# ----------------------------------------------------------------------- the compact static round
@pytest.mark.parametrize("freeze", ["x0", "eps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_static_round_equals_the_full_round(freeze, dtype):
    """Round by round, the static round that calls the network only on the states it reads
    (compact) and the one that calls it on all B (L + 1) reach the same states, steps, frozen
    values, exact roots and counters; the compact one evaluates fewer states. Exact roots are
    reached (their position 0 then comes from the frozen value: x0, or x0 from eps)."""
    from specdiff_kernels.ops import round as round_ops
    from specdiff_kernels.ops.layout import STAT_LIVE
    from specdiff_kernels.sampling.static_round import StaticRound

    model, T = setup(steps=40)
    B, L = 6, 4
    ids = torch.arange(B, dtype=torch.int64)
    seed = round_ops.seed_tensor(123)
    x = torch.randn(B, D, generator=gen(7), dtype=torch.float64).to(dtype)
    rounds = {
        c: StaticRound(model, T, L, freeze, seed, ids, dtype=dtype, compact=c)
        for c in (False, True)
    }
    s = {c: r.start(x) for c, r in rounds.items()}
    seen_exact = 0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    while int(s[False].stats[STAT_LIVE]) > 0:
        seen_exact += int(s[True].exact.sum())
        s = {c: rounds[c].step(s[c]) for c in s}
        full, compact = s[False], s[True]
        torch.testing.assert_close(compact.x, full.x, rtol=tol, atol=tol)
        torch.testing.assert_close(compact.frozen, full.frozen, rtol=tol, atol=tol)
        assert torch.equal(compact.k, full.k) and torch.equal(compact.exact, full.exact)
        assert torch.equal(compact.stats, full.stats)
    assert seen_exact > 0
    assert rounds[True].target_evals < rounds[False].target_evals

"""Arguments of the library's sampling layer and of the embedded models are refused before any
work, with a ONE-line error that names the argument (TypeError: the wrong kind of value;
ValueError: out of range or inconsistent).

``sample()`` arguments are refused before the model is first called (a counting model proves it); a
model's bad output is refused at its first call. The public constructors (transitions builders,
``GaussianTransitions``, ``models.load`` and ``EmbeddedModel.transitions``) are table-driven: each
case is ``(call, exception type, the name the message must contain)``, the values a new user
tries (0, negative, fractional, bool and string step counts, NaN, typos in option strings,
schedules that are not schedules).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from preamble import ABAR, gen
from refusal import bad_steps, check, one_line, vary

from specdiff_kernels import models
from specdiff_kernels.models.gmm import GMMDenoiser, make_gmm
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.langevin import langevin_transitions
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.transitions import (
    GaussianTransitions,
    alphas_cumprod_from_betas,
    ddim_from_schedule,
    ddim_transitions,
    ddpm_transitions,
    euler_ancestral_from_sigmas,
    euler_ancestral_transitions,
    make_betas,
    respaced_timesteps,
    round_tables,
    stochastic_runs,
)
from specdiff_kernels.sampling.window import AdaptiveWindow

D = 4
STEPS = 20
NAN = math.nan

pytestmark = pytest.mark.usefixtures("single_thread")


class Counting(torch.nn.Module):
    """A GMM denoiser that counts its calls, optionally with its output changed by ``wrap``."""

    def __init__(self, wrap=None):
        super().__init__()
        self.inner = GMMDenoiser(make_gmm(D, K=2, seed=0), ABAR)
        self.wrap = wrap
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        out = self.inner(x, t)
        return out if self.wrap is None else self.wrap(out)


def transitions():
    return ddpm_transitions(ABAR, num_inference_steps=STEPS)


# ----------------------------------------------------------------------------- sample() arguments
SAMPLE_CASES = {
    "duplicate_chain_ids": (
        dict(num_chains=2, event_shape=(D,), chain_ids=[0, 0]),
        ValueError,
        r"^chain_ids must be distinct \(each id seeds one chain's stream\), got 0 twice$",
    ),
    "negative_chain_id": (
        dict(num_chains=2, event_shape=(D,), chain_ids=[0, -1]),
        ValueError,
        r"^chain_ids must be >= 0, got -1$",
    ),
    "float_chain_id": (
        dict(num_chains=2, event_shape=(D,), chain_ids=[0, 1.5]),
        TypeError,
        r"^chain_ids must be integers, got 1.5$",
    ),
    "fractional_num_chains": (
        dict(num_chains=2.7, event_shape=(D,)),
        TypeError,
        r"^num_chains must be a positive int, got 2.7$",
    ),
    "zero_num_chains": (
        dict(num_chains=0, event_shape=(D,)),
        ValueError,
        r"^num_chains must be a positive int, got 0$",
    ),
    "negative_num_chains": (
        dict(num_chains=-3, event_shape=(D,)),
        ValueError,
        r"^num_chains must be a positive int, got -3$",
    ),
    "negative_event_dim": (
        dict(num_chains=2, event_shape=(-1,)),
        ValueError,
        r"^event_shape must be a tuple of positive ints, got \(-1,\)$",
    ),
    "int_generator": (
        dict(num_chains=2, event_shape=(D,), generator=123),
        TypeError,
        r"^generator must be a torch.Generator or None, got int 123",
    ),
    "cuda_without_gpu": (
        dict(num_chains=2, event_shape=(D,), device="cuda"),
        ValueError,
        r"^device='cuda' is not available: torch.cuda.is_available\(\) is False$",
    ),
    "int_dtype": (
        dict(num_chains=2, event_shape=(D,), dtype=torch.int32),
        TypeError,
        r"^dtype must be a floating torch.dtype, got torch.int32$",
    ),
    "integer_x_init": (
        dict(x_init=torch.zeros(3, D, dtype=torch.int64)),
        TypeError,
        r"^x_init must be a floating-point tensor, got dtype torch.int64$",
    ),
    "nan_x_init": (
        dict(x_init=torch.zeros(3, D).index_fill_(0, torch.tensor([1]), float("nan"))),
        ValueError,
        r"^x_init has non-finite values in 1 row\(s\), the first is row 1$",
    ),
    "dtype_other_than_x_init": (
        dict(x_init=torch.zeros(3, D), dtype=torch.float64),
        ValueError,
        r"^dtype=torch.float64 but x_init has dtype torch.float32: leave dtype out",
    ),
    "int_dtype_with_x_init": (
        dict(x_init=torch.zeros(3, D), dtype=torch.int32),
        TypeError,
        r"^dtype must be a floating torch.dtype, got torch.int32$",
    ),
    "device_other_than_x_init": (
        dict(x_init=torch.zeros(3, D), device="cuda"),
        ValueError,
        r"^device='cuda' (is not available|but x_init is on cpu: leave device out)",
    ),
    "meta_x_init": (
        dict(x_init=torch.zeros(3, D, device="meta")),
        ValueError,
        r"^x_init is on the meta device \(a shape without values\)",
    ),
    "meta_device": (
        dict(num_chains=2, event_shape=(D,), device="meta"),
        ValueError,
        r"^device='meta' holds shapes without values",
    ),
    "sparse_x_init": (
        dict(x_init=torch.zeros(3, D).to_sparse()),
        ValueError,
        r"^x_init must be a dense tensor, got layout torch.sparse_coo",
    ),
    "chain_id_beyond_int64": (
        dict(num_chains=2, event_shape=(D,), chain_ids=[0, 2**63]),
        ValueError,
        r"^chain_ids must be in 0..2\*\*32-1 .*, got 9223372036854775808$",
    ),
    "chain_id_beyond_32_bits": (
        dict(num_chains=2, event_shape=(D,), chain_ids=[0, 2**32]),
        ValueError,
        r"^chain_ids must be in 0..2\*\*32-1 .*, got 4294967296$",
    ),
}


@pytest.mark.parametrize("sampler_cls", [SpeculativeSampler, AncestralSampler])
@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_arguments_refused_before_the_model_runs(sampler_cls, case):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    kwargs, exc, match = SAMPLE_CASES[case]
    kwargs = {"generator": gen(0), **kwargs}
    model = Counting()
    with pytest.raises(exc, match=match) as err:
        sampler_cls(model, transitions()).sample(**kwargs)
    one_line(err)
    assert model.calls == 0


@pytest.mark.parametrize("sampler_cls", [SpeculativeSampler, AncestralSampler])
def test_dtype_and_device_with_x_init(sampler_cls):
    """Left out, or x_init's own, they are accepted (the states are x_init's); an x_init that is
    not a tensor is made one of the given dtype."""
    # a fixed window: window='auto' picks windows by measured costs (same law, other samples)
    kw = dict(window=4) if sampler_cls is SpeculativeSampler else {}

    def make():
        return sampler_cls(Counting(), transitions(), **kw)

    x = torch.randn(3, D, generator=gen(0), dtype=torch.float64)
    ref = make().sample(x_init=x, generator=gen(0)).samples
    assert ref.dtype == torch.float64
    same = make().sample(x_init=x, dtype=torch.float64, device="cpu", generator=gen(0))
    assert torch.equal(same.samples, ref)
    listed = make().sample(x_init=x.tolist(), dtype=torch.float64, generator=gen(0))
    assert torch.equal(listed.samples, ref)
    assert make().sample(2, (D,)).samples.dtype == torch.float32


def test_device_other_than_x_init_named():
    """The device check itself, without a second device: an x_init on another device than the
    one given is refused (a GPU run of the case above reaches it through sample())."""
    from specdiff_kernels.sampling.checks import check_matches_x_init

    on_meta = torch.zeros(3, D, device="meta")
    with pytest.raises(
        ValueError,
        match=r"^device='cpu' but x_init is on meta: leave device out \(x_init's is used\) or "
        r"pass x_init.to\('cpu'\)$",
    ) as err:
        check_matches_x_init(on_meta, None, "cpu")
    one_line(err)
    check_matches_x_init(torch.zeros(3, D), torch.float32, "cpu")  # x_init's own: fine
    check_matches_x_init(torch.zeros(3, D), None, None)


def test_draft_model_must_be_callable():
    with pytest.raises(
        TypeError,
        match=r"^draft_model must be a callable network draft_model\(x, t\), got NoneType$",
    ) as err:
        DraftModelDraft(None)
    one_line(err)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_prefetch_root_must_be_a_bool(value):
    with pytest.raises(TypeError, match=r"^prefetch_root must be a bool, got ") as err:
        FrozenTargetDraft(prefetch_root=value)
    one_line(err)
    assert FrozenTargetDraft(prefetch_root=np.bool_(False)).prefetch_root is False
    assert FrozenTargetDraft(prefetch_root=True).prefetch_root is True


def test_verify_fn_must_be_callable():
    with pytest.raises(
        TypeError,
        match=r"^verify_fn must be callable like specdiff_kernels.speculative_verify, got int$",
    ) as err:
        SpeculativeSampler(Counting(), transitions(), verify_fn=3)
    one_line(err)


@pytest.mark.parametrize(
    "wrap,kind",
    [(tuple, "tuple"), (lambda res: None, "NoneType"), (lambda res: res.num_accepted, "Tensor")],
)
def test_verify_fn_result_checked(wrap, kind):
    """A verify_fn whose result is not a VerifyResult is named at its first use, not met as an
    AttributeError deep in the round; a plain function returning the op's result is fine."""
    from specdiff_kernels.ops import speculative_verify

    def bad(*args, **kwargs):
        return wrap(speculative_verify(*args, **kwargs))

    with pytest.raises(
        TypeError, match=rf"^verify_fn returned {kind}, which has no tensor 'num_accepted'"
    ) as err:
        SpeculativeSampler(Counting(), transitions(), verify_fn=bad).sample(
            2, (D,), generator=gen(0)
        )
    one_line(err)

    def good(*args, **kwargs):
        return speculative_verify(*args, **kwargs)

    a = SpeculativeSampler(Counting(), transitions(), window=4, verify_fn=good).sample(
        2, (D,), generator=gen(0)
    )
    b = SpeculativeSampler(Counting(), transitions(), window=4, path="ragged").sample(
        2, (D,), generator=gen(0)
    )
    assert torch.equal(a.samples, b.samples)


def test_window_true_is_not_a_window_of_one():
    with pytest.raises(
        TypeError,
        match=r"^window must be 'auto', an int >= 1, 'adaptive' or an "
        r"AdaptiveWindow, got True$",
    ):
        SpeculativeSampler(Counting(), transitions(), window=True)
    with pytest.raises(TypeError, match=r"^max_window must be a positive int, got 8.5$"):
        AdaptiveWindow(max_window=8.5)


@pytest.mark.parametrize(
    "kwargs",
    [dict(path="ragged"), dict(draft=DraftModelDraft(Counting())), dict(window="adaptive")],
)
def test_compile_refused_where_the_ragged_round_runs(kwargs):
    """compile=True applies to the static round only: with the ragged round it would be ignored."""
    with pytest.raises(
        ValueError,
        match=r"^compile=True compiles the static round, but this "
        r"sampler runs the ragged round",
    ):
        SpeculativeSampler(Counting(), transitions(), compile=True, **kwargs)
    SpeculativeSampler(Counting(), transitions(), compile=False, **kwargs)  # eager is fine


def test_window_longer_than_the_schedule_is_clamped():
    """window=10000 on 20 DDPM steps (19 stochastic, then the deterministic t = 0 step): the
    buffers are those of a 19-step window and the samples those of window=19."""
    T = transitions()
    huge = SpeculativeSampler(Counting(), T, window=10_000)
    assert huge.window == STEPS - 1
    a = huge.sample(3, (D,), generator=gen(0))
    b = SpeculativeSampler(Counting(), T, window=STEPS - 1).sample(3, (D,), generator=gen(0))
    assert a.stats.window == STEPS - 1
    assert torch.equal(a.samples, b.samples)
    adaptive = SpeculativeSampler(Counting(), T, window=AdaptiveWindow(max_window=64))
    assert adaptive.window == STEPS - 1


# ----------------------------------------------------------------------------- model outputs
class Output:
    """What a diffusers model returns: an object with the tensor in ``.sample``."""

    def __init__(self, sample):
        self.sample = sample


MODEL_CASES = {
    "tuple": (
        lambda out: (out,),
        TypeError,
        r"^target model returned tuple instead of a tensor: .*model\(x, t\)\[0\]\)$",
    ),
    "output_object": (
        Output,
        TypeError,
        r"^target model returned Output instead of a tensor: .*DiffusersModel\)$",
    ),
    "float64": (
        lambda out: out.double(),
        TypeError,
        r"^target model returned dtype torch.float64 for a torch.float32 input",
    ),
}


@pytest.mark.parametrize("sampler_cls", [SpeculativeSampler, AncestralSampler])
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_output_refused_at_its_first_call(sampler_cls, case):
    wrap, exc, match = MODEL_CASES[case]
    model = Counting(wrap)
    with pytest.raises(exc, match=match) as err:
        sampler_cls(model, transitions()).sample(2, (D,), generator=gen(0))
    one_line(err)
    assert model.calls == 1


def test_bad_draft_model_output_is_named_draft():
    draft = Counting(lambda out: out.double())
    with pytest.raises(TypeError, match=r"^draft model returned dtype torch.float64") as err:
        SpeculativeSampler(Counting(), transitions(), DraftModelDraft(draft)).sample(
            2, (D,), generator=gen(0)
        )
    one_line(err)
    assert draft.calls == 1


# ----------------------------------------------------------------------------- transitions
@pytest.mark.parametrize(
    "builder", [ddpm_transitions, ddim_transitions, euler_ancestral_transitions]
)
@pytest.mark.parametrize(
    "n,exc,match",
    [
        (0, ValueError, r"^num_inference_steps must be an int in 1..1000, got 0$"),
        (-5, ValueError, r"^num_inference_steps must be an int in 1..1000, got -5$"),
        (1001, ValueError, r"^num_inference_steps must be an int in 1..1000, got 1001$"),
        (2.5, TypeError, r"^num_inference_steps must be an int in 1..1000, got 2.5$"),
    ],
)
def test_num_inference_steps_checked(builder, n, exc, match):
    with pytest.raises(exc, match=match) as err:
        builder(ABAR, num_inference_steps=n)
    one_line(err)


def test_ddim_negative_eta():
    with pytest.raises(ValueError, match=r"^eta must be a finite number in \[0, 1\], got -0.5$"):
        ddim_transitions(ABAR, num_inference_steps=10, eta=-0.5)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_ancestral"])
def test_embedded_model_transitions_refuse_eta(sampler):
    from specdiff_kernels import models

    with pytest.raises(TypeError, match="unexpected keyword argument 'eta'") as err:
        models.load("gmm", dim=2).transitions(10, sampler, eta=0.5)
    one_line(err)


# ----------------------------------------------------------------------------- the constructors
N3 = dict(timesteps=[20, 10, 0], c_x0=[0.1] * 3, c_x=[0.9] * 3, std=[0.1, 0.1, 0.0])
VP3 = dict(model_alpha=[0.5] * 3, model_sigma=[0.75**0.5] * 3)


def gt(**overrides):
    """GaussianTransitions over three valid steps, with some arguments replaced."""
    kw = {**N3, **VP3, **overrides}
    args = [kw.pop(k) for k in ("timesteps", "c_x0", "c_x", "std", "model_alpha", "model_sigma")]
    return GaussianTransitions(*args, **kw)


@functools.lru_cache(maxsize=None)
def gmm():
    return models.load("gmm", dim=2, components=2)


def abar_with(index, value):
    a = ABAR.clone()
    a[index] = value
    return a


CASES = {
    # Langevin's chain: a step count is an int (2.5 was truncated to 2, True meant 1)
    "langevin_steps_float": (
        lambda: langevin_transitions(0.1, num_steps=2.5),
        TypeError,
        "num_steps",
    ),
    "langevin_steps_bool": (
        lambda: langevin_transitions(0.1, num_steps=True),
        TypeError,
        "num_steps",
    ),
    "langevin_steps_str": (
        lambda: langevin_transitions(0.1, num_steps="5"),
        TypeError,
        "num_steps",
    ),
    "langevin_init_std_str": (
        lambda: langevin_transitions(0.1, num_steps=5, init_std="2"),
        TypeError,
        "init_std",
    ),
    # DDIM's eta above 1: the step's variance can exceed 1 - abar_prev (no real direction term)
    "ddim_eta_above_1": (
        lambda: ddim_transitions(ABAR, num_inference_steps=20, eta=1.5),
        ValueError,
        "eta",
    ),
    # make_betas
    "make_betas_schedule_typo": (lambda: make_betas("bogus"), ValueError, "schedule"),
    "make_betas_schedule_int": (lambda: make_betas(3), TypeError, "schedule"),
    "make_betas_T_0": (
        lambda: make_betas(num_train_timesteps=0),
        ValueError,
        "num_train_timesteps",
    ),
    "make_betas_T_neg": (
        lambda: make_betas(num_train_timesteps=-1),
        ValueError,
        "num_train_timesteps",
    ),
    "make_betas_T_float": (
        lambda: make_betas(num_train_timesteps=2.5),
        TypeError,
        "num_train_timesteps",
    ),
    "make_betas_T_bool": (
        lambda: make_betas(num_train_timesteps=True),
        TypeError,
        "num_train_timesteps",
    ),
    "make_betas_T_str": (
        lambda: make_betas(num_train_timesteps="1000"),
        TypeError,
        "num_train_timesteps",
    ),
    "make_betas_start_neg": (lambda: make_betas(beta_start=-0.1), ValueError, "beta_start"),
    "make_betas_start_0": (lambda: make_betas(beta_start=0.0), ValueError, "beta_start"),
    "make_betas_start_nan": (lambda: make_betas(beta_start=NAN), ValueError, "beta_start"),
    "make_betas_end_1": (lambda: make_betas(beta_end=1.0), ValueError, "beta_end"),
    "make_betas_end_str": (lambda: make_betas(beta_end="0.02"), TypeError, "beta_end"),
    "make_betas_scaled_end_nan": (
        lambda: make_betas("scaled_linear", beta_end=NAN),
        ValueError,
        "beta_end",
    ),
    # alphas_cumprod_from_betas
    **vary(
        "betas",
        alphas_cumprod_from_betas,
        "betas",
        nan=([0.1, NAN], ValueError),
        neg=([-0.1, 0.1], ValueError),
        **{"1": ([0.5, 1.0], ValueError), "2d": ([[0.1, 0.2]], ValueError)},
        empty=([], ValueError),
        str=("0.1", TypeError),
    ),
    # respaced_timesteps
    "respaced_spacing_typo": (lambda: respaced_timesteps(1000, 10, "bogus"), ValueError, "spacing"),
    "respaced_T_0": (lambda: respaced_timesteps(0, 10), ValueError, "num_train_timesteps"),
    "respaced_offset_neg": (
        lambda: respaced_timesteps(1000, 10, steps_offset=-1),
        ValueError,
        "steps_offset",
    ),
    "respaced_offset_float": (
        lambda: respaced_timesteps(1000, 10, steps_offset=1.5),
        TypeError,
        "steps_offset",
    ),
    "respaced_offset_past_T": (
        lambda: respaced_timesteps(1000, 10, steps_offset=100),
        ValueError,
        "steps_offset",
    ),
    **bad_steps("respaced_n", lambda n: respaced_timesteps(1000, n)),
    # ddpm_transitions
    **bad_steps("ddpm_n", lambda n: ddpm_transitions(ABAR, num_inference_steps=n)),
    "ddpm_prediction_typo": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, prediction="eps"),
        ValueError,
        "prediction",
    ),
    "ddpm_prediction_none": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, prediction=None),
        TypeError,
        "prediction",
    ),
    "ddpm_variance_typo": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, variance="small"),
        ValueError,
        "variance",
    ),
    **vary(
        "ddpm_clip",
        lambda c: ddpm_transitions(ABAR, num_inference_steps=10, clip_sample=c),
        "clip_sample",
        **{"0": (0, ValueError), "neg": (-1.0, ValueError), "nan": (NAN, ValueError)},
        str=("1.0", TypeError),
        bool=(True, TypeError),
    ),
    "ddpm_abar_nan": (
        lambda: ddpm_transitions(abar_with(5, NAN), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_increasing": (
        lambda: ddpm_transitions(ABAR.flip(0), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_above_1": (
        lambda: ddpm_transitions(abar_with(0, 1.5), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_0": (
        lambda: ddpm_transitions(abar_with(-1, 0.0), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_2d": (
        lambda: ddpm_transitions(ABAR[None], num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "ddpm_abar_str": (
        lambda: ddpm_transitions("abc", num_inference_steps=10),
        TypeError,
        "alphas_cumprod",
    ),
    "ddpm_abar_and_betas": (
        lambda: ddpm_transitions(ABAR, betas=make_betas(), num_inference_steps=10),
        ValueError,
        "betas",
    ),
    "ddpm_betas_nan": (
        lambda: ddpm_transitions(betas=[0.1, NAN, 0.2], num_inference_steps=2),
        ValueError,
        "betas",
    ),
    "ddpm_betas_1": (
        lambda: ddpm_transitions(betas=[0.1, 1.0, 0.2], num_inference_steps=2),
        ValueError,
        "betas",
    ),
    "ddpm_timesteps_and_n": (
        lambda: ddpm_transitions(ABAR, timesteps=[9, 5, 0], num_inference_steps=10),
        ValueError,
        "timesteps",
    ),
    "ddpm_timesteps_float": (
        lambda: ddpm_transitions(ABAR, timesteps=[9.5, 5, 0]),
        TypeError,
        "timesteps",
    ),
    "ddpm_timesteps_past_T": (
        lambda: ddpm_transitions(ABAR, timesteps=[1000, 5, 0]),
        ValueError,
        "timesteps",
    ),
    "ddpm_timesteps_increasing": (
        lambda: ddpm_transitions(ABAR, timesteps=[0, 5, 9]),
        ValueError,
        "timesteps",
    ),
    "ddpm_timesteps_empty": (lambda: ddpm_transitions(ABAR, timesteps=[]), ValueError, "timesteps"),
    "ddpm_timesteps_2d": (
        lambda: ddpm_transitions(ABAR, timesteps=[[9, 5, 0]]),
        ValueError,
        "timesteps",
    ),
    "ddpm_spacing_typo": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, spacing="bogus"),
        ValueError,
        "spacing",
    ),
    "ddpm_offset_neg": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, steps_offset=-1),
        ValueError,
        "steps_offset",
    ),
    "ddpm_offset_bool": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, steps_offset=True),
        TypeError,
        "steps_offset",
    ),
    "ddpm_offset_ignored_by_linspace": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, spacing="linspace", steps_offset=1),
        ValueError,
        "steps_offset",
    ),
    "ddpm_offset_without_respacing": (
        lambda: ddpm_transitions(ABAR, steps_offset=1),
        ValueError,
        "steps_offset",
    ),
    "euler_offset_ignored_by_trailing": (
        lambda: euler_ancestral_transitions(ABAR, spacing="trailing", steps_offset=1),
        ValueError,
        "steps_offset",
    ),
    "ddpm_offset_past_T": (
        lambda: ddpm_transitions(ABAR, num_inference_steps=10, steps_offset=100),
        ValueError,
        "steps_offset",
    ),
    # ddim_transitions
    **bad_steps("ddim_n", lambda n: ddim_transitions(ABAR, num_inference_steps=n)),
    "ddim_n_none": (
        lambda: ddim_transitions(ABAR, num_inference_steps=None),
        TypeError,
        "num_inference_steps",
    ),
    **vary(
        "ddim_eta",
        lambda eta: ddim_transitions(ABAR, eta=eta),
        "eta",
        neg=(-1.0, ValueError),
        nan=(NAN, ValueError),
        inf=(math.inf, ValueError),
        str=("0.5", TypeError),
        bool=(True, TypeError),
        none=(None, TypeError),
    ),
    "ddim_set_alpha_str": (
        lambda: ddim_transitions(ABAR, set_alpha_to_one="no"),
        TypeError,
        "set_alpha_to_one",
    ),
    "ddim_clipped_output_str": (
        lambda: ddim_transitions(ABAR, use_clipped_model_output="yes"),
        TypeError,
        "use_clipped_model_output",
    ),
    "ddim_clipped_output_without_clip": (
        lambda: ddim_transitions(ABAR, use_clipped_model_output=True),
        ValueError,
        "use_clipped_model_output",
    ),
    "ddim_prediction_typo": (
        lambda: ddim_transitions(ABAR, prediction="v"),
        ValueError,
        "prediction",
    ),
    "ddim_clip_0": (lambda: ddim_transitions(ABAR, clip_sample=0.0), ValueError, "clip_sample"),
    "ddim_spacing_typo": (lambda: ddim_transitions(ABAR, spacing="linear"), ValueError, "spacing"),
    "ddim_abar_and_betas": (
        lambda: ddim_transitions(ABAR, betas=make_betas()),
        ValueError,
        "betas",
    ),
    "ddim_abar_increasing": (lambda: ddim_transitions(ABAR.flip(0)), ValueError, "alphas_cumprod"),
    # euler_ancestral_transitions
    **bad_steps("euler_n", lambda n: euler_ancestral_transitions(ABAR, num_inference_steps=n)),
    **vary(
        "euler_init_std",
        lambda s: euler_ancestral_transitions(ABAR, init_std=s),
        "init_std",
        **{"0": (0.0, ValueError)},
        nan=(NAN, ValueError),
        str=("1", TypeError),
    ),
    "euler_spacing_typo": (
        lambda: euler_ancestral_transitions(ABAR, spacing="bogus"),
        ValueError,
        "spacing",
    ),
    "euler_prediction_typo": (
        lambda: euler_ancestral_transitions(ABAR, prediction="eps"),
        ValueError,
        "prediction",
    ),
    "euler_offset_past_T": (
        lambda: euler_ancestral_transitions(
            ABAR, num_inference_steps=10, spacing="leading", steps_offset=200
        ),
        ValueError,
        "steps_offset",
    ),
    "euler_abar_nan": (
        lambda: euler_ancestral_transitions(abar_with(3, NAN)),
        ValueError,
        "alphas_cumprod",
    ),
    "euler_abar_and_betas": (
        lambda: euler_ancestral_transitions(ABAR, betas=make_betas()),
        ValueError,
        "betas",
    ),
    # GaussianTransitions
    "gt_prediction_typo": (lambda: gt(prediction="eps"), ValueError, "prediction"),
    "gt_clip_0": (lambda: gt(clip_sample=0.0), ValueError, "clip_sample"),
    "gt_clip_str": (lambda: gt(clip_sample="1"), TypeError, "clip_sample"),
    **vary(
        "gt_init_std",
        lambda s: gt(init_std=s),
        "init_std",
        neg=(-1.0, ValueError),
        inf=(math.inf, ValueError),
        nan=(NAN, ValueError),
        none=(None, TypeError),
    ),
    "gt_std_neg": (lambda: gt(std=[0.1, -0.1, 0.0]), ValueError, "std"),
    "gt_table_length": (lambda: gt(c_x0=[0.1, 0.1]), ValueError, "c_x0"),
    "gt_table_2d": (lambda: gt(c_x=[[0.9], [0.9], [0.9]]), ValueError, "c_x"),
    "gt_table_str": (lambda: gt(c_x="abc"), TypeError, "c_x"),
    "gt_table_nan": (lambda: gt(c_eps=[0.0, NAN, 0.0]), ValueError, "c_eps"),
    "gt_table_meta": (lambda: gt(c_x=torch.ones(3, device="meta")), ValueError, "c_x"),
    "ddpm_abar_meta": (
        lambda: ddpm_transitions(ABAR.to("meta"), num_inference_steps=10),
        ValueError,
        "alphas_cumprod",
    ),
    "gt_model_sigma_neg": (lambda: gt(model_sigma=[-0.5] * 3), ValueError, "model_sigma"),
    "gt_model_alpha_0": (lambda: gt(model_alpha=[0.0] * 3), ValueError, "model_alpha"),
    "gt_input_scale_0": (lambda: gt(input_scale=[0.0] * 3), ValueError, "input_scale"),
    "gt_timesteps_nan": (lambda: gt(timesteps=[20.0, NAN, 0.0]), ValueError, "timesteps"),
    "gt_timesteps_2d": (lambda: gt(timesteps=[[20, 10, 0]]), ValueError, "timesteps"),
    "gt_timesteps_str": (lambda: gt(timesteps="abc"), TypeError, "timesteps"),
    "gt_timesteps_empty": (lambda: gt(timesteps=[]), ValueError, "timesteps"),
    "gt_eps_from_clipped_str": (
        lambda: gt(eps_from_clipped_x0="yes"),
        TypeError,
        "eps_from_clipped_x0",
    ),
    "gt_name_int": (lambda: gt(name=3), TypeError, "name"),
    # the shared builders the adapter uses
    "ddim_schedule_step_ratio_0": (
        lambda: ddim_from_schedule(ABAR, [900, 0], 0, 1.0, eta=1.0, name="d"),
        ValueError,
        "step_ratio",
    ),
    "ddim_schedule_final_0": (
        lambda: ddim_from_schedule(ABAR, [900, 0], 100, 0.0, eta=1.0, name="d"),
        ValueError,
        "final_alpha_cumprod",
    ),
    "ddim_schedule_final_above_1": (
        lambda: ddim_from_schedule(ABAR, [900, 0], 100, 1.5, eta=1.0, name="d"),
        ValueError,
        "final_alpha_cumprod",
    ),
    "ddim_schedule_timesteps_past_T": (
        lambda: ddim_from_schedule(ABAR, [1000, 0], 100, 1.0, eta=1.0, name="d"),
        ValueError,
        "timesteps",
    ),
    "ddim_schedule_eta_str": (
        lambda: ddim_from_schedule(ABAR, [900, 0], 100, 1.0, eta="1", name="d"),
        TypeError,
        "eta",
    ),
    "euler_sigmas_length": (
        lambda: euler_ancestral_from_sigmas(
            [10.0, 5.0], [3.0, 1.0], prediction="epsilon", init_std=3.0, name="e"
        ),
        ValueError,
        "sigmas",
    ),
    "euler_sigmas_neg": (
        lambda: euler_ancestral_from_sigmas(
            [10.0, 5.0], [3.0, -1.0, 0.0], prediction="epsilon", init_std=3.0, name="e"
        ),
        ValueError,
        "sigmas",
    ),
    "euler_sigmas_nan": (
        lambda: euler_ancestral_from_sigmas(
            [10.0, 5.0], [3.0, NAN, 0.0], prediction="epsilon", init_std=3.0, name="e"
        ),
        ValueError,
        "sigmas",
    ),
    "round_tables_not_transitions": (lambda: round_tables("ddpm"), TypeError, "transitions"),
    "stochastic_runs_not_transitions": (lambda: stochastic_runs(None), TypeError, "transitions"),
    # models.load and EmbeddedModel.transitions
    "load_unknown": (lambda: models.load("nope"), ValueError, "name"),
    "load_name_int": (lambda: models.load(3), TypeError, "name"),
    "load_name_list": (lambda: models.load(["gmm"]), TypeError, "name"),
    **vary(
        "load_gmm_dim",
        lambda dim: models.load("gmm", dim=dim),
        "dim",
        **{"0": (0, ValueError)},
        neg=(-1, ValueError),
        float=(2.5, TypeError),
        bool=(True, TypeError),
        str=("64", TypeError),
    ),
    "load_gmm_components_0": (
        lambda: models.load("gmm", dim=2, components=0),
        ValueError,
        "components",
    ),
    "load_gmm_components_float": (
        lambda: models.load("gmm", dim=2, components=2.5),
        TypeError,
        "components",
    ),
    "load_gmm_seed_float": (lambda: models.load("gmm", dim=2, seed=0.5), TypeError, "seed"),
    "load_gmm_seed_neg": (lambda: models.load("gmm", dim=2, seed=-1), ValueError, "seed"),
    "load_gmm_unknown_kwarg": (lambda: models.load("gmm", dimension=3), TypeError, "dimension"),
    "load_gmm_device": (lambda: models.load("gmm", dim=2, device="cpu"), TypeError, "device"),
    "load_digits_dim": (lambda: models.load("digits", dim=3), TypeError, "dim"),
    "load_digits_dtype_str": (lambda: models.load("digits", dtype="float32"), TypeError, "dtype"),
    "load_digits_dtype_int": (
        lambda: models.load("digits", dtype=torch.int64),
        ValueError,
        "dtype",
    ),
    "load_digits_device_typo": (lambda: models.load("digits", device="gpu0"), ValueError, "device"),
    "load_digits_device_int_type": (lambda: models.load("digits", device=1.5), TypeError, "device"),
    **bad_steps("model_steps", lambda n: gmm().transitions(n), "num_steps"),
    "model_sampler_typo": (lambda: gmm().transitions(10, "euler"), ValueError, "sampler"),
    "model_sampler_int": (lambda: gmm().transitions(10, 1), TypeError, "sampler"),
    "model_eta_on_ddpm": (lambda: gmm().transitions(10, "ddpm", eta=0.5), TypeError, "eta"),
    "model_betas": (lambda: gmm().transitions(10, "ddpm", betas=make_betas()), TypeError, "betas"),
    "model_timesteps": (
        lambda: gmm().transitions(10, "ddpm", timesteps=[5, 0]),
        TypeError,
        "timesteps",
    ),
    "model_prediction": (
        lambda: gmm().transitions(10, "ddim", prediction="sample"),
        TypeError,
        "prediction",
    ),
    "model_unknown_kwarg": (
        lambda: gmm().transitions(10, "euler_ancestral", bogus=1),
        TypeError,
        "bogus",
    ),
    "model_ddim_eta_nan": (lambda: gmm().transitions(10, "ddim", eta=NAN), ValueError, "eta"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_naming_the_argument(case):
    check(*CASES[case])


def test_digits_refused_before_its_weights_load(monkeypatch):
    from specdiff_kernels.models import digits

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(digits, "load_digits_target", no_load)
    monkeypatch.setattr(digits, "load_digits_draft", no_load)
    check(lambda: models.load("digits", dim=3), TypeError, "dim")
    check(lambda: models.load("digits", dtype=torch.int32), ValueError, "dtype")


def test_valid_input_still_builds():
    """The checks refuse only what is wrong: each builder's defaults and the edge values the
    checks sit next to (one step, T steps, eta 0, infinite clip, the largest steps_offset)."""
    assert ddpm_transitions(ABAR, num_inference_steps=1).num_steps == 1
    assert ddpm_transitions(ABAR, num_inference_steps=1000).num_steps == 1000
    assert ddpm_transitions(ABAR, num_inference_steps=10, steps_offset=99).timesteps[0] == 999
    assert (
        ddpm_transitions(ABAR, num_inference_steps=10, clip_sample=math.inf).clip_sample == math.inf
    )
    assert ddpm_transitions(betas=make_betas("cosine", 50), num_inference_steps=5).num_steps == 5
    assert bool(ddim_transitions(ABAR, eta=0).deterministic.all())
    assert ddim_transitions(ABAR, eta=1).init_std == 1.0
    assert euler_ancestral_transitions(num_inference_steps=3, init_std=2).init_std == 2.0
    assert gt(timesteps=torch.tensor([20.5, 10.0, 0.0])).timesteps.dtype == torch.float64
    assert gt(init_std=0).init_std == 0.0  # a fixed start at the origin (Langevin)
    assert gt(clip_sample=torch.tensor(2.0), eps_from_clipped_x0=True).clip_sample == 2.0
    assert gmm().transitions(5, "ddim", eta=0.5, spacing="trailing").num_steps == 5
    assert models.load("gmm", dim=3, components=1, seed=7).event_shape == (3,)

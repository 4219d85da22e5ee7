"""Bad input is refused before any work, with a one-line error that names the argument.

Library: ``sample()`` arguments are refused before the model is first called (a counting model
proves it); a model's bad output is refused at its first call. CLI: argparse's ``error: argument
--flag: ...`` with exit code 2 and no traceback, before anything is sampled (the samplers are
replaced by ones that fail the test if they run).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from specdiff_kernels.cli import commands as cli
from specdiff_kernels.models.gmm import GMMDenoiser, make_gmm
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.transitions import (
    alphas_cumprod_from_betas,
    ddim_transitions,
    ddpm_transitions,
    euler_ancestral_transitions,
    make_betas,
)
from specdiff_kernels.sampling.window import AdaptiveWindow

ABAR = alphas_cumprod_from_betas(make_betas())
D = 4
STEPS = 20

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


def gen():
    return torch.Generator().manual_seed(0)


def transitions():
    return ddpm_transitions(ABAR, num_inference_steps=STEPS)


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


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
    kwargs = {"generator": gen(), **kwargs}
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

    x = torch.randn(3, D, generator=gen(), dtype=torch.float64)
    ref = make().sample(x_init=x, generator=gen()).samples
    assert ref.dtype == torch.float64
    same = make().sample(x_init=x, dtype=torch.float64, device="cpu", generator=gen())
    assert torch.equal(same.samples, ref)
    listed = make().sample(x_init=x.tolist(), dtype=torch.float64, generator=gen())
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
            2, (D,), generator=gen()
        )
    one_line(err)

    def good(*args, **kwargs):
        return speculative_verify(*args, **kwargs)

    a = SpeculativeSampler(Counting(), transitions(), window=4, verify_fn=good).sample(
        2, (D,), generator=gen()
    )
    b = SpeculativeSampler(Counting(), transitions(), window=4, path="ragged").sample(
        2, (D,), generator=gen()
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
    a = huge.sample(3, (D,), generator=gen())
    b = SpeculativeSampler(Counting(), T, window=STEPS - 1).sample(3, (D,), generator=gen())
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
        sampler_cls(model, transitions()).sample(2, (D,), generator=gen())
    one_line(err)
    assert model.calls == 1


def test_bad_draft_model_output_is_named_draft():
    draft = Counting(lambda out: out.double())
    with pytest.raises(TypeError, match=r"^draft model returned dtype torch.float64") as err:
        SpeculativeSampler(Counting(), transitions(), DraftModelDraft(draft)).sample(
            2, (D,), generator=gen()
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


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_eta_refused_where_it_does_not_apply(scheduler):
    diffusers = pytest.importorskip("diffusers")
    from specdiff_kernels.integrations.diffusers import diffusers_transitions, from_pipeline

    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000)
    with pytest.raises(
        ValueError, match=rf"^eta applies to DDIMScheduler only, not to {scheduler}$"
    ):
        diffusers_transitions(sched, 10, eta=0.5)
    with pytest.raises(ValueError, match="^use_clipped_model_output applies to DDIMScheduler only"):
        diffusers_transitions(sched, 10, use_clipped_model_output=True)

    class Pipe:
        unet = torch.nn.Identity()
        scheduler = sched

    with pytest.raises(ValueError, match="^eta applies to DDIMScheduler only"):
        from_pipeline(Pipe(), 10, eta=0.5)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture
def no_sampling(monkeypatch):
    """Any sampling fails the test: the CLI must refuse before it starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(AncestralSampler, "sample", refuse)
    monkeypatch.setattr(SpeculativeSampler, "sample", refuse)


def cli_error(argv, capsys, entry=cli.main) -> str:
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines and "Traceback" not in captured.err
    return lines[-1]


DEMO_CASES = [
    (["--batch", "0"], "argument --batch: must be a positive integer, got 0"),
    (["--batch", "-4"], "argument --batch: must be a positive integer, got -4"),
    (["--steps", "-5"], "argument --steps: must be a positive integer, got -5"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (
        ["--steps", "5000"],
        "argument --steps: must be at most 1000 (the model's training timesteps), got 5000",
    ),
    (["--seed", "-1"], "argument --seed: must be an integer in 0..2^63-1, got -1"),
    (["--model", "gmm", "--dim", "0"], "argument --dim: must be a positive integer, got 0"),
    (
        ["--model", "digits", "--dim", "5"],
        "argument --dim: does not apply to --model digits (only to gmm, langevin)",
    ),
    (
        ["--model", "langevin", "--dim", "1"],
        "argument --dim: the langevin banana target needs at least 2 dimensions, got 1",
    ),
    (
        ["--backend", "nonsense"],
        "argument --backend: backend must be one of ['cpp', 'reference', 'triton'], got 'nonsense'",
    ),
    (
        ["--model", "langevin", "--backend", "nonsense"],
        "argument --backend: backend must be one of ['cpp', 'reference', 'triton'], got 'nonsense'",
    ),
    (
        ["--model", "langevin", "--draft", "model", "--backend", "nonsense"],
        "argument --draft: does not apply to --model langevin (only to digits, gmm)",
    ),
    (
        ["--model", "gmm", "--step-size", "0.1"],
        "argument --step-size: does not apply to --model gmm (only to langevin)",
    ),
    (
        ["--model", "langevin", "--step-size", "-0.1"],
        "argument --step-size: must be a positive number, got -0.1",
    ),
    (["--window", "10000"], "argument --window: must be at most --steps (200), got 10000"),
    (
        ["--window", "0"],
        "argument --window: must be 'auto', a positive integer or 'adaptive', got 0",
    ),
    (
        ["--window", "True"],
        "argument --window: must be 'auto', a positive integer or 'adaptive', got 'True'",
    ),
]


@pytest.mark.parametrize("argv,message", DEMO_CASES, ids=[" ".join(a) for a, _ in DEMO_CASES])
def test_demo_refuses_before_sampling(argv, message, capsys, no_sampling, tmp_path):
    last = cli_error(["demo", *argv, "--out", str(tmp_path), "--no-progress"], capsys)
    assert last == f"specdiff demo: error: {message}"


def test_demo_out_that_is_a_file(capsys, no_sampling, tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    assert cli_error(["demo", "--out", str(f)], capsys) == (
        f"specdiff demo: error: argument --out: {str(f)!r} exists and is not a directory"
    )
    assert cli_error(["demo", "--out", str(f / "sub")], capsys) == (
        f"specdiff demo: error: argument --out: cannot make {str(f / 'sub')!r}: {str(f)!r} is "
        "not a directory"
    )


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses /sys, which no one may write"
)
def test_demo_out_not_writable(capsys, no_sampling):
    assert cli_error(["demo", "--out", "/sys/specdiff_out"], capsys).startswith(
        "specdiff demo: error: argument --out: cannot write to '/sys/specdiff_out': "
    )


def test_demo_backend_not_on_this_device(capsys, no_sampling, tmp_path, monkeypatch):
    from specdiff_kernels.ops.backends import REGISTRY as reg

    monkeypatch.setattr(
        reg, "_backends", {k: v for k, v in reg._backends.items() if k != ("verify", "triton")}
    )
    monkeypatch.setitem(reg._lazy, ("verify", "triton"), "specdiff_kernels._no_such_module")
    last = cli_error(["demo", "--backend", "triton", "--out", str(tmp_path)], capsys)
    assert last.startswith(
        "specdiff demo: error: argument --backend: backend 'triton' is not available"
    )


def test_demo_error_in_a_real_process(tmp_path):
    """The installed command: exit code 2, usage + one error line on stderr, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "specdiff_kernels",
            "demo",
            "--model",
            "langevin",
            "--draft",
            "model",
            "--backend",
            "nonsense",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "specdiff demo: error: argument --draft: does not apply to --model langevin (only to digits, gmm)"
    )


DIST_CASES = [
    (["--chains", "0"], "argument --chains: must be a positive integer, got 0"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--dim", "0"], "argument --dim: must be a positive integer, got 0"),
    (["--seed", "-1"], "argument --seed: must be an integer in 0..2^63-1, got -1"),
    (
        ["--window", "x"],
        "argument --window: must be 'auto', a positive integer or 'adaptive', got 'x'",
    ),
    (["--window", "300"], "argument --window: must be at most --steps (200), got 300"),
    (
        ["--model", "digits", "--dim", "8"],
        "argument --dim: does not apply to --model digits (only to gmm, banana)",
    ),
    (
        ["--model", "gmm", "--step-size", "0.1"],
        "argument --step-size: does not apply to --model gmm (only to banana)",
    ),
    (
        ["--model", "banana", "--dim", "1"],
        "argument --dim: the banana target needs at least 2 dimensions, got 1",
    ),
]


@pytest.mark.parametrize("argv,message", DIST_CASES, ids=[" ".join(a) for a, _ in DIST_CASES])
def test_distributed_refuses_before_sampling(argv, message, capsys, no_sampling):
    last = cli_error(argv, capsys, entry=cli.distributed_main)
    assert last == f"python -m specdiff_kernels.cli.distributed: error: {message}"


def test_distributed_out_checks(capsys, no_sampling, tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    assert cli_error(["--out", str(tmp_path)], capsys, entry=cli.distributed_main).endswith(
        f"argument --out: {str(tmp_path)!r} is a directory"
    )
    assert cli_error(["--per-rank-dir", str(f)], capsys, entry=cli.distributed_main).endswith(
        f"argument --per-rank-dir: {str(f)!r} exists and is not a directory"
    )
    assert cli_error(
        ["--out", str(f), "--per-rank-dir", str(tmp_path)], capsys, entry=cli.distributed_main
    ).endswith("argument --out: not allowed with --per-rank-dir (ranks then write their own files)")

"""``specdiff sample`` refuses what it cannot run before any weight loads, in ONE line that names
the argument and says why, exit code 2 (issue 27): a flow-matching pipeline folder, with or
without ``--scheduler``; a scheduler without a discrete beta (VP) training schedule; a
``--scheduler`` override whose training schedule or prediction type would differ from the
folder's own (the override inherits them from the folder's config where its class can); a
transformer folder.

Tiny random pipeline folders written by diffusers' ``save_pretrained`` (no downloads).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra")
import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from refusal import cli_error as command_error  # noqa: E402
from refusal import one_line  # noqa: E402
from tiny_diffusers import SIZE, tiny_dit  # noqa: E402

from specdiff_kernels.cli import sample as sample_cmd  # noqa: E402
from specdiff_kernels.integrations.diffusers import diffusers_transitions  # noqa: E402
from specdiff_kernels.sampling.families import family  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULER_FLAGS = ["ddpm", "ddim", "euler-a", "dpm++2m-sde"]


def cli_error(argv, capsys) -> str:
    """specdiff sample's one-line argument error, naming an argument."""
    last = command_error(argv, capsys)
    assert last.startswith("specdiff sample: error: argument ")
    return last


def with_scheduler(src: Path, dst: Path, config: dict) -> Path:
    """A copy of the pipeline folder whose scheduler_config.json is ``config``."""
    shutil.copytree(src, dst)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return dst


def scheduler_config(cls, **options) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = dict(cls(**options).config)
    return {"_class_name": cls.__name__, **{k: v for k, v in cfg.items() if k[0] != "_"}}


def argv(folder, out, *extra):
    return [
        "sample",
        "--pipeline",
        str(folder),
        "--steps",
        "5",
        "--batch",
        "2",
        "--no-progress",
    ] + [
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory, pipe_dir) -> Path:
    """The concrete bug: a UNet folder whose scheduler is FlowMatchEulerDiscreteScheduler; the
    refusal suggested --scheduler dpm++2m-sde, which then sampled the flow model on a default VP
    schedule and exited 0."""
    d = tmp_path_factory.mktemp("flowroot") / "flow"
    return with_scheduler(pipe_dir, d, scheduler_config(FlowMatchEulerDiscreteScheduler))


@pytest.mark.parametrize("flag", [None, *SCHEDULER_FLAGS])
def test_flow_matching_folder_is_refused_with_or_without_scheduler(
    flag, flow_dir, tmp_path, capsys, nothing_loaded
):
    extra = [] if flag is None else ["--scheduler", flag]
    last = cli_error(argv(flow_dir, tmp_path / "o", *extra), capsys)
    assert last.startswith("specdiff sample: error: argument --pipeline: ")
    assert "FlowMatchEulerDiscreteScheduler" in last
    assert "flow-matching models are not supported yet" in last
    assert "--scheduler" not in last and "pass " not in last  # no scheduler is suggested
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "options,why",
    [
        ({"algorithm_type": "sde-dpmsolver++", "use_flow_sigmas": True}, "use_flow_sigmas=True"),
        (
            {"algorithm_type": "sde-dpmsolver++", "prediction_type": "flow_prediction"},
            "prediction_type='flow_prediction'",
        ),
        (
            {"algorithm_type": "sde-dpmsolver++", "use_dynamic_shifting": True},
            "use_dynamic_shifting",
        ),
    ],
)
@pytest.mark.parametrize("flag", [None, "ddpm"])
def test_flow_matching_config_keys_are_refused(
    options, why, flag, pipe_dir, tmp_path, capsys, nothing_loaded
):
    cfg = scheduler_config(diffusers.DPMSolverMultistepScheduler)
    d = with_scheduler(pipe_dir, tmp_path / "dpm", {**cfg, **options})
    extra = [] if flag is None else ["--scheduler", flag]
    last = cli_error(argv(d, tmp_path / "o", *extra), capsys)
    assert last.startswith("specdiff sample: error: argument --pipeline: ")
    assert why in last and "flow-matching models are not supported yet" in last


def write_transformer_folder(root: Path, model, scheduler) -> Path:
    """model_index.json, transformer/config.json and scheduler/: configs only (the refusal comes
    before any weight is looked for)."""
    root.mkdir()
    index = {
        "_class_name": "DiTPipeline",
        "transformer": ["diffusers", type(model).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    model.save_config(root / "transformer")
    scheduler.save_config(root / "scheduler")
    return root


def test_transformer_folder_is_refused(tmp_path, capsys, nothing_loaded):
    d = write_transformer_folder(tmp_path / "dit", tiny_dit(), DDPMScheduler())
    last = cli_error(argv(d, tmp_path / "o"), capsys)
    assert last.startswith("specdiff sample: error: argument --pipeline: ")
    assert "DiTTransformer2DModel" in last
    assert "transformer models are not supported yet" in last


def test_sd3_like_folder_is_refused_as_flow_matching(tmp_path, capsys, nothing_loaded):
    torch.manual_seed(0)
    sd3 = diffusers.SD3Transformer2DModel(
        sample_size=SIZE,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    )
    d = write_transformer_folder(tmp_path / "sd3", sd3, FlowMatchEulerDiscreteScheduler(shift=3.0))
    for extra in ([], ["--scheduler", "dpm++2m-sde"]):
        last = cli_error(argv(d, tmp_path / "o", *extra), capsys)
        assert "flow-matching models are not supported yet" in last and "--scheduler" not in last


NO_VP = [
    ("ScoreSdeVeScheduler", "variance-exploding"),
    ("EDMEulerScheduler", "EDM"),
    ("CosineDPMSolverMultistepScheduler", "EDM"),
    ("CMStochasticIterativeScheduler", "consistency"),
    ("IPNDMScheduler", "deterministic"),
]


@pytest.mark.parametrize("name,why", NO_VP, ids=[n for n, _ in NO_VP])
@pytest.mark.parametrize("flag", [None, "ddpm", "dpm++2m-sde"])
def test_scheduler_without_a_beta_schedule_is_refused(
    name, why, flag, pipe_dir, tmp_path, capsys, nothing_loaded
):
    """Its config has no beta schedule: an override would silently sample the model on a default
    linear VP schedule."""
    d = with_scheduler(pipe_dir, tmp_path / "s", scheduler_config(getattr(diffusers, name)))
    extra = [] if flag is None else ["--scheduler", flag]
    last = cli_error(argv(d, tmp_path / "o", *extra), capsys)
    assert last.startswith(
        f"specdiff sample: error: argument --pipeline: {str(d)!r}: its scheduler {name} "
    )
    assert "has no discrete beta (VP) training schedule" in last and why in last
    assert "not supported yet" in last


def test_unknown_scheduler_class_needs_a_beta_schedule(pipe_dir, tmp_path, capsys, nothing_loaded):
    d = with_scheduler(pipe_dir, tmp_path / "u", {"_class_name": "MySampler", "sigma_max": 80.0})
    last = cli_error(argv(d, tmp_path / "o", "--scheduler", "ddpm"), capsys)
    assert "MySampler" in last and "training schedule is unknown" in last
    # one that names its beta schedule: the override inherits it
    cfg = {"_class_name": "MySampler", "beta_schedule": "scaled_linear", "beta_start": 0.001}
    d2 = with_scheduler(pipe_dir, tmp_path / "u2", cfg)
    spec = sample_cmd.resolve_pipeline(str(d2), "ddpm", 5, None)
    want = diffusers_transitions(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.001), 5)
    assert torch.equal(spec.transitions.c_x0, want.c_x0)
    last = cli_error(argv(d2, tmp_path / "o"), capsys)  # no override: its own is not supported
    assert "argument --scheduler: the pipeline's own scheduler MySampler is not supported (" in last


def test_continuous_timesteps_are_refused(pipe_dir, tmp_path, capsys, nothing_loaded):
    cfg = scheduler_config(diffusers.EulerDiscreteScheduler, timestep_type="continuous")
    d = with_scheduler(pipe_dir, tmp_path / "c", cfg)
    for extra in ([], ["--scheduler", "euler-a"]):
        last = cli_error(argv(d, tmp_path / "o", *extra), capsys)
        assert "argument --pipeline: " in last and "timestep_type 'continuous'" in last


TRAINING = {
    "num_train_timesteps": 500,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
}


@pytest.mark.parametrize("flag", SCHEDULER_FLAGS)
def test_scheduler_override_inherits_the_training_schedule(flag, pipe_dir, tmp_path):
    """--scheduler builds from the folder's config: its betas, steps and prediction type."""
    cfg = scheduler_config(diffusers.EulerDiscreteScheduler, **TRAINING)
    d = with_scheduler(pipe_dir, tmp_path / "p", cfg)
    spec = sample_cmd.resolve_pipeline(str(d), flag, 20, None)
    assert spec.max_steps == 500 and spec.transitions.prediction == "v_prediction"
    fam = family(flag)
    cls, extra = getattr(diffusers, fam.scheduler), dict(fam.scheduler_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chain = cls.from_config({**cfg, **extra})
    assert torch.equal(chain.alphas_cumprod, cls(**TRAINING).alphas_cumprod)
    want = diffusers_transitions(chain, 20, eta=1.0 if flag == "ddim" else None)
    for name in ("timesteps", "c_x0", "c_x", "std"):
        assert torch.equal(getattr(spec.transitions, name), getattr(want, name)), name
    own = diffusers.EulerDiscreteScheduler(**TRAINING).alphas_cumprod
    assert torch.equal(cls(**TRAINING).alphas_cumprod, own)


@pytest.mark.parametrize("flag", SCHEDULER_FLAGS)
def test_override_that_cannot_inherit_the_schedule_is_refused(
    flag, pipe_dir, tmp_path, capsys, nothing_loaded
):
    """CogVideoX's snr_shift_scale changes alphas_cumprod; no supported scheduler has it."""
    cfg = scheduler_config(diffusers.CogVideoXDDIMScheduler, snr_shift_scale=3.0)
    d = with_scheduler(pipe_dir, tmp_path / "cog", cfg)
    last = cli_error(argv(d, tmp_path / "o", "--scheduler", flag), capsys)
    assert last.startswith(f"specdiff sample: error: argument --scheduler: {flag}: ")
    assert "training schedule (alphas_cumprod) would differ" in last
    assert "CogVideoXDDIMScheduler" in last and "snr_shift_scale=3.0" in last
    last = cli_error(argv(d, tmp_path / "o"), capsys)
    assert "own scheduler CogVideoXDDIMScheduler is not supported (CogVideoX's SNR-shifted" in last


def test_prediction_type_mismatch_is_refused():
    own = DDPMScheduler(prediction_type="v_prediction")
    with pytest.raises(sample_cmd.PipelineError) as err:
        sample_cmd._check_inherited("ddim", "DDPMScheduler", own, diffusers.DDIMScheduler())
    assert err.value.option == "--scheduler"
    assert one_line(err) == (
        "ddim: its prediction_type 'epsilon' would differ from the pipeline's own "
        "DDPMScheduler's 'v_prediction' (the model predicts v_prediction)"
    )


def test_v_prediction_folder_with_euler_a(pipe_dir, tmp_path, capsys, nothing_loaded):
    """v-prediction is inherited by every override; x0-prediction is refused by euler-a (the
    adapter's message), before anything loads."""
    d = with_scheduler(
        pipe_dir, tmp_path / "v", scheduler_config(DDPMScheduler, prediction_type="v_prediction")
    )
    assert sample_cmd.resolve_pipeline(str(d), "euler-a", 5, None).transitions.prediction == (
        "v_prediction"
    )
    x0 = with_scheduler(
        pipe_dir, tmp_path / "x0", scheduler_config(DDPMScheduler, prediction_type="sample")
    )
    last = cli_error(argv(x0, tmp_path / "o", "--scheduler", "euler-a"), capsys)
    assert "argument --scheduler: euler-a: " in last and "prediction_type" in last

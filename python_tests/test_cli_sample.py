"""``specdiff sample`` (and ``specdiff demo --device``): sampling a ``save_pretrained`` pipeline
folder and the embedded digits model, and every bad argument refused in one line before any
weight is loaded.

The pipelines here are tiny random ``UNet2DModel`` + scheduler folders written by diffusers' own
``save_pretrained``: fast, and independent of the embedded ``patches`` weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from preamble import cli_args, run_specdiff

pytest.importorskip("diffusers")
from diffusers import DDPMPipeline  # noqa: E402
from refusal import cli_error  # noqa: E402
from tiny_diffusers import SIZE, edited_copy  # noqa: E402

from specdiff_kernels import AncestralSampler, SpeculativeSampler  # noqa: E402
from specdiff_kernels.cli import sample as sample_cmd
from specdiff_kernels.cli.commands import main  # noqa: E402
from specdiff_kernels.integrations.diffusers import from_pipeline  # noqa: E402


def grid_to_samples(png: Path, n: int, channels: int, size: int) -> torch.Tensor:
    """Invert sample_cmd.image_grid for n tiles of size x size, upscaled (value in [-1, 1])."""
    from PIL import Image

    arr = np.asarray(Image.open(png))
    if channels == 1:
        arr = arr[..., None]
    scale = {8: 8, 32: 4}[size]  # tiles of 64 px for 8x8 samples, 128 px for 32x32
    tile, pad = size * scale, 2
    cols = int(np.ceil(np.sqrt(n)))
    out = []
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (tile + pad), pad + c * (tile + pad)
        out.append(arr[y : y + tile : scale, x : x + tile : scale])  # one pixel per upscaled block
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).double() / 127.5 - 1


# ----------------------------------------------------------------------------- runs
def test_sample_a_save_pretrained_folder(pipe_dir, tmp_path, capsys):
    rc = main(
        cli_args(
            "sample --steps 40 --window 4 --batch 16 --seed 3 --compare",
            "--pipeline",
            pipe_dir,
            out=tmp_path,
        )
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "scheduler ddpm (the pipeline's own: DDPMScheduler)" in out
    assert "sequential target calls (batch)" in out and "two-sample test" in out
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["pipeline"]["scheduler"] == "ddpm" and stats["pipeline"]["event_shape"] == [
        3,
        SIZE,
        SIZE,
    ]
    assert stats["speculative"]["target_calls"] < stats["ancestral"]["target_calls"] == 40
    assert stats["ancestral_seed"] != 3 and stats["two_sample_pvalue"] > 1e-3
    assert stats["wall_s"]["speculative"] > 0 and stats["wall_s"]["ancestral"] > 0
    assert stats["args"]["window"] == 4 and stats["args"]["batch"] == 16
    # the grid holds exactly what the library gives for this pipeline, seed and window
    pipe = DDPMPipeline.from_pretrained(pipe_dir)
    model, T = from_pipeline(pipe, 40)
    # (16 chains of a UNet on CPU: the default path, the static round with its compact call)
    ref = (
        SpeculativeSampler(model, T, window=4)
        .sample(16, (3, SIZE, SIZE), generator=torch.Generator().manual_seed(3))
        .samples
    )
    shown = grid_to_samples(tmp_path / "samples.png", 16, 3, SIZE)
    torch.testing.assert_close(shown, ref.double().clamp(-1, 1), atol=1 / 127.5, rtol=0)
    anc = AncestralSampler(model, T).sample(
        16, (3, SIZE, SIZE), generator=torch.Generator().manual_seed(stats["ancestral_seed"])
    )
    shown_anc = grid_to_samples(tmp_path / "samples_ancestral.png", 16, 3, SIZE)
    torch.testing.assert_close(shown_anc, anc.samples.double().clamp(-1, 1), atol=1 / 127.5, rtol=0)


@pytest.mark.parametrize(
    "argv,scheduler,transitions",
    [
        (["--scheduler", "euler-a"], "euler-a", "euler"),
        (["--scheduler", "ddim", "--eta", "0.5"], "ddim", "eta=0.5"),
        (["--scheduler", "ddim"], "ddim", "eta=1.0"),
    ],
)
def test_sample_with_another_scheduler(pipe_dir, tmp_path, capsys, argv, scheduler, transitions):
    rc = main(
        cli_args(
            "sample --steps 20 --window adaptive --batch 4",
            "--pipeline",
            pipe_dir,
            *argv,
            out=tmp_path,
        )
    )
    assert rc == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (
        stats["pipeline"]["scheduler"] == scheduler
        and transitions in stats["pipeline"]["transitions"]
    )
    assert "ancestral" not in stats and stats["speculative"]["num_steps"] == 20


def test_unsupported_own_scheduler_needs_scheduler_flag(pipe_dir, tmp_path, capsys):
    d = edited_copy(
        pipe_dir, tmp_path / "pndm", "scheduler/scheduler_config.json", _class_name="PNDMScheduler"
    )
    last = cli_error(["sample", "--pipeline", str(d), "--out", str(tmp_path / "o")], capsys)
    assert last == (
        "specdiff sample: error: argument --scheduler: the pipeline's own scheduler "
        "PNDMScheduler is deterministic (no noise to speculate over); pass --scheduler "
        "dpm++2m-sde (or ddpm, ddim, euler-a, euler-churn)"
    )
    rc = main(
        cli_args(
            "sample --scheduler ddpm --steps 10 --batch 2", "--pipeline", d, out=tmp_path / "o"
        )
    )
    assert rc == 0
    assert "(the pipeline's own: PNDMScheduler)" in capsys.readouterr().out


def test_unknown_own_scheduler_needs_scheduler_flag(pipe_dir, tmp_path, capsys, nothing_loaded):
    d = edited_copy(
        pipe_dir,
        tmp_path / "kdpm2a",
        "scheduler/scheduler_config.json",
        _class_name="KDPM2AncestralDiscreteScheduler",
    )
    last = cli_error(["sample", "--pipeline", str(d), "--out", str(tmp_path / "o")], capsys)
    assert last == (
        "specdiff sample: error: argument --scheduler: the pipeline's own scheduler "
        "KDPM2AncestralDiscreteScheduler is not supported (stochastic, but each step calls the "
        "network twice (at a midpoint sigma) before its noise, so a step is not one Gaussian "
        "around one network mean); pass --scheduler ddpm or ddim or euler-a or dpm++2m-sde or euler-churn (on "
        "the same training schedule)"
    )
    # a scheduler without a beta schedule (VE): no --scheduler is suggested (arguments/test_cli_sample_arguments.py)


# ----------------------------------------------------------------------------- DPM++ 2M SDE
def dpm_folder(src: Path, dst: Path, **changes) -> Path:
    return edited_copy(
        src,
        dst,
        "scheduler/scheduler_config.json",
        _class_name="DPMSolverMultistepScheduler",
        **changes,
    )


def sample_argv(pipeline, out, *extra, steps="20", batch="4"):
    return cli_args(
        f"sample --steps {steps} --window 4 --batch {batch}",
        "--pipeline",
        pipeline,
        *extra,
        out=out,
    )


@pytest.mark.parametrize("karras", [False, True])
def test_sample_with_dpm_sde_on_a_ddpm_folder(pipe_dir, tmp_path, capsys, karras):
    """--scheduler dpm++2m-sde: the folder's scheduler config as diffusers' own
    DPMSolverMultistepScheduler.from_config with the SDE algorithm, order 2 (and Karras)."""
    from diffusers import DPMSolverMultistepScheduler

    from specdiff_kernels.integrations.diffusers import diffusers_transitions

    extra = ["--scheduler", "dpm++2m-sde"] + (["--karras"] if karras else [])
    rc = main(sample_argv(pipe_dir, tmp_path, *extra))
    out = capsys.readouterr().out
    assert rc == 0
    label = "dpm++2m-sde (Karras sigmas)" if karras else "dpm++2m-sde"
    assert f"scheduler {label} (the pipeline's own: DDPMScheduler)" in out
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["pipeline"]["scheduler"] == "dpm++2m-sde" and stats["pipeline"]["karras"] is karras
    assert "dpm++2m-sde" in stats["pipeline"]["transitions"]
    assert stats["speculative"]["num_steps"] == 20
    cfg = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    sched = DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=karras
    )
    want = diffusers_transitions(sched, 20)
    got = sample_cmd.resolve_pipeline(str(pipe_dir), "dpm++2m-sde", 20, None, karras=karras)
    T = got.transitions
    assert T.multistep and torch.equal(T.timesteps, want.timesteps)
    for name in ("c_x0", "c_x", "c_prev", "std"):
        assert torch.equal(getattr(T, name), getattr(want, name)), name


def test_own_dpm_sde_scheduler_needs_no_flag(pipe_dir, tmp_path, capsys):
    # --karras replaces the config's own sigma schedule (diffusers allows only one)
    d = dpm_folder(
        pipe_dir, tmp_path / "dpm", algorithm_type="sde-dpmsolver++", use_exponential_sigmas=True
    )
    rc = main(sample_argv(d, tmp_path / "o", "--karras"))
    assert rc == 0
    out = capsys.readouterr().out
    assert (
        "scheduler dpm++2m-sde (Karras sigmas) (the pipeline's own: DPMSolverMultistepScheduler)"
        in out
    )
    spec = sample_cmd.resolve_pipeline(str(d), None, 20, None)
    assert spec.scheduler == "dpm++2m-sde" and not spec.karras and spec.transitions.multistep
    karras = sample_cmd.resolve_pipeline(str(d), None, 20, None, karras=True)
    assert karras.karras and not torch.equal(karras.transitions.c_x0, spec.transitions.c_x0)


def test_own_dpm_ode_scheduler_is_refused_until_the_sde_one_is_asked(
    pipe_dir, tmp_path, capsys, nothing_loaded
):
    d = dpm_folder(pipe_dir, tmp_path / "dpm", algorithm_type="dpmsolver++", solver_order=3)
    last = cli_error(["sample", "--pipeline", str(d), "--out", str(tmp_path / "o")], capsys)
    assert last == (
        "specdiff sample: error: argument --scheduler: the pipeline's own scheduler "
        "DPMSolverMultistepScheduler (algorithm_type 'dpmsolver++') is deterministic (no noise "
        "to speculate over); pass --scheduler dpm++2m-sde (its SDE variant)"
    )
    # the flag makes it the 2M SDE solver: the SDE algorithm, order 2
    spec = sample_cmd.resolve_pipeline(str(d), "dpm++2m-sde", 20, None)
    assert spec.transitions.multistep and "dpm++2m-sde" in spec.transitions.name


def test_own_dpm_sde_of_order_3_is_the_adapters_message(pipe_dir, tmp_path, capsys, nothing_loaded):
    d = dpm_folder(pipe_dir, tmp_path / "dpm", algorithm_type="sde-dpmsolver++", solver_order=3)
    last = cli_error(["sample", "--pipeline", str(d), "--out", str(tmp_path / "o")], capsys)
    assert last.startswith(
        "specdiff sample: error: argument --scheduler: dpm++2m-sde: DPMSolverMultistepScheduler "
        "config: solver_order=3 is not supported"
    )
    assert last.endswith("use solver_order=2")


KARRAS_CASES = [
    (
        ["--karras"],
        "argument --karras: applies to --scheduler dpm++2m-sde or edm-dpm++2m-sde or edm-euler-churn or cosine-dpm++2m-sde only (this pipeline's own "
        "scheduler is DDPMScheduler)",
    ),
    (
        ["--scheduler", "euler-a", "--karras"],
        "argument --karras: applies to --scheduler dpm++2m-sde or edm-dpm++2m-sde or edm-euler-churn or cosine-dpm++2m-sde only",
    ),
    (
        ["--scheduler", "dpm++2m-sde", "--eta", "0.5"],
        "argument --eta: applies to --scheduler ddim only",
    ),
]


@pytest.mark.parametrize("argv,message", KARRAS_CASES, ids=[" ".join(a) for a, _ in KARRAS_CASES])
def test_karras_elsewhere_is_refused(argv, message, pipe_dir, tmp_path, capsys, nothing_loaded):
    last = cli_error(["sample", "--pipeline", str(pipe_dir), "--out", str(tmp_path), *argv], capsys)
    assert last == f"specdiff sample: error: {message}"


@pytest.mark.parametrize("karras", [False, True])
def test_sample_digits_with_dpm_sde(tmp_path, capsys, karras):
    from specdiff_kernels.models.digits import digits_alphas_cumprod
    from specdiff_kernels.sampling.transitions import dpmsolver_sde_transitions

    extra = ["--scheduler", "dpm++2m-sde", "--compare"] + (["--karras"] if karras else [])
    rc = main(sample_argv("digits", tmp_path, *extra, steps="30", batch="64"))
    assert rc == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["two_sample_pvalue"] > 1e-3 and stats["ancestral"]["target_calls"] == 30
    assert stats["pipeline"]["scheduler"] == "dpm++2m-sde" and stats["pipeline"]["karras"] is karras
    assert stats["speculative"]["num_steps"] == 30
    T = sample_cmd.resolve_pipeline("digits", "dpm++2m-sde", 30, None, karras=karras).transitions
    want = dpmsolver_sde_transitions(
        30,
        alphas_cumprod=digits_alphas_cumprod(),
        sigma_schedule="karras" if karras else "default",
    )
    assert T.multistep and torch.equal(T.timesteps, want.timesteps)
    assert torch.equal(T.c_prev, want.c_prev) and torch.equal(T.c_x0, want.c_x0)


def test_sample_digits_with_its_draft_model(tmp_path, capsys):
    rc = main(
        cli_args(
            "sample --pipeline digits --steps 50 --window 4 --batch 32 --draft model --compare",
            out=tmp_path,
        )
    )
    assert rc == 0 and "digits" in capsys.readouterr().out
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["speculative"]["draft_calls"] > 0 and stats["two_sample_pvalue"] > 1e-3
    from PIL import Image

    # 32 digits: 6 columns x 6 rows of 64-px tiles (8x8 scaled by 8) with 2-px gaps
    assert Image.open(tmp_path / "samples.png").size == (6 * 66 + 2, 6 * 66 + 2)


def test_sample_digits_flow_with_the_flow_sde(tmp_path, capsys):
    from specdiff_kernels.sampling.transitions import flow_sde_transitions

    argv = "sample --pipeline digits-flow --scheduler flow-sde --steps 30 --batch 64 --window 4 --compare"
    assert main(cli_args(argv, out=tmp_path)) == 0
    assert "digits-flow" in capsys.readouterr().out
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["two_sample_pvalue"] > 1e-3 and stats["ancestral"]["target_calls"] == 30
    assert stats["pipeline"]["scheduler"] == "flow-sde"
    assert stats["speculative"]["target_calls"] < 30
    T = sample_cmd.resolve_pipeline("digits-flow", "flow-sde", 30, None).transitions
    want = flow_sde_transitions(30)
    assert T.prediction == "flow_prediction" and torch.equal(T.c_x0, want.c_x0)
    assert torch.equal(T.std, want.std) and torch.equal(T.timesteps, want.timesteps)
    # the model's own default: diffusers' stochastic FlowMatch Euler step
    assert sample_cmd.resolve_pipeline("digits-flow", None, 30, None).scheduler == "flow-euler"


def test_sample_digits_flow_refuses_a_diffusion_family(tmp_path, capsys, nothing_loaded):
    last = cli_error(
        ["sample", "--pipeline", "digits-flow", "--scheduler", "ddpm", "--out", str(tmp_path)],
        capsys,
    )
    assert last == (
        "specdiff sample: error: argument --scheduler: ddpm: ddpm needs a diffusion model with "
        "a training schedule (alphas_cumprod); a flow-matching model (prediction "
        "'flow_prediction') takes 'flow-euler' or 'flow-sde'"
    )


def test_sample_digits_bfloat16_and_ddim(tmp_path):
    rc = main(
        cli_args(
            "sample --pipeline digits --scheduler ddim --eta 0.7 --steps 30 --batch 8 --dtype bfloat16",
            out=tmp_path,
        )
    )
    assert rc == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert "eta=0.7" in stats["pipeline"]["transitions"] and stats["args"]["dtype"] == "bfloat16"


def test_dtype_is_the_networks(pipe_dir, tmp_path, monkeypatch):
    """--dtype bfloat16 loads the UNet in bfloat16; the chains (and the samples) stay float32."""
    loaded, sampled = [], []
    real_load, real_sample = sample_cmd.load_unet, SpeculativeSampler.sample
    monkeypatch.setattr(
        sample_cmd, "load_unet", lambda *a: loaded.append(real_load(*a)) or loaded[-1]
    )

    def spy(self, *a, **kw):
        res = real_sample(self, *a, **kw)
        sampled.append(res.samples.dtype)
        return res

    monkeypatch.setattr(SpeculativeSampler, "sample", spy)
    rc = main(
        cli_args(
            "sample --dtype bfloat16 --steps 10 --batch 2", "--pipeline", pipe_dir, out=tmp_path
        )
    )
    assert rc == 0
    assert [u.dtype for u in loaded] == [torch.bfloat16] and sampled == [torch.float32]


def test_patches_resolves_to_the_shipped_pipeline():
    """--pipeline patches is the packaged save_pretrained folder, checked from its JSON alone."""
    from specdiff_kernels.models import patches

    spec = sample_cmd.resolve_pipeline("patches", None, 200, None)
    assert spec.path == patches.pipeline_dir() and (spec.path / "unet").is_dir()
    assert (spec.scheduler, spec.own_scheduler, spec.unet_class) == (
        "ddpm",
        "DDPMScheduler",
        "UNet2DModel",
    )
    assert spec.event_shape == (3, 32, 32) and spec.transitions.num_steps == 200
    assert not spec.has_draft_model


def test_image_grid_denormalises():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(4, 1, 1, 1)
    g = sample_cmd.image_grid(x, scale=1)
    assert g.dtype == np.uint8 and g.shape == (2 * 3 + 2, 2 * 3 + 2)
    assert [int(g[2, 2]), int(g[2, 5]), int(g[5, 2]), int(g[5, 5])] == [0, 128, 255, 255]


def test_demo_device_cpu(tmp_path, capsys):
    rc = main(
        cli_args(
            "demo --model gmm --dim 4 --steps 20 --window 4 --batch 32 --device cpu", out=tmp_path
        )
    )
    assert rc == 0 and "device cpu" in capsys.readouterr().out
    assert json.loads((tmp_path / "demo_gmm_stats.json").read_text())["args"]["device"] == "cpu"


# ----------------------------------------------------------------------------- refusals
def _bad_pipelines(src: Path, root: Path) -> dict:
    """name -> (folder, expected message) for broken copies of the tiny pipeline."""
    q = repr
    d = {}
    f = root / "afile"
    f.write_text("")
    d["file"] = (
        f,
        f"argument --pipeline: {q(str(f))} is not a directory (a diffusers "
        f"save_pretrained folder, or one of patches, digits, digits-flow)",
    )
    missing = root / "missing"
    d["missing"] = (
        missing,
        f"argument --pipeline: {q(str(missing))} does not exist (a diffusers "
        f"save_pretrained folder, or one of patches, digits, digits-flow)",
    )
    empty = root / "empty"
    empty.mkdir()
    d["no model_index"] = (
        empty,
        f"argument --pipeline: {q(str(empty))} is not a diffusers pipeline "
        f"folder: no model_index.json in {q(str(empty))}",
    )
    for part, config in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        folder = root / f"no_{part}"
        shutil.copytree(src, folder)
        shutil.rmtree(folder / part)
        d[f"no {part}"] = (
            folder,
            f"argument --pipeline: {q(str(folder))} has no usable {part}/: no {config} in "
            f"{q(str(folder / part))}",
        )
    learned_unet = edited_copy(src, root / "six", "unet/config.json", out_channels=6)
    d["learned-variance unet"] = (
        learned_unet,
        f"argument --pipeline: {q(str(learned_unet))}: its "
        f"unet has out_channels 6 for in_channels 3 (a learned "
        f"variance?); speculative sampling needs a UNet that "
        f"predicts only the noise/x0/v, with fixed variances",
    )
    cond = edited_copy(src, root / "cond", "unet/config.json", _class_name="UNet2DConditionModel")
    d["conditional unet"] = (
        cond,
        f"argument --pipeline: {q(str(cond))}: its unet is a "
        f"UNet2DConditionModel; specdiff sample runs unconditional "
        f"UNet2DModel pipelines",
    )
    learned = edited_copy(
        src, root / "learned", "scheduler/scheduler_config.json", variance_type="learned_range"
    )
    d["learned variance"] = (
        learned,
        "argument --scheduler: ddpm with variance_type 'learned_range' "
        "(learned variances) cannot be speculated; set variance_type to "
        "'fixed_small' in scheduler/scheduler_config.json, or pass "
        "--scheduler ddim or euler-a",
    )
    return d


BAD_FOLDERS = [
    "file",
    "missing",
    "no model_index",
    "no unet",
    "no scheduler",
    "learned-variance unet",
    "conditional unet",
    "learned variance",
]


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_pipeline_folders(case, pipe_dir, tmp_path, capsys, nothing_loaded):
    folder, message = _bad_pipelines(pipe_dir, tmp_path)[case]
    last = cli_error(["sample", "--pipeline", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert last == f"specdiff sample: error: {message}"


FOLDER_CASES = [
    (
        ["--steps", "2000"],
        "argument --steps: must be at most 1000 (the pipeline's training timesteps), got 2000",
    ),
    (
        ["--eta", "0.5"],
        "argument --eta: applies to --scheduler ddim only (this pipeline's own scheduler is DDPMScheduler)",
    ),
    (
        ["--scheduler", "euler-a", "--eta", "0.5"],
        "argument --eta: applies to --scheduler ddim only",
    ),
    (["--scheduler", "ddim", "--eta", "0"], "argument --eta: must be a positive number, got 0.0"),
    (
        ["--scheduler", "heun"],
        "argument --scheduler: invalid choice: 'heun' (choose from 'ddpm', 'ddim', 'euler-a', "
        "'dpm++2m-sde', 'euler-churn', 'edm-dpm++2m-sde', 'edm-euler-churn', 'cosine-dpm++2m-sde', "
        "'flow-euler', 'flow-sde')",
    ),
    (
        ["--draft", "model"],
        "argument --draft: 'model' needs a draft network, which only --pipeline digits and digits-flow ship; use frozen-x0 or frozen-eps",
    ),
    (
        ["--draft", "oracle"],
        "argument --draft: invalid choice: 'oracle' (choose from 'frozen-x0', 'frozen-eps', 'model')",
    ),
    (
        ["--dtype", "float16"],
        "argument --dtype: float16 needs --device cuda (on CPU it is slower than float32 and some kernels lack it); use float32 or bfloat16 on CPU",
    ),
    (
        ["--dtype", "float64"],
        "argument --dtype: invalid choice: 'float64' (choose from 'float32', 'float16', 'bfloat16')",
    ),
    (["--device", "tpu"], "argument --device: must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "argument --device: must be cpu, cuda or cuda:N, got 'cuda:x'"),
    (
        ["--steps", "50", "--window", "51"],
        "argument --window: must be at most --steps (50), got 51",
    ),
    (
        ["--window", "0"],
        "argument --window: must be 'auto', a positive integer or 'adaptive', got 0",
    ),
    (
        ["--window", "adaptiv"],
        "argument --window: must be 'auto', a positive integer or 'adaptive', got 'adaptiv'",
    ),
    (["--batch", "0"], "argument --batch: must be a positive integer, got 0"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--seed", "-1"], "argument --seed: must be an integer in 0..2^63-1, got -1"),
]


@pytest.mark.parametrize("argv,message", FOLDER_CASES, ids=[" ".join(a) for a, _ in FOLDER_CASES])
def test_sample_refuses_before_loading(argv, message, pipe_dir, tmp_path, capsys, nothing_loaded):
    last = cli_error(["sample", "--pipeline", str(pipe_dir), "--out", str(tmp_path), *argv], capsys)
    assert last == f"specdiff sample: error: {message}"


DIGITS_CASES = [
    (
        ["--karras"],
        "argument --karras: applies to --scheduler dpm++2m-sde or edm-dpm++2m-sde or edm-euler-churn or cosine-dpm++2m-sde only",
    ),
    (
        ["--steps", "5000"],
        "argument --steps: must be at most 1000 (the model's training timesteps), got 5000",
    ),
    (["--eta", "0.5"], "argument --eta: applies to --scheduler ddim only"),
    (
        ["--scheduler", "euler-a", "--eta", "0.5"],
        "argument --eta: applies to --scheduler ddim only",
    ),
    (["--window", "300"], "argument --window: must be at most --steps (200), got 300"),
]


@pytest.mark.parametrize("argv,message", DIGITS_CASES, ids=[" ".join(a) for a, _ in DIGITS_CASES])
def test_sample_digits_refuses_before_loading(argv, message, tmp_path, capsys, nothing_loaded):
    last = cli_error(["sample", "--pipeline", "digits", "--out", str(tmp_path), *argv], capsys)
    assert last == f"specdiff sample: error: {message}"


def test_scheduler_the_adapter_refuses(pipe_dir, tmp_path, capsys, nothing_loaded):
    """Euler-ancestral has no x0 parametrisation in diffusers: the adapter's own message, as an
    argument error, from the scheduler config alone."""
    d = edited_copy(
        pipe_dir, tmp_path / "x0", "scheduler/scheduler_config.json", prediction_type="sample"
    )
    last = cli_error(
        ["sample", "--pipeline", str(d), "--scheduler", "euler-a", "--out", str(tmp_path)], capsys
    )
    assert last.startswith("specdiff sample: error: argument --scheduler: euler-a: ")
    assert "prediction_type" in last and "'sample'" in last


def test_missing_patches_weights(tmp_path, capsys, monkeypatch, nothing_loaded):
    from specdiff_kernels.models import patches

    monkeypatch.setattr(patches, "pipeline_dir", lambda: tmp_path / "nowhere")
    last = cli_error(["sample", "--pipeline", "patches", "--out", str(tmp_path)], capsys)
    assert last == (
        f"specdiff sample: error: argument --pipeline: the embedded 'patches' pipeline is "
        f"not in this install (no model_index.json in {str(tmp_path / 'nowhere')!r}); "
        f"train it with `python -m specdiff_kernels.models.train patches --into-package`, or "
        f"pass a pipeline "
        f"folder or 'digits'"
    )


def test_pipeline_folder_without_diffusers(pipe_dir, tmp_path, capsys, monkeypatch, nothing_loaded):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    assert cli_error(["sample", "--pipeline", str(pipe_dir), "--out", str(tmp_path)], capsys) == (
        "specdiff sample: error: argument --pipeline: diffusers is not installed (pip install "
        "'specdiff_kernels[diffusers]')"
    )


def test_out_that_is_a_file(pipe_dir, tmp_path, capsys, nothing_loaded):
    f = tmp_path / "afile"
    f.write_text("")
    assert cli_error(["sample", "--pipeline", str(pipe_dir), "--out", str(f)], capsys) == (
        f"specdiff sample: error: argument --out: {str(f)!r} exists and is not a directory"
    )


@pytest.mark.parametrize("cmd", ["sample", "demo"])
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_without_a_gpu(cmd, device, tmp_path, capsys, monkeypatch, nothing_loaded):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [cmd, "--device", device, "--out", str(tmp_path)] + (
        ["--pipeline", "digits"] if cmd == "sample" else []
    )
    assert cli_error(argv, capsys) == (
        f"specdiff {cmd}: error: argument --device: {device!r} is not "
        f"available: torch.cuda.is_available() is False (use --device cpu)"
    )


def test_cuda_index_past_the_devices(tmp_path, capsys, monkeypatch, nothing_loaded):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli_error(
        ["sample", "--pipeline", "digits", "--device", "cuda:2", "--out", str(tmp_path)], capsys
    ) == (
        "specdiff sample: error: argument --device: 'cuda:2' is not available: "
        "this machine has 2 CUDA device(s), cuda:0..cuda:1"
    )


def test_sample_error_in_a_real_process(tmp_path):
    """The installed command: exit code 2, usage + one error line on stderr, no traceback, and it
    fails fast (no model import needed to refuse)."""
    proc = run_specdiff(
        "sample", "--pipeline", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"specdiff sample: error: argument --pipeline: {str(tmp_path / 'nope')!r} does not exist "
        f"(a diffusers save_pretrained folder, or one of patches, digits, digits-flow)"
    )

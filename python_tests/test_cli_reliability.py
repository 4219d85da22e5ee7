"""The command line fails before it works, in one line (issue 20, item 5): every bad argument, bad
pipeline folder, interrupted run and too-large batch ends with ONE line on stderr (no traceback)
and exit 2 (a bad input) or 130 (Ctrl-C); a run with one chain still writes its stats; ``--out``
never holds the files of two runs side by side; ``--version``; readable sample grids.

The pipelines are tiny random ``UNet2DModel`` folders written by diffusers' ``save_pretrained``;
the runs are a few steps of the embedded digits model, so each test takes about a second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from preamble import cli_args, run_specdiff

pytest.importorskip("diffusers")
from tiny_diffusers import edited_copy  # noqa: E402

import specdiff_kernels  # noqa: E402
from specdiff_kernels.cli import sample as sample_cmd  # noqa: E402
from specdiff_kernels.cli.commands import distributed_main, main  # noqa: E402
from specdiff_kernels.sampling.ancestral import AncestralSampler  # noqa: E402
from specdiff_kernels.sampling.sampler import SpeculativeSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST_DIGITS = ["--pipeline", "digits", "--steps", "6", "--window", "2", "--no-progress"]


def cli(argv, capsys, entry=main):
    """(exit code, stdout, stderr) of one in-process command; an exception escaping the command
    (a traceback for the user) fails the test."""
    try:
        rc = entry(argv)
    except SystemExit as exc:
        rc = exc.code
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the command (a traceback for the user)")
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"stderr is {len(lines)} lines:\n{err}"
    return lines[0]


def refused(argv, capsys, flag: str, entry=main, code: int = 2) -> str:
    rc, out, err = cli(argv, capsys, entry)
    line = one_line(err)
    assert rc == code, (rc, err)
    assert flag in line, line
    return line


def each_bad_argument(cases):
    """Parametrises a test over (arguments, the flag its one-line error names), with the arguments
    as the test id."""
    return pytest.mark.parametrize(
        "extra,flag", cases, ids=lambda v: " ".join(v) if isinstance(v, list) else v
    )


# ----------------------------------------------------------------------------- every argument
BAD_SAMPLE_ARGS = [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "2.5"], "--steps"),
    (["--steps", "5000"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--batch", "-1"], "--batch"),
    (["--batch", "many"], "--batch"),
    (["--window", "0"], "--window"),
    (["--window", "fixed"], "--window"),
    (["--window", "7"], "--window"),  # more than --steps 6
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**63)], "--seed"),
    (["--eta", "0.5"], "--eta"),  # ddpm
    (["--eta", "nan", "--scheduler", "ddim"], "--eta"),
    (["--eta", "1e308", "--scheduler", "ddim"], "--eta"),  # sampled NaN states before
    (["--dtype", "float16"], "--dtype"),
    (["--dtype", "int8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--draft", "gaussian"], "--draft"),
    (["--scheduler", "pndm"], "--scheduler"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-batch", "x"], "--max-batch"),
    (["--overwrite", "yes"], "unrecognized"),
]


@each_bad_argument(BAD_SAMPLE_ARGS)
def test_sample_bad_argument_one_line(extra, flag, tmp_path, capsys, nothing_loaded):
    refused(["sample", *FAST_DIGITS, "--out", str(tmp_path / "o"), *extra], capsys, flag)
    assert not (tmp_path / "o").exists()  # a refused command leaves nothing behind


def test_sample_bad_paths_one_line(pipe_dir, tmp_path, capsys, nothing_loaded):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n")
    for pipeline in (str(tmp_path / "nope"), str(a_file), str(png), str(tmp_path), ""):
        refused(
            ["sample", "--pipeline", pipeline, "--out", str(tmp_path / "o")], capsys, "--pipeline"
        )
    refused(["sample", *FAST_DIGITS, "--out", str(a_file)], capsys, "--out")
    refused(["sample", *FAST_DIGITS, "--out", str(a_file / "sub")], capsys, "--out")
    refused(["sample"], capsys, "--pipeline")  # required
    refused(["sampel", "--pipeline", "digits"], capsys, "sampel")


def test_bare_specdiff_lists_its_commands(capsys):
    """No command: the usage with every command and its one-line description, on stderr, exit 2
    (argparse's convention for a missing argument), no traceback."""
    from specdiff_kernels.cli.commands import build_parser

    rc, out, err = cli([], capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.startswith("usage: specdiff")
    commands = build_parser().subcommands
    for line_start in ("demo ", "sample ", "policy ", "info "):
        line = next(x for x in err.splitlines() if x.strip().startswith(line_start))
        assert len(line.split()) > 2, line  # the name and a description
    assert set(commands) == {"demo", "sample", "policy", "info"}


BAD_DEMO_ARGS = [
    (["--model", "digits", "--dim", "4"], "--dim"),
    (["--model", "gmm", "--dim", "0"], "--dim"),
    (["--model", "langevin", "--dim", "1"], "--dim"),
    (["--model", "langevin", "--step-size", "-0.1"], "--step-size"),
    (["--model", "langevin", "--step-size", "inf"], "--step-size"),
    (["--model", "langevin", "--draft", "model"], "--draft"),
    (["--model", "vae"], "--model"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1001"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--window", "-2"], "--window"),
    (["--seed", "1e3"], "--seed"),
    (["--backend", "cuda"], "--backend"),
    (["--max-batch", "-5"], "--max-batch"),
]


@each_bad_argument(BAD_DEMO_ARGS)
def test_demo_bad_argument_one_line(extra, flag, tmp_path, capsys, monkeypatch):
    from specdiff_kernels.cli import demo

    def refuse(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(demo, "run_demo", refuse)
    monkeypatch.setattr(demo, "run_langevin_demo", refuse)
    refused(["demo", "--no-progress", "--out", str(tmp_path / "o"), *extra], capsys, flag)


BAD_DISTRIBUTED_ARGS = [
    (["--chains", "0"], "--chains"),
    (["--chains", str(10**9)], "--chains"),  # cannot fit: refused before the model loads
    (["--steps", "-1"], "--steps"),
    (["--dim", "1", "--model", "banana"], "--dim"),
    (["--dim", "8", "--model", "digits"], "--dim"),
    (["--window", "300"], "--window"),
    (["--sampler", "gibbs"], "--sampler"),
    (["--out", "x.pt", "--per-rank-dir", "d"], "--out"),
]


@each_bad_argument(BAD_DISTRIBUTED_ARGS)
def test_distributed_bad_argument_one_line(extra, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(extra, capsys, flag, entry=distributed_main)


# ----------------------------------------------------------------------------- pipeline folders
def test_clip_range_not_positive_refused_before_loading(pipe_dir, tmp_path, capsys, nothing_loaded):
    for i, value in enumerate((0, -1.0)):
        bad = edited_copy(
            pipe_dir,
            tmp_path / f"clip{i}",
            "scheduler/scheduler_config.json",
            clip_sample=True,
            clip_sample_range=value,
        )
        line = refused(
            ["sample", "--pipeline", str(bad), "--out", str(tmp_path / "o")], capsys, "--pipeline"
        )
        assert "clip_sample_range" in line


@pytest.mark.parametrize(
    "changes",
    [
        {"beta_schedule": "bogus"},
        {"num_train_timesteps": "many"},
        {"prediction_type": "noise"},
        {"beta_start": "low"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_bad_scheduler_config_refused_before_loading(
    changes, pipe_dir, tmp_path, capsys, nothing_loaded
):
    bad = edited_copy(pipe_dir, tmp_path / "sched", "scheduler/scheduler_config.json", **changes)
    line = refused(
        ["sample", "--pipeline", str(bad), "--steps", "10", "--out", str(tmp_path / "o")],
        capsys,
        "argument --",  # --pipeline, or --scheduler where another scheduler would do
    )
    assert "scheduler" in line


def test_bad_unet_config_refused_before_loading(pipe_dir, tmp_path, capsys, nothing_loaded):
    for i, changes in enumerate(({"in_channels": "three"}, {"sample_size": [8, 8, 8]})):
        bad = edited_copy(pipe_dir, tmp_path / f"unet{i}", "unet/config.json", **changes)
        refused(
            ["sample", "--pipeline", str(bad), "--out", str(tmp_path / "o")], capsys, "--pipeline"
        )


def _weights(folder: Path) -> Path:
    return next((folder / "unet").glob("*.safetensors"))


def test_truncated_or_corrupt_weights_refused_before_loading(
    pipe_dir, tmp_path, capsys, nothing_loaded
):
    cut = tmp_path / "cut"
    shutil.copytree(pipe_dir, cut)
    w = _weights(cut)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    line = refused(
        ["sample", "--pipeline", str(cut), "--out", str(tmp_path / "o")], capsys, "--pipeline"
    )
    assert "safetensors" in line and "truncated" in line
    junk = tmp_path / "junk"
    shutil.copytree(pipe_dir, junk)
    _weights(junk).write_bytes(b"not a safetensors file at all" * 10)
    refused(["sample", "--pipeline", str(junk), "--out", str(tmp_path / "o")], capsys, "--pipeline")
    none = tmp_path / "none"
    shutil.copytree(pipe_dir, none)
    _weights(none).unlink()
    refused(["sample", "--pipeline", str(none), "--out", str(tmp_path / "o")], capsys, "--pipeline")


def test_weights_that_do_not_match_the_config(pipe_dir, tmp_path, capsys):
    """Only loading can tell: one line naming --pipeline, exit 2, nothing sampled or written."""
    bad = edited_copy(
        pipe_dir, tmp_path / "mismatch", "unet/config.json", block_out_channels=[16, 32]
    )
    line = refused(
        [
            "sample",
            "--pipeline",
            str(bad),
            "--steps",
            "4",
            "--window",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
        "--pipeline",
    )
    assert "weights" in line
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- one chain
def test_compare_with_one_chain_skips_the_test_and_writes_stats(tmp_path, capsys):
    rc, out, err = cli(
        ["sample", *FAST_DIGITS, "--batch", "1", "--compare", "--out", str(tmp_path)], capsys
    )
    assert rc == 0, err
    assert "Traceback" not in err
    assert "two-sample test: skipped" in out
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["two_sample_pvalue"] is None
    assert "2 samples" in stats["two_sample_note"]
    assert stats["ancestral"]["target_calls"] == 6


@pytest.mark.parametrize("model", ["digits", "gmm", "langevin"])
def test_demo_with_one_chain_works(model, tmp_path, capsys):
    rc, out, err = cli(
        [
            "demo",
            "--model",
            model,
            "--batch",
            "1",
            "--steps",
            "6",
            "--window",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert rc == 0, err
    assert "Traceback" not in err and "skipped" in out
    stats = json.loads((tmp_path / f"demo_{model}_stats.json").read_text())
    assert "2 samples" in json.dumps(stats)


# ----------------------------------------------------------------------------- --out
def test_out_with_another_runs_files_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    assert (
        cli(["sample", *FAST_DIGITS, "--batch", "2", "--compare", "--out", str(out)], capsys)[0]
        == 0
    )
    assert (out / "samples_ancestral.png").exists()
    (out / "my_notes.txt").write_text("keep me")
    line = refused(["sample", *FAST_DIGITS, "--batch", "2", "--out", str(out)], capsys, "--out")
    assert "--overwrite" in line
    rc, _, err = cli(
        ["sample", *FAST_DIGITS, "--batch", "2", "--out", str(out), "--overwrite"], capsys
    )
    assert rc == 0, err
    # the earlier run's ancestral grid is gone, the user's file stays
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt", "samples.png", "stats.json"]
    assert json.loads((out / "stats.json").read_text())["args"]["compare"] is False


def test_demos_write_distinct_files_and_refuse_each_other(tmp_path, capsys):
    base = ["--steps", "6", "--window", "2", "--batch", "4", "--no-progress"]
    assert (
        cli(["demo", "--model", "gmm", "--dim", "2", *base, "--out", str(tmp_path)], capsys)[0] == 0
    )
    gmm = sorted(p.name for p in tmp_path.iterdir())
    assert gmm and all(name.startswith("demo_gmm_") for name in gmm), gmm
    refused(["demo", "--model", "digits", *base, "--out", str(tmp_path)], capsys, "--out")
    rc, _, err = cli(
        ["demo", "--model", "digits", *base, "--out", str(tmp_path), "--overwrite"], capsys
    )
    assert rc == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names and all(name.startswith("demo_digits_") for name in names), names


# ----------------------------------------------------------------------------- interrupts
def test_ctrl_c_during_sampling_one_line_exit_130_nothing_left(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(SpeculativeSampler, "sample", interrupted)
    out = tmp_path / "new" / "run"
    rc, _, err = cli(["sample", *FAST_DIGITS, "--out", str(out)], capsys)
    assert rc == 130
    assert one_line(err) == "specdiff sample: interrupted"
    assert not (tmp_path / "new").exists()


def test_ctrl_c_while_writing_removes_the_half_written_run(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cmd, "save_png", interrupted)
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    rc, _, err = cli(["sample", *FAST_DIGITS, "--batch", "2", "--out", str(out)], capsys)
    assert rc == 130 and one_line(err) == "specdiff sample: interrupted"
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_ctrl_c_in_the_distributed_command(tmp_path, capsys, monkeypatch):
    from specdiff_kernels.sampling import distributed

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "sample_distributed", interrupted)
    argv = ["--model", "gmm", "--dim", "2", "--chains", "4", "--steps", "4", "--window", "2"]
    rc, _, err = cli([*argv, "--out", str(tmp_path / "s.pt")], capsys, entry=distributed_main)
    assert rc == 130
    assert one_line(err) == "python -m specdiff_kernels.cli.distributed: interrupted"
    assert not (tmp_path / "s.pt").exists()


def test_ctrl_c_in_a_real_process(tmp_path):
    """SIGINT in the middle of sampling: exit 130, one line, no --out folder left; with progress
    bars, the message is on a line of its own after them."""
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        "-u",
        "-m",
        "specdiff_kernels",
        "sample",
        "--pipeline",
        "digits",
        "--steps",
        "1000",
        "--window",
        "4",
        "--batch",
        "512",
        "--out",
        str(out),
    ]
    for bars in (False, True):
        rc, err = _interrupt(cmd if bars else [*cmd, "--no-progress"])
        assert rc == 130, err
        if bars:
            assert "Traceback" not in err
            assert err.splitlines()[-1] == "specdiff sample: interrupted", err
        else:
            assert one_line(err) == "specdiff sample: interrupted"
        assert not out.exists()


def _interrupt(cmd):
    # a test run started in the background of a non-interactive shell ignores SIGINT, and its
    # children inherit that: restore the default so Python installs its handler
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        first = proc.stdout.readline()  # printed once the network is loaded
        assert first.startswith("pipeline: digits"), first
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


# ----------------------------------------------------------------------------- memory
def test_batch_that_cannot_fit_is_refused_up_front(tmp_path, capsys, nothing_loaded):
    line = refused(
        ["sample", *FAST_DIGITS, "--batch", str(10**9), "--out", str(tmp_path / "o")],
        capsys,
        "--batch",
    )
    assert re.search(r"\d+(\.\d+)? ?[GT]B", line), line
    line = refused(["demo", "--batch", str(10**9), "--out", str(tmp_path / "o")], capsys, "--batch")
    assert re.search(r"\d+(\.\d+)? ?[GT]B", line), line


def test_max_batch_reaches_the_samplers(tmp_path, capsys, monkeypatch):
    seen = []
    for cls in (SpeculativeSampler, AncestralSampler):
        init = cls.__init__

        def spy(self, *a, _init=init, **k):
            seen.append((type(self).__name__, k.get("max_batch")))
            _init(self, *a, **k)

        monkeypatch.setattr(cls, "__init__", spy)
    rc, _, err = cli(
        [
            "sample",
            *FAST_DIGITS,
            "--batch",
            "3",
            "--compare",
            "--max-batch",
            "5",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert rc == 0, err
    assert ("SpeculativeSampler", 5) in seen and ("AncestralSampler", 5) in seen
    assert json.loads((tmp_path / "stats.json").read_text())["args"]["max_batch"] == 5


# ----------------------------------------------------------------------------- the rest
def test_version():
    proc = run_specdiff("--version", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"specdiff_kernels {specdiff_kernels.__version__}"


def test_diffusers_extra_pins_the_tested_range():
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    text = (ROOT / "setup.py").read_text()
    for extra in ("diffusers", "patches"):
        m = re.search(rf'"{extra}": \[[^\]]*"diffusers([^"]*)"', text)
        assert m, extra
        spec = SpecifierSet(m.group(1))
        assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"{extra}: no upper bound"
        assert version("diffusers") in spec  # the version the tests ran
        assert "99.0" not in spec


def test_sample_grid_is_big_enough_to_look_at(tmp_path, capsys):
    from PIL import Image

    assert cli(["sample", *FAST_DIGITS, "--batch", "4", "--out", str(tmp_path)], capsys)[0] == 0
    w, h = Image.open(tmp_path / "samples.png").size
    assert w >= 2 * 64 and h >= 2 * 64  # 2 x 2 digits of 8 x 8 pixels, each at least 64 px
    x = torch.zeros(1, 3, 32, 32)
    assert sample_cmd.image_grid(x).shape[0] >= 128  # a 32 x 32 patch: at least 128 px


def test_no_accelerate_warning_when_loading_a_pipeline(pipe_dir, tmp_path):
    env = dict(os.environ)
    proc = run_specdiff(
        *cli_args("sample --steps 3 --window 1 --batch 1", "--pipeline", pipe_dir, out=tmp_path),
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "accelerate" not in proc.stderr and "Traceback" not in proc.stderr

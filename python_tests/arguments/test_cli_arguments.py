"""The command line refuses bad arguments before any work: argparse's ``error: argument --flag:
...``, ONE line on stderr with exit code 2 and no traceback, before anything is sampled (the root
conftest's ``nothing_loaded`` fails the test if it is): ``specdiff demo`` and
``python -m specdiff_kernels.cli.distributed`` (numbers, paths, options that do not apply to the
model, backends). ``specdiff sample``'s pipeline folders: test_cli_sample_arguments.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from refusal import cli_error

from specdiff_kernels.cli import commands as cli

# the number arguments both commands share
STEPS_AND_SEED = [
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--seed", "-1"], "argument --seed: must be an integer in 0..2^63-1, got -1"),
]

DEMO_CASES = STEPS_AND_SEED + [
    (["--batch", "0"], "argument --batch: must be a positive integer, got 0"),
    (["--batch", "-4"], "argument --batch: must be a positive integer, got -4"),
    (["--steps", "-5"], "argument --steps: must be a positive integer, got -5"),
    (
        ["--steps", "5000"],
        "argument --steps: must be at most 1000 (the model's training timesteps), got 5000",
    ),
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
def test_demo_refuses_before_sampling(argv, message, capsys, nothing_loaded, tmp_path):
    last = cli_error(["demo", *argv, "--out", str(tmp_path), "--no-progress"], capsys)
    assert last == f"specdiff demo: error: {message}"


def test_demo_out_that_is_a_file(capsys, nothing_loaded, tmp_path):
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
def test_demo_out_not_writable(capsys, nothing_loaded):
    assert cli_error(["demo", "--out", "/sys/specdiff_out"], capsys).startswith(
        "specdiff demo: error: argument --out: cannot write to '/sys/specdiff_out': "
    )


def test_demo_backend_not_on_this_device(capsys, nothing_loaded, tmp_path, monkeypatch):
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


DIST_CASES = STEPS_AND_SEED + [
    (["--chains", "0"], "argument --chains: must be a positive integer, got 0"),
    (["--dim", "0"], "argument --dim: must be a positive integer, got 0"),
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
def test_distributed_refuses_before_sampling(argv, message, capsys, nothing_loaded):
    last = cli_error(argv, capsys, entry=cli.distributed_main)
    assert last == f"python -m specdiff_kernels.cli.distributed: error: {message}"


def test_distributed_out_checks(capsys, nothing_loaded, tmp_path):
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

"""``python -m specdiff_kernels.models.train`` (issue 27): it writes to ``--out`` (default
``./specdiff_models``) and into the package's own weights folder only with ``--into-package``; the
train_info JSON records a command that exists and reproduces the weights bitwise; bad arguments
end in one line and exit 2, before any training. The runs are 1-3 optimizer steps of the digits
networks (about a second each)."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402

from specdiff_kernels.models import digits as D  # noqa: E402
from specdiff_kernels.models import train as TR  # noqa: E402

FILES = (D.TARGET_FILE, D.DRAFT_FILE, "digits_train_info.json")
TINY = ["--steps", "2", "--draft-steps", "1"]
SHIPPED_INFO = {
    "digits": D.WEIGHTS_DIR / "digits_train_info.json",
    "digits-flow": D.WEIGHTS_DIR / D.FLOW_INFO_FILE,
    "patches": D.WEIGHTS_DIR / "patches" / "patches_train_info.json",
}


def _digests(folder: Path) -> dict:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


@pytest.fixture
def package_untouched():
    """The package's weights folder is byte for byte the same after the test."""
    before = _digests(D.WEIGHTS_DIR)
    yield
    assert _digests(D.WEIGHTS_DIR) == before, "training wrote into the package's weights folder"


def _run(argv, capsys):
    try:
        rc = TR.main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_out_gets_the_weights_and_the_package_does_not(tmp_path, capsys, package_untouched):
    out = tmp_path / "mine" / "nested"
    rc, stdout, err = _run(["digits", *TINY, "--seed", "3", "--out", str(out)], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert str(out) in stdout
    info = json.loads((out / "digits_train_info.json").read_text())
    assert info["command"] == (
        "python -m specdiff_kernels.models.train digits --steps 2 --draft-steps 1 --seed 3 "
        "--threads 1"
    )
    assert info["target"]["steps"] == 2 and info["draft"]["steps"] == 1
    assert info["num_threads"] == 1 and info["cpu_capability"]  # what else decides the bits
    target = D.load_digits_model(out / D.TARGET_FILE)  # a folder of one's own loads
    assert target.config == D.TARGET_CONFIG


def test_recorded_command_reproduces_the_weights_bitwise(tmp_path, capsys, package_untouched):
    """The recorded command, run as written in a fresh process (no --out: it writes to
    ./specdiff_models), gives the same bits as the in-process run."""
    first = tmp_path / "first"
    assert _run(["digits", *TINY, "--out", str(first)], capsys)[0] == 0
    command = json.loads((first / "digits_train_info.json").read_text())["command"]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "specdiff_kernels.models.train"]
    again = tmp_path / "again"
    again.mkdir()
    proc = subprocess.run(
        [sys.executable, *words[1:]], cwd=again, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    second = again / "specdiff_models"
    for name in (D.TARGET_FILE, D.DRAFT_FILE):
        a, b = load_file(str(first / name)), load_file(str(second / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((second / "digits_train_info.json").read_text())["command"] == command


def test_digits_flow_writes_the_flow_pair(tmp_path, capsys, package_untouched):
    """``digits-flow`` trains the same architectures with the velocity loss into its own files
    (next to a digits DDPM in the same folder, nothing is overwritten)."""
    from safetensors import safe_open

    out = tmp_path / "flow"
    rc, _, err = _run(["digits-flow", *TINY, "--seed", "4", "--out", str(out)], capsys)
    assert rc == 0, err
    flow_files = (D.FLOW_TARGET_FILE, D.FLOW_DRAFT_FILE, D.FLOW_INFO_FILE)
    assert sorted(p.name for p in out.iterdir()) == sorted(flow_files)
    info = json.loads((out / D.FLOW_INFO_FILE).read_text())
    assert info["command"] == (
        "python -m specdiff_kernels.models.train digits-flow --steps 2 --draft-steps 1 --seed 4 "
        "--threads 1"
    )
    assert info["schedule"]["prediction_type"] == "flow_prediction"
    with safe_open(str(out / D.FLOW_TARGET_FILE), framework="pt") as f:
        assert f.metadata()["prediction_type"] == "flow_prediction"
    assert D.load_digits_model(out / D.FLOW_DRAFT_FILE).config == D.DRAFT_CONFIG
    # an untrained velocity model (zero output) scores E|eps - x0|^2 = 1 + E x0^2 = 1.72; the
    # epsilon loss of the same untrained model would be ~1.0: the flow objective was used
    assert 1.5 < info["target"]["final_eval_loss_ema"] < 1.9


def test_into_package_writes_the_package_folder(tmp_path, monkeypatch, capsys):
    fake_package = tmp_path / "package_weights"
    monkeypatch.setattr(TR, "package_dir", lambda model: fake_package)
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(["digits", *TINY, "--into-package"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in fake_package.iterdir()) == sorted(FILES)
    assert not (tmp_path / "specdiff_models").exists()


def test_library_call_restores_threads_and_determinism(tmp_path):
    prev = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    TR.train_digits(steps=1, draft_steps=1, out=tmp_path, threads=1)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == prev


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(TR, "train_digits", refuse)
    monkeypatch.setattr(TR, "train_patches", refuse)


def test_default_out_and_help(capsys):
    assert TR.default_out("digits") == Path("specdiff_models")
    assert TR.default_out("patches") == Path("specdiff_models") / "patches"
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0
    assert "./specdiff_models" in " ".join(out.split()) and "--into-package" in out


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["digits", "--steps", "0"], "--steps"),
        (["digits", "--threads", "0"], "--threads"),
        (["digits", "--seed", "-1"], "--seed"),
        (["digits", "--draft-steps", "x"], "--draft-steps"),
        (["digits", "--out", "o", "--into-package"], "--into-package"),
        (["digits", "--out", str(D.WEIGHTS_DIR)], "--into-package"),
        (["patches", "--out", str(D.WEIGHTS_DIR / "patches")], "--into-package"),
    ],
)
def test_bad_arguments_one_line_before_training(argv, flag, capsys, no_training, tmp_path):
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0]


def test_out_that_is_a_file_is_refused(tmp_path, capsys, no_training):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    for out in (a_file, a_file / "sub"):
        rc, _, err = _run(["digits", "--out", str(out)], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "--out" in err, err


@pytest.mark.parametrize("model", sorted(SHIPPED_INFO))
def test_shipped_info_records_a_real_command(model):
    """The command in each shipped train_info parses with this module's own parser and names
    the run's recorded steps, seed and thread count."""
    info = json.loads(SHIPPED_INFO[model].read_text())
    words = shlex.split(info["command"])
    assert words[:3] == ["python", "-m", "specdiff_kernels.models.train"]
    args = TR.build_parser().parse_args(words[3:])
    assert args.model == model and args.out is None and not args.into_package
    assert args.seed == info["seed"] and args.threads == info["num_threads"]
    if model in ("digits", "digits-flow"):
        assert args.steps == info["target"]["steps"]
        assert args.draft_steps == info["draft"]["steps"]
    else:
        assert args.steps == info["steps"] and args.batch == info["batch"]


def test_patches_library_call_records_its_python_call(tmp_path):
    """Hyper-parameters the command line cannot set: the recorded command is the Python call
    (valid Python, with those values), not a command line that would train something else."""
    pytest.importorskip("diffusers")
    info = TR.train_patches(
        steps=1, batch=2, out=tmp_path / "p", seed=5, threads=1, warmup=1, eval_crops=2
    )
    words = shlex.split(info["command"])
    assert words[:2] == ["python", "-c"]
    compile(words[2], "<command>", "exec")
    assert "warmup=1" in words[2] and "eval_crops=2" in words[2] and "seed=5" in words[2]
    assert (tmp_path / "p" / "model_index.json").is_file()

"""Installing as a user would (issue #14), in fresh virtual environments outside the repo.

* a plain (isolated) ``pip wheel .`` stops with a message that says to use --no-build-isolation;
* venv A (torch + the [build-system] tools): ``pip install --no-build-isolation <source>`` builds
  a portable extension and ``specdiff demo`` runs to the end, saying in one line each that it
  skips the PNGs and the digit classifier (no matplotlib, no scikit-learn there);
* ``pip wheel --no-build-isolation`` in venv A gives a wheel that installs into venv B (torch only)
  and runs ``specdiff demo`` too.

torch comes from pip's configured sources, pinned to the version these tests run with (never
unpinned: that would pull a multi-GB CUDA build). About a minute and a half on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"
BUILD_TOOLS = ["setuptools>=77", "wheel", "pybind11>=2.12", "cmake>=3.26", "ninja>=1.11"]
SOURCE = ["setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "csrc", "specdiff_kernels"]


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_INTERPRET", "PYTHONPATH", "VIRTUAL_ENV", "SPECDIFF_NATIVE")
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", MAX_JOBS="2")
    return env


def run(cmd, cwd, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def fresh_venv(path: Path, *packages) -> Path:
    run([sys.executable, "-m", "venv", path], cwd=path.parent)
    if packages:
        run(
            [path / "bin" / "python", "-m", "pip", "install", "--quiet", *packages], cwd=path.parent
        )
    return path


def copy_source(dst: Path) -> Path:
    """The files a source distribution holds, without this checkout's build products."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    dst.mkdir()
    for name in SOURCE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)
    return dst


def check_demo(venv: Path, workdir: Path) -> str:
    """``specdiff demo`` (the README's route, defaults) in ``workdir``: it runs to the end."""
    workdir.mkdir()
    proc = run([venv / "bin" / "specdiff", "demo", "--no-progress"], cwd=workdir, timeout=300)
    out = proc.stdout
    assert "note: matplotlib is not installed, so the PNG output is skipped" in out
    assert "note: sklearn is not installed, so the digit classifier is skipped" in out
    assert "sequential target calls (batch)" in out and "two-sample test" in out
    stats = json.loads((workdir / "out" / "demo_digits_stats.json").read_text())
    assert stats["two_sample_pvalue"] > 1e-3
    # window="auto" never makes more sequential calls than the ancestral chain (fewer where
    # speculation pays, which it does at the demo's batch unless the machine measures otherwise)
    assert stats["speculative"]["target_calls"] <= stats["ancestral"]["target_calls"]
    info = run([venv / "bin" / "specdiff", "info"], cwd=workdir).stdout
    assert "C++ build:" in info and "backends: reference, cpp" in info
    assert "-march=native" not in info, info  # the portable build is the default
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """venv A with the package installed from a copy of the source, and the wheel built there."""
    base = tmp_path_factory.mktemp("packaging")
    src = copy_source(base / "src")
    venv_a = fresh_venv(base / "venv_a", TORCH_PIN, *BUILD_TOOLS)
    run(
        [venv_a / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-build-isolation", src],
        cwd=base,
        timeout=900,
    )
    dist = base / "dist"
    run(
        [
            venv_a / "bin" / "python",
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            dist,
            src,
        ],
        cwd=base,
        timeout=900,
    )
    wheels = list(dist.glob("specdiff_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    return base, venv_a, wheels[0]


def test_isolated_build_says_to_use_no_build_isolation(tmp_path):
    src = copy_source(tmp_path / "src")
    proc = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist", src],
        cwd=tmp_path,
        check=False,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "torch is not importable in the build environment" in output
    assert "pip install --no-build-isolation ." in output
    assert not any((tmp_path / "dist").glob("*.whl"))


def test_source_install_runs_the_demo(built):
    base, venv_a, _ = built
    check_demo(venv_a, base / "demo_a")


def test_wheel_installs_and_runs_the_demo_in_another_fresh_venv(built):
    base, _, wheel = built
    venv_b = fresh_venv(base / "venv_b", TORCH_PIN, wheel)
    # venv B has no build tools: the wheel is all it needs
    listed = run([venv_b / "bin" / "python", "-m", "pip", "list"], cwd=base).stdout.lower()
    assert "pybind11" not in listed and "specdiff_kernels" in listed.replace("-", "_")
    check_demo(venv_b, base / "demo_b")

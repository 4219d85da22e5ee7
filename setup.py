"""Build specdiff_kernels: setup.py drives CMakeLists.txt (Ninja) to build specdiff_kernels._C.

Install against the torch already in the environment:  pip install --no-build-isolation .
(the extension links against libtorch and must be compiled against the torch it will run with, so
an isolated build environment, which has no torch or another one, cannot build it).

Environment variables:
  SPECDIFF_NATIVE=1        tune for this machine's CPU (-march=native): faster here, but the wheel
                           then runs only on CPUs with the same instruction sets. Default: portable.
  SPECDIFF_BUILD_TYPE      CMake build type (default Release).
  MAX_JOBS                 parallel compile jobs (default: all cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# pyproject.toml's [build-system] requires, for builds without isolation
BUILD_TOOLS = "setuptools wheel pybind11 cmake ninja"

NO_TORCH = """
specdiff_kernels: torch is not importable in the build environment ({err}).
The C++ extension must be compiled against the torch you will run it with, and pip's isolated
build environment has none. Install torch into your environment first (the version you will run
with), then build without isolation:
    pip install --no-build-isolation .          (or: pip wheel --no-build-isolation .)
"""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def _find_tool(name: str) -> str:
    """``cmake`` / ``ninja``: the copy pip installed with this Python (the build environment's or the
    venv's, whose bin/ is not on PATH unless the venv is activated), else the one on PATH."""
    candidates = []
    try:
        if name == "cmake":
            import cmake

            candidates.append(Path(cmake.CMAKE_BIN_DIR) / name)
        else:
            import ninja

            candidates += [
                Path(ninja.BIN_DIR) / name,
                Path(ninja.__file__).parent / "data" / "bin" / name,
            ]
    except (ImportError, AttributeError):
        pass
    candidates += [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found is None:
        sys.exit(
            f"specdiff_kernels: `{name}` not found. A --no-build-isolation build uses this "
            f"environment's build tools: pip install {BUILD_TOOLS}"
        )
    return found


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import torch
        except ImportError as err:
            sys.exit(NO_TORCH.format(err=err))
        try:
            import pybind11
        except ImportError:
            sys.exit(
                f"specdiff_kernels: pybind11 is not installed. A --no-build-isolation build uses "
                f"this environment's build tools: pip install {BUILD_TOOLS}"
            )

        cmake, ninja = _find_tool("cmake"), _find_tool("ninja")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        prefix = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        cfg = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_PREFIX_PATH={prefix}",
            "-DSPECDIFF_BUILD_PYTHON=ON",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SPECDIFF_BUILD_TYPE', 'Release')}",
            f"-DSPECDIFF_NATIVE={'ON' if _truthy('SPECDIFF_NATIVE') else 'OFF'}",
        ]
        subprocess.run(cfg, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


setup(
    name="specdiff_kernels",
    version="0.1.0",
    description="Exact speculative sampling for diffusion models: fused verify kernels and samplers",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["specdiff_kernels", "specdiff_kernels.*"]),
    package_data={
        "specdiff_kernels": [
            "models/weights/*.safetensors",
            "models/weights/*.json",
            # the patches model is a diffusers save_pretrained folder: model_index.json, unet/, scheduler/
            "models/weights/patches/*.json",
            "models/weights/patches/*/*.json",
            "models/weights/patches/*/*.safetensors",
        ]
    },
    ext_modules=[CMakeExtension("specdiff_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "scipy", "tqdm", "safetensors"],
    extras_require={
        "triton": ["triton"],
        # the range the tests ran (requirements-dev.txt pins it); widen it after testing another
        "diffusers": ["diffusers>=0.35,<0.36"],
        # the embedded patches pipeline; scikit-image's wheel carries the training photographs
        "patches": ["diffusers>=0.35,<0.36", "scikit-image>=0.22"],
        "plots": ["matplotlib"],
        # the demo's PNGs and its digit classifier; without them it prints a notice and skips them
        "demo": ["matplotlib", "scikit-learn"],
        # the PushT diffusion policy's environment (pymunk physics; pygame/opencv only render)
        "policy": ["gym-pusht>=0.1.8,<0.2"],
        "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["specdiff=specdiff_kernels.cli.commands:main"]},
    zip_safe=False,
)

"""Build specdiff_kernels: setup.py drives CMakeLists.txt (Ninja) to build specdiff_kernels._C.

Install against the torch already in the environment:  pip install --no-build-isolation .
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        prefix = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        cfg = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
               f"-DCMAKE_PREFIX_PATH={prefix}",
               "-DSPECDIFF_BUILD_PYTHON=ON",
               f"-DPython_EXECUTABLE={sys.executable}",
               f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
               f"-DCMAKE_BUILD_TYPE={os.environ.get('SPECDIFF_BUILD_TYPE', 'Release')}",
               f"-DSPECDIFF_NATIVE={'OFF' if os.environ.get('SPECDIFF_PORTABLE') else 'ON'}"]
        subprocess.run(cfg, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    name="specdiff_kernels",
    version="0.1.0",
    description="Exact speculative sampling for diffusion models: fused verify kernels and samplers",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["specdiff_kernels", "specdiff_kernels.*"]),
    package_data={"specdiff_kernels": ["models/weights/*.safetensors", "models/weights/*.json"]},
    ext_modules=[CMakeExtension("specdiff_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "scipy", "tqdm", "safetensors"],
    extras_require={
        "triton": ["triton"],
        "diffusers": ["diffusers>=0.30"],
        "plots": ["matplotlib"],
        "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["specdiff=specdiff_kernels.cli:main"]},
    zip_safe=False,
)

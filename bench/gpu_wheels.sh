#!/usr/bin/env bash
# The lent GPU machines' image has no diffusers, which bench/bench_e2e.py and the diffusers
# baselines of bench/bench_latency.py need (it does have scikit-image, safetensors, Pillow,
# huggingface_hub, regex, requests). Run this once on a machine with a package registry: it
# downloads diffusers and the two packages of its dependencies the image lacks as wheels into
# .whl/ (git-ignored, ~4 MB). Name .whl in the device tool's `carry`; bench/gpu_checks.sh installs
# whatever lies in .whl/ into /tmp/site and puts it on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.35.2 importlib_metadata==10.2.0 lazy-importer==0.1.0
ls -la .whl

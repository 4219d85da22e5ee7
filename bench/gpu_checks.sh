#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with a CUDA GPU (e.g. a lent H100/H200):
#   1. build the C++ extension in place (the op schemas live there),
#   2. the GPU tests (compiled Triton kernels against the float64 reference, opcheck,
#      torch.compile, CUDA graphs, every autotune config),
#   3. the CUDA verify benchmark (bench/bench_verify_cuda.py), cut to a time budget,
#   4. the launch-cost breakdown (bench/bench_launch_overhead.py),
#   5. the round ops' GPU tests (python_tests/test_gpu_round.py) and benchmark
#      (bench/bench_round_ops.py --device cuda),
#   6. the samplers end to end on CUDA (python_tests/test_gpu_sampler.py) and their latency
#      (bench/bench_latency.py --device cuda),
#   7. e2e: speculative vs ancestral vs diffusers' own pipeline on the patches and digits models,
#      fp32 and fp16, with and without torch.compile, and the batch cost curve
#      (bench/bench_e2e.py --device cuda, cut to E2E_BUDGET seconds; E2E_ARGS adds arguments,
#      e.g. "--dtypes float16" or "--models digits" to run the rest in a second command;
#      E2E_DEVICE=cpu E2E_ARGS=--dry-run STEPS=e2e runs the step on a CPU machine in seconds),
#   8. the pusht policy's batch-1 latency per chunk for every sampler (bench/bench_policy.py
#      --latency-only; POLICY_DEVICE=cpu STEPS=policy is its dry run on a CPU machine).
# STEPS picks a subset (default: all of them).
# Logs and results go to $OUT (default bench/results/gpu_run). Runs under the machine's python3
# (PYTHON overrides); needs torch, triton, pytest, hypothesis, scipy, pybind11, cmake, ninja.
#   OUT=/tmp/gpu BENCH_BUDGET=200 bash bench/gpu_checks.sh
# All steps write more files than the device tool brings back (8): PACK=path.tgz also packs $OUT
# into one archive, e.g.  OUT=/tmp/gpu PACK=$OUT/gpu_results.tgz bash bench/gpu_checks.sh
# The machines' image has no diffusers: run bench/gpu_wheels.sh here first and carry .whl.
# The whole default run needs more than one 10-minute command: split it with STEPS (e.g.
# "build round_tests round_bench", then "sampler_tests latency" on the same warm machine).
set -u
OUT=${OUT:-bench/results/gpu_run}
STEPS=" ${STEPS:-build tests bench overhead round_tests round_bench sampler_tests latency e2e policy} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
# wheels carried for packages the machine lacks (diffusers: bench/gpu_wheels.sh)
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$OUT/env.txt"

if want build; then
  stamp "build"
  MAX_JOBS=$(nproc) timeout "${BUILD_TIMEOUT:-240}" $PY setup.py build_ext --inplace \
    >/tmp/specdiff_build.log 2>&1
  stamp "build rc=$?"; tail -n 3 /tmp/specdiff_build.log
fi
$PY -c "import specdiff_kernels.ops.verify as o; print('C++ extension loaded:', o.HAS_CPP)"

# one GPU test file: label, file under python_tests/, timeout [s], maxfail; log in $OUT/<file>.log
gpu_tests() {
  stamp "$1"
  SPECDIFF_TEST_GPU=1 timeout "$3" $PY -m pytest "python_tests/$2.py" -q -ra --maxfail="$4" \
    -p no:cacheprovider --durations=8 >"$OUT/$2.log" 2>&1
  stamp "$1 rc=$?"; tail -n 40 "$OUT/$2.log"
}

if want tests; then
  gpu_tests "GPU tests" test_gpu "${TEST_TIMEOUT:-240}" 25
fi

# "cpu" where there is no GPU (the e2e step's dry run); the GPU steps need one anyway
slug=$($PY -c "import torch; from bench_verify_cuda import card_slug; print(card_slug(torch.cuda.get_device_name()))" 2>/dev/null || echo cpu)
if want overhead; then
  stamp "launch overhead"
  timeout "${OVERHEAD_TIMEOUT:-120}" $PY bench/bench_launch_overhead.py \
    --out "$OUT/launch_overhead_$slug" >"$OUT/overhead.log" 2>&1
  stamp "launch overhead rc=$?"; cat "$OUT/overhead.log"
fi

if want bench; then
  stamp "benchmark"
  timeout "${BENCH_TIMEOUT:-300}" $PY bench/bench_verify_cuda.py --device cuda ${BENCH_ARGS:-} \
    --time-budget "${BENCH_BUDGET:-200}" --out "$OUT/verify_cuda_$slug" >"$OUT/bench.log" 2>&1
  stamp "benchmark rc=$?"; cat "$OUT/bench.log"
fi

if want round_tests; then
  gpu_tests "round-op GPU tests" test_gpu_round "${ROUND_TEST_TIMEOUT:-240}" 25
fi

if want round_bench; then
  stamp "round-op benchmark"
  timeout "${ROUND_BENCH_TIMEOUT:-180}" $PY bench/bench_round_ops.py --device cuda \
    --out "$OUT/round_ops_$slug" >"$OUT/round_bench.log" 2>&1
  stamp "round-op benchmark rc=$?"; cat "$OUT/round_bench.log"
fi

if want sampler_tests; then
  gpu_tests "sampler GPU tests" test_gpu_sampler "${SAMPLER_TEST_TIMEOUT:-300}" 10
fi

if want latency; then
  stamp "sampler latency benchmark"
  timeout "${LATENCY_TIMEOUT:-300}" $PY bench/bench_latency.py --device cuda --reps "${LATENCY_REPS:-3}" \
    --out "$OUT/latency_$slug" >"$OUT/latency.log" 2>&1
  stamp "sampler latency benchmark rc=$?"; tail -n 40 "$OUT/latency.log"
fi

if want e2e; then
  stamp "end-to-end benchmark"
  timeout "${E2E_TIMEOUT:-570}" $PY bench/bench_e2e.py --device "${E2E_DEVICE:-cuda}" \
    --time-budget "${E2E_BUDGET:-420}" ${E2E_ARGS:-} --out "$OUT/e2e_$slug" >"$OUT/e2e.log" 2>&1
  stamp "end-to-end benchmark rc=$?"; tail -n 60 "$OUT/e2e.log"
fi

# 8. the pusht policy's batch-1 latency per chunk (every sampler cell, no closed loop: the
#    machine has no gym-pusht; the planning inputs come from bench/results/policy_cpu.json);
#    POLICY_DEVICE=cpu runs it here as a dry run
if want policy; then
  stamp "policy latency"
  timeout "${POLICY_TIMEOUT:-240}" $PY bench/bench_policy.py --device "${POLICY_DEVICE:-cuda}" \
    --latency-only --threads 1 --latency-chunks "${POLICY_CHUNKS:-20}" \
    --out "$OUT/policy_$slug" >"$OUT/policy.log" 2>&1
  stamp "policy latency rc=$?"; tail -n 30 "$OUT/policy.log"
fi

if [ -n "${PACK:-}" ]; then
  tar czf "$PACK" -C "$OUT" . && stamp "packed $OUT into $PACK"
fi

"""Ahead-of-time check of the compiled (GPU) round kernels on a CPU machine: every Triton kernel
of ``specdiff_kernels.triton_round`` compiles to an sm_90 cubin for fp16/bf16/fp32/fp64 states,
both freeze modes, with the clip bound typed fp32 (direct launch) or fp64 (how Inductor passes
Python floats: on an H200 an fp64 bound once promoted the fp32 accumulators and failed to
compile under torch.compile)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from specdiff_kernels import triton_round as tr
T = GPUTarget("cuda", 90, 32)

def compile_(fn, sig, consts):
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
    return triton.compile(src, target=T, options=dict(num_warps=4))

def signature(fn, dt, acc, clip_type):
    types = {"steps_ptr": "*i64", "len_ptr": "*i64", "seed_ptr": "*i64", "ids_ptr": "*i64",
             "nacc_ptr": "*i64", "comm_ptr": "*i64", "exact_ptr": "*i1", "coef_ptr": "*fp64",
             "part_ptr": "*fp64" if acc else "*fp32", "lr_ptr": "*fp32", "u_ptr": "*fp32"}
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            continue
        n = p.name
        sig[n] = types.get(n, f"*{dt}" if n.endswith("_ptr") else
                           (clip_type if n.startswith("clip") else "i32"))
    return sig

n = 0
for clip_type in ("fp32", "fp64"):
    for dt, acc in (("fp32", False), ("bf16", False), ("fp16", False), ("fp64", True)):
        for freeze in (0, 1):
            base = dict(FREEZE=freeze, HAS_CLIP=True, ACC_FP64=acc, BLOCK=256)
            for fn, extra in ((tr._frozen_draft_kernel, {}), (tr._verify_partials_kernel, {}),
                              (tr._verify_finalize_kernel, dict(BLOCK_L=8, BLOCK_NB=4))):
                assert "cubin" in compile_(fn, signature(fn, dt, acc, clip_type), {**base, **extra}).asm
                n += 1
for dt, acc in (("fp32", False), ("bf16", False), ("fp64", True)):
    compile_(tr._chain_noise_kernel, signature(tr._chain_noise_kernel, dt, acc, "fp32"),
             dict(ACC_FP64=acc, BLOCK=256))
    n += 1
print("AOT-ROUND-OK", n)
"""


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
                    reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_round_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "AOT-ROUND-OK" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-6000:]

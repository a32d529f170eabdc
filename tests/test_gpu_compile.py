"""Ahead-of-time GPU compile of the Triton kernels (bench/gpu_compile.py), runnable without a GPU.

The interpreter can never show register spills or a missing tensor-core path; ptxas can, on this CPU.
The quick set (one config per kernel, fp16) for sm_90a runs here; the full table is
``python -m bench.gpu_compile``. Skipped where Triton's CUDA backend or its ptxas is missing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_compile", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_kernels_compile_for_hopper_without_spills():
    """Every kernel of the quick set compiles for sm_90a: no stack, shared memory within the limit, wgmma, TMA."""
    proc = _run("--targets", "90", "--quick")
    if proc.returncode == 2:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "sm_90a" in line]
    kernels = {line.split()[0] for line in rows}
    assert kernels == {"prepass", "comoment", "comoment-tma", "finalize", "pairs"}, proc.stdout
    gemm_rows = [line for line in rows if line.startswith("comoment")]
    assert gemm_rows and all("wgmma" in line for line in gemm_rows), proc.stdout
    assert all(" yes " in line for line in rows if line.startswith("comoment-tma")), proc.stdout


def test_gpu_compile_rejects_unknown_target():
    proc = _run("--targets", "75", timeout=120)
    if "skipped" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 2 and "unknown target" in proc.stderr


def test_spill_and_limit_checks_fail():
    """The checks themselves: a result with stack, or too much shared memory, or no wgmma, is a failure."""
    sys.path.insert(0, str(REPO))
    from bench.gpu_compile import SMEM_LIMIT, Job, Result

    job = Job("comoment", "float16 test", 90, ("float16", 128, 128, 64, 4, 4))
    assert Result(job, 0.0, regs=200, smem=1024, mma="wgmma").problems == []
    assert "spills" in Result(job, 0.0, regs=255, stack=8, mma="wgmma").problems[0]
    assert "shared" in Result(job, 0.0, smem=SMEM_LIMIT[90] + 1, mma="wgmma").problems[0]
    assert "instead of wgmma" in Result(job, 0.0, mma="mma.sync").problems[0]
    assert "compile error" in Result(job, 0.0, error="boom").problems[0]
    tma = Job("comoment-tma", "float16 test", 90, ("float16", 128, 128, 64, 4, 4))
    assert "no TMA" in Result(tma, 0.0, mma="wgmma", tma=False).problems[0]

"""Compile every Triton kernel of univ_kernels ahead of time for named GPUs, with no GPU, and check the result.

    python3 -m bench.gpu_compile                       # sm_80, sm_90a, sm_100a: every kernel, config, dtype
    python3 -m bench.gpu_compile --targets 90 --quick  # one config per kernel (the CI test)
    python3 -m bench.gpu_compile --markdown bench/gpu_compile.md

Each kernel is specialised exactly as the JIT would specialise it for a representative launch (GPT2-small
shapes: aligned pointers, unit strides become constants, sizes divisible by 16), compiled by
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` (capability 90 compiles for sm_90a,
100 for sm_100a: Triton adds the "a"), and its cubin read with the ``cuobjdump --dump-resource-usage`` that
ships inside the triton wheel. Per kernel and config it prints registers, stack (spill) bytes, shared
memory against the target's per-block limit, and the matrix instruction found in the PTX (wgmma on sm_90a,
tcgen05 on sm_100a, mma.sync on sm_80; TMA: cp.async.bulk.tensor).

Exit status 1 on a compile error, any stack use (all these kernels are hot), shared memory over the limit,
or a 16-bit GEMM not on the target's best matrix path; 0 when all pass; 2 when Triton's CUDA backend or
its ptxas is unavailable here (nothing was checked).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

TARGETS = {80: "sm_80", 90: "sm_90a", 100: "sm_100a"}
# Largest shared memory one block may opt into (CUDA programming guide, compute capabilities table).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
BEST_MMA = {80: "mma.sync", 90: "wgmma", 100: "tcgen05"}
MMA_PATTERNS = [("tcgen05", r"tcgen05\.mma"), ("wgmma", r"wgmma\.mma_async"), ("mma.sync", r"\bmma\.sync")]
T, N = 16384, 3072  # representative launch: 16 k tokens × one GPT2-small MLP layer


@dataclass(frozen=True)
class Job:
    kernel: str  # "prepass", "comoment", "comoment-sym", "comoment-tma", "finalize"
    variant: str  # dtype and config, as printed
    cap: int
    params: tuple  # kernel-specific: dtypes and tile shape


@dataclass
class Result:
    job: Job
    seconds: float
    error: str | None = None
    regs: int = 0
    stack: int = 0
    smem: int = 0  # dynamic (Triton's) + static (cuobjdump) bytes
    mma: str = "-"
    tma: bool = False

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.stack:
            out.append(f"{self.stack} B stack (spills)")
        if self.smem > SMEM_LIMIT[self.job.cap]:
            out.append(f"shared {self.smem} B > {SMEM_LIMIT[self.job.cap]} B")
        if self.job.kernel.startswith("comoment") and self.job.params[0] != "float32":
            if self.mma != BEST_MMA[self.job.cap]:
                out.append(f"{self.mma} instead of {BEST_MMA[self.job.cap]}")
        if self.job.kernel == "comoment-tma" and self.job.cap >= 90 and not self.tma:
            out.append("no TMA (cp.async.bulk.tensor) in the PTX")
        return out


def jobs_for(targets: list[int], quick: bool) -> list[Job]:
    from univ_kernels import pairs
    from univ_kernels.comoment import BLOCKED_SHAPES, BLOCKED_SHAPES_FP32, TMA_SHAPES
    from univ_kernels.finalize import BLOCK_M, BLOCK_N, NUM_WARPS

    blocked = BLOCKED_SHAPES[:1] if quick else BLOCKED_SHAPES
    tma = TMA_SHAPES[:1] if quick else TMA_SHAPES
    gemm_dtypes = ("float16",) if quick else ("float16", "bfloat16", "float32")
    prepass = (
        [("bfloat16", "float16")]
        if quick
        else [("float32", "float32"), ("bfloat16", "float16"), ("float16", "float16"), ("bfloat16", "bfloat16")]
    )
    jobs = []
    for cap in targets:
        for x_dt, op_dt in prepass:
            jobs.append(Job("prepass", f"{x_dt}->{op_dt}", cap, (x_dt, op_dt)))
        for dt in gemm_dtypes:
            for shape in blocked if dt != "float32" else BLOCKED_SHAPES_FP32:
                jobs.append(Job("comoment", f"{dt} {_shape_name(shape)}", cap, (dt, *shape)))
        if not quick:  # the symmetric variant (W += XᵀX) in the first config
            jobs.append(Job("comoment-sym", f"float16 {_shape_name(blocked[0])}", cap, ("float16", *blocked[0])))
        if cap >= 90:
            for dt in gemm_dtypes[:2] if not quick else gemm_dtypes:
                if dt == "float32":
                    continue
                for shape in tma:
                    jobs.append(Job("comoment-tma", f"{dt} {_shape_name(shape)}", cap, (dt, *shape)))
        jobs.append(Job("finalize", f"{BLOCK_M}x{BLOCK_N} w{NUM_WARPS} bins=100", cap, (BLOCK_M, BLOCK_N, NUM_WARPS)))
        for dt in ("float32",) if quick else ("float32", "bfloat16"):
            jobs.append(Job("pairs", f"{dt} {pairs.BLOCK_I}x{pairs.BLOCK_J}x{pairs.BLOCK_T}", cap, (dt,)))
    return jobs


def _shape_name(shape) -> str:
    m, n, k, w, s = shape
    return f"{m}x{n}x{k} w{w} s{s}"


def _launch(job: Job):
    """(jit function, args, kwargs) of a representative launch of ``job``'s kernel."""
    import importlib

    comoment, finalize, prepass = (
        importlib.import_module(f"univ_kernels.{m}") for m in ("comoment", "finalize", "prepass")
    )

    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if job.kernel == "prepass":
        x_dt, op_dt = (dt[d] for d in job.params)
        x = torch.empty((T, N), dtype=x_dt)
        out = torch.empty((T, N), dtype=op_dt)
        splits = 4
        parts = [torch.empty((splits, N)) for _ in range(2)] + [torch.empty((splits, N), dtype=torch.int32)] * 2
        from univ_kernels._launch import triton_dtype

        args = (x, torch.empty(N), out, *parts, T, N, T // splits, x.stride(0), x.stride(1))
        kw = dict(OUT_DTYPE=triton_dtype(op_dt), ROUND_BF16=False, BLOCK_T=prepass.BLOCK_T, BLOCK_N=prepass.BLOCK_N)
        return prepass._prepass_kernel, args, kw
    if job.kernel in ("comoment", "comoment-sym"):
        op_dt = dt[job.params[0]]
        bm, bn, bk, w, s = job.params[1:]
        a = torch.empty((T, N), dtype=op_dt)
        b = torch.empty((T, N), dtype=op_dt)
        c = torch.empty((N, N))
        args = (a, b, c, N, N, T, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
        kw = dict(
            UPCAST=False,
            PRECISION="ieee" if op_dt == torch.float32 else "tf32",
            SYMMETRIC=job.kernel == "comoment-sym",
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=8,
            num_warps=w,
            num_stages=s,
        )
        return comoment._comoment_kernel, args, kw
    if job.kernel == "comoment-tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        op_dt = dt[job.params[0]]
        bm, bn, bk, w, s = job.params[1:]
        a = torch.empty((T, N), dtype=op_dt)
        b = torch.empty((T, N), dtype=op_dt)
        c = torch.empty((N, N))
        descs = (
            TensorDescriptor.from_tensor(a, [bk, bm]),
            TensorDescriptor.from_tensor(b, [bk, bn]),
            TensorDescriptor.from_tensor(c, [bm, bn // 2]),
        )
        kw = dict(
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=8,
            UPCAST=False,
            NUM_SMS=comoment.DEFAULT_NUM_SMS,
            WARP_SPECIALIZE=False,
            num_warps=w,
            num_stages=s,
        )
        return comoment._comoment_tma_kernel, (*descs, c, N, N, T), kw
    if job.kernel == "finalize":
        bm, bn, warps = job.params
        m_blocks = N // bm
        vec = [torch.empty(N) for _ in range(4)]
        row = [torch.empty(N, dtype=d) for d in (torch.float32, torch.int32) * 2]
        col = [torch.empty((m_blocks, N), dtype=d) for d in (torch.float32, torch.int32) * 2]
        hist = torch.empty((m_blocks, 128), dtype=torch.int32)
        c = torch.empty((N, N))
        args = (c, *vec, *row, *col, hist, N, N, c.stride(0), c.stride(1))
        kw = dict(BINS=100, HIST_PAD=128, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        return finalize._finalize_kernel, args, kw
    if job.kernel == "pairs":
        from univ_kernels import pairs

        op_dt = dt[job.params[0]]
        a, b = torch.empty((T, N), dtype=op_dt), torch.empty((T, N), dtype=op_dt)
        cand = torch.empty((N, 32), dtype=torch.int64)
        c = torch.empty((N, 32))
        args = (a, b, cand, c, T, N, 32, a.stride(0), a.stride(1), b.stride(0), b.stride(1), cand.stride(0),
                c.stride(0))  # fmt: skip
        kw = dict(BLOCK_I=pairs.BLOCK_I, BLOCK_J=pairs.BLOCK_J, BLOCK_T=pairs.BLOCK_T, num_warps=4)
        return pairs._gathered_kernel, args, kw
    raise ValueError(job.kernel)


def _source(fn, target, args, kwargs):
    """ASTSource and options as ``fn[grid](*args, **kwargs)`` would build them (Triton 3.9's JIT binder)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_one(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    try:
        fn, args, kw = _launch(job)
        target = GPUTarget("cuda", job.cap, 32)
        src, options = _source(fn, target, args, kw)
        kernel = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every failure is reported, with its first line
        return Result(
            job, time.perf_counter() - t0, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        )
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [str(cuobjdump()), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", usage))
    mma = next((name for name, pat in MMA_PATTERNS if re.search(pat, ptx)), "fma")
    return Result(
        job,
        time.perf_counter() - t0,
        regs=int(fields.get("REG", 0)),
        stack=int(fields.get("STACK", 0)),
        smem=int(kernel.metadata.shared or 0) + int(fields.get("SHARED", 0)),
        mma=mma,
        tma="cp.async.bulk.tensor" in ptx,
    )


def unavailable() -> str | None:
    """Why nothing can be compiled here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:  # noqa: BLE001
        return f"triton's CUDA backend does not import: {e}"
    for arch in (80, 90):
        path = get_ptxas(arch).path
        if not path or not os.access(path, os.X_OK):
            return f"ptxas for sm_{arch} not found ({path})"
    if not os.access(cuobjdump(), os.X_OK):
        return f"cuobjdump not found at {cuobjdump()}"
    return None


def table(results: list[Result]) -> list[str]:
    head = f"{'kernel':<13} {'variant':<24} {'target':<8} {'regs':>4} {'stack':>5} {'smem KB':>8} {'limit':>5}"
    head += f"  {'mma':<9}{'tma':<4} {'s':>4}  status"
    lines = [head]
    for r in results:
        j = r.job
        status = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
        smem = f"{r.smem / 1024:8.1f}" if not r.error else f"{'-':>8}"
        lines.append(
            f"{j.kernel:<13} {j.variant:<24} {TARGETS[j.cap]:<8} {r.regs:>4} {r.stack:>5} {smem} "
            f"{SMEM_LIMIT[j.cap] // 1024:>5}  {r.mma:<9}{'yes' if r.tma else '-':<4} {r.seconds:4.1f}  {status}"
        )
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="80,90,100", help="compute capabilities, comma-separated (80, 90, 100)")
    p.add_argument("--quick", action="store_true", help="one config and dtype per kernel (CI)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (processes)")
    p.add_argument("--markdown", type=Path, help="also write the table, in a code block, to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "univ_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "gpu_compile: skipped: univ_kernels was imported under TRITON_INTERPRET; run it as its own process",
            file=sys.stderr,
        )
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces @triton.jit functions: compile the real ones
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    why = unavailable()
    if why:
        print(f"gpu_compile: skipped: {why}", file=sys.stderr)
        return 2
    targets = [int(t) for t in args.targets.split(",")]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        print(f"gpu_compile: unknown target(s) {bad}; choose from {sorted(TARGETS)}", file=sys.stderr)
        return 2
    import triton

    jobs = jobs_for(targets, args.quick)
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(compile_one, jobs))
    else:
        results = [compile_one(j) for j in jobs]
    lines = table(results)
    failed = [r for r in results if r.problems]
    lines.append(
        f"{len(results)} compiles in {time.perf_counter() - t0:.1f} s ({args.jobs} processes), triton "
        f"{triton.__version__}, torch {torch.__version__}: {len(failed)} failed"
    )
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("```\n" + "\n".join(lines) + "\n```\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

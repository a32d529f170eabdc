"""Co-moment update: C += AᵀB, the one GEMM per batch and pair that dominates the whole run.

A [T, n_a] and B [T, n_b] are pre-passed operands (shifted, in the operand dtype); C [n_a, n_b] is the
fp32 accumulator, updated in place. Two GPU paths compute it:

- ``"cublas"``: ``torch.addmm(C, Aᵀ, B, out_dtype=float32, out=C)`` (torch ≥ 2.8), the vendor GEMM with
  β = 1 so C is read and written once per batch;
- ``"triton"``: a blocked GEMM with the accumulate fused into its epilogue (load the C tile, add, store).

With T ≥ 16k tokens per batch the C read-modify-write is < 1 % of the traffic of the GEMM itself, so
split-K is never needed (n_a and n_b are large). FLOPs per call: 2·T·n_a·n_b.
"""

from __future__ import annotations

import torch

from univ_kernels._launch import cdiv, interpreting, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

GEMMS = ("cublas", "triton")
# Default GPU path. cuBLAS until the Triton kernel is measured faster on the target GPU (bench/gpu_check.py).
DEFAULT_GEMM = "cublas"


def _gpu_configs():
    # Hopper-friendly tiles (128×256×64 is the shape cuBLAS-class kernels use for large bf16 GEMMs);
    # a few alternatives let the autotuner adapt to other GPUs. restore_value: the kernel updates C in
    # place, so every timing trial must start from the same C (DESIGN.md: autotune corrupts it otherwise).
    shapes = [
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


if triton is not None:

    @triton.jit
    def _comoment_kernel(
        a_ptr,
        b_ptr,
        c_ptr,  # A [K, M], B [K, N] operands; C [M, N] fp32 accumulator
        M,
        N,
        K,
        stride_ak,
        stride_am,
        stride_bk,
        stride_bn,
        stride_cm,
        stride_cn,
        UPCAST: tl.constexpr,  # interpreter: tl.dot on bf16 returns garbage, so dot in fp32
        PRECISION: tl.constexpr,  # "ieee" for fp32 operands (exact), ignored for 16-bit ones
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Grouped program order: GROUP_M row-blocks share each B column-block while it sits in L2.
        pid = tl.program_id(0)
        n_pid_m = tl.cdiv(M, BLOCK_M)
        n_pid_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * n_pid_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(n_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * n_pid_n)) % group_size
        pid_n = (pid % (GROUP_M * n_pid_n)) // group_size

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_m[None, :] * stride_am  # [BLOCK_K, BLOCK_M]
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]
        m_ok = offs_m < M
        n_ok = offs_n < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K  # masked tail: T is rarely a multiple of BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        # Fused epilogue: C += acc, one read and one write of the tile.
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = m_ok[:, None] & n_ok[None, :]
        c = tl.load(c_ptrs, mask=c_mask, other=0.0)
        tl.store(c_ptrs, c + acc, mask=c_mask)

    _comoment_kernel_tuned = triton.autotune(configs=_gpu_configs(), key=["M", "N"], restore_value=["c_ptr"])(
        _comoment_kernel
    )


def _comoment_update_triton(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    K, M = a.shape
    N = b.shape[1]
    args = (a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    if interpreting():
        # One small config: the interpreter runs programs one after another (and cannot autotune).
        bm, bn, bk = 32, 32, 32
        grid = (cdiv(M, bm) * cdiv(N, bn),)
        _comoment_kernel[grid](
            *args, UPCAST=a.dtype != torch.float32, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4
        )
        return
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _comoment_kernel_tuned[grid](*args, UPCAST=False, PRECISION=precision)


def _comoment_update_cublas(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype == torch.float32:
        c.addmm_(a.t(), b)
    else:  # 16-bit operands, fp32 accumulate and output: one cuBLAS call with β = 1
        torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)


def comoment_update_torch(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """C += AᵀB in plain PyTorch (CPU backend and reference); 16-bit operands are upcast on CPU."""
    if c.device.type == "cuda":
        _comoment_update_cublas(c, a, b)
    else:
        c.addmm_(a.t().float(), b.float())


def comoment_update(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto", gemm: str | None = None
) -> None:
    """C += AᵀB in place. C [n_a, n_b] fp32; A [T, n_a], B [T, n_b] in one operand dtype, same device.

    ``gemm`` picks the GPU path for the triton backend: ``"cublas"`` (default) or ``"triton"``.

    Example:
        >>> c = torch.zeros(2, 1)
        >>> comoment_update(c, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0], [1.0]]), backend="torch")
        >>> c.tolist()
        [[4.0], [6.0]]
    """
    if c.dtype != torch.float32 or c.shape != (a.shape[1], b.shape[1]):
        raise ValueError(f"C must be float32 [{a.shape[1]}, {b.shape[1]}], got {c.dtype} {tuple(c.shape)}")
    if a.shape[0] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(f"operands disagree: A {a.dtype} {tuple(a.shape)}, B {b.dtype} {tuple(b.shape)}")
    if a.shape[0] == 0:
        return
    gemm = gemm or DEFAULT_GEMM
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    if resolve_backend(backend, c.device) == "triton" and (gemm == "triton" or c.device.type != "cuda"):
        _comoment_update_triton(c, a, b)
    else:
        comoment_update_torch(c, a, b)

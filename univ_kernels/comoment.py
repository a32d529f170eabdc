"""Co-moment update: C += AᵀB, the one GEMM per batch and pair that dominates the whole run.

A [T, n_a] and B [T, n_b] are pre-passed operands (shifted, in the operand dtype); C [n_a, n_b] is the
fp32 accumulator, updated in place. Three GPU paths compute it (``gemm=``):

- ``"cublas"`` (default): ``torch.addmm(C, Aᵀ, B, out_dtype=float32, out=C)`` (torch ≥ 2.8), the vendor
  GEMM with β = 1 so C is read and written once per batch;
- ``"triton"``: a blocked GEMM with the accumulate fused into its epilogue (load the C tile, add, store);
- ``"triton-tma"``: Hopper/Blackwell: TMA tensor descriptors and a persistent grid (one program per SM
  walking the tiles), as Triton's persistent-matmul tutorial; falls back to ``"triton"`` where TMA cannot
  address the operands (rows not 16-byte aligned, a strided last dimension).

The epilogue adds C half a tile at a time: loading the whole C tile beside the live accumulator made every
configuration spill on sm_80 and sm_90 (``bench/gpu_compile.py``; starting the accumulator from C did not
help there). With T ≥ 16k tokens per batch the C read-modify-write is < 1 % of the GEMM's traffic, so
split-K is never needed. FLOPs per call: 2·T·n_a·n_b.

``comoment_update_symmetric`` is the within-layer case W += XᵀX: only tiles on or above the diagonal are
computed (about half the FLOPs), and ``symmetrize_upper`` mirrors the upper triangle where W is read.
"""

from __future__ import annotations

import torch

from univ_kernels._launch import cdiv, interpreting, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

GEMMS = ("cublas", "triton", "triton-tma")
# Default GPU path. cuBLAS until a Triton kernel is measured faster on the target GPU (bench/gpu_check.py).
DEFAULT_GEMM = "cublas"
# Streaming-multiprocessor count the persistent grid assumes when no device is there to ask (H100/H200).
DEFAULT_NUM_SMS = 132
# torch backend, symmetric update: the diagonal band of W is cut into this many row blocks, each one GEMM
# over the columns from its own diagonal onwards: (1 + 1/blocks)/2 of the full FLOPs, 56 % at 8.
SYMMETRIC_ROW_BLOCKS = 8
SYMMETRIC_MIN_ROWS = 256  # below this a row block's GEMM runs far off the BLAS peak


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Every one compiles without a spill and within the
# shared-memory limit on sm_80, sm_90a and sm_100a (bench/gpu_compile.py checks it; table in
# bench/RESULTS.md). Dropped on that evidence: 256×128×64/8 warps and 128×128×{64,32}/4 warps (spill on
# sm_80). 128×256×64 / 8 warps is the shape cuBLAS-class kernels use for large 16-bit GEMMs.
BLOCKED_SHAPES = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 32, 4, 4),
]
# fp32 operands take the exact ("ieee") FMA path: its operand fragments are 2× larger, and 128×256 or
# 128×128×64 tiles spilled 2-18 kB of stack on every target.
BLOCKED_SHAPES_FP32 = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
]
# The TMA kernel stages the C half-tile through shared memory beside the operand stages, so fewer stages
# fit: 128×256×64 with 3 stages needed 274 kB of the 227 kB a block may have.
TMA_SHAPES = [
    (128, 256, 32, 8, 4),
    (128, 256, 64, 8, 2),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 8, 4),
]


def _blocked_configs(shapes):
    # restore_value: the kernel updates C in place, so every timing trial must start from the same C
    # (autotuning an in-place kernel corrupts it otherwise).
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def _set_block_shapes(nargs) -> None:
    """Autotune pre-hook: the host descriptors' block shapes follow the config being tried."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bk, bm]
    nargs["b_desc"].block_shape = [bk, bn]
    nargs["c_desc"].block_shape = [bm, bn // 2]


def _tma_configs():
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
            num_warps=w,
            num_stages=s,
            pre_hook=_set_block_shapes,
        )
        for m, n, k, w, s in TMA_SHAPES
    ]


if triton is not None:

    @triton.jit
    def _add_into_c(
        c_ptr, acc, offs_m, offs_n0, m_end, N, stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        """C[tile] += acc, half a tile at a time: only half of C is live beside the accumulator."""
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        offs_h = offs_n0 + tl.arange(0, BLOCK_N // 2)
        row_ok = (offs_m < m_end)[:, None]
        ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_h[None, :] * stride_cn
        mask = row_ok & (offs_h < N)[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc0, mask=mask)
        offs_h += BLOCK_N // 2
        ptrs += (BLOCK_N // 2) * stride_cn
        mask = row_ok & (offs_h < N)[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc1, mask=mask)

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
        SYMMETRIC: tl.constexpr,  # A is B: skip the tiles wholly below the diagonal (W += XᵀX)
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
        k_end = K
        m_end = M
        if SYMMETRIC:  # a skipped tile runs no K step, and its epilogue's masks cover nothing
            below = (pid_n + 1) * BLOCK_N <= pid_m * BLOCK_M
            k_end = tl.where(below, 0, K)
            m_end = tl.where(below, 0, M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows and columns past the edge read (valid) wrapped ones, whose results are never stored: no
        # M/N masks in the loop, as in Triton's matmul tutorial.
        load_m = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
        load_n = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + load_m[None, :] * stride_am  # [BLOCK_K, BLOCK_M]
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + load_n[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            k_ok = (offs_k < K - k0)[:, None]  # masked tail: T is rarely a multiple of BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok, other=0.0)
            b = tl.load(b_ptrs, mask=k_ok, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        _add_into_c(c_ptr, acc, offs_m, pid_n * BLOCK_N, m_end, N, stride_cm, stride_cn, BLOCK_M, BLOCK_N)

    _comoment_kernel_tuned = {  # by operand bits
        bits: triton.autotune(configs=_blocked_configs(shapes), key=["M", "N", "SYMMETRIC"], restore_value=["c_ptr"])(
            _comoment_kernel
        )
        for bits, shapes in ((16, BLOCKED_SHAPES), (32, BLOCKED_SHAPES_FP32))
    }

    @triton.jit
    def _tile_coords(tile_id, n_pid_m, n_pid_n, GROUP_M: tl.constexpr):
        in_group = GROUP_M * n_pid_n
        first_m = (tile_id // in_group) * GROUP_M
        group_size = tl.minimum(n_pid_m - first_m, GROUP_M)
        return first_m + (tile_id % group_size), (tile_id % in_group) // group_size

    @triton.jit
    def _comoment_tma_kernel(
        a_desc,  # A [K, M], block [BLOCK_K, BLOCK_M]
        b_desc,  # B [K, N], block [BLOCK_K, BLOCK_N]
        c_desc,  # C [M, N] fp32, block [BLOCK_M, BLOCK_N // 2]
        c_ptr,  # C itself: unused by the kernel, named so autotune can restore it between trials
        M,
        N,
        K,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr,  # interpreter only, as in the blocked kernel
        NUM_SMS: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr,
    ):
        # Persistent grid: NUM_SMS programs walk the tiles in grouped order; TMA pads the K tail with zeros
        # and clips stores at the edges, so no masks anywhere.
        start = tl.program_id(0)
        n_pid_m = tl.cdiv(M, BLOCK_M)
        n_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        n_tiles = n_pid_m * n_pid_n
        tile_c = start - NUM_SMS  # the epilogue's tile, tracked apart so that flatten may overlap them
        for tile in tl.range(start, n_tiles, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _tile_coords(tile, n_pid_m, n_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                a = a_desc.load([ki * BLOCK_K, off_m])
                b = b_desc.load([ki * BLOCK_K, off_n])
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a.T, b, acc)
            tile_c += NUM_SMS
            pid_m, pid_n = _tile_coords(tile_c, n_pid_m, n_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            c_desc.store([off_m, off_n], c_desc.load([off_m, off_n]) + acc0)
            c_desc.store([off_m, off_n + BLOCK_N // 2], c_desc.load([off_m, off_n + BLOCK_N // 2]) + acc1)

    _comoment_tma_kernel_tuned = triton.autotune(configs=_tma_configs(), key=["M", "N"], restore_value=["c_ptr"])(
        _comoment_tma_kernel
    )


def _comoment_update_triton(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, symmetric: bool = False) -> None:
    K, M = a.shape
    N = b.shape[1]
    args = (a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    if interpreting():
        # One small config: the interpreter runs programs one after another (and cannot autotune).
        bm, bn, bk = 32, 32, 32
        grid = (cdiv(M, bm) * cdiv(N, bn),)
        _comoment_kernel[grid](
            *args,
            UPCAST=a.dtype != torch.float32,
            PRECISION=precision,
            SYMMETRIC=symmetric,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=4,
        )
        return
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    tuned = _comoment_kernel_tuned[8 * a.element_size()]
    tuned[grid](*args, UPCAST=False, PRECISION=precision, SYMMETRIC=symmetric)


def tma_compatible(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """TMA addresses 2-D tiles whose base and row pitch are 16-byte aligned and whose last dimension is dense."""
    if a.dtype == torch.float32:
        return False  # tf32 wgmma wants K-major operands; A and B here are M- and N-major (the blocked kernel)
    for t in (a, b, c):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def _comoment_update_tma(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    K, M = a.shape
    N = b.shape[1]
    if interpreting():
        bm, bn, bk, sms = 32, 32, 32, 3
        descs = (
            TensorDescriptor.from_tensor(a, [bk, bm]),
            TensorDescriptor.from_tensor(b, [bk, bn]),
            TensorDescriptor.from_tensor(c, [bm, bn // 2]),
        )
        n_tiles = cdiv(M, bm) * cdiv(N, bn)
        _comoment_tma_kernel[(min(sms, n_tiles),)](
            *descs,
            c,
            M,
            N,
            K,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=4,
            UPCAST=True,
            NUM_SMS=sms,
            WARP_SPECIALIZE=False,
        )
        return
    # Block shapes are placeholders: the autotune pre-hook sets them per config.
    descs = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (a, b, c)]
    sms = _num_sms(c.device)
    grid = lambda meta: (min(sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    _comoment_tma_kernel_tuned[grid](*descs, c, M, N, K, UPCAST=False, NUM_SMS=sms, WARP_SPECIALIZE=False)


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


def _check(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gemm: str | None) -> str:
    if c.dtype != torch.float32 or c.shape != (a.shape[1], b.shape[1]):
        raise ValueError(f"C must be float32 [{a.shape[1]}, {b.shape[1]}], got {c.dtype} {tuple(c.shape)}")
    if a.shape[0] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(f"operands disagree: A {a.dtype} {tuple(a.shape)}, B {b.dtype} {tuple(b.shape)}")
    gemm = gemm or DEFAULT_GEMM
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    return gemm


def comoment_update(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto", gemm: str | None = None
) -> None:
    """C += AᵀB in place. C [n_a, n_b] fp32; A [T, n_a], B [T, n_b] in one operand dtype, same device.

    ``gemm`` picks the GPU path for the triton backend: ``"cublas"`` (default), ``"triton"`` or
    ``"triton-tma"`` (Hopper and newer; where TMA cannot address the operands it runs ``"triton"``).

    Example:
        >>> c = torch.zeros(2, 1)
        >>> comoment_update(c, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0], [1.0]]), backend="torch")
        >>> c.tolist()
        [[4.0], [6.0]]
    """
    gemm = _check(c, a, b, gemm)
    if a.shape[0] == 0 or c.numel() == 0:
        return
    if resolve_backend(backend, c.device) == "triton" and (gemm != "cublas" or c.device.type != "cuda"):
        if gemm == "triton-tma" and tma_compatible(c, a, b):
            _comoment_update_tma(c, a, b)
        else:
            _comoment_update_triton(c, a, b)
    else:
        comoment_update_torch(c, a, b)


def _symmetric_torch(w: torch.Tensor, x: torch.Tensor) -> None:
    n = x.shape[1]
    rows = max(SYMMETRIC_MIN_ROWS, cdiv(n, SYMMETRIC_ROW_BLOCKS))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        comoment_update_torch(w[r0:r1, r0:], x[:, r0:r1], x[:, r0:])


def comoment_update_symmetric(
    w: torch.Tensor, x: torch.Tensor, *, backend: str = "auto", gemm: str | None = None
) -> None:
    """W += XᵀX on and above the diagonal only, in place; about half the FLOPs of ``comoment_update(w, x, x)``.

    W [n, n] fp32, X [T, n]. Afterwards the upper triangle (j ≥ i) holds the sum; entries below the
    diagonal are unspecified (some tiles update them, most do not): read W through ``symmetrize_upper``.
    torch backend: row blocks of the diagonal band, one GEMM each; triton backend: the tiles wholly below
    the diagonal are skipped (``gemm="cublas"`` on CUDA uses the torch scheme, ``"triton-tma"`` the
    blocked kernel).

    Example:
        >>> w = torch.zeros(2, 2)
        >>> comoment_update_symmetric(w, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), backend="torch")
        >>> symmetrize_upper(w).tolist()
        [[10.0, 14.0], [14.0, 20.0]]
    """
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"W must be square [n, n], got {tuple(w.shape)}")
    gemm = _check(w, x, x, gemm)
    if x.shape[0] == 0 or w.numel() == 0:
        return
    if resolve_backend(backend, w.device) == "triton" and (gemm != "cublas" or w.device.type != "cuda"):
        _comoment_update_triton(w, x, x, symmetric=True)
    else:
        _symmetric_torch(w, x)


def symmetrize_upper(w: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from W's upper triangle (diagonal included), as a new tensor."""
    upper = torch.triu(w)
    return upper + torch.triu(w, diagonal=1).t()

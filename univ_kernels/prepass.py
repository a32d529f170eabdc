"""Pre-pass: shift, cast and column moments of one activation batch, in a single read.

For x [T, n] and a per-column shift s [n] (fp32) it produces, in one pass over x:

    operand[t, j]  = cast(x[t, j] - s[j])          [T, n] in the operand dtype, contiguous (feeds the GEMM)
    col_sum[j]     = Σ_t operand[t, j]             [n] fp32, of the *cast* values, so the later rank-1
    col_sumsq[j]   = Σ_t operand[t, j]²            [n] fp32   correction matches the GEMM operands exactly
    nonfinite[j]   = #{t : x[t, j] is NaN or ±Inf} [n] int32
    overflow[j]    = #{t : x finite, cast(x - s) infinite}  [n] int32 (float16 operands only)

Why shift: the naive Σxy − ΣxΣy/n in fp32 loses ~1e-3 in r over 1e8 tokens; with the operands centred
near the column mean it stays ~2e-6. ``ColumnMoments`` passes each batch's own mean as the
shift (estimated by ``column_sums``, a cheaper first read about a pivot) and merges batches with Chan's
formula (moments.py). Non-finite values are counted here, where x is read anyway, never by an extra scan.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from univ_kernels._launch import cdiv, interpreting, resolve_backend, triton_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# 64 × 128 tiles: each program streams BLOCK_T rows of BLOCK_N columns; wide in n for coalesced loads.
# Under the interpreter narrow tiles keep tests fast (tiles of 32–64); 128 rows per step, since
# each interpreted step costs ~10 ms of numpy overhead whatever its size.
BLOCK_T, BLOCK_N = 64, 128
BLOCK_T_INTERP, BLOCK_N_INTERP = 128, 32
# Enough programs to fill a GPU: split T so that programs ≥ ~4 × 132 SMs even for narrow batches.
TARGET_PROGRAMS = 528
# CPU, fp32 operands: y = x − s is written and summed 512 rows at a time, so y² never exists whole. At
# T = 4,096, n = 3,072 on 2 Xeon cores the whole-tensor version's fresh 50 MB temporaries page-faulted
# for as long as its arithmetic took (bench/RESULTS.md); 512 rows keep the op count, i.e. OpenMP regions, low.
ROWS_PER_BLOCK_CPU = 512


class Prepassed(NamedTuple):
    """What the pre-pass returns for one batch of one side."""

    operand: torch.Tensor  # [T, n] operand dtype, contiguous
    shift: torch.Tensor  # [n] fp32, the shift that was subtracted
    col_sum: torch.Tensor  # [n] fp32
    col_sumsq: torch.Tensor  # [n] fp32
    nonfinite: torch.Tensor  # [n] int32
    overflow: torch.Tensor  # [n] int32

    @property
    def n_tokens(self) -> int:
        return self.operand.shape[0]


if triton is not None:

    @triton.jit
    def _prepass_kernel(
        x_ptr,
        shift_ptr,
        out_ptr,  # [T, n] any strides, [n] fp32, [T, n] contiguous
        sum_ptr,
        sumsq_ptr,
        nonfinite_ptr,
        overflow_ptr,  # [SPLITS, n] partials
        T,
        N,
        rows_per_split,
        stride_xt,
        stride_xn,
        OUT_DTYPE: tl.constexpr,
        ROUND_BF16: tl.constexpr,  # interpreter only: its fp32→bf16 cast truncates, so round first
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)

        acc_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        n_bad = tl.zeros([BLOCK_N], dtype=tl.int32)
        n_ovf = tl.zeros([BLOCK_N], dtype=tl.int32)
        t_start = pid_s * rows_per_split
        t_end = tl.minimum(t_start + rows_per_split, T)
        for t0 in range(t_start, t_end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            mask = (rows < t_end)[:, None] & col_ok[None, :]
            # Upcast right after the load: bf16 arithmetic is wrong under the interpreter.
            x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xn, mask=mask, other=0.0)
            x = x.to(tl.float32)
            finite = (x - x) == 0.0  # NaN and ±Inf give NaN here
            n_bad += tl.sum((mask & ~finite).to(tl.int32), axis=0)
            y = tl.where(mask & finite, x - shift[None, :], 0.0)
            if ROUND_BF16:  # round to nearest even on the bit pattern; the truncating cast is then exact
                bits = y.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                y = bits.to(tl.float32, bitcast=True)
            y_op = y.to(OUT_DTYPE)
            tl.store(out_ptr + rows[:, None] * N + cols[None, :], y_op, mask=mask)
            y_back = y_op.to(tl.float32)  # moments of exactly what the GEMM will see
            n_ovf += tl.sum(((y_back - y_back) != 0.0).to(tl.int32), axis=0)
            acc_sum += tl.sum(y_back, axis=0)
            acc_sq += tl.sum(y_back * y_back, axis=0)

        part = pid_s * N + cols
        tl.store(sum_ptr + part, acc_sum, mask=col_ok)
        tl.store(sumsq_ptr + part, acc_sq, mask=col_ok)
        tl.store(nonfinite_ptr + part, n_bad, mask=col_ok)
        tl.store(overflow_ptr + part, n_ovf, mask=col_ok)


if triton is not None:

    @triton.jit
    def _column_sums_kernel(
        x_ptr,
        pivot_ptr,
        sum_ptr,
        T,
        N,
        rows_per_split,
        stride_xt,
        stride_xn,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        pivot = tl.load(pivot_ptr + cols, mask=col_ok, other=0.0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        t_start = pid_s * rows_per_split
        t_end = tl.minimum(t_start + rows_per_split, T)
        for t0 in range(t_start, t_end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            mask = (rows < t_end)[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xn, mask=mask, other=0.0)
            y = x.to(tl.float32) - pivot[None, :]
            acc += tl.sum(tl.where(mask & ((y - y) == 0.0), y, 0.0), axis=0)
        tl.store(sum_ptr + pid_s * N + cols, acc, mask=col_ok)


def _column_sums_triton(x: torch.Tensor, pivot: torch.Tensor) -> torch.Tensor:
    T, n = x.shape
    interp = interpreting()
    block_t, block_n = (BLOCK_T_INTERP, BLOCK_N_INTERP) if interp else (BLOCK_T, BLOCK_N)
    n_col_blocks = cdiv(n, block_n)
    splits = 1 if interp else max(1, min(cdiv(T, block_t), cdiv(TARGET_PROGRAMS, n_col_blocks)))
    rows_per_split = cdiv(cdiv(T, splits), block_t) * block_t
    splits = max(1, cdiv(T, rows_per_split))
    sums = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    _column_sums_kernel[(n_col_blocks, splits)](
        x, pivot, sums, T, n, rows_per_split, x.stride(0), x.stride(1), BLOCK_T=block_t, BLOCK_N=block_n
    )
    return sums.sum(0)


def _prepass_triton(
    x: torch.Tensor, shift: torch.Tensor, operand_dtype: torch.dtype, out: torch.Tensor | None = None
) -> Prepassed:
    T, n = x.shape
    if T == 0:  # nothing to read: no launch (a split of zero rows is undefined)
        return prepass_torch(x, shift, operand_dtype)
    interp = interpreting()
    block_t, block_n = (BLOCK_T_INTERP, BLOCK_N_INTERP) if interp else (BLOCK_T, BLOCK_N)
    n_col_blocks = cdiv(n, block_n)
    # Split T into SPLITS contiguous ranges, each a multiple of BLOCK_T rows; partials are summed below.
    splits = 1 if interp else max(1, min(cdiv(T, block_t), cdiv(TARGET_PROGRAMS, n_col_blocks)))
    rows_per_split = cdiv(cdiv(T, splits), block_t) * block_t
    splits = max(1, cdiv(T, rows_per_split))
    if out is None or out.dtype != operand_dtype:
        out = torch.empty((T, n), dtype=operand_dtype, device=x.device)
    sums = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    sumsq = torch.empty_like(sums)
    bad = torch.empty((splits, n), dtype=torch.int32, device=x.device)
    ovf = torch.empty_like(bad)
    _prepass_kernel[(n_col_blocks, splits)](
        x,
        shift,
        out,
        sums,
        sumsq,
        bad,
        ovf,
        T,
        n,
        rows_per_split,
        x.stride(0),
        x.stride(1),
        OUT_DTYPE=triton_dtype(operand_dtype),
        ROUND_BF16=interp and operand_dtype == torch.bfloat16,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
    )
    return Prepassed(
        out, shift, sums.sum(0), sumsq.sum(0), bad.sum(0, dtype=torch.int32), ovf.sum(0, dtype=torch.int32)
    )


def _prepass_blocked_fp32(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None) -> Prepassed | None:
    """fp32 operands, block by block into ``out[:T]`` (or a new tensor); None if a sum is not finite.

    Column sums are matrix-vector products with a ones vector (BLAS gemv): on 2 Xeon cores they take half
    the time of ``sum(0)``, a strided reduction over a row-major block (0.56 vs 1.06 ms at 2048 × 768).
    """
    T, n = x.shape
    dev = x.device
    y = out[:T] if out is not None else torch.empty((T, n), dtype=torch.float32, device=dev)  # [T, n] contiguous
    rows = min(ROWS_PER_BLOCK_CPU, T)
    ones = torch.ones(rows, device=dev)
    col_sum = torch.zeros(n, device=dev)
    col_sumsq = torch.zeros(n, device=dev)
    sq = torch.empty((rows, n), device=dev)  # y² of one block, reused
    for r0 in range(0, T, ROWS_PER_BLOCK_CPU):
        blk = y[r0 : r0 + ROWS_PER_BLOCK_CPU]  # [rows, n]
        k = blk.shape[0]
        torch.sub(x[r0 : r0 + ROWS_PER_BLOCK_CPU], shift, out=blk)  # promotes 16-bit x to fp32
        col_sum.addmv_(blk.t(), ones[:k])
        col_sumsq.addmv_(torch.mul(blk, blk, out=sq[:k]).t(), ones[:k])
    if not bool(torch.isfinite(col_sum).all() and torch.isfinite(col_sumsq).all()):  # sync
        return None  # the exact per-column counts below
    zeros = torch.zeros(n, dtype=torch.int32, device=dev)
    return Prepassed(y, shift, col_sum, col_sumsq, zeros, zeros)


def column_sums(
    x: torch.Tensor, pivot: torch.Tensor, *, backend: str = "auto", scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """[n] fp32 Σ_t (x[t] − pivot) over the finite values of ``x`` [T, n]: a first, read-only pass.

    ``ColumnMoments`` uses it to find each batch's mean before the pre-pass centres on it. Summing about a
    pivot near the mean (the previous batch's shift) keeps the fp32 sum accurate when |mean| ≫ std.
    Non-finite entries count as 0 on the triton backend; on the torch backend they make that column's sum
    non-finite (the caller falls back to the pivot; the pre-pass then counts and reports them).
    ``scratch``: an optional contiguous fp32 [≥ min(T, 512), n] buffer for the torch backend (e.g. the
    operand buffer the pre-pass overwrites next), saving a fresh allocation per batch.
    """
    T, n = x.shape
    pivot = pivot.to(device=x.device, dtype=torch.float32).contiguous()
    if T == 0:
        return torch.zeros(n, device=x.device)
    if resolve_backend(backend, x.device) == "triton":
        return _column_sums_triton(x, pivot)
    rows = min(ROWS_PER_BLOCK_CPU, T)
    ones = torch.ones(rows, device=x.device)
    total = torch.zeros(n, device=x.device)
    if scratch is None or scratch.shape[0] < rows or scratch.shape[1] != n or scratch.dtype != torch.float32:
        scratch = torch.empty((rows, n), device=x.device)
    for r0 in range(0, T, ROWS_PER_BLOCK_CPU):
        k = min(ROWS_PER_BLOCK_CPU, T - r0)
        torch.sub(x[r0 : r0 + k], pivot, out=scratch[:k])
        total.addmv_(scratch[:k].t(), ones[:k])
    return total


def prepass_torch(
    x: torch.Tensor, shift: torch.Tensor, operand_dtype: torch.dtype, out: torch.Tensor | None = None
) -> Prepassed:
    """The pre-pass in plain PyTorch: the CPU backend and the reference the Triton kernel is tested against.

    ``out``: an optional contiguous [≥ T, n] fp32 buffer for the operand (fp32 operands only), so a caller
    streaming many batches (``ColumnMoments``) does not pay for a fresh tensor every batch.
    """
    if operand_dtype == torch.float32:
        p = _prepass_blocked_fp32(x, shift, out)
        if p is not None:
            return p
    y = x.float() - shift  # [T, n] fp32 (a fresh tensor: x is never modified)
    operand = y.to(operand_dtype) if operand_dtype != torch.float32 else y
    back = operand.float()
    col_sum = back.sum(0)
    col_sumsq = back.square().sum(0)
    zeros = torch.zeros(x.shape[1], dtype=torch.int32, device=x.device)
    nonfinite, overflow = zeros, zeros
    # A NaN or Inf anywhere poisons its column's sums, so the exact counts are needed only then.
    if not bool(torch.isfinite(col_sum).all() and torch.isfinite(col_sumsq).all()):  # sync
        finite_x = torch.isfinite(x)
        nonfinite = (~finite_x).sum(0, dtype=torch.int32)
        overflow = (finite_x & ~torch.isfinite(back)).sum(0, dtype=torch.int32)
        clean = torch.where(finite_x & torch.isfinite(back), back, 0.0)
        operand = clean.to(operand_dtype)
        col_sum, col_sumsq = clean.sum(0), clean.square().sum(0)
    return Prepassed(operand.contiguous(), shift, col_sum, col_sumsq, nonfinite, overflow)


def prepass(
    x: torch.Tensor,
    shift: torch.Tensor,
    *,
    operand_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> Prepassed:
    """Shift, cast and column moments of ``x`` [T, n] in one read (see the module docstring).

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
        >>> p = prepass(x, torch.tensor([2.0, 10.0]), backend="torch")
        >>> p.operand.tolist(), p.col_sum.tolist(), p.col_sumsq.tolist()
        ([[-1.0, 0.0], [1.0, 0.0]], [0.0, 0.0], [2.0, 0.0])
    """
    shift = shift.to(device=x.device, dtype=torch.float32).contiguous()
    if out is not None:
        if out.dtype != operand_dtype or out.device != x.device or out.shape != x.shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {operand_dtype} {tuple(x.shape)} tensor on {x.device}")
    if resolve_backend(backend, x.device) == "triton":
        return _prepass_triton(x, shift, operand_dtype, out)
    return prepass_torch(x, shift, operand_dtype, out=out)

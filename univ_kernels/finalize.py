"""Finalize: Pearson r from the accumulators, reduced tile by tile, never writing the r matrix.

With C [n_a, n_b] the (shifted) co-moment, u = Σ(x − s)/√n per column (the rank-1 shift correction)
and 1/σ = 1/√M2 per column (NaN for a dead, zero-variance neuron):

    r[i, j] = (C[i, j] − u_a[i]·u_b[j]) · (1/σ_a[i]) · (1/σ_b[j]),   clamped to [−1, 1]

Each program owns BLOCK_M rows and sweeps all columns: row max/argmax/min/argmin stay in registers,
column statistics and the histogram are written as per-program partials and reduced by torch (so the
result is deterministic: no atomics). Ties resolve to the smallest index. Dead neurons: NaN and −1, and
pairs touching one are left out of the histogram. Cost: one read of C (4·n_a·n_b bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from univ_kernels._launch import cdiv, interpreting, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# 32 × 128 tiles, 4 warps: 64 × 128 spilled 520-830 B of stack on sm_80/90a/100a, 64 × 64 on sm_90a
# (bench/gpu_compile.py). Column partials: (n_a/32) row-blocks × n_b × 16 B, ~680 MB at 36,864².
BLOCK_M, BLOCK_N, NUM_WARPS = 32, 128, 4
BLOCK_INTERP = 32
ROWS_PER_CHUNK_TORCH = 1024  # torch backend: r for 1024 rows at a time bounds its memory


@dataclass
class CorrelationSummary:
    """Per-neuron extremes of r over the other side, and the histogram of all r (dead pairs excluded)."""

    max_a: torch.Tensor  # [n_a] fp32: max_j r[i, j]  (NaN for a dead neuron)
    argmax_a: torch.Tensor  # [n_a] int64, −1 where dead
    min_a: torch.Tensor
    argmin_a: torch.Tensor
    max_b: torch.Tensor  # [n_b]: max_i r[i, j]
    argmax_b: torch.Tensor
    min_b: torch.Tensor
    argmin_b: torch.Tensor
    hist: torch.Tensor  # [bins] int64 counts over [−1, 1]
    n_dead_a: int
    n_dead_b: int

    @property
    def bin_edges(self) -> torch.Tensor:
        return torch.linspace(-1.0, 1.0, self.hist.numel() + 1, dtype=torch.float64)


if triton is not None:

    @triton.jit
    def _finalize_kernel(
        c_ptr,
        ua_ptr,
        ub_ptr,
        ia_ptr,
        ib_ptr,  # C [M, N] fp32; u_a, 1/σ_a [M]; u_b, 1/σ_b [N]
        row_max_ptr,
        row_amax_ptr,
        row_min_ptr,
        row_amin_ptr,  # [M]
        col_max_ptr,
        col_amax_ptr,
        col_min_ptr,
        col_amin_ptr,  # [n_row_blocks, N] partials
        hist_ptr,  # [n_row_blocks, HIST_PAD] partials
        M,
        N,
        stride_cm,
        stride_cn,
        BINS: tl.constexpr,
        HIST_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ua = tl.load(ua_ptr + rows, mask=row_ok, other=0.0)
        ia = tl.load(ia_ptr + rows, mask=row_ok, other=float("nan"))
        row_alive = row_ok & (ia == ia)

        best_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_min = tl.full([BLOCK_M], float("inf"), tl.float32)
        arg_max = tl.full([BLOCK_M], -1, tl.int32)
        arg_min = tl.full([BLOCK_M], -1, tl.int32)
        hist = tl.zeros([HIST_PAD], dtype=tl.int32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            ub = tl.load(ub_ptr + cols, mask=col_ok, other=0.0)
            ib = tl.load(ib_ptr + cols, mask=col_ok, other=float("nan"))
            valid = row_alive[:, None] & (col_ok & (ib == ib))[None, :]
            c = tl.load(
                c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            r = (c - ua[:, None] * ub[None, :]) * ia[:, None] * ib[None, :]
            r = tl.minimum(tl.maximum(r, -1.0), 1.0)

            r_hi = tl.where(valid, r, float("-inf"))
            r_lo = tl.where(valid, r, float("inf"))
            # Rows: a later column block wins only if strictly better, so ties keep the smallest index.
            t_max = tl.max(r_hi, axis=1)
            t_amax = tl.argmax(r_hi, axis=1, tie_break_left=True) + n0
            better = t_max > best_max
            best_max = tl.where(better, t_max, best_max)
            arg_max = tl.where(better, t_amax, arg_max)
            t_min = tl.min(r_lo, axis=1)
            t_amin = tl.argmin(r_lo, axis=1, tie_break_left=True) + n0
            better = t_min < best_min
            best_min = tl.where(better, t_min, best_min)
            arg_min = tl.where(better, t_amin, arg_min)

            # Columns: this block's extremes over its rows, reduced across row blocks afterwards.
            part = pid * N + cols
            tl.store(col_max_ptr + part, tl.max(r_hi, axis=0), mask=col_ok)
            tl.store(col_amax_ptr + part, tl.argmax(r_hi, axis=0, tie_break_left=True) + pid * BLOCK_M, mask=col_ok)
            tl.store(col_min_ptr + part, tl.min(r_lo, axis=0), mask=col_ok)
            tl.store(col_amin_ptr + part, tl.argmin(r_lo, axis=0, tie_break_left=True) + pid * BLOCK_M, mask=col_ok)

            # Histogram: bin = ⌊(r + 1)·BINS/2⌋, r = 1 into the last bin; invalid pairs to a discarded bin.
            b = tl.minimum(((r + 1.0) * (BINS * 0.5)).to(tl.int32), BINS - 1)
            b = tl.where(valid, b, HIST_PAD - 1)
            hist += tl.histogram(tl.reshape(b, [BLOCK_M * BLOCK_N]), HIST_PAD)

        tl.store(row_max_ptr + rows, best_max, mask=row_ok)
        tl.store(row_amax_ptr + rows, arg_max, mask=row_ok)
        tl.store(row_min_ptr + rows, best_min, mask=row_ok)
        tl.store(row_amin_ptr + rows, arg_min, mask=row_ok)
        tl.store(hist_ptr + pid * HIST_PAD + tl.arange(0, HIST_PAD), hist)


def _extreme(values: torch.Tensor, index: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce partials [P, n] over P: the extreme value, and among ties the smallest index; ±inf → NaN, −1."""
    best = values.amax(0) if largest else values.amin(0)
    big = torch.iinfo(torch.int64).max
    idx = torch.where(values == best, index.long(), big).amin(0)
    empty = torch.isinf(best)  # every pair of this neuron was invalid: dead neuron or dead other side
    return torch.where(empty, float("nan"), best), torch.where(empty, -1, idx)


def _assemble(rows: list[torch.Tensor], cols: list[torch.Tensor], hist, inv_sd_a, inv_sd_b) -> CorrelationSummary:
    """Reduce row and column partials (max values, max indices, min values, min indices; each [P, n]) to a summary."""
    max_a, amax_a = _extreme(rows[0], rows[1], largest=True)
    min_a, amin_a = _extreme(rows[2], rows[3], largest=False)
    max_b, amax_b = _extreme(cols[0], cols[1], largest=True)
    min_b, amin_b = _extreme(cols[2], cols[3], largest=False)
    n_dead_a, n_dead_b = int(torch.isnan(inv_sd_a).sum()), int(torch.isnan(inv_sd_b).sum())
    return CorrelationSummary(max_a, amax_a, min_a, amin_a, max_b, amax_b, min_b, amin_b, hist, n_dead_a, n_dead_b)


def _summary_triton(c, ua, ub, ia, ib, bins: int) -> CorrelationSummary:
    M, N = c.shape
    block_m, block_n = (BLOCK_INTERP, BLOCK_INTERP) if interpreting() else (BLOCK_M, BLOCK_N)
    n_row_blocks = cdiv(M, block_m)
    hist_pad = triton.next_power_of_2(bins + 1)
    dev = c.device
    row = [torch.empty(M, dtype=dt, device=dev) for dt in (torch.float32, torch.int32) * 2]
    col = [torch.empty((n_row_blocks, N), dtype=dt, device=dev) for dt in (torch.float32, torch.int32) * 2]
    hist = torch.empty((n_row_blocks, hist_pad), dtype=torch.int32, device=dev)
    _finalize_kernel[(n_row_blocks,)](
        c,
        ua,
        ub,
        ia,
        ib,
        *row,
        *col,
        hist,
        M,
        N,
        c.stride(0),
        c.stride(1),
        BINS=bins,
        HIST_PAD=hist_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=NUM_WARPS,
    )
    return _assemble([t[None] for t in row], col, hist.sum(0, dtype=torch.int64)[:bins], ia, ib)


def _empty_summary(n_a: int, n_b: int, bins: int, device, inv_sd_a, inv_sd_b) -> CorrelationSummary:
    """No partner at all: one partial of ±inf per side, which ``_extreme`` answers with NaN and −1."""

    def partials(n):
        idx = torch.zeros((1, n), dtype=torch.int64, device=device)
        return [
            torch.full((1, n), float("-inf"), device=device),
            idx,
            torch.full((1, n), float("inf"), device=device),
            idx,
        ]

    hist = torch.zeros(bins, dtype=torch.int64, device=device)
    return _assemble(partials(n_a), partials(n_b), hist, inv_sd_a, inv_sd_b)


def correlation_matrix(c, u_a, u_b, inv_sd_a, inv_sd_b) -> torch.Tensor:
    """Dense r [n_a, n_b] fp32 (NaN where either neuron is dead), for small problems and tests."""
    r = (c - u_a[:, None] * u_b[None, :]) * inv_sd_a[:, None] * inv_sd_b[None, :]
    return r.clamp(-1.0, 1.0)  # clamp keeps NaN


def summary_torch(c, u_a, u_b, inv_sd_a, inv_sd_b, bins: int = 100) -> CorrelationSummary:
    """The finalize reduction in plain PyTorch, a chunk of rows at a time (CPU backend and reference)."""
    M = c.shape[0]
    out_a: list[list[torch.Tensor]] = [[], [], [], []]
    col_parts: list[list[torch.Tensor]] = [[], [], [], []]
    hist = torch.zeros(bins, dtype=torch.int64, device=c.device)
    for r0 in range(0, M, ROWS_PER_CHUNK_TORCH):
        r1 = min(r0 + ROWS_PER_CHUNK_TORCH, M)
        r = correlation_matrix(c[r0:r1], u_a[r0:r1], u_b, inv_sd_a[r0:r1], inv_sd_b)  # [rows, N]
        valid = ~torch.isnan(r)
        hi = torch.where(valid, r, float("-inf"))
        lo = torch.where(valid, r, float("inf"))
        for k, (vals, fn) in enumerate([(hi, torch.max), (lo, torch.min)]):
            v, i = fn(vals, dim=1)  # first occurrence on ties: the smallest index
            out_a[2 * k].append(v)
            out_a[2 * k + 1].append(torch.where(torch.isinf(v), -1, i))
            v, i = fn(vals, dim=0)
            col_parts[2 * k].append(v)
            col_parts[2 * k + 1].append(i + r0)
        # Bin every pair and send dead ones (NaN) to an extra bin that is dropped: cheaper than r[valid].
        b = ((r + 1.0) * (bins * 0.5)).clamp(max=bins - 1).nan_to_num(nan=bins).to(torch.int64)
        hist += torch.bincount(b.flatten(), minlength=bins + 1)[:bins]
    rows = [torch.cat(parts)[None] for parts in out_a]
    return _assemble(rows, [torch.stack(parts) for parts in col_parts], hist, inv_sd_a, inv_sd_b)


def correlation_summary(
    c: torch.Tensor,
    u_a: torch.Tensor,
    u_b: torch.Tensor,
    inv_sd_a: torch.Tensor,
    inv_sd_b: torch.Tensor,
    *,
    bins: int = 100,
    backend: str = "auto",
) -> CorrelationSummary:
    """Row and column extremes of r and its histogram, from the accumulators (see the module docstring).

    ``c`` [n_a, n_b] fp32; ``u_*`` fp32 shift corrections (zeros if ``c`` is already centred); ``inv_sd_*``
    fp32 1/√M2 with NaN for dead neurons.

    Example:
        >>> c = torch.tensor([[2.0, -2.0]])
        >>> s = correlation_summary(c, torch.zeros(1), torch.zeros(2), torch.tensor([0.5]),
        ...                         torch.tensor([0.5, 0.5]), bins=4, backend="torch")
        >>> s.max_a.tolist(), s.argmax_a.tolist(), s.min_a.tolist(), s.hist.tolist()
        ([0.5], [0], [-0.5], [0, 1, 0, 1])
    """
    if bins < 1:
        raise ValueError(f"bins must be ≥ 1, got {bins}")
    n_a, n_b = c.shape
    for name, t, n in (("u_a", u_a, n_a), ("u_b", u_b, n_b), ("inv_sd_a", inv_sd_a, n_a), ("inv_sd_b", inv_sd_b, n_b)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    vecs = [t.to(device=c.device, dtype=torch.float32).contiguous() for t in (u_a, u_b, inv_sd_a, inv_sd_b)]
    if n_a == 0 or n_b == 0:  # no partner at all: every neuron is answered as a dead one would be
        return _empty_summary(n_a, n_b, bins, c.device, vecs[2], vecs[3])
    if resolve_backend(backend, c.device) == "triton":
        return _summary_triton(c, *vecs, bins=bins)
    return summary_torch(c, *vecs, bins=bins)

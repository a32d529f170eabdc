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
    """Per-neuron extremes of r over the other side, and the histogram of all r (dead pairs excluded).

    Extremes not asked for (``outputs=``) are None; a histogram not asked for is all zeros.
    """

    max_a: torch.Tensor | None  # [n_a] fp32: max_j r[i, j]  (NaN for a dead neuron)
    argmax_a: torch.Tensor | None  # [n_a] int64, −1 where dead
    min_a: torch.Tensor | None
    argmin_a: torch.Tensor | None
    max_b: torch.Tensor | None  # [n_b]: max_i r[i, j]
    argmax_b: torch.Tensor | None
    min_b: torch.Tensor | None
    argmin_b: torch.Tensor | None
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


EXTREMES = ("max_a", "min_a", "max_b", "min_b")
OUTPUTS = frozenset({*EXTREMES, *("arg" + k for k in EXTREMES), "hist"})
# torch backend: r is built ~8 MB of rows at a time in one reused buffer, so every pass after the read of C
# runs in cache and nothing page-faults (a fresh [1024, n] temporary per op cost as much as its arithmetic).
# Not smaller: each op is one OpenMP region, and on a loaded 2-core machine 2 MB chunks ran slower than 8 MB.
CHUNK_BYTES_TORCH = 8 << 20


ARG_BLOCK = 64  # row extremes with their index: reduce 64-wide column blocks first, then search one block


def _fill_dead(values: torch.Tensor, index: torch.Tensor | None, dead: torch.Tensor) -> None:
    values[dead] = float("nan")
    if index is not None:
        index[dead] = -1


def _row_extreme(r: torch.Tensor, largest: bool, values: torch.Tensor, index: torch.Tensor | None) -> None:
    """Per-row max (or min) of r [R, N] into ``values``, and the first index reaching it into ``index``.

    ``torch.max(dim=1)`` with indices runs ~5× slower than ``amax`` on this CPU; here the index costs one
    ``amax`` over 64-wide blocks plus a search of 1/64 of the elements. Ties: the smallest index.
    """
    R, N = r.shape
    amax = torch.amax if largest else torch.amin
    if index is None:
        amax(r, dim=1, out=values)
        return
    nb = N // ARG_BLOCK
    if nb < 2:
        (torch.max if largest else torch.min)(r, dim=1, out=(values, index))
        return
    blocks = amax(r.as_strided((R, nb, ARG_BLOCK), (r.stride(0), ARG_BLOCK, 1)), dim=2)  # [R, nb]
    if nb * ARG_BLOCK < N:
        blocks = torch.cat([blocks, amax(r[:, nb * ARG_BLOCK :], dim=1, keepdim=True)], dim=1)
    best = blocks.argmax(dim=1) if largest else blocks.argmin(dim=1)  # first block holding the extreme
    cols = (best[:, None] * ARG_BLOCK + torch.arange(ARG_BLOCK, device=r.device)).clamp_(max=N - 1)
    inner = r.gather(1, cols)
    pos = inner.argmax(dim=1) if largest else inner.argmin(dim=1)
    index.copy_(cols.gather(1, pos[:, None]).squeeze(1))
    values.copy_(inner.gather(1, pos[:, None]).squeeze(1))


def _part(t: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor | None:
    return None if t is None else t[r0:r1]


def summary_torch(
    c, u_a, u_b, inv_sd_a, inv_sd_b, bins: int = 100, outputs: frozenset[str] = OUTPUTS
) -> CorrelationSummary:
    """The finalize reduction in plain PyTorch, a chunk of rows at a time (CPU backend and reference).

    Same fp32 arithmetic in the same order as the Triton kernel (bit-identical under the interpreter).
    Only the ``outputs`` named are computed; the others come back as None (``hist``: an empty histogram).
    When only row extremes are asked for (the analytic baseline), each row is reduced before its 1/σ_a
    scaling and the clamp, both monotone: r is then (c·1/σ_b)·1/σ_a, within an ulp of the full path, and
    an argmax can differ only between values an ulp apart. Cost: one read of C plus in-cache passes.
    """
    M, N = c.shape
    dev = c.device
    dead_a, dead_b = torch.isnan(inv_sd_a), torch.isnan(inv_sd_b)
    dead_cols = torch.nonzero(dead_b).flatten()
    any_dead_a, any_dead_b = bool(dead_a.any()), dead_cols.numel() > 0
    shifted = bool(u_a.any()) and bool(u_b.any())  # else c − u_a·u_b is c itself, exactly: skip the pass
    rows_per = max(1, min(M, CHUNK_BYTES_TORCH // (4 * N)))
    buf = torch.empty((rows_per, N), dtype=torch.float32, device=dev)
    want = set(outputs) | {k for k in EXTREMES if "arg" + k in outputs}  # an index comes with its value

    def index(k: str, n: int) -> torch.Tensor | None:
        return torch.full((n,), -1, dtype=torch.int64, device=dev) if "arg" + k in want else None

    row = {k: (torch.empty(M, device=dev), index(k, M)) for k in ("max_a", "min_a") if k in want}
    col = {}
    for k, start in (("max_b", float("-inf")), ("min_b", float("inf"))):
        if k in want:
            col[k] = (torch.full((N,), start, device=dev), index(k, N))
    hist = torch.zeros(bins, dtype=torch.int64, device=dev)
    if "hist" in want:
        fbuf, ibuf = torch.empty_like(buf), torch.empty(buf.shape, dtype=torch.int64, device=dev)
    # Only row extremes: scale rows after the reduction, 1/σ_a > 0 keeps each row's order (see the docstring).
    rows_only = not col and "hist" not in want
    for r0 in range(0, M, rows_per):
        r1 = min(r0 + rows_per, M)
        r = buf[: r1 - r0]
        if rows_only:
            if shifted:
                torch.mul(u_a[r0:r1, None], u_b[None, :], out=r)
                torch.sub(c[r0:r1], r, out=r)
                r.mul_(inv_sd_b[None, :])
            else:
                torch.mul(c[r0:r1], inv_sd_b[None, :], out=r)
            for k, fill in (("max_a", float("-inf")), ("min_a", float("inf"))):
                if k in row:
                    if any_dead_b:
                        r.index_fill_(1, dead_cols, fill)
                    _row_extreme(r, k == "max_a", row[k][0][r0:r1], _part(row[k][1], r0, r1))
            continue
        if shifted:
            torch.mul(u_a[r0:r1, None], u_b[None, :], out=r)
            torch.sub(c[r0:r1], r, out=r)
            r.mul_(inv_sd_a[r0:r1, None])
        else:
            torch.mul(c[r0:r1], inv_sd_a[r0:r1, None], out=r)
        r.mul_(inv_sd_b[None, :]).clamp_(-1.0, 1.0)  # NaN stays NaN: dead rows and columns
        if "hist" in want:
            # Bin every pair and send dead ones (NaN) to an extra bin that is dropped: cheaper than r[valid].
            f = fbuf[: r1 - r0]
            torch.add(r, 1.0, out=f).mul_(bins * 0.5).clamp_(max=bins - 1).nan_to_num_(nan=bins)
            i = ibuf[: r1 - r0]
            i.copy_(f)  # truncation toward zero, as .to(int64)
            hist += torch.bincount(i.flatten(), minlength=bins + 1)[:bins]
        for k, fill in (("max_a", float("-inf")), ("min_a", float("inf"))):
            if k in row:
                if any_dead_b:
                    r.index_fill_(1, dead_cols, fill)  # dead partners never win
                _row_extreme(r, k == "max_a", row[k][0][r0:r1], _part(row[k][1], r0, r1))
        for k, (fill, fn, better) in (
            ("max_b", (float("-inf"), torch.max, torch.gt)),
            ("min_b", (float("inf"), torch.min, torch.lt)),
        ):
            if k in col:
                if any_dead_a:
                    r[dead_a[r0:r1]] = fill
                if any_dead_b:
                    r.index_fill_(1, dead_cols, fill)
                best, arg = col[k]
                if arg is None and k == "max_b":
                    torch.maximum(best, r.amax(0), out=best)
                    continue
                if arg is None:
                    torch.minimum(best, r.amin(0), out=best)
                    continue
                v, i = fn(r, dim=0)
                win = better(v, best)  # strict: an earlier chunk (smaller row index) keeps ties
                best.copy_(torch.where(win, v, best))
                arg.copy_(torch.where(win, i + r0, arg))
    if rows_only:
        for v, _ in row.values():
            v.mul_(inv_sd_a).clamp_(-1.0, 1.0)
    # A neuron with no live partner (or dead itself) gets NaN and −1, as the Triton kernel's ±inf does.
    for v, i in row.values():
        _fill_dead(v, i, dead_a | torch.isinf(v) | torch.isnan(v))
    for v, i in col.values():
        _fill_dead(v, i, dead_b | torch.isinf(v))
    n_dead_a, n_dead_b = int(dead_a.sum()), int(dead_b.sum())
    get = {**row, **col}
    none = (None, None)
    return CorrelationSummary(
        *get.get("max_a", none),
        *get.get("min_a", none),
        *get.get("max_b", none),
        *get.get("min_b", none),
        hist,
        n_dead_a,
        n_dead_b,
    )


def correlation_summary(
    c: torch.Tensor,
    u_a: torch.Tensor,
    u_b: torch.Tensor,
    inv_sd_a: torch.Tensor,
    inv_sd_b: torch.Tensor,
    *,
    bins: int = 100,
    backend: str = "auto",
    outputs: frozenset[str] | set[str] = OUTPUTS,
) -> CorrelationSummary:
    """Row and column extremes of r and its histogram, from the accumulators (see the module docstring).

    ``outputs``: which of ``max_a``, ``argmax_a``, ``min_a``, ``argmin_a`` (and the same for ``_b``) and
    ``hist`` to compute (an index brings its value); the rest come back as None (an all-zero histogram).
    The analytic baseline reads only ``{"max_a"}`` or ``{"max_b"}``: on CPU that skips most of the work.

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
    unknown = set(outputs) - OUTPUTS
    if unknown:
        raise ValueError(f"outputs must be among {sorted(OUTPUTS)}, got {sorted(unknown)}")
    n_a, n_b = c.shape
    for name, t, n in (("u_a", u_a, n_a), ("u_b", u_b, n_b), ("inv_sd_a", inv_sd_a, n_a), ("inv_sd_b", inv_sd_b, n_b)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    vecs = [t.to(device=c.device, dtype=torch.float32).contiguous() for t in (u_a, u_b, inv_sd_a, inv_sd_b)]
    if n_a == 0 or n_b == 0:  # no partner at all: every neuron is answered as a dead one would be
        return _only(_empty_summary(n_a, n_b, bins, c.device, vecs[2], vecs[3]), outputs)
    if resolve_backend(backend, c.device) == "triton":
        return _only(_summary_triton(c, *vecs, bins=bins), outputs)
    return summary_torch(c, *vecs, bins=bins, outputs=frozenset(outputs))


def _only(s: CorrelationSummary, outputs) -> CorrelationSummary:
    """Drop what was not asked for, so both backends answer alike (the kernel computes everything)."""
    for k in EXTREMES:
        if k not in outputs and "arg" + k not in outputs:
            setattr(s, k, None)
        if "arg" + k not in outputs:
            setattr(s, "arg" + k, None)
    if "hist" not in outputs:
        s.hist = torch.zeros_like(s.hist)
    return s

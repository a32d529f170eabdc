"""Co-moments of chosen pairs only: C[i, j] += Σ_t A[t, i] · B[t, cand[i, j]], for k candidates per row.

The dense update computes every neuron against every neuron (2·T·n_a·n_b FLOPs). When the question is each
neuron's best partner and a screen has already named k candidates per row, only n_a·k entries are needed:
2·T·n_a·k FLOPs. ``gathered_comoment_update`` is that kernel; ``update_candidate_pairs`` is its streaming
form, the same numerics contract as ``update_pair``: operands centred on their batch's mean by
``ColumnMoments.prepare``, Chan's merge term as the extra correction row of the augmented fp32 operands (or an
fp32 product for 16-bit operands), fp32 accumulation. Its entries equal the dense C's at the same positions.

Backends: ``torch`` transposes both operands token-major, gathers each block of rows' candidates as whole rows
(a [rows, k, T] operand of at most ``GATHER_BYTES``, one reused buffer) and contracts with one batched
matrix-vector product; ``triton`` loads each program's rows of A and the gathered columns of B tile by tile over
T and accumulates their products in fp32 registers (CUDA cores: a gather has no tensor-core form). Throughput
per useful FLOP against the dense GEMM is measured in ``bench/bench_pairs.py``.

For the screen that names the candidates: ``row_topk`` keeps each row's k largest r of a co-moment block (r
formed a chunk of rows at a time) and ``merge_topk`` folds the lists of successive column blocks together, so a
screen over all neurons holds O(n·k) plus one block, never the whole r.
"""

from __future__ import annotations

import torch

from univ_kernels._launch import cdiv, resolve_backend
from univ_kernels.moments import PreparedBatch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["gathered_comoment_update", "merge_topk", "row_topk", "update_candidate_pairs"]

GATHER_BYTES = 64 << 20  # torch backend: the gathered [rows, k, T] block of B
BLOCK_I, BLOCK_J, BLOCK_T = 32, 16, 16  # triton: rows × candidates per program, tokens per step


def _check(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cand: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"A and B must be [tokens, neurons] over the same tokens; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")  # fmt: skip
    if cand.dim() != 2 or cand.shape[0] != a.shape[1]:
        raise ValueError(f"cand must be [n_a, k] = [{a.shape[1]}, k] (B's columns for each of A's), got "
                         f"{tuple(cand.shape)}")  # fmt: skip
    if cand.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cand must hold integer column indices of B, got {cand.dtype}")
    if c.shape != cand.shape or c.dtype != torch.float32:
        raise ValueError(f"C must be float32 of cand's shape {tuple(cand.shape)}, got {c.dtype} {tuple(c.shape)}")
    if len({t.device for t in (c, a, b, cand)}) > 1:
        raise ValueError(f"C, A, B and cand must be on one device, got {c.device}, {a.device}, {b.device}, "
                         f"{cand.device}")  # fmt: skip
    if cand.numel() and (int(cand.min()) < 0 or int(cand.max()) >= b.shape[1]):
        raise ValueError(f"cand holds column indices outside B's 0..{b.shape[1] - 1} "
                         f"(min {int(cand.min())}, max {int(cand.max())})")  # fmt: skip


def gathered_comoment_update(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cand: torch.Tensor, *,
                             backend: str = "auto") -> None:  # fmt: skip
    """C [n_a, k] += (Aᵀ B)[i, cand[i, j]] in place, A [T, n_a], B [T, n_b] in any float dtype, fp32 sums.

    Example:
        >>> a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
        >>> c = torch.zeros(2, 2)
        >>> gathered_comoment_update(c, a, b, torch.tensor([[0, 2], [1, 1]]), backend="torch")
        >>> c.tolist()
        [[1.0, 5.0], [4.0, 4.0]]
    """
    _check(c, a, b, cand)
    if a.shape[0] == 0 or cand.numel() == 0:
        return
    if resolve_backend(backend, a.device) == "torch":
        _update_torch(c, a, b, cand)
    else:
        _update_triton(c, a, b, cand)


def _update_torch(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cand: torch.Tensor) -> None:
    t, (n_a, k) = a.shape[0], cand.shape
    # token-major rows: a candidate is one contiguous row of T values, so the gather is a row copy
    a_t, b_t = a.T.float().contiguous(), b.T.float().contiguous()  # [n_a, T], [n_b, T]
    rows = max(1, min(n_a, GATHER_BYTES // (4 * t * k)))
    idx = cand.long()
    buf = torch.empty(rows * k, t, device=a.device)  # one gather buffer for every block (page faults once)
    for start in range(0, n_a, rows):
        stop = min(n_a, start + rows)
        g = torch.index_select(b_t, 0, idx[start:stop].flatten(), out=buf[: (stop - start) * k])
        g = g.view(stop - start, k, t)  # [rows, k, T]
        c[start:stop] += torch.bmm(g, a_t[start:stop, :, None]).squeeze(-1)  # one [k, T] @ [T] per row


def _update_triton(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cand: torch.Tensor) -> None:
    n_a, k = cand.shape
    cand = cand.contiguous()
    grid = (cdiv(n_a, BLOCK_I), cdiv(k, BLOCK_J))
    _gathered_kernel[grid](
        a, b, cand, c, a.shape[0], n_a, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), cand.stride(0), c.stride(0),
        BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, BLOCK_T=BLOCK_T, num_warps=4,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _gathered_kernel(a_ptr, b_ptr, cand_ptr, c_ptr, T, N_A, K, s_at, s_ai, s_bt, s_bj, s_cand, s_c,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        pid_i, pid_j = tl.program_id(0), tl.program_id(1)
        rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        ks = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        mask = (rows[:, None] < N_A) & (ks[None, :] < K)  # [BI, BJ]
        cols = tl.load(cand_ptr + rows[:, None] * s_cand + ks[None, :], mask=mask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            t_ok = ts < T
            x = tl.load(a_ptr + ts[:, None] * s_at + rows[None, :] * s_ai,
                        mask=t_ok[:, None] & (rows[None, :] < N_A), other=0.0).to(tl.float32)  # [BT, BI]
            y = tl.load(b_ptr + ts[:, None, None] * s_bt + cols[None, :, :] * s_bj,
                        mask=t_ok[:, None, None] & mask[None, :, :], other=0.0).to(tl.float32)  # [BT, BI, BJ]
            acc += tl.sum(x[:, :, None] * y, axis=0)
        c_ptrs = c_ptr + rows[:, None] * s_c + ks[None, :]
        tl.store(c_ptrs, tl.load(c_ptrs, mask=mask, other=0.0) + acc, mask=mask)

else:  # pragma: no cover
    _gathered_kernel = None


def update_candidate_pairs(c: torch.Tensor, cand: torch.Tensor, p_a: PreparedBatch, p_b: PreparedBatch, *,
                           backend: str = "auto") -> None:  # fmt: skip
    """One batch of Chan's merge for the candidate pairs: C[i, j] is the centred co-moment of A's column i and
    B's column cand[i, j], equal to the dense ``update_pair``'s C at [i, cand[i, j]]. Call before ``commit``."""
    if p_a.n_prev != p_b.n_prev or p_a.n_tokens != p_b.n_tokens:
        raise ValueError(f"the two sides were prepared at different points of the stream ({p_a.n_prev} + "
                         f"{p_a.n_tokens} vs {p_b.n_prev} + {p_b.n_tokens} tokens)")  # fmt: skip
    if p_a.n_tokens == 0:
        return
    if p_a.n_prev and p_a.augmented is not None and p_b.augmented is not None:
        gathered_comoment_update(c, p_a.augmented, p_b.augmented, cand, backend=backend)  # merge row included
        return
    gathered_comoment_update(c, p_a.centred, p_b.centred, cand, backend=backend)
    if p_a.n_prev:
        c += p_a.correction[:, None] * p_b.correction[cand.long()]


# --- the screen's side: each row's top candidates, a column block at a time -------------------------------------

ROW_CHUNK_BYTES = 8 << 20  # r is formed this many bytes of rows at a time (as finalize's torch path)


@torch.no_grad()
def row_topk(c: torch.Tensor, u_a: torch.Tensor, u_b: torch.Tensor, inv_sd_a: torch.Tensor, inv_sd_b: torch.Tensor,
             k: int, *, col_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The k largest r of each row of a co-moment block and their columns: ([n_a, k] fp32, [n_a, k] int64).

    r = (C − u_a u_bᵀ)·inv_sd_a·inv_sd_b as ``correlation_matrix`` forms it, a chunk of rows at a time, so the
    dense r of the block never exists whole. Dead columns (NaN) never rank; a dead row, or a row with fewer than
    k live columns, pads with NaN / −1. ``col_offset`` shifts the indices (a block of a wider matrix).
    """
    n_a, n_b = c.shape
    values = torch.full((n_a, k), float("nan"), device=c.device)
    index = torch.full((n_a, k), -1, dtype=torch.int64, device=c.device)
    take = min(k, n_b)
    if take == 0 or n_a == 0:
        return values, index
    rows = max(1, ROW_CHUNK_BYTES // (4 * n_b))
    for r0 in range(0, n_a, rows):
        r1 = min(n_a, r0 + rows)
        r = (c[r0:r1] - u_a[r0:r1, None] * u_b[None, :]) * inv_sd_a[r0:r1, None] * inv_sd_b[None, :]
        r = torch.nan_to_num(r.clamp_(-1.0, 1.0), nan=float("-inf"))
        top = torch.topk(r, take, dim=1)
        live = torch.isfinite(top.values)
        values[r0:r1, :take] = torch.where(live, top.values, float("nan"))
        index[r0:r1, :take] = torch.where(live, top.indices + col_offset, -1)
    return values, index


def merge_topk(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
               k: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The k best of two per-row candidate lists (values, index), NaN/−1 padding kept last: memory O(n·k)."""
    values = torch.cat([a[0], b[0]], dim=1)
    index = torch.cat([a[1], b[1]], dim=1)
    top = torch.topk(torch.nan_to_num(values, nan=float("-inf")), min(k, values.shape[1]), dim=1)
    picked = index.gather(1, top.indices)
    live = torch.isfinite(top.values)
    return torch.where(live, top.values, float("nan")), torch.where(live, picked, -1)

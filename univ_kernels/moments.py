"""Per-column streaming moments of one side, and the pair update that keeps every co-moment centred.

Per-batch centring merged with Chan et al.'s formula, so that accuracy never depends on how
representative any batch is. For a batch of T tokens with mean μ_b (after n_prev tokens of mean m):

    operand  Y = x − s,  s = fp32(μ_b)                      centred to rounding (the pre-pass)
    C       += YaᵀYb + w·d_a d_bᵀ,  w = n_prev·T/n,  d = μ_b − m   (Chan; ``update_pair``)
    m       += d·T/n,    M2 += M2_b + w·d²                  (float64, ``commit``)

The rank-1 term rides in the GEMM as one extra operand row v = √w·d (fp32 operands: K = T + 1, no extra
pass over C); with 16-bit operands it is an fp32 ``addr`` after the GEMM, since v does not fit 16 bits
exactly. So C is at every moment the centred co-moment Σ(x_a − mean_a)(x_b − mean_b)ᵀ, and ``offset()``
is 0. μ_b comes from a first read about a pivot (``column_sums``); if the pre-pass then finds the
operand's column mean g = ΣY/T above 1e-4 of the batch's std (and fp32 can place s closer), it
re-centres. The term T·g_a g_bᵀ the GEMM then carries beyond the centred co-moment is below 1e-8 of it.

Rounding: every value the GEMMs see is centred, so C's fp32 error is relative to Σ(x − mean)², never to
Σx² (the old fixed shift's failure when the first batch sat far from the rest). n, means and M2 are O(N)
numbers in float64. A column is *dead* when M2 ≤ 1e-12·R, R = Σ of the squared operands the GEMMs saw:
its spread is below what they resolve (a constant column has M2 = R = 0).

Values whose squares would overflow the fp32 accumulators (R > float32 max / 16 bounds |C| by
Cauchy–Schwarz, with margin for rounding) are rejected in ``prepare``, like NaN/Inf, before any state
changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from univ_kernels._launch import check_activations
from univ_kernels.comoment import comoment_update, comoment_update_symmetric
from univ_kernels.prepass import Prepassed, column_sums, prepass

DEAD_RTOL = 1e-12
# Σ of squared operands allowed per column: |C| ≤ √(R_a R_b) ≤ this, 16× below float32's max for rounding.
SUMSQ_LIMIT = torch.finfo(torch.float32).max / 16
# Re-centre when the operand's column mean g exceeds this fraction of the batch std: the GEMM then carries
# T·g_a·g_b beyond the centred co-moment, ≤ 1e-8 of it with fp32 operands. 16-bit operands round each value
# by ~eps, so g ≤ 0.1·√eps·std (the term ≤ eps/100) is enough there. At most MAX_RECENTRE extra passes.
RECENTRE_RTOL = {torch.float32: 1e-4, torch.float16: 0.1 * 2**-5, torch.bfloat16: 0.1 * 2**-4}
MAX_RECENTRE = 2
STATE_KEYS = (("shift", torch.float32), ("mean", torch.float64), ("m2", torch.float64), ("sumsq", torch.float64))


@dataclass
class PreparedBatch:
    """One batch of one side, checked and centred by ``ColumnMoments.prepare``; consumed by ``update_pair``.

    ``centred`` [T, n] (operand dtype) are the batch's values minus its own mean; ``correction`` [n] fp32
    is v = √(n_prev·T/n)·(μ_b − m_prev), the Chan term's factor. ``augmented`` [T + 1, n] is the same
    operand with v as a last row (fp32 operands): one GEMM over it is the whole update.
    """

    centred: torch.Tensor
    correction: torch.Tensor
    shift: torch.Tensor
    n_prev: int
    augmented: torch.Tensor | None
    after: tuple  # (n, mean, m2, sumsq) of the side once committed

    @property
    def n_tokens(self) -> int:
        return self.centred.shape[0]

    @property
    def operand(self):
        raise AttributeError(
            "PreparedBatch has no .operand: batches are centred on their own mean and merged by Chan's formula, "
            "so a bare GEMM on the operand misses the merge term; call update_pair(c, p_a, p_b, rows, cols)"
        )


class ColumnMoments:
    """Streaming column moments of one side; ``prepare`` checks a batch, ``commit`` adds it.

    Splitting the two lets a caller pre-pass every side of a batch, raise on bad input before any state
    changes, run every pair's ``update_pair``, and only then commit — an update is all or nothing.
    """

    def __init__(self, n_cols: int, *, device: torch.device | str = "cpu", name: str = "x"):
        self.n_cols = n_cols
        self.name = name
        self.device = torch.device(device)
        self.n = 0
        self.shift: torch.Tensor | None = None  # [n_cols] fp32: the last batch's centre, next batch's pivot
        self._mean = torch.zeros(n_cols, dtype=torch.float64, device=self.device)
        self._m2 = torch.zeros(n_cols, dtype=torch.float64, device=self.device)
        self.sumsq = torch.zeros(n_cols, dtype=torch.float64, device=self.device)  # R: Σ squared operands
        self._operand_buf: torch.Tensor | None = None  # fp32 operands (+ the correction row), reused

    # -- update ------------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, *, operand_dtype: torch.dtype, backend: str = "auto") -> PreparedBatch:
        """Validate, centre and pre-pass one batch [T, n_cols]; raises ValueError (state untouched) on
        non-finite values, on values too large for the accumulators, or on 16-bit operand overflow.

        With fp32 operands the returned operand lives in a buffer reused by this side's next ``prepare``:
        run its ``update_pair`` calls (and ``commit``) before preparing the next batch of the same side.
        """
        check_activations(x, self.name, self.n_cols)
        x = x.detach()  # statistics, not a graph: activations from a traced forward (nnsight) may require grad
        if x.device != self.device:
            raise ValueError(
                f"{self.name} is on {x.device} but its accumulator is on {self.device}; move the batch "
                f"(x.to('{self.device}')) or build the accumulator with device='{x.device}'"
            )
        t = x.shape[0]
        zeros = torch.zeros(self.n_cols, device=self.device)
        if t == 0:
            empty = torch.empty((0, self.n_cols), dtype=operand_dtype, device=self.device)
            after = (self.n, self._mean, self._m2, self.sumsq)
            return PreparedBatch(empty, zeros, self.shift, self.n, None, after)
        if self.shift is not None:
            pivot = self.shift
        else:  # first batch: its first row (finite entries) is as good a pivot as any
            pivot = torch.nan_to_num(x[0].float(), nan=0.0, posinf=0.0, neginf=0.0)
        rtol = RECENTRE_RTOL[operand_dtype]
        fused = operand_dtype == torch.float32
        buf = self._operand_buffer(t) if fused else None
        total = column_sums(x, pivot, backend=backend, scratch=buf)  # buf is overwritten by the pre-pass next
        shift = (pivot.double() + total.double() / t).float()
        shift = torch.where(torch.isfinite(shift), shift, pivot)  # a bad column: the pre-pass names it

        for attempt in range(MAX_RECENTRE + 1):
            p = prepass(x, shift, operand_dtype=operand_dtype, backend=backend, out=buf[:t] if fused else None)
            g = p.col_sum.double() / t  # operand column mean: how far the shift missed μ_b
            q = p.col_sumsq.double()
            m2_b = (q - g.square() * t).clamp(min=0.0)
            new_shift = (shift.double() + g).float()
            miss = (g.abs() > rtol * (m2_b / t).sqrt()) & (new_shift != shift) & torch.isfinite(new_shift)
            after, v = self._merged_with(t, shift.double() + g, m2_b, q)
            too_big = ~(after[3] <= SUMSQ_LIMIT)  # also NaN
            # sync: one small read-back per pass
            n_bad, n_ovf, n_miss, n_big = torch.stack(
                [p.nonfinite.sum(), p.overflow.sum(), miss.sum(), too_big.sum()]
            ).tolist()
            if n_bad or n_ovf:
                _raise_bad_values(p, self.name, operand_dtype)
            if n_big:
                _raise_too_large(x, too_big, after[3], self.name)
            if not n_miss or attempt == MAX_RECENTRE:
                break
            shift = torch.where(miss, new_shift, shift)
        augmented = None
        if fused:
            if p.operand.data_ptr() != buf.data_ptr():  # a fallback path wrote elsewhere
                buf[:t].copy_(p.operand)
            buf[t].copy_(v)
            augmented = buf[: t + 1]
        centred = buf[:t] if fused else p.operand
        return PreparedBatch(centred, v, shift, self.n, augmented, after)

    def _merged_with(self, t: int, mean_b: torch.Tensor, m2_b: torch.Tensor, q: torch.Tensor):
        """State after adding a batch (t tokens, float64 mean and M2, Σ squared operands), and v [n] fp32."""
        if self.n == 0:
            return (t, mean_b, m2_b, q), torch.zeros(self.n_cols, device=self.device)
        n = self.n + t
        d = mean_b - self._mean
        w = self.n * t / n
        v = d * math.sqrt(w)
        v32 = v.float()
        after = (n, self._mean + d * (t / n), self._m2 + m2_b + w * d.square(), self.sumsq + q + v32.double().square())
        return after, v32

    def _operand_buffer(self, t: int) -> torch.Tensor:
        """[≥ t + 1, n_cols] fp32, kept between batches: a fresh 50 MB operand costs ~10 ms of page faults on
        CPU (bench/RESULTS.md). So the operand ``prepare`` returns is valid until this side's next ``prepare``."""
        if self._operand_buf is None or self._operand_buf.shape[0] < t + 1:
            self._operand_buf = torch.empty((t + 1, self.n_cols), dtype=torch.float32, device=self.device)
        return self._operand_buf

    def commit(self, p: PreparedBatch) -> None:
        """Add a prepared batch to the moments (after its ``update_pair`` calls)."""
        if p.n_tokens == 0:
            return
        if p.n_prev != self.n:
            raise RuntimeError(
                f"{self.name}: this batch was prepared after {p.n_prev} tokens but the moments now hold {self.n}; "
                "prepare → update_pair → commit one batch at a time per side"
            )
        self.n, self._mean, self._m2, self.sumsq = p.after
        self.shift = p.shift

    # -- derived -----------------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """[n_cols] float64 column means (NaN before any token)."""
        if self.n == 0:
            return torch.full((self.n_cols,), float("nan"), dtype=torch.float64, device=self.device)
        return self._mean

    @property
    def m2(self) -> torch.Tensor:
        """[n_cols] float64 Σ(x − mean)²."""
        return self._m2

    @property
    def var(self) -> torch.Tensor:
        """[n_cols] float64 population variance M2/n."""
        return self._m2 / self.n if self.n else torch.full_like(self._m2, float("nan"))

    @property
    def dead(self) -> torch.Tensor:
        """[n_cols] bool: no spread the fp32 operands resolve (constant column), so no correlation is defined."""
        return self._m2 <= DEAD_RTOL * self.sumsq

    def inv_sd(self) -> torch.Tensor:
        """[n_cols] fp32 1/√M2, NaN for dead columns: the finalize kernel's normaliser."""
        return torch.where(self.dead, float("nan"), self._m2.rsqrt()).float()

    def offset(self) -> torch.Tensor:
        """[n_cols] fp32 zeros: co-moments built by ``update_pair`` are already centred (C − u_a u_bᵀ = C).

        Kept so that finalize code written for shifted co-moments needs no branch.
        """
        return torch.zeros(self.n_cols, dtype=torch.float32, device=self.device)

    # -- merge and state ---------------------------------------------------------------------------
    def merge(self, other: ColumnMoments) -> ColumnMoments:
        """self ∪ other in place (Chan et al.'s pairwise merge); returns self. ``other`` is not modified.

        A co-moment of the two shards needs the matching term: see ``StreamingCorrelation.merge``.
        """
        if other.n_cols != self.n_cols:
            raise ValueError(f"cannot merge moments of {other.n_cols} columns into {self.n_cols}")
        if other.n == 0:
            return self
        o_mean, o_m2, o_sq = (t.to(self.device) for t in (other._mean, other._m2, other.sumsq))
        if self.n == 0:
            self.n, self._mean, self._m2, self.sumsq = other.n, o_mean.clone(), o_m2.clone(), o_sq.clone()
            self.shift = other.shift.to(self.device).clone()
            return self
        n = self.n + other.n
        d = o_mean - self._mean
        w = self.n * other.n / n
        self._mean = self._mean + d * (other.n / n)
        self._m2 = self._m2 + o_m2 + w * d.square()
        self.sumsq = self.sumsq + o_sq + w * d.square()
        self.n = n
        return self

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """``prefix``.shift (fp32, the next batch's pivot), .mean, .m2, .sumsq (float64); n is the caller's."""
        shift = self.shift if self.shift is not None else torch.zeros(self.n_cols, device=self.device)
        return {f"{prefix}.shift": shift, f"{prefix}.mean": self._mean, f"{prefix}.m2": self._m2,
                f"{prefix}.sumsq": self.sumsq}  # fmt: skip

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str, n: int) -> None:
        """Restore what ``state_dict`` wrote; refuses other shapes, dtypes, an older layout or broken values."""
        if f"{prefix}.mean" not in state and f"{prefix}.sum" in state:
            raise ValueError(
                f"state '{prefix}' holds shifted sums (sum/sumsq) from an older univ_kernels; its co-moments "
                "are not centred the way this version's are: recompute it with this version"
            )
        for key, dtype in STATE_KEYS:
            t = state.get(f"{prefix}.{key}")
            if t is None:
                raise ValueError(f"state has no '{prefix}.{key}': not a ColumnMoments state of this version")
            if t.shape != (self.n_cols,) or t.dtype != dtype:
                raise ValueError(
                    f"state '{prefix}.{key}' is {t.dtype} {tuple(t.shape)}, expected {dtype} ({self.n_cols},): "
                    "the checkpoint was written for another number of neurons"
                )
        mean, m2, sq = (state[f"{prefix}.{k}"].to(self.device).clone() for k in ("mean", "m2", "sumsq"))
        if n < 0 or not bool(torch.isfinite(torch.cat([mean, m2, sq])).all() and (m2 >= 0).all() and (sq >= 0).all()):
            raise ValueError(f"state '{prefix}' has a negative count, non-finite values or a negative M2")
        self.n, self._mean, self._m2, self.sumsq = n, mean, m2, sq
        self.shift = state[f"{prefix}.shift"].to(self.device).clone() if n else None


def select_columns(p: PreparedBatch, index: torch.Tensor) -> PreparedBatch:
    """The same prepared batch restricted to the columns ``index`` (a gathered copy), for ``update_pair``.

    Co-moments of scattered rows (a screen's candidates) then run as one dense GEMM with the same numerics
    contract as the full block: ``update_pair(c, select_columns(p_a, rows), p_b)`` equals the full update at
    those rows. The result is for updates only: it cannot be committed.
    """
    index = index.to(p.centred.device)
    pick = lambda t: None if t is None else t.index_select(1 if t.dim() == 2 else 0, index)  # noqa: E731
    return PreparedBatch(pick(p.centred), pick(p.correction), pick(p.shift), p.n_prev, pick(p.augmented),
                         (None, None, None, None))


def update_pair(
    c: torch.Tensor,
    p_a: PreparedBatch,
    p_b: PreparedBatch,
    rows: slice | None = None,
    cols: slice | None = None,
    *,
    backend: str = "auto",
    gemm: str | None = None,
    symmetric: bool = False,
) -> None:
    """C += Y_a[:, rows]ᵀ Y_b[:, cols] + v_a[rows] v_b[cols]ᵀ in place: one batch of Chan's merge for a pair.

    C [n_rows, n_cols] fp32 is the centred co-moment of those columns of the two sides (a block, or a
    within-layer W_l with p_a is p_b). fp32 operands: one GEMM over the T + 1 rows of the augmented
    operands; 16-bit: the GEMM, then an fp32 rank-1 ``addr``. Call before either side's ``commit``.
    ``symmetric=True`` (p_a is p_b, rows == cols): only C's upper triangle is updated, with about half
    the FLOPs (``comoment_update_symmetric``); read C through ``symmetrize_upper``.

    Example:
        >>> m = ColumnMoments(2)
        >>> c = torch.zeros(2, 2)
        >>> for x in (torch.tensor([[1.0, 2.0], [3.0, 2.0]]), torch.tensor([[5.0, 4.0]])):
        ...     p = m.prepare(x, operand_dtype=torch.float32, backend="torch")
        ...     update_pair(c, p, p, backend="torch")
        ...     m.commit(p)
        >>> [[round(v, 4) for v in row] for row in c.tolist()]  # Σ(x − mean)(x − mean)ᵀ over all three rows
        [[8.0, 4.0], [4.0, 2.6667]]
    """
    if p_a.n_prev != p_b.n_prev or p_a.n_tokens != p_b.n_tokens:
        raise ValueError(
            f"the two sides were prepared at different points of the stream ({p_a.n_prev} + {p_a.n_tokens} vs "
            f"{p_b.n_prev} + {p_b.n_tokens} tokens): both must see the same tokens, batch by batch"
        )
    rows = rows if rows is not None else slice(None)
    cols = cols if cols is not None else slice(None)
    if p_a.n_tokens == 0:
        return
    if symmetric:
        if p_a is not p_b or rows != cols:
            raise ValueError("symmetric=True updates a within-side co-moment: pass the same batch twice, rows == cols")
        fused = p_a.augmented is not None and p_a.n_prev
        x = (p_a.augmented if fused else p_a.centred)[:, rows]
        comoment_update_symmetric(c, x, backend=backend, gemm=gemm)
        if p_a.n_prev and not fused:
            c.addr_(p_a.correction[rows], p_a.correction[rows])
        return
    if p_a.n_prev == 0:  # first batch: no merge term
        comoment_update(c, p_a.centred[:, rows], p_b.centred[:, cols], backend=backend, gemm=gemm)
    elif p_a.augmented is not None and p_b.augmented is not None:
        comoment_update(c, p_a.augmented[:, rows], p_b.augmented[:, cols], backend=backend, gemm=gemm)
    else:
        comoment_update(c, p_a.centred[:, rows], p_b.centred[:, cols], backend=backend, gemm=gemm)
        c.addr_(p_a.correction[rows], p_b.correction[cols])


def _raise_bad_values(p: Prepassed, name: str, operand_dtype: torch.dtype) -> None:
    counts = torch.stack([p.nonfinite.sum(), p.overflow.sum()]).tolist()  # sync: one small read-back
    if counts[0]:
        cols = torch.nonzero(p.nonfinite).flatten()
        raise ValueError(
            f"{name} contains {counts[0]} non-finite values (NaN or ±Inf) in {cols.numel()} neurons "
            f"(first: column {int(cols[0])}); nothing was accumulated. Fix the source of the activations "
            "(e.g. a model overflowing in float16) or drop those tokens before update()."
        )
    cols = torch.nonzero(p.overflow).flatten()
    raise ValueError(
        f"{name} has {counts[1]} values that overflow the {operand_dtype} operand after centring "
        f"(first: column {int(cols[0])}); nothing was accumulated. Use operand_dtype=torch.bfloat16 "
        "or torch.float32, or rescale the activations."
    )


def _raise_too_large(x: torch.Tensor, too_big: torch.Tensor, sumsq: torch.Tensor, name: str) -> None:
    cols = torch.nonzero(too_big).flatten()
    first = int(cols[0])
    biggest = float(x[:, cols].float().abs().nan_to_num(posinf=float("inf")).max())
    raise ValueError(
        f"{name} has values too large for the float32 accumulators in {cols.numel()} neurons (first: column "
        f"{first}, |x| up to {biggest:.3g}): their squared deviations would sum to {float(sumsq[first]):.3g}, "
        f"past the limit {SUMSQ_LIMIT:.3g}; nothing was accumulated. Rescale those activations or drop the "
        "tokens before update()."
    )

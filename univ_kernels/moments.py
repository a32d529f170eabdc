"""Per-column streaming moments of one side (one model, or x_a / x_b of a pair), shared by every pair.

State: n (tokens), a fixed shift s [n_cols] fp32 (the first batch's column mean), and in float64
S1 = Σ(x − s), S2 = Σ(x − s)² over the cast operands the GEMMs saw. Then

    mean = s + S1/n,    M2 = Σ(x − mean)² = S2 − S1²/n,    u = S1/√n (the rank-1 correction of C).

n, means and M2 are O(N) numbers, so float64 costs nothing and keeps them exact. A column is
*dead* (no correlation defined) when M2 ≤ 1e-12·S2: its spread is below what fp32 operands resolve.
"""

from __future__ import annotations

import torch

from univ_kernels._launch import check_activations
from univ_kernels.prepass import Prepassed, prepass

DEAD_RTOL = 1e-12


def first_shift(x: torch.Tensor) -> torch.Tensor:
    """Column means of the finite values of the first batch, as the stream's fixed fp32 shift."""
    finite = torch.isfinite(x)
    total = torch.where(finite, x, 0).sum(0, dtype=torch.float64)
    return (total / finite.sum(0).clamp(min=1)).float()


class ColumnMoments:
    """Streaming column moments of one side; ``prepare`` checks a batch, ``commit`` adds it.

    Splitting the two lets a caller pre-pass every side of a batch, raise on bad input before any state
    changes, and only then run the GEMMs and commit — an update is all or nothing.
    """

    def __init__(self, n_cols: int, *, device: torch.device | str = "cpu", name: str = "x"):
        self.n_cols = n_cols
        self.name = name
        self.device = torch.device(device)
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1 = torch.zeros(n_cols, dtype=torch.float64, device=self.device)
        self.s2 = torch.zeros(n_cols, dtype=torch.float64, device=self.device)
        self._operand_buf: torch.Tensor | None = None  # CPU fp32 operands: reused batch after batch

    # -- update ------------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, *, operand_dtype: torch.dtype, backend: str = "auto") -> Prepassed:
        """Validate and pre-pass one batch [T, n_cols]; raises ValueError on non-finite or overflowing values.

        On CPU with fp32 operands the returned operand lives in a buffer reused by this side's next
        ``prepare``: use it (run the GEMMs) before preparing the next batch of the same side.
        """
        check_activations(x, self.name, self.n_cols)
        if x.device != self.device:
            raise ValueError(
                f"{self.name} is on {x.device} but its accumulator is on {self.device}; move the batch "
                f"(x.to('{self.device}')) or build the accumulator with device='{x.device}'"
            )
        shift = self.shift if self.shift is not None else first_shift(x)
        out = self._operand_buffer(x.shape[0]) if self.device.type == "cpu" and operand_dtype == torch.float32 else None
        p = prepass(x, shift, operand_dtype=operand_dtype, backend=backend, out=out)
        _raise_if_bad(p, self.name, operand_dtype)
        return p

    def _operand_buffer(self, t: int) -> torch.Tensor:
        """[≥ t, n_cols] fp32, kept between batches: a fresh 50 MB operand costs ~10 ms of page faults on CPU
        (bench/RESULTS.md). So the operand ``prepare`` returns is valid until this side's next ``prepare``."""
        if self._operand_buf is None or self._operand_buf.shape[0] < t:
            self._operand_buf = torch.empty((t, self.n_cols), dtype=torch.float32, device=self.device)
        return self._operand_buf

    def commit(self, p: Prepassed) -> None:
        if p.n_tokens == 0:
            return
        if self.shift is None:
            self.shift = p.shift
        self.n += p.n_tokens
        self.s1 += p.col_sum.double()
        self.s2 += p.col_sumsq.double()

    # -- derived -----------------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """[n_cols] float64 column means (NaN before any token)."""
        if self.n == 0:
            return torch.full((self.n_cols,), float("nan"), dtype=torch.float64, device=self.device)
        return self.shift.double() + self.s1 / self.n

    @property
    def m2(self) -> torch.Tensor:
        """[n_cols] float64 Σ(x − mean)²."""
        if self.n == 0:
            return torch.zeros_like(self.s1)
        return (self.s2 - self.s1.square() / self.n).clamp(min=0.0)

    @property
    def var(self) -> torch.Tensor:
        """[n_cols] float64 population variance M2/n."""
        return self.m2 / self.n if self.n else torch.full_like(self.s1, float("nan"))

    @property
    def dead(self) -> torch.Tensor:
        """[n_cols] bool: zero variance (constant column), so no correlation is defined."""
        return self.m2 <= DEAD_RTOL * self.s2

    def inv_sd(self) -> torch.Tensor:
        """[n_cols] fp32 1/√M2, NaN for dead columns: the finalize kernel's normaliser."""
        return torch.where(self.dead, float("nan"), self.m2.rsqrt()).float()

    def offset(self) -> torch.Tensor:
        """[n_cols] fp32 u = S1/√n: C_centred = C_shifted − u_a u_bᵀ."""
        if self.n == 0:
            return torch.zeros(self.n_cols, dtype=torch.float32, device=self.device)
        return (self.s1 / self.n**0.5).float()

    # -- merge and state ---------------------------------------------------------------------------
    def merged(self, other: ColumnMoments) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(n, S1, S2) of self ∪ other, re-expressed around *self*'s shift (Chan et al.'s pairwise merge)."""
        if other.n == 0:
            return self.n, self.s1.clone(), self.s2.clone()
        shift = self.shift if self.shift is not None else other.shift
        n = self.n + other.n
        mean = (self.n * self.mean.nan_to_num() + other.n * other.mean.to(self.device)) / n
        m2 = self.m2 + other.m2.to(self.device)
        if self.n:
            delta = other.mean.to(self.device) - self.mean
            m2 = m2 + delta.square() * (self.n * other.n / n)
        s1 = n * (mean - shift.double())
        return n, s1, m2 + s1.square() / n

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        shift = self.shift if self.shift is not None else torch.zeros(self.n_cols, device=self.device)
        return {f"{prefix}.shift": shift, f"{prefix}.sum": self.s1, f"{prefix}.sumsq": self.s2}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str, n: int) -> None:
        for key, dtype in (("shift", torch.float32), ("sum", torch.float64), ("sumsq", torch.float64)):
            t = state[f"{prefix}.{key}"]
            if t.shape != (self.n_cols,) or t.dtype != dtype:
                raise ValueError(
                    f"state '{prefix}.{key}' is {t.dtype} {tuple(t.shape)}, expected {dtype} ({self.n_cols},): "
                    "the checkpoint was written for another number of neurons"
                )
        self.n = n
        self.shift = state[f"{prefix}.shift"].to(self.device) if n else None
        self.s1 = state[f"{prefix}.sum"].to(self.device).clone()
        self.s2 = state[f"{prefix}.sumsq"].to(self.device).clone()


def _raise_if_bad(p: Prepassed, name: str, operand_dtype: torch.dtype) -> None:
    counts = torch.stack([p.nonfinite.sum(), p.overflow.sum()]).tolist()  # sync: one small read-back
    if counts[0]:
        cols = torch.nonzero(p.nonfinite).flatten()
        raise ValueError(
            f"{name} contains {counts[0]} non-finite values (NaN or ±Inf) in {cols.numel()} neurons "
            f"(first: column {int(cols[0])}); nothing was accumulated. Fix the source of the activations "
            "(e.g. a model overflowing in float16) or drop those tokens before update()."
        )
    if counts[1]:
        cols = torch.nonzero(p.overflow).flatten()
        raise ValueError(
            f"{name} has {counts[1]} values that overflow the {operand_dtype} operand after centring "
            f"(first: column {int(cols[0])}); nothing was accumulated. Use operand_dtype=torch.bfloat16 "
            "or torch.float32."
        )

"""``StreamingCorrelation``: exact Pearson r between every neuron of A and every neuron of B over a stream.

State: the two sides' ``ColumnMoments`` and C [n_a, n_b] fp32 = Σ (x_a − mean_a)(x_b − mean_b)ᵀ, kept
centred batch by batch (per-batch centring, Chan's merge: moments.py). Memory is C plus one batch; nothing
of size [tokens × neurons] is kept. The mathematics live in the functional ops
(``prepass``, ``comoment_update``, ``correlation_summary``); this class holds state and lifecycle.

    corr = StreamingCorrelation(n_a, n_b)
    for x_a, x_b in batches:          # [T, n_a], [T, n_b]
        corr.update(x_a, x_b)
    corr.merge(shard)                 # Chan's formula: shards combine exactly
    corr.save("run/state")            # run/state.safetensors (checksummed, univ_kernels.io) + run/state.json
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import safetensors
import torch

from univ_kernels._launch import BACKENDS, FLOAT_DTYPES, check_activations
from univ_kernels.finalize import CorrelationSummary, correlation_matrix, correlation_summary
from univ_kernels.io import StateFileError, atomic_write_bytes, read_meta, read_tensors, write_tensors
from univ_kernels.moments import ColumnMoments, update_pair

__all__ = ["StreamingCorrelation", "atomic_write_bytes", "default_operand_dtype"]  # atomic_write_bytes: io's

FORMAT = "univ_kernels.StreamingCorrelation"
FORMAT_VERSION = 2  # 2: centred C and (mean, m2, sumsq) per side; 1 held shifted sums


def default_operand_dtype(device: torch.device, input_dtype: torch.dtype) -> torch.dtype:
    """fp32 on CPU (its BLAS has no fast half path) and for fp32 inputs; fp16 for 16-bit inputs on GPU.

    Centred values in fp16 are as fast as bf16 on the GPU's matrix units and 8× finer (10 mantissa bits against 7).
    """
    if device.type != "cuda" or input_dtype == torch.float32:
        return torch.float32
    return torch.float16


class StreamingCorrelation:
    """Pearson correlation of every column of A with every column of B, accumulated batch by batch.

    Args:
        n_a, n_b: neurons (columns) of the two sides.
        device: where the accumulators live; by default the device of the first batch.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        operand_dtype: dtype of the centred GEMM operands; by default fp32 on CPU and for fp32 inputs,
            fp16 for 16-bit inputs on CUDA. Fixed at the first update.
        gemm: GPU path of the co-moment update, ``"cublas"`` (default) or ``"triton"``.

    Example:
        >>> corr = StreamingCorrelation(2, 1)
        >>> x = torch.tensor([[1.0, 2.0], [2.0, 0.0], [3.0, 1.0]])
        >>> corr.update(x, x[:, :1] * 2)
        >>> corr.n, [round(v, 4) for v in corr.correlation().flatten().tolist()]
        (3, [1.0, -0.5])
    """

    def __init__(
        self,
        n_a: int,
        n_b: int,
        *,
        device: torch.device | str | None = None,
        backend: str = "auto",
        operand_dtype: torch.dtype | None = None,
        gemm: str | None = None,
    ):
        if n_a < 1 or n_b < 1:
            raise ValueError(f"n_a and n_b must be ≥ 1, got {n_a}, {n_b}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if operand_dtype is not None and operand_dtype not in FLOAT_DTYPES:
            raise TypeError(f"operand_dtype must be float32, float16 or bfloat16, got {operand_dtype}")
        self.n_a, self.n_b = n_a, n_b
        self.backend, self.gemm = backend, gemm
        self.operand_dtype = operand_dtype
        self._a: ColumnMoments | None = None
        self._b: ColumnMoments | None = None
        self._c: torch.Tensor | None = None
        if device is not None:
            self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        self._a = ColumnMoments(self.n_a, device=device, name="x_a")
        self._b = ColumnMoments(self.n_b, device=device, name="x_b")
        self._c = torch.zeros((self.n_a, self.n_b), dtype=torch.float32, device=device)

    # -- streaming ---------------------------------------------------------------------------------
    def update(self, x_a: torch.Tensor, x_b: torch.Tensor) -> None:
        """Add one batch: ``x_a`` [T, n_a] and ``x_b`` [T, n_b], same T and device, any strides.

        All or nothing: on a bad batch (shape, dtype, device, NaN/Inf, values too large for the fp32
        accumulators) it raises and the state is unchanged.
        """
        check_activations(x_a, "x_a", self.n_a)
        check_activations(x_b, "x_b", self.n_b)
        if x_a.shape[0] != x_b.shape[0]:
            raise ValueError(f"x_a has {x_a.shape[0]} tokens but x_b has {x_b.shape[0]}: rows must be the same tokens")
        if x_a.device != x_b.device:
            raise ValueError(f"x_a is on {x_a.device} but x_b is on {x_b.device}; put both on one device")
        if self._c is None:
            self._allocate(x_a.device)
        if self.operand_dtype is None:
            self.operand_dtype = default_operand_dtype(self.device, x_a.dtype)
        p_a = self._a.prepare(x_a, operand_dtype=self.operand_dtype, backend=self.backend)
        p_b = self._b.prepare(x_b, operand_dtype=self.operand_dtype, backend=self.backend)
        update_pair(self._c, p_a, p_b, backend=self.backend, gemm=self.gemm)
        self._a.commit(p_a)
        self._b.commit(p_b)

    # -- statistics --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._c.device if self._c is not None else torch.device("cpu")

    @property
    def n(self) -> int:
        """Tokens seen."""
        return self._a.n if self._a is not None else 0

    @property
    def mean_a(self) -> torch.Tensor:
        return self._side("a").mean

    @property
    def mean_b(self) -> torch.Tensor:
        return self._side("b").mean

    @property
    def var_a(self) -> torch.Tensor:
        return self._side("a").var

    @property
    def var_b(self) -> torch.Tensor:
        return self._side("b").var

    def _side(self, which: str) -> ColumnMoments:
        if self._c is None:
            self._allocate(self.device)
        return self._a if which == "a" else self._b

    def _finalize_args(self):
        a, b = self._side("a"), self._side("b")
        return self._c, a.offset(), b.offset(), a.inv_sd(), b.inv_sd()

    def correlation(self) -> torch.Tensor:
        """Dense r [n_a, n_b] fp32 (NaN for dead neurons). For small problems and tests."""
        return correlation_matrix(*self._finalize_args())

    def summary(self, bins: int = 100) -> CorrelationSummary:
        """Per-neuron max/argmax/min/argmin on both sides and the histogram of r, without writing r."""
        return correlation_summary(*self._finalize_args(), bins=bins, backend=self.backend)

    def centred_comoment(self) -> torch.Tensor:
        """Σ(x_a − mean_a)(x_b − mean_b)ᵀ, fp32 [n_a, n_b] (a copy of C, which is kept centred)."""
        if self._c is None:
            self._allocate(self.device)
        return self._c.clone()

    # -- merge ------------------------------------------------------------------------------------
    def merge(self, other: StreamingCorrelation) -> StreamingCorrelation:
        """Fold another shard of the stream into this one (Chan et al.'s pairwise update); returns self.

        C = C₁ + C₂ + (n₁n₂/n)·d_a d_bᵀ with d the difference of the shards' means: one rank-1 pass over C.
        Exact up to fp32 rounding: one batch, many batches and merged shards agree to ~1e-6 in r.
        """
        if not isinstance(other, StreamingCorrelation):
            raise TypeError(f"can only merge another StreamingCorrelation, got {type(other).__name__}")
        if (other.n_a, other.n_b) != (self.n_a, self.n_b):
            raise ValueError(f"cannot merge a {other.n_a}×{other.n_b} correlation into a {self.n_a}×{self.n_b} one")
        if other.n == 0:
            return self
        if self._c is None:
            self._allocate(other.device)
        if self.operand_dtype is None:
            self.operand_dtype = other.operand_dtype
        c = self._c
        n1, n2 = self.n, other.n
        if n1 == 0:
            c.copy_(other._c)
        else:
            root_w = math.sqrt(n1 * n2 / (n1 + n2))
            d_a = ((other._a.mean.to(c.device) - self._a.mean) * root_w).float()
            d_b = ((other._b.mean.to(c.device) - self._b.mean) * root_w).float()
            c += other._c.to(c.device)
            c.addr_(d_a, d_b)
        self._a.merge(other._a)
        self._b.merge(other._b)
        return self

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors: ``n``, ``c`` (centred), and per side ``shift``, ``mean``, ``m2``, ``sumsq``."""
        a, b = self._side("a"), self._side("b")
        return {"n": torch.tensor(self.n, dtype=torch.int64), "c": self._c, **a.state_dict("a"), **b.state_dict("b")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "a.sum" in state and "a.mean" not in state:
            raise ValueError(
                "state holds shifted sums from univ_kernels format 1, whose C is not centred; it cannot be "
                "continued by this version: recompute it"
            )
        keys = {"n", "c"} | {f"{side}.{k}" for side in "ab" for k in ("shift", "mean", "m2", "sumsq")}
        missing = keys - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}: not a StreamingCorrelation state")
        c = state["c"]
        if c.shape != (self.n_a, self.n_b) or c.dtype != torch.float32:
            raise ValueError(
                f"state holds a {c.dtype} {tuple(c.shape)} co-moment; this accumulator is float32 "
                f"({self.n_a}, {self.n_b}): the checkpoint was written for other models or neurons"
            )
        device = self._c.device if self._c is not None else c.device
        self._allocate(device)
        n = int(state["n"])
        self._a.load_state_dict(state, "a", n)
        self._b.load_state_dict(state, "b", n)
        self._c.copy_(c)

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_a": self.n_a,
            "n_b": self.n_b,
            "n": self.n,
            "operand_dtype": str(self.operand_dtype).removeprefix("torch.") if self.operand_dtype else None,
            "backend": self.backend,
            "gemm": self.gemm,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path``.safetensors (tensors, metadata, a sha256 per tensor; ``univ_kernels.io``) and
        ``path``.json (a readable copy of the metadata), each atomically; no pickle. Tensors go to disk one
        by one: no whole-file bytes object in RAM."""
        path = Path(path).with_suffix("")
        meta = self.metadata()
        write_tensors(path.with_suffix(".safetensors"), self.state_dict(), meta)
        atomic_write_bytes(path.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
        return path.with_suffix(".safetensors")

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: torch.device | str | None = None, **kwargs
    ) -> StreamingCorrelation:
        """Rebuild an accumulator written by ``save``, checking every tensor's name, dtype, shape and
        checksum (``univ_kernels.io.StateFileError`` names the file and tensor); ``kwargs`` override
        backend/gemm."""
        path = Path(path).with_suffix("")
        st_path = path.with_suffix(".safetensors")
        if not st_path.exists():
            raise FileNotFoundError(f"no saved correlation at {st_path}")
        try:
            meta, _ = read_meta(st_path)
        except StateFileError:
            _raise_if_older_format(st_path)
            raise
        if meta.get("format") != FORMAT:
            raise ValueError(f"{st_path} is not a {FORMAT} file (metadata: {meta or 'none'})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{st_path} was written in {FORMAT} format version {meta.get('format_version')}; this version "
                f"reads {FORMAT_VERSION}: recompute it"
            )
        op = getattr(torch, meta["operand_dtype"]) if meta.get("operand_dtype") else None
        obj = cls(
            meta["n_a"],
            meta["n_b"],
            backend=kwargs.get("backend", meta["backend"]),
            operand_dtype=op,
            gemm=kwargs.get("gemm", meta["gemm"]),
        )
        layout = cls(meta["n_a"], meta["n_b"], device="meta").state_dict()
        expected = {k: (v.dtype, tuple(v.shape)) for k, v in layout.items()}
        state, _ = read_tensors(st_path, expected, device=str(device) if device is not None else "cpu")
        if int(state["n"]) != meta.get("n"):
            raise ValueError(f"{st_path}: its metadata says n = {meta.get('n')} but the state holds {int(state['n'])}")
        obj.load_state_dict(state)
        return obj


def _raise_if_older_format(st_path: Path) -> None:
    """A plain safetensors file from format 1 (before univ_kernels.io): say so, rather than 'corrupt'."""
    try:
        with safetensors.safe_open(st_path, framework="pt") as f:
            old = json.loads((f.metadata() or {}).get("univ_kernels", "{}"))
    except Exception:  # noqa: BLE001 - not even plain safetensors: the caller's error stands
        return
    if old.get("format") == FORMAT:
        raise ValueError(
            f"{st_path} was written in {FORMAT} format version {old.get('format_version')} (shifted, uncentred "
            f"co-moments); this version reads {FORMAT_VERSION}: recompute it"
        )

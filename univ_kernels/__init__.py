"""univ_kernels: streaming cross-correlation of neuron activations, fused Triton kernels and torch references.

Standalone (torch, triton, numpy, safetensors); never imports ``univ``. Public pieces:

- ``StreamingCorrelation``: the stateful accumulator (update, merge, summary, save/load).
- ``ColumnMoments``: per-side moments, shareable by many pairs (prepare → ``update_pair`` per pair → commit).
- ``prepass``, ``comoment_update``, ``correlation_summary``, ``correlation_matrix``: the functional ops.
- ``gathered_comoment_update``, ``update_candidate_pairs``: co-moments of chosen pairs only (``pairs``).
"""

from univ_kernels._launch import interpreting, resolve_backend
from univ_kernels.comoment import comoment_update, comoment_update_torch
from univ_kernels.finalize import CorrelationSummary, correlation_matrix, correlation_summary, summary_torch
from univ_kernels.moments import ColumnMoments, PreparedBatch, select_columns, update_pair
from univ_kernels.pairs import gathered_comoment_update, update_candidate_pairs
from univ_kernels.prepass import Prepassed, column_sums, prepass, prepass_torch
from univ_kernels.streaming import StreamingCorrelation, atomic_write_bytes, default_operand_dtype

__all__ = [
    "ColumnMoments",
    "CorrelationSummary",
    "PreparedBatch",
    "Prepassed",
    "StreamingCorrelation",
    "atomic_write_bytes",
    "column_sums",
    "comoment_update",
    "comoment_update_torch",
    "correlation_matrix",
    "correlation_summary",
    "default_operand_dtype",
    "gathered_comoment_update",
    "interpreting",
    "prepass",
    "prepass_torch",
    "resolve_backend",
    "select_columns",
    "summary_torch",
    "update_candidate_pairs",
    "update_pair",
]

"""Float64 oracles and data makers for the kernel tests, independent of both backends."""

from __future__ import annotations

import numpy as np
import torch

BACKENDS = ["torch", "triton"]  # triton runs under TRITON_INTERPRET=1 on CPU (set in conftest.py)


def correlated_pair(t: int, n_a: int, n_b: int, *, offset: float = 0.0, seed: int = 0, dtype=torch.float32):
    """x_a [t, n_a], x_b [t, n_b] sharing latent factors, so r spans a real range; offset sets mean ≫ std."""
    g = torch.Generator().manual_seed(seed)
    k = max(2, min(n_a, n_b) // 2)
    z = torch.randn(t, k, generator=g, dtype=torch.float64)
    x_a = z @ torch.randn(k, n_a, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        t, n_a, generator=g, dtype=torch.float64
    )
    x_b = z @ torch.randn(k, n_b, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        t, n_b, generator=g, dtype=torch.float64
    )
    scale_a = torch.rand(n_a, generator=g, dtype=torch.float64) * 3 + 0.1
    x_a = x_a * scale_a + offset * scale_a  # mean = offset × std for every column
    x_b = x_b + offset
    return x_a.to(dtype), x_b.to(dtype)


def reference_r(x_a: torch.Tensor, x_b: torch.Tensor) -> np.ndarray:
    """Pearson r [n_a, n_b] in float64 numpy from the exact input values; NaN for constant columns."""
    a = x_a.double().numpy()
    b = x_b.double().numpy()
    a = a - a.mean(0)
    b = b - b.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sa = np.sqrt((a * a).sum(0))
        sb = np.sqrt((b * b).sum(0))
        sa[sa == 0] = np.nan
        sb[sb == 0] = np.nan
        return (a.T @ b) / np.outer(sa, sb)


def assert_close_verbose(actual, expected, atol: float, what: str = "r") -> None:
    """Like allclose, but says how many elements differ, where, and the largest error; NaN must match NaN."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert (nan_a == nan_e).all(), f"{what}: NaN mismatch at {np.argwhere(nan_a != nan_e)[:5].tolist()}"
    err = np.abs(np.where(nan_e, 0, actual - expected))
    bad = err > atol
    if bad.any():
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements differ by more than {atol}; "
            f"max {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}; first {np.argwhere(bad)[:5].tolist()}"
        )

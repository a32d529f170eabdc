"""The random-rotation baseline, computed analytically from accumulators already in hand.

The paper correlates model a with *rotated* neurons of model m, layer by layer: ỹ = y Q_l with Q_l a
random [d, d] matrix whose columns are unit vectors (the paper's row-normalised Gaussian R = Q_lᵀ; not
orthogonal). Rotation is linear, so with C the centred cross co-moment and W_l = Σ(y_l − ȳ_l)ᵀ(y_l − ȳ_l)
the centred within-layer co-moment of model m:

    co-moment(x, ỹ) = C[:, l] Q_l          variance of rotated neuron j ∝ (Q_lᵀ W_l Q_l)_jj

No second pass over the data, exact for any number of draws. Draws are seeded per
(seed, model index, layer), so every run and every pair sees the same rotations of a given model.
"""

from __future__ import annotations

import torch

KINDS = ("gaussian", "orthogonal", "none")


def rotation(d: int, *, kind: str, seed: int, model_index: int, layer: int) -> torch.Tensor:
    """Q [d, d] float32 on CPU: rotated neuron j = Σ_i y_i Q[i, j].

    ``gaussian``: iid normal with unit-norm columns (the paper's draw); ``orthogonal``: Haar-random
    orthogonal (QR of a Gaussian with the signs of R's diagonal fixed).
    """
    if kind not in ("gaussian", "orthogonal"):
        raise ValueError(f"baseline kind must be 'gaussian' or 'orthogonal', got {kind!r}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + model_index * 1_009 + layer)
    z = torch.randn(d, d, generator=g, dtype=torch.float64)
    if kind == "gaussian":
        q = z / z.norm(dim=0, keepdim=True)
    else:
        q, r = torch.linalg.qr(z)
        q = q * torch.sign(torch.diagonal(r))
    return q.float()


def rotated_inv_sd(w_centred: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1/√(Qᵀ W Q)_jj for each rotated neuron j (fp32, NaN where the rotated variance vanishes)."""
    var = ((w_centred.double() @ q.double()) * q.double()).sum(0)
    scale = torch.diagonal(w_centred).double().sum().clamp(min=1e-300)
    return torch.where(var <= 1e-12 * scale, float("nan"), var.clamp(min=1e-300).rsqrt()).float()

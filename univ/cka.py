"""Layer similarity for free: linear CKA between every layer of model a and every layer of model m.

Linear CKA (Kornblith et al. 2019) of centred activations X [T, d_a] and Y [T, d_m]:

    CKA(X, Y) = ‖X_cᵀ Y_c‖²_F / (‖X_cᵀ X_c‖_F ‖Y_cᵀ Y_c‖_F)

Every factor is an accumulator a correlate run already holds: X_cᵀ Y_c is a [d_a, d_m] tile of the centred
cross co-moment C, and X_cᵀ X_c, Y_cᵀ Y_c are the within-layer co-moments W of each model. So the whole
layer × layer map costs one read of C at finalize, and no pass over the data. CKA is invariant to
permutations and rotations of a layer's neurons: a permuted copy of a model gives 1 on the diagonal.

    layer_cka(c, u_a, u_m, w_fro_a, w_fro_m, d_a, d_m)  → [L_a, L_m] float64 for one block of layers of a
    within_fro(w, u)                                     → ‖W_l centred‖_F for every layer
    layer_similarity_table / write_layer_similarity      → layer_similarity.parquet
    read_layer_similarity                                → the table, or None
    plot_layer_similarity(table, path)                   → a PNG heatmap per (model, other)
    layer_similarity_figure(table)                       → the same as a Figure (for univ report)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from univ_kernels.comoment import symmetrize_upper

FILE = "layer_similarity.parquet"
COLUMNS = ["model", "other", "layer", "other_layer", "cka"]
TILE_BYTES = 32 << 20  # rows of C squared at a time in layer_cka


def within_fro(w: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """‖W_l − u_l u_lᵀ‖_F per layer, float64 [L], from within-layer co-moments w [L, d, d].

    The run keeps only W's upper triangle (``comoment_update_symmetric``); a full symmetric W reads the same.

    ``u`` [L·d] is the moments' shift correction S1/√n (``ColumnMoments.offset``); None if w is centred.
    """
    n_layers, d, _ = w.shape
    out = torch.empty(n_layers, dtype=torch.float64)
    for layer in range(n_layers):
        wl = symmetrize_upper(w[layer]).float()
        if u is not None:
            ul = u[layer * d:(layer + 1) * d].to(device=wl.device, dtype=torch.float32)
            wl = wl - ul[:, None] * ul[None, :]
        out[layer] = wl.square().sum(dtype=torch.float64).sqrt().cpu()
    return out


def layer_cka(c: torch.Tensor, u_a: torch.Tensor | None, u_m: torch.Tensor | None, w_fro_a: torch.Tensor,
              w_fro_m: torch.Tensor, d_a: int, d_m: int) -> torch.Tensor:
    """CKA [L_rows, L_m] float64 between the layers of a in ``c``'s rows and every layer of m.

    ``c`` [L_rows·d_a, L_m·d_m] fp32 cross co-moments (raw, with ``u_a``/``u_m`` their shift corrections;
    or centred, with None); ``w_fro_a`` [L_rows], ``w_fro_m`` [L_m] from ``within_fro``. NaN where a
    layer has no variance at all.
    """
    rows, cols = c.shape
    if rows % d_a or cols % d_m or w_fro_a.shape != (rows // d_a,) or w_fro_m.shape != (cols // d_m,):
        raise ValueError(f"layer_cka: c {tuple(c.shape)} is not [{w_fro_a.numel()}·{d_a}, {w_fro_m.numel()}·{d_m}]")
    la, lm = rows // d_a, cols // d_m
    num = torch.empty((la, lm), dtype=torch.float64)
    step = max(1, TILE_BYTES // (4 * cols))  # rows per tile: a few MB at a time, never a copy of a layer's rows
    for i in range(la):
        sq = torch.zeros(lm, dtype=torch.float64, device=c.device)
        for r0 in range(i * d_a, (i + 1) * d_a, step):
            r1 = min(r0 + step, (i + 1) * d_a)
            tile = c[r0:r1].float()
            tile = tile - u_a[r0:r1, None].float() * u_m[None, :].float() if u_a is not None else tile.clone()
            sq += tile.square_().view(r1 - r0, lm, d_m).sum((0, 2), dtype=torch.float64)  # ‖X_cᵀ Y_c‖²_F per layer
        num[i] = sq.cpu()
    den = w_fro_a.double()[:, None] * w_fro_m.double()[None, :]
    return torch.where(den > 0, num / den.clamp(min=1e-300), float("nan"))


def cka_frame(cka: np.ndarray | torch.Tensor, model: str, other: str, first_layer: int = 0) -> pd.DataFrame:
    """Long-format rows (model, other, layer, other_layer, cka) of one [L_rows, L_m] block."""
    cka = np.asarray(cka, dtype=np.float64)
    la, lm = cka.shape
    return pd.DataFrame({
        "model": [model] * (la * lm), "other": [other] * (la * lm),
        "layer": np.repeat(np.arange(first_layer, first_layer + la), lm), "other_layer": np.tile(np.arange(lm), la),
        "cka": cka.reshape(-1),
    })


def layer_similarity_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The blocks' rows as one table: model, other (labels), layer, other_layer (int), cka (float64, [0, 1])."""
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    table = table.sort_values(["model", "other", "layer", "other_layer"], kind="stable").reset_index(drop=True)
    return table[COLUMNS]


def write_layer_similarity(out: str | Path, frames: list[pd.DataFrame]) -> Path:
    """``OUT/layer_similarity.parquet`` (the run writes it atomically through univ.run.files instead)."""
    path = Path(out) / FILE
    layer_similarity_table(frames).to_parquet(path, index=False)
    return path


def read_layer_similarity(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's layer-similarity table, or None for runs without one (older runs, or no within-layer W)."""
    path = Path(run_dir) / FILE
    return pd.read_parquet(path) if path.is_file() else None


def plot_layer_similarity(table: pd.DataFrame, path: str | Path) -> Path:
    """One heatmap of CKA (layer of model × layer of other) per (model, other) pair, side by side, as a PNG."""
    path = Path(path)
    layer_similarity_figure(table).savefig(path, dpi=110)
    return path


def layer_similarity_figure(table: pd.DataFrame):
    """The heatmaps as a matplotlib Figure (Agg, no pyplot state), for a report to save as it saves others."""
    from matplotlib.figure import Figure

    pairs = list(table[["model", "other"]].drop_duplicates().itertuples(index=False, name=None))
    if not pairs:
        raise ValueError("plot_layer_similarity: the table is empty")
    fig = Figure(figsize=(3.4 * len(pairs) + 0.8, 3.2), layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    image = None
    for ax, (model, other) in zip(axes, pairs, strict=True):
        g = table[(table["model"] == model) & (table["other"] == other)]
        grid = g.pivot(index="layer", columns="other_layer", values="cka").sort_index().sort_index(axis=1)
        image = ax.imshow(grid.to_numpy(), vmin=0.0, vmax=1.0, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
        ax.set_xlabel(f"layer of {other}")
        ax.set_ylabel(f"layer of {model}")
        ax.set_title(f"linear CKA: {model} vs {other}", fontsize=9)
        if grid.size <= 64:  # a small map reads better with its numbers written in
            for (i, j), v in np.ndenumerate(grid.to_numpy()):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    fig.colorbar(image, ax=list(axes), shrink=0.9, label="CKA")
    return fig

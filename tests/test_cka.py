"""Linear CKA from a run's accumulators against float64 CKA on the concatenated activations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from univ.cka import (
    cka_frame,
    layer_cka,
    plot_layer_similarity,
    read_layer_similarity,
    within_fro,
    write_layer_similarity,
)
from univ_kernels import ColumnMoments, update_pair


def _cka64(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _acts(t: int, n_layers: int, d: int, seed: int, latent: np.ndarray) -> np.ndarray:
    g = np.random.default_rng(seed)
    h = latent @ g.normal(size=(latent.shape[1], n_layers * d)) + g.normal(size=(t, n_layers * d))
    return np.maximum(h, 0) + 3.0  # ReLU-like and off-centre: the shift correction matters


def _stream(xs: list[np.ndarray], pairs: list[tuple[int, int]], batch: int):
    """Accumulate as a run does: per-batch centring merged by Chan's formula (ColumnMoments + update_pair)."""
    moms = [ColumnMoments(x.shape[1]) for x in xs]
    cs = {p: torch.zeros(xs[p[0]].shape[1], xs[p[1]].shape[1]) for p in pairs}
    for t0 in range(0, xs[0].shape[0], batch):
        prepped = [m.prepare(torch.tensor(x[t0:t0 + batch], dtype=torch.float32), operand_dtype=torch.float32,
                             backend="torch") for m, x in zip(moms, xs, strict=True)]
        for (i, j), c in cs.items():
            update_pair(c, prepped[i], prepped[j], backend="torch")
        for m, p in zip(moms, prepped, strict=True):
            m.commit(p)
    return moms, cs


@pytest.mark.parametrize("t, la, da, lm, dm", [(700, 3, 17, 2, 23), (333, 1, 40, 4, 9)])
def test_cka_from_accumulators_equals_float64(t, la, da, lm, dm):
    latent = np.random.default_rng(0).normal(size=(t, 5))
    x, y = _acts(t, la, da, 1, latent), _acts(t, lm, dm, 2, latent)
    moms, cs = _stream([x, y], [(0, 1), (0, 0), (1, 1)], batch=128)
    ua, um = moms[0].offset(), moms[1].offset()
    wa = torch.stack([cs[(0, 0)][l * da:(l + 1) * da, l * da:(l + 1) * da] for l in range(la)])
    wm = torch.stack([cs[(1, 1)][l * dm:(l + 1) * dm, l * dm:(l + 1) * dm] for l in range(lm)])
    got = layer_cka(cs[(0, 1)], ua, um, within_fro(wa, ua), within_fro(wm, um), da, dm).numpy()
    expected = np.array([[_cka64(x[:, i * da:(i + 1) * da], y[:, j * dm:(j + 1) * dm]) for j in range(lm)]
                         for i in range(la)])
    assert expected.min() > 0.05 and expected.max() < 0.95  # a map with something to get wrong
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # a block of a's layers (a later pass) gives the same rows
    if la > 1:
        part = layer_cka(cs[(0, 1)][da:], ua[da:], um, within_fro(wa, ua)[1:], within_fro(wm, um), da, dm)
        np.testing.assert_allclose(part.numpy(), got[1:], atol=1e-12)


def test_model_against_itself_and_a_rotated_copy_gives_one_on_the_diagonal():
    t, n_layers, d = 500, 3, 21
    x = _acts(t, n_layers, d, 4, np.random.default_rng(1).normal(size=(t, 4)))
    g = np.random.default_rng(2)
    q = np.linalg.qr(g.normal(size=(d, d)))[0]  # CKA is invariant to rotations (and permutations) of a layer
    y = np.concatenate([x[:, l * d:(l + 1) * d] @ q for l in range(n_layers)], axis=1)
    moms, cs = _stream([x, y], [(0, 1), (0, 0), (1, 1)], batch=97)
    w = [torch.stack([cs[(i, i)][l * d:(l + 1) * d, l * d:(l + 1) * d] for l in range(n_layers)]) for i in (0, 1)]
    fro = [within_fro(w[i], moms[i].offset()) for i in (0, 1)]
    self_map = layer_cka(cs[(0, 0)], moms[0].offset(), moms[0].offset(), fro[0], fro[0], d, d).numpy()
    rot_map = layer_cka(cs[(0, 1)], moms[0].offset(), moms[1].offset(), fro[0], fro[1], d, d).numpy()
    np.testing.assert_allclose(np.diag(self_map), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(rot_map), 1.0, atol=1e-5)
    np.testing.assert_allclose(self_map, self_map.T, atol=1e-6)
    assert (self_map[~np.eye(n_layers, dtype=bool)] < 1 - 1e-3).all()


def test_dead_layer_is_nan_and_bad_shapes_raise():
    c = torch.ones(6, 8)
    got = layer_cka(c, None, None, torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), 3, 4)
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1]).all()
    with pytest.raises(ValueError, match="layer_cka"):
        layer_cka(c, None, None, torch.ones(3), torch.ones(2), 3, 4)


def test_table_round_trip_and_heatmap(tmp_path):
    frames = [cka_frame(np.array([[0.9, 0.2], [0.3, 0.8]]), "a", "b"), cka_frame(np.array([[0.5, 0.4]]), "a", "c", 1)]
    path = write_layer_similarity(tmp_path, frames)
    t = read_layer_similarity(tmp_path)
    assert path.name == "layer_similarity.parquet" and list(t.columns) == ["model", "other", "layer", "other_layer",
                                                                           "cka"]
    assert len(t) == 6 and t.loc[(t["other"] == "c"), "layer"].tolist() == [1, 1]
    assert t.loc[(t["other"] == "b") & (t["layer"] == 1) & (t["other_layer"] == 0), "cka"].item() == 0.3
    png = plot_layer_similarity(t, tmp_path / "cka.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_layer_similarity(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="empty"):
        plot_layer_similarity(pd.DataFrame(columns=t.columns), tmp_path / "x.png")


def test_run_writes_layer_similarity_equal_to_float64_cka(tmp_path):
    """A run over several passes (one layer of a per block) against float64 CKA of the explicit activations."""
    from helpers import corpus_text, save_tiny_model

    from univ.correlate import CorrelateConfig, run
    from univ.data import excluded_token_ids, token_batches
    from univ.models import collect_mlp_activations, load_model

    paths = [save_tiny_model(tmp_path, "gpt2", seed=s) for s in (0, 1)]
    data = tmp_path / "text.txt"
    data.write_text(corpus_text()[:20_000])
    cfg = CorrelateConfig(models=(str(paths[0]), str(paths[0]), str(paths[1])), data=str(data),
                          out=str(tmp_path / "r"), tokens=600, ctx=32, batch_size=4, device="cpu", baseline="none",
                          memory_budget_gb=40e-6, method="exact")
    out = run(cfg, progress=False, log=lambda *_: None)
    t = read_layer_similarity(out)
    acts = []
    for p in paths:
        lm = load_model(str(p))
        batches = token_batches(str(data), lm.tokenizer, ctx=cfg.ctx, batch_size=cfg.batch_size, seed=cfg.seed,
                                max_tokens=cfg.tokens, excluded=excluded_token_ids(lm.tokenizer))
        chunks = [collect_mlp_activations(lm, b.input_ids, keep=b.keep).post for b in batches]
        acts.append(torch.cat(chunks).double().numpy())  # [T, L, d]
    n_layers = acts[0].shape[1]
    assert len(t) == 2 * n_layers * n_layers and set(t["other"]) == {"gpt2-seed0-2", "gpt2-seed1"}
    for other, y in (("gpt2-seed0-2", acts[0]), ("gpt2-seed1", acts[1])):
        g = t[t["other"] == other]
        got = g.pivot(index="layer", columns="other_layer", values="cka").to_numpy()
        expected = np.array([[_cka64(acts[0][:, i], y[:, j]) for j in range(n_layers)] for i in range(n_layers)])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    self_map = t[t["other"] == "gpt2-seed0-2"].pivot(index="layer", columns="other_layer", values="cka").to_numpy()
    np.testing.assert_allclose(np.diag(self_map), 1.0, atol=1e-5)
    assert json.loads((out / "run.json").read_text())["layer_similarity"] is True

"""The rotation baseline with K draws against explicit float64 rotations of the activations, and its summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from univ.baseline import (
    RotationBank,
    q05_rank,
    rotated_inv_sd,
    rotated_max,
    rotation,
    rotations,
    summarize_draws,
)


def _acts(t: int, n_a: int, n_layers: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """GELU activations of two 'models' sharing a latent, so that r and its baseline are both far from 0."""
    g = np.random.default_rng(seed)
    z = g.normal(size=(t, 8))
    x = z @ g.normal(size=(8, n_a)) + 0.7 * g.normal(size=(t, n_a))
    y = z @ g.normal(size=(8, n_layers * d)) + 0.7 * g.normal(size=(t, n_layers * d))
    gelu = lambda v: 0.5 * v * (1 + np.tanh(0.79788456 * (v + 0.044715 * v**3)))  # noqa: E731
    return gelu(x), gelu(y)


def _corr64(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x - x.mean(0), y - y.mean(0)
    with np.errstate(all="ignore"):
        return (x.T @ y) / np.outer(np.linalg.norm(x, axis=0), np.linalg.norm(y, axis=0))


def _accumulators(x: np.ndarray, y: np.ndarray, n_layers: int, d: int):
    """What a run holds at the end, in fp32: centred C, 1/√M2 of each side, centred within-layer W of y."""
    xc = torch.tensor(x - x.mean(0), dtype=torch.float32)
    yc = torch.tensor(y - y.mean(0), dtype=torch.float32)
    inv = lambda v: torch.where((v * v).sum(0) > 0, (v * v).sum(0).rsqrt(), float("nan"))  # noqa: E731
    w = [yc[:, l * d:(l + 1) * d].T @ yc[:, l * d:(l + 1) * d] for l in range(n_layers)]
    return xc.T @ yc, inv(xc), inv(yc), w


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
@pytest.mark.parametrize("t, n_a, n_layers, d, draws", [(300, 37, 2, 29, 5), (211, 13, 3, 17, 1), (97, 5, 1, 40, 3)])
def test_k_draws_equal_explicit_float64_rotations(kind, t, n_a, n_layers, d, draws):
    x, y = _acts(t, n_a, n_layers, d)
    c, inv_x, inv_y, w = _accumulators(x, y, n_layers, d)
    bank = RotationBank(kind, seed=3, draws=draws)
    got = torch.full((draws, n_a), float("-inf"))
    for layer in range(n_layers):
        q_cat, inv_rot = bank.get(1, layer, w[layer])
        block = c[:, layer * d:(layer + 1) * d]
        got = torch.maximum(got, rotated_max(block, inv_x, q_cat, inv_rot, draws))
    q = [rotations(d, kind=kind, seed=3, model_index=1, layer=l, draws=draws).double().numpy()
         for l in range(n_layers)]
    for k in range(draws):
        rotated = np.concatenate([y[:, l * d:(l + 1) * d] @ q[l][k] for l in range(n_layers)], axis=1)
        expected = np.nanmax(_corr64(x, rotated), axis=1)
        np.testing.assert_allclose(got[k].numpy(), expected, atol=1e-5, rtol=0)


def test_reverse_direction_is_the_transpose():
    """All-pairs: m's neurons against the rotated neurons of one layer of a, through the same function."""
    d, n_m, draws = 23, 31, 4
    y, x = _acts(250, n_m, 1, d, seed=5)  # x: one layer of a (d neurons), y: all of m
    c, inv_x, inv_y, _ = _accumulators(x, y, 1, d)  # c [d, n_m]
    xc = torch.tensor(x - x.mean(0), dtype=torch.float32)
    w_x = xc.T @ xc
    bank = RotationBank("gaussian", seed=0, draws=draws)
    q_cat, inv_rot = bank.get(0, 0, w_x)
    got = rotated_max(c.T, inv_y, q_cat, inv_rot, draws)  # [K, n_m]
    q = rotations(d, kind="gaussian", seed=0, model_index=0, layer=0, draws=draws).double().numpy()
    for k in range(draws):
        np.testing.assert_allclose(got[k].numpy(), np.nanmax(_corr64(y, x @ q[k]), axis=1), atol=1e-5, rtol=0)


def test_draws_are_one_stream_and_draw_zero_is_the_single_draw():
    q = rotations(19, kind="gaussian", seed=2, model_index=1, layer=0, draws=4)
    assert torch.equal(q[:2], rotations(19, kind="gaussian", seed=2, model_index=1, layer=0, draws=2))
    assert torch.equal(q[0], rotation(19, kind="gaussian", seed=2, model_index=1, layer=0))
    assert not torch.equal(q[0], q[1])
    np.testing.assert_allclose(q.double().norm(dim=1).numpy(), 1.0, atol=1e-6)  # unit columns
    o = rotations(19, kind="orthogonal", seed=2, model_index=1, layer=0, draws=3).double()
    np.testing.assert_allclose((o.transpose(1, 2) @ o).numpy(), np.broadcast_to(np.eye(19), (3, 19, 19)), atol=1e-6)
    assert not torch.equal(q, rotations(19, kind="gaussian", seed=3, model_index=1, layer=0, draws=4))
    with pytest.raises(ValueError, match="draws must be"):
        rotations(4, kind="gaussian", seed=0, model_index=0, layer=0, draws=0)


def test_bank_computes_once_and_regenerates_identically_past_its_cache():
    x, y = _acts(120, 3, 1, 11)
    _, _, _, w = _accumulators(x, y, 1, 11)
    kept, uncached = RotationBank("gaussian", 1, 3), RotationBank("gaussian", 1, 3, cache_bytes=0)
    q1, i1 = kept.get(2, 0, w[0])
    assert kept.q_cat(2, 0, 11) is kept.q_cat(2, 0, 11)
    q2, i2 = uncached.get(2, 0, w[0])
    assert torch.equal(q1, q2) and torch.equal(i1, i2)
    assert uncached.q_cat(2, 0, 11) is not uncached.q_cat(2, 0, 11)
    q3 = q1.view(11, 3, 11).permute(1, 0, 2)
    assert torch.equal(q3, rotations(11, kind="gaussian", seed=1, model_index=2, layer=0, draws=3))


def test_dead_neurons_and_dead_rotated_layers_give_nan():
    x, y = _acts(150, 6, 1, 9)
    x[:, 2] = 1.5  # a constant neuron of a
    c, inv_x, _, w = _accumulators(x, y, 1, 9)
    q_cat, inv_rot = RotationBank("gaussian", 0, 2).get(1, 0, w[0])
    got = rotated_max(c, inv_x, q_cat, inv_rot, 2)
    assert torch.isnan(got[:, 2]).all() and torch.isfinite(got[:, [0, 1, 3, 4, 5]]).all()
    dead_layer = rotated_inv_sd(torch.zeros(9, 9), rotations(9, kind="gaussian", seed=0, model_index=0, layer=0,
                                                              draws=2))
    assert dead_layer.shape == (2, 9) and torch.isnan(dead_layer).all()
    assert torch.isnan(rotated_max(c, inv_x, q_cat, dead_layer.reshape(-1), 2)).all()


def test_summarize_draws_columns():
    g = np.random.default_rng(1)
    m, k, n = 3, 6, 40
    max_corr = g.uniform(0.3, 0.9, size=(m, n))
    base = g.uniform(0.1, 0.3, size=(m, k, n))
    max_corr[:, 7] = np.nan
    base[:, :, 7] = np.nan
    s = summarize_draws(max_corr, base)
    np.testing.assert_allclose(s["baseline_mean"], base.mean(1))
    np.testing.assert_allclose(s["baseline_sd"], base.std(1, ddof=1))
    np.testing.assert_allclose(s["mean_baseline"], s["baseline_mean"].mean(0))
    np.testing.assert_allclose(s["max_baseline"], s["baseline_mean"].max(0))
    np.testing.assert_allclose(s["excess_corr"], max_corr.mean(0) - base.mean((0, 1)))
    e = max_corr.mean(0)[None] - base.mean(0)  # [K, n]: one draw's excess
    np.testing.assert_allclose(s["excess_se"], e.std(0, ddof=1) / np.sqrt(k))
    np.testing.assert_allclose(s["excess_min"], e.min(0))
    np.testing.assert_allclose(s["excess_max"], e.max(0))
    for key in ("excess_corr", "excess_q05", "excess_se", "mean_baseline"):
        assert np.isnan(s[key][7])
    one = summarize_draws(max_corr, base[:, :1])
    np.testing.assert_allclose(one["excess_q05"], one["excess_corr"])
    np.testing.assert_allclose(one["excess_min"], one["excess_max"])
    assert np.isnan(one["excess_se"]).all() and np.isnan(one["baseline_sd"]).all()
    with pytest.raises(ValueError, match="base must be"):
        summarize_draws(max_corr, base[0])


@pytest.mark.parametrize("k", [1, 2, 5, 19, 20, 21, 40, 64])
def test_q05_passes_exactly_when_95_percent_of_draws_pass(k):
    g = np.random.default_rng(k)
    e = g.uniform(0.3, 0.7, size=(k, 500))
    q05 = summarize_draws(np.zeros((1, 500)) + 1.0, 1.0 - e[None])["excess_q05"]  # excess of draw k = e_k
    for t in (0.35, 0.45, 0.5, 0.55, 0.65):
        np.testing.assert_array_equal(q05 > t, (e > t).mean(0) >= 0.95)
    assert q05_rank(k) == k // 20


# ---------------------------------------------------------------------------------------------------------------------
# In a run: K draws from the run's accumulators against K explicit float64 rotations of the activations


def _explicit_acts(path, data, cfg) -> np.ndarray:
    from univ.data import excluded_token_ids, token_batches
    from univ.models import collect_mlp_activations, load_model

    lm = load_model(str(path))
    chunks = []
    for b in token_batches(str(data), lm.tokenizer, ctx=cfg.ctx, batch_size=cfg.batch_size, seed=cfg.seed,
                           max_tokens=cfg.tokens, excluded=excluded_token_ids(lm.tokenizer)):
        post = collect_mlp_activations(lm, b.input_ids, keep=b.keep).post
        chunks.append(post.reshape(post.shape[0], -1))
    return torch.cat(chunks).double().numpy(), lm.n_layers, lm.d_mlp


def test_run_with_k_draws_equals_explicit_rotations(tmp_path):
    import pandas as pd
    from helpers import corpus_text, save_tiny_model

    from univ.correlate import CorrelateConfig, run

    paths = [save_tiny_model(tmp_path, "gpt2", seed=s) for s in (0, 1, 2)]
    data = tmp_path / "text.txt"
    data.write_text(corpus_text()[:30_000])
    draws = 3
    cfg = CorrelateConfig(models=tuple(map(str, paths)), data=str(data), out=str(tmp_path / "r"), tokens=700,
                          ctx=32, batch_size=4, device="cpu", baseline_seed=5, baseline_draws=draws,
                          method="exact", memory_budget_gb=40e-6)  # one layer per block: passes share the rotations
    out = run(cfg, progress=False, log=lambda *_: None)
    t = pd.read_parquet(out / "neurons.parquet")
    x, _, _ = _explicit_acts(paths[0], data, cfg)
    per_model = []
    for m in (1, 2):
        y, n_layers, d = _explicit_acts(paths[m], data, cfg)
        q = [rotations(d, kind="gaussian", seed=5, model_index=m, layer=l, draws=draws).double().numpy()
             for l in range(n_layers)]
        base = np.stack([np.nanmax(_corr64(x, np.concatenate([y[:, l * d:(l + 1) * d] @ q[l][k]
                                                               for l in range(n_layers)], axis=1)), axis=1)
                         for k in range(draws)])  # [K, n]
        label = f"gpt2-seed{m}"
        alive = t[f"baseline.{label}"].notna().to_numpy()
        assert alive.mean() > 0.9
        np.testing.assert_allclose(t[f"baseline.{label}"][alive], base.mean(0)[alive], atol=1e-5)
        np.testing.assert_allclose(t[f"baseline_sd.{label}"][alive], base.std(0, ddof=1)[alive], atol=1e-5)
        per_model.append(base)
    max_corr = t[["max_corr.gpt2-seed1", "max_corr.gpt2-seed2"]].to_numpy().T
    expected = summarize_draws(max_corr, np.stack(per_model))
    for col in ("mean_baseline", "excess_corr", "excess_se", "excess_q05", "excess_min", "excess_max"):
        np.testing.assert_allclose(t[col][alive], expected[col][alive], atol=1e-5, err_msg=col)
    assert json.loads((out / "run.json").read_text())["baseline_draws"] == draws

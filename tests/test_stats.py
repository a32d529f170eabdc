"""Streaming activation statistics against closed forms and against scipy on the concatenated data."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from univ.commands.stats import register
from univ.stats import ActivationStats, add_layer_percentiles, compare_universal


def _feed(st: ActivationStats, x: torch.Tensor, post: torch.Tensor | None = None, n_batches: int = 1) -> None:
    for i, chunk in enumerate(x.chunk(n_batches)):
        st.update(chunk, None if post is None else post.chunk(n_batches)[i])


def _oracle(x: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 scipy on the whole [T, N] array."""
    return {
        "act_mean": x.mean(0),
        "act_var": x.var(0),
        "act_skew": scipy.stats.skew(x, axis=0),
        "act_kurt": scipy.stats.kurtosis(x, axis=0, fisher=False),
        "act_freq": (x > 0).mean(0),
    }


def test_closed_forms_gaussian_and_exponential():
    t = 400_000
    gauss = torch.randn(t, 1, 2, dtype=torch.float64)
    expo = torch.distributions.Exponential(1.0).sample((t, 1, 2)).double()
    st = ActivationStats(2, 2)
    _feed(st, torch.cat([gauss, expo], 1).float(), n_batches=7)
    r = st.result()
    g, e = r[r.layer == 0], r[r.layer == 1]
    np.testing.assert_allclose(g.act_skew, 0, atol=0.02)
    np.testing.assert_allclose(g.act_kurt, 3, atol=0.05)  # non-excess: a Gaussian gives 3
    np.testing.assert_allclose(g.act_freq, 0.5, atol=0.005)
    np.testing.assert_allclose(e.act_mean, 1, atol=0.01)
    np.testing.assert_allclose(e.act_skew, 2, atol=0.1)
    np.testing.assert_allclose(e.act_kurt, 9, atol=0.8)
    np.testing.assert_allclose(e.act_freq, 1.0)


@pytest.mark.parametrize("t, n_layers, d_mlp, n_batches", [(1, 1, 3, 1), (37, 2, 5, 4), (1000, 3, 7, 13)])
def test_streaming_equals_batch_equals_scipy(t, n_layers, d_mlp, n_batches):
    x = (torch.randn(t, n_layers, d_mlp) ** 3 + 0.5).float()  # skewed, heavy-tailed
    post = torch.nn.functional.gelu(x)
    one, many = ActivationStats(n_layers, d_mlp), ActivationStats(n_layers, d_mlp)
    _feed(one, x, post)
    _feed(many, x, post, n_batches=min(n_batches, t))
    want = _oracle(x.reshape(t, -1).double().numpy())
    for st in (one, many):
        r = st.result()
        assert len(r) == n_layers * d_mlp
        for col, value in want.items():
            if t == 1 and col in ("act_skew", "act_kurt"):
                assert r[col].isna().all()  # one token has no shape
                continue
            np.testing.assert_allclose(r[col], value, rtol=1e-9, atol=1e-9, err_msg=col)
        np.testing.assert_allclose(r["post_mean"], post.reshape(t, -1).double().mean(0).numpy(), rtol=1e-9, atol=1e-12)
    assert r["layer"].tolist() == np.repeat(np.arange(n_layers), d_mlp).tolist()


def test_merge_of_shards_with_different_shifts_is_exact():
    x = torch.randn(3000, 2, 4).double() * 3 + 2
    x[1500:] += 40  # the second shard's shift is far from the first's
    whole, a, b = ActivationStats(2, 4), ActivationStats(2, 4), ActivationStats(2, 4)
    _feed(whole, x.float(), n_batches=5)
    _feed(a, x[:1500].float(), n_batches=2)
    _feed(b, x[1500:].float(), n_batches=3)
    merged = a.merge(b).result()
    want = _oracle(x.float().reshape(3000, -1).double().numpy())
    for col, value in want.items():
        np.testing.assert_allclose(merged[col], value, rtol=1e-8, atol=1e-10, err_msg=col)
        np.testing.assert_allclose(whole.result()[col], value, rtol=1e-8, atol=1e-10, err_msg=col)
    empty = ActivationStats(2, 4)
    np.testing.assert_allclose(empty.merge(a).result()["act_kurt"], a.result()["act_kurt"])
    with pytest.raises(ValueError, match="cannot merge ActivationStats of 3x4 neurons into 2x4"):
        a.merge(ActivationStats(3, 4))


def test_large_mean_small_spread_keeps_its_kurtosis():
    # mean 1e4, std 1: unshifted float64 power sums would lose the fourth moment entirely.
    x = (1e4 + torch.randn(200_000, 1, 1, dtype=torch.float64)).float()
    st = ActivationStats(1, 1)
    _feed(st, x, n_batches=9)
    want = _oracle(x.reshape(-1, 1).double().numpy())
    r = st.result()
    np.testing.assert_allclose(r.act_kurt, want["act_kurt"], rtol=1e-7)
    np.testing.assert_allclose(r.act_skew, want["act_skew"], atol=1e-7)


def test_constant_neuron_has_no_shape_and_bad_input_is_refused():
    st = ActivationStats(1, 2)
    x = torch.stack([torch.full((50,), 0.3), torch.randn(50)], 1)[:, None, :]  # [50, 1, 2]
    _feed(st, x, n_batches=3)
    r = st.result()
    assert r.act_var[0] == 0 and np.isnan(r.act_skew[0]) and np.isnan(r.act_kurt[0])
    assert np.isfinite(r.act_kurt[1])
    with pytest.raises(ValueError, match=r"pre must be \[T, 1, 2\]; got \(5, 2\)"):
        st.update(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        st.update(torch.full((2, 1, 2), float("nan")))
    assert ActivationStats(1, 1).result()["act_mean"].isna().all()  # nothing seen: NaN, not 0


def test_layer_percentiles_match_percentileofscore():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "model": ["a"] * 40 + ["b"] * 40,
            "layer": np.tile(np.repeat([0, 1], 20), 2),
            "neuron": np.tile(np.arange(20), 4),
            "act_skew": rng.integers(0, 5, 80).astype(float),  # ties on purpose
        }
    )
    df.loc[3, "act_skew"] = np.nan
    out = add_layer_percentiles(df, ["act_skew"])
    for (_, _), g in out.groupby(["model", "layer"]):
        vals = g["act_skew"].dropna().to_numpy()
        for v, pct in zip(g["act_skew"], g["act_skew_pct"], strict=True):
            if np.isnan(v):
                assert np.isnan(pct)
            else:
                assert pct == pytest.approx(scipy.stats.percentileofscore(vals, v, kind="rank"))


def test_compare_universal_reports_the_signature():
    rng = np.random.default_rng(1)
    n = 200
    uni = np.zeros(n, bool)
    uni[:10] = True
    df = pd.DataFrame(
        {
            "model": "a",
            "layer": np.repeat([0, 1], n // 2),
            "neuron": np.tile(np.arange(n // 2), 2),
            "is_universal": uni,
            "act_skew": rng.normal(size=n) + 5 * uni,  # universal: higher skew
            "act_freq": rng.uniform(size=n) * np.where(uni, 0.1, 1.0),  # universal: rarer
        }
    )
    c = compare_universal(df).set_index("metric")
    assert list(c.index) == ["act_freq", "act_skew"]
    assert c.loc["act_skew", "universal_pct"] > 90 and c.loc["act_freq", "universal_pct"] < 20
    assert 40 < c.loc["act_skew", "other_pct"] < 60
    assert c.loc["act_skew", "n_universal"] == 10 and c.loc["act_skew", "n_other"] == 190
    with pytest.raises(KeyError, match="is_universal"):
        compare_universal(df.drop(columns="is_universal"))


def test_cli_parser():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["stats", "runs/x", "--tokens", "1000", "--device", "cpu", "--batch-size", "4"])
    assert (args.dir, args.tokens, args.batch_size) == ("runs/x", 1000, 4) and callable(args.func)

"""Roles: planted neurons in a tiny GPT-2 are found by the weight scores and behave as predicted.

The planted model (built once per module) edits a tiny GPT-2 in memory and saves it:

    W_U        a direction e_p that only tokens 100, 200, 300 read (prediction / suppression target),
               a direction e_q that splits the vocabulary by token parity (partition target),
               two directions n1, n2 that no token reads (W_U's null space)
    layer 1    neuron 0: w_out = 3 e_p (prediction)    neuron 1: w_out = -3 e_p (suppression)
               neuron 2: w_out = 20 n1 (entropy)       neuron 3: w_out = 3 e_q (partition)
    layer 0    neuron 5, always on (b_in + 3); head L1.H2's query weights are the rank-1 map
               ŵ_out(0.5) ⊗ k̂_BOS, so that neuron pushes the head's query towards BOS (attention)

The same attention plant in a tiny NeoX and a tiny Llama (rotary queries) tests the rotary score and the
path intervention there.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import corpus_text, save_tiny_model
from univ import roles as R
from univ.data import token_batches
from univ.models import ActivationCapture, attention_weights, load_model
from univ.weights import processed_mlp_weights

TOKENS = (100, 200, 300)
PREDICTION, SUPPRESSION, ENTROPY, PARTITION = (1, 0), (1, 1), (1, 2), (1, 3)
ATTENTION, HEAD = (0, 5), (1, 2)


@dataclass
class Planted:
    path: Path
    text: Path
    null: torch.Tensor  # [d_model, 2]: n1, n2


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("roles")
    lm = load_model(str(save_tiny_model(root, "gpt2", seed=0)))
    m, d = lm.model, lm.d_model
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.cat([torch.ones(d, 1), torch.randn(d, 4, generator=gen)], 1))
    e_p, e_q, n1, n2 = q[:, 1], q[:, 2], q[:, 3], q[:, 4]  # orthonormal, all orthogonal to the ones vector
    with torch.no_grad():
        tr = m.transformer
        tr.ln_f.weight.fill_(1.0)  # processed W_U = centred W_U: the planted directions stay exact
        tr.ln_f.bias.zero_()
        w_u = m.lm_head.weight  # [V, d], tied to the embedding
        basis = torch.stack([e_p, e_q, n1, n2], 1)
        w_u -= (w_u @ basis) @ basis.T
        w_u[list(TOKENS)] += 3.0 * e_p
        w_u += 0.3 * torch.where(torch.arange(w_u.shape[0]) % 2 == 0, 1.0, -1.0)[:, None] * e_q
        c_proj = tr.h[1].mlp.c_proj.weight  # [d_mlp, d]: row n is w_out of neuron n
        c_proj[PREDICTION[1]] = 3.0 * e_p
        c_proj[SUPPRESSION[1]] = -3.0 * e_p
        c_proj[ENTROPY[1]] = 20.0 * n1
        c_proj[PARTITION[1]] = 3.0 * e_q
        tr.h[0].mlp.c_fc.bias[ATTENTION[1]] += 3.0
    # The BOS key of layer 1 does not depend on layer 1's query weights: read it, then plant the query.
    k_bos = R.bos_keys(lm)[HEAD[0]][HEAD[1]]
    w = processed_mlp_weights(lm)[ATTENTION[0]].w_out[ATTENTION[1]]
    d_head = d // 4
    with torch.no_grad():
        cols = slice(HEAD[1] * d_head, (HEAD[1] + 1) * d_head)
        m.transformer.h[HEAD[0]].attn.c_attn.weight[:, cols] = 4.0 * torch.outer(w / w.norm(), k_bos / k_bos.norm())
    path = root / "planted"
    m.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    text = root / "corpus.txt"
    text.write_text(corpus_text()[:20_000])
    return Planted(path=path, text=text, null=torch.stack([n1, n2], 1))


@pytest.fixture(scope="module")
def lm(planted: Planted):
    return load_model(str(planted.path))


@pytest.fixture(scope="module")
def batches(lm, planted: Planted) -> list:
    return list(token_batches(str(planted.text), lm.tokenizer, ctx=32, batch_size=8, max_tokens=240))


@pytest.fixture(scope="module")
def scores(lm) -> pd.DataFrame:
    df = R.vocab_role_scores(lm).merge(R.entropy_scores(lm).drop(columns="w_out_norm"), on=["layer", "neuron"])
    df = df.merge(R.bos_scores(lm).per_neuron(), on=["layer", "neuron"])
    return R.classify_roles(df).set_index(["layer", "neuron"])


# --------------------------------------------------------------------------------------------------------------------
# Prediction, suppression, partition


def test_prediction_and_suppression_neurons(lm, scores):
    pred, supp = scores.loc[PREDICTION], scores.loc[SUPPRESSION]
    assert pred["vocab_kurt"] > 10 and pred["vocab_skew"] > 0 and pred["role"] == "prediction"
    assert supp["vocab_kurt"] > 10 and supp["vocab_skew"] < 0 and supp["role"] == "suppression"
    tops = R.top_tokens(lm, [PREDICTION, SUPPRESSION], k=5).set_index(["layer", "neuron"])
    assert set(tops.loc[PREDICTION, "top_promoted_ids"][:3]) == set(TOKENS)
    assert set(tops.loc[SUPPRESSION, "top_suppressed_ids"][:3]) == set(TOKENS)
    assert tops.loc[PREDICTION, "top_promoted"][:3] == [
        lm.tokenizer.decode([t]) for t in tops.loc[PREDICTION, "top_promoted_ids"][:3]
    ]


def test_partition_neuron(scores):
    part = scores.loc[PARTITION]
    assert part["is_partition"] and part["role"] == "partition"
    assert part["vocab_kurt"] < 3  # bimodal: a split, not a spike
    assert part["vocab_var_ratio"] > 2 * scores["vocab_var_ratio"].drop(PARTITION).median()


def test_layer_trend(scores):
    trend = R.layer_trend(scores.reset_index().assign(model="m"))
    assert list(trend["layer"]) == [0, 1]
    assert {"kurt_p5", "kurt_p95", "skew_p50", "n_prediction", "n_suppression"} <= set(trend.columns)
    last = trend.set_index("layer").loc[1]
    assert last["n_prediction"] >= 1 and last["n_suppression"] >= 1
    assert last["kurt_p5"] <= last["kurt_p50"] <= last["kurt_p95"]


# --------------------------------------------------------------------------------------------------------------------
# Entropy neurons


def test_null_space_is_orthonormal_and_holds_planted_directions(lm, planted):
    null = R.unembedding_null_space(lm).float()
    assert torch.allclose(null.T @ null, torch.eye(null.shape[1]), atol=1e-5)
    assert null.sum(0).abs().max() < 1e-4  # the ones direction (LayerNorm removes it) is never counted
    captured = (null.T @ planted.null).norm(dim=0)  # norm of each planted direction inside the basis
    assert torch.allclose(captured, torch.ones(2), atol=1e-4)
    with pytest.raises(ValueError, match="null_dims"):
        R.unembedding_null_space(lm, null_dims=0)


def test_entropy_neuron_flagged(scores):
    ent = scores.loc[ENTROPY]
    assert ent["null_share"] > 0.99 and ent["is_entropy"] and ent["role"] == "entropy"
    assert scores["null_norm"].idxmax() == ENTROPY
    assert scores.loc[PREDICTION, "null_share"] < 1e-3


def test_entropy_intervention_raises_scale_and_entropy(lm, batches):
    random_neuron = (1, 10)
    curves = R.entropy_intervention(lm, [ENTROPY, random_neuron], batches, multiples=(0.0, 2.0, 4.0))
    assert (curves["kind"] == "nominal").sum() == 1
    ent = curves[(curves["layer"] == 1) & (curves["neuron"] == ENTROPY[1])].sort_values("value")
    assert list(ent["multiple"]) == [0.0, 2.0, 4.0]
    assert np.all(np.diff(ent["ln_scale"]) > 0) and np.all(np.diff(ent["entropy"]) > 0)
    # W_U does not read the null direction: the logits shrink, their order stays (ranks unchanged).
    assert ent["true_rank"].max() - ent["true_rank"].min() < 1e-6
    rnd = curves[(curves["layer"] == 1) & (curves["neuron"] == random_neuron[1])]
    assert np.ptp(ent["entropy"]) > 5 * np.ptp(rnd["entropy"])
    assert np.ptp(ent["ln_scale"]) > 5 * np.ptp(rnd["ln_scale"])
    assert (ent["n_tokens"] == sum(int(b.keep[:, :-1].sum()) for b in batches)).all()


def test_entropy_intervention_absolute_values_and_errors(lm, batches):
    curves = R.entropy_intervention(lm, [ENTROPY], batches[:1], values=[0.0, 1.0])
    fixed = curves[curves["kind"] == "fixed"]
    assert list(fixed["value"]) == [0.0, 1.0] and fixed["multiple"].isna().all()
    with pytest.raises(IndexError, match="out of range"):
        R.entropy_intervention(lm, [(5, 0)], batches[:1])


# --------------------------------------------------------------------------------------------------------------------
# Attention deactivation


def test_bos_key_is_the_models_key(lm):
    bos = lm.tokenizer.bos_token_id
    seen = {}
    attn = lm.model.transformer.h[1].attn
    handle = attn.c_attn.register_forward_hook(lambda mod, args, out: seen.update(out=out[0, 0]))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([[bos]]))
    finally:
        handle.remove()
    d = lm.d_model
    expected = seen["out"][d : 2 * d].reshape(4, d // 4)
    assert torch.allclose(R.bos_keys(lm)[1], expected, atol=1e-5)


def test_attention_neuron_found(scores):
    top = scores["bos_z"].abs().idxmax()
    assert top == ATTENTION
    row = scores.loc[ATTENTION]
    assert (row["bos_layer"], row["bos_head"]) == HEAD and row["top_bos_head"] == "L1.H2"
    assert row["bos_score"] > 0 and row["is_attention"]
    # Other neurons look like the random baseline: z of order 1.
    others = scores.drop(ATTENTION)
    assert 0.4 < others.loc[others["bos_layer"] >= 0, "bos_z"].abs().median() < 2.5
    assert (scores.loc[[(1, n) for n in range(4)], "bos_layer"] == -1).all()  # nothing after the last layer


def test_bos_baseline_and_histogram(lm):
    bs = R.bos_scores(lm, n_random=500, seed=3)
    assert bs.scores.shape == (2, lm.d_mlp, 2, 4) and torch.isnan(bs.scores[:, :, 0]).all()
    assert bs.baseline.shape == (500, 2, 4)
    z_random = bs.baseline[:, 1] / bs.rms[1]
    assert abs(float(z_random.pow(2).mean()) - 1) < 1e-4
    hist = bs.histogram(bins=20)
    assert set(hist["source"]) == {"neurons", "random"}
    assert hist.loc[hist["source"] == "neurons", "count"].sum() == lm.d_mlp * 4
    assert hist.loc[hist["source"] == "random", "count"].sum() == 500 * 4


def _reference_p_bos(lm, ids, neuron, head, ablate: bool) -> torch.Tensor:
    """Attention to BOS of one head, by hand: queries from resid − act·w_out (if ablate), keys from resid."""
    (nl, n), (al, h) = neuron, head
    with torch.no_grad(), ActivationCapture(lm) as cap:
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[al]  # input of block al
    act = cap.post[:, :, nl, n]
    block = lm.model.transformer.h[al]
    w_out = block.mlp.c_proj.weight[n] if nl == al else lm.model.transformer.h[nl].mlp.c_proj.weight[n]
    ln = block.ln_1
    d, dh = lm.d_model, lm.d_model // 4
    w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
    x_kv = F.layer_norm(hidden, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    x_q = x_kv
    if ablate:
        delta = act[..., None] * w_out
        delta[:, :1] = 0
        x_q = F.layer_norm(hidden - delta, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    q = (x_q @ w + b)[..., h * dh : (h + 1) * dh]
    k = (x_kv @ w + b)[..., d + h * dh : d + (h + 1) * dh]
    s = q @ k.transpose(1, 2) / dh**0.5
    s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1)[..., 0]


def test_path_intervention_matches_reference_and_model(lm, batches):
    ids, keep = batches[0].input_ids, batches[0].keep
    points = R.bos_path_intervention(lm, ATTENTION, HEAD, [batches[0]])
    mask = keep.clone()
    mask[:, :1] = False
    for ablate, col in ((False, "p_bos_clean"), (True, "p_bos_ablated")):
        ref = _reference_p_bos(lm, ids, ATTENTION, HEAD, ablate)[mask]
        assert np.allclose(points[col].to_numpy(), ref.numpy(), atol=1e-5)
    # The clean probe is the model's own attention pattern.
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = lm.model(input_ids=ids, output_attentions=True).attentions[HEAD[0]][:, HEAD[1], :, 0]
    finally:
        lm.model.set_attn_implementation("sdpa")
    assert np.allclose(points["p_bos_clean"].to_numpy(), att[mask].numpy(), atol=1e-5)


def test_path_intervention_direction(lm, batches):
    points = R.bos_path_intervention(lm, ATTENTION, HEAD, batches)
    summary = R.summarize_path(points)
    assert summary["n_positions"] == sum(int(b.keep[:, 1:].sum()) for b in batches)
    assert summary["act_mean"] > 0
    # bos_score > 0 and the neuron fires: removing it from the query lowers attention to BOS.
    assert summary["d_p_bos"] > 0.1
    assert ((points["p_bos_clean"] - points["p_bos_ablated"]) > 0).mean() > 0.9
    other = R.summarize_path(R.bos_path_intervention(lm, (0, 7), HEAD, batches))
    assert abs(other["d_p_bos"]) < 0.2 * summary["d_p_bos"]
    # Nothing edited (after_pos past the context): clean == ablated.
    none = R.bos_path_intervention(lm, ATTENTION, HEAD, batches[:1], after_pos=64)
    assert len(none) == 0


def test_path_intervention_errors(lm, batches):
    with pytest.raises(ValueError, match="after the neuron"):
        R.bos_path_intervention(lm, (1, 0), (1, 0), batches[:1])
    with pytest.raises(IndexError, match="out of range"):
        R.bos_path_intervention(lm, (0, 999), (1, 0), batches[:1])


# --------------------------------------------------------------------------------------------------------------------
# Attention deactivation in rotary models (NeoX, Llama): the same planted neuron, rotary queries

ROTARY_HEAD = (1, 3)  # in the Llama config (4 query heads on 2 kv-heads) it reads kv-head 1


@pytest.fixture(scope="module", params=["neox", "llama"])
def rotary(request, tmp_path_factory):
    """Neuron 0.5 always on; head L1.H3's query weights = 4 · ŵ_out ⊗ k̂, k̂ the BOS key as a query sees it."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"rotary-{arch}")
    lm = load_model(str(save_tiny_model(root, arch, seed=0, **({"mlp_bias": True} if arch == "llama" else {}))))
    n, (layer, h) = ATTENTION[1], ROTARY_HEAD
    mlp0 = lm.layer(0).mlp
    with torch.no_grad():
        for proj in (mlp0.gate_proj, mlp0.up_proj) if arch == "llama" else (mlp0.dense_h_to_4h,):
            proj.bias[n] += 3.0
    attn = attention_weights(lm)[layer]
    assert attn.rotary_dims > 0
    keys = R.attention._query_side_keys(lm, [attn], [R.bos_keys(lm)[layer]], R.attention.DEFAULT_QUERY_POSITIONS)
    k = keys[0][h // (attn.n_heads // attn.n_kv_heads)]
    w = processed_mlp_weights(lm)[0].w_out[n]
    planted = 4.0 * torch.outer(k / k.norm(), w / w.norm())  # nn.Linear rows: [d_head, d_model]
    d_head = attn.d_head
    with torch.no_grad():
        if arch == "llama":
            lm.layer(layer).self_attn.q_proj.weight[h * d_head : (h + 1) * d_head] = planted
        else:  # fused, interleaved per head: rows [h·3·d_head, h·3·d_head + d_head) are head h's query
            qkv = lm.layer(layer).attention.query_key_value.weight
            qkv[h * 3 * d_head : h * 3 * d_head + d_head] = planted
    path = root / "planted"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return load_model(str(path))


def test_rotary_attention_neuron_found(rotary):
    scores = R.bos_scores(rotary, n_random=300).per_neuron().set_index(["layer", "neuron"])
    assert scores["bos_z"].abs().idxmax() == ATTENTION
    row = scores.loc[ATTENTION]
    assert (row["bos_layer"], row["bos_head"]) == ROTARY_HEAD and row["bos_score"] > 0
    assert row["bos_z"] > 4  # a rank-1 plant caps z near √d_model = 5.7
    others = scores.drop(ATTENTION)
    assert 0.4 < others.loc[others["bos_layer"] >= 0, "bos_z"].abs().median() < 2.5


def test_rotary_score_is_the_average_over_query_positions(rotary):
    one, two = (R.bos_scores(rotary, n_random=10, query_positions=[p]).scores[0] for p in (3, 40))
    both = R.bos_scores(rotary, n_random=10, query_positions=[3, 40]).scores[0]
    torch.testing.assert_close(both, (one + two) / 2, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert not torch.allclose(one.nan_to_num(), two.nan_to_num())  # the rotation does depend on the position
    # at position 0 nothing rotates: the key is the BOS key itself
    attn = attention_weights(rotary)
    keys = R.bos_keys(rotary)
    for k, k0 in zip(keys, R.attention._query_side_keys(rotary, attn, keys, [0]), strict=True):
        torch.testing.assert_close(k0, k)


def test_rotary_path_intervention_is_the_models_attention(rotary, batches):
    ids, keep = batches[0].input_ids, batches[0].keep
    points = R.bos_path_intervention(rotary, ATTENTION, ROTARY_HEAD, [batches[0]])
    mask = keep.clone()
    mask[:, :1] = False
    rotary.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = rotary.model(input_ids=ids, output_attentions=True).attentions[ROTARY_HEAD[0]]
    finally:
        rotary.model.set_attn_implementation("sdpa")
    assert np.allclose(points["p_bos_clean"].to_numpy(), att[:, ROTARY_HEAD[1], :, 0][mask].numpy(), atol=1e-5)


def test_rotary_path_intervention_direction(rotary, batches):
    summary = R.summarize_path(R.bos_path_intervention(rotary, ATTENTION, ROTARY_HEAD, batches[:3]))
    assert summary["act_mean"] > 0 and summary["d_p_bos"] > 0.05
    other = R.summarize_path(R.bos_path_intervention(rotary, (0, 7), ROTARY_HEAD, batches[:3]))
    assert abs(other["d_p_bos"]) < 0.2 * summary["d_p_bos"]


def test_qwen3_query_norm_has_no_linear_score(tmp_path):
    qwen3 = load_model(str(save_tiny_model(tmp_path, "qwen3", seed=0)))
    with pytest.raises(NotImplementedError, match="q_norm"):
        R.bos_scores(qwen3)
    points = R.bos_path_intervention(qwen3, (0, 0), (1, 0), [torch.randint(1, 500, (2, 12))])
    assert len(points) == 2 * 11 and points["p_bos_clean"].between(0, 1).all()  # the intervention still runs
    ent = R.entropy_scores(qwen3)  # weight scores work everywhere
    assert len(ent) == qwen3.n_neurons and ent["null_share"].between(0, 1).all()


# --------------------------------------------------------------------------------------------------------------------
# Classification, parsing, the run directory


def test_classify_roles_thresholds():
    df = pd.DataFrame({
        "layer": [0, 0, 0, 0], "vocab_kurt": [25.0, 25.0, 3.0, 3.0], "vocab_skew": [2.0, -2.0, 0.0, 0.0],
        "vocab_var": [0.001, 0.001, 0.006, 0.001], "vocab_var_ratio": [1.0, 1.0, 6.0, 1.0],
        "bos_z": [0.0, 0.0, 0.0, -7.0],
    })  # fmt: skip
    assert R.classify_roles(df)["role"].tolist() == ["prediction", "suppression", "partition", "attention"]
    absolute = R.classify_roles(df, R.RoleThresholds(partition_var=0.0005))
    assert absolute["is_partition"].all()
    assert not R.classify_roles(df)["is_entropy"].any()  # no null_share column: never entropy


def test_parse_neurons():
    assert R.parse_neurons("11.3030, L4.N3594") == [(11, 3030), (4, 3594)]
    with pytest.raises(ValueError, match="LAYER.NEURON"):
        R.parse_neurons("11:3030")


def _run_dir(tmp_path: Path, planted: Planted) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    manifest = {
        "models": [str(planted.path)], "labels": ["planted"], "analysed": ["planted"],
        "data": {"source": str(planted.text), "ctx": 32, "batch_size": 8, "seed": 0, "max_tokens": 1000,
                 "text_field": "text", "split": "train", "exclude_newlines": True},
    }  # fmt: skip
    (run / "run.json").write_text(json.dumps(manifest))
    return run


def test_run_roles_writes_tables_and_joins_profiles(tmp_path, planted):
    run = _run_dir(tmp_path, planted)
    n = 2 * 64
    profiles = pd.DataFrame({"model": "planted", "layer": np.repeat([0, 1], 64), "neuron": np.tile(np.arange(64), 2),
                             "is_universal": False, "act_kurt": np.arange(n, dtype=float)})  # fmt: skip
    universal = [ENTROPY, ATTENTION, (1, 7)]
    for layer, neuron in universal:
        profiles.loc[(profiles.layer == layer) & (profiles.neuron == neuron), "is_universal"] = True
    profiles.to_parquet(run / "profiles.parquet", index=False)
    lines: list[str] = []
    out = R.run_roles(run, tokens=120, top=2, n_random=1, multiples=(0.0, 3.0), device="cpu", log=lines.append)
    assert out == run / "roles.parquet" and lines
    roles = pd.read_parquet(out).set_index(["layer", "neuron"])
    assert len(roles) == n and roles.loc[ENTROPY, "role"] == "entropy" and roles.loc[ATTENTION, "role"] == "attention"
    assert len(roles.loc[PREDICTION, "top_promoted"]) == R.TOP_TOKENS
    plain = roles[(roles["role"] == "none")]
    assert len(plain) and (plain["top_promoted"].apply(len) == 0).all()  # tokens only for vocabulary roles
    curves = pd.read_parquet(run / "interventions.parquet")
    cands = curves.loc[curves["kind"] == "candidate", ["layer", "neuron"]].drop_duplicates()
    assert set(map(tuple, cands.to_numpy())) <= set(universal) and ENTROPY in set(map(tuple, cands.to_numpy()))
    assert (curves["kind"] == "random").sum() == 2 and (curves["kind"] == "nominal").sum() == 1
    attn = pd.read_parquet(run / "attention.parquet")
    first = attn.iloc[0]
    assert (first["layer"], first["neuron"], first["head_layer"], first["head"]) == (*ATTENTION, *HEAD)
    assert first["d_p_bos"] > 0
    assert (run / "attention_points.parquet").is_file() and (run / "bos_scores.parquet").is_file()
    info = json.loads((run / "roles.json").read_text())
    assert info["models"]["planted"]["pool"].startswith("universal neurons")
    joined = pd.read_parquet(run / "profiles.parquet")
    assert len(joined) == n and joined["act_kurt"].tolist() == list(range(n))
    assert {"role", "null_share", "bos_z", "top_bos_head"} <= set(joined.columns)
    # A second run replaces the role columns instead of duplicating them.
    R.run_roles(run, neurons=[ENTROPY], tokens=60, n_random=0, multiples=(0.0,), device="cpu")
    again = pd.read_parquet(run / "profiles.parquet")
    assert list(again.columns) == list(joined.columns)


def test_cli_weights_only(tmp_path, planted, capsys):
    run = _run_dir(tmp_path, planted)
    parser = argparse.ArgumentParser()
    R.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["roles", str(run), "--no-interventions", "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "pred" in printed and "roles.parquet" in printed
    assert not (run / "interventions.parquet").exists()
    with pytest.raises(ValueError, match="not in this run"):
        R.run_roles(run, models=["nope"], interventions=False)
    help_text = parser._subparsers._group_actions[0].choices["roles"].format_help()
    assert "null space" in help_text and "--neurons" in help_text


def test_join_profiles_skips_ambiguous_tables(tmp_path):
    roles = pd.DataFrame({"model": ["a", "b"], "layer": [0, 0], "neuron": [1, 1], "role": ["none", "entropy"]})
    pd.DataFrame({"layer": [0], "neuron": [1], "act_kurt": [3.0]}).to_parquet(tmp_path / "profiles.parquet")
    assert not R._join_profiles(tmp_path, roles)  # no model column, two models: cannot tell rows apart
    assert R._join_profiles(tmp_path, roles[roles["model"] == "b"])
    joined = pd.read_parquet(tmp_path / "profiles.parquet")
    assert joined["role"].tolist() == ["entropy"] and joined["act_kurt"].tolist() == [3.0]

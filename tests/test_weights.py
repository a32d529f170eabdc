"""Processed-weight statistics against a model whose state dict the test processes by hand.

The oracle: fold the norms into the next layer and centre, directly on a deep copy's parameters; check the
copy still computes the same next-token distribution; then compute every statistic from the copy's raw
parameters in float64 numpy/scipy and compare with ``weight_stats`` on the untouched model.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import scipy.stats
import torch

from tests.helpers import save_tiny_model
from univ.models import load_model
from univ.weights import processed_mlp_weights, processed_unembedding, vector_moments, weight_stats


def _process_gpt2_by_hand(model: torch.nn.Module) -> torch.Tensor:
    """Fold ln_2 into c_fc and ln_f into lm_head, centre as TransformerLens; return the folded logit bias b_U."""
    with torch.no_grad():
        for block in model.transformer.h:
            w, b = block.mlp.c_fc.weight, block.mlp.c_fc.bias  # Conv1D: [d_model, d_mlp]
            g, beta = block.ln_2.weight, block.ln_2.bias
            b += beta @ w
            w *= g[:, None]
            w -= w.mean(0, keepdim=True)
            block.ln_2.weight.fill_(1.0)
            block.ln_2.bias.zero_()
            block.mlp.c_proj.weight -= block.mlp.c_proj.weight.mean(1, keepdim=True)  # [d_mlp, d_model]
            block.mlp.c_proj.bias -= block.mlp.c_proj.bias.mean()
        w_u = model.lm_head.weight.T.clone()  # [d_model, V]
        b_u = model.transformer.ln_f.bias @ w_u
        w_u *= model.transformer.ln_f.weight[:, None]
        w_u -= w_u.mean(0, keepdim=True)
        w_u -= w_u.mean(1, keepdim=True)
        model.lm_head.weight.copy_(w_u.T)
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
    return b_u - b_u.mean()


def _process_llama_by_hand(model: torch.nn.Module) -> None:
    """RMSNorm: fold the weight into gate/up and lm_head; centre W_U over the vocabulary only."""
    with torch.no_grad():
        for block in model.model.layers:
            g = block.post_attention_layernorm.weight
            block.mlp.gate_proj.weight *= g[None, :]  # Linear: [d_mlp, d_model]
            block.mlp.up_proj.weight *= g[None, :]
            block.post_attention_layernorm.weight.fill_(1.0)
        model.lm_head.weight *= model.model.norm.weight[None, :]
        model.lm_head.weight -= model.lm_head.weight.mean(0, keepdim=True)
        model.model.norm.weight.fill_(1.0)


def _oracle_stats(w_in: np.ndarray, b_in: np.ndarray, w_out: np.ndarray, w_u: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics from processed arrays, float64: w_in [d_model, d_mlp], w_out [d_mlp, d_model], w_u [d_model, V]."""
    n_in, n_out = np.linalg.norm(w_in, axis=0), np.linalg.norm(w_out, axis=1)
    cos = (w_out / n_out[:, None]) @ (w_u / np.linalg.norm(w_u, axis=0))
    return {
        "w_in_norm": n_in,
        "w_out_norm": n_out,
        "input_bias": b_in,
        "in_out_sim": np.einsum("dn,nd->n", w_in, w_out) / (n_in * n_out),
        "l2_penalty": n_in**2 + n_out**2,
        "vocab_mean": cos.mean(1),
        "vocab_var": cos.var(1),
        "vocab_skew": scipy.stats.skew(cos, axis=1),
        "vocab_kurt": scipy.stats.kurtosis(cos, axis=1, fisher=False),
    }


def _input_ids(n: int = 2, s: int = 12) -> torch.Tensor:
    return torch.randint(1, 500, (n, s))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("w"), arch="gpt2", seed=3, tie_word_embeddings=False)
    return load_model(str(path))


def test_gpt2_processed_stats_match_hand_processed_copy(gpt2):
    lm = gpt2
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    model = copy.deepcopy(lm.model)
    b_u = _process_gpt2_by_hand(model)

    ids = _input_ids()
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(ids).logits.double(), -1)
        got = torch.log_softmax(model(ids).logits.double() + b_u.double(), -1)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)  # the hand processing keeps the model's function

    stats = weight_stats(lm)
    w_u = model.lm_head.weight.T.double().numpy()
    for layer, block in enumerate(model.transformer.h):
        want = _oracle_stats(
            block.mlp.c_fc.weight.double().numpy(),
            block.mlp.c_fc.bias.double().numpy(),
            block.mlp.c_proj.weight.double().numpy(),
            w_u,
        )
        got_layer = stats[stats.layer == layer].sort_values("neuron")
        assert len(got_layer) == lm.d_mlp
        for col, value in want.items():
            np.testing.assert_allclose(got_layer[col].to_numpy(), value, rtol=1e-4, atol=1e-5, err_msg=col)

    # processing works on copies: the loaded model is untouched
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # the processed tensors themselves agree with the hand-processed copy
    p = processed_mlp_weights(lm)[1]
    torch.testing.assert_close(p.w_in, model.transformer.h[1].mlp.c_fc.weight, atol=1e-6, rtol=1e-5)
    w, b = processed_unembedding(lm)
    torch.testing.assert_close(w, model.lm_head.weight.T, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b, b_u, atol=1e-6, rtol=1e-5)


def test_llama_rmsnorm_folds_weight_without_centring(tmp_path):
    lm = load_model(str(save_tiny_model(tmp_path, arch="llama", seed=1)))
    model = copy.deepcopy(lm.model)
    _process_llama_by_hand(model)
    ids = _input_ids()
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(ids).logits.double(), -1)
        got = torch.log_softmax(model(ids).logits.double(), -1)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)

    stats = weight_stats(lm)
    w_u = model.lm_head.weight.T.double().numpy()
    block = model.model.layers[0]
    want = _oracle_stats(
        block.mlp.gate_proj.weight.T.double().numpy(),
        np.zeros(lm.d_mlp),
        block.mlp.down_proj.weight.T.double().numpy(),
        w_u,
    )
    got = stats[stats.layer == 0].sort_values("neuron")
    for col, value in want.items():
        np.testing.assert_allclose(got[col].to_numpy(), value, rtol=1e-4, atol=1e-5, err_msg=col)
    # no centring over d_model for RMSNorm
    p = processed_mlp_weights(lm)[0]
    assert p.w_in.mean(0).abs().max() > 1e-3


def test_vector_moments_closed_forms():
    x = torch.randn(4, 200_000, dtype=torch.float64)
    mean, var, skew, kurt = vector_moments(x, dim=1)
    torch.testing.assert_close(var, torch.ones(4, dtype=torch.float64), atol=0.02, rtol=0)
    assert skew.abs().max() < 0.03 and (kurt - 3).abs().max() < 0.06
    # constant rows have no shape: NaN, never a number
    _, var0, skew0, kurt0 = vector_moments(torch.ones(1, 5))
    assert var0.item() == 0 and torch.isnan(skew0).all() and torch.isnan(kurt0).all()


def test_stats_shape_and_columns(gpt2):
    stats = weight_stats(dataclasses.replace(gpt2))
    assert list(stats.columns) == [
        "layer", "neuron", "w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty",
        "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt",
    ]  # fmt: skip
    assert len(stats) == gpt2.n_neurons
    assert stats.notna().all().all()

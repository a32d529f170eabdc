"""BERT-style encoders (MultiBERTs): MLP neurons read like the causal models', next-token stages refuse.

A tiny BertForMaskedLM with the shared test tokenizer (BOS = EOS = ``<|endoftext|>``), and one whose
tokenizer has only [CLS]/[SEP]-style tokens, as MultiBERTs' has.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

from tests.helpers import N_POSITIONS, VOCAB_SIZE, corpus_text, tiny_tokenizer
from univ import roles as R
from univ.correlate import CorrelateConfig, run
from univ.errors import UserError
from univ.models import collect_mlp_activations, load_model, mlp_activation, mlp_weights, unembedding
from univ.weights import weight_stats


def save_tiny_bert(path, seed=0, tokenizer=None):
    cfg = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=N_POSITIONS)  # fmt: skip
    torch.manual_seed(seed)
    model = BertForMaskedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


def permuted_copy(src, dst, seed=5):
    """The same model with each layer's MLP neurons permuted through the adapter's paths."""
    lm = load_model(str(src))
    a, g, perms = lm.adapter, torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for i in range(lm.n_layers):
            block, p = lm.layer(i), torch.randperm(lm.d_mlp, generator=g)
            w_in = block.get_submodule(a.mlp_in)
            assert not isinstance(w_in, Conv1D)  # nn.Linear: [out, in]
            w_in.weight.copy_(w_in.weight[p, :])
            w_in.bias.copy_(w_in.bias[p])
            w_out = block.get_submodule(a.mlp_out)
            w_out.weight.copy_(w_out.weight[:, p])
            perms.append(p)
    lm.model.save_pretrained(dst)
    lm.tokenizer.save_pretrained(dst)
    return dst, perms


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    path = save_tiny_bert(root / "bert-seed0")
    data = root / "text.txt"
    data.write_text(corpus_text()[:30_000])
    return path, data


def test_bert_loads_as_a_masked_lm(bert):
    lm = load_model(str(bert[0]))
    assert isinstance(lm.model, BertForMaskedLM) and lm.meta["model_type"] == "bert"
    assert (lm.n_layers, lm.d_mlp) == (2, 64) and not lm.adapter.causal


def test_bert_mlp_weights_and_activations_reproduce_forward(bert):
    lm = load_model(str(bert[0]))
    ids = torch.randint(1, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = []
    for i in range(lm.n_layers):  # the post-LN block: LayerNorm(dense(attn) + x) feeds the MLP
        block = lm.layer(i)
        hooks.append(block.attention.output.LayerNorm.register_forward_hook(
            lambda m, args, out, i=i: seen.update({("x", i): args[0]})))  # fmt: skip
        hooks.append(block.output.dense.register_forward_hook(lambda m, a, out, i=i: seen.update({("out", i): out})))
    acts = collect_mlp_activations(lm, ids, pre=True)
    for h in hooks:
        h.remove()
    for i, w in enumerate(mlp_weights(lm)):
        x = F.layer_norm(seen[("x", i)], (32,), w.ln_weight, w.ln_bias, w.ln_eps)
        pre = x @ w.w_in + w.b_in
        torch.testing.assert_close(pre, acts.pre[:, :, i], atol=2e-5, rtol=0)
        post = mlp_activation(lm, i)(pre)
        torch.testing.assert_close(post, acts.post[:, :, i], atol=2e-5, rtol=0)
        torch.testing.assert_close(post @ w.w_out + w.b_out, seen[("out", i)], atol=2e-5, rtol=0)


def test_bert_permuted_copy_recovered_exactly(bert, tmp_path):
    path, data = bert
    perm, perms = permuted_copy(path, tmp_path / "perm")
    cfg = CorrelateConfig(models=(str(path), str(perm)), data=str(data), out=str(tmp_path / "r"), tokens=1200,
                          ctx=32, batch_size=4, device="cpu", save_state=False)  # fmt: skip
    table = pd.read_parquet(run(cfg, progress=False, log=lambda *_: None) / "neurons.parquet")
    alive = table["max_corr.perm"].notna()
    assert alive.mean() > 0.9
    t = table[alive]
    inverse = [torch.argsort(p).numpy() for p in perms]
    expected = [inverse[layer][n] for layer, n in zip(t["layer"], t["neuron"], strict=True)]
    assert (t["max_corr.perm"] > 1 - 1e-5).all() and (t["argmax_layer.perm"] == t["layer"]).all()
    assert t["argmax_neuron.perm"].tolist() == expected


def test_bert_next_token_stages_refuse_clearly(bert):
    lm = load_model(str(bert[0]))
    batch = [torch.randint(1, 500, (1, 8))]
    calls = [unembedding, R.vocab_role_scores, R.entropy_scores, R.bos_scores, lambda m: R.top_tokens(m, [(0, 1)])]
    calls += [
        lambda m: R.entropy_intervention(m, [(1, 0)], batch),
        lambda m: R.bos_path_intervention(m, (0, 0), (1, 0), batch),
    ]
    for call in calls:
        with pytest.raises(UserError, match=r"masked LM \(model_type 'bert'\).*correlate, universal, stats"):
            call(lm)
    ws = weight_stats(lm)  # analyze's weight columns: the MLP ones, vocabulary ones empty
    assert len(ws) == lm.n_neurons and ws["w_in_norm"].gt(0).all() and ws["vocab_kurt"].isna().all()


def test_cls_and_sep_become_the_streams_bos_and_separator(tmp_path):
    base = tiny_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, cls_token="<|endoftext|>",
                                  sep_token="<|endoftext|>")  # fmt: skip
    assert tok.bos_token is None
    lm = load_model(str(save_tiny_bert(tmp_path / "b", tokenizer=tok)))
    assert lm.tokenizer.bos_token_id == lm.tokenizer.cls_token_id == base.bos_token_id
    assert lm.tokenizer.eos_token_id == lm.tokenizer.sep_token_id

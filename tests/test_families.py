"""Families: the streaming variance-explained machinery, planted neurons (synthetic and in a real tiny GPT-2),
position information, top examples and the vocabulary features."""

from __future__ import annotations

import argparse
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import corpus_text, save_tiny_model, tiny_tokenizer
from univ.commands.families import register
from univ.families import (
    FamilyThresholds,
    FeatureVariance,
    NeuronFamilies,
    PositionInformation,
    SyntaxFeatures,
    TopExamples,
    label_families,
)
from univ.stats import ActivationStats
from univ.vocab_features import count_tokens, token_strings, vocab_features

TOKENS = 3000  # kept tokens streamed through the planted models


def _vr_oracle(f: np.ndarray, a: np.ndarray) -> np.ndarray:
    """1 - within-group SS / total SS, float64, for f [T, F] bool and a [T, N]."""
    total = ((a - a.mean(0)) ** 2).sum(0)
    out = np.empty((f.shape[1], a.shape[1]))
    for j in range(f.shape[1]):
        within = sum(((a[m] - a[m].mean(0)) ** 2).sum(0) for m in (f[:, j], ~f[:, j]))
        out[j] = 1 - within / total
    return out


@pytest.mark.parametrize("t, n_features, n_neurons, n_batches", [(50, 3, 4, 1), (301, 7, 5, 6)])
def test_variance_explained_streaming_equals_oracle(t, n_features, n_neurons, n_batches):
    f = torch.rand(t, n_features) < 0.3
    a = torch.randn(t, n_neurons) + 100 + 2 * f[:, :1]  # far from 0: the shift keeps S1 - n1·mean exact
    fv = FeatureVariance(n_features, n_neurons)
    for fc, ac in zip(f.chunk(n_batches), a.chunk(n_batches), strict=True):
        fv.update(fc, ac)
    want = _vr_oracle(f.numpy(), a.double().numpy())
    np.testing.assert_allclose(fv.variance_explained().numpy(), want, rtol=1e-7, atol=1e-9)
    # shards merge exactly, whatever their shifts
    half = t // 2
    s1, s2 = FeatureVariance(n_features, n_neurons), FeatureVariance(n_features, n_neurons)
    s1.update(f[:half], a[:half])
    s2.update(f[half:], a[half:] + 0.0)
    np.testing.assert_allclose(s1.merge(s2).variance_explained().numpy(), want, rtol=1e-7, atol=1e-9)
    # a slice of neurons is the same columns
    np.testing.assert_allclose(fv.variance_explained(slice(1, 3)).numpy(), want[:, 1:3], rtol=1e-7, atol=1e-9)


def test_variance_explained_degenerate_cases():
    fv = FeatureVariance(2, 2)
    f = torch.tensor([[1, 0], [1, 0], [1, 0]], dtype=torch.bool)  # feature 0 always on, feature 1 never
    fv.update(f, torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]))  # neuron 1 constant
    assert torch.isnan(fv.variance_explained()).all()  # constant feature or dead neuron: NaN, never a number
    _, dead = fv.neuron_variance()
    assert dead.tolist() == [False, True]
    with pytest.raises(ValueError, match=r"expected features \[T, 2\] and acts \[T, 2\]"):
        fv.update(torch.zeros(3, 1), torch.zeros(3, 2))


def test_position_information_matches_contingency_formula():
    t, n_bins = 2000, 8
    bins = torch.randint(0, n_bins, (t,))
    fires = torch.stack([bins < 4, torch.rand(t) < 0.3, torch.ones(t, dtype=torch.bool)], 1)  # [T, 3]
    pi = PositionInformation(n_bins, 3)
    for b, f in zip(bins.chunk(3), fires.chunk(3), strict=True):
        pi.update(b, f)
    mi = pi.mutual_information().numpy()
    # oracle: I(X;Y) = sum p(x,y) log p(x,y) / (p(x) p(y)) over the joint table
    for j in range(3):
        joint = np.zeros((n_bins, 2))
        np.add.at(joint, (bins.numpy(), fires[:, j].numpy().astype(int)), 1)
        joint /= t
        px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        want = (joint[nz] * np.log(joint[nz] / (px @ py)[nz])).sum()
        assert mi[j] == pytest.approx(want, abs=1e-10)
    assert mi[0] == pytest.approx(np.log(2), abs=0.01) and mi[1] < 0.01 and mi[2] == 0


def test_top_examples_streaming_equals_full_sort():
    b, s, n, k = 6, 10, 5, 3
    ids = torch.randint(1, 100, (b, s))
    keep = torch.rand(b, s) > 0.2
    keep[:, 0] = False
    values = torch.randn(int(keep.sum()), n)
    top = TopExamples(n, k, before=2, after=1)
    rows_per_batch = 2
    offset = 0
    for i in range(0, b, rows_per_batch):
        kp = keep[i : i + rows_per_batch]
        t = int(kp.sum())
        top.update(ids[i : i + rows_per_batch], kp, values[offset : offset + t])
        offset += t
    coords = keep.nonzero()
    want_v, want_i = values.topk(k, dim=0)
    torch.testing.assert_close(top.values, want_v)
    padded = torch.nn.functional.pad(ids, (2, 1), value=-1)
    grid = torch.full((b, s, n), float("nan"))
    grid[keep] = values
    grid = torch.nn.functional.pad(grid, (0, 0, 2, 1), value=float("nan"))
    for r in range(k):
        for j in range(n):
            row, pos = coords[want_i[r, j]].tolist()
            assert top.where[r, j].tolist() == [row, pos]
            assert top.windows[r, j].tolist() == padded[row, pos : pos + 4].tolist()
            torch.testing.assert_close(top.acts[r, j], grid[row, pos : pos + 4, j], equal_nan=True)
            assert top.acts[r, j, 2] == want_v[r, j]
    tok = tiny_tokenizer()
    df = top.result(tok, d_mlp=n, model="m")
    assert len(df) == n * k and set(df.columns) >= {"model", "layer", "neuron", "rank", "value", "tokens", "text"}
    first = df.iloc[0]
    assert first.tokens[first.position] == ids[tuple(coords[want_i[0, 0]].tolist())].item()
    assert len(first.acts) == len(first.tokens) and first.acts[first.position] == pytest.approx(first.value)


# --------------------------------------------------------------------------------------------------------------------
# Planted neurons, synthetic activations through NeuronFamilies


@pytest.fixture(scope="module")
def vocab():
    tok = tiny_tokenizer()
    return tok, vocab_features(tok, n_tokens=len(tok), n_unigrams=len(tok))  # every token and string


def test_synthetic_planted_neurons_get_their_families(vocab):
    tok, vf = vocab
    strings = token_strings(tok)
    x_id = strings.index(" the")  # previous-token neuron: fires after " the"
    y_id = strings.index(" of")  # unigram neuron: fires on " of"
    b, s = 96, 32
    ids = torch.randint(1, len(tok), (b, s))
    ids[ids % 7 == 0] = x_id  # make the planted tokens frequent
    ids[ids % 11 == 0] = y_id
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[:, 0] = False
    cur = ids[keep]
    prev = torch.cat([torch.zeros(b, 1, dtype=torch.long), ids[:, :-1]], 1)[keep]
    pos = torch.arange(s).expand(b, s)[keep]
    starts_t = vf.column("starts:t")[cur]
    t = cur.shape[0]
    noise = 0.01 * torch.randn(t, 6)
    pre = torch.stack(
        [
            4.0 * (prev == x_id) - 2,  # 0: previous-token " the"
            4.0 * (cur == y_id) - 2,  # 1: unigram " of"
            4.0 * starts_t - 2,  # 2: alphabet "t"
            torch.where(pos < 16, 1.0, -1.0),  # 3: position, first half of the context
            torch.randn(t),  # 4: nothing
            torch.full((t,), -1.0),  # 5: dead
        ],
        1,
    )
    pre[:, :5] += noise[:, :5]
    post = torch.nn.functional.gelu(pre)
    pre3, post3 = pre.reshape(t, 2, 3), post.reshape(t, 2, 3)

    fam = NeuronFamilies(vf, 2, 3, ctx=s)
    st = ActivationStats(2, 3)
    for i in range(0, b, 32):  # three batches
        kp = keep[i : i + 32]
        lo = int(keep[:i].sum())
        hi = lo + int(kp.sum())
        fam.update(ids[i : i + 32], kp, post3[lo:hi], pre3[lo:hi])
        st.update(pre3[lo:hi], post3[lo:hi])
    df = fam.result(act_kurt=st.result()["act_kurt"].to_numpy())
    assert df["family"].tolist() == ["previous-token", "unigram", "alphabet", "position", "other", "dead"]
    assert df.loc[0, "best_feature"] == "prev:token:' the'" and df.loc[0, "best_vr"] > 0.99
    assert df.loc[1, "best_feature"] == "token:' of'" and df.loc[1, "best_vr"] > 0.99
    assert df.loc[2, "best_feature"] == "starts:t" and df.loc[2, "alphabet_vr"] > 0.99
    assert df.loc[3, "position_mi"] > 0.6 and df.loc[4, "position_mi"] < 0.05
    assert df.loc[4, "best_vr"] < 0.2
    # thresholds are options: demand more than the neurons have and they fall back to "other"
    strict = FamilyThresholds(unigram=1.01, alphabet=1.01, previous=1.01, position_mi=1.0)
    assert set(label_families(df, strict)[:5]) == {"other"}


def test_label_families_rules():
    t = pd.DataFrame(
        {
            "unigram_vr": [0.6, 0.4, 0.55, 0.1, 0.1, 0.1, 0.1],
            "alphabet_vr": [0.2, 0.36, 0.60, 0.1, 0.1, 0.1, 0.1],
            "previous_vr": [0.1, 0.1, 0.1, 0.7, 0.1, 0.1, 0.1],
            "position_mi": [0.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.0],
            "act_kurt": [3.0, 3.0, 3.0, 3.0, 1.5, 4.0, 3.0],
        }
    )
    assert label_families(t).tolist() == [
        "unigram", "alphabet", "alphabet", "previous-token", "position", "other", "other"
    ]  # fmt: skip
    # position without the kurtosis column: MI alone decides
    assert label_families(t.drop(columns="act_kurt"))[5] == "position"


# --------------------------------------------------------------------------------------------------------------------
# A planted unigram neuron in a real tiny GPT-2


def _plant_unigram_neuron(model: torch.nn.Module, token: int, neuron: int) -> None:
    """Layer-0 neuron ``neuron`` reads direction e (⟂ ones, so LayerNorm keeps it), which only ``token``'s
    embedding has: every other residual is ⟂ e exactly, so its pre-activation is the bias, −3, while
    ``token`` gives ≈ 2·|x̂·e| − 3 ≈ +8."""
    d = model.config.n_embd
    e = torch.zeros(d)
    e[0], e[1] = 1.0, -1.0
    e /= e.norm()
    with torch.no_grad():
        for w in (model.transformer.wte.weight, model.transformer.wpe.weight):
            w -= (w @ e)[:, None] * e[None, :]
        model.transformer.wte.weight[token] += 10 * e
        block = model.transformer.h[0]
        block.attn.c_proj.weight.zero_()  # layer-0 attention writes nothing: resid = wte + wpe
        block.attn.c_proj.bias.zero_()
        block.ln_2.weight.fill_(1.0)
        block.ln_2.bias.zero_()
        block.mlp.c_fc.weight[:, neuron] = 2 * e  # Conv1D [d_model, d_mlp]
        block.mlp.c_fc.bias[neuron] = -3.0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny GPT-2, 3,000 kept tokens of text in batches, their counts, and the most frequent word token."""
    from univ.data import token_batches

    root = tmp_path_factory.mktemp("planted")
    path = save_tiny_model(root, arch="gpt2", seed=0)
    (root / "corpus.txt").write_text(corpus_text())
    tok = tiny_tokenizer()
    batches = list(token_batches(str(root / "corpus.txt"), tok, ctx=32, batch_size=16, max_tokens=TOKENS))
    counts = count_tokens((b.input_ids for b in batches), 512, keep=(b.keep for b in batches))
    strings = token_strings(tok)
    token = max((i for i in range(1, 512) if strings[i].strip()), key=lambda i: counts[i])
    return SimpleNamespace(path=path, batches=batches, counts=counts, strings=strings, token=token)


def test_real_model_planted_unigram_neuron(tiny_run):
    from univ.analyze import profile_model
    from univ.models import collect_mlp_activations, load_model

    lm = load_model(str(tiny_run.path))
    batches, counts, strings, token = tiny_run.batches, tiny_run.counts, tiny_run.strings, tiny_run.token
    neuron = 5
    _plant_unigram_neuron(lm.model, token, neuron)

    # the construction works through the LayerNorm: the neuron fires on `token` and nowhere else
    acts = collect_mlp_activations(lm, batches[0].input_ids, pre=True, keep=batches[0].keep)
    on = batches[0].input_ids[batches[0].keep] == token
    pre = acts.pre[:, 0, neuron]
    assert on.any() and pre[on].min() > 5 and torch.allclose(pre[~on], torch.tensor(-3.0), atol=1e-4)

    vf = vocab_features(lm.tokenizer, vocab_size=512, token_counts=counts, n_tokens=100, n_unigrams=100)
    fam = NeuronFamilies(vf, lm.n_layers, lm.d_mlp, ctx=32)
    top = TopExamples(lm.n_neurons, 5)
    prof = profile_model(lm, batches, families=fam, top=top, label="m", progress=False)
    row = prof.families.set_index(["layer", "neuron"]).loc[(0, neuron)]
    assert row["family"] == "unigram"
    assert row["best_feature"] == f"token:{strings[token]!r}" and row["best_vr"] > 0.98
    assert prof.tokens == TOKENS
    ex = prof.top[(prof.top.layer == 0) & (prof.top.neuron == neuron)]
    assert len(ex) == 5 and all(t[p] == token for t, p in zip(ex.tokens, ex.position, strict=True))
    assert (ex.token == strings[token]).all()
    # the activation statistics came from the same pass
    assert prof.stats.loc[neuron, "act_freq"] == pytest.approx(counts[token] / TOKENS, rel=1e-6)


def _plant_previous_token_neuron(model: torch.nn.Module, token: int, neuron: int) -> None:
    """Layer-1 neuron ``neuron`` fires iff the previous token is ``token``, through a real attention head.

    Every residual is built from orthonormal directions ⟂ ones with the same norm at every (token, position),
    so LayerNorm only divides by a constant: position (b0, b1) = 4·(cos θp, sin θp); ``token`` = 4·b2; other
    tokens = 4 · a unit vector in span(b4…). Layer-0 head 0 has q = R₋θ·pos, k = pos (scaled ×30), so its
    score peaks at p − 1 by ~15 logits; it reads b2 (is ``token``) and writes it to b3. Every other write
    of layers 0–1 is zeroed, and the layer-1 neuron reads b3 with bias −3.
    """
    d, (v, _), n_pos = model.config.n_embd, model.transformer.wte.weight.shape, model.config.n_positions
    g = torch.Generator().manual_seed(0)
    m = torch.randn(d, d, generator=g)
    m[:, 0] = 1.0
    basis = torch.linalg.qr(m)[0][:, 1:].T  # [d-1, d], orthonormal, ⟂ ones
    b0, b1, b2, b3, rest = basis[0], basis[1], basis[2], basis[3], basis[4:]
    theta, scale, r = 2 * torch.pi / 80, 30.0, 4.0
    with torch.no_grad():
        emb = torch.randn(v, rest.shape[0], generator=g)
        model.transformer.wte.weight.copy_(r * (emb / emb.norm(dim=1, keepdim=True)) @ rest)
        model.transformer.wte.weight[token] = r * b2
        p = torch.arange(n_pos).float()[:, None]
        model.transformer.wpe.weight.copy_(r * (torch.cos(theta * p) * b0 + torch.sin(theta * p) * b1))
        for block in model.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
        attn = model.transformer.h[0].attn
        w = attn.c_attn.weight  # Conv1D [d_model, 3·d_model]: q | k | v, head 0 first
        w.zero_()
        attn.c_attn.bias.zero_()
        c, s = float(torch.cos(torch.tensor(theta))), float(torch.sin(torch.tensor(theta)))
        w[:, 0], w[:, 1] = scale * (c * b0 + s * b1), scale * (-s * b0 + c * b1)  # query: position p - 1
        w[:, d], w[:, d + 1] = scale * b0, scale * b1  # key: position
        w[:, 2 * d] = b2  # value: "is token"
        attn.c_proj.weight[0] = b3
        model.transformer.h[0].mlp.c_proj.weight.zero_()
        model.transformer.h[0].mlp.c_proj.bias.zero_()
        mlp = model.transformer.h[1].mlp
        mlp.c_fc.weight[:, neuron] = 3 * b3
        mlp.c_fc.bias[neuron] = -3.0


def test_real_model_planted_previous_token_neuron(tiny_run):
    from univ.analyze import profile_model
    from univ.models import collect_mlp_activations, load_model

    lm = load_model(str(tiny_run.path))
    batches, counts, strings, token = tiny_run.batches, tiny_run.counts, tiny_run.strings, tiny_run.token
    neuron = 7
    _plant_previous_token_neuron(lm.model, token, neuron)

    ids = batches[0].input_ids
    pre = collect_mlp_activations(lm, ids, pre=True).pre[:, 1:, 1, neuron]  # positions 1..S-1
    after = ids[:, :-1] == token
    assert after.any() and pre[after].min() > 5 and pre[~after].max() < -2.9

    vf = vocab_features(lm.tokenizer, vocab_size=512, token_counts=counts, n_tokens=100, n_unigrams=100)
    fam = NeuronFamilies(vf, lm.n_layers, lm.d_mlp, ctx=32)
    prof = profile_model(lm, batches, families=fam, label="m", progress=False)
    row = prof.families.set_index(["layer", "neuron"]).loc[(1, neuron)]
    assert row["family"] == "previous-token"
    assert row["best_feature"] == f"prev:token:{strings[token]!r}" and row["best_vr"] > 0.98
    assert row["unigram_vr"] < 0.2


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary features and syntax alignment


def test_vocab_features_basics(vocab):
    tok, vf = vocab
    strings = token_strings(tok)
    the = [i for i, s in enumerate(strings) if s.strip().lower() == "the"]
    assert len(the) >= 2  # "the", " the", ...
    assert vf.column("unigram:the").nonzero().flatten().tolist() == the
    assert vf.column("starts:t")[strings.index(" the")] and vf.column("starts:t")[strings.index("T")]
    assert not vf.column("starts:t")[0]  # special tokens have no feature
    assert vf.column("type:leading_space")[strings.index(" of")]
    assert vf.column("type:is_punct")[strings.index(",")]
    assert vf.matrix.shape == (len(tok), len(vf.names)) and len(set(vf.names)) == len(vf.names)
    cols = {vf.matrix[:, j].numpy().tobytes() for j in range(len(vf.names))}
    assert len(cols) == len(vf.names)  # no duplicate column
    with pytest.raises(KeyError, match=re.escape("no vocab feature 'starts:?'")):
        vf.column("starts:?")
    # frequency decides which single tokens become features
    counts = np.zeros(len(tok), dtype=np.int64)
    counts[strings.index(" of")] = 50
    by_count = vocab_features(tok, token_counts=counts, n_tokens=1, n_unigrams=0, min_count=1)
    assert [n for n in by_count.names if n.startswith("token:")] == ["token:' of'"]


class _FakeTok:
    def __init__(self, text, idx, pos, dep="dep", ent="", stop=False, start=False):
        self.text, self.idx, self.pos_, self.dep_, self.ent_type_ = text, idx, pos, dep, ent
        self.is_stop, self.is_sent_start, self.is_sent_end, self.is_space = stop, start, False, text.isspace()
        self.morph = {"Number": "Plur"} if pos == "NOUN" else {}


class _FakeNlp:
    """Whitespace tokenizer; NOUN for words ending in 's', else X."""

    def pipe(self, texts):
        for text in texts:
            toks, i = [], 0
            for word in text.split(" "):
                if word:
                    toks.append(_FakeTok(word, i, "NOUN" if word.endswith("s") else "X", start=i == 0))
                i += len(word) + 1
            yield toks


def test_syntax_features_align_tokens_to_words():
    tok = tiny_tokenizer()
    ids = tok(" dogs run", add_special_tokens=False)["input_ids"]
    syn = SyntaxFeatures(_FakeNlp(), tok)
    out = syn(torch.tensor([[0] + ids]))  # BOS decodes to nothing
    noun = syn.names.index("pos:NOUN")
    plur = syn.names.index("morph:Number=Plur")
    pieces = [token_strings(tok)[i] for i in ids]
    in_dogs = [p.strip() and " dogs".find(p) >= 0 and "run" not in p for p in pieces]
    assert out.shape == (1, len(ids) + 1, len(syn.names))
    assert not out[0, 0].any()
    for j, inside in enumerate(in_dogs, start=1):
        assert bool(out[0, j, noun]) == bool(inside) and bool(out[0, j, plur]) == bool(inside)


def test_cli_parser_and_help():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["families", "runs/x", "--unigram-vr", "0.6", "--top-k", "3", "--syntax", "off"])
    assert (args.unigram_vr, args.top_k, args.syntax) == (0.6, 3, "off") and callable(args.func)

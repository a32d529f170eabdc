"""--paper-exact: the paper's exclusion rule and activation rounding, and a run against a float64 reimplementation."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from helpers import corpus_text

from univ.data import excluded_token_ids
from univ.paper import paper_excluded_token_ids, round_activations, single_newline_id


@functools.cache
def newline_tokenizer():
    """A byte-level BPE (400 tokens) with "\\n\\n" as a token of its own, as GPT-2 has (id 628)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = corpus_text()
    # GPT-2's pre-tokenizer splits "\n\n" before a letter into "\n" "\n"; runs of three keep a "\n\n" piece
    tok.train_from_iterator([text[i:i + 4000].replace("\n\n", "\n\n\n") for i in range(0, 200_000, 4000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_paper_excludes_pad_bos_eos_and_the_single_newline_only():
    tok = newline_tokenizer()
    nl, nlnl = tok.encode("\n"), tok.encode("\n\n")
    assert len(nl) == 1 and len(nlnl) == 1 and nl != nlnl  # the case the rules disagree on
    paper = paper_excluded_token_ids(tok)
    assert paper == {tok.bos_token_id, nl[0]}  # BOS = EOS = pad here, as in GPT-2
    assert single_newline_id(tok) == nl[0]
    univ_default = excluded_token_ids(tok)
    assert nlnl[0] in univ_default and nlnl[0] not in paper and paper < univ_default


def test_round_activations_is_fp16_storage():
    x = torch.tensor([1.0 + 2**-12, 3.14159265, 70000.0, -0.1])
    r = round_activations(x, torch.float16)
    assert r.dtype == torch.float32
    assert torch.equal(r, x.half().float()) and r[0] == 1.0 and torch.isinf(r[2])  # fp16 overflows past 65504
    assert round_activations(x, None) is x


def _paper_acts(path, data, cfg, excluded: set[int]):
    """The paper's get_activations, re-done by hand: fp32 model, hook on each MLP's activation output,
    fp16 storage, positions of ``excluded`` ids dropped. Returns float64 [T, L·d], L, d, the kept token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from univ.data import token_batches

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    blocks = model.transformer.h
    captured: list[torch.Tensor] = []
    hooks = [blk.mlp.act.register_forward_hook(lambda mod, inp, out: captured.append(out.detach())) for blk in blocks]
    rows, ids = [], []
    # token_batches only cuts the text into BOS-first sequences; which positions count is decided here
    batches = list(token_batches(str(data), tok, ctx=cfg.ctx, batch_size=cfg.batch_size, seed=cfg.seed,
                                 max_tokens=cfg.tokens, excluded=excluded))
    for i, b in enumerate(batches):
        keep = ~torch.isin(b.input_ids, torch.tensor(sorted(excluded)))
        assert not (b.keep & ~keep).any()  # an excluded id is never kept
        if i < len(batches) - 1:  # only the last batch stops short, at the token budget
            assert torch.equal(keep, b.keep)
        keep = b.keep
        captured.clear()
        with torch.no_grad():
            model(input_ids=b.input_ids)
        post = torch.stack(captured, dim=2).to(torch.float16)  # [B, S, L, d]: the hooks' .to(torch.float16)
        rows.append(post[keep].reshape(int(keep.sum()), -1))
        ids.append(b.input_ids[keep])
    for h in hooks:
        h.remove()
    return torch.cat(rows).double().numpy(), len(blocks), blocks[0].mlp.c_fc.nf, torch.cat(ids).numpy()


def _paper_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """compute_correlation of the paper's StreamingPearsonComputer, from raw sums, in float64."""
    n = x.shape[0]
    sx, sy = x.sum(0), y.sum(0)
    cov = x.T @ y - np.outer(sx, sy) / n
    with np.errstate(all="ignore"):
        return cov / np.outer(np.sqrt((x * x).sum(0) - sx**2 / n), np.sqrt((y * y).sum(0) - sy**2 / n))


def test_paper_exact_run_equals_float64_paper_definitions(tmp_path):
    import pandas as pd
    from helpers import save_tiny_model

    from univ.baseline import rotation
    from univ.correlate import CorrelateConfig, run

    tok = newline_tokenizer()
    paths = [save_tiny_model(tmp_path, "gpt2", seed=s, tokenizer=tok) for s in (0, 1, 2)]
    data = tmp_path / "docs.jsonl"  # documents that keep their blank lines (a .txt is split at them)
    text = corpus_text()[:30_000].replace("\n\n", "\n\n\n")
    data.write_text("".join(json.dumps({"text": text[i:i + 3000]}) + "\n" for i in range(0, len(text), 3000)))
    cfg = CorrelateConfig(models=tuple(map(str, paths)), data=str(data), out=str(tmp_path / "r"), tokens=1200,
                          ctx=32, batch_size=4, device="cpu", paper_exact=True, baseline_seed=3)
    assert (cfg.dtype, cfg.activation_dtype, cfg.baseline, cfg.baseline_draws) == ("float32", "float16", "gaussian", 1)
    out = run(cfg, progress=False, log=lambda *_: None)
    t = pd.read_parquet(out / "neurons.parquet")
    # the paper's exclusion, written out: pad (= BOS = EOS) and model.to_single_token('\n')
    excluded = {tok.pad_token_id or tok.eos_token_id, tok.bos_token_id, tok.eos_token_id,
                tok.convert_tokens_to_ids("Ċ")}
    x, _, _, kept_ids = _paper_acts(paths[0], data, cfg, excluded)
    maxes, bases = [], []
    for m in (1, 2):
        y, n_layers, d, _ = _paper_acts(paths[m], data, cfg, excluded)
        # R = randn(L, D, D) with unit rows; rotated[l] = R[l] @ acts[l]  (univ's Q_l = R_lᵀ, unit columns)
        r_rows = [rotation(d, kind="gaussian", seed=3, model_index=m, layer=l).double().numpy().T
                  for l in range(n_layers)]
        rotated = np.concatenate([(r_rows[l] @ y[:, l * d:(l + 1) * d].T).T for l in range(n_layers)], axis=1)
        maxes.append(np.nanmax(_paper_pearson(x, y), axis=1))
        bases.append(np.nanmax(_paper_pearson(x, rotated), axis=1))
        alive = t[f"max_corr.gpt2-seed{m}"].notna().to_numpy()
        assert alive.mean() > 0.9
        np.testing.assert_allclose(t[f"max_corr.gpt2-seed{m}"][alive], maxes[-1][alive], atol=1e-5)
        np.testing.assert_allclose(t[f"baseline.gpt2-seed{m}"][alive], bases[-1][alive], atol=1e-5)
    excess = np.mean(maxes, axis=0) - np.mean(bases, axis=0)  # ϱ_i, the paper's universality score
    np.testing.assert_allclose(t["excess_corr"][alive], excess[alive], atol=1e-5)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["paper_exact"] and manifest["model_dtype"] == "float32" and manifest["baseline_draws"] == 1
    assert x.shape[0] == manifest["tokens"] == cfg.tokens
    # where the paper's rule and univ's default differ: the "\n\n" positions were kept and counted
    assert (kept_ids == tok.encode("\n\n")[0]).sum() > 10


def test_paper_exact_refuses_a_conflicting_option(tmp_path):
    from univ.correlate import CorrelateConfig
    from univ.errors import UserError

    for kw in ({"dtype": "bfloat16"}, {"baseline_draws": 8}, {"baseline": "orthogonal"}, {"exclude_newlines": False}):
        with pytest.raises(UserError, match="--paper-exact fixes"):
            CorrelateConfig(models=("a", "b"), data="d", paper_exact=True, **kw)
    assert CorrelateConfig(models=("a", "b"), data="d").baseline_draws >= 1

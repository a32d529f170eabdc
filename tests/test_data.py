"""univ.data: sources, packing, exclusion masks, exact token budgets, resumption and determinism."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import corpus_text, save_tiny_model, tiny_tokenizer
from univ.data import DataSpec, check_ctx, excluded_token_ids, iter_documents, newline_token_ids, token_batches
from univ.models import load_model

CTX, BATCH = 32, 4
N_DOCS = 120


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def docs():
    paragraphs = [p.strip("\n") for p in corpus_text().split("\n\n") if p.strip()]
    return paragraphs[:N_DOCS]


@pytest.fixture(scope="module")
def files(tmp_path_factory, docs):
    """The same documents as .txt, .jsonl (field "text" and field "body") and .parquet."""
    root = tmp_path_factory.mktemp("data")
    (root / "docs.txt").write_text("\n\n".join(docs) + "\n")
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    (root / "body.jsonl").write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    pd.DataFrame({"text": docs}).to_parquet(root / "docs.parquet")
    return root


def _all(source, tok, **kw):
    kw = {"ctx": CTX, "batch_size": BATCH, **kw}
    return list(token_batches(str(source), tok, **kw))


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x.input_ids, y.input_ids) and torch.equal(x.keep, y.keep) and x.n_kept == y.n_kept
        for x, y in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------------------------------------------------
# Packing and masks


def test_packing_bos_first_ctx_long_and_eos_joined(files, docs, tok):
    batches = _all(files / "docs.txt", tok, shuffle_buffer=0)  # file order, so the stream is predictable
    ids = torch.cat([b.input_ids for b in batches])
    assert ids.shape[1] == CTX and all(b.input_ids.shape == (BATCH, CTX) for b in batches[:-1])
    assert (ids[:, 0] == tok.bos_token_id).all()
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    n = len(ids)
    assert n == len(stream) // (CTX - 1)  # the incomplete tail is dropped
    assert ids[:, 1:].flatten().tolist() == stream[: n * (CTX - 1)]
    assert [b.index for b in batches] == list(range(len(batches)))


def test_excluded_positions_are_masked(files, tok):
    excluded = excluded_token_ids(tok)
    newline = tok.convert_tokens_to_ids("Ċ")  # byte-level BPE spells "\n" as "Ċ"
    assert newline in newline_token_ids(tok) and newline in excluded and tok.bos_token_id in excluded
    assert newline not in excluded_token_ids(tok, newlines=False)
    assert 77 in excluded_token_ids(tok, extra=[77])
    batches = _all(files / "docs.txt", tok)
    saw_newline = False
    for b in batches:
        expected = ~torch.isin(b.input_ids, torch.tensor(sorted(excluded)))
        assert torch.equal(b.keep, expected) and b.n_kept == int(b.keep.sum())
        assert not b.keep[:, 0].any()  # BOS
        saw_newline |= bool((b.input_ids == newline).any())
    assert saw_newline, "the corpus should contain newlines inside documents"
    custom = _all(files / "docs.txt", tok, excluded={tok.bos_token_id})
    assert sum(b.n_kept for b in custom) == sum(int((b.input_ids != tok.bos_token_id).sum()) for b in custom)


@pytest.mark.parametrize("max_tokens", [1, 50, 3 * BATCH * (CTX - 1), 1000])
def test_max_tokens_is_exact(files, tok, max_tokens):
    full = _all(files / "docs.txt", tok)
    cut = _all(files / "docs.txt", tok, max_tokens=max_tokens)
    assert sum(b.n_kept for b in cut) == max_tokens
    assert all(int(b.keep.sum()) == b.n_kept for b in cut)
    for a, b in zip(cut[:-1], full, strict=False):  # all but the last batch are untouched
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.keep, b.keep)
    last, ref = cut[-1], full[len(cut) - 1]
    rows = len(last.input_ids)
    assert torch.equal(last.input_ids, ref.input_ids[:rows])
    assert not (last.keep & ~ref.keep[:rows]).any()  # trimming only removes positions
    assert last.keep[-1].any()  # no trailing row without a kept position


def test_running_out_warns_once(files, tok):
    full = _all(files / "docs.txt", tok)
    total = sum(b.n_kept for b in full)
    with pytest.warns(UserWarning, match=f"ran out after {total} kept tokens") as record:
        got = _all(files / "docs.txt", tok, max_tokens=10 * total)
    assert len([w for w in record if "ran out" in str(w.message)]) == 1
    assert _same(got, full)


@pytest.mark.parametrize("max_tokens", [None, 700])
def test_skip_batches_resumes_the_same_stream(files, tok, max_tokens):
    full = _all(files / "docs.txt", tok, max_tokens=max_tokens)
    resumed = _all(files / "docs.txt", tok, max_tokens=max_tokens, skip_batches=3)
    assert _same(resumed, full[3:]) and resumed[0].index == 3


def test_deterministic_by_seed(files, tok):
    a = _all(files / "docs.txt", tok, seed=1)
    b = _all(files / "docs.txt", tok, seed=1)
    c = _all(files / "docs.txt", tok, seed=2)
    assert _same(a, b)
    assert not torch.equal(a[0].input_ids, c[0].input_ids)
    # Same documents, another order: the token multiset over whole documents is the same.
    kind, docs_1 = iter_documents(str(files / "docs.txt"), seed=1)
    _, docs_2 = iter_documents(str(files / "docs.txt"), seed=2)
    l1, l2 = list(docs_1), list(docs_2)
    assert kind == "text" and l1 != l2 and sorted(l1) == sorted(l2)


# --------------------------------------------------------------------------------------------------------------------
# Sources


def test_txt_jsonl_parquet_dir_glob_agree(files, tok, tmp_path):
    ref = _all(files / "docs.txt", tok)
    assert _same(_all(files / "docs.jsonl", tok), ref)
    assert _same(_all(files / "docs.parquet", tok), ref)
    assert _same(_all(files / "body.jsonl", tok, text_field="body"), ref)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "docs.txt").write_text((files / "docs.txt").read_text())
    (tmp_path / "README.md").write_text("not data")  # directories only read supported files
    assert _same(_all(tmp_path, tok), ref)
    assert _same(_all(str(tmp_path / "**" / "*.txt"), tok), ref)


def test_txt_paragraphs_are_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one\nline two\n\n\n\ntwo\n\nthree\n")
    kind, docs = iter_documents(str(tmp_path / "a.txt"), shuffle_buffer=0)
    assert list(docs) == ["one\nline two", "two", "three"]


def test_missing_text_field_lists_fields(files, tok):
    with pytest.raises(ValueError, match=r"no field 'text'; fields found: \['body', 'id'\].*text_field"):
        token_batches(str(files / "body.jsonl"), tok)


def test_tokenized_sources(tmp_path, tok):
    rng = np.random.default_rng(0)
    seqs = [[tok.bos_token_id, *rng.integers(1, 400, CTX - 1).tolist()] for _ in range(10)]
    pd.DataFrame({"input_ids": seqs}).to_parquet(tmp_path / "seqs.parquet")
    got = _all(tmp_path / "seqs.parquet", tok, shuffle_buffer=0)
    assert torch.cat([b.input_ids for b in got]).tolist() == seqs  # used as-is

    import datasets

    datasets.Dataset.from_dict({"input_ids": seqs}).save_to_disk(str(tmp_path / "saved"))
    assert _same(_all(tmp_path / "saved", tok, shuffle_buffer=0), got)

    docs = [rng.integers(1, 400, int(n)).tolist() for n in rng.integers(5, 60, 30)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    packed = torch.cat([b.input_ids for b in _all(tmp_path / "docs.jsonl", tok, shuffle_buffer=0)])
    stream = [t for d in docs for t in d + [tok.eos_token_id]]
    assert (packed[:, 0] == tok.bos_token_id).all()
    assert packed[:, 1:].flatten().tolist() == stream[: len(packed) * (CTX - 1)]

    ragged = [*seqs[:3], seqs[3][:-1]]
    pd.DataFrame({"input_ids": ragged}).to_parquet(tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="rows are used as whole sequences"):
        _all(tmp_path / "ragged.parquet", tok, shuffle_buffer=0)
    pd.DataFrame({"input_ids": [[5] * (CTX - 1) + [10_000]]}).to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match="outside the tokenizer's"):
        _all(tmp_path / "foreign.parquet", tok)


def test_source_errors(tmp_path, tok, files, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        token_batches(str(tmp_path / "missing.txt"), tok)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unknown extension; supported: \.txt"):
        token_batches(str(tmp_path / "data.csv"), tok)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        token_batches(str(tmp_path / "empty.jsonl"), tok)
    (tmp_path / "short.txt").write_text("just a few words\n")
    with pytest.raises(ValueError, match="fewer tokens than one sequence"):
        _all(tmp_path / "short.txt", tok)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        token_batches(str(tmp_path / "*.parquet"), tok)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        token_batches(str(tmp_path / "empty_dir"), tok)

    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="neither a local file/directory/glob nor a dataset reachable"):
        token_batches("univ-tests/no-such-data", tok)


def test_check_ctx(tmp_path):
    lm = load_model(str(save_tiny_model(tmp_path, "gpt2")))
    check_ctx(lm, 64)
    with pytest.raises(ValueError, match="ctx=65 exceeds the 64 positions"):
        check_ctx(lm, 65)
    with pytest.raises(ValueError, match="at least BOS"):
        check_ctx(lm, 1)


def test_data_spec(files, tok):
    spec = DataSpec(source=str(files / "docs.txt"), ctx=CTX, batch_size=BATCH, seed=3, max_tokens=500)
    d = spec.to_dict()
    assert d["max_tokens"] == 500 and json.loads(json.dumps(d)) == d
    assert DataSpec.from_dict(d) == spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same(list(spec.batches(tok)), _all(files / "docs.txt", tok, seed=3, max_tokens=500))


def test_a_path_that_exists_is_read_literally_globs_only_otherwise(tmp_path):
    from univ.data import source_files

    (tmp_path / "corpus1.txt").write_text("one one\n\nuno\n")
    (tmp_path / "corpus2.txt").write_text("two two\n")
    literal = tmp_path / "corpus[12].txt"
    literal.write_text("bracketed\n")
    assert source_files(str(literal)) == [literal]
    assert [d for _, docs in [iter_documents(str(literal), shuffle_buffer=0)] for d in docs] == ["bracketed"]
    literal.unlink()  # now nothing has that name: it is a glob
    assert source_files(str(literal)) == [tmp_path / "corpus1.txt", tmp_path / "corpus2.txt"]
    _, docs = iter_documents(str(literal), shuffle_buffer=0)
    assert list(docs) == ["one one", "uno", "two two"]
    assert source_files("owner/dataset") is None  # a Hub name: nothing local to list

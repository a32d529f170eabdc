"""The embedded corpus, its tokenizer and the seed zoo: split, determinism, loading like a hub model.

A micro zoo (1 layer, 64 neurons, 20 steps) is trained once per module in a few seconds; every test here
takes seconds on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file

from univ import corpus, zoo

# --- corpus ---------------------------------------------------------------------------------------------


def test_corpus_split_is_disjoint_and_covers_the_corpus():
    train, heldout = corpus.corpus_split("train"), corpus.corpus_split("heldout")
    assert train and heldout
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(corpus.load_corpus())
    assert corpus.corpus_split("heldout") == heldout  # deterministic
    # held out by work: ~11 % of the characters, none of those plays' text in train
    frac = sum(map(len, heldout)) / sum(map(len, train + heldout))
    assert 0.05 < frac < 0.2
    assert not any("HAMLET." in doc for doc in train)


def test_documents_have_no_blank_lines():
    docs = corpus.corpus_split("heldout")
    assert all(doc and "\n\n" not in doc and doc == doc.strip("\n") for doc in docs)
    assert min(map(len, docs[:-1])) >= 1  # passages are whole paragraphs
    assert sum(len(d) >= corpus.PASSAGE_CHARS for d in docs) > 0.9 * len(docs)


def test_corpus_split_rejects_unknown_split():
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        corpus.corpus_split("test")


def test_write_corpus_files_round_trips(tmp_path):
    path = corpus.write_corpus_files(tmp_path / "data", "heldout")
    assert path.name == "shakespeare-heldout.txt"
    assert path.read_text(encoding="utf-8").split("\n\n") == corpus.corpus_split("heldout")


# --- tokenizer ------------------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic():
    docs = corpus.corpus_split("train")[:150]
    a = corpus.train_tokenizer(docs, 400)
    b = corpus.train_tokenizer(docs, 400)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 400
    assert a.bos_token_id == a.eos_token_id == a.pad_token_id == a.convert_tokens_to_ids(corpus.EOT) == 0
    text = "Fran.\nNay, answer me: stand — unfold yourself. ¿Qué? 日本"  # bytes never seen in training
    ids = a(text)["input_ids"]
    assert 0 not in ids  # nothing added, no unknown tokens
    assert a.decode(ids) == text


def test_shipped_tokenizer_loads_with_autotokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus.TOKENIZER_DIR)
    assert len(tok) == corpus.DEFAULT_VOCAB_SIZE
    assert tok.bos_token == tok.eos_token == corpus.EOT
    assert corpus.load_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_shipped_tokenizer_is_rebuilt_from_the_train_split(tmp_path):
    # guards the corpus/tokenizer pair: a change to the documents must come with a rebuilt tokenizer
    rebuilt = corpus.build_shipped_tokenizer(tmp_path)
    assert (rebuilt / "tokenizer.json").read_bytes() == (corpus.TOKENIZER_DIR / "tokenizer.json").read_bytes()


# --- micro zoo ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro_zoo")
    return root, zoo.train_micro_zoo(root, seeds=(0, 1, 2))


def test_micro_zoo_manifest(micro_zoo):
    root, dirs = micro_zoo
    assert [d.name for d in dirs] == ["seed-0", "seed-1", "seed-2"]
    manifest = zoo.read_manifest(root)
    assert manifest["seeds"] == [0, 1, 2]
    assert manifest["config"]["n_inner"] == zoo.MICRO_CONFIG.n_inner
    cfg = zoo.MICRO_CONFIG
    assert manifest["tokens_seen"] == cfg.steps * cfg.batch_size * cfg.n_ctx
    assert 0 < manifest["heldout_unigram_entropy"] < math.log(cfg.vocab_size)
    for m in manifest["models"]:
        assert math.isfinite(m["val_loss"]) and m["val_loss"] < math.log(cfg.vocab_size)  # it learned something
        assert m["sha256"]["model.safetensors"] == zoo._sha256(root / m["path"] / "model.safetensors")


def test_seed_loads_like_a_hub_model(micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, dirs = micro_zoo
    model = AutoModelForCausalLM.from_pretrained(dirs[1])
    tok = AutoTokenizer.from_pretrained(dirs[1])
    assert model.config.n_inner == zoo.MICRO_CONFIG.n_inner and model.config.n_layer == 1
    assert len(tok) == model.config.vocab_size and tok.model_max_length == zoo.MICRO_CONFIG.n_ctx
    ids = torch.tensor([[tok.bos_token_id, *tok("To be, or not to be")["input_ids"]]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_same_seed_gives_identical_weights(micro_zoo, tmp_path):
    root, dirs = micro_zoo
    again = zoo.train_seed(tmp_path, 0, zoo.MICRO_CONFIG, progress=False)
    # train_seed alone reproduces the seed trained inside train_zoo, byte for byte
    assert zoo._sha256(again / "model.safetensors") == zoo._sha256(dirs[0] / "model.safetensors")


def test_different_seeds_give_different_weights(micro_zoo):
    _, dirs = micro_zoo
    w = [load_file(d / "model.safetensors") for d in dirs]
    assert w[0].keys() == w[1].keys() == w[2].keys()
    for key in ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"):
        assert not torch.equal(w[0][key], w[1][key]) and not torch.equal(w[1][key], w[2][key]), key


def test_checkpoints_every_n_steps_leave_training_unchanged(micro_zoo, tmp_path):
    root, dirs = micro_zoo
    cfg = replace(zoo.MICRO_CONFIG, save_every=8)  # 20 steps: checkpoints after 8, 16 and the last, 20
    seed_dir = zoo.train_seed(tmp_path, 0, cfg, progress=False)
    names = ["step-000008", "step-000016", "step-000020"]
    assert json.loads((seed_dir / zoo.SEED_STATS).read_text())["checkpoints"] == names
    assert sorted(p.name for p in seed_dir.glob("step-*")) == names
    # saving checkpoints draws no random numbers: the final weights are the micro zoo's, byte for byte
    assert zoo._sha256(seed_dir / "model.safetensors") == zoo._sha256(dirs[0] / "model.safetensors")
    last, first = (
        load_file(seed_dir / names[-1] / "model.safetensors"),
        load_file(seed_dir / names[0] / "model.safetensors"),
    )
    final = load_file(seed_dir / "model.safetensors")
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last checkpoint is the final model
    assert not torch.equal(first["transformer.h.0.mlp.c_fc.weight"], final["transformer.h.0.mlp.c_fc.weight"])
    assert (seed_dir / names[0] / "tokenizer.json").is_file()


def test_fp16_weights(tmp_path):
    cfg = replace(zoo.MICRO_CONFIG, steps=2, fp16=True)
    seed_dir = zoo.train_seed(tmp_path, 3, cfg, progress=False)
    weights = load_file(seed_dir / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in weights.values())


def test_ensure_zoo_uses_the_cache_without_training(micro_zoo, tmp_path, monkeypatch):
    root, _ = micro_zoo
    monkeypatch.setenv("UNIV_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "shipped_zoo_dir", lambda name="default": None)
    cached = tmp_path / "zoo" / zoo._config_key(zoo.MICRO_CONFIG, (0, 1))
    shutil.copytree(root, cached)

    def _no_training(*args, **kwargs):
        raise AssertionError("ensure_zoo trained although a matching zoo was cached")

    monkeypatch.setattr(zoo, "train_zoo", _no_training)
    assert zoo.ensure_zoo((0, 1), zoo.MICRO_CONFIG) == cached
    assert zoo.cache_dir() == tmp_path


def test_lr_schedule_warms_up_then_decays():
    cfg = zoo.ZooConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_ratio=0.1)
    assert zoo._lr_at(0, cfg) == pytest.approx(1e-5)
    assert zoo._lr_at(99, cfg) == pytest.approx(1e-3)
    assert zoo._lr_at(550, cfg) == pytest.approx(0.55e-3)
    assert zoo._lr_at(1000, cfg) == pytest.approx(1e-4)


def test_unigram_entropy_of_uniform_tokens():
    assert zoo.unigram_entropy(torch.arange(8).repeat(5)) == pytest.approx(math.log(8))


# --- CLI ------------------------------------------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="univ")
    zoo.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_and_info(tmp_path, capsys):
    out = tmp_path / "zoo"
    argv = ["zoo", "train", "--out", str(out), "--seeds", "5", "--steps", "2", "--d-model", "16", "--d-mlp", "32"]
    argv += ["--layers", "1", "--heads", "2", "--ctx", "16", "--vocab-size", "300", "--batch-size", "2"]
    argv += ["--corpus-chars", "50000", "--threads", "1", "--fp16", "--save-every", "1"]
    assert _run_cli(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seeds"] == [5] and manifest["config"]["n_inner"] == 32 and manifest["config"]["fp16"]
    assert (out / "seed-5" / "model.safetensors").exists()
    ckpt = load_file(out / "seed-5" / "step-000001" / "model.safetensors")  # --save-every 1: after each step
    assert (out / "seed-5" / "step-000002").is_dir() and all(t.dtype == torch.float16 for t in ckpt.values())
    capsys.readouterr()
    assert _run_cli(["zoo", "info", str(out)]) == 0
    assert "seed-5: val loss" in capsys.readouterr().out


# --- the shipped zoo ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(zoo.ZOOS))
def test_shipped_zoo_is_intact(name):
    from transformers import AutoConfig

    shipped = zoo.shipped_zoo_dir(name)
    assert shipped is not None, f"the {name} zoo is missing from univ/assets"  # the checkout ships both
    manifest = zoo.read_manifest(shipped)
    named = zoo.ZOOS[name]
    identity = {k: v for k, v in asdict(named.config).items() if k not in zoo._NOT_IDENTITY}
    assert {k: manifest["config"][k] for k in identity} == identity  # threads/fp16 change bytes, not the zoo
    assert manifest["seeds"] == list(named.seeds)
    assert zoo.ensure_zoo(named.seeds, named.config, name=name) == shipped == zoo.resolve_zoo(name)
    assert not any(shipped.glob("seed-*/step-*")), "training checkpoints do not ship"
    for m in manifest["models"]:
        for name, digest in m["sha256"].items():
            assert zoo._sha256(shipped / m["path"] / name) == digest, f"{m['path']}/{name} differs from manifest"
        assert m["val_loss"] < manifest["heldout_unigram_entropy"]
        assert AutoConfig.from_pretrained(shipped / m["path"]).n_inner == manifest["config"]["n_inner"]


def test_train_zoo_keeps_the_seeds_an_interrupted_call_finished(tmp_path, monkeypatch):
    cfg = replace(zoo.MICRO_CONFIG, steps=4, save_every=2)
    zoo.train_zoo(tmp_path, (0,), cfg, progress=False)
    stats = json.loads((tmp_path / "seed-0" / zoo.SEED_STATS).read_text())
    assert [step for step, _ in stats["val_curve"]] == [2, 4]  # held-out loss at every checkpoint
    assert stats["val_curve"][-1][1] == pytest.approx(stats["val_loss"], abs=0.05)  # fp32 vs fp32 as saved
    trained = []
    real = zoo._train_one
    monkeypatch.setattr(zoo, "_train_one", lambda out, seed, *a, **k: trained.append(seed) or real(out, seed, *a, **k))
    zoo.train_zoo(tmp_path, (0, 1), cfg, progress=False)
    assert trained == [1]  # seed 0 was done with this config and its weights are intact
    assert [m["seed"] for m in zoo.read_manifest(tmp_path)["models"]] == [0, 1]
    weights = tmp_path / "seed-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    zoo.train_zoo(tmp_path, (0, 1), replace(cfg, threads=1), progress=False)
    assert trained == [1, 1]  # a damaged seed is trained again
    zoo.train_zoo(tmp_path, (0,), replace(cfg, steps=6), progress=False)
    assert trained == [1, 1, 0]  # another config is another zoo


def test_resolve_zoo_names_paths_and_bad_input(micro_zoo, tmp_path):
    from univ.errors import UserError

    root, _ = micro_zoo
    assert zoo.resolve_zoo(str(root)) == root
    with pytest.raises(UserError, match="--zoo nope: no folder; give a shipped zoo \\(default, depth\\)"):
        zoo.resolve_zoo("nope")
    with pytest.raises(UserError, match="a folder without manifest.json"):
        zoo.resolve_zoo(str(tmp_path))


def test_zoo_info_lists_every_shipped_zoo(capsys):
    assert _run_cli(["zoo", "info"]) == 0
    out = capsys.readouterr().out
    for name in zoo.ZOOS:
        assert f"{name}: " in out
    assert out.count("val loss") >= 8 and "min in all" in out
    assert _run_cli(["zoo", "info", "depth"]) == 0
    assert "6 layers" in capsys.readouterr().out


def test_pack_zoo_leaves_checkpoints_behind(tmp_path):
    from univ.errors import UserError

    src = tmp_path / "src"
    zoo.train_zoo(src, (0,), replace(zoo.MICRO_CONFIG, steps=2, save_every=1), progress=False)
    dst = zoo.pack_zoo(src, tmp_path / "dst")
    assert not any(dst.glob("seed-*/step-*")) and (dst / "seed-0" / "model.safetensors").is_file()
    manifest = zoo.read_manifest(dst)
    assert manifest["models"][0]["checkpoints"] == [] and len(manifest["models"][0]["val_curve"]) == 2
    assert zoo.resolve_zoo(str(dst)) == dst
    with pytest.raises(UserError, match="exists"):
        zoo.pack_zoo(src, dst)


def test_the_depth_demo_analyses_every_seed(tmp_path):
    from univ import demo

    assert demo._demo_mode(zoo.shipped_zoo_dir("depth")) == "all-pairs"  # the spread across seeds per layer
    assert demo._demo_mode(zoo.shipped_zoo_dir()) == "reference" and demo._demo_mode(tmp_path) == "reference"

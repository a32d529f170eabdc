"""The correlate run on tiny saved models: identity, planted permutations, baseline, passes, resume, errors."""

import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import corpus_text, save_tiny_model
from transformers.pytorch_utils import Conv1D

from univ import errors
from univ.baseline import rotation
from univ.correlate import CorrelateConfig, run
from univ.data import excluded_token_ids, token_batches
from univ.models import collect_mlp_activations, load_model
from univ.run import stream as stream_mod


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three tiny GPT-2 seeds, a permuted copy of seed 0, and a text file."""
    root = tmp_path_factory.mktemp("zoo")
    paths = {s: save_tiny_model(root, "gpt2", seed=s) for s in (0, 1, 2)}
    paths["perm"], paths["perm_index"] = permuted_copy(paths[0], root / "perm")
    data = root / "text.txt"
    data.write_text(corpus_text()[:60_000])
    return paths, data


def permuted_copy(src, dst, seed=123):
    """Permute neurons within each layer (MLP input rows/columns and bias, output columns/rows): same function.

    Works through the adapter's module paths, so GPT-2 (Conv1D, [in, out]), NeoX and gated Llama MLPs
    (Linear, [out, in]; gate and up permuted alike) are all covered.
    """
    lm = load_model(str(src))
    a = lm.adapter
    g = torch.Generator().manual_seed(seed)
    perms = []
    with torch.no_grad():
        for i in range(lm.n_layers):
            block = lm.layer(i)
            p = torch.randperm(lm.d_mlp, generator=g)
            for path in [a.mlp_in] + ([a.mlp_up] if a.mlp_up else []):
                mod = block.get_submodule(path)
                conv1d = isinstance(mod, Conv1D)  # GPT-2 stores [in, out]
                mod.weight.copy_(mod.weight[:, p] if conv1d else mod.weight[p, :])
                if mod.bias is not None:
                    mod.bias.copy_(mod.bias[p])
            out = block.get_submodule(a.mlp_out)
            out.weight.copy_(out.weight[p, :] if isinstance(out, Conv1D) else out.weight[:, p])
            perms.append(p)
    lm.model.save_pretrained(dst)
    lm.tokenizer.save_pretrained(dst)
    return dst, perms


def cfg_for(models, data, out, **kw):
    base = dict(tokens=1500, ctx=32, batch_size=4, device="cpu", method="exact")  # test_screen: the other one
    base.update(kw)
    return CorrelateConfig(models=tuple(str(m) for m in models), data=str(data), out=str(out), **base)


def test_self_and_permuted_copy_recovered_exactly(zoo, tmp_path):
    paths, data = zoo
    out = run(cfg_for([paths[0], paths[0], paths["perm"]], data, tmp_path / "r"), progress=False, log=lambda *_: None)
    table = pd.read_parquet(out / "neurons.parquet")
    assert len(table) == 2 * 64 and set(table["model"]) == {"gpt2-seed0"}
    alive = table["max_corr.gpt2-seed0-2"].notna()
    assert alive.mean() > 0.9
    t = table[alive]
    # against itself: r = 1 at its own index
    np.testing.assert_allclose(t["max_corr.gpt2-seed0-2"], 1.0, atol=1e-5)
    assert (t["argmax_layer.gpt2-seed0-2"] == t["layer"]).all()
    assert (t["argmax_neuron.gpt2-seed0-2"] == t["neuron"]).all()
    # against the permuted copy: neuron i of layer l sits at perm⁻¹(i)
    inverse = [torch.argsort(p).numpy() for p in paths["perm_index"]]
    expected = np.array([inverse[layer][n] for layer, n in zip(t["layer"], t["neuron"], strict=True)])
    np.testing.assert_allclose(t["max_corr.perm"], 1.0, atol=1e-5)
    assert (t["argmax_layer.perm"] == t["layer"]).all()
    np.testing.assert_array_equal(t["argmax_neuron.perm"].to_numpy(), expected)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["tokens"] == 1500 and manifest["labels"] == ["gpt2-seed0", "gpt2-seed0-2", "perm"]
    assert not (out / "checkpoint.safetensors").exists() and (out / "state" / "pass-0.safetensors").exists()
    assert len(manifest["run_id"]) == 32 and manifest["tokens_requested"] == 1500 and not manifest["data_exhausted"]
    mem = manifest["memory"]  # the plan counts the process's fixed cost, so the two are comparable
    assert 0 < mem["planned_peak_bytes"] and 0.5 < mem["measured_peak_bytes"] / mem["planned_peak_bytes"] < 2


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_permuted_copy_recovered_for_other_architectures(zoo, tmp_path, arch):
    _, data = zoo
    src = save_tiny_model(tmp_path, arch, seed=3)
    perm, perms = permuted_copy(src, tmp_path / "perm")
    out = run(cfg_for([src, perm], data, tmp_path / "r", tokens=800), progress=False, log=lambda *_: None)
    t = pd.read_parquet(out / "neurons.parquet")
    t = t[t["max_corr.perm"].notna()]
    assert len(t) > 0.9 * 2 * load_model(str(src)).d_mlp
    inverse = [torch.argsort(p).numpy() for p in perms]
    np.testing.assert_allclose(t["max_corr.perm"], 1.0, atol=1e-5)
    assert (t["argmax_layer.perm"] == t["layer"]).all()
    expected = [inverse[layer][n] for layer, n in zip(t["layer"], t["neuron"], strict=True)]
    np.testing.assert_array_equal(t["argmax_neuron.perm"].to_numpy(), expected)


def test_different_seeds_below_one_and_above_baseline(zoo, tmp_path):
    paths, data = zoo
    out = run(cfg_for([paths[0], paths[1], paths[2]], data, tmp_path / "r"), progress=False, log=lambda *_: None)
    t = pd.read_parquet(out / "neurons.parquet")
    assert t["mean_corr"].mean() < 0.95
    assert t["mean_baseline"].mean() < t["mean_corr"].mean()
    assert np.allclose(t["excess_corr"], t["mean_corr"] - t["mean_baseline"], equal_nan=True)
    hist = pd.read_parquet(out / "histograms.parquet")
    assert hist.groupby("other")["count"].sum().eq(128 * 128).all()


def explicit_acts(path, data, cfg):
    lm = load_model(str(path))
    excluded = excluded_token_ids(lm.tokenizer)
    chunks = []
    for b in token_batches(str(data), lm.tokenizer, ctx=cfg.ctx, batch_size=cfg.batch_size, seed=cfg.seed,
                           max_tokens=cfg.tokens, excluded=excluded):
        post = collect_mlp_activations(lm, b.input_ids, keep=b.keep).post
        chunks.append(post.reshape(post.shape[0], -1))
    return torch.cat(chunks).double().numpy(), lm


def corr64(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return (x.T @ y) / np.outer(np.linalg.norm(x, axis=0), np.linalg.norm(y, axis=0))


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_baseline_equals_explicit_rotation(zoo, tmp_path, kind):
    paths, data = zoo
    cfg = cfg_for([paths[0], paths[1]], data, tmp_path / "r", baseline=kind, baseline_seed=7, baseline_draws=1)
    t = pd.read_parquet(run(cfg, progress=False, log=lambda *_: None) / "neurons.parquet")
    x, _ = explicit_acts(paths[0], data, cfg)
    y, lm = explicit_acts(paths[1], data, cfg)
    d = lm.d_mlp
    rotated = np.concatenate(
        [y[:, l * d:(l + 1) * d] @ rotation(d, kind=kind, seed=7, model_index=1, layer=l).double().numpy()
         for l in range(lm.n_layers)], axis=1)
    expected = np.nanmax(corr64(x, rotated), axis=1)
    np.testing.assert_allclose(t["baseline.gpt2-seed1"], expected, atol=1e-5)
    np.testing.assert_allclose(t["max_corr.gpt2-seed1"], np.nanmax(corr64(x, y), axis=1), atol=1e-5)


def test_orthogonal_rotation_is_orthogonal():
    q = rotation(50, kind="orthogonal", seed=0, model_index=1, layer=2).double()
    torch.testing.assert_close(q.T @ q, torch.eye(50, dtype=torch.float64), atol=1e-6, rtol=0)
    g = rotation(50, kind="gaussian", seed=0, model_index=1, layer=2)
    torch.testing.assert_close(g.norm(dim=0), torch.ones(50), atol=1e-6, rtol=0)
    assert not torch.equal(g, rotation(50, kind="gaussian", seed=0, model_index=1, layer=3))


def test_several_passes_equal_one(zoo, tmp_path):
    paths, data = zoo
    models = [paths[0], paths[1], paths[2]]
    one = pd.read_parquet(run(cfg_for(models, data, tmp_path / "one"), progress=False, log=lambda *_: None)
                          / "neurons.parquet")
    # one layer of seed 0 against all of a model: 4·64·128 B = 32 KiB; a 40 kB budget forces 4 passes
    logs = []
    out = run(cfg_for(models, data, tmp_path / "many", memory_budget_gb=40e-6), progress=False, log=logs.append)
    assert "4 passes" in logs[0] and "read 4 times" in logs[0]
    many = pd.read_parquet(out / "neurons.parquet")
    pd.testing.assert_frame_equal(one, many, atol=1e-6, rtol=0)


def test_too_little_memory_is_a_clear_error(zoo, tmp_path):
    paths, data = zoo
    with pytest.raises(MemoryError, match="even the smallest block"):
        run(cfg_for([paths[0], paths[1]], data, tmp_path / "r", memory_budget_gb=1e-6), progress=False,
            log=lambda *_: None)


def test_all_pairs_is_symmetric(zoo, tmp_path):
    paths, data = zoo
    out = run(cfg_for([paths[0], paths[1], paths[2]], data, tmp_path / "r", mode="all-pairs",
                      memory_budget_gb=80e-6), progress=False, log=lambda *_: None)
    t = pd.read_parquet(out / "neurons.parquet")
    assert sorted(set(t["model"])) == ["gpt2-seed0", "gpt2-seed1", "gpt2-seed2"]
    stream = cfg_for([paths[1], paths[2]], data, "")
    x, _ = explicit_acts(paths[1], data, stream)
    y, _ = explicit_acts(paths[2], data, stream)
    r = corr64(x, y)
    seed2 = t[t["model"] == "gpt2-seed2"]
    np.testing.assert_allclose(seed2["max_corr.gpt2-seed1"], np.nanmax(r, axis=0), atol=1e-5)
    np.testing.assert_array_equal(seed2["argmax_layer.gpt2-seed1"] * 64 + seed2["argmax_neuron.gpt2-seed1"],
                                  np.nanargmax(r, axis=0))
    assert seed2["baseline.gpt2-seed1"].notna().all() and (seed2["baseline.gpt2-seed1"] < 1).all()


def test_crash_then_resume_equals_uninterrupted(zoo, tmp_path, monkeypatch):
    paths, data = zoo
    models = [paths[0], paths[1], paths[2]]
    straight = pd.read_parquet(run(cfg_for(models, data, tmp_path / "a", memory_budget_gb=70e-6),
                                   progress=False, log=lambda *_: None) / "neurons.parquet")
    cfg = cfg_for(models, data, tmp_path / "b", memory_budget_gb=70e-6, checkpoint_every=300)
    real, calls = stream_mod.process_batch, {"n": 0}

    def crashing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 20:  # in the second pass
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(stream_mod, "process_batch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, progress=False, log=lambda *_: None)
    monkeypatch.setattr(stream_mod, "process_batch", real)
    with pytest.raises(errors.Refused, match="unfinished run .*--resume"):
        run(cfg, progress=False, log=lambda *_: None)
    resumed = pd.read_parquet(run(cfg, resume=True, progress=False, log=lambda *_: None) / "neurons.parquet")
    pd.testing.assert_frame_equal(straight, resumed, atol=1e-6, rtol=0)


def test_ctrl_c_writes_checkpoint_and_resume_matches(zoo, tmp_path, monkeypatch):
    paths, data = zoo
    models = [paths[0], paths[1]]
    straight = pd.read_parquet(run(cfg_for(models, data, tmp_path / "a"), progress=False, log=lambda *_: None)
                               / "neurons.parquet")
    cfg = cfg_for(models, data, tmp_path / "b")
    real, calls = stream_mod.process_batch, {"n": 0}

    def interrupting(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C
        return real(*args, **kw)

    monkeypatch.setattr(stream_mod, "process_batch", interrupting)
    with pytest.raises(errors.Interrupted, match="Resume with --resume"):
        run(cfg, progress=False, log=lambda *_: None)
    assert (tmp_path / "b" / "checkpoint.safetensors").exists()
    monkeypatch.setattr(stream_mod, "process_batch", real)
    resumed = pd.read_parquet(run(cfg, resume=True, progress=False, log=lambda *_: None) / "neurons.parquet")
    pd.testing.assert_frame_equal(straight, resumed, atol=1e-6, rtol=0)


def test_checkpoint_from_other_configuration_refused(zoo, tmp_path, monkeypatch):
    paths, data = zoo
    cfg = cfg_for([paths[0], paths[1]], data, tmp_path / "b", checkpoint_every=200)
    real, calls = stream_mod.process_batch, {"n": 0}

    def crashing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("crash")
        return real(*args, **kw)

    monkeypatch.setattr(stream_mod, "process_batch", crashing)
    with pytest.raises(RuntimeError):
        run(cfg, progress=False, log=lambda *_: None)
    monkeypatch.setattr(stream_mod, "process_batch", real)
    other = cfg_for([paths[0], paths[2]], data, tmp_path / "b", checkpoint_every=200, tokens=2000)
    with pytest.raises(errors.Refused, match=r"option tokens: 1500 then, 2000 now"):
        run(other, resume=True, progress=False, log=lambda *_: None)
    other_model = cfg_for([paths[0], paths[2]], data, tmp_path / "b", checkpoint_every=200)
    with pytest.raises(errors.Refused, match=r"model 1: path .*gpt2-seed1' then, .*gpt2-seed2' now"):
        run(other_model, resume=True, progress=False, log=lambda *_: None)
    with pytest.raises(errors.UserError, match="no checkpoint"):
        run(cfg_for([paths[0], paths[1]], data, tmp_path / "empty"), resume=True, progress=False)


def test_bad_inputs(zoo, tmp_path):
    paths, data = zoo
    alt = save_tiny_model(tmp_path, "gpt2", seed=5, tokenizer="alt")
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        run(cfg_for([paths[0], alt], data, tmp_path / "r"), progress=False)
    with pytest.raises(ValueError, match="at least two models"):
        cfg_for([paths[0]], data, tmp_path / "r")
    with pytest.raises(errors.UserError, match="--ctx 4096 exceeds"):
        run(cfg_for([paths[0], paths[1]], data, tmp_path / "r", ctx=4096), progress=False)
    with pytest.raises(ValueError, match="baseline must be one of"):
        cfg_for([paths[0], paths[1]], data, tmp_path / "r", baseline="rotation")


def test_cli_correlate_and_help(zoo, tmp_path, capsys):
    from univ.cli import main

    paths, data = zoo
    out = tmp_path / "cli"
    code = main(["correlate", str(paths[0]), str(paths[1]), "--data", str(data), "--tokens", "600", "--ctx", "32",
                 "--batch-size", "4", "--out", str(out), "--device", "cpu", "--baseline", "orthogonal"])
    assert code == 0
    printed = capsys.readouterr()
    assert "memory plan on cpu (1 pass)" in printed.out and "excess>0.50" in printed.out
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["baseline"] == "orthogonal" and manifest["tokens"] == 600
    assert manifest["timings"]["forward_s"] > 0 and manifest["timings"]["kernels_s"] > 0
    with pytest.raises(SystemExit):
        main(["correlate", "--help"])
    assert "univ correlate" in capsys.readouterr().out


def test_activation_stats_in_the_same_pass_and_across_resume(zoo, tmp_path, monkeypatch):
    from univ.stats import ActivationStats

    paths, data = zoo
    cfg = cfg_for([paths[0], paths[1]], data, tmp_path / "a", activation_stats=True)
    stats = pd.read_parquet(run(cfg, progress=False, log=lambda *_: None) / "activation_stats.parquet")
    lm = load_model(str(paths[0]))
    ref = ActivationStats(lm.n_layers, lm.d_mlp)
    for b in token_batches(str(data), lm.tokenizer, ctx=cfg.ctx, batch_size=cfg.batch_size, max_tokens=cfg.tokens,
                           excluded=excluded_token_ids(lm.tokenizer)):
        acts = collect_mlp_activations(lm, b.input_ids, keep=b.keep, pre=True, post=True)
        ref.update(acts.pre, acts.post)
    expected = ref.result()
    assert (stats["model"] == "gpt2-seed0").all() and len(stats) == len(expected)
    for col in ("act_mean", "act_var", "act_skew", "act_kurt", "act_freq", "post_mean"):
        np.testing.assert_allclose(stats[col], expected[col], rtol=1e-6, atol=1e-9, err_msg=col)

    resumed_cfg = cfg_for([paths[0], paths[1]], data, tmp_path / "b", activation_stats=True, checkpoint_every=300)
    real, calls = stream_mod.process_batch, {"n": 0}

    def crashing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("crash")
        return real(*args, **kw)

    monkeypatch.setattr(stream_mod, "process_batch", crashing)
    with pytest.raises(RuntimeError):
        run(resumed_cfg, progress=False, log=lambda *_: None)
    monkeypatch.setattr(stream_mod, "process_batch", real)
    out = run(resumed_cfg, resume=True, progress=False, log=lambda *_: None)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "activation_stats.parquet"), stats, rtol=1e-9, atol=1e-12)

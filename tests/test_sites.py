"""SAE latents as the run's neurons (univ.sites): planted permutations, copies of neurons, dead latents, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import corpus_text, save_tiny_model
from safetensors.torch import save_file

from univ.correlate import CorrelateConfig
from univ.correlate import run as correlate
from univ.errors import UserError
from univ.sites import Sae, SaeError, load_sae

D_MODEL, D_MLP, N_LAYERS = 32, 64, 2


def write_sae(folder, W_enc, b_enc, *, hook, arch="standard", W_dec=None, b_dec=None, **cfg_extra):
    """An SAE folder as sae_lens saves one: cfg.json (metadata.hook_name) + sae_weights.safetensors."""
    folder.mkdir(parents=True)
    d_in, d_sae = W_enc.shape
    weights = {"W_enc": W_enc.contiguous(), "b_enc": b_enc.contiguous(),
               "W_dec": (W_enc.T.clone() if W_dec is None else W_dec).contiguous(),
               "b_dec": torch.zeros(d_in) if b_dec is None else b_dec}  # fmt: skip
    if arch == "jumprelu":
        weights["threshold"] = cfg_extra.pop("threshold")
    save_file(weights, folder / "sae_weights.safetensors")
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": arch, "apply_b_dec_to_input": False, "dtype": "float32",
           "metadata": {"hook_name": hook, "model_name": "tiny"}, **cfg_extra}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    a = save_tiny_model(root, "gpt2", seed=0)
    b = save_tiny_model(root, "gpt2", seed=1)
    data = root / "text.txt"
    data.write_text(corpus_text()[:30_000])
    return root, a, b, data


def _run(models, saes, data, out, **kw):
    cfg = CorrelateConfig(models=tuple(map(str, models)), data=str(data), out=str(out), tokens=1500, ctx=32,
                          batch_size=4, device="cpu", sae=tuple(saes) if saes else None, **kw)  # fmt: skip
    correlate(cfg, progress=False, log=lambda *_: None)
    return pd.read_parquet(out / "neurons.parquet")


def test_a_permuted_sae_on_a_byte_copy_is_recovered_latent_by_latent(tiny, tmp_path):
    root, a, _, data = tiny
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    g = torch.Generator().manual_seed(0)
    d_sae = 48
    W = torch.randn(D_MODEL, d_sae, generator=g) / D_MODEL**0.5
    b = torch.rand(d_sae, generator=g) * 0.5  # most latents fire on most tokens
    b[7] = -1e4  # a dead latent: never fires
    perm = torch.randperm(d_sae, generator=g)
    hook = "blocks.1.hook_resid_post"
    sae_a = write_sae(tmp_path / "sae-a", W, b, hook=hook)
    sae_b = write_sae(tmp_path / "sae-b", W[:, perm], b[perm], hook=hook)
    neurons = _run([a, copy], [sae_a, sae_b], data, tmp_path / "run")
    assert len(neurons) == d_sae and (neurons["site"] == hook).all() and (neurons["layer"] == 0).all()
    want = torch.argsort(perm).numpy()  # B's latent i is A's latent perm[i]
    alive = np.arange(d_sae) != 7
    got = neurons["argmax_neuron.copy"].to_numpy()
    assert (got[alive] == want[alive]).all()
    assert (neurons["max_corr.copy"][alive] >= 0.999).all()
    assert np.isnan(neurons["max_corr.copy"][7])  # the dead latent: NaN, not a crash
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["sites"]["kind"] == "sae" and info["sites"]["models"][1]["hooks"] == [hook]


def test_latents_that_copy_neurons_give_the_neuron_run(tiny, tmp_path):
    """An SAE on mlp.hook_post whose latents copy the neurons (+ a constant) reproduces the MLP-neuron run."""
    _, a, b, data = tiny
    eye = torch.eye(D_MLP)
    saes = []
    for name in ("a", "b"):
        folders = [write_sae(tmp_path / f"sae-{name}-{layer}", eye, torch.full((D_MLP,), 10.0),
                             hook=f"blocks.{layer}.mlp.hook_post") for layer in range(N_LAYERS)]  # fmt: skip
        saes.append(",".join(map(str, folders)))
    mlp = _run([a, b], None, data, tmp_path / "mlp")
    lat = _run([a, b], saes, data, tmp_path / "sae")
    assert (lat["site"] == np.repeat([f"blocks.{la}.mlp.hook_post" for la in range(N_LAYERS)], D_MLP)).all()
    for col in ("max_corr.gpt2-seed1", "baseline.gpt2-seed1", "excess_corr"):
        np.testing.assert_allclose(lat[col], mlp[col], atol=1e-4, err_msg=col)
    ok = mlp["max_corr.gpt2-seed1"] > 0.3  # argmax ties are rare above this
    assert (lat["argmax_neuron.gpt2-seed1"][ok] == mlp["argmax_neuron.gpt2-seed1"][ok]).all()
    assert (lat["argmax_layer.gpt2-seed1"][ok] == mlp["argmax_layer.gpt2-seed1"][ok]).all()


def test_encode_follows_sae_lens_architectures():
    x = torch.tensor([[1.0, -2.0, 0.5]])
    W = torch.eye(3)
    common = dict(path=None, hook="blocks.0.hook_resid_post", layer=0, point="hook_resid_post", W_enc=W,
                  b_enc=torch.zeros(3), b_dec=torch.tensor([0.5, 0.0, 0.0]), W_dec=W)  # fmt: skip
    assert Sae(architecture="standard", apply_b_dec_to_input=True, **common).encode(x).tolist() == [[0.5, 0, 0.5]]
    top = Sae(architecture="topk", apply_b_dec_to_input=False, k=1, **common).encode(x)
    assert top.tolist() == [[1.0, 0, 0]]
    jump = Sae(architecture="jumprelu", apply_b_dec_to_input=False, threshold=torch.tensor([2.0, 0.0, 0.1]),
               **common).encode(x)  # fmt: skip
    assert jump.tolist() == [[0, 0, 0.5]]


@pytest.mark.parametrize("case, match", [
    ("layer", r"cfg.json: hook_name 'blocks.5.hook_resid_post' names layer 5, but .* has 2 layers"),
    ("d_in", r"cfg.json: d_in 31 does not match .*blocks.0.hook_resid_post width 32"),
    ("weights", r"sae_weights.safetensors: missing"),
    ("arch", r"cfg.json: architecture 'gated' is not supported"),
    ("hook", r"cfg.json: hook_name: hook 'blocks.0.attn.hook_z' is not one univ reads"),
    ("shape", r"b_enc has shape \(5,\); cfg.json's d_in 32 and d_sae 8 need \(8,\)"),
    ("count", r"1 --sae for 2 models"),
])  # fmt: skip
def test_bad_saes_are_one_line_errors_and_write_nothing(tiny, tmp_path, case, match):
    _, a, b, data = tiny
    d_in, hook, arch = (31 if case == "d_in" else D_MODEL), "blocks.0.hook_resid_post", "standard"
    hook = {"layer": "blocks.5.hook_resid_post", "hook": "blocks.0.attn.hook_z"}.get(case, hook)
    arch = "gated" if case == "arch" else arch
    b_enc = torch.zeros(5 if case == "shape" else 8)
    sae = write_sae(tmp_path / "sae", torch.randn(d_in, 8), b_enc, hook=hook, arch=arch,
                    W_dec=torch.randn(8, d_in))  # fmt: skip
    if case == "weights":
        (sae / "sae_weights.safetensors").unlink()
    saes = [sae] if case == "count" else [sae, sae]
    out = tmp_path / "run"
    with pytest.raises(UserError, match=match) as err:
        _run([a, b], saes, data, out)
    assert "\n" not in str(err.value)
    assert not (out / "run.json").exists() and not (out / "neurons.parquet").exists()


def test_sae_preprocessing_univ_does_not_apply_is_refused(tmp_path):
    with pytest.raises(SaeError, match="normalize_activations 'layer_norm' is not supported"):
        load_sae(write_sae(tmp_path / "n", torch.randn(4, 6), torch.zeros(6), hook="blocks.0.hook_mlp_out",
                           normalize_activations="layer_norm"))  # fmt: skip


def test_load_sae_reads_topk_k_from_either_place(tmp_path):
    for i, extra in enumerate(({"k": 3}, {"activation_fn_kwargs": {"k": 3}})):
        sae = load_sae(write_sae(tmp_path / f"s{i}", torch.randn(4, 6), torch.zeros(6), arch="topk",
                                 hook="blocks.0.hook_mlp_out", **extra))  # fmt: skip
        assert sae.k == 3 and sae.point == "hook_mlp_out"
    with pytest.raises(SaeError, match="a topk SAE needs field 'k'"):
        load_sae(write_sae(tmp_path / "bad", torch.randn(4, 6), torch.zeros(6), arch="topk",
                           hook="blocks.0.hook_mlp_out"))  # fmt: skip


def test_analyze_profiles_latents_as_it_profiles_neurons(tiny, tmp_path):
    """Statistics and families apply to latents as they are; the weight columns come from the decoder rows."""
    from univ.analyze import run_analyze

    _, a, b, data = tiny
    g = torch.Generator().manual_seed(1)
    b_enc = torch.ones(16)
    b_enc[4] = -1e4  # never fires
    saes = [write_sae(tmp_path / f"sae-{n}", torch.randn(D_MODEL, 16, generator=g), b_enc,
                      hook="blocks.0.hook_mlp_out") for n in "ab"]  # fmt: skip
    _run([a, b], saes, data, tmp_path / "run")
    run_analyze(tmp_path / "run", tokens=600, progress=False, verbose=False)
    prof = pd.read_parquet(tmp_path / "run" / "profiles.parquet").set_index("neuron")
    assert len(prof) == 16 and prof.loc[4, "act_freq"] == 0.0 and (prof.drop(index=4)["act_freq"] > 0).all()
    assert prof["vocab_kurt"].notna().all() and prof["w_out_norm"].notna().all()
    assert "family" in prof and "w_in_norm" not in prof  # no MLP input weights for a latent


def test_new_sae_weights_at_the_same_path_refuse_a_resume(tiny, tmp_path):
    from univ.run import identity

    _, a, b, data = tiny
    sae = write_sae(tmp_path / "sae", torch.randn(D_MODEL, 8), torch.ones(8), hook="blocks.1.hook_resid_pre")
    cfg = CorrelateConfig(models=(str(a), str(b)), data=str(data), sae=(str(sae), str(sae)))
    before = identity.fingerprint(cfg, [], None)
    save_file({**load_sae_weights(sae), "b_enc": torch.zeros(8)}, sae / "sae_weights.safetensors")
    diffs = identity.differences(before, identity.fingerprint(cfg, [], None))
    assert any("SAE file" in d and "sae_weights.safetensors" in d for d in diffs), diffs


def load_sae_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "sae_weights.safetensors")


@pytest.mark.parametrize("world, token_shards", [(2, 2), (3, 1)])
def test_sae_sites_on_ranks_equal_one_process(tiny, tmp_path, world, token_shards):
    from test_distributed import spawn
    from test_distributed_run import _rank_run, assert_same_outputs

    _, a, b, data = tiny
    g = torch.Generator().manual_seed(2)
    saes = [",".join(str(write_sae(tmp_path / f"sae-{n}-{hook}", torch.randn(D_MODEL, 24, generator=g),
                                   torch.rand(24, generator=g), hook=hook))
                     for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")) for n in "ab"]  # fmt: skip
    cfg = dict(models=(str(a), str(b)), data=str(data), tokens=1200, ctx=32, batch_size=4, device="cpu",
               sae=tuple(saes), mode="all-pairs")  # fmt: skip
    single = tmp_path / "single"
    correlate(CorrelateConfig(**cfg, out=str(single)), progress=False, log=lambda *_: None)
    spawn(_rank_run, world, tmp_path, {**cfg, "out": str(tmp_path / "ranks"), "token_shards": token_shards})
    assert_same_outputs(tmp_path / "ranks", single, atol=2e-6)


def test_roles_of_latents_from_their_decoder_rows(tiny, tmp_path):
    """A latent whose decoder row is a token's unembedding predicts it, its negative suppresses it; latents that
    copy MLP neurons get the neurons' own vocabulary scores; interventions are said not to apply."""
    from univ.models import load_model
    from univ.roles import RoleThresholds, run_roles, vocab_role_scores
    from univ.weights import processed_unembedding

    _, a, b, data = tiny
    lm = load_model(str(a), device="cpu")
    w_u, _ = processed_unembedding(lm)
    token = 17
    g = torch.Generator().manual_seed(3)
    W_dec = torch.randn(8, D_MODEL, generator=g)
    W_dec[0], W_dec[1] = 5 * w_u[:, token], -5 * w_u[:, token]
    sae = write_sae(tmp_path / "sae-res", torch.randn(D_MODEL, 8, generator=g), torch.ones(8),
                    hook="blocks.1.hook_resid_post", W_dec=W_dec)  # fmt: skip
    _run([a, b], [sae, sae], data, tmp_path / "run")
    # in d_model 32 over 512 random unembeddings one aligned token lifts the kurtosis to ~4, not the paper's 10
    roles = pd.read_parquet(run_roles(tmp_path / "run", device="cpu", thresholds=RoleThresholds(kurt=3.8)))
    first = roles[roles["model"] == roles["model"].iloc[0]].set_index("neuron")
    assert first.loc[0, "role"] == "prediction" and first.loc[1, "role"] == "suppression"
    assert first.loc[0, "top_promoted_ids"][0] == token and first.loc[1, "top_suppressed_ids"][0] == token
    assert (first["site"] == "blocks.1.hook_resid_post").all()
    info = json.loads((tmp_path / "run" / "roles.json").read_text())
    assert "not applied to SAE latents" in " ".join(info["models"][roles["model"].iloc[0]]["notes"])

    eye = [write_sae(tmp_path / f"eye-{la}", torch.eye(D_MLP), torch.full((D_MLP,), 10.0),
                     hook=f"blocks.{la}.mlp.hook_post") for la in range(N_LAYERS)]  # fmt: skip
    spec = ",".join(map(str, eye))
    _run([a, b], [spec, spec], data, tmp_path / "eye")
    lat = pd.read_parquet(run_roles(tmp_path / "eye", device="cpu"))
    lat = lat[lat["model"] == lat["model"].iloc[0]].sort_values(["layer", "neuron"])
    neu = vocab_role_scores(lm).sort_values(["layer", "neuron"])
    for col in ("vocab_kurt", "vocab_skew", "vocab_var"):
        np.testing.assert_allclose(lat[col].to_numpy(), neu[col].to_numpy(), rtol=1e-4, atol=1e-6, err_msg=col)


def test_sae_latents_screened_equal_exact(tiny, tmp_path):
    """--method screen on SAE latents (two SAEs per model, one dead latent): the exhaustive method's table."""
    root, a, b, data = tiny
    g = torch.Generator().manual_seed(4)
    saes = []
    for name in ("a", "b"):
        folders = []
        for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
            W = torch.randn(D_MODEL, 24, generator=g) / D_MODEL**0.5
            bias = torch.rand(24, generator=g) * 0.3
            bias[3] = -1e4  # dead
            folders.append(write_sae(tmp_path / f"sae-{name}-{hook}", W, bias, hook=hook))
        saes.append(",".join(map(str, folders)))
    exact = _run([a, b], saes, data, tmp_path / "exact", method="exact", baseline_draws=2)
    screened = _run([a, b], saes, data, tmp_path / "screen", method="screen", screen_tokens=400, baseline_draws=2)
    pd.testing.assert_frame_equal(screened, exact, atol=1e-5, rtol=0)

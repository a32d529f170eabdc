"""univ sae train (a TopK SAE in sae_lens's format) and the neurons-vs-latents comparison of two runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from helpers import tiny_seeds_and_text
from test_sites import D_MODEL, write_sae

from univ.correlate import CorrelateConfig
from univ.correlate import run as correlate
from univ.errors import UserError
from univ.latents import compare_runs
from univ.sae_train import SaeTrainConfig, train_sae
from univ.sites import load_sae


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    models, data = tiny_seeds_and_text(root, (0, 1), 30_000)
    return root, models, data


def test_sae_train_writes_a_folder_univ_and_sae_lens_read(seeds, tmp_path):
    _, models, _ = seeds
    cfg = SaeTrainConfig(hook="blocks.1.hook_resid_pre", d_sae=24, k=3, tokens=3000, batch_tokens=512, ctx=32,
                         eval_tokens=1000)  # fmt: skip
    out = train_sae(str(models[0]), tmp_path / "sae", cfg, progress=False)
    sae = load_sae(out)
    assert sae.architecture == "topk" and sae.k == 3 and sae.hook == "blocks.1.hook_resid_pre"
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(24), atol=1e-5)  # unit decoder rows
    stats = json.loads((out / "univ_sae.json").read_text())
    assert stats["steps"] >= 5 and 0.0 < stats["heldout_fraction_variance_explained"] <= 1.0
    again = train_sae(str(models[0]), tmp_path / "again", cfg, progress=False)
    assert (again / "sae_weights.safetensors").read_bytes() == (out / "sae_weights.safetensors").read_bytes()
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(out))
    x = torch.randn(20, D_MODEL)
    torch.testing.assert_close(theirs.encode(x).detach(), sae.encode(x), rtol=1e-5, atol=1e-6)


def test_compare_finds_the_neuron_a_latent_copies(seeds, tmp_path):
    from univ.models import load_model
    from univ.report import run_report
    from univ.weights import processed_mlp_weights

    _, models, data = seeds
    kw = dict(models=tuple(map(str, models)), data=str(data), tokens=1200, ctx=32, batch_size=4, device="cpu")
    correlate(CorrelateConfig(**kw, out=str(tmp_path / "neurons")), progress=False, log=lambda *_: None)
    w_out = processed_mlp_weights(load_model(str(models[0]), device="cpu"))
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(16, D_MODEL, generator=g)
    W_dec[3] = -2.0 * w_out[1].w_out[5]  # latent 3 writes what neuron 1.5 writes (sign does not matter)
    sae = write_sae(tmp_path / "sae", torch.randn(D_MODEL, 16, generator=g), torch.ones(16),
                    hook="blocks.1.hook_resid_post", W_dec=W_dec)  # fmt: skip
    correlate(CorrelateConfig(**kw, out=str(tmp_path / "latents"), sae=(str(sae), str(sae))), progress=False,
              log=lambda *_: None)  # fmt: skip
    summary, table = compare_runs(tmp_path / "neurons", tmp_path / "latents")
    row = table.set_index("latent").loc[3]
    assert (row["best_layer"], row["best_neuron"]) == (1, 5) and row["abs_cos"] > 0.999
    assert summary["same_tokens"] and summary["neurons"] == 128 and summary["latents"] == 16
    page = run_report(tmp_path / "neurons", compare=tmp_path / "latents").read_text()
    assert "Neurons and SAE latents" in page and (tmp_path / "neurons" / "figures" / "latents_alignment.png").exists()
    assert len(pd.read_csv(tmp_path / "neurons" / "tables" / "latents_alignment.csv")) == 16
    with pytest.raises(UserError, match="compare a run of MLP neurons"):
        compare_runs(tmp_path / "latents", tmp_path / "neurons")


def test_the_shipped_saes_belong_to_the_shipped_zoo():
    from univ import zoo

    shipped = zoo.shipped_zoo_dir()
    saes = zoo.shipped_saes(shipped)
    assert saes is not None, "univ/assets/zoo-sae is missing or was trained on other weights"
    manifest = json.loads((saes[0].parent / "manifest.json").read_text())
    for folder, entry in zip(saes, manifest["models"], strict=True):
        sae = load_sae(folder)
        assert sae.hook == manifest["config"]["hook"] and sae.d_in == zoo.read_manifest(shipped)["config"]["n_embd"]
        assert entry["heldout_fraction_variance_explained"] > 0.7 and entry["dead_latent_share"] < 0.05
    assert zoo.shipped_saes(zoo.shipped_zoo_dir("depth")) is None  # trained on the default zoo only

"""univ_kernels inside the interpretability stack: fed from TransformerLens and nnsight, and SAEs saved by sae_lens.

These are the README's "Inside TransformerLens and nnsight pipelines" examples, run on tiny local models (no
network). The packages come with the ``test`` extra (and ``univ[interop]``, ``univ[sae]``); without them the
tests skip and say so.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import corpus_text, save_tiny_model
from kernel_helpers import BACKENDS, assert_close_verbose, reference_r

from univ_kernels import StreamingCorrelation


def _batches(seed: int = 0, n: int = 3, b: int = 2, s: int = 24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 500, (b, s), generator=g) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_correlation_fed_from_transformer_lens_hooks(backend):
    tl = pytest.importorskip("transformer_lens")
    models = [tl.HookedTransformer(tl.HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=512, n_ctx=64, act_fn="gelu", seed=seed))
        for seed in (0, 1)]  # fmt: skip
    corr = StreamingCorrelation(2 * 64, 2 * 64, backend=backend)
    seen: list[list[torch.Tensor]] = [[], []]
    for ids in _batches():
        acts = []
        for m in models:
            layers: dict[int, torch.Tensor] = {}
            hooks = [(f"blocks.{la}.mlp.hook_post", lambda x, hook, la=la, got=layers: got.__setitem__(la, x))
                     for la in range(2)]  # fmt: skip
            m.run_with_hooks(ids, fwd_hooks=hooks, return_type=None)
            acts.append(torch.cat([layers[la].reshape(-1, 64) for la in range(2)], dim=1))  # [tokens, L·d_mlp]
        corr.update(acts[0], acts[1])  # they require grad (no no_grad around the hooks): the kernels detach
        for side, x in zip(seen, acts, strict=True):
            side.append(x.detach())
    want = reference_r(torch.cat(seen[0]), torch.cat(seen[1]))
    assert_close_verbose(corr.correlation(), want, 1e-5, "TransformerLens-fed r")


def test_nnsight_trace_feeds_the_same_activations_univ_captures(tmp_path):
    nnsight = pytest.importorskip("nnsight")
    from univ.models import collect_mlp_activations, load_model

    paths = [save_tiny_model(tmp_path, "gpt2", seed=s) for s in (0, 1)]
    traced = [nnsight.LanguageModel(str(p), device_map="cpu", dispatch=True) for p in paths]
    ours = [load_model(str(p), device="cpu") for p in paths]
    corr = StreamingCorrelation(2 * 64, 2 * 64, backend="torch")
    seen: list[list[torch.Tensor]] = [[], []]
    for ids in _batches(seed=1):
        acts = []
        for lm, mine in zip(traced, ours, strict=True):
            with lm.trace(ids):  # nnsight runs this block's source: plain statements, no comprehension
                post0 = lm.transformer.h[0].mlp.act.output.save()
                post1 = lm.transformer.h[1].mlp.act.output.save()
            x = torch.stack([getattr(v, "value", v) for v in (post0, post1)], dim=2)  # [B, S, L, d_mlp]
            torch.testing.assert_close(x.detach(), collect_mlp_activations(mine, ids).post, rtol=1e-5, atol=1e-6)
            acts.append(x.reshape(-1, 2 * 64))  # still requires grad (a trace records a graph): the kernels detach
        corr.update(acts[0], acts[1])
        for side, x in zip(seen, acts, strict=True):
            side.append(x.detach())
    assert_close_verbose(corr.correlation(), reference_r(torch.cat(seen[0]), torch.cat(seen[1])), 1e-5, "nnsight r")


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_an_sae_saved_by_sae_lens_loads_encodes_and_correlates(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    from univ.cli import main
    from univ.sites import load_sae

    kinds = {"standard": ("StandardSAE", "StandardSAEConfig", {}), "topk": ("TopKSAE", "TopKSAEConfig", {"k": 5}),
             "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig", {})}  # fmt: skip
    model_name, cfg_name, extra = kinds[arch]
    model_cls, cfg_cls = getattr(sae_lens, model_name), getattr(sae_lens, cfg_name)
    sae = model_cls(cfg_cls(d_in=32, d_sae=40, **extra))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():  # random, so that every weight matters (thresholds positive)
            value = 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(value.abs() + 0.05 if name == "threshold" else value)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    folder = tmp_path / f"sae-{arch}"
    sae.save_model(str(folder))
    ours = load_sae(folder)
    x = torch.randn(50, 32, generator=g)
    torch.testing.assert_close(ours.encode(x), sae.encode(x).detach(), rtol=1e-5, atol=1e-6)

    models = [save_tiny_model(tmp_path, "gpt2", seed=s) for s in (0, 1)]
    data = tmp_path / "text.txt"
    data.write_text(corpus_text()[:20_000])
    out = tmp_path / "run"
    argv = ["correlate", *map(str, models), "--data", str(data), "--out", str(out), "--tokens", "600", "--ctx", "32",
            "--batch-size", "4", "--device", "cpu", "--sae", str(folder), "--sae", str(folder)]  # fmt: skip
    assert main(argv) == 0
    neurons = pd.read_parquet(out / "neurons.parquet")
    assert len(neurons) == 40 and (neurons["site"] == "blocks.1.hook_resid_post").all()


def test_an_sae_release_name_is_fetched_once_through_sae_lens(tmp_path, monkeypatch):
    sae_lens = pytest.importorskip("sae_lens")
    from univ.sites import SaeError, load_sae

    monkeypatch.setenv("UNIV_CACHE", str(tmp_path / "cache"))
    calls = []

    def from_pretrained(release, sae_id, device="cpu", **kw):  # the Hub, offline: a local SAE of that id
        calls.append((release, sae_id))
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=32, d_sae=8))
        sae.cfg.metadata.hook_name = sae_id
        return sae

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", staticmethod(from_pretrained))
    spec = "sae_lens:tiny-res/blocks.1.hook_resid_post"
    first, again = load_sae(spec), load_sae(spec)
    assert calls == [("tiny-res", "blocks.1.hook_resid_post")]  # the second load reads the cached folder
    assert first.hook == again.hook == "blocks.1.hook_resid_post" and first.path == again.path
    assert str(first.path).startswith(str(tmp_path / "cache"))
    with pytest.raises(SaeError, match="give sae_lens:RELEASE/SAE_ID"):
        load_sae("sae_lens:no-id")

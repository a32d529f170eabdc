"""univ.models against the transformers forward pass: activations, weights, interventions, load errors."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ARCHS, save_tiny_model
from univ import models
from univ.errors import UserError
from univ.models import (
    ActivationCapture,
    ModelNotFoundError,
    attention_weights,
    check_same_tokenizer,
    collect_mlp_activations,
    load_model,
    mlp_activation,
    mlp_weights,
    run_with_neuron_values,
    split_revision,
    unembedding,
)

ATOL = 2e-5  # float32 forward vs float32 re-computation from the extracted weights


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One tiny model per architecture, saved once per module, loaded lazily by arch name."""
    root = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            if arch == "gpt2-crfm":  # the paper's stanford-crfm GPT-2 seeds scale attention by 1/(layer + 1)
                overrides = dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)
                path = save_tiny_model(root, arch="gpt2", seed=0, name="gpt2-crfm", **overrides)
            else:
                path = save_tiny_model(root, arch=arch, seed=0)
            cache[arch] = load_model(str(path))
        return cache[arch]

    return get


def _ids(batch=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (batch, seq), generator=g)


def _norm(x, w, b, kind, eps):
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _record(module, what):
    """Forward hook storing a module's first input ("in") or its output ("out") in a list."""
    store = []

    def hook(mod, args, output):
        store.append(args[0] if what == "in" else (output[0] if isinstance(output, tuple) else output))

    return store, module.register_forward_hook(hook)


def _assert_close(actual, expected, atol=ATOL, what=""):
    diff = (actual - expected).abs()
    bad = diff > atol
    assert not bad.any(), f"{what}: {int(bad.sum())}/{diff.numel()} differ, max |Δ| {diff.max():.3g}"


# --------------------------------------------------------------------------------------------------------------------
# Loading


def test_loaded_model_is_frozen_and_sized(zoo):
    lm = zoo("gpt2")
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert (lm.n_layers, lm.d_mlp, lm.n_neurons) == (2, 64, 128)
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert models.max_positions(lm) == 64
    assert zoo("llama").d_mlp == 48


def test_dtype_by_name(tmp_path):
    lm = load_model(str(save_tiny_model(tmp_path, "gpt2")), dtype="bf16")
    assert lm.dtype == torch.bfloat16
    acts = collect_mlp_activations(lm, _ids())
    assert acts.post.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path / "gpt2-seed0"), dtype="float8")


def test_unknown_architecture_says_how_to_add_it(tmp_path):
    from transformers import OPTConfig

    OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'opt'.*gpt2.*gpt_neox.*llama.*register_adapter"):
        load_model(str(tmp_path))


def test_missing_local_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such local directory"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):  # still a FileNotFoundError for old callers
        load_model(str(tmp_path / "file"))


def _warm_imports() -> None:
    """Import what load_model imports lazily, so the timing measures the lookup, not a loaded CPU's imports."""
    import huggingface_hub
    import transformers

    _ = transformers.AutoConfig, transformers.AutoTokenizer, huggingface_hub.model_info


def test_offline_hub_name_fails_fast(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _warm_imports()
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"no such local directory.*HF_HUB_OFFLINE is set.*not in the Hugging Face"):
        load_model("univ-tests/no-such-model")
    assert time.perf_counter() - t0 < 5


@pytest.fixture
def hub_online(monkeypatch):
    """The online code path, whatever the user's HF_HUB_OFFLINE says (offline clusters set it)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_bare_name_that_is_no_folder_fails_fast(hub_online):
    """The issue's case: 'seed-1' is neither a folder here nor a model the Hub serves (no network, or unknown)."""
    _warm_imports()
    t0 = time.perf_counter()
    with pytest.raises(
        UserError,
        match=r"model 'seed-1': no such local directory, and the (Hub knows no|Hugging Face Hub is unreachable)",
    ) as err:
        load_model("seed-1")
    assert time.perf_counter() - t0 < 5
    assert "\n" not in str(err.value)  # one line


def _hub_raises(monkeypatch, exc):
    import huggingface_hub

    def fake(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "model_info", fake)


def _bare(cls):
    """An instance of a huggingface_hub HTTP error without building an HTTP response."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, cls.__name__)
    return exc


def test_hub_errors_say_what_was_looked_for(monkeypatch, hub_online):
    from huggingface_hub import errors

    _hub_raises(monkeypatch, ConnectionError("connection refused"))
    with pytest.raises(ModelNotFoundError, match=r"unreachable \(connection refused\).*'owner/m' at revision 'step9'"):
        load_model("owner/m@step9")
    _hub_raises(monkeypatch, _bare(errors.RevisionNotFoundError))
    with pytest.raises(ModelNotFoundError, match="no branch, tag or commit 'step9'"):
        load_model("owner/m@step9")
    _hub_raises(monkeypatch, _bare(errors.RepositoryNotFoundError))
    with pytest.raises(ModelNotFoundError, match="the Hub knows no model 'owner/m'"):
        load_model("owner/m")
    # Unreachable but in the local cache: load from the cache without further network attempts.
    _hub_raises(monkeypatch, ConnectionError("down"))
    monkeypatch.setattr(models, "_in_cache", lambda repo, revision: True)
    assert models._resolve_source("owner/m@v1") == models._Source("owner/m", "v1", hub=True, local_only=True)


def test_split_revision(tmp_path):
    assert split_revision("EleutherAI/pythia-160m-seed3@step12000") == ("EleutherAI/pythia-160m-seed3", "step12000")
    assert split_revision("gpt2") == ("gpt2", None)
    assert split_revision("gpt2@") == ("gpt2@", None)
    odd = tmp_path / "runs@v2"
    odd.mkdir()
    assert split_revision(str(odd)) == (str(odd), None)  # an existing path is a path
    assert split_revision(str(odd / "seed-0@step-1")) == (str(odd / "seed-0"), "step-1")


def test_local_checkpoint_revision(tmp_path):
    seed = save_tiny_model(tmp_path, "gpt2", seed=0, name="seed-0")
    step = save_tiny_model(seed, "gpt2", seed=1, name="step-000010")  # a checkpoint inside the seed's folder
    lm = load_model(f"{seed}@step-000010")
    assert lm.name == f"{seed}@step-000010"
    assert lm.meta["source"] == str(step) and lm.meta["revision"] == "step-000010" and lm.meta["commit"] is None
    final = load_model(str(seed))
    assert final.meta["revision"] is None
    assert not torch.equal(lm.model.lm_head.weight, final.model.lm_head.weight)
    with pytest.raises(ModelNotFoundError, match=r"no checkpoint subfolder 'step-9'.*it has: step-000010"):
        load_model(f"{seed}@step-9")


def test_register_adapter_refuses_silent_overwrite():
    with pytest.raises(ValueError, match="overwrite=True"):
        models.register_adapter(models.get_adapter("gpt2"))


def test_check_same_tokenizer(tmp_path, zoo):
    same = load_model(str(save_tiny_model(tmp_path, "neox", seed=1)))
    check_same_tokenizer([zoo("gpt2"), same])  # same tokenizer, different architecture: fine
    other = load_model(str(save_tiny_model(tmp_path, "gpt2", seed=1, tokenizer="alt")))
    with pytest.raises(ValueError, match=r"gpt2-seed0.*gpt2-seed1.*vocabularies differ.*bos_token_id"):
        check_same_tokenizer([zoo("gpt2"), other])


# --------------------------------------------------------------------------------------------------------------------
# Activations


@pytest.mark.parametrize("arch", ARCHS)
def test_activations_shape_and_post_from_pre(zoo, arch):
    lm = zoo(arch)
    ids = _ids()
    acts = collect_mlp_activations(lm, ids, pre=True, post=True)
    assert acts.post.shape == acts.pre.shape == (2, 12, lm.n_layers, lm.d_mlp)
    weights = mlp_weights(lm)
    for layer in range(lm.n_layers):
        expected = mlp_activation(lm, layer)(acts.pre[:, :, layer])
        if weights[layer].gated:  # post = act(gate) * up: recover up from the module input
            store, handle = _record(lm.layer(layer).mlp, "in")
            with torch.inference_mode():
                lm.base_model(ids)
            handle.remove()
            expected = expected * (store[0] @ weights[layer].w_up + weights[layer].b_up)
        _assert_close(acts.post[:, :, layer], expected, what=f"{arch} layer {layer}")


def test_post_only_and_keep(zoo):
    lm = zoo("gpt2")
    ids = _ids()
    full = collect_mlp_activations(lm, ids)
    assert full.pre is None
    keep = torch.rand(ids.shape) > 0.3
    kept = collect_mlp_activations(lm, ids, keep=keep, pre=True)
    assert kept.post.shape == (int(keep.sum()), lm.n_layers, lm.d_mlp)
    torch.testing.assert_close(kept.post, full.post[keep], rtol=0, atol=0)
    kept.post.sub_(1.0)  # not an inference tensor: callers may centre in place
    with pytest.raises(ValueError, match="nothing to collect"):
        collect_mlp_activations(lm, ids, post=False)


def _hook_count(lm):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def test_hooks_removed_after_exception(zoo):
    lm = zoo("gpt2")
    before = _hook_count(lm)

    def boom(layer, post):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"), ActivationCapture(lm, pre=True, edit=boom):
        assert _hook_count(lm) > before
        lm.model(_ids())
    assert _hook_count(lm) == before
    collect_mlp_activations(lm, _ids())
    assert _hook_count(lm) == before


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_run_with_neuron_values(zoo, arch):
    lm = zoo(arch)
    ids = _ids()
    base = lm.model(ids).logits.float()
    post = collect_mlp_activations(lm, ids).post  # [B, S, L, d]

    # Fixing a neuron at the value it has anyway changes nothing; at another value it changes the logits.
    same = run_with_neuron_values(lm, ids, {(1, 3): post[:, :, 1, 3]})
    _assert_close(same, base, what="no-op edit")
    changed = run_with_neuron_values(lm, ids, {(0, 5): 10.0, (1, 3): -2.0})
    assert (changed - base).abs().max() > 1e-3

    # The last layer's edit moves the residual by (v - post)·w_out[n] before the final norm.
    w_u, ln_w, ln_b = unembedding(lm)
    w = mlp_weights(lm)[1]
    store, handle = _record(models._module(lm.base_model, lm.adapter.final_norm), "in")
    with torch.inference_mode():
        lm.base_model(ids)
    handle.remove()
    resid = store[0] + (4.0 - post[:, :, 1, 7, None]) * w.w_out[7]
    expected = _norm(resid, ln_w, ln_b, lm.adapter.norm, w.ln_eps) @ w_u
    _assert_close(run_with_neuron_values(lm, ids, {(1, 7): 4.0}), expected, atol=1e-4, what="last-layer edit")

    with ActivationCapture(lm) as cap:
        cap.set_neuron(0, 2, 1.5)
        lm.model(ids)
    assert (cap.post[:, :, 0, 2] == 1.5).all()
    with pytest.raises(IndexError, match="out of range"):
        cap.set_neuron(lm.n_layers, 0, 0.0)


# --------------------------------------------------------------------------------------------------------------------
# Weights reproduce the forward pass


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_weights_reproduce_forward(zoo, arch):
    lm = zoo(arch)
    ids = _ids()
    acts = collect_mlp_activations(lm, ids, pre=True)
    for layer, w in enumerate(mlp_weights(lm)):
        block = lm.layer(layer)
        assert w.w_in.shape == (32, lm.d_mlp) and w.w_out.shape == (lm.d_mlp, 32)
        assert w.b_in.shape == (lm.d_mlp,) and w.b_out.shape == (32,) and w.ln_weight.shape == (32,)
        resid, h1 = _record(models._module(block, lm.adapter.mlp_norm), "in")
        out, h2 = _record(block.mlp, "out")
        with torch.inference_mode():
            lm.base_model(ids)
        h1.remove(), h2.remove()
        x = _norm(resid[0], w.ln_weight, w.ln_bias, w.norm, w.ln_eps)
        pre = x @ w.w_in + w.b_in
        _assert_close(pre, acts.pre[:, :, layer], what=f"{arch} pre, layer {layer}")
        post = mlp_activation(lm, layer)(pre)
        if w.gated:
            post = post * (x @ w.w_up + w.b_up)
        _assert_close(post @ w.w_out + w.b_out, out[0], what=f"{arch} mlp out, layer {layer}")


def _rotate(x, cos, sin, dims):
    """HF rotary convention (rotate_half on the first ``dims`` dims of each head)."""
    rot, rest = x[..., :dims], x[..., dims:]
    x1, x2 = rot.chunk(2, dim=-1)
    rot = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rot, rest], dim=-1)


@pytest.mark.parametrize("arch", [*ARCHS, "gpt2-crfm"])
def test_attention_weights_reproduce_forward(zoo, arch):
    lm = zoo(arch)
    ids = _ids(seq=9)
    B, S = ids.shape
    for layer, a in enumerate(attention_weights(lm)):
        block = lm.layer(layer)
        assert a.w_q.shape == (a.n_heads, 32, a.d_head) and a.w_o.shape == (a.n_heads, a.d_head, 32)
        assert a.w_k.shape == a.w_v.shape == (a.n_kv_heads, 32, a.d_head)
        resid, h1 = _record(models._module(block, lm.adapter.attn_norm), "in")
        out, h2 = _record(models._module(block, lm.adapter.attn), "out")
        with torch.inference_mode():
            lm.base_model(ids)
        h1.remove(), h2.remove()

        x = _norm(resid[0], a.ln_weight, a.ln_bias, a.norm, a.ln_eps)  # [B, S, d]
        q = torch.einsum("bsd,hde->bhse", x, a.w_q) + a.b_q[:, None]
        k = torch.einsum("bsd,hde->bhse", x, a.w_k) + a.b_k[:, None]
        v = torch.einsum("bsd,hde->bhse", x, a.w_v) + a.b_v[:, None]
        if a.q_norm is not None:
            eps = lm.model.config.rms_norm_eps
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * a.q_norm
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * a.k_norm
        if a.rotary_dims:
            positions = torch.arange(S)[None]
            cos, sin = lm.base_model.rotary_emb(x, positions)  # [1, S, rotary_dims]
            q, k = (
                _rotate(q, cos[:, None], sin[:, None], a.rotary_dims),
                _rotate(k, cos[:, None], sin[:, None], a.rotary_dims),
            )
        rep = a.n_heads // a.n_kv_heads  # GQA: query head h reads kv-head h // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = a.scale * q @ k.transpose(-1, -2)  # [B, H, S, S]
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        z = scores.softmax(-1) @ v  # [B, H, S, d_head]
        expected = torch.einsum("bhse,hed->bsd", z, a.w_o) + a.b_o
        _assert_close(expected, out[0], what=f"{arch} attention out, layer {layer}")


@pytest.mark.parametrize("arch", ARCHS)
def test_unembedding_reproduces_logits(zoo, arch):
    lm = zoo(arch)
    ids = _ids()
    w_u, ln_w, ln_b = unembedding(lm)
    assert w_u.shape == (32, lm.model.config.vocab_size)
    store, handle = _record(models._module(lm.base_model, lm.adapter.final_norm), "in")
    with torch.inference_mode():
        logits = lm.model(ids).logits
    handle.remove()
    eps = mlp_weights(lm)[0].ln_eps
    _assert_close(_norm(store[0], ln_w, ln_b, lm.adapter.norm, eps) @ w_u, logits, atol=1e-4, what=arch)


def test_helpers_save_a_loadable_tokenizer(zoo, tmp_path):
    path = save_tiny_model(tmp_path, "gpt2", seed=3)
    assert json.loads((path / "config.json").read_text())["model_type"] == "gpt2"
    tok = zoo("gpt2").tokenizer
    assert tok.bos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.decode(tok("a\nb")["input_ids"]) == "a\nb"


def test_short_name_keeps_revisions_apart():
    assert models.short_name("EleutherAI/pythia-160m-seed3@step12000") == "pythia-160m-seed3@step12000"
    assert models.short_name("runs/zoo/seed-0/step-000100") == "seed-0@step-000100"  # a checkpoint folder
    assert models.short_name("runs/zoo/seed-0@step-000100") == "seed-0@step-000100"
    assert models.short_name("owner/m@refs/pr/1") == "m@refs-pr-1"
    assert models.short_name("runs/zoo/seed-0/") == "seed-0"
    from univ.correlate import model_labels

    names = ("z/seed-0/step-000100", "z/seed-0/step-000200", "z/seed-1/step-000100", "gpt2", "gpt2")
    assert model_labels(names) == ["seed-0@step-000100", "seed-0@step-000200", "seed-1@step-000100", "gpt2", "gpt2-2"]

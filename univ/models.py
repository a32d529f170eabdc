"""Models: load a causal LM, read its MLP neurons, and hand out its weights in one orientation.

A *neuron* is one coordinate of an MLP's activation output — the vector that enters the MLP's output
projection (Gurnee et al. 2024 use GPT-2's post-GELU activations). For every supported architecture:

    post = input of the output projection      GPT-2 ``mlp.c_proj``, NeoX ``mlp.dense_4h_to_h``,
                                                 gated (Llama, …) ``mlp.down_proj``: act(gate) · up
    pre  = output of the input projection      GPT-2 ``mlp.c_fc``, NeoX ``mlp.dense_h_to_4h``,
                                                 gated ``mlp.gate_proj``: the input of the activation

Hooking the projections rather than the activation module gives one rule for gated and non-gated MLPs,
and stays right if a model shares one activation module between layers.

Architectures are described by small :class:`Adapter` records in a registry keyed by ``config.model_type``;
add one with :func:`register_adapter`. Weights come back as plain tensors, oriented so that activations
multiply from the left (``x @ w``):

    MLP        w_in [d_model, d_mlp]   b_in [d_mlp]   w_out [d_mlp, d_model]   b_out [d_model]
               gated: w_in = gate_proj, w_up [d_model, d_mlp];  pre = ln(x) @ w_in + b_in,
               post = act(pre) (· (ln(x) @ w_up + b_up) if gated),  out = post @ w_out + b_out
    attention  w_q [n_heads, d_model, d_head]   w_k, w_v [n_kv_heads, d_model, d_head]
               b_q [n_heads, d_head]   b_k, b_v [n_kv_heads, d_head]   w_o [n_heads, d_head, d_model]
    unembed    w_u [d_model, d_vocab]; logits = final_norm(x) @ w_u

Missing biases are zeros, so formulas never branch. The tensors are views of the parameters where the
layout allows (no copy): clone before changing them in place.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from univ.errors import UserError

__all__ = [
    "Adapter",
    "ActivationCapture",
    "AttnWeights",
    "LoadedModel",
    "MlpActivations",
    "MlpWeights",
    "ModelError",
    "ModelNotFoundError",
    "attention_weights",
    "check_same_tokenizer",
    "collect_mlp_activations",
    "get_adapter",
    "load_model",
    "max_positions",
    "mlp_activation",
    "mlp_weights",
    "register_adapter",
    "require_causal",
    "run_with_neuron_values",
    "short_name",
    "split_revision",
    "supported_model_types",
    "unembedding",
]


# --------------------------------------------------------------------------------------------------------------------
# Errors


class ModelNotFoundError(UserError, FileNotFoundError):
    """The model is neither a local folder nor loadable from the Hub (a user error: one line, exit 2)."""


class ModelError(UserError, ValueError):
    """The model loads but univ cannot use it as asked: unknown architecture, tokenizer mismatch (exit 2)."""


# --------------------------------------------------------------------------------------------------------------------
# Weight records


@dataclass
class MlpWeights:
    """One layer's MLP weights, ``x @ w`` orientation (module docstring has the equations)."""

    w_in: Tensor  # [d_model, d_mlp]; gated MLPs: gate_proj
    b_in: Tensor  # [d_mlp], zeros if the model has none
    w_out: Tensor  # [d_mlp, d_model]
    b_out: Tensor  # [d_model], zeros if the model has none
    ln_weight: Tensor  # [d_model], the effective scale of the norm before the MLP (Gemma's 1 + w)
    ln_bias: Tensor | None  # [d_model]; None for RMSNorm
    norm: str  # "layernorm" or "rmsnorm"
    ln_eps: float
    w_up: Tensor | None = None  # [d_model, d_mlp], gated MLPs only
    b_up: Tensor | None = None  # [d_mlp], gated MLPs only (zeros if the model has none)

    @property
    def gated(self) -> bool:
        return self.w_up is not None


@dataclass
class AttnWeights:
    """One layer's attention weights, per head, ``x @ w`` orientation.

    Grouped-query attention (Llama, Mistral, Qwen): keys and values are given per kv-head; query head ``h``
    reads kv-head ``h // (n_heads // n_kv_heads)``. Rotary models rotate the first ``rotary_dims`` dims of q
    and k by position after the projection (0: no rotary, GPT-2); Qwen3 also RMS-normalises q and k per
    head (``q_norm``/``k_norm``) before the rotation. Scores are ``scale · q·k``.
    """

    w_q: Tensor  # [n_heads, d_model, d_head]
    w_k: Tensor  # [n_kv_heads, d_model, d_head]
    w_v: Tensor  # [n_kv_heads, d_model, d_head]
    b_q: Tensor  # [n_heads, d_head]
    b_k: Tensor  # [n_kv_heads, d_head]
    b_v: Tensor  # [n_kv_heads, d_head]
    w_o: Tensor  # [n_heads, d_head, d_model]
    b_o: Tensor  # [d_model]
    ln_weight: Tensor  # [d_model], norm before attention (effective scale)
    ln_bias: Tensor | None  # [d_model]; None for RMSNorm
    norm: str  # "layernorm" or "rmsnorm"
    ln_eps: float
    n_heads: int
    n_kv_heads: int
    d_head: int
    scale: float  # multiplies q·k (1/sqrt(d_head), GPT-2 may also divide by layer + 1)
    rotary_dims: int = 0
    q_norm: Tensor | None = None  # [d_head], Qwen3
    k_norm: Tensor | None = None  # [d_head], Qwen3


# --------------------------------------------------------------------------------------------------------------------
# Adapters


def _module(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path = "a.b.c"``."""
    return functools.reduce(getattr, path.split("."), root)


def _in_out(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [in, out], bias [out] or None) of a linear layer: nn.Linear stores [out, in], Conv1D [in, out]."""
    from transformers.pytorch_utils import Conv1D

    w = module.weight.detach()
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if isinstance(module, Conv1D):
        return w, b
    if isinstance(module, nn.Linear):
        return w.T, b
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def _bias_or_zeros(b: Tensor | None, n: int, like: Tensor) -> Tensor:
    return b if b is not None else torch.zeros(n, dtype=like.dtype, device=like.device)


def _gpt2_scale(attn: nn.Module) -> float:
    if hasattr(attn, "scaling"):  # transformers >= 4.48 precomputes it
        return float(attn.scaling)
    scale = attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0
    return scale / (attn.layer_idx + 1) if attn.scale_attn_by_inverse_layer_idx else scale


def _gpt2_attention(attn: nn.Module, config: Any) -> dict[str, Any]:
    # c_attn: Conv1D [d_model, 3·d_model], columns q | k | v, each split into heads as h·d_head + j.
    w, b = _in_out(attn.c_attn)
    d_model = w.shape[0]
    n_heads, d_head = attn.num_heads, attn.head_dim
    b = _bias_or_zeros(b, 3 * d_model, w)
    wq, wk, wv = (t.reshape(d_model, n_heads, d_head).permute(1, 0, 2) for t in w.split(d_model, dim=1))
    bq, bk, bv = (t.reshape(n_heads, d_head) for t in b.split(d_model))
    w_o, b_o = _in_out(attn.c_proj)  # [d_model (= n_heads·d_head), d_model]
    return dict(
        w_q=wq, w_k=wk, w_v=wv, b_q=bq, b_k=bk, b_v=bv,
        w_o=w_o.reshape(n_heads, d_head, d_model), b_o=_bias_or_zeros(b_o, d_model, w),
        n_heads=n_heads, n_kv_heads=n_heads, d_head=d_head, scale=_gpt2_scale(attn), rotary_dims=0,
    )  # fmt: skip


def _neox_attention(attn: nn.Module, config: Any) -> dict[str, Any]:
    # query_key_value: nn.Linear with out features interleaved per head: head h owns rows
    # [h·3·d_head, (h+1)·3·d_head) = its q | k | v (the forward views [..., n_heads, 3·d_head] and chunks).
    n_heads, d_head = config.num_attention_heads, attn.head_size
    w = attn.query_key_value.weight.detach()  # [3·d_model, d_model]
    d_model = w.shape[1]
    b = _bias_or_zeros(
        attn.query_key_value.bias.detach() if attn.query_key_value.bias is not None else None, 3 * d_model, w
    )
    w4 = w.view(n_heads, 3, d_head, d_model).transpose(2, 3)  # [n_heads, 3, d_model, d_head]
    b3 = b.view(n_heads, 3, d_head)
    w_o, b_o = _in_out(attn.dense)
    return dict(
        w_q=w4[:, 0], w_k=w4[:, 1], w_v=w4[:, 2], b_q=b3[:, 0], b_k=b3[:, 1], b_v=b3[:, 2],
        w_o=w_o.reshape(n_heads, d_head, d_model), b_o=_bias_or_zeros(b_o, d_model, w),
        n_heads=n_heads, n_kv_heads=n_heads, d_head=d_head, scale=float(attn.scaling),
        rotary_dims=int(attn.rotary_ndims),
    )  # fmt: skip


def _llama_attention(attn: nn.Module, config: Any, norm_offset: float = 0.0) -> dict[str, Any]:
    # q/k/v_proj: nn.Linear [n·d_head, d_model], head-major rows; o_proj: [d_model, n_heads·d_head].
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d_head = attn.head_dim
    out: dict[str, Any] = {}
    for name, n in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
        w, b = _in_out(getattr(attn, f"{name}_proj"))  # [d_model, n·d_head]
        d_model = w.shape[0]
        out[f"w_{name}"] = w.reshape(d_model, n, d_head).permute(1, 0, 2)
        out[f"b_{name}"] = _bias_or_zeros(b, n * d_head, w).reshape(n, d_head)
    w_o, b_o = _in_out(attn.o_proj)
    d_model = w_o.shape[1]
    out.update(
        w_o=w_o.reshape(n_heads, d_head, d_model), b_o=_bias_or_zeros(b_o, d_model, w_o),
        n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head, scale=float(attn.scaling), rotary_dims=d_head,
    )  # fmt: skip
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        if norm is not None:
            out[name] = norm.weight.detach() + norm_offset
    return out


@dataclass(frozen=True)
class Adapter:
    """Where one architecture keeps its parts. Paths are attribute paths (``"mlp.c_fc"``).

    ``layers`` and ``final_norm`` are relative to the base model (``model.base_model``); the other paths are
    relative to one block. ``split_attention(attn_module, config)`` returns the fields of
    :class:`AttnWeights` except the norm ones. ``norm_offset`` is added to norm weights to get the
    effective scale (Gemma's RMSNorm computes ``x̂ · (1 + w)``). ``causal=False`` marks a masked LM
    (BERT): loaded with ``auto_class``, read like any other for activations and MLP weights, but without the
    next-token parts (unembedding, attention roles), which refuse with :class:`ModelError`.
    """

    model_type: str
    layers: str
    mlp_in: str  # its output is the pre-activation
    mlp_out: str  # its input is the post-activation (the neuron)
    act: str
    mlp_norm: str
    attn: str
    attn_norm: str
    final_norm: str
    norm: str  # "layernorm" or "rmsnorm"
    split_attention: Callable[[nn.Module, Any], dict[str, Any]]
    mlp_up: str | None = None  # gated MLPs: the up projection
    norm_offset: float = 0.0
    causal: bool = True  # False: a masked LM, no next-token unembedding or attention roles
    auto_class: str = "AutoModelForCausalLM"  # the transformers class that loads it

    @property
    def gated(self) -> bool:
        return self.mlp_up is not None


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *, overwrite: bool = False) -> None:
    """Teach univ a new architecture (keyed by ``adapter.model_type``, the ``model_type`` of its config)."""
    if adapter.model_type in _ADAPTERS and not overwrite:
        raise ValueError(f"an adapter for model_type {adapter.model_type!r} exists; pass overwrite=True to replace it")
    _ADAPTERS[adapter.model_type] = adapter


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model_type: str) -> Adapter:
    """The adapter for ``model_type``; ``ValueError`` naming the supported types if there is none."""
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise ModelError(
            f"unsupported architecture: model_type {model_type!r}. Supported: {', '.join(supported_model_types())}. "
            "To add one, describe where its MLP, attention and norms live in a univ.models.Adapter and call "
            "univ.models.register_adapter(adapter)."
        ) from None


GPT2 = Adapter(
    model_type="gpt2", layers="h", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", act="mlp.act", mlp_norm="ln_2",
    attn="attn", attn_norm="ln_1", final_norm="ln_f", norm="layernorm", split_attention=_gpt2_attention,
)  # fmt: skip
GPT_NEOX = Adapter(
    model_type="gpt_neox", layers="layers", mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h",
    act="mlp.act", mlp_norm="post_attention_layernorm", attn="attention", attn_norm="input_layernorm",
    final_norm="final_layer_norm", norm="layernorm", split_attention=_neox_attention,
)  # fmt: skip
LLAMA = Adapter(
    model_type="llama", layers="layers", mlp_in="mlp.gate_proj", mlp_out="mlp.down_proj", act="mlp.act_fn",
    mlp_up="mlp.up_proj", mlp_norm="post_attention_layernorm", attn="self_attn", attn_norm="input_layernorm",
    final_norm="norm", norm="rmsnorm", split_attention=_llama_attention,
)  # fmt: skip


def _no_attention_split(attn: nn.Module, config: Any) -> dict[str, Any]:
    raise NotImplementedError("this adapter does not describe its attention")


# BERT-style encoders (MultiBERTs): post-LN blocks, attn → add & LayerNorm → MLP → add & LayerNorm. The MLP
# reads the attention sublayer's output norm, so that is its mlp_norm; there is no norm *before* attention
# and no final norm, and the MLM head transforms the residual (dense, GELU, LayerNorm) before its decoder.
BERT = Adapter(
    model_type="bert", layers="encoder.layer", mlp_in="intermediate.dense", mlp_out="output.dense",
    act="intermediate.intermediate_act_fn", mlp_norm="attention.output.LayerNorm", attn="attention.self",
    attn_norm="", final_norm="", norm="layernorm", split_attention=_no_attention_split, causal=False,
    auto_class="AutoModelForMaskedLM",
)  # fmt: skip

for _adapter in (
    GPT2,
    BERT,
    GPT_NEOX,
    LLAMA,
    dataclasses.replace(LLAMA, model_type="mistral"),
    dataclasses.replace(LLAMA, model_type="qwen2"),
    dataclasses.replace(LLAMA, model_type="qwen3"),
    dataclasses.replace(
        LLAMA,
        model_type="gemma",
        norm_offset=1.0,
        split_attention=functools.partial(_llama_attention, norm_offset=1.0),
    ),
):
    register_adapter(_adapter)


# --------------------------------------------------------------------------------------------------------------------
# Loading

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        # bf16 on GPU halves memory and bandwidth; fp32 on CPU, where bf16 matmuls are slow.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or a torch.dtype")
    return _DTYPES[key]


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


HUB_PROBE_TIMEOUT_S = 5.0  # one metadata request; transformers' own download path retries for ~30 s


def split_revision(name_or_path: str) -> tuple[str, str | None]:
    """``NAME@REVISION`` → (NAME, REVISION); anything else → (name, None).

    A local path that exists is a path even if it contains '@'. The revision is a Hub branch, tag or commit
    (``EleutherAI/pythia-160m-seed3@step12000``), or for a local model folder one of its checkpoint
    subfolders (``runs/zoo/seed-0@step-000100`` is ``runs/zoo/seed-0/step-000100``).

    Example:
        >>> split_revision("EleutherAI/pythia-160m-seed3@step12000")
        ('EleutherAI/pythia-160m-seed3', 'step12000')
    """
    if "@" not in name_or_path or Path(name_or_path).expanduser().exists():
        return name_or_path, None
    base, revision = name_or_path.rsplit("@", 1)
    if not base or not revision:
        return name_or_path, None
    return base, revision


_CHECKPOINT_FOLDER = re.compile(r"(step|checkpoint|ckpt)[-_]?\d+")


def short_name(name_or_path: str) -> str:
    """A model's label: its last path component, with its revision if it has one.

    ``EleutherAI/pythia-160m-seed3@step12000`` → ``pythia-160m-seed3@step12000``; a checkpoint given as a
    folder is labelled like one given as a revision: ``runs/zoo/seed-0/step-000100`` and
    ``runs/zoo/seed-0@step-000100`` → ``seed-0@step-000100``, so two checkpoints of a seed never share one.
    """
    base, revision = split_revision(name_or_path)
    path = Path(base.rstrip("/"))
    stem = path.name or base
    if revision is not None:
        return f"{stem}@{revision.replace('/', '-')}"
    if _CHECKPOINT_FOLDER.fullmatch(stem) and path.parent.name:
        return f"{path.parent.name}@{stem}"
    return stem


@dataclass(frozen=True)
class _Source:
    """Where load_model reads from: a local folder, or a Hub id at a revision (``local_only``: from the cache)."""

    path: str
    revision: str | None  # as given (Hub) or the checkpoint subfolder (local)
    hub: bool
    local_only: bool = False

    def kwargs(self) -> dict[str, Any]:
        if not self.hub:
            return {}
        return {"revision": self.revision, "local_files_only": self.local_only}


def _local_source(name_or_path: str, base: str, revision: str | None) -> _Source | None:
    local = Path(base).expanduser()
    if not local.exists():
        return None
    if revision is not None:
        if not (local / revision).is_dir():
            steps = sorted(p.name for p in local.iterdir() if p.is_dir() and (p / "config.json").is_file())
            raise ModelNotFoundError(
                f"model {name_or_path!r}: the local folder {base!r} has no checkpoint subfolder {revision!r} "
                f"(it has: {', '.join(steps) or 'none'}); a revision of a local model names one of its subfolders"
            )
        local = local / revision
    if not local.is_dir():
        raise ModelNotFoundError(f"model {name_or_path!r} is a file; pass the directory holding config.json")
    if not (local / "config.json").is_file():
        raise ModelNotFoundError(
            f"model directory {str(local)!r} has no config.json; pass a directory written by save_pretrained"
        )
    return _Source(str(local), revision, hub=False)


def _in_cache(repo: str, revision: str | None) -> bool:
    """Is this repo's config (at this revision) in the local Hugging Face cache? No network."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(repo, revision=revision, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def _hub_source(name_or_path: str, repo: str, revision: str | None) -> _Source:
    """Decide in seconds whether a Hub id can load: offline mode → the cache; else one short metadata request.

    Without this, a name that is not a local folder waits through ~30 s of download retries when the Hub is
    unreachable. Network failures fall back to the cache; a name or revision the Hub does not know fails here.
    """
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    at = f" at revision {revision!r}" if revision else ""
    fix = "pass a local directory written by save_pretrained, or a Hub name of the form 'owner/name[@revision]'"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        if _in_cache(repo, revision):
            return _Source(repo, revision, hub=True, local_only=True)
        raise ModelNotFoundError(
            f"model {name_or_path!r}: no such local directory, and HF_HUB_OFFLINE is set while {repo!r}{at} is "
            f"not in the Hugging Face cache; {fix}, or download it once with the network on"
        )
    try:
        huggingface_hub.model_info(repo, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except hub_errors.RevisionNotFoundError:
        raise ModelNotFoundError(
            f"model {name_or_path!r}: the Hub has {repo!r} but no branch, tag or commit {revision!r}; "
            "list them with huggingface_hub.list_repo_refs"
        ) from None
    except hub_errors.GatedRepoError:
        raise ModelNotFoundError(
            f"model {name_or_path!r} is gated on the Hub: accept its terms on huggingface.co and log in "
            "(hf auth login), or pass a local copy"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {name_or_path!r}: no such local directory, and the Hub knows no model {repo!r} (or it is "
            f"private: log in with hf auth login); {fix}"
        ) from None
    except hub_errors.HFValidationError:
        raise ModelNotFoundError(
            f"model {name_or_path!r}: no such local directory, and not a valid Hub name; {fix}"
        ) from None
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, HTTP 5xx: the Hub is unreachable
        if _in_cache(repo, revision):
            return _Source(repo, revision, hub=True, local_only=True)
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelNotFoundError(
            f"model {name_or_path!r}: no such local directory, and the Hugging Face Hub is unreachable ({reason}) "
            f"with {repo!r}{at} not in its cache; {fix}, or retry with the network on"
        ) from None
    return _Source(repo, revision, hub=True)


def _resolve_source(name_or_path: str) -> _Source:
    base, revision = split_revision(name_or_path)
    local = _local_source(name_or_path, base, revision)
    if local is not None:
        return local
    if _looks_like_path(base):
        raise ModelNotFoundError(
            f"model {name_or_path!r}: no such local directory (and it is not a Hub name of the form 'owner/name')"
        )
    return _hub_source(name_or_path, base, revision)


@dataclass
class LoadedModel:
    """A causal LM ready for reading neurons: eval mode, no gradients, with its adapter and sizes."""

    name: str  # as given to load_model
    model: Any  # transformers PreTrainedModel (…ForCausalLM)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    adapter: Adapter
    n_layers: int
    d_mlp: int
    meta: dict[str, Any] = field(default_factory=dict)  # model_type, resolved path, dtype, … for manifests

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def base_model(self) -> nn.Module:
        """The transformer without its LM head: running it skips the [tokens × vocab] logits."""
        return self.model.base_model

    def layer(self, i: int) -> nn.Module:
        return _module(self.base_model, self.adapter.layers)[i]


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM (or a BERT-style masked LM) and its tokenizer from a local folder or a Hub name.

    ``NAME@REVISION`` loads a Hub branch, tag or commit (model and tokenizer), or a local model folder's
    checkpoint subfolder (:func:`split_revision`). A name that is neither a local folder nor loadable from
    the Hub fails within seconds with :class:`ModelNotFoundError` (offline mode and an unreachable Hub
    included). The architecture is checked from the config before any weight is read, so an unsupported
    model fails fast. dtype defaults to float32 on CPU and bfloat16 on CUDA.

    Example:
        >>> lm = load_model("runs/zoo/seed-0")  # doctest: +SKIP
        >>> lm.n_layers, lm.d_mlp
        (2, 1024)
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    device = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    src = _resolve_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs())
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFoundError(
            f"model {name_or_path!r}: its config did not load ({reason}); pass a directory written by "
            "save_pretrained or a Hub model name"
        ) from e
    adapter = get_adapter(config.model_type)

    # transformers renamed torch_dtype to dtype in 4.56.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = {"dtype": torch_dtype} if (major, minor) >= (4, 56) else {"torch_dtype": torch_dtype}
    model_class = getattr(transformers, adapter.auto_class)
    model = model_class.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs(), **dtype_kw)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs())
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFoundError(
            f"model {name_or_path!r} loaded but its tokenizer did not ({reason}); save the tokenizer beside the "
            "model (tokenizer.save_pretrained(path))"
        ) from e

    if not adapter.causal and tokenizer.bos_token is None and tokenizer.cls_token is not None:
        # BERT's sequences start with [CLS] and segments end with [SEP]: the token stream's BOS and separator
        tokenizer.bos_token = tokenizer.cls_token
        if tokenizer.eos_token is None and tokenizer.sep_token is not None:
            tokenizer.eos_token = tokenizer.sep_token

    layers = _module(model.base_model, adapter.layers)
    w_in, _ = _in_out(_module(layers[0], adapter.mlp_in))
    meta = {
        "source": src.path,
        "model_type": config.model_type,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "revision": src.revision,
        # the Hub commit the files came from (None for local folders): a branch or tag may move later
        "commit": getattr(config, "_commit_hash", None) if src.hub else None,
    }
    return LoadedModel(
        name=name_or_path,
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        n_layers=len(layers),
        d_mlp=int(w_in.shape[1]),
        meta=meta,
    )


def max_positions(lm: LoadedModel) -> int | None:
    """The longest context the model was built for (None if its config does not say)."""
    config = lm.model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_same_tokenizer(models: Sequence[LoadedModel]) -> None:
    """Refuse to compare models that read different token ids: neuron correlation needs aligned positions.

    Compares every model with the first: vocabulary (``get_vocab()``, special tokens included) and BOS/EOS ids.
    """
    if not models:
        return
    ref = models[0]
    ref_vocab = ref.tokenizer.get_vocab()
    for other in models[1:]:
        vocab = other.tokenizer.get_vocab()
        problems = []
        if vocab != ref_vocab:
            differing = sorted(
                (tok for tok in ref_vocab.keys() | vocab.keys() if ref_vocab.get(tok) != vocab.get(tok)),
                key=lambda t: (ref_vocab.get(t, vocab.get(t)), t),
            )
            shown = ", ".join(f"{t!r}: {ref_vocab.get(t)} vs {vocab.get(t)}" for t in differing[:5])
            problems.append(
                f"vocabularies differ ({len(ref_vocab)} vs {len(vocab)} tokens, {len(differing)} differ; e.g. {shown})"
            )
        for attr in ("bos_token_id", "eos_token_id"):
            a, b = getattr(ref.tokenizer, attr), getattr(other.tokenizer, attr)
            if a != b:
                problems.append(f"{attr} {a} vs {b}")
        if problems:
            raise ModelError(
                f"models {ref.name!r} and {other.name!r} do not share a tokenizer: {'; '.join(problems)}. "
                "Correlating neurons needs the same token ids at the same positions; compare seeds of one model."
            )


# --------------------------------------------------------------------------------------------------------------------
# Weights


def _norm_weights(norm: nn.Module, offset: float) -> tuple[Tensor, Tensor | None, float]:
    weight = norm.weight.detach()
    if offset:
        weight = weight + offset
    bias = norm.bias.detach() if getattr(norm, "bias", None) is not None else None
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-5
    return weight, bias, float(eps)


def mlp_weights(lm: LoadedModel) -> list[MlpWeights]:
    """Per layer MLP weights: w_in [d_model, d_mlp], b_in [d_mlp], w_out [d_mlp, d_model], b_out [d_model], norm."""
    a = lm.adapter
    out = []
    for i in range(lm.n_layers):
        block = lm.layer(i)
        w_in, b_in = _in_out(_module(block, a.mlp_in))
        w_out, b_out = _in_out(_module(block, a.mlp_out))
        ln_w, ln_b, eps = _norm_weights(_module(block, a.mlp_norm), a.norm_offset)
        w_up = b_up = None
        if a.mlp_up is not None:
            w_up, b_up = _in_out(_module(block, a.mlp_up))
            b_up = _bias_or_zeros(b_up, w_up.shape[1], w_up)
        out.append(
            MlpWeights(
                w_in=w_in,
                b_in=_bias_or_zeros(b_in, w_in.shape[1], w_in),
                w_out=w_out,
                b_out=_bias_or_zeros(b_out, w_out.shape[1], w_out),
                ln_weight=ln_w,
                ln_bias=ln_b,
                norm=a.norm,
                ln_eps=eps,
                w_up=w_up,
                b_up=b_up,
            )
        )
    return out


def require_causal(lm: LoadedModel, what: str) -> None:
    """Refuse next-token analyses of a masked LM with a one-line :class:`ModelError` that says what applies."""
    if not lm.adapter.causal:
        raise ModelError(
            f"{what} needs a causal LM's next-token path; {lm.name!r} is a masked LM (model_type "
            f"{lm.adapter.model_type!r}), where univ supports correlate, universal, stats and families (analyze "
            "leaves the vocabulary weight columns empty) but not roles"
        )


def attention_weights(lm: LoadedModel) -> list[AttnWeights]:
    """Per layer attention weights split into heads (see :class:`AttnWeights` for shapes, GQA and rotary)."""
    require_causal(lm, "reading attention weights for the BOS attention roles")
    a = lm.adapter
    out = []
    for i in range(lm.n_layers):
        block = lm.layer(i)
        ln_w, ln_b, eps = _norm_weights(_module(block, a.attn_norm), a.norm_offset)
        parts = a.split_attention(_module(block, a.attn), lm.model.config)
        out.append(AttnWeights(ln_weight=ln_w, ln_bias=ln_b, norm=a.norm, ln_eps=eps, **parts))
    return out


def unembedding(lm: LoadedModel) -> tuple[Tensor, Tensor, Tensor | None]:
    """(w_u [d_model, d_vocab], final norm weight [d_model], final norm bias [d_model] or None).

    d_vocab is the model's (it may exceed the tokenizer's: Pythia pads it to a multiple of 128).
    """
    require_causal(lm, "the unembedding (vocabulary and entropy roles)")
    w_u = lm.model.get_output_embeddings().weight.detach().T
    ln_w, ln_b, _ = _norm_weights(_module(lm.base_model, lm.adapter.final_norm), lm.adapter.norm_offset)
    return w_u, ln_w, ln_b


def mlp_activation(lm: LoadedModel, layer: int) -> nn.Module:
    """The activation function of one layer's MLP (post = act(pre), times up for gated MLPs)."""
    return _module(lm.layer(layer), lm.adapter.act)


# --------------------------------------------------------------------------------------------------------------------
# Activations and interventions


@dataclass
class MlpActivations:
    """MLP activations of every layer, in the model's dtype: [B, S, L, d_mlp] (or [T, L, d_mlp] with keep)."""

    post: Tensor | None
    pre: Tensor | None


Edit = Callable[[int, Tensor], Tensor | None]


class ActivationCapture:
    """Forward hooks on every layer's MLP that record pre/post activations and can overwrite neurons.

    Use as a context manager around any forward of ``lm.model`` (or its base model); the hooks are removed
    on exit, exceptions included. Captured tensors hold the latest forward: ``post``/``pre`` are
    [B, S, L, d_mlp], or [T, L, d_mlp] with ``keep`` (a [B, S] bool mask; only those positions are stored,
    which saves memory when most positions are dropped anyway).

    Edits act on the post-activation before it enters the output projection; the captured ``post`` is the
    edited one (what the model used). ``set_neuron(layer, neuron, value)`` fixes one neuron (value: a float,
    or a tensor broadcastable to [B, S]); ``edit(layer, post)`` may return a replacement [B, S, d_mlp].

    Example:
        >>> with ActivationCapture(lm, pre=True) as cap:  # doctest: +SKIP
        ...     cap.set_neuron(1, 42, 0.0)
        ...     logits = lm.model(input_ids).logits
        >>> cap.post.shape  # doctest: +SKIP
        torch.Size([8, 512, 2, 1024])
    """

    def __init__(
        self,
        lm: LoadedModel,
        *,
        pre: bool = False,
        post: bool = True,
        keep: Tensor | None = None,
        edit: Edit | None = None,
    ) -> None:
        self.lm = lm
        self.want_pre, self.want_post = pre, post
        self.keep = keep
        self.edit = edit
        self.neuron_values: dict[tuple[int, int], float | Tensor] = {}
        self.pre: Tensor | None = None
        self.post: Tensor | None = None
        self._handles: list[Any] = []

    def set_neuron(self, layer: int, neuron: int, value: float | Tensor) -> None:
        if not (0 <= layer < self.lm.n_layers and 0 <= neuron < self.lm.d_mlp):
            raise IndexError(
                f"neuron ({layer}, {neuron}) out of range: the model has {self.lm.n_layers} layers of "
                f"{self.lm.d_mlp} neurons"
            )
        self.neuron_values[(layer, neuron)] = value

    def _store(self, name: str, layer: int, act: Tensor) -> None:
        if self.keep is not None:
            act = act[self.keep.to(act.device)]  # [T, d_mlp]
        buf = getattr(self, name)
        shape = (*act.shape[:-1], self.lm.n_layers, act.shape[-1])
        if buf is None or buf.shape != shape or buf.dtype != act.dtype or buf.device != act.device:
            # A normal tensor even under inference_mode, so that callers may later change it in place.
            with torch.inference_mode(False):
                buf = torch.empty(shape, dtype=act.dtype, device=act.device)
            setattr(self, name, buf)
        buf[..., layer, :] = act

    def _pre_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self._store("pre", layer, output)

        return hook

    def _post_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            edits = [(n, v) for (l_, n), v in self.neuron_values.items() if l_ == layer]
            changed = False
            if edits:
                x = x.clone()
                for n, v in edits:
                    x[..., n] = v.to(x.device) if isinstance(v, Tensor) else v
                changed = True
            if self.edit is not None:
                new = self.edit(layer, x)
                if new is not None:
                    if new.shape != x.shape:
                        raise ValueError(f"edit returned shape {tuple(new.shape)} for post of shape {tuple(x.shape)}")
                    x, changed = new.to(x.dtype), True
            if self.want_post:
                self._store("post", layer, x)
            return (x, *args[1:]) if changed else None

        return hook

    def __enter__(self) -> ActivationCapture:
        try:
            a = self.lm.adapter
            for i in range(self.lm.n_layers):
                block = self.lm.layer(i)
                if self.want_pre:
                    self._handles.append(_module(block, a.mlp_in).register_forward_hook(self._pre_hook(i)))
                self._handles.append(_module(block, a.mlp_out).register_forward_pre_hook(self._post_hook(i)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _check_input_ids(lm: LoadedModel, input_ids: Tensor) -> Tensor:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be integer token ids; got {input_ids.dtype}")
    return input_ids.to(lm.device, torch.long)


def collect_mlp_activations(
    lm: LoadedModel,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    pre: bool = False,
    post: bool = True,
    keep: Tensor | None = None,
) -> MlpActivations:
    """Every layer's MLP activations for a batch: post/pre [B, S, L, d_mlp] in the model's dtype.

    Runs the base model only (no [B, S, vocab] logits). With ``keep`` ([B, S] bool) only the kept positions
    are stored, as [T, L, d_mlp] in row-major order of ``keep`` — what the correlation update consumes.
    """
    if not (pre or post):
        raise ValueError("nothing to collect: pass pre=True and/or post=True")
    input_ids = _check_input_ids(lm, input_ids)
    if keep is not None and keep.shape != input_ids.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}; expected input_ids' {tuple(input_ids.shape)}")
    if attention_mask is not None:
        attention_mask = attention_mask.to(lm.device)
    with torch.inference_mode(), ActivationCapture(lm, pre=pre, post=post, keep=keep) as cap:
        lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return MlpActivations(post=cap.post, pre=cap.pre)


def run_with_neuron_values(
    lm: LoadedModel,
    input_ids: Tensor,
    edits: dict[tuple[int, int], float | Tensor] | Iterable[tuple[tuple[int, int], float | Tensor]],
    *,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Logits [B, S, d_vocab] (float32) with some neurons fixed: ``{(layer, neuron): value}``.

    A value is a float (every position) or a tensor broadcastable to [B, S]. Used by the roles stage to
    measure how a neuron changes loss and next-token entropy.
    """
    input_ids = _check_input_ids(lm, input_ids)
    if attention_mask is not None:
        attention_mask = attention_mask.to(lm.device)
    items = edits.items() if isinstance(edits, dict) else edits
    with torch.inference_mode(), ActivationCapture(lm, post=False) as cap:
        for (layer, neuron), value in items:
            cap.set_neuron(layer, neuron, value)
        logits = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits.float()

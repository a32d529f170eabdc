"""What a run correlates at each layer: MLP neurons (the default) or the latents of sparse autoencoders.

An SAE is read from sae_lens's saved format with ``json`` and ``safetensors`` alone (sae_lens is not needed):
a folder with ``cfg.json`` (``d_in``, ``d_sae``, ``architecture`` — standard, topk or jumprelu —, the hook as
``metadata.hook_name`` or ``hook_name`` in TransformerLens names, ``apply_b_dec_to_input``, ``k`` for topk)
and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec``, ``b_dec``, ``threshold`` for
jumprelu). Hook points understood on every supported architecture:

    blocks.L.hook_resid_pre    the residual stream entering block L
    blocks.L.hook_resid_post   the residual stream leaving block L (before the final norm)
    blocks.L.hook_mlp_out      block L's MLP output
    blocks.L.mlp.hook_post     block L's MLP neurons (post-activation), d_in = d_mlp

``SiteModel`` wraps a loaded model so that the run engine sees its SAEs as layers and their latents as
neurons: ``n_layers`` = SAEs, ``d_mlp`` = d_sae. Latents are computed from the hooked activations batch by
batch and streamed into the same kernels; they are never stored.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from univ.errors import UserError

__all__ = ["ARCHITECTURES", "Sae", "SaeError", "SiteModel", "hooked_activations", "is_sae_run", "load_sae",
           "parse_hook", "run_site_model", "with_saes"]

ARCHITECTURES = ("standard", "topk", "jumprelu")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_out|mlp\.hook_post)$")


class SaeError(UserError, ValueError):
    """An SAE folder that cannot be used with this model: named file and field, nothing written."""


@dataclass
class Sae:
    """One SAE: where it reads (``layer``, ``point``) and its encoder, in float32."""

    path: Path
    hook: str
    layer: int
    point: str
    architecture: str
    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    b_dec: Tensor  # [d_in]
    W_dec: Tensor  # [d_sae, d_in]: each latent's output direction
    apply_b_dec_to_input: bool
    k: int | None = None
    threshold: Tensor | None = None

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def to(self, device: torch.device) -> Sae:
        for name in ("W_enc", "b_enc", "b_dec", "W_dec", "threshold"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations [..., d_sae] of activations x [..., d_in], as sae_lens's ``SAE.encode``."""
        x = x.float()
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        top = torch.topk(pre, k=self.k, dim=-1)  # topk: the k largest pre-activations, then ReLU
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))


def _field(cfg: dict, path: Path, name: str, kind: type) -> Any:
    if name not in cfg:
        raise SaeError(f"{path}: field {name!r} missing")
    value = cfg[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise SaeError(f"{path}: field {name!r} is {value!r}, expected {kind.__name__}")
    return value


RELEASE_PREFIX = "sae_lens:"  # --sae sae_lens:RELEASE/SAE_ID loads a published SAE through sae_lens (online)


def fetch_release(spec: str) -> Path:
    """``sae_lens:RELEASE/SAE_ID`` → a folder in the univ cache holding that SAE as sae_lens saves it.

    Needs sae_lens (``pip install "univ[sae]"``) and the network the first time; later runs reuse the folder.
    """
    body = spec[len(RELEASE_PREFIX):]
    release, sep, sae_id = body.partition("/")
    if not sep or not release or not sae_id:
        raise SaeError(f"--sae {spec}: give sae_lens:RELEASE/SAE_ID, e.g. "
                       "sae_lens:gpt2-small-res-jb/blocks.8.hook_resid_pre")  # fmt: skip
    from univ.zoo import cache_dir

    folder = cache_dir() / "saes" / re.sub(r"[^A-Za-z0-9_.-]+", "_", body)
    if (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return folder
    try:
        import sae_lens
    except ImportError:
        raise SaeError(f"--sae {spec}: loading a release needs sae_lens: pip install \"univ[sae]\"") from None
    try:
        sae = sae_lens.SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # unknown release or id, no network: the library's own words, on one line
        raise SaeError(f"--sae {spec}: sae_lens could not load it ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None  # fmt: skip
    sae = sae[0] if isinstance(sae, tuple) else sae  # older sae_lens returned (sae, cfg, sparsity)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a fetch that was killed: never half of two downloads
    sae.save_model(str(tmp))
    tmp.rename(folder)  # the folder appears whole or not at all
    return folder


def load_sae(folder: str | Path) -> Sae:
    """Read an SAE folder (sae_lens's saved format); every problem is a one-line SaeError naming file and field.

    ``sae_lens:RELEASE/SAE_ID`` is fetched first (``fetch_release``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if str(folder).startswith(RELEASE_PREFIX):
        folder = fetch_release(str(folder))
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise SaeError(f"--sae {folder}: no such folder (an SAE folder holds {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise SaeError(f"{cfg_path}: missing (an SAE folder holds {CFG_FILE} and {WEIGHTS_FILE})") from None
    except ValueError as e:
        raise SaeError(f"{cfg_path}: not JSON ({e})") from None
    d_in, d_sae = _field(cfg, cfg_path, "d_in", int), _field(cfg, cfg_path, "d_sae", int)
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise SaeError(f"{cfg_path}: architecture {arch!r} is not supported; use one of {', '.join(ARCHITECTURES)}")
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if not isinstance(hook, str):
        raise SaeError(f"{cfg_path}: field 'metadata.hook_name' (or 'hook_name') missing")
    try:
        layer, point = parse_hook(hook)
    except ValueError as e:
        raise SaeError(f"{cfg_path}: hook_name: {e}") from None
    for name, plain in (("normalize_activations", "none"), ("reshape_activations", "none"),
                        ("rescale_acts_by_decoder_norm", False)):  # fmt: skip
        if cfg.get(name, plain) not in (plain, None):
            raise SaeError(f"{cfg_path}: {name} {cfg[name]!r} is not supported (univ encodes the raw hooked "
                           f"activations; {name} must be {plain!r})")  # fmt: skip
    k = None
    if arch == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int) or not 0 < k <= d_sae:
            raise SaeError(f"{cfg_path}: a topk SAE needs field 'k' in 1..d_sae ({d_sae}); got {k!r}")
    try:
        w = load_file(weights_path)
    except FileNotFoundError:
        raise SaeError(f"{weights_path}: missing (an SAE folder holds {CFG_FILE} and {WEIGHTS_FILE})") from None
    except (SafetensorError, OSError) as e:
        raise SaeError(f"{weights_path}: not a readable safetensors file ({e})") from None
    need = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        need["threshold"] = (d_sae,)
    for name, shape in need.items():
        if name not in w:
            raise SaeError(f"{weights_path}: tensor {name!r} missing")
        if tuple(w[name].shape) != shape:
            raise SaeError(f"{weights_path}: {name} has shape {tuple(w[name].shape)}; cfg.json's d_in {d_in} and "
                           f"d_sae {d_sae} need {shape}")  # fmt: skip
    return Sae(path=folder, hook=hook, layer=layer, point=point, architecture=arch,
               W_enc=w["W_enc"].float(), b_enc=w["b_enc"].float(), b_dec=w["b_dec"].float(),
               W_dec=w["W_dec"].float(), apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), k=k,
               threshold=w["threshold"].float() if "threshold" in w else None)  # fmt: skip


class SiteModel:
    """A loaded model seen through its SAEs: the run engine's layers are the SAEs, its neurons their latents.

    Everything else (name, tokenizer, weights, device) is the wrapped model's.
    """

    def __init__(self, lm: Any, saes: list[Sae]) -> None:
        if not saes:
            raise SaeError(f"{lm.name}: no SAE given")
        widths = {s.d_sae for s in saes}
        if len(widths) > 1:
            raise SaeError(f"{lm.name}: its SAEs have d_sae {sorted(widths)}; several SAEs of one model must share "
                           "d_sae (run one width at a time)")  # fmt: skip
        for s in saes:
            if s.layer >= lm.n_layers:
                raise SaeError(f"{s.path / CFG_FILE}: hook_name {s.hook!r} names layer {s.layer}, but {lm.name} has "
                               f"{lm.n_layers} layers (0..{lm.n_layers - 1})")  # fmt: skip
            width = lm.d_mlp if s.point == "mlp.hook_post" else lm.d_model
            if s.d_in != width:
                raise SaeError(f"{s.path / CFG_FILE}: d_in {s.d_in} does not match {lm.name}'s {s.hook} width "
                               f"{width}")  # fmt: skip
        self.lm = lm
        self.saes = [s.to(lm.device) for s in saes]
        self.n_layers = len(saes)
        self.d_mlp = saes[0].d_sae
        self.site_names = [s.hook for s in saes]

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp

    def __getattr__(self, name: str) -> Any:  # name, tokenizer, model, meta, device, dtype, d_model, ...
        return getattr(self.__dict__["lm"], name)

    def latents(self, input_ids: Tensor, keep: Tensor | None = None) -> Tensor:
        """Every SAE's latents for a batch: [T, n_saes, d_sae] float32 at the kept positions ([B, S] without keep)."""
        acts = hooked_activations(self.lm, [(s.layer, s.point) for s in self.saes], input_ids, keep)
        return torch.stack([s.encode(x) for s, x in zip(self.saes, acts, strict=True)], dim=-2)


def parse_hook(hook: str) -> tuple[int, str]:
    """``blocks.L.<point>`` → (L, point); ValueError for a hook univ does not read."""
    match = HOOK.match(hook)
    if match is None:
        raise ValueError(f"hook {hook!r} is not one univ reads; use blocks.L.hook_resid_pre, blocks.L.hook_resid_post, "
                         "blocks.L.hook_mlp_out or blocks.L.mlp.hook_post")  # fmt: skip
    return int(match.group(1)), match.group(2)


def hooked_activations(lm: Any, points: list[tuple[int, str]], input_ids: Tensor,
                       keep: Tensor | None = None) -> list[Tensor]:  # fmt: skip
    """One forward of the base model; the activation at each (layer, point), [T, width] at the kept positions."""
    from univ.models import _check_input_ids, _module

    input_ids = _check_input_ids(lm, input_ids)
    captured: dict[int, Tensor] = {}
    handles = []

    def store(i: int, x: Tensor) -> None:
        x = x[0] if isinstance(x, tuple) else x
        captured[i] = x[keep.to(x.device)] if keep is not None else x

    try:
        for i, (layer, point) in enumerate(points):
            block = lm.layer(layer)
            if point == "hook_resid_pre":
                handles.append(block.register_forward_pre_hook(
                    lambda mod, args, kwargs, i=i: store(i, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))  # fmt: skip
            elif point == "hook_resid_post":
                handles.append(block.register_forward_hook(lambda mod, args, out, i=i: store(i, out)))
            elif point == "hook_mlp_out":
                handles.append(_module(block, lm.adapter.mlp_out).register_forward_hook(
                    lambda mod, args, out, i=i: store(i, out)))  # fmt: skip
            else:  # mlp.hook_post: what enters the output projection
                handles.append(_module(block, lm.adapter.mlp_out).register_forward_pre_hook(
                    lambda mod, args, i=i: store(i, args[0])))  # fmt: skip
        with torch.inference_mode():
            lm.base_model(input_ids=input_ids, use_cache=False)
        return [captured[i] for i in range(len(points))]
    finally:
        for h in handles:
            h.remove()


def with_saes(models: list, sae_specs: tuple[str, ...]) -> list[SiteModel]:
    """Wrap each model with its SAEs: ``sae_specs[i]`` is model i's SAE folders, comma-separated (one per model:
    ``CorrelateConfig`` checks the count)."""
    return [SiteModel(lm, [load_sae(p) for p in spec.split(",") if p]) for lm, spec in zip(models, sae_specs,
                                                                                          strict=True)]  # fmt: skip


def is_sae_run(manifest: dict) -> bool:
    """Did this correlate run (its run.json) correlate SAE latents rather than MLP neurons?"""
    return (manifest.get("sites") or {}).get("kind") == "sae"


def run_site_model(lm: Any, manifest: dict, index: int) -> SiteModel:
    """Model ``index`` of an SAE run seen through the SAEs run.json recorded for it."""
    return SiteModel(lm, [load_sae(p) for p in manifest["sites"]["models"][index]["saes"]])


def sae_files(spec: str) -> list[Path]:
    """The files whose content defines model i's SAEs (for the run's fingerprint; a missing one is load_sae's
    to report)."""
    files = [(fetch_release(p) if p.startswith(RELEASE_PREFIX) else Path(p)) / name
             for p in spec.split(",") if p for name in (CFG_FILE, WEIGHTS_FILE)]
    return [f for f in files if f.is_file()]

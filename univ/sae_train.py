"""``univ sae train``: a small TopK sparse autoencoder on one hook of a model, saved in sae_lens's format.

    univ sae train univ/assets/zoo/seed-0 --hook blocks.0.hook_resid_post --out runs/sae/seed-0
    univ correlate SEED0 SEED1 --sae runs/sae/seed-0 --sae runs/sae/seed-1 ...   # universal latents

Plain PyTorch, deterministic for a seed: activations at the hook are streamed from the shipped corpus's train
split (the held-out plays stay unseen), a TopK SAE (latents = the k largest of ReLU(W_encᵀ(x − b_dec) + b_enc),
the decoder rows kept at unit norm, b_dec started at the mean activation) is trained with Adam on the
reconstruction MSE, and the folder holds ``cfg.json`` + ``sae_weights.safetensors`` as sae_lens writes them
(``SAE.load_from_disk`` reads it; so does ``univ.sites.load_sae``). The fraction of variance explained on
held-out tokens and the share of dead latents go to ``univ_sae.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["SaeTrainConfig", "train_sae"]


@dataclass(frozen=True)
class SaeTrainConfig:
    hook: str = "blocks.1.hook_resid_post"
    d_sae: int = 1024
    k: int = 16
    tokens: int = 1_200_000  # training tokens (the zoo's train split has ~1.4 M)
    batch_tokens: int = 2048
    lr: float = 1e-3
    ctx: int = 128
    seed: int = 0
    eval_tokens: int = 32_768  # held-out tokens for the explained variance


def _activations(lm, hook: str, split: str, tokens: int, ctx: int, seed: int):
    """Batches [T, d_in] of the hook's activations over a corpus split (BOS-first windows, positions kept)."""
    from univ import corpus
    from univ.data import token_batches
    from univ.sites import hooked_activations, parse_hook

    layer, point = parse_hook(hook)
    with tempfile.TemporaryDirectory() as tmp:
        data = corpus.write_corpus_files(tmp, split)
        for batch in token_batches(str(data), lm.tokenizer, ctx=ctx, batch_size=max(1, 4096 // ctx), seed=seed,
                                   max_tokens=tokens, excluded=set()):  # fmt: skip
            yield hooked_activations(lm, [(layer, point)], batch.input_ids, batch.keep)[0].float()


def train_sae(model: str, out: str | Path, config: SaeTrainConfig | None = None, *, progress: bool = True) -> Path:
    """Train a TopK SAE on ``model``'s ``config.hook``; write the sae_lens folder ``out``; returns it."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from univ.models import load_model
    from univ.sites import parse_hook

    cfg = config or SaeTrainConfig()
    layer, point = parse_hook(cfg.hook)
    lm = load_model(model, device="cpu", dtype="float32")
    d_in = lm.d_mlp if point == "mlp.hook_post" else lm.d_model
    g = torch.Generator().manual_seed(cfg.seed)
    w_dec = torch.randn(cfg.d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": torch.nn.Parameter(w_dec.T.clone()), "b_enc": torch.nn.Parameter(torch.zeros(cfg.d_sae)),
              "W_dec": torch.nn.Parameter(w_dec), "b_dec": torch.nn.Parameter(torch.zeros(d_in))}  # fmt: skip
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    t0 = time.perf_counter()
    buffer = torch.empty(0, d_in)
    started = False
    bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, disable=not progress, desc=f"SAE {cfg.hook}")
    perm_gen = torch.Generator().manual_seed(cfg.seed + 1)
    steps = 0
    for acts in _activations(lm, cfg.hook, "train", cfg.tokens, cfg.ctx, cfg.seed):
        buffer = torch.cat([buffer, acts])
        bar.update(acts.shape[0])
        if not started:
            with torch.no_grad():
                params["b_dec"].copy_(buffer.mean(0))  # the geometric-median start, approximated by the mean
            started = True
        while buffer.shape[0] >= cfg.batch_tokens:
            x, buffer = buffer[: cfg.batch_tokens], buffer[cfg.batch_tokens :]
            x = x[torch.randperm(x.shape[0], generator=perm_gen)]
            recon = _decode(params, _encode(params, x, cfg.k))
            loss = (recon - x).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # unit-norm decoder rows, as sae_lens's TopK trainer keeps them
                params["W_dec"].div_(params["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-8))
            steps += 1
            if steps % 10 == 0:
                bar.set_postfix(mse=f"{float(loss.detach()):.3f}", refresh=False)
    bar.close()
    fve, dead = _evaluate(lm, params, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in params.items()}
    save_file(weights, out / "sae_weights.safetensors")
    sae_cfg = {"d_in": d_in, "d_sae": cfg.d_sae, "architecture": "topk", "k": cfg.k, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
               "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
               "metadata": {"hook_name": cfg.hook, "model_name": str(model), "context_size": cfg.ctx,
                            "prepend_bos": True, "trained_by": "univ sae train"}}  # fmt: skip
    (out / "cfg.json").write_text(json.dumps(sae_cfg, indent=2) + "\n")
    stats = {"model": str(model), "config": asdict(cfg), "steps": steps, "train_s": round(time.perf_counter() - t0, 1),
             "heldout_fraction_variance_explained": round(fve, 4), "dead_latent_share": round(dead, 4)}  # fmt: skip
    (out / "univ_sae.json").write_text(json.dumps(stats, indent=2) + "\n")
    return out


def _encode(p: dict, x: torch.Tensor, k: int) -> torch.Tensor:
    """The TopK encoder univ.sites.Sae applies when the run reads the saved SAE: trained as it will be used."""
    from univ.sites import Sae

    sae = Sae(path=Path("."), hook="", layer=0, point="", architecture="topk", W_enc=p["W_enc"], b_enc=p["b_enc"],
              b_dec=p["b_dec"], W_dec=p["W_dec"], apply_b_dec_to_input=True, k=k)  # fmt: skip
    return sae.encode(x)


def _decode(p: dict, z: torch.Tensor) -> torch.Tensor:
    return z @ p["W_dec"] + p["b_dec"]


@torch.no_grad()
def _evaluate(lm, p: dict, cfg: SaeTrainConfig) -> tuple[float, float]:
    """Fraction of variance explained on held-out tokens, and the share of latents that never fired there."""
    err = total = 0.0
    fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
    for x in _activations(lm, cfg.hook, "heldout", cfg.eval_tokens, cfg.ctx, cfg.seed):
        z = _encode(p, x, cfg.k)
        err += float((_decode(p, z) - x).pow(2).sum())
        total += float((x - x.mean(0)).pow(2).sum())
        fired |= (z > 0).any(0)
    return 1.0 - err / max(total, 1e-30), float((~fired).float().mean())


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = SaeTrainConfig(hook=args.hook, d_sae=args.d_sae, k=args.k, tokens=args.tokens, seed=args.seed)
    out = train_sae(args.model, args.out, cfg, progress=not args.quiet)
    stats = json.loads((out / "univ_sae.json").read_text())
    print(f"wrote {out}: {stats['steps']} steps in {stats['train_s']:.0f} s, held-out variance explained "
          f"{stats['heldout_fraction_variance_explained']:.3f}, dead latents {100 * stats['dead_latent_share']:.1f} %")
    return 0


def register(subparsers) -> None:
    d = SaeTrainConfig()
    sae = subparsers.add_parser(
        "sae", help="train a small TopK SAE on a model's hook (sae_lens format)", description=__doc__,
        epilog="examples:\n  univ sae train univ/assets/zoo/seed-0 --out runs/sae/seed-0\n"
               "  univ sae train MODEL --hook blocks.3.hook_mlp_out --d-sae 4096 --k 32 --out runs/sae/mlp3",
        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = sae.add_subparsers(dest="sae_command", metavar="SAE_COMMAND")
    sae.set_defaults(func=lambda args: sae.print_help() or 0)
    t = sub.add_parser("train", help="train one SAE into OUT", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a TopK SAE on MODEL's --hook over the shipped corpus's train split and "
                                   "write OUT\n(cfg.json, sae_weights.safetensors, univ_sae.json).",
                       epilog="example:\n  univ sae train univ/assets/zoo/seed-0 --out runs/sae/seed-0")  # fmt: skip
    t.add_argument("model", help="hub name or folder of the model")
    t.add_argument("--out", required=True, help="the SAE folder to write")
    t.add_argument("--hook", default=d.hook, help=f"TransformerLens hook name (default {d.hook})")
    t.add_argument("--d-sae", type=int, default=d.d_sae, help=f"latents (default {d.d_sae})")
    t.add_argument("--k", type=int, default=d.k, help=f"active latents per token (default {d.k})")
    t.add_argument("--tokens", type=int, default=d.tokens, help=f"training tokens (default {d.tokens})")
    t.add_argument("--seed", type=int, default=d.seed, help="initialisation and data order (default 0)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="univ")
    register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))


def pack_zoo_saes(sae_dirs: list[Path], zoo_dir: Path, dst: Path, command: str) -> Path:
    """Copy one SAE per zoo seed into ``dst`` (``univ/assets/zoo-sae``) with a manifest tying each to its seed's
    weights (sha256), so ``univ.zoo.shipped_saes`` only ever pairs an SAE with the model it was trained on."""
    import shutil

    from univ.zoo import MANIFEST, read_manifest

    models = read_manifest(zoo_dir)["models"]
    if len(sae_dirs) != len(models):
        raise ValueError(f"{len(sae_dirs)} SAEs for {len(models)} seeds")
    dst.mkdir(parents=True, exist_ok=True)
    entries = []
    for m, src in zip(models, sae_dirs, strict=True):
        shutil.copytree(src, dst / m["path"], dirs_exist_ok=True)
        stats = json.loads((src / "univ_sae.json").read_text())
        entries.append({"seed": m["seed"], "path": m["path"], "model_sha256": m["sha256"]["model.safetensors"],
                        "heldout_fraction_variance_explained": stats["heldout_fraction_variance_explained"],
                        "dead_latent_share": stats["dead_latent_share"], "train_s": stats["train_s"]})  # fmt: skip
    manifest = {"format": "univ-zoo-sae/1", "zoo": str(zoo_dir.name), "config": stats["config"], "models": entries,
                "command": command}  # fmt: skip
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return dst

"""What defines a run's result, by content: options, each model's files, the tokenizer, the data.

``fingerprint(cfg, models, data_files)`` is recorded in every checkpoint and in run.json; a resume compares
the checkpoint's with the current one (``differences``) and refuses on any difference, naming it. Paths are
resolved first, so ``runs/zoo/seed-0``, ``./runs/zoo/seed-0/`` and its absolute path are the same model,
while new weights (or edited data) behind an unchanged path are not. File hashes come from
``univ.run.hashes``: computed once, then reused while a file's size, times and inode are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

from univ.run.config import CorrelateConfig
from univ.run.hashes import file_sha256, sha256_many

__all__ = ["file_sha256", "fingerprint", "model_fingerprint", "data_fingerprint", "differences", "new_run_id"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def new_run_id() -> str:
    return uuid.uuid4().hex


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary (special tokens included) and the BOS/EOS/pad ids: what fixes the token ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def model_fingerprint(lm) -> dict:
    """Local folder: resolved path + sha256 of config and weight files. Hub: repo + commit. Both: tokenizer."""
    meta = lm.meta or {}
    source = Path(str(meta.get("source", lm.name))).expanduser()
    fp: dict = {"tokenizer": tokenizer_hash(lm.tokenizer)}
    if meta.get("commit") is None and source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and (
            p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json")))
        fp.update(path=str(source.resolve()), files={p.name: h for p, h in sha256_many(files).items()})
    else:
        fp.update(hub=str(meta.get("source", lm.name)), revision=meta.get("revision"), commit=meta.get("commit"))
    return fp


def data_fingerprint(cfg: CorrelateConfig, data_files: list[Path] | None) -> dict:
    """Local data: every file (resolved path, size, sha256). A Hub dataset: its name and split."""
    if data_files is None:
        return {"hub": cfg.data, "split": cfg.split}
    hashes = sha256_many(data_files)
    return {"files": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": hashes[p]}
                      for p in data_files]}


def options_fingerprint(cfg: CorrelateConfig) -> dict:
    """The options that change the result (models and data are fingerprinted by content instead)."""
    return {k: v for k, v in cfg.fingerprint().items() if k not in ("models", "data")}


def sae_fingerprint(cfg: CorrelateConfig) -> list[dict] | None:
    """Each model's SAE files (resolved path, sha256): new SAE weights at the same path are another run."""
    if cfg.sae is None:
        return None
    from univ.sites import sae_files

    return [{str(p.resolve()): h for p, h in sha256_many(sae_files(spec)).items()} for spec in cfg.sae]


def fingerprint(cfg: CorrelateConfig, models, data_files: list[Path] | None) -> dict:
    fp = {"options": json.loads(json.dumps(options_fingerprint(cfg))),
          "models": [model_fingerprint(lm) for lm in models],
          "data": data_fingerprint(cfg, data_files)}
    saes = sae_fingerprint(cfg)
    if saes is not None:
        fp["saes"] = saes
    return fp


def differences(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty: the same run)."""
    out = []
    from univ.run.config import LAYOUT_OPTIONS

    so, no = ({k: v for k, v in d.get("options", {}).items() if k not in LAYOUT_OPTIONS} for d in (saved, now))
    out += [f"option {k}: {so.get(k)!r} then, {no.get(k)!r} now" for k in sorted(so.keys() | no.keys())
            if so.get(k) != no.get(k)]
    sm, nm = saved.get("models", []), now.get("models", [])
    if len(sm) != len(nm):
        out.append(f"{len(sm)} models then, {len(nm)} now")
    for i, (a, b) in enumerate(zip(sm, nm, strict=False)):
        for key in ("path", "hub", "revision", "commit"):
            if a.get(key) != b.get(key):
                out.append(f"model {i}: {key} {a.get(key)!r} then, {b.get(key)!r} now")
        fa, fb = a.get("files", {}), b.get("files", {})
        changed = sorted(n for n in fa.keys() | fb.keys() if fa.get(n) != fb.get(n))
        if changed and a.get("path") == b.get("path"):
            out.append(f"model {i} ({a.get('path')}): file{'s' if len(changed) > 1 else ''} "
                       f"{', '.join(changed)} changed (new weights at the same path)")
        if a.get("tokenizer") != b.get("tokenizer"):
            out.append(f"model {i}: tokenizer changed")
    for i, (a, b) in enumerate(zip(saved.get("saes") or [], now.get("saes") or [], strict=False)):
        changed = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
        if changed:
            out.append(f"model {i}: SAE file{'s' if len(changed) > 1 else ''} {', '.join(changed)} changed")
    sd, nd = saved.get("data", {}), now.get("data", {})
    if sd.get("hub") != nd.get("hub") or sd.get("split") != nd.get("split"):
        out.append(f"data: {sd.get('hub') or 'local files'} then, {nd.get('hub') or 'local files'} now")
    sf = {f["path"]: f for f in sd.get("files", [])}
    nf = {f["path"]: f for f in nd.get("files", [])}
    for p in sorted(sf.keys() - nf.keys()):
        out.append(f"data: file {p} no longer read")
    for p in sorted(nf.keys() - sf.keys()):
        out.append(f"data: file {p} is new")
    for p in sorted(sf.keys() & nf.keys()):
        if sf[p]["sha256"] != nf[p]["sha256"]:
            out.append(f"data: file {p} changed ({sf[p]['bytes']:,} bytes then, {nf[p]['bytes']:,} now)")
    return out

"""A toy seed zoo: tiny GPT-2 models that differ only in their seed, trained on the embedded corpus.

The paper compares GPT-2 models trained from different seeds; none small enough for a laptop exists on the
registries we can reach, so univ trains its own: same data, same tokenizer, same config, and the seed sets
both the initialisation and the order of the batches. One zoo (3 seeds, the defaults below) ships in
``univ/assets/zoo/`` in fp16; each seed is a ``save_pretrained`` folder, so it loads exactly like a hub model
(``AutoModelForCausalLM.from_pretrained(path)``, ``AutoTokenizer.from_pretrained(path)``).

    univ zoo train --out runs/zoo --seeds 0 1 2 --fp16   # ~11 min per seed on 2 CPU cores
    univ zoo train --out runs/ckpt --save-every 500      # + runs/ckpt/seed-0/step-000500/, ... checkpoints
    univ zoo info                                        # the shipped zoo's manifest

With ``save_every`` each seed folder also holds training checkpoints ``step-NNNNNN/`` (every N steps and the
last step; each a ``save_pretrained`` folder with the tokenizer), loadable as ``runs/ckpt/seed-0@step-000500``
and swept by ``univ sweep runs/ckpt`` (universality over training). Saving them does not change training.

Training is deterministic for a seed on a given machine and thread count: ``torch.manual_seed``, a seeded
generator for the batch order, deterministic algorithms, a fixed number of threads. Every training window
starts with ``<|endoftext|>`` (BOS), as the correlate run feeds text, so position 0 is in distribution.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from univ import corpus

MANIFEST = "manifest.json"
SEED_STATS = "univ_train.json"  # per-seed numbers, gathered into the zoo manifest
# Measured on this project's 2-core CPU box with the default config: seconds per step per 1e6 parameters
# per 1e3 tokens; only used to say how long a rebuild will take.
SECONDS_PER_MPARAM_KTOKEN = 0.045


@dataclass(frozen=True)
class ZooConfig:
    """Everything that defines a zoo except its seeds. The defaults are the shipped zoo."""

    # model: GPT2Config names
    n_layer: int = 2
    n_embd: int = 256  # d_model; 256 rather than 128 halves the random baseline (toy-zoo trial: ~0.27 -> ~0.19)
    n_inner: int = 1024  # MLP width: 2 x 1024 = 2048 neurons per model
    n_head: int = 4
    n_ctx: int = 128  # n_positions, and the length of every training window (BOS + 127 tokens)
    vocab_size: int = corpus.DEFAULT_VOCAB_SIZE
    # optimisation: AdamW, linear warmup then cosine decay to min_lr_ratio * lr
    steps: int = 3000
    batch_size: int = 16  # 16 x 128 = 2048 tokens a step, as the 32 x 64 of the first toy-zoo trial
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices and embeddings only, not on biases or LayerNorms
    grad_clip: float = 1.0
    # data
    corpus_chars: int | None = None  # train on a prefix of the train split (micro zoos for tests)
    val_tokens: int = 131_072  # held-out tokens for the validation loss (the held-out split has ~185 k)
    # runtime
    threads: int = 2
    fp16: bool = False  # save weights in fp16 (half the size; what ships)
    save_every: int | None = None  # also save seed-S/step-NNNNNN/ every N steps (training checkpoints)


# --- where zoos live ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where rebuilt zoos are cached: ``$UNIV_CACHE`` or ``~/.cache/univ``."""
    return Path(os.environ.get("UNIV_CACHE") or Path.home() / ".cache" / "univ")


@dataclass(frozen=True)
class NamedZoo:
    """A zoo that ships in ``univ/assets/<folder>``, with the config and seeds that rebuild it if it is absent."""

    folder: str
    config: ZooConfig
    seeds: tuple[int, ...]
    about: str
    demo_mode: str = "reference"  # how `univ demo --zoo NAME` correlates: seed 0 against the others, or all pairs


ZOOS = {
    "default": NamedZoo("zoo", replace(ZooConfig(), fp16=True), (0, 1, 2),
                        "3 seeds of a 2-layer GPT-2 (d_model 256, 2 x 1024 neurons): the quick demo"),
    "depth": NamedZoo("zoo-depth", replace(ZooConfig(), n_layer=6, n_embd=128, n_inner=512, steps=2000, fp16=True),
                      (0, 1, 2, 3, 4), "5 seeds of a 6-layer GPT-2 (d_model 128, 6 x 512 neurons): depth results",
                      demo_mode="all-pairs"),  # every seed analysed: the spread across seeds per layer
}  # fmt: skip


def shipped_zoo_dir(name: str = "default") -> Path | None:
    """The named zoo packaged in ``univ/assets/`` if this install has it (it has a manifest), else None."""
    path = corpus.DATA_DIR / ZOOS[name].folder
    return path if (path / MANIFEST).exists() else None


SAE_DIR = "zoo-sae"  # univ/assets/zoo-sae: one TopK SAE per seed of the default zoo (univ sae train)


def shipped_saes(zoo_dir: str | Path | None) -> list[Path] | None:
    """The shipped SAE folders of ``zoo_dir``'s seeds, in manifest order, when they were trained on exactly these
    weights (their manifest records each model's sha256); None otherwise."""
    root = corpus.DATA_DIR / SAE_DIR
    if zoo_dir is None:
        return None
    try:
        saes = json.loads((root / MANIFEST).read_text())
        models = read_manifest(zoo_dir)["models"]
    except (OSError, ValueError):
        return None
    by_weights = {m["model_sha256"]: root / m["path"] for m in saes.get("models", [])}
    found = [by_weights.get(m["sha256"].get("model.safetensors")) for m in models]
    return found if all(f is not None and (f / "cfg.json").is_file() for f in found) else None


def resolve_zoo(spec: str | Path | None = None) -> Path:
    """A zoo folder from a shipped zoo's name (``default``, ``depth``; None = default) or a path to a zoo folder.

    A named zoo this install lacks is rebuilt into the cache (``ensure_zoo``), as the default one always was.
    """
    from univ.errors import UserError

    name = "default" if spec is None else str(spec)
    if name in ZOOS:
        z = ZOOS[name]
        return ensure_zoo(z.seeds, z.config, name=name)
    path = Path(name)
    if not (path / MANIFEST).is_file():
        what = "no folder" if not path.exists() else f"a folder without {MANIFEST}"
        raise UserError(f"--zoo {name}: {what}; give a shipped zoo ({', '.join(ZOOS)}) or a folder written by "
                        "'univ zoo train --out DIR'")  # fmt: skip
    return path


def read_manifest(zoo_dir: str | Path) -> dict:
    """The zoo's ``manifest.json`` as a dict."""
    path = Path(zoo_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train a zoo with 'univ zoo train --out {zoo_dir}'")
    return json.loads(path.read_text())


def seed_dirs(zoo_dir: str | Path) -> list[Path]:
    """The model folders of a zoo, in manifest order."""
    return [Path(zoo_dir) / m["path"] for m in read_manifest(zoo_dir)["models"]]


# fp16 and threads change the bytes, not the zoo a caller asks for; checkpoints add folders, not other weights
_NOT_IDENTITY = ("fp16", "threads", "save_every")


def _config_key(config: ZooConfig, seeds: tuple[int, ...]) -> str:
    identity = {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}
    blob = json.dumps({"config": identity, "seeds": sorted(seeds)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _zoo_matches(zoo_dir: Path, config: ZooConfig, seeds: tuple[int, ...]) -> bool:
    try:
        manifest = read_manifest(zoo_dir)
    except FileNotFoundError:
        return False
    same = all(manifest["config"].get(k) == v for k, v in asdict(config).items() if k not in _NOT_IDENTITY)
    return same and set(seeds) <= set(manifest["seeds"])


def estimate_minutes(config: ZooConfig, n_seeds: int) -> float:
    """Rough wall time of training ``n_seeds`` on a 2-core CPU, from the measured rate above."""
    n_params = _n_params(config) / 1e6
    return n_seeds * config.steps * n_params * config.batch_size * config.n_ctx / 1e3 * SECONDS_PER_MPARAM_KTOKEN / 60


def ensure_zoo(seeds: tuple[int, ...] = (0, 1, 2), config: ZooConfig | None = None, name: str = "default") -> Path:
    """A zoo directory with these seeds: the shipped zoo ``name``, else a cached one, else trained into the cache.

    The default config is the shipped zoo's, so a rebuild (an install without ``univ/assets/zoo``) trains the
    same models, byte for byte on the same kind of CPU.
    """
    config = config or ZOOS["default"].config
    seeds = tuple(seeds)
    shipped = shipped_zoo_dir(name)
    if shipped is not None and _zoo_matches(shipped, config, seeds):
        return shipped
    cached = cache_dir() / "zoo" / _config_key(config, seeds)
    if _zoo_matches(cached, config, seeds):
        return cached
    print(
        f"No trained zoo for this config; training {len(seeds)} seeds into {cached}, "
        f"about {estimate_minutes(config, len(seeds)):.0f} minutes on 2 CPU cores.",
        file=sys.stderr,
    )
    return train_zoo(cached, seeds, config)


# --- data -----------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """Token streams of both splits: every document as BOS + its tokens, concatenated. int64 [N]."""

    tokenizer: object
    train: torch.Tensor
    heldout: torch.Tensor
    bos: int


def _stream(tokenizer, docs: list[str], max_tokens: int | None = None) -> torch.Tensor:
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: batch-parallel, no length warnings
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for enc in backend.encode_batch(docs[start : start + 256], add_special_tokens=False):
            ids.append(bos)
            ids.extend(enc.ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.int64)


def _train_docs(config: ZooConfig) -> list[str]:
    docs = corpus.corpus_split("train")
    if config.corpus_chars is None:
        return docs
    out, total = [], 0
    for doc in docs:
        if total >= config.corpus_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def _tokenizer(config: ZooConfig):
    if config.corpus_chars is None:
        return corpus.load_tokenizer(config.vocab_size)
    return corpus.train_tokenizer(_train_docs(config), config.vocab_size)


def _load_data(config: ZooConfig) -> _Data:
    tok = _tokenizer(config)
    if len(tok) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens, config asks for {config.vocab_size}")
    # val windows hold n_ctx - 1 text tokens each; stop tokenizing once there are enough
    val_max = config.val_tokens * config.n_ctx // (config.n_ctx - 1) + config.n_ctx
    heldout = _stream(tok, corpus.corpus_split("heldout"), val_max)
    return _Data(tok, _stream(tok, _train_docs(config)), heldout, tok.bos_token_id)


def _batch(stream: torch.Tensor, bos: int, batch_size: int, n_ctx: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of the stream, each behind a BOS. [B, n_ctx]"""
    starts = torch.randint(0, stream.numel() - n_ctx + 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(n_ctx - 1)  # [B, n_ctx - 1]
    return torch.cat([torch.full((batch_size, 1), bos), stream[idx]], dim=1)


def _val_windows(stream: torch.Tensor, bos: int, n_ctx: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping held-out windows of n_ctx - 1 tokens, each behind a BOS. [W, n_ctx]"""
    n = min(stream.numel(), max_tokens) // (n_ctx - 1)
    body = stream[: n * (n_ctx - 1)].view(n, n_ctx - 1)
    return torch.cat([torch.full((n, 1), bos), body], dim=1)


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats) of the empirical token distribution: the loss of a model that knows only frequencies."""
    p = torch.bincount(tokens.flatten()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


# --- model and training ---------------------------------------------------------------------------------


def _gpt2_config(config: ZooConfig, bos: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_ctx,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.n_inner,
        activation_function="gelu_new",
        resid_pdrop=0.0,  # no dropout: ~4 epochs over 1.4 M tokens; the manifest's held-out loss tells if it overfits
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos,
        eos_token_id=bos,  # no pad_token_id, as GPT-2: inputs are never padded here
    )


def _n_params(config: ZooConfig) -> int:
    """Parameter count (the tied embedding once), from a model built on the meta device: no memory, no time."""
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        return sum(p.numel() for p in GPT2LMHeadModel(_gpt2_config(config, 0)).parameters())


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # decay matrices only (GPT-2 practice): Conv1D weights and the tied embedding; not biases or LayerNorms
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _lr_at(step: int, config: ZooConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


@contextmanager
def _deterministic(threads: int):
    """Fixed thread count and deterministic kernels for the block; the previous settings come back after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)  # CPU reductions split by thread: the count changes the bits
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


@torch.no_grad()
def _val_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 64) -> float:
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        x = windows[start : start + batch_size]
        logits = model(input_ids=x).logits.float()  # [B, n_ctx, V]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += x[:, 1:].numel()
    return total / max(1, count)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint after ``step`` optimizer steps: ``step-000500``."""
    return f"step-{step:06d}"


def _save_checkpoint(model: torch.nn.Module, seed_dir: Path, step: int, config: ZooConfig, tokenizer) -> str:
    """Save the weights after ``step`` steps as ``seed_dir/step-NNNNNN`` (in fp16 if the zoo is), with tokenizer."""
    import copy

    path = seed_dir / checkpoint_name(step)
    saved = copy.deepcopy(model).to(torch.float16) if config.fp16 else model  # the trained model stays fp32
    saved.save_pretrained(path)  # reads parameters only: no RNG drawn, training goes on unchanged
    tokenizer.model_max_length = config.n_ctx
    tokenizer.save_pretrained(path)
    return path.name


def _train_one(out_dir: Path, seed: int, config: ZooConfig, data: _Data, progress: bool = True) -> Path:
    from transformers import GPT2LMHeadModel

    seed_dir = out_dir / f"seed-{seed}"
    checkpoints: list[str] = []
    curve: list[list[float]] = []  # [step, held-out loss] at each checkpoint: has the loss flattened?
    windows = _val_windows(data.heldout, data.bos, config.n_ctx, config.val_tokens)
    t0 = time.perf_counter()
    with _deterministic(config.threads):
        torch.manual_seed(seed)  # initialisation
        model = GPT2LMHeadModel(_gpt2_config(config, data.bos))
        model.train()
        gen = torch.Generator().manual_seed(seed)  # batch order
        opt = torch.optim.AdamW(
            _param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=False
        )
        bar = tqdm(range(config.steps), desc=f"seed {seed}", disable=not progress, mininterval=2.0)
        ema = None
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, config)
            x = _batch(data.train, data.bos, config.batch_size, config.n_ctx, gen)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            value = float(loss.detach())  # sync point, once a step (cheap next to the step on CPU)
            ema = value if ema is None else 0.98 * ema + 0.02 * value
            if step % 10 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{ema:.3f}", lr=f"{_lr_at(step, config):.1e}", refresh=False)
            done = step + 1
            if config.save_every and (done % config.save_every == 0 or done == config.steps):
                checkpoints.append(_save_checkpoint(model, seed_dir, done, config, data.tokenizer))
                curve.append([done, round(_val_loss_now(model, windows), 5)])
        bar.close()
        train_s = time.perf_counter() - t0

        model.eval()
        if config.fp16:
            model = model.to(torch.float16)
        model.save_pretrained(seed_dir)  # safetensors
        # the val loss is of the weights as saved (fp16 rounding included), computed in fp32
        val = _val_loss(model.float(), windows)
    data.tokenizer.model_max_length = config.n_ctx
    data.tokenizer.save_pretrained(seed_dir)
    stats = {
        "seed": seed,
        "path": seed_dir.name,
        "val_loss": round(val, 5),
        "final_train_loss_ema": round(ema, 5) if ema is not None else None,
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "sha256": {p.name: _sha256(p) for p in sorted(seed_dir.glob("*.safetensors"))},
        "checkpoints": checkpoints,
        "val_curve": curve,
        "config_key": _config_key(config, (seed,)),
    }
    (seed_dir / SEED_STATS).write_text(json.dumps(stats, indent=2) + "\n")
    return seed_dir


def _val_loss_now(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Held-out loss of the model mid-training (eval mode, then back to train: no RNG drawn)."""
    model.eval()
    try:
        return _val_loss(model, windows)
    finally:
        model.train()


def _trained_seed(out_dir: Path, seed: int, config: ZooConfig) -> dict | None:
    """The stats of a seed an interrupted ``train_zoo`` already finished with this config, else None."""
    try:
        stats = json.loads((out_dir / f"seed-{seed}" / SEED_STATS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    seed_dir = out_dir / stats["path"]
    intact = all((seed_dir / name).exists() and _sha256(seed_dir / name) == digest
                 for name, digest in stats["sha256"].items())
    return stats if stats.get("config_key") == _config_key(config, (seed,)) and intact else None


def train_seed(out_dir: str | Path, seed: int, config: ZooConfig | None = None, progress: bool = True) -> Path:
    """Train one seed into ``out_dir/seed-{seed}`` (weights, config, tokenizer, ``univ_train.json``)."""
    config = config or ZooConfig()
    return _train_one(Path(out_dir), seed, config, _load_data(config), progress)


def _versions() -> dict:
    import tokenizers
    import transformers

    from univ import __version__

    return {
        "univ": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def train_zoo(
    out_dir: str | Path,
    seeds: tuple[int, ...] | list[int] = (0, 1, 2),
    config: ZooConfig | None = None,
    command: str | None = None,
    progress: bool = True,
) -> Path:
    """Train every seed into ``out_dir`` and write ``manifest.json``; returns ``out_dir``.

    The manifest holds the config, seeds, steps and tokens seen, each seed's held-out loss against the
    held-out unigram entropy, wall times, the sha256 of every weights file, the command and versions.
    """
    config = config or ZooConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = _load_data(config)
    models = []
    for seed in seeds:  # a seed finished by an interrupted earlier call is kept, not trained again
        stats = _trained_seed(out_dir, seed, config)
        if stats is None:
            stats = json.loads((_train_one(out_dir, seed, config, data, progress) / SEED_STATS).read_text())
        models.append(stats)
    windows = _val_windows(data.heldout, data.bos, config.n_ctx, config.val_tokens)
    tok_file = out_dir / models[0]["path"] / "tokenizer.json" if models else None
    manifest = {
        "format": "univ-zoo/1",
        "config": asdict(config),
        "seeds": list(seeds),
        "steps": config.steps,
        "tokens_per_step": config.batch_size * config.n_ctx,
        "tokens_seen": config.steps * config.batch_size * config.n_ctx,
        "n_params": _n_params(config),
        "neurons_per_model": config.n_layer * config.n_inner,
        "corpus": {
            "file": corpus.CORPUS_FILE.name,
            "sha256": corpus.corpus_sha256(),
            "heldout_works": list(corpus.HELDOUT_WORKS),
            "train_tokens": int(data.train.numel()),
            "val_tokens": int(windows[:, 1:].numel()),
        },
        "tokenizer": {"vocab_size": len(data.tokenizer), "sha256": _sha256(tok_file) if tok_file else None},
        "heldout_unigram_entropy": round(unigram_entropy(windows[:, 1:]), 5),
        "models": models,
        "wall_s": round(time.perf_counter() - t0, 1),
        "threads": config.threads,
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": _versions(),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def pack_zoo(src: str | Path, dst: str | Path) -> Path:
    """Copy a trained zoo without its training checkpoints (what ships): seed folders' files and the manifest.

    The copy is checked against the manifest's sha256 of every weights file; ``dst`` must not exist yet.
    """
    src, dst = Path(src), Path(dst)
    manifest = read_manifest(src)
    if dst.exists():
        from univ.errors import UserError

        raise UserError(f"{dst} exists; pack into a new folder")
    tmp = dst.with_name(dst.name + ".packing")
    shutil.rmtree(tmp, ignore_errors=True)
    for m in manifest["models"]:
        (tmp / m["path"]).mkdir(parents=True)
        for f in sorted((src / m["path"]).iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / m["path"] / f.name)
        for name, digest in m["sha256"].items():
            if _sha256(tmp / m["path"] / name) != digest:
                raise OSError(f"{src / m['path'] / name} does not match its manifest sha256")
        m["checkpoints"] = []  # the step-* folders stay behind; the val_curve keeps what they showed
        stats_file = tmp / m["path"] / SEED_STATS
        if stats_file.is_file():
            seed_stats = {**json.loads(stats_file.read_text()), "checkpoints": []}
            stats_file.write_text(json.dumps(seed_stats, indent=2) + "\n")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(dst)
    return dst


# --- micro zoo for tests --------------------------------------------------------------------------------

MICRO_CONFIG = ZooConfig(
    n_layer=1,
    n_embd=32,
    n_inner=64,
    n_head=2,
    n_ctx=32,
    vocab_size=384,
    steps=20,
    batch_size=8,
    warmup_steps=5,
    corpus_chars=200_000,
    val_tokens=4096,
    threads=1,
)


def train_micro_zoo(tmp_dir: str | Path, seeds: tuple[int, ...] = (0, 1, 2)) -> list[Path]:
    """A zoo of 1-layer, 64-neuron models trained for 20 steps (seconds): for tests of the demo path."""
    zoo = train_zoo(tmp_dir, seeds, MICRO_CONFIG, command="univ.zoo.train_micro_zoo", progress=False)
    return seed_dirs(zoo)


# --- CLI ------------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    config = replace(
        ZooConfig(),
        **{
            f.name: getattr(args, f.name)
            for f in fields(ZooConfig)
            if getattr(args, f.name, None) is not None and f.name != "fp16"
        },
        fp16=args.fp16,
    )
    seeds = tuple(args.seeds)
    out = Path(args.out) if args.out else cache_dir() / "zoo" / _config_key(config, seeds)
    print(
        f"Training {len(seeds)} seeds into {out}: about {estimate_minutes(config, len(seeds)):.0f} minutes "
        f"on 2 CPU cores.",
        file=sys.stderr,
    )
    train_zoo(out, seeds, config, command=getattr(args, "command_line", None))
    print(_summary(read_manifest(out)))
    return 0


def _summary(manifest: dict) -> str:
    c = manifest["config"]
    lines = [
        f"{len(manifest['seeds'])} seeds, {c['n_layer']} layers, d_model {c['n_embd']}, MLP {c['n_inner']}, "
        f"ctx {c['n_ctx']}, vocab {c['vocab_size']}; {manifest['steps']} steps, "
        f"{manifest['tokens_seen']:,} tokens seen per seed",
        f"held-out unigram entropy {manifest['heldout_unigram_entropy']:.3f} nats "
        f"over {manifest['corpus']['val_tokens']:,} tokens",
    ]
    for m in manifest["models"]:
        curve = "".join(f", {loss:.3f} at {step}" for step, loss in m.get("val_curve") or [])
        lines.append(f"  {m['path']}: val loss {m['val_loss']:.3f}{' (curve' + curve + ')' if curve else ''}, "
                     f"{m['wall_s'] / 60:.1f} min")
    lines.append(f"training: {sum(m['wall_s'] for m in manifest['models']) / 60:.0f} min in all, "
                 f"{manifest.get('threads', manifest['config'].get('threads'))} thread(s)")
    lines.append(f"command: {manifest['command']}")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    from univ.errors import UserError

    if args.zoo is None:  # every shipped zoo
        found = {name: shipped_zoo_dir(name) for name in ZOOS}
        if args.json:
            print(json.dumps({n: read_manifest(d) for n, d in found.items() if d is not None}, indent=2))
            return 0
        for name, path in found.items():
            head = f"{name}: {ZOOS[name].about}"
            print(f"{head}\n  {path}\n" + "\n".join("  " + line for line in _summary(read_manifest(path)).splitlines())
                  if path is not None else f"{head}\n  not in this install ('univ demo --zoo {name}' rebuilds it)")
            print()
        return 0
    if args.zoo in ZOOS:
        zoo = shipped_zoo_dir(args.zoo)
        if zoo is None:
            raise UserError(f"the {args.zoo} zoo is not in this install; 'univ demo --zoo {args.zoo}' rebuilds it")
    else:
        zoo = Path(args.zoo)
        if not (zoo / MANIFEST).is_file():
            raise UserError(f"{zoo}: no {MANIFEST}; give a shipped zoo ({', '.join(ZOOS)}) or a zoo folder")
    manifest = read_manifest(zoo)
    print(json.dumps(manifest, indent=2) if args.json else f"{zoo}\n{_summary(manifest)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``univ zoo train`` and ``univ zoo info``."""
    d = ZooConfig()
    zoo = subparsers.add_parser(
        "zoo", help="train or inspect the toy seed zoo (tiny GPT-2s on Shakespeare)",
        description="The seed zoo: small GPT-2s that differ only in their training seed, trained on the shipped\n"
        "Shakespeare corpus with a BPE tokenizer trained on it. 'univ demo' correlates them; 'zoo train'\n"
        "rebuilds it (or trains another), 'zoo info' prints what a zoo holds.",
        epilog="examples:\n  univ zoo info\n  univ zoo train --out zoo --seeds 0 1 2 --fp16 --threads 1\n"
        "  univ zoo train --out zoo5 --seeds 0 1 2 3 4 --steps 6000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")

    def _help(args: argparse.Namespace) -> int:
        zoo.print_help()
        return 0

    zoo.set_defaults(func=_help)

    train = sub.add_parser(
        "train", help="train a zoo of seeds (deterministic per seed)",
        description="Train one model per seed on the shipped corpus's train split (the held-out plays stay\n"
        "unseen) and write DIR/seed-N/ (weights, config, tokenizer) and DIR/manifest.json (config, losses,\n"
        "times). A seed and --threads fix the result: the same command gives the same weights.",
        epilog="examples:\n"
        "  univ zoo train --out univ/assets/zoo --seeds 0 1 2 --fp16 --threads 1   # the shipped zoo\n"
        "  univ zoo train --out /tmp/zoo --seeds 0 1 --steps 200 --layers 1   # a quick one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--out", metavar="DIR", help="output folder (default: a folder in the univ cache)")
    train.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                       help="training seeds, one model each (default 0 1 2)")
    train.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps (default {d.steps})")
    train.add_argument("--d-model", dest="n_embd", type=int, metavar="N", help=f"residual width (default {d.n_embd})")
    train.add_argument(
        "--d-mlp", dest="n_inner", type=int, metavar="N", help=f"MLP neurons per layer (default {d.n_inner})"
    )
    train.add_argument("--layers", dest="n_layer", type=int, metavar="N",
                       help=f"transformer blocks (default {d.n_layer})")
    train.add_argument("--heads", dest="n_head", type=int, metavar="N", help=f"attention heads (default {d.n_head})")
    train.add_argument("--ctx", dest="n_ctx", type=int, metavar="N", help=f"context length (default {d.n_ctx})")
    train.add_argument("--vocab-size", type=int, metavar="N", help=f"BPE vocabulary (default {d.vocab_size})")
    train.add_argument("--batch-size", type=int, metavar="N", help=f"sequences per step (default {d.batch_size})")
    train.add_argument("--lr", type=float, metavar="LR", help=f"peak learning rate (default {d.lr})")
    train.add_argument("--warmup-steps", type=int, metavar="N",
                       help=f"linear learning-rate warm-up steps (default {d.warmup_steps})")
    train.add_argument(
        "--corpus-chars", type=int, metavar="N",
        help="train on the first N characters of the train split only (default: all)"
    )
    train.add_argument(
        "--threads", type=int, metavar="N", help=f"CPU threads; part of what makes runs identical (default {d.threads})"
    )
    train.add_argument("--fp16", action="store_true", help="save weights in fp16 (what ships)")
    train.add_argument(
        "--save-every",
        type=int,
        metavar="N",
        help="also save a checkpoint every N steps and at the last one, as SEED/step-NNNNNN/ (for 'univ sweep')",
    )
    train.set_defaults(func=_cmd_train)

    info = sub.add_parser(
        "info", help="print a zoo's manifest (default: every shipped zoo)",
        description="Print a zoo's folder, model shape, training steps, held-out losses (and their curve over\n"
        "training), training time and the command that trained it (from its manifest.json).",
        epilog="examples:\n  univ zoo info                 # every shipped zoo (default, depth)\n"
        "  univ zoo info depth\n  univ zoo info /tmp/zoo --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("zoo", nargs="?", help="a shipped zoo's name or a zoo folder (default: every shipped zoo)")
    info.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    info.set_defaults(func=_cmd_info)


def main(argv: list[str] | None = None) -> int:
    """``python -m univ.zoo train ...``: the zoo commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="univ")
    register(parser.add_subparsers(dest="command"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = "univ " + shlex.join(argv)  # recorded in the manifest, as the installed CLI would run it
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Tiny models and tokenizers for tests: built locally, saved to a directory, loaded back by path (no Hub).

    path = save_tiny_model(tmp_path, arch="gpt2", seed=0)        # -> tmp_path / "gpt2-seed0"
    lm = univ.models.load_model(str(path))

Every tiny model shares one byte-level BPE tokenizer (512 tokens, trained on Python's ``pydoc_data.topics``,
BOS = EOS = ``<|endoftext|>`` as in GPT-2) unless ``tokenizer="alt"`` asks for a different one (300 tokens,
``<s>``/``</s>``), which exists to trip the tokenizer-mismatch check.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 512  # model vocabulary; both tokenizers fit in it
N_POSITIONS = 64  # small on purpose: check_ctx is tested against it
ARCHS = ("gpt2", "neox", "llama", "mistral", "qwen2", "qwen3", "gemma")


@functools.cache
def corpus_text() -> str:
    """About 0.5 MB of English (Python's help topics), paragraphs separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


@functools.cache
def _tokenizer(variant: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if variant == "default":
        vocab, bos, eos = VOCAB_SIZE, "<|endoftext|>", "<|endoftext|>"
    elif variant == "alt":
        vocab, bos, eos = 300, "<s>", "</s>"
    else:
        raise ValueError(f"unknown tokenizer variant {variant!r}; use 'default' or 'alt'")
    specials = sorted({bos, eos})
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


def tiny_tokenizer(variant: str = "default") -> Any:
    """The shared test tokenizer ("default") or a different one ("alt"); cached per process."""
    return _tokenizer(variant)


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A 2-layer config of the given architecture (d_model 32, 4 heads, d_mlp 64, or 48 for gated MLPs)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=0)
    gated = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, max_position_embeddings=N_POSITIONS, tie_word_embeddings=False,
    )  # fmt: skip
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=N_POSITIONS, **common)
    elif arch == "neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=N_POSITIONS, tie_word_embeddings=False, **common,
        )  # fmt: skip
    elif arch == "llama":
        cfg = tf.LlamaConfig(**gated, **common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**gated, **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**gated, **common)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**gated, **common)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**gated, **common)
    else:
        raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def save_tiny_model(
    tmp_path: Path,
    arch: str = "gpt2",
    seed: int = 0,
    tokenizer: Any = "default",
    name: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Build a randomly initialised tiny model (seeded), save it with a tokenizer, return its directory.

    ``tokenizer``: "default", "alt", or a tokenizer object. Weights are perturbed away from the HF init
    (zero biases, unit norms) so that every weight matters in the forward-reproduction tests.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = Path(tmp_path) / (name or f"{arch}-seed{seed}")
    model.save_pretrained(path)
    tok = tiny_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    tok.save_pretrained(path)
    return path


def tiny_seeds_and_text(root: Path, seeds, chars: int, arch: str = "gpt2", **config_overrides: Any):
    """Tiny models of ``arch``, one per seed, and a text file of the corpus's first ``chars`` characters."""
    models = [save_tiny_model(root, arch, seed=s, **config_overrides) for s in seeds]
    data = Path(root) / "text.txt"
    data.write_text(corpus_text()[:chars])
    return models, data

"""The embedded corpus and its tokenizer: Shakespeare's works, shipped so the demo runs offline.

The text (42 works, 5.2 MB, public domain; built by ``scripts/build_corpus.py``, see ``NOTICE``) lives in
``univ/assets/shakespeare.jsonl.xz``, one work per line. A *document* is a passage of one work: consecutive
paragraphs (speeches, stage directions, stanzas) joined by single newlines until it holds at least
``PASSAGE_CHARS`` characters, so that a document fills a 128-token context and carries no blank line.

The split is by work, so held-out text is text no zoo model trained on: four plays, one of each kind
(``HELDOUT_WORKS``, ~11 % of the characters). The demo correlates neurons on it.

    docs = corpus_split("heldout")                  # list[str]
    path = write_corpus_files("runs/data", "heldout")  # the same documents, blank-line separated
    tok = load_tokenizer()                          # the shipped byte-level BPE, 4096 tokens
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
from pathlib import Path
from typing import Literal

DATA_DIR = Path(__file__).resolve().parent / "assets"
CORPUS_FILE = DATA_DIR / "shakespeare.jsonl.xz"
TOKENIZER_DIR = DATA_DIR / "tokenizer"

# One tragedy, one comedy, one history, one Roman play: 589 k characters, 11 % of the corpus.
HELDOUT_WORKS = ("hamlet", "twelfth_night", "henry_v", "julius_caesar")
# ~1,000 characters is ~300 tokens of this BPE: a passage fills the 128-token training window twice over.
PASSAGE_CHARS = 1000
EOT = "<|endoftext|>"  # GPT-2's single special token: BOS, EOS and pad at once
DEFAULT_VOCAB_SIZE = 4096

Split = Literal["train", "heldout"]


@functools.lru_cache(maxsize=1)
def load_works() -> tuple[dict, ...]:
    """The works as shipped: dicts with ``id``, ``title``, ``source`` (Gutenberg URL) and ``text``, by id."""
    if not CORPUS_FILE.exists():
        raise FileNotFoundError(f"{CORPUS_FILE} is missing; rebuild it with scripts/build_corpus.py")
    with lzma.open(CORPUS_FILE, "rt", encoding="ascii") as f:
        return tuple(json.loads(line) for line in f)


def corpus_sha256() -> str:
    """Hash of the shipped corpus file, recorded in zoo manifests."""
    return hashlib.sha256(CORPUS_FILE.read_bytes()).hexdigest()


def passages(text: str, min_chars: int = PASSAGE_CHARS) -> list[str]:
    """Cut one work into documents: whole paragraphs, joined by '\\n', each at least ``min_chars`` long.

    Only a work shorter than ``min_chars`` gives a shorter document. No document contains a blank line, so a
    blank line can separate documents in a plain text file.
    """
    out: list[str] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para:
            continue
        current.append(para)
        size += len(para) + 1
        if size >= min_chars:
            out.append("\n".join(current))
            current, size = [], 0
    if current and out:  # a short tail ("[Exit.]") joins the passage before it rather than stand alone
        out[-1] = "\n".join([out[-1], *current])
    elif current:
        out.append("\n".join(current))
    return out


def _split_works(split: str) -> list[dict]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    works = load_works()
    missing = set(HELDOUT_WORKS) - {w["id"] for w in works}
    if missing:
        raise ValueError(f"held-out works {sorted(missing)} are not in {CORPUS_FILE}")
    return [w for w in works if (w["id"] in HELDOUT_WORKS) == (split == "heldout")]


def load_corpus() -> list[str]:
    """All documents, train and held-out, in work order (by id)."""
    return [doc for w in load_works() for doc in passages(w["text"])]


def corpus_split(split: Split) -> list[str]:
    """Documents of one split. 'heldout' is ``HELDOUT_WORKS``; 'train' is every other work. Deterministic."""
    return [doc for w in _split_works(split) for doc in passages(w["text"])]


def write_corpus_files(directory: str | Path, split: Split) -> Path:
    """Write a split as ``shakespeare-{split}.txt``, documents separated by one blank line, for file loaders.

    ``datasets.load_dataset("text", data_files=path, sample_by="paragraph")`` reads back exactly
    ``corpus_split(split)``; a line-by-line reader sees verse lines.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"shakespeare-{split}.txt"
    path.write_text("\n\n".join(corpus_split(split)), encoding="utf-8")  # no final newline: exact round trip
    return path


# --- tokenizer -------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a GPT-2-style byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Byte-level (all 256 bytes in the base alphabet) so any text encodes without unknown tokens;
    ``<|endoftext|>`` is id 0 and serves as BOS, EOS and pad, as in GPT-2. Nothing is added when encoding
    (like GPT-2): callers prepend BOS themselves. Training is deterministic for the same texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)


def load_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """The corpus tokenizer: the shipped one when it has ``vocab_size`` tokens, else trained on the train split."""
    from transformers import AutoTokenizer

    if (TOKENIZER_DIR / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        if len(tok) == vocab_size:
            return tok
    return train_tokenizer(corpus_split("train"), vocab_size)


def build_shipped_tokenizer(out_dir: str | Path = TOKENIZER_DIR) -> Path:
    """Train the 4096-token tokenizer on the train split and save it (how ``univ/assets/tokenizer`` was made)."""
    tok = train_tokenizer(corpus_split("train"), DEFAULT_VOCAB_SIZE)
    tok.save_pretrained(out_dir)
    return Path(out_dir)

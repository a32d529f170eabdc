"""The output folder: one writer at a time (``OutLock``), and what a new, resumed or overwriting run finds there.

A folder is *finished* when it holds ``run.json`` (written last), *unfinished* when it holds a checkpoint.
A fresh run refuses both (``--resume`` continues an unfinished run, ``--overwrite`` replaces either, with the
later stages' outputs); a resume refuses a finished run. Temporary files a killed writer left behind are
removed once the lock is held.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from univ.errors import Refused, UserError
from univ.run import checkpoint
from univ_kernels.io import remove_stale_temps

LOCK = "univ.lock"
MANIFEST = "run.json"
# What univ writes into a run folder (correlate and the later stages); --overwrite removes exactly these.
OUTPUT_GLOBS = ("*.parquet", "*.csv", "run.json", "analyze.json", "report.html", "checkpoint.*")
OUTPUT_DIRS = ("state", "figures", "tables")


class OutLock:
    """An advisory lock (``fcntl.flock``) on OUT/univ.lock for the run's life; the file names the holder.

    The kernel drops the lock when its process dies, however it dies; a lock file still naming a holder
    is then stale and is taken over (with a message). A second live writer is refused at once.
    """

    def __init__(self, out: Path, log=print):
        self.out, self.log, self.fd = out, log, None

    def __enter__(self) -> OutLock:
        path = self.out / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise Refused(f"{self.out} is in use by another univ process ({_holder(path)}); wait for it to "
                          "finish, or choose another --out") from None
        previous = _holder(path)
        if previous != "unknown holder":
            self.log(f"note: took over the lock on {self.out} left by {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # released cleanly: the next run finds no holder to report
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return "unknown holder"
    if not isinstance(info, dict):
        return "unknown holder"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"


def open_folder(out: Path) -> None:
    """Create OUT (or refuse a path that is not a writable directory) before anything slow happens."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror}); choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable; choose another --out")


def manifest_run_id(out: Path) -> str | None:
    try:
        return json.loads((out / MANIFEST).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def prepare(out: Path, *, resume: bool, overwrite: bool, log=print) -> dict | None:
    """Check OUT for the kind of run asked for (lock held); returns the checkpoint's metadata when resuming."""
    for d in (out, out / "state"):
        for p in remove_stale_temps(d):
            log(f"note: removed {p.name}, a temporary file left by an interrupted write")
    finished = (out / MANIFEST).exists()
    unfinished = checkpoint.exists(out)
    if finished and unfinished and not overwrite and _same_run(out):
        checkpoint.remove(out)  # killed between writing run.json and removing the checkpoint: the run finished
        log(f"note: removed the checkpoint a finished run left in {out}")
        unfinished = False
    if overwrite:
        remove_outputs(out, log)
        return None
    if resume:
        if not unfinished:
            if finished:
                raise Refused(f"--resume: the run in {out} already finished (run.json); nothing to resume. "
                              "To run it again, pass --overwrite instead")
            raise UserError(f"--resume: no checkpoint in {out} (expected {checkpoint.FILE}); start without --resume")
        meta = checkpoint.read_header(out)
        if finished:
            raise Refused(f"{out} holds both a finished run (run.json) and a checkpoint of another run; "
                          "pass --overwrite to start again, or choose another --out")
        return meta
    if unfinished:
        raise Refused(f"{out} holds an unfinished run ({checkpoint.FILE}): pass --resume to continue it, "
                      "--overwrite to discard it, or choose another --out")
    if finished:
        raise Refused(f"{out} holds a finished run (run.json, run id {manifest_run_id(out)}): pass --overwrite "
                      "to replace it (the later stages' outputs go too), or choose another --out")
    if (out / "state").is_dir():  # pass states of a run that left neither checkpoint nor run.json
        shutil.rmtree(out / "state")
        log(f"note: removed {out / 'state'}, left by a run that did not finish")
    return None


def _same_run(out: Path) -> bool:
    try:
        run_id = checkpoint.read_header(out).get("run_id")
    except Refused:
        return False
    return run_id is not None and run_id == manifest_run_id(out)


def remove_outputs(out: Path, log=print) -> None:
    """Remove what univ wrote into OUT (correlate's and the later stages' outputs); other files stay."""
    removed = []
    for pattern in OUTPUT_GLOBS:
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink()
                removed.append(p.name)
    for name in OUTPUT_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
            removed.append(name + "/")
    if removed:
        log(f"--overwrite: removed {', '.join(sorted(removed))} from {out}")

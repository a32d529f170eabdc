"""Checkpoints: one file, ``OUT/checkpoint.safetensors``, that is the whole state of an unfinished run.

The file is written by ``univ_kernels.io.write_tensors`` (temp file, fsync, rename, fsync dir), so a crash
leaves the previous checkpoint or the new one: there is no second file whose generation could disagree.
Its metadata (covered by the header digest) is

    kind "univ.correlate.checkpoint", version, run_id, generation (1, 2, … per write of this run),
    fingerprint (what defines the result: options, model and data content; see ``univ.run.identity``),
    plan (``Plan.to_dict``), counters (``RunState.counters``), univ_version

and every tensor carries a sha256. Loading validates the digest, every name, dtype and shape against the
state the plan implies for the checkpoint's pass, every checksum, and the counters against each other, and
raises ``Refused`` naming the file and the tensor on any mismatch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from univ import __version__
from univ.errors import Refused
from univ.run import files
from univ.run.state import RunState
from univ_kernels.io import StateFileError, read_meta, read_tensors

FILE = "checkpoint.safetensors"
LEGACY = "checkpoint.json"  # the two-file checkpoint of univ ≤ 0.1.0
KIND = "univ.correlate.checkpoint"
VERSION = 2


def path(out: Path, name: str = FILE) -> Path:
    """Where the checkpoint lives; ``name`` lets a process that holds part of the state (a rank) keep its own."""
    return out / name


def exists(out: Path) -> bool:
    return path(out).exists() or (out / LEGACY).exists()


def remove(out: Path) -> None:
    path(out).unlink(missing_ok=True)
    (out / LEGACY).unlink(missing_ok=True)
    files.sync_dir(out)


def write(out: Path, state: RunState, identity: dict, name: str = FILE) -> None:
    """Write the state as the run's next checkpoint generation (replaces the previous one atomically)."""
    state.generation += 1
    meta = {"kind": KIND, "version": VERSION, "run_id": identity["run_id"], "generation": state.generation,
            "fingerprint": identity["fingerprint"], "plan": state.plan.to_dict(), "counters": state.counters(),
            "univ_version": __version__}
    files.write_tensors(path(out, name), state.named(), meta)


def read_header(out: Path, name: str = FILE) -> dict:
    """The checkpoint's metadata (digest checked, tensors not read); Refused if it cannot be trusted."""
    if (out / LEGACY).exists() and not path(out, name).exists():
        raise Refused(f"{out / LEGACY} is a checkpoint of an older univ, which cannot be resumed safely; "
                      "start again with --overwrite")
    try:
        meta, _ = read_meta(path(out, name))
    except StateFileError as e:
        raise Refused(f"checkpoint unusable: {e}; start again with --overwrite") from e
    if meta.get("kind") != KIND or meta.get("version") != VERSION:
        raise Refused(f"{path(out, name)} is not a version-{VERSION} correlate checkpoint (kind {meta.get('kind')!r}, "
                      f"version {meta.get('version')!r}); start again with --overwrite")
    return meta


def load_into(out: Path, state: RunState, meta: dict, name: str = FILE) -> None:
    """Validate the checkpoint's tensors against ``state``'s plan and load them and the counters into it."""
    counters = meta["counters"]
    _check_counters(path(out, name), state, counters)
    state.start_pass(counters["pass_index"])
    try:
        tensors, _ = read_tensors(path(out, name), state.expected())
    except StateFileError as e:
        raise Refused(f"checkpoint unusable: {e}; start again with --overwrite") from e
    state.load(tensors, counters)
    state.generation = meta["generation"]


def _check_counters(file: Path, state: RunState, c: dict) -> None:
    """Counters that contradict each other or the plan (an edited or foreign file) are refused."""
    problems = []
    if not 0 <= c.get("pass_index", -1) < state.n_passes:
        problems.append(f"pass_index {c.get('pass_index')} outside the plan's {state.n_passes} passes")
    n = c.get("moments_n", [])
    seen = sorted({k for k in n if k})  # a model the pass forwards has seen its every token, another none
    if len(n) != state.n_models:
        problems.append(f"moments_n {n} for {state.n_models} models")
    elif seen != ([c.get("tokens_done")] if c.get("tokens_done") else []):
        problems.append(f"tokens_done {c.get('tokens_done')} but the moments hold {seen or 0} tokens")
    if c.get("tokens_done", 0) > state.cfg.tokens or c.get("batches_done", -1) < 0:
        problems.append(f"tokens_done {c.get('tokens_done')} / batches_done {c.get('batches_done')}")
    if problems:
        raise Refused(f"checkpoint unusable: {file} has inconsistent counters ({'; '.join(problems)}); "
                      "start again with --overwrite")


def save_pass_state(out: Path, state: RunState, identity: dict) -> None:
    """Keep the pass's accumulators (C blocks, moments, within-layer W) in OUT/state for later re-analysis."""
    named = {k: v for k, v in state.named().items() if not k.startswith(("result.", "hist.", "cka."))}
    meta = {"kind": "univ.correlate.state", "version": VERSION, "run_id": identity["run_id"],
            "pass_index": state.pass_index, "plan": state.plan.to_dict(), "counters": state.counters()}
    files.write_tensors(out / "state" / f"pass-{state.pass_index}.safetensors", named, meta)


def read_state(file: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of an OUT/state/pass-*.safetensors file, checksums verified."""
    return read_tensors(file, device=device)


def next_checkpoint(cfg, done: int) -> int | None:
    """The token count at which the next periodic checkpoint falls (None: only the pass-end ones)."""
    if cfg.checkpoint_every is None:
        return None
    return (done // cfg.checkpoint_every + 1) * cfg.checkpoint_every

"""Resume a checkpoint written at one world size at any other: the state as one process would hold it.

A checkpoint is either one file (``OUT/checkpoint.safetensors``, one process) or one file per rank of a
generation (``OUT/distributed/gen-G/rank-R.safetensors`` + ``manifest.json``). ``read_snapshot`` turns either
into a ``Snapshot``: the run's whole state, merged exactly as the run itself would have merged it —

- a block's token shards (each rank of a group streamed every K-th batch) by Chan's formula with each shard's
  moments, and a model's moments from the shards of the first group that forwarded it;
- within-layer W the same way on the first pass (its merge happens at the pass's end), from a group root after;
- per-neuron maxima with their index (ties to the smaller index, as in one process), baseline maxima and CKA
  by max, histograms summed, activation statistics merged (``ActivationStats.merge``).

``apply_snapshot`` then gives a process of the new run its share: the blocks it owns (cut from the snapshot's
blocks layer by layer, so any re-sharding of the same passes works), moments and W on each group's first token
shard (the others start empty: Chan's merge at the pass's end is exact whichever shard holds what), results
and histograms on rank 0 only (the final reduction sums histograms). The passes — which blocks are accumulated
in which pass — are the checkpoint's; only their split over ranks changes. The answer equals the uninterrupted
run's up to the rounding of the merge order (~1e-7 in r).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from univ.errors import Refused
from univ.run.plan import Block, Plan
from univ.stats import ActivationStats
from univ_kernels import ColumnMoments, StreamingCorrelation
from univ_kernels.io import StateFileError, read_meta, read_tensors

DIST_DIR, MANIFEST = "distributed", "manifest.json"


@dataclass
class Snapshot:
    """A run's state as one process holds it (block keys are the checkpoint's plan's)."""

    run_id: str
    generation: int
    fingerprint: dict
    plan: dict  # Plan.to_dict() of the checkpoint: its passes of blocks
    counters: dict  # pass_index, batches_done, tokens_done, streamed
    source: str  # "1 process" or "N ranks (K token shards)"
    moments: dict[int, ColumnMoments] = field(default_factory=dict)
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    within: dict[int, torch.Tensor] = field(default_factory=dict)
    results: dict[str, torch.Tensor] = field(default_factory=dict)
    hist: dict[str, torch.Tensor] = field(default_factory=dict)
    cka: dict[str, torch.Tensor] = field(default_factory=dict)
    act_stats: dict[int, ActivationStats] = field(default_factory=dict)


def distributed_manifest(out: Path) -> dict | None:
    path = out / DIST_DIR / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Refused(f"checkpoint unusable: {path}: {e}; start again with --overwrite") from e


def _refuse(path: Path, what) -> Refused:
    return Refused(f"checkpoint unusable: {path}: {what}; start again with --overwrite")


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        tensors, meta = read_tensors(path)
    except (OSError, StateFileError) as e:
        raise _refuse(path, e) from e
    return meta, tensors


def _moments(tensors: dict, i: int, n: int, n_cols: int) -> ColumnMoments:
    mom = ColumnMoments(n_cols, name=f"model {i}")
    mom.load_state_dict(tensors, f"moments.{i}", n)
    return mom


def _n_cols(tensors: dict, i: int) -> int:
    return tensors[f"moments.{i}.mean"].shape[0]


def newest_source(out: Path) -> str | None:
    """Which checkpoint in ``out`` to resume: "ranks" (a distributed generation), "single" (one file) or None.

    Both exist only after a kill between a resumed run's first checkpoint in its own layout and the removal of
    the one it resumed from: the higher generation is the newer state.
    """
    from univ.run import checkpoint

    manifest = distributed_manifest(out)
    single = checkpoint.path(out).exists()
    if manifest is None:
        return "single" if single else None
    if not single:
        return "ranks"
    try:
        generation = read_meta(checkpoint.path(out))[0].get("generation", -1)
    except (OSError, StateFileError):
        return "ranks"
    return "single" if generation > manifest.get("generation", -1) else "ranks"


def read_snapshot(out: Path) -> Snapshot:
    """The state of the newest checkpoint in ``out`` (``newest_source``), whatever world size wrote it."""
    if newest_source(out) == "ranks":
        return _from_ranks(out, distributed_manifest(out))
    return _from_single(out)


def _from_single(out: Path) -> Snapshot:
    from univ.run import checkpoint

    path = checkpoint.path(out)
    meta, tensors = _read(path)
    if meta.get("kind") != checkpoint.KIND or meta.get("version") != checkpoint.VERSION:
        raise _refuse(path, f"kind {meta.get('kind')!r} version {meta.get('version')!r}")
    c = meta["counters"]
    n_models = len(c["moments_n"])
    snap = Snapshot(meta["run_id"], meta["generation"], meta["fingerprint"], meta["plan"], c, "1 process")
    snap.moments = {i: _moments(tensors, i, c["moments_n"][i], _n_cols(tensors, i)) for i in range(n_models)}
    for name, t in tensors.items():
        kind = name.split(".")[0]
        if kind == "block":
            snap.blocks[name] = t
        elif kind == "within":
            snap.within[int(name.split(".")[1])] = t
        elif kind == "result":
            snap.results[name] = t
        elif kind == "hist":
            snap.hist[name] = t
        elif kind == "cka":
            snap.cka[name] = t
    snap.act_stats = _stats_of(tensors, c)
    return snap


def _stats_of(tensors: dict, counters: dict) -> dict[int, ActivationStats]:
    out = {}
    for key, saved in counters.get("stats_n", {}).items():
        i = int(key)
        st = ActivationStats(1, tensors[f"stats.{i}.sums"].shape[1])
        st.load_state_dict(tensors, f"stats.{i}", saved)
        out[i] = st
    return out


def _from_ranks(out: Path, manifest: dict) -> Snapshot:
    ddir = out / DIST_DIR
    world, k = int(manifest["world"]), int(manifest["token_shards"])
    units = []
    for r in range(world):
        path = ddir / f"gen-{manifest['generation']}" / f"rank-{r}.safetensors"
        try:
            meta, _ = read_meta(path)
        except (OSError, StateFileError) as e:
            raise _refuse(path, e) from e
        if meta.get("run_id") != manifest["run_id"] or meta.get("generation") != manifest["generation"] \
                or meta.get("rank") != r or meta.get("world") != world:
            raise _refuse(path, "a unit of another run, generation or rank than the manifest names")
        units.append((path, meta))
    c0 = units[0][1]["counters"]
    for path, meta in units[1:]:
        c = meta["counters"]
        if any(c[key] != c0[key] for key in ("pass_index", "batches_done", "tokens_done", "streamed")) \
                or meta["plan"] != units[0][1]["plan"]:
            raise _refuse(path, "counters or plan that disagree with rank 0's")
    counters = {key: c0[key] for key in ("pass_index", "batches_done", "tokens_done", "streamed")}
    snap = Snapshot(manifest["run_id"], manifest["generation"], manifest["fingerprint"], units[0][1]["plan"],
                    counters, f"{world} ranks ({k} token shard{'s' if k > 1 else ''})")
    merged_within = c0["pass_index"] > 0  # W was merged into each group root at the end of the first pass
    groups: dict[int, list[tuple[dict, dict]]] = {}
    for r, (path, meta) in enumerate(units):  # one rank's file at a time, folded into the snapshot
        _, tensors = _read(path)
        groups.setdefault(r // k, []).append((meta["counters"], tensors))
        if len(groups[r // k]) == k:
            _fold_group(snap, groups.pop(r // k), merged_within)
    for name, v in snap.cka.items():  # layer pairs no rank computed yet: NaN, as in one process
        snap.cka[name] = torch.where(torch.isinf(v), float("nan"), v)
    return snap


def _fold_group(snap: Snapshot, shards: list[tuple[dict, dict]], merged_within: bool) -> None:
    """Merge one block group's token shards and fold them into the snapshot."""
    n_models = len(shards[0][0]["moments_n"])
    moms = [[_moments(t, i, c["moments_n"][i], _n_cols(t, i)) for i in range(n_models)] for c, t in shards]
    group_moments = []
    for i in range(n_models):
        total = ColumnMoments(moms[0][i].n_cols, name=f"model {i}")
        for s in moms:
            total.merge(s[i])
        group_moments.append(total)
        if total.n > 0 and i not in snap.moments:  # the first group that forwarded model i
            if total.n != snap.counters["tokens_done"]:  # every forwarding group sees every batch of the pass
                raise Refused(f"checkpoint unusable: the token shards of model {i}'s moments hold {total.n} tokens, "
                              f"the run {snap.counters['tokens_done']}; start again with --overwrite")
            snap.moments[i] = total
    tensors0 = shards[0][1]
    for name in tensors0:
        kind = name.split(".")[0]
        if kind == "block":
            _, a, m, l0, l1 = name.split(".")
            a, m, rows_per = int(a), int(m), tensors0[name].shape[0] // (int(l1) - int(l0))
            rows = slice(int(l0) * rows_per, int(l1) * rows_per)
            snap.blocks[name] = _merge_shards([t[name] for _, t in shards], [s[a] for s in moms], rows,
                                              [s[m] for s in moms], slice(None))
        elif kind == "within":
            i = int(name.split(".")[1])
            if i in snap.within:
                continue
            if merged_within:
                snap.within[i] = tensors0[name].clone()
            else:
                w = tensors0[name].clone()
                d = w.shape[1]
                for layer in range(w.shape[0]):
                    sl = slice(layer * d, (layer + 1) * d)
                    w[layer] = _merge_shards([t[name][layer] for _, t in shards], [s[i] for s in moms], sl,
                                             [s[i] for s in moms], sl)
                snap.within[i] = w
    for c, t in shards:
        for name, v in t.items():
            kind = name.split(".")[0]
            if kind == "result" and name.endswith(".max"):
                _max_with_index(snap.results, name, v, t[name[:-len("max")] + "arg"])
            elif kind == "result" and name.endswith(".base"):
                snap.results[name] = v.clone() if name not in snap.results else torch.maximum(
                    snap.results[name], v)
            elif kind == "hist":
                snap.hist[name] = v.clone() if name not in snap.hist else snap.hist[name] + v
            elif kind == "cka":
                v = torch.nan_to_num(v, nan=float("-inf"))
                prev = snap.cka.get(name)
                snap.cka[name] = v.clone() if prev is None else torch.maximum(prev, v)
        for i, st in _stats_of(t, c).items():
            if i not in snap.act_stats:
                snap.act_stats[i] = ActivationStats.__new__(ActivationStats)
                snap.act_stats[i].__dict__.update(st.__dict__)
            else:
                snap.act_stats[i].merge(st)


def _max_with_index(results: dict, name: str, value: torch.Tensor, index: torch.Tensor) -> None:
    arg = name[:-len("max")] + "arg"
    if name not in results:
        results[name], results[arg] = value.clone(), index.clone()
        return
    # Unwritten entries are -inf; a written NaN (a dead neuron) is kept; ties go to the smaller index.
    cur, cur_i = results[name], results[arg]
    unset = torch.isneginf(cur) & (cur_i < 0)
    finer = torch.isfinite(value) & (torch.isnan(cur) | (value > cur) | ((value == cur) & (index < cur_i)))
    take = (unset & ~(torch.isneginf(value) & (index < 0))) | finer
    results[name], results[arg] = torch.where(take, value, cur), torch.where(take, index, cur_i)


def _merge_shards(cs: list[torch.Tensor], moms_a: list[ColumnMoments], rows: slice, moms_b: list[ColumnMoments],
                  cols: slice) -> torch.Tensor:
    """The co-moment of the union of the shards' tokens (Chan), from each shard's C and its moments' rows/cols."""
    if len(cs) == 1:
        return cs[0].clone()
    total = None
    for c, ma, mb in zip(cs, moms_a, moms_b, strict=True):
        corr = StreamingCorrelation(c.shape[0], c.shape[1], operand_dtype=torch.float32)
        sa = {k: v[rows] for k, v in ma.state_dict("a").items()}
        sb = {k: v[cols] for k, v in mb.state_dict("b").items()}
        corr.load_state_dict({"n": torch.tensor(ma.n, dtype=torch.int64), "c": c.contiguous(), **sa, **sb})
        total = corr if total is None else total.merge(corr)
    return total.state_dict()["c"].clone()


# -- a process's share of a snapshot -------------------------------------------------------------------------------


def block_rows(snap: Snapshot, b: Block, plan: Plan) -> torch.Tensor:
    """Rows of block ``b`` (layers of a against all of m) cut from the snapshot's blocks of the same pair."""
    d = plan.d_mlp[b.a]
    parts = []
    for layer in range(b.layer_start, b.layer_end):
        src = next((k for k in snap.blocks if _covers(k, b.a, b.m, layer)), None)
        if src is None:
            raise Refused(f"checkpoint unusable: it holds no co-moments for layer {layer} of model {b.a} against "
                          f"model {b.m} in pass {snap.counters['pass_index'] + 1}; start again with --overwrite")
        l0 = int(src.split(".")[3])
        parts.append(snap.blocks[src][(layer - l0) * d:(layer - l0 + 1) * d])
    return torch.cat(parts)


def _covers(key: str, a: int, m: int, layer: int) -> bool:
    _, ka, km, l0, l1 = key.split(".")
    return int(ka) == a and int(km) == m and int(l0) <= layer < int(l1)


def apply_snapshot(snap: Snapshot, state, *, shard0: bool = True, rank0: bool = True,
                   stats_here: set[int] | None = None, forwarded: set[int] | None = None) -> None:
    """Load this process's share of ``snap`` into ``state`` (a RunState of the new run, any world size).

    ``forwarded``: the models this process forwards in the checkpoint's pass (default: what ``state`` needs);
    only their moments are taken (a model it does not forward keeps empty moments, as in an unbroken run).
    """
    c = snap.counters
    if not 0 <= c["pass_index"] < state.n_passes:
        raise Refused(f"checkpoint unusable: pass {c['pass_index'] + 1} of a plan with {state.n_passes} passes; "
                      "start again with --overwrite")
    state.start_pass(c["pass_index"])
    state.batches_done, state.tokens_done, state.streamed = c["batches_done"], c["tokens_done"], c["streamed"]
    forwarded = state.active_models() if forwarded is None else forwarded
    if shard0:
        for i, mom in enumerate(state.moments):
            if i in snap.moments and i in forwarded:
                src = snap.moments[i]
                mom.load_state_dict({k: v.to(state.device) for k, v in src.state_dict("x").items()}, "x", src.n)
        for b in state.blocks:
            state.blocks[b].copy_(block_rows(snap, b, state.plan))
        for i in state.within:
            if i in snap.within:
                state.within[i].copy_(snap.within[i])
    if rank0:
        for (a, m), res in state.results.items():
            for key in res:
                name = f"result.{a}.{m}.{key}"
                if name in snap.results:
                    res[key] = snap.results[name].clone()
        for key in state.hist:
            name = f"hist.{key[0]}.{key[1]}"
            if name in snap.hist:
                state.hist[key] = snap.hist[name].clone()
        for key in state.cka:
            name = f"cka.{key[0]}.{key[1]}"
            if name in snap.cka:
                state.cka[key] = snap.cka[name].clone().to(state.cka[key].dtype)
    for i, st in state.act_stats.items():
        if i in snap.act_stats and (stats_here is None or i in stats_here):
            src = snap.act_stats[i]
            st.n, st.n_post = src.n, src.n_post
            st.shift = None if src.shift is None else src.shift.clone()
            st.sums, st.n_pos, st.post_sum = src.sums.clone(), src.n_pos.clone(), src.post_sum.clone()
    state.generation = snap.generation

"""Streaming state across a ``torch.distributed`` process group: exact merges and per-neuron reductions.

Two things a pipeline spread over ranks needs, built on the public state API of ``StreamingCorrelation``
and ``ColumnMoments`` (``state_dict`` / ``load_state_dict`` / ``merge``), so that how they centre inside
does not matter here:

- ``merge_across(obj)``: every rank streamed its own shard of the tokens; afterwards each holds the state of
  the whole stream. Exact (Chan et al.'s pairwise merge, the classes' own ``merge``) and deterministic:
  states meet in a fixed binary tree over group ranks, ((0,1),(2,3)) → (0..3) …, and the root's result is
  broadcast, so every rank ends with bit-identical tensors whatever the order messages arrive in.
  Memory: the state twice plus one receive buffer; bytes sent: the state ⌈log2 N⌉ times on the busiest rank.
- ``reduce_extreme`` / ``reduce_summary``: ranks hold *column blocks* of one correlation (disjoint neurons of
  the other side); the per-neuron max/argmax, min/argmin and the histogram of the whole r are reduced with
  two ``all_reduce`` calls per extreme (max, then the smallest index among the ties) and one sum. r is never
  gathered: O(n) numbers cross the wire. MAX, MIN and integer SUM are exact, so every rank agrees bit for bit.

Runnable example (two CPU ranks, gloo; ``torchrun --nproc-per-node 2 -m univ_kernels.distributed`` does the
same under torchrun, with NCCL on GPUs)::

    python -m univ_kernels.distributed

which, on each rank, streams that rank's half of the batches, then::

    corr = StreamingCorrelation(n_a, n_b)
    for x_a, x_b in my_batches:
        corr.update(x_a, x_b)
    merge_across(corr)            # every rank now holds the state of all batches
    s = corr.summary()            # identical on every rank
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist

from univ_kernels.finalize import CorrelationSummary
from univ_kernels.moments import ColumnMoments
from univ_kernels.streaming import StreamingCorrelation

State = dict[str, torch.Tensor]
_BIG = torch.iinfo(torch.int64).max


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: group ranks, the device collectives need, sending a dict of tensors


def _ranks(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group, rank: int) -> int:
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, rank)


def comm_device(group=None) -> torch.device:
    """Where tensors must live for this group's collectives: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _signature(state: State) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(state.items())]


def _check_same_layout(state: State, group, what: str) -> None:
    """One small all_gather of names/shapes/dtypes, so a mismatch is an error naming the rank, not a hang."""
    _, world = _ranks(group)
    sigs: list = [None] * world
    dist.all_gather_object(sigs, _signature(state), group=group)
    for r, sig in enumerate(sigs):
        if sig != sigs[0]:
            diff = sorted(set(map(str, sig)) ^ set(map(str, sigs[0])))[:3]
            raise ValueError(
                f"cannot merge {what} across ranks: group rank {r} holds a state laid out differently from rank 0 "
                f"({'; '.join(diff)}). Every rank must build the accumulator with the same shapes."
            )


def _send(state: State, dst: int, group, device: torch.device) -> None:
    for k in sorted(state):
        dist.send(state[k].detach().contiguous().to(device), dst=_global(group, dst), group=group)


def _recv_like(state: State, src: int, group, device: torch.device) -> State:
    out = {}
    for k in sorted(state):
        buf = torch.empty(state[k].shape, dtype=state[k].dtype, device=device)
        dist.recv(buf, src=_global(group, src), group=group)
        out[k] = buf.to(state[k].device)
    return out


def _broadcast(state: State, src: int, group, device: torch.device) -> State:
    out = {}
    for k in sorted(state):
        t = state[k].detach().contiguous().to(device).clone()
        dist.broadcast(t, src=_global(group, src), group=group)
        out[k] = t.to(state[k].device)
    return out


def tree_merge(state: State, merge: Callable[[State, State], State], *, group=None, dst: int = 0) -> State | None:
    """Fold every rank's ``state`` with ``merge(left, right)`` along a fixed binary tree; ``dst`` gets the result.

    Tree over virtual ranks v = (rank − dst) mod N: at step s = 1, 2, 4 …, v with v mod 2s = 0 receives from
    v + s and merges (its own state on the left). The order of the merges is fixed by the ranks alone, so the
    result does not depend on timing. Every state must have the same names, shapes and dtypes. Returns the
    merged state on ``dst`` and None elsewhere.
    """
    rank, world = _ranks(group)
    device = comm_device(group)
    v = (rank - dst) % world
    step = 1
    while step < world:
        if v % (2 * step):
            _send(state, (v - step + dst) % world, group, device)
            return None
        if v + step < world:
            state = merge(state, _recv_like(state, (v + step + dst) % world, group, device))
        step *= 2
    return state


# ----------------------------------------------------------------------------------------------------------------------
# Merging accumulators


def _moments_state(m: ColumnMoments) -> State:
    return {**m.state_dict("m"), "n": torch.tensor(m.n, dtype=torch.int64)}


def _moments_from(state: State, like: ColumnMoments) -> ColumnMoments:
    out = ColumnMoments(like.n_cols, device=like.device, name=like.name)
    out.load_state_dict(state, "m", int(state["n"]))
    return out


def merge_moments(x: ColumnMoments, y: ColumnMoments) -> ColumnMoments:
    """x ∪ y (Chan's pairwise merge), in place on x; x keeps its own centring."""
    if hasattr(x, "merge"):
        return x.merge(y) or x
    n, s1, s2 = x.merged(y)
    x.shift = x.shift if x.shift is not None else (y.shift.to(x.device) if y.shift is not None else None)
    x.n, x.s1, x.s2 = n, s1, s2
    return x


def _corr_from(state: State, like: StreamingCorrelation) -> StreamingCorrelation:
    out = StreamingCorrelation(like.n_a, like.n_b, device=like.device, backend=like.backend,
                               operand_dtype=like.operand_dtype, gemm=like.gemm)
    out.load_state_dict(state)
    return out


def merge_across(obj: StreamingCorrelation | ColumnMoments, group=None, *, dst: int | None = None):
    """Merge the state every rank of ``group`` holds into one, exactly, in place; returns ``obj``.

    ``dst=None``: every rank ends with the merged state, bit-identical. ``dst=r``: only group rank r does
    (others keep theirs), which saves the broadcast when one rank finalizes. Collective: every rank of the
    group must call it, with accumulators of the same shape. Empty shards (no tokens) are fine.

    Example (under torchrun, or see ``python -m univ_kernels.distributed``):
        >>> corr = StreamingCorrelation(64, 48)                  # doctest: +SKIP
        >>> for x_a, x_b in batches[rank::world]: corr.update(x_a, x_b)  # doctest: +SKIP
        >>> merge_across(corr).summary()                        # the same on every rank  # doctest: +SKIP
    """
    if isinstance(obj, StreamingCorrelation):
        if obj.operand_dtype is None:  # an empty shard: take the dtype the others streamed with
            obj.operand_dtype = torch.float32
        state, rebuild, load = obj.state_dict(), lambda s: _corr_from(s, obj), obj.load_state_dict
        merge = lambda x, y: rebuild(x).merge(rebuild(y)).state_dict()  # noqa: E731
        what = f"a {obj.n_a}×{obj.n_b} StreamingCorrelation"
    elif isinstance(obj, ColumnMoments):
        state = _moments_state(obj)
        merge = lambda x, y: _moments_state(merge_moments(_moments_from(x, obj), _moments_from(y, obj)))  # noqa: E731
        load = lambda s: obj.load_state_dict(s, "m", int(s["n"]))  # noqa: E731
        what = f"ColumnMoments of {obj.n_cols} columns"
    else:
        raise TypeError(f"merge_across takes a StreamingCorrelation or ColumnMoments, got {type(obj).__name__}")
    state = {k: v.detach() for k, v in state.items()}
    _check_same_layout(state, group, what)
    merged = tree_merge(state, merge, group=group, dst=0 if dst is None else dst)
    if dst is None:
        merged = _broadcast(merged if merged is not None else state, 0, group, comm_device(group))
    if merged is not None:
        load(merged)
    return obj


# ----------------------------------------------------------------------------------------------------------------------
# Per-neuron reductions over column blocks


def reduce_extreme(values: torch.Tensor, index: torch.Tensor, group=None, *, largest: bool = True):
    """Across ranks, per neuron: the max (or min) value and, among ties, the smallest index. In place and returned.

    ``values`` [n] float (NaN = no candidate on this rank), ``index`` [n] int64 global indices (−1 = none).
    Neurons with no candidate on any rank come back NaN and −1, as ``correlation_summary`` answers a dead one.
    Two ``all_reduce`` calls, both exact, so every rank ends bit-identical.
    """
    device = comm_device(group)
    sign = 1.0 if largest else -1.0
    v = torch.nan_to_num(values.float() * sign, nan=float("-inf")).to(device)
    v = torch.where(index.to(device) < 0, float("-inf"), v)
    best = v.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    idx = torch.where((v == best) & torch.isfinite(best), index.to(device).long(), _BIG)
    dist.all_reduce(idx, op=dist.ReduceOp.MIN, group=group)
    empty = torch.isinf(best)
    values.copy_(torch.where(empty, float("nan"), best * sign).to(values))
    index.copy_(torch.where(empty, -1, idx).to(index))
    return values, index


def all_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place exact sum across ranks of an integer tensor (histogram counts, token counts)."""
    if t.is_floating_point():
        raise TypeError("all_sum is for integer counts; float sums depend on the order ranks arrive in")
    buf = t.to(comm_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    t.copy_(buf)
    return t


def reduce_summary(s: CorrelationSummary, *, rows: slice, cols: slice, n_a: int, n_b: int,
                   group=None) -> CorrelationSummary:
    """The summary of the whole [n_a, n_b] correlation from each rank's summary of its block rows × cols.

    Blocks may overlap in rows (column blocks of the same rows) or in columns; each (row, column) pair must
    be counted by exactly one rank, since the histograms are summed. Indices become global; ties go to the
    smallest global index, as in a single ``correlation_summary``. ``n_dead_*`` counts neurons with no valid
    partner anywhere (a dead neuron, or one whose every partner is dead). Collective over ``group``.
    """
    def spread(n: int, sl: slice, vals: torch.Tensor, idx: torch.Tensor, offset: int):
        full_v = torch.full((n,), float("nan"), dtype=torch.float32)
        full_i = torch.full((n,), -1, dtype=torch.int64)
        full_v[sl] = vals.float().cpu()
        full_i[sl] = torch.where(idx.cpu() >= 0, idx.cpu() + offset, -1)
        return full_v, full_i

    out = {}
    for side, n, sl, other in (("a", n_a, rows, cols), ("b", n_b, cols, rows)):
        for kind, largest in (("max", True), ("min", False)):
            v, i = spread(n, sl, getattr(s, f"{kind}_{side}"), getattr(s, f"arg{kind}_{side}"), other.start or 0)
            out[f"{kind}_{side}"], out[f"arg{kind}_{side}"] = reduce_extreme(v, i, group, largest=largest)
    hist = all_sum(s.hist.to(torch.int64).cpu().clone(), group)
    return replace(s, **out, hist=hist, n_dead_a=int((out["argmax_a"] < 0).sum()),
                   n_dead_b=int((out["argmax_b"] < 0).sum()))


# ----------------------------------------------------------------------------------------------------------------------
# The runnable example


def _example(rank: int, world: int, init: str) -> None:
    """Each rank streams batches rank, rank + N, …; after ``merge_across`` all hold the whole stream's state."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)  # the same stream on every rank; each keeps its share
    batches = [(torch.randn(37, 53, generator=g), torch.randn(37, 29, generator=g)) for _ in range(9)]
    corr = StreamingCorrelation(53, 29)
    for x_a, x_b in batches[rank::world]:
        corr.update(x_a, x_b)
    merge_across(corr)
    x_a = torch.cat([b[0] for b in batches]).double()
    x_b = torch.cat([b[1] for b in batches]).double()
    ref = torch.corrcoef(torch.cat([x_a, x_b], 1).T)[:53, 53:]
    err = (corr.correlation().double() - ref).abs().max().item()
    print(f"rank {rank}/{world}: {corr.n} tokens merged, max |r − float64 r| = {err:.1e}")
    dist.destroy_process_group()


def _main() -> int:
    if "WORLD_SIZE" in os.environ:  # under torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        _example(dist.get_rank(), dist.get_world_size(), "env://")
        return 0
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_example, args=(2, f"file://{tmp}/store"), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

"""univ_kernels.distributed on 2 and 3 gloo ranks: exact, deterministic merges and per-neuron reductions.

Ranks are forked from the test process (no re-import of torch: a rank starts in well under a second) and meet
through a FileStore in tmp_path (no TCP port to collide with another test run). Each rank writes what it
computed to rank<r>.pt; the test compares those with a single-process float64 reference.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from univ_kernels import ColumnMoments, StreamingCorrelation, correlation_summary
from univ_kernels.distributed import merge_across, merge_moments, reduce_extreme, reduce_summary

TIMEOUT_S = 60


def _rank_main(fn, rank: int, world: int, tmp: str, args) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT_S))
        torch.save(fn(rank, world, *args), Path(tmp) / f"rank{rank}.pt")
    except BaseException:  # the parent reads the traceback from the file and fails the test with it
        (Path(tmp) / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(code)  # skip the forked copy of pytest's atexit machinery


def start_ranks(fn, world: int, tmp_path: Path, *args) -> tuple[list, Path]:
    """Fork ``world`` gloo ranks running ``fn(rank, world, *args)``; returns the processes and their folder."""
    tmp = tmp_path / f"dist-{time.monotonic_ns()}"
    tmp.mkdir()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, str(tmp), args)) for r in range(world)]
    for p in procs:
        p.start()
    return procs, tmp


def join_ranks(procs, timeout: float) -> float:
    """Wait for every rank (killing any still alive after ``timeout``); returns the seconds waited."""
    t0 = time.monotonic()
    for p in procs:
        p.join(max(0.1, t0 + timeout - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return time.monotonic() - t0


def spawn(fn, world: int, tmp_path: Path, *args, timeout: float = TIMEOUT_S) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` forked gloo ranks; return each rank's result (or raise)."""
    procs, tmp = start_ranks(fn, world, tmp_path, *args)
    join_ranks(procs, timeout)
    errors = [f.read_text() for f in sorted(tmp.glob("rank*.err"))]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    if any(p.exitcode != 0 for p in procs):
        raise AssertionError(f"ranks exited with {[p.exitcode for p in procs]} (timeout {timeout} s)")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------------------------------------------------
# Data: one stream of odd-sized batches, split among ranks unevenly (and one rank may get nothing)


def batches(seed: int = 0, n: int = 7, n_a: int = 53, n_b: int = 29):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = 5 + 11 * i % 17
        shared = torch.randn(t, 1, generator=g)
        x_a = torch.randn(t, n_a, generator=g) + 3.0 + shared
        x_b = torch.randn(t, n_b, generator=g) * 2 - 1 + shared
        out.append((x_a, x_b))
    return out


def shard(rank: int, world: int, seed: int = 0):
    """Batch i to rank i % world, except that with 3 ranks rank 2 gets none: an empty shard must merge."""
    bs = batches(seed)
    if world == 3:
        return [b for i, b in enumerate(bs) if (i % 2 == 0) == (rank == 0)] if rank < 2 else []
    return bs[rank::world]


def reference_r(seed: int = 0) -> torch.Tensor:
    bs = batches(seed)
    x_a = torch.cat([b[0] for b in bs]).double()
    x_b = torch.cat([b[1] for b in bs]).double()
    n_a = x_a.shape[1]
    return torch.corrcoef(torch.cat([x_a, x_b], 1).T)[:n_a, n_a:]


def _merge_corr(rank, world, dst, delay):
    time.sleep(delay[rank])  # arrival order must not matter
    corr = StreamingCorrelation(53, 29)
    for x_a, x_b in shard(rank, world):
        corr.update(x_a, x_b)
    merge_across(corr, dst=dst)
    return {k: v.clone() for k, v in corr.state_dict().items()}


def local_tree(world: int) -> StreamingCorrelation:
    """The merges merge_across performs, in its order, in one process: ((0,1),(2,3)) …"""
    states = []
    for r in range(world):
        c = StreamingCorrelation(53, 29, device="cpu", operand_dtype=torch.float32)
        for x_a, x_b in shard(r, world):
            c.update(x_a, x_b)
        states.append(c)
    step = 1
    while step < world:
        for v in range(0, world, 2 * step):
            if v + step < world:
                states[v].merge(states[v + step])
        step *= 2
    return states[0]


@pytest.mark.parametrize("world", [2, 3])
def test_merge_across_is_exact_and_identical_on_every_rank(world, tmp_path):
    results = spawn(_merge_corr, world, tmp_path, None, [0.0] * world)
    for r in range(1, world):
        for k, v in results[0].items():
            assert torch.equal(v, results[r][k]), f"rank {r} differs from rank 0 in {k}"
    corr = StreamingCorrelation(53, 29)
    corr.load_state_dict(results[0])
    assert corr.n == sum(b[0].shape[0] for b in batches())
    err = (corr.correlation().double() - reference_r()).abs().max().item()
    assert err < 1e-6, err
    # Bit for bit the merges of the fixed tree, done in one process: nothing depends on timing.
    expected = local_tree(world).state_dict()
    for k, v in expected.items():
        assert torch.equal(v, results[0][k]), k


def test_merge_across_does_not_depend_on_arrival_order(tmp_path):
    fast = spawn(_merge_corr, 3, tmp_path, None, [0.0, 0.0, 0.0])
    slow = spawn(_merge_corr, 3, tmp_path, None, [0.6, 0.3, 0.0])
    for k in fast[0]:
        assert torch.equal(fast[0][k], slow[0][k]), k


def test_merge_across_to_one_rank_leaves_the_others(tmp_path):
    results = spawn(_merge_corr, 3, tmp_path, 1, [0.0] * 3)
    assert int(results[1]["n"]) == sum(b[0].shape[0] for b in batches())
    assert int(results[0]["n"]) == sum(b[0].shape[0] for b in shard(0, 3))
    assert int(results[2]["n"]) == 0


def _merge_moments(rank, world):
    m = ColumnMoments(53)
    for x_a, _ in shard(rank, world):
        m.commit(m.prepare(x_a, operand_dtype=torch.float32))
    merge_across(m)
    return {"n": m.n, "mean": m.mean.clone(), "var": m.var.clone()}


@pytest.mark.parametrize("world", [2, 3])
def test_merge_across_column_moments(world, tmp_path):
    results = spawn(_merge_moments, world, tmp_path)
    x = torch.cat([b[0] for b in batches()]).double()
    for res in results:
        assert res["n"] == x.shape[0]
        torch.testing.assert_close(res["mean"], x.mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(res["var"], x.var(0, unbiased=False), rtol=1e-6, atol=1e-6)
        assert torch.equal(res["mean"], results[0]["mean"]) and torch.equal(res["var"], results[0]["var"])


def test_merge_moments_locally_matches_one_stream():
    bs = batches()
    whole, left, right = ColumnMoments(53), ColumnMoments(53), ColumnMoments(53)
    for i, (x_a, _) in enumerate(bs):
        whole.commit(whole.prepare(x_a, operand_dtype=torch.float32))
        side = left if i < 3 else right
        side.commit(side.prepare(x_a, operand_dtype=torch.float32))
    merge_moments(left, right)
    x = torch.cat([b[0] for b in bs]).double()
    assert left.n == whole.n == x.shape[0]
    for m in (left, whole):  # fp32 batch sums: both within ~1e-7 of float64
        torch.testing.assert_close(m.mean, x.mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(m.var, x.var(0, unbiased=False), rtol=1e-6, atol=1e-6)


def _mismatched(rank, world):
    corr = StreamingCorrelation(53, 29 + rank)
    try:
        merge_across(corr)
    except ValueError as e:
        return str(e)
    return None


def test_layout_mismatch_is_an_error_on_every_rank_not_a_hang(tmp_path):
    messages = spawn(_mismatched, 2, tmp_path, timeout=30)
    assert all(m is not None and "group rank 1" in m for m in messages), messages


# ----------------------------------------------------------------------------------------------------------------------
# Column blocks over ranks: finalize without gathering r


def block_problem(n_a=37, n_b=61):
    """A random r with planted ties across block boundaries and a dead neuron on each side."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, n_a, generator=g)
    y = torch.randn(200, n_b, generator=g)
    y[:, 7] = x[:, 9]  # r = 1 at columns 7 and 40, owned by different ranks: the smaller index must win
    y[:, 40] = x[:, 9]
    y[:, 50] = x[:, 2]
    y[:, 55] = x[:, 2]
    y[:, 30] = 1.0  # dead column
    x[:, 5] = -2.0  # dead row
    corr = StreamingCorrelation(n_a, n_b)
    corr.update(x, y)
    return corr


def _block_summary(rank, world, bounds):
    corr = block_problem()
    c, u_a, u_b, i_a, i_b = corr._finalize_args()
    cols = slice(bounds[rank], bounds[rank + 1])
    rows = slice(0, corr.n_a)
    s = correlation_summary(c[:, cols], u_a, u_b[cols], i_a, i_b[cols], bins=20, backend="torch")
    return reduce_summary(s, rows=rows, cols=cols, n_a=corr.n_a, n_b=corr.n_b)


@pytest.mark.parametrize("world, bounds", [(2, [0, 31, 61]), (3, [0, 20, 45, 61])])
def test_reduce_summary_of_column_blocks_equals_one_summary(world, bounds, tmp_path):
    results = spawn(_block_summary, world, tmp_path, bounds)
    whole = block_problem().summary(bins=20)
    for s in results:
        for k in ("max_a", "min_a", "max_b", "min_b"):
            torch.testing.assert_close(getattr(s, k), getattr(whole, k), rtol=0, atol=0, equal_nan=True)
        for k in ("argmax_a", "argmin_a", "argmax_b", "argmin_b"):
            assert torch.equal(getattr(s, k), getattr(whole, k)), k
        assert torch.equal(s.hist, whole.hist)
        assert s.n_dead_a == whole.n_dead_a == 1 and s.n_dead_b >= 1
    assert int(whole.argmax_a[2]) == 50 and int(whole.argmax_a[9]) == 7  # planted ties: the smaller index
    assert all(int(s.argmax_a[9]) == 7 for s in results)


def _extreme(rank, world):
    values = torch.tensor([[0.5, float("nan"), 0.2, -0.1], [0.5, float("nan"), 0.7, -0.3]])[rank]
    index = torch.tensor([[9, -1, 1, 4], [3, -1, 8, 2]])[rank]
    lo_v, lo_i = values.clone(), index.clone()
    reduce_extreme(values, index, largest=True)
    reduce_extreme(lo_v, lo_i, largest=False)
    return values, index, lo_v, lo_i


def test_reduce_extreme_ties_to_smallest_index_and_empty_to_nan(tmp_path):
    (v, i, lo_v, lo_i), _ = spawn(_extreme, 2, tmp_path)
    assert v[0] == 0.5 and i[0] == 3  # tie: smaller global index
    assert torch.isnan(v[1]) and i[1] == -1  # no candidate anywhere
    assert v[2] == pytest.approx(0.7) and i[2] == 8
    assert lo_v[0] == 0.5 and lo_i[0] == 3 and lo_v[3] == pytest.approx(-0.3) and lo_i[3] == 2

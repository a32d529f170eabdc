"""univ_kernels.pairs: co-moments of candidate pairs equal the dense update's entries, on both backends."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import BACKENDS

from univ_kernels import ColumnMoments, update_pair
from univ_kernels.pairs import gathered_comoment_update, merge_topk, row_topk, update_candidate_pairs


def _cand(n_a: int, n_b: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_b, (n_a, k), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t, n_a, n_b, k", [(37, 45, 29, 5), (1, 3, 70, 1), (50, 33, 17, 17)])
def test_gathered_update_equals_float64_reference(backend, t, n_a, n_b, k):
    g = torch.Generator().manual_seed(t)
    a, b = torch.randn(t, n_a, generator=g), torch.randn(t, n_b, generator=g)
    cand = _cand(n_a, n_b, k, seed=n_a)
    cand[0, :] = cand[0, 0]  # duplicate candidates are allowed
    c = torch.full((n_a, k), 0.5)
    gathered_comoment_update(c, a, b, cand, backend=backend)
    ref = 0.5 + (a.double().T @ b.double()).gather(1, cand)
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("operand", [torch.float32, torch.bfloat16])
def test_streamed_candidate_pairs_equal_the_dense_comoment(backend, operand):
    """Batches off each other's means, Chan-merged: C_pairs == dense C at the candidates (same contract)."""
    g = torch.Generator().manual_seed(1)
    n_a, n_b, k = 41, 23, 6
    cand = _cand(n_a, n_b, k, seed=2)
    ma, mb = ColumnMoments(n_a), ColumnMoments(n_b)
    dense, pairs = torch.zeros(n_a, n_b), torch.zeros(n_a, k)
    for i, t in enumerate((19, 1, 33, 8)):
        x_a = torch.randn(t, n_a, generator=g) * 3 + 10 * i
        x_b = torch.randn(t, n_b, generator=g) - 5 * i + x_a[:, :n_b]
        p_a = ma.prepare(x_a, operand_dtype=operand, backend=backend)
        p_b = mb.prepare(x_b, operand_dtype=operand, backend=backend)
        update_pair(dense, p_a, p_b, backend=backend)
        update_candidate_pairs(pairs, cand, p_a, p_b, backend=backend)
        ma.commit(p_a)
        mb.commit(p_b)
    # the same operands in both: only the fp32 summation order differs (the dense GEMM blocks T differently)
    torch.testing.assert_close(pairs, dense.gather(1, cand), rtol=1e-5, atol=1e-3)


def test_every_column_as_candidate_is_the_dense_update():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 7, generator=g), torch.randn(20, 9, generator=g)
    cand = torch.arange(9).repeat(7, 1)
    c = torch.zeros(7, 9)
    gathered_comoment_update(c, a, b, cand, backend="torch")
    torch.testing.assert_close(c, a.T @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (lambda c, a, b, k: (c, a, b, k + 100), "outside B's 0..8"),
    (lambda c, a, b, k: (c, a, b, k.float()), "integer column indices"),
    (lambda c, a, b, k: (c, a, b[:5], k), "over the same tokens"),
    (lambda c, a, b, k: (c[:, :2], a, b, k), "float32 of cand's shape"),
    (lambda c, a, b, k: (c, a, b, k[:3]), r"cand must be \[n_a, k\]"),
])  # fmt: skip
def test_bad_input_is_refused_and_changes_nothing(bad, match):
    a, b = torch.randn(10, 4), torch.randn(10, 9)
    c, cand = torch.zeros(4, 3), _cand(4, 9, 3)
    args = bad(c, a, b, cand)
    with pytest.raises((ValueError, TypeError), match=match):
        gathered_comoment_update(*args, backend="torch")
    assert (c == 0).all()


def _moments(x: torch.Tensor):
    """u = 0 and inv_sd = 1/(sd·√T): what turns a centred co-moment C into r = C·inv_a·inv_b (NaN when dead)."""
    n = x.shape[0]
    sd = x.double().std(0, unbiased=False)
    inv = torch.where(sd > 0, 1.0 / (sd * n**0.5), torch.full_like(sd, float("nan")))
    return torch.zeros(x.shape[1]), inv.float()


def test_row_topk_over_column_blocks_equals_the_dense_top_k():
    g = torch.Generator().manual_seed(4)
    x_a, x_b = torch.randn(200, 37, generator=g), torch.randn(200, 53, generator=g)
    x_b[:, 7] = 3.0  # a dead (constant) column never ranks
    x_a[:, 5] = 1.0  # a dead row: NaN / -1
    a, b = x_a - x_a.mean(0), x_b - x_b.mean(0)
    c = (a.T @ b).float()
    ua, ia = _moments(a)
    ub, ib = _moments(b)
    r = ((a.double().T @ b.double()) * ia.double()[:, None] * ib.double()[None, :]).nan_to_num(nan=-2.0)
    k = 6
    best = None
    for c0 in range(0, 53, 20):  # column blocks of 20, 20, 13, merged as a screen would
        part = row_topk(c[:, c0:c0 + 20], ua, ub[c0:c0 + 20], ia, ib[c0:c0 + 20], k, col_offset=c0)
        best = part if best is None else merge_topk(best, part, k)
    want = torch.topk(r, k, dim=1)
    live = torch.arange(37) != 5
    torch.testing.assert_close(best[0][live].double(), want.values[live], rtol=1e-5, atol=1e-5)
    assert (best[1][live] == want.indices[live]).all() and not (best[1] == 7).any()
    assert best[0][5].isnan().all() and (best[1][5] == -1).all()


def test_row_topk_pads_when_fewer_columns_than_k():
    c, u = torch.ones(3, 2), torch.zeros(2)
    values, index = row_topk(c, torch.zeros(3), u, torch.ones(3), torch.ones(2), 4)
    assert values.shape == (3, 4) and (index[:, 2:] == -1).all() and values[:, 2:].isnan().all()

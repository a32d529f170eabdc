"""Streaming numerics: accuracy that does not depend on the first batch, and values too large to accumulate.

Every comparison is against float64 on the exact fp32 inputs; both backends (Triton under the interpreter).
"""

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from kernel_helpers import BACKENDS, assert_close_verbose, correlated_pair, reference_r

from univ_kernels import ColumnMoments, StreamingCorrelation, update_pair
from univ_kernels.comoment import symmetrize_upper


def off_first_batch(t: int, n_a: int, n_b: int, first: int, sigmas: float, seed: int = 0):
    """Correlated fp32 columns whose first ``first`` tokens sit ``sigmas`` column stds away from the rest."""
    x_a, x_b = (x.double() for x in correlated_pair(t, n_a, n_b, offset=2.0, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    for x in (x_a, x_b):
        sign = torch.randint(0, 2, (x.shape[1],), generator=g, dtype=torch.float64) * 2 - 1
        x[:first] += sigmas * sign * x.std(0)
    return x_a.float(), x_b.float()


def stream(x_a, x_b, backend, batch, **kw):
    corr = StreamingCorrelation(x_a.shape[1], x_b.shape[1], backend=backend, **kw)
    for t0 in range(0, x_a.shape[0], batch):
        corr.update(x_a[t0 : t0 + batch], x_b[t0 : t0 + batch])
    return corr


@pytest.mark.parametrize(
    "backend, first, rest, batch, n_a, n_b",
    [("torch", 2, 20000, 1000, 37, 29), ("torch", 1, 12000, 700, 65, 17), ("triton", 1, 4000, 1100, 37, 29)],
)  # the interpreter runs ~10 ms per kernel step: a shorter stream there
def test_first_batch_100_sigma_off_matches_float64(backend, first, rest, batch, n_a, n_b):
    """The first batch sits 100 σ off the rest (so few tokens that r still spans a range): ≤ 1e-5 in r.

    With the old fixed shift (the first batch's mean) the first case was off by 4e-3 (bench/RESULTS.md).
    """
    x_a, x_b = off_first_batch(first + rest, n_a, n_b, first=first, sigmas=100.0)
    ref = reference_r(x_a, x_b)
    assert np.nanmax(ref) - np.nanmin(ref) > 1.0  # r spans a range worth getting right
    corr = StreamingCorrelation(n_a, n_b, backend=backend)
    corr.update(x_a[:first], x_b[:first])
    for t0 in range(first, first + rest, batch):  # not a multiple of the batch: a short last one
        corr.update(x_a[t0 : t0 + batch], x_b[t0 : t0 + batch])
    assert_close_verbose(corr.correlation(), ref, 1e-5)
    assert_close_verbose(corr.mean_a, x_a.double().mean(0), 1e-9 * float(x_a.double().abs().max()), "mean_a")
    assert_close_verbose(corr.var_b / x_b.double().var(0, unbiased=False), np.ones(n_b), 1e-6, "var_b ratio")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_batch_many_batches_and_merged_shards_agree(backend):
    x_a, x_b = off_first_batch(333, 41, 23, first=40, sigmas=100.0, seed=3)
    ref = reference_r(x_a, x_b)
    one = stream(x_a, x_b, backend, 333).correlation()
    many = stream(x_a, x_b, backend, 37).correlation()
    shards = [stream(x_a[s], x_b[s], backend, 29) for s in (slice(0, 40), slice(40, 41), slice(41, 333))]
    merged = StreamingCorrelation(41, 23, backend=backend)
    for s in shards:
        merged.merge(s)
    assert merged.n == 333
    for what, r in (("one batch", one), ("many batches", many), ("merged shards", merged.correlation())):
        assert_close_verbose(r, ref, 1e-5, what)
    # tighter than against the reference, not bit-equal: the BLAS thread count changes the fp32 summation order
    # (2.09e-6 seen on 2 threads, under 2e-6 on 1)
    assert_close_verbose(many, one, 5e-6, "many vs one")
    assert_close_verbose(merged.correlation(), one, 5e-6, "merged vs one")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("operand_dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_update_pair_on_slices_and_within_blocks(backend, operand_dtype, atol):
    """Blocks of rows against all columns, and a symmetric W_l (p_a is p_b), as the correlate run uses them."""
    x, y = off_first_batch(260, 50, 31, first=30, sigmas=100.0, seed=5)
    mx, my = ColumnMoments(50), ColumnMoments(31)
    rows = slice(13, 44)
    block = torch.zeros(31, 31)
    within = torch.zeros(20, 20)
    upper = torch.zeros(20, 20)
    for t0 in range(0, 260, 30):
        px = mx.prepare(x[t0 : t0 + 30], operand_dtype=operand_dtype, backend=backend)
        py = my.prepare(y[t0 : t0 + 30], operand_dtype=operand_dtype, backend=backend)
        update_pair(block, px, py, rows=rows, backend=backend)
        update_pair(within, px, px, rows=slice(30, 50), cols=slice(30, 50), backend=backend)
        update_pair(upper, px, px, rows=slice(30, 50), cols=slice(30, 50), backend=backend, symmetric=True)
        mx.commit(px)
        my.commit(py)
    xc = x.double() - x.double().mean(0)
    yc = y.double() - y.double().mean(0)
    sd_x = xc.square().sum(0).sqrt()
    sd_y = yc.square().sum(0).sqrt()
    expect_block = (xc[:, rows].T @ yc) / torch.outer(sd_x[rows], sd_y)
    w = xc[:, 30:].T @ xc[:, 30:]
    got_block = block.double() / torch.outer(sd_x[rows], sd_y)
    got_w = within.double() / torch.outer(sd_x[30:], sd_x[30:])
    assert_close_verbose(got_block, expect_block, atol, "block r")
    assert_close_verbose(got_w, w / torch.outer(sd_x[30:], sd_x[30:]), atol, "within-layer r")
    got_upper = symmetrize_upper(upper).double() / torch.outer(sd_x[30:], sd_x[30:])
    assert_close_verbose(got_upper, w / torch.outer(sd_x[30:], sd_x[30:]), atol, "within-layer r, upper triangle")
    assert torch.count_nonzero(mx.offset()) == 0  # C is centred: nothing to subtract at finalize


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_finite_values_rejected_state_unchanged(backend):
    x_a, x_b = correlated_pair(48, 6, 5)
    corr = stream(x_a[:32], x_b[:32], backend, 16)
    before = {k: v.clone() for k, v in corr.state_dict().items()}
    single = x_b[32:].clone()
    single[3, 2] = 3e38  # its square, and its deviation from the batch mean squared, overflow fp32
    with pytest.raises(ValueError, match=r"x_b has values too large for the float32 accumulators in 1 neurons "
                       r"\(first: column 2, \|x\| up to 3e\+38\).*nothing was accumulated"):  # fmt: skip
        corr.update(x_a[32:], single)
    column = x_a[32:].clone()
    column[:, 4] = 2e19  # constant within the batch, but 2e19 from the running mean: Chan's term overflows
    with pytest.raises(ValueError, match=r"x_a has values too large .* in 1 neurons \(first: column 4"):
        corr.update(column, x_b[32:])
    spread = x_a[32:].clone()
    spread[::2, 0], spread[::2, 5] = 1e19, -1e19  # Σ(x − mean)² of one batch past fp32's max
    with pytest.raises(ValueError, match=r"x_a has values too large .* in 2 neurons \(first: column 0"):
        corr.update(spread, x_b[32:])
    for k, v in corr.state_dict().items():
        assert torch.equal(v, before[k]), k
    corr.update(x_a[32:], x_b[32:])  # the stream goes on as if the bad batches never came
    assert_close_verbose(corr.correlation(), reference_r(x_a, x_b), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_operand_overflow_rejected_state_unchanged(backend):
    x_a, x_b = correlated_pair(24, 4, 4)
    corr = stream(x_a[:8], x_b[:8], backend, 8, operand_dtype=torch.float16)
    before = {k: v.clone() for k, v in corr.state_dict().items()}
    bad = x_a[8:].clone()
    bad[::2, 1] = 1e6
    with pytest.raises(ValueError, match=r"x_a has 16 values that overflow the torch.float16 operand .*column 1"):
        corr.update(bad, x_b[8:])
    for k, v in corr.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_large_constant_column_is_dead_not_overflowing():
    """A column at 2e19 for the whole stream has no spread: accepted, dead, and it harms no other column."""
    x_a, x_b = correlated_pair(90, 5, 4)
    x_a[:, 2] = 2e19
    corr = stream(x_a, x_b, "torch", 30)
    r = corr.correlation()
    assert torch.isnan(r[2]).all()
    keep = [0, 1, 3, 4]
    assert_close_verbose(r[keep], reference_r(x_a[:, keep], x_b), 1e-5)


def test_misuse_is_loud():
    m_a, m_b = ColumnMoments(3, name="x_a"), ColumnMoments(3, name="x_b")
    x = torch.randn(4, 3)
    p_a = m_a.prepare(x, operand_dtype=torch.float32, backend="torch")
    with pytest.raises(AttributeError, match="update_pair"):
        p_a.operand  # noqa: B018 - the old bare-GEMM pattern would miss Chan's term
    m_a.commit(p_a)
    p_a2 = m_a.prepare(x, operand_dtype=torch.float32, backend="torch")
    p_b = m_b.prepare(x, operand_dtype=torch.float32, backend="torch")
    with pytest.raises(ValueError, match="prepared at different points of the stream"):
        update_pair(torch.zeros(3, 3), p_a2, p_b, backend="torch")
    m_a.commit(p_a2)
    with pytest.raises(RuntimeError, match="prepared after 4 tokens but the moments now hold 8"):
        m_a.commit(p_a2)


def test_older_state_format_refused(tmp_path):
    n = torch.tensor(4)
    old = {"n": n, "c": torch.zeros(2, 3)}
    for side, k in (("a", 2), ("b", 3)):
        old |= {f"{side}.shift": torch.zeros(k), f"{side}.sum": torch.zeros(k, dtype=torch.float64),
                f"{side}.sumsq": torch.ones(k, dtype=torch.float64)}  # fmt: skip
    with pytest.raises(ValueError, match="format 1"):
        StreamingCorrelation(2, 3).load_state_dict(old)
    meta = {"format": "univ_kernels.StreamingCorrelation", "format_version": 1, "n_a": 2, "n_b": 3, "n": 4,
            "operand_dtype": "float32", "backend": "torch", "gemm": None}  # fmt: skip
    safetensors.torch.save_file(old, tmp_path / "old.safetensors", metadata={"univ_kernels": json.dumps(meta)})
    with pytest.raises(ValueError, match="format version 1"):
        StreamingCorrelation.load(tmp_path / "old")


def test_saved_file_is_plain_safetensors(tmp_path):
    x_a, x_b = correlated_pair(30, 3, 2)
    corr = stream(x_a, x_b, "torch", 10)
    path = corr.save(tmp_path / "s")
    on_disk = safetensors.torch.load_file(path)
    assert set(on_disk) == set(corr.state_dict())
    for k, v in corr.state_dict().items():
        assert torch.equal(on_disk[k], v.cpu()), k
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # the last byte belongs to the last tensor in the file
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch"):
        StreamingCorrelation.load(tmp_path / "s")

"""The functional ops one by one: ``prepass``, ``comoment_update``, ``correlation_summary``, both backends.

The Triton kernels run under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py), with 32-wide tiles, so the
shapes here are small and never tile multiples. Oracles: the torch backend (bit-for-bit where the two do the
same fp32 arithmetic) and float64 (where they do not).
"""

import numpy as np
import pytest
import torch
from kernel_helpers import BACKENDS, assert_close_verbose, correlated_pair

from univ_kernels import comoment_update, correlation_summary, prepass, prepass_torch, summary_torch
from univ_kernels.comoment import comoment_update_symmetric, symmetrize_upper, tma_compatible

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, *HALF)
BAD_INT = 0x3ADBEEF  # poison for int32 partials: any count or index that keeps it is visibly wrong


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor: equality of bits, NaN payloads and signed zeros included."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{what}: {actual.dtype} {actual.shape}"
    differ = bits(actual) != bits(expected)
    if differ.any():
        idx = torch.nonzero(differ)[:5].tolist()
        raise AssertionError(f"{what}: {int(differ.sum())} of {differ.numel()} elements differ, first at {idx}")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled float and BAD_INT-filled int tensors: a kernel must write what it returns."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else BAD_INT)

    monkeypatch.setattr(torch, "empty", empty)


# -- prepass ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, n", [(1, 7), (37, 53), (300, 129)])  # tiles are 32 × 32 under the interpreter
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("op_dtype", DTYPES)
def test_prepass_triton_matches_torch(t, n, in_dtype, op_dtype, poisoned_empty):
    x = (torch.randn(t, n) * 3 + torch.linspace(-50, 50, n)).to(in_dtype)
    shift = x.float().mean(0) + 0.25  # never the exact mean: the shifted sums must not vanish
    got = prepass(x, shift, operand_dtype=op_dtype, backend="triton")
    ref = prepass_torch(x, shift, op_dtype)
    # Same fp32 subtraction and the same round-to-nearest-even cast (bf16 included): identical bits.
    assert_bit_equal(got.operand, ref.operand, "operand")
    assert got.operand.is_contiguous()
    back = ref.operand.double()
    assert_close_verbose(got.col_sum, back.sum(0), 1e-5 * float(back.abs().sum(0).max()) + 1e-6, "col_sum")
    assert_close_verbose(got.col_sumsq, back.square().sum(0), 1e-5 * float(back.square().sum(0).max()), "col_sumsq")
    assert got.nonfinite.dtype == got.overflow.dtype == torch.int32
    assert not got.nonfinite.any() and not got.overflow.any()


def test_prepass_bf16_rounding_ties_to_even():
    """fp32 → bf16 must round to nearest, ties to even, as torch does (the interpreter's own cast truncates)."""
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    frac = torch.tensor([0.5, 1.5, 0.25, 0.75, 0.5 + 2**-16, 0.5 - 2**-16, 0.0, 1.0])  # in units of ulp
    x = torch.cat([1 + frac * ulp, -(1 + frac * ulp), (1 + frac * ulp) * 2.0**50])[:, None].repeat(1, 3)
    shift = torch.zeros(3)
    got = prepass(x, shift, operand_dtype=torch.bfloat16, backend="triton").operand
    assert_bit_equal(got, x.to(torch.bfloat16), "bf16 operand")
    assert got[:8, 0].tolist() == [1.0, 1 + 2 * ulp, 1.0, 1 + ulp, 1 + ulp, 1.0, 1.0, 1 + ulp]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflows, as it should here
@pytest.mark.parametrize("op_dtype", DTYPES)
def test_prepass_counts_nonfinite_and_overflow_per_column(op_dtype):
    t, n = 70, 45
    x = torch.randn(t, n)
    x[3, 2], x[9, 2], x[60, 40] = float("nan"), float("inf"), float("-inf")
    x[:, 33] = float("nan")  # a whole column
    big = {torch.float16: 1e5, torch.bfloat16: 3.4e38, torch.float32: 3.3e38}[op_dtype]  # bf16 max ≈ 3.39e38
    x[5, 7], x[6, 7], x[40, 44] = big, big, -big  # finite, but ± big − shift overflows the operand
    shift = torch.full((n,), -big if op_dtype == torch.float32 else 0.5)
    shift[44] = big if op_dtype == torch.float32 else -0.5

    expected_bad = torch.zeros(n, dtype=torch.int32)
    expected_bad[2], expected_bad[40], expected_bad[33] = 2, 1, t
    expected_ovf = torch.zeros(n, dtype=torch.int32)
    expected_ovf[7], expected_ovf[44] = 2, 1

    got = prepass(x, shift, operand_dtype=op_dtype, backend="triton")
    ref = prepass_torch(x, shift, op_dtype)
    for p, who in ((got, "triton"), (ref, "torch")):
        assert p.nonfinite.tolist() == expected_bad.tolist(), f"{who} nonfinite"
        assert p.overflow.tolist() == expected_ovf.tolist(), f"{who} overflow"
    # Wherever the input was finite and its operand too, both backends wrote the same value.
    ok = torch.isfinite(x) & torch.isfinite(ref.operand.float()) & torch.isfinite(got.operand.float())
    assert_bit_equal(got.operand[ok], ref.operand[ok], "operand at finite entries")
    clean = (expected_bad == 0) & (expected_ovf == 0)
    assert_close_verbose(got.col_sum[clean], ref.col_sum[clean], 1e-4, "col_sum of clean columns")


@pytest.mark.parametrize("layout", ["column-major", "every-other-column", "row-slice"])
def test_prepass_strided_input(layout):
    base = torch.randn(90, 140) + 4.0
    x = {
        "column-major": base.t().contiguous().t(),
        "every-other-column": base[:, ::2],
        "row-slice": base[7:83],
    }[layout]
    assert not x.is_contiguous() or layout == "row-slice"
    shift = x.mean(0)
    for op_dtype in DTYPES:
        got = prepass(x, shift, operand_dtype=op_dtype, backend="triton")
        ref = prepass_torch(x.contiguous(), shift, op_dtype)
        assert_bit_equal(got.operand, ref.operand, f"{layout} {op_dtype} operand")
        assert_close_verbose(got.col_sumsq, ref.col_sumsq, 1e-5 * float(ref.col_sumsq.max()), "col_sumsq")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepass_zero_tokens(backend):
    x = torch.randn(0, 37)
    p = prepass(x, torch.randn(37), operand_dtype=torch.float16, backend=backend)
    assert p.operand.shape == (0, 37) and p.operand.dtype == torch.float16
    for t in (p.col_sum, p.col_sumsq, p.nonfinite, p.overflow):
        assert t.shape == (37,) and not t.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepass_one_token_and_no_columns(backend):
    x = torch.tensor([[1.5, -2.0, 1e4]])
    p = prepass(x, torch.tensor([0.5, 0.0, 0.0]), operand_dtype=torch.float16, backend=backend)
    assert p.operand.tolist() == [[1.0, -2.0, 10000.0]]
    assert p.col_sum.tolist() == [1.0, -2.0, 10000.0] and p.col_sumsq.tolist() == [1.0, 4.0, 1e8]
    empty = prepass(torch.randn(5, 0), torch.zeros(0), backend=backend)
    assert empty.operand.shape == (5, 0) and empty.col_sum.shape == (0,)


# -- comoment_update -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, n_a, n_b", [(1, 3, 5), (37, 53, 29), (200, 129, 65)])
@pytest.mark.parametrize("op_dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_comoment_update_matches_float64(t, n_a, n_b, op_dtype, backend):
    """C += AᵀB within 1e-5 of the float64 product, relative to Σ|a||b|; a pre-filled C is kept and added to."""
    a = torch.randn(t, n_a).to(op_dtype)
    b = (torch.randn(t, n_b) * 10).to(op_dtype)
    c0 = torch.randn(n_a, n_b) * 100
    c = c0.clone()
    comoment_update(c, a, b, backend=backend, gemm="triton")
    # 16-bit products are exact in fp32, so every operand dtype meets the fp32 bound against its own values.
    exact = c0.double() + a.double().T @ b.double()
    scale = c0.double().abs() + a.double().abs().T @ b.double().abs()
    rel = ((c.double() - exact).abs() / scale).max().item()
    assert rel <= 1e-5, f"max error {rel:.3g} of Σ|a||b|"


@pytest.mark.parametrize("t, n_a, n_b", [(77, 72, 40), (200, 136, 64), (37, 53, 29)])
@pytest.mark.parametrize("op_dtype", HALF)
def test_comoment_update_tma_matches_float64(t, n_a, n_b, op_dtype):
    """gemm="triton-tma": the persistent TMA kernel where rows are 16-byte aligned, the blocked one elsewhere."""
    a = torch.randn(t, n_a).to(op_dtype)
    b = (torch.randn(t, n_b) * 10).to(op_dtype)
    c0 = torch.randn(n_a, n_b) * 100
    c = c0.clone()
    assert tma_compatible(c, a, b) == (n_a % 8 == 0 and n_b % 8 == 0)
    comoment_update(c, a, b, backend="triton", gemm="triton-tma")
    exact = c0.double() + a.double().T @ b.double()
    scale = c0.double().abs() + a.double().abs().T @ b.double().abs()
    rel = ((c.double() - exact).abs() / scale).max().item()
    assert rel <= 1e-5, f"max error {rel:.3g} of Σ|a||b|"


@pytest.mark.parametrize("t, n", [(1, 3), (45, 70), (40, 150)])
@pytest.mark.parametrize("op_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_comoment_update_symmetric_upper_triangle(t, n, op_dtype, backend, monkeypatch):
    """W += XᵀX on and above the diagonal (float64 oracle); blocks wholly below the diagonal are never touched."""
    monkeypatch.setattr("univ_kernels.comoment.SYMMETRIC_MIN_ROWS", 16)  # several row blocks at test sizes
    x = (torch.randn(t, n) * 3 + 1).to(op_dtype)
    w0 = torch.randn(n, n, dtype=torch.float64) * 50
    w0 = (w0 + w0.T).float()
    lower = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)
    w = torch.where(lower, float("nan"), w0)  # poison below the diagonal: the upper part must not read it
    comoment_update_symmetric(w, x, backend=backend, gemm="triton")
    exact = w0.double() + x.double().T @ x.double()
    scale = w0.double().abs() + x.double().abs().T @ x.double().abs()
    full = symmetrize_upper(w).double()
    rel = ((full - exact).abs() / scale).max().item()
    assert rel <= 1e-5, f"max error {rel:.3g} of Σ|x||x|"
    if n >= 150:  # half the work really was skipped: most of the lower triangle is still poison
        assert torch.isnan(w[lower]).float().mean() > 0.5


def test_symmetrize_upper_and_rejects_non_square():
    w = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 4.0, 5.0], [9.0, 9.0, 6.0]])
    assert symmetrize_upper(w).tolist() == [[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]]
    with pytest.raises(ValueError, match="square"):
        comoment_update_symmetric(torch.zeros(3, 4), torch.zeros(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_comoment_update_strided_operands_and_c_view(backend):
    """Operands of any strides; C a view inside a NaN-filled buffer: nothing outside it may be read or written."""
    t, n_a, n_b = 45, 70, 33
    a = torch.randn(n_a, t).t()  # column-major [t, n_a]
    b = torch.randn(t, 2 * n_b)[:, ::2]  # stride 2 along neurons
    buf = torch.full((n_a + 3, n_b + 40), float("nan"))
    c = buf[1 : 1 + n_a, 5 : 5 + n_b]
    c.zero_()
    comoment_update(c, a, b, backend=backend)
    assert_close_verbose(c, a.double().T @ b.double(), 1e-4, "C")
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[1 : 1 + n_a, 5 : 5 + n_b] = False
    assert torch.isnan(buf[outside]).all(), "the update wrote outside C"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t, n_a, n_b", [(0, 6, 4), (9, 0, 4), (9, 6, 0)])
def test_comoment_update_zero_size(backend, t, n_a, n_b):
    c = torch.full((n_a, n_b), 2.5)
    comoment_update(c, torch.randn(t, n_a), torch.randn(t, n_b), backend=backend)
    assert c.shape == (n_a, n_b) and (c == 2.5).all()


def test_comoment_update_rejects_mismatch():
    with pytest.raises(ValueError, match="C must be float32"):
        comoment_update(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="operands disagree"):
        comoment_update(torch.zeros(3, 4), torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="gemm must be one of"):
        comoment_update(torch.zeros(3, 4), torch.zeros(2, 3), torch.zeros(2, 4), gemm="magma")


# -- correlation_summary ---------------------------------------------------------------------------------------


def summary_inputs(t: int, n_a: int, n_b: int, dead_a=(), dead_b=()):
    """C, u_a, u_b, 1/σ_a, 1/σ_b of a real (shifted) stream, so r spans [−1, 1]; a duplicated column gives r ≈ 1."""
    x_a, x_b = correlated_pair(t, n_a, n_b, offset=2.0)
    x_b[:, -1] = x_a[:, 0]  # r = 1 (up to rounding, then clamped): the last histogram bin
    s_a, s_b = x_a.mean(0) + 0.5, x_b.mean(0) - 0.5  # shifted, so the rank-1 correction is exercised
    y_a, y_b = x_a.double() - s_a.double(), x_b.double() - s_b.double()
    c = (y_a.T @ y_b).float()
    u_a, u_b = (y_a.sum(0) / t**0.5).float(), (y_b.sum(0) / t**0.5).float()
    m2_a, m2_b = (y_a.square().sum(0) - y_a.sum(0) ** 2 / t), (y_b.square().sum(0) - y_b.sum(0) ** 2 / t)
    inv_a, inv_b = m2_a.rsqrt().float(), m2_b.rsqrt().float()
    inv_a[list(dead_a)] = float("nan")
    inv_b[list(dead_b)] = float("nan")
    return c, u_a, u_b, inv_a, inv_b


FIELDS = ("max_a", "argmax_a", "min_a", "argmin_a", "max_b", "argmax_b", "min_b", "argmin_b", "hist")


@pytest.mark.parametrize(
    "n_a, n_b, dead_a, dead_b, bins",
    [(70, 45, (), (), 20), (33, 129, (0, 32), (5,), 127), (1, 1, (), (), 1), (65, 40, (), (3, 4, 39), 128)],
)
def test_summary_triton_matches_torch(n_a, n_b, dead_a, dead_b, bins, poisoned_empty):
    """Same fp32 arithmetic, same order: identical values, indices and histogram, whatever the partials held."""
    args = summary_inputs(60, n_a, n_b, dead_a, dead_b)
    got = correlation_summary(*args, bins=bins, backend="triton")
    ref = summary_torch(*args, bins=bins)
    for f in FIELDS:
        g, r = getattr(got, f), getattr(ref, f)
        assert g.dtype == r.dtype and g.shape == r.shape, f"{f}: {g.dtype} {tuple(g.shape)} vs {r.dtype}"
        assert torch.equal(g.nan_to_num(9.0), r.nan_to_num(9.0)), f"{f} differs"
    assert (got.n_dead_a, got.n_dead_b) == (ref.n_dead_a, ref.n_dead_b) == (len(dead_a), len(dead_b))
    assert int(got.hist.sum()) == (n_a - len(dead_a)) * (n_b - len(dead_b))
    assert all(int(got.argmax_a[i]) == -1 and torch.isnan(got.max_a[i]) for i in dead_a)
    if n_b > 1 and 0 not in dead_a and n_b - 1 not in dead_b:
        # The duplicated column: r = 1 up to fp32 rounding (clamped if above), found, and in the last bin.
        assert got.max_a[0] >= 1 - 1e-6 and int(got.argmax_a[0]) == n_b - 1 and got.hist[-1] >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_all_dead_side(backend):
    """Every neuron of B dead: every r is undefined, so A's extremes are NaN / −1 and the histogram is empty."""
    c, u_a, u_b, inv_a, inv_b = summary_inputs(30, 9, 4, dead_b=range(4))
    s = correlation_summary(c, u_a, u_b, inv_a, inv_b, bins=10, backend=backend)
    assert torch.isnan(s.max_a).all() and (s.argmax_a == -1).all() and (s.argmin_b == -1).all()
    assert int(s.hist.sum()) == 0 and s.n_dead_b == 4


@pytest.mark.parametrize("n_a, n_b", [(0, 5), (5, 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_zero_size(backend, n_a, n_b):
    """No partner at all: extremes are NaN / −1 (as for a dead neuron) and the histogram is empty."""
    c = torch.zeros(n_a, n_b)
    s = correlation_summary(
        c, torch.zeros(n_a), torch.zeros(n_b), torch.ones(n_a), torch.ones(n_b), bins=8, backend=backend
    )
    assert s.max_a.shape == (n_a,) and s.max_b.shape == (n_b,) and s.hist.tolist() == [0] * 8
    assert torch.isnan(s.max_a).all() and torch.isnan(s.min_b).all()
    assert (s.argmax_a == -1).all() and (s.argmin_b == -1).all()


def test_summary_rejects_bad_shapes():
    c = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"u_b must have shape \(4,\)"):
        correlation_summary(c, torch.zeros(3), torch.zeros(3), torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="bins must be"):
        correlation_summary(c, torch.zeros(3), torch.zeros(4), torch.ones(3), torch.ones(4), bins=0)


def test_summary_matches_float64_histogram():
    """The histogram counts pairs by ⌊(r + 1)·bins/2⌋ as numpy's histogram does, up to fp32 at bin edges."""
    args = summary_inputs(80, 50, 37)
    c, u_a, u_b, inv_a, inv_b = (t.double() for t in args)
    r = ((c - u_a[:, None] * u_b[None, :]) * inv_a[:, None] * inv_b[None, :]).clamp(-1, 1).numpy()
    expected, _ = np.histogram(r, bins=16, range=(-1, 1))
    got = correlation_summary(*args, bins=16, backend="triton").hist.numpy()
    assert got.sum() == r.size and np.abs(got - expected).sum() <= 2


@pytest.mark.parametrize("dead_a, dead_b", [((), ()), ((0, 7), (3, 40))])
@pytest.mark.parametrize(
    "outputs",
    [{"max_a"}, {"argmax_a"}, {"argmin_a", "max_a"}, {"max_b"}, {"argmax_b", "hist"}, {"hist"}, {"argmax_a", "hist"}],
)
def test_summary_outputs_subset_matches_full(outputs, dead_a, dead_b):
    """Asking for fewer outputs gives the same ones (rows-only within 1 ulp), None for the rest, no histogram."""
    args = summary_inputs(60, 45, 200, dead_a, dead_b)  # 200 columns: the 64-wide argmax blocks plus a tail
    full = summary_torch(*args, bins=16)
    part = correlation_summary(*args, bins=16, backend="torch", outputs=outputs)
    want = set(outputs) | {k.removeprefix("arg") for k in outputs if k.startswith("arg")}
    for f in FIELDS[:-1]:
        got = getattr(part, f)
        if f not in want:
            assert got is None, f"{f} was not asked for"
        elif f.startswith("arg"):
            assert torch.equal(got, getattr(full, f)), f"{f} differs"
        else:
            torch.testing.assert_close(got, getattr(full, f), rtol=2e-7, atol=0, equal_nan=True, msg=f)
    assert torch.equal(part.hist, full.hist if "hist" in outputs else torch.zeros_like(full.hist))
    with pytest.raises(ValueError, match="outputs must be among"):
        correlation_summary(*args, outputs={"max"})


def test_summary_outputs_triton_backend_drops_the_rest():
    args = summary_inputs(40, 33, 20)
    s = correlation_summary(*args, bins=8, backend="triton", outputs={"max_b"})
    assert s.max_b is not None and s.argmax_b is None and s.max_a is None and int(s.hist.sum()) == 0

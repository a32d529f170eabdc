"""StreamingCorrelation against float64, chunking/merging invariance, dead neurons, bad input, save/load."""

import numpy as np
import pytest
import torch
from kernel_helpers import BACKENDS, assert_close_verbose, correlated_pair, reference_r

from univ_kernels import StreamingCorrelation


def run_stream(x_a, x_b, backend, batch=None, **kw):
    corr = StreamingCorrelation(x_a.shape[1], x_b.shape[1], backend=backend, **kw)
    batch = batch or x_a.shape[0]
    for t0 in range(0, x_a.shape[0], batch):
        corr.update(x_a[t0 : t0 + batch], x_b[t0 : t0 + batch])
    return corr


@pytest.mark.parametrize("t, n_a, n_b", [(2, 3, 5), (37, 37, 53), (300, 129, 65)])  # not tile multiples
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_correlation_matches_float64(t, n_a, n_b, dtype, atol, backend):
    x_a, x_b = correlated_pair(t, n_a, n_b, dtype=dtype)
    corr = run_stream(x_a, x_b, backend, batch=max(1, t // 3))
    assert corr.n == t
    assert_close_verbose(corr.correlation(), reference_r(x_a, x_b), atol)
    assert_close_verbose(corr.mean_a, x_a.double().mean(0), 1e-5 * float(x_a.double().abs().max()), "mean_a")
    assert_close_verbose(corr.var_b, x_b.double().var(0, unbiased=False), 1e-4, "var_b")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("operand_dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_operands(backend, operand_dtype, atol):
    """Centred 16-bit operands (the GPU default for half inputs) stay within their rounding of float64."""
    x_a, x_b = correlated_pair(200, 40, 33, offset=50.0)
    corr = run_stream(x_a, x_b, backend, batch=64, operand_dtype=operand_dtype)
    assert_close_verbose(corr.correlation(), reference_r(x_a, x_b), atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_columns(backend):
    """Mean 1000× the std: the shift keeps fp32 exact where Σxy − ΣxΣy/n would cancel catastrophically."""
    x_a, x_b = correlated_pair(400, 24, 17, offset=1000.0)
    corr = run_stream(x_a, x_b, backend, batch=50)
    assert_close_verbose(corr.correlation(), reference_r(x_a, x_b), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_batches_and_noncontiguous(backend):
    x_a, x_b = correlated_pair(40, 48, 30)
    x_a_t = x_a.t().contiguous().t()  # column-major view
    x_b_s = torch.stack([x_b, x_b], 2)[:, :, 0]  # strided view, stride 2 along neurons
    corr = run_stream(x_a_t, x_b_s, backend, batch=1)
    assert_close_verbose(corr.correlation(), reference_r(x_a, x_b), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_and_merge_invariance(backend):
    x_a, x_b = correlated_pair(240, 35, 29, offset=3.0)
    one = run_stream(x_a, x_b, backend).correlation()
    many = run_stream(x_a, x_b, backend, batch=7).correlation()
    shards = [run_stream(x_a[s], x_b[s], backend, batch=13) for s in (slice(0, 50), slice(50, 170), slice(170, 240))]
    merged = StreamingCorrelation(35, 29, backend=backend)
    for s in shards:
        merged.merge(s)
    assert merged.n == 240
    assert_close_verbose(many, one, 1e-6, "many batches")
    assert_close_verbose(merged.correlation(), one, 1e-6, "merged shards")
    assert_close_verbose(merged.mean_a, x_a.double().mean(0), 1e-5, "merged mean")


def test_merge_leaves_other_untouched():
    x_a, x_b = correlated_pair(60, 8, 6)
    a = run_stream(x_a[:30], x_b[:30], "torch")
    b = run_stream(x_a[30:], x_b[30:], "torch")
    before = {k: v.clone() for k, v in b.state_dict().items()}
    a.merge(b)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_matches_dense(backend):
    x_a, x_b = correlated_pair(150, 70, 45)
    corr = run_stream(x_a, x_b, backend, batch=40)
    ref = reference_r(x_a, x_b)
    s = corr.summary(bins=20)
    assert_close_verbose(s.max_a, ref.max(1), 1e-5, "max_a")
    assert_close_verbose(s.min_b, ref.min(0), 1e-5, "min_b")
    # argmax is compared by the value it points at (ties between near-equal values may flip in fp32)
    assert_close_verbose(ref[np.arange(70), s.argmax_a.numpy()], ref.max(1), 1e-5, "r at argmax_a")
    assert_close_verbose(ref[s.argmin_b.numpy(), np.arange(45)], ref.min(0), 1e-5, "r at argmin_b")
    expected_hist, _ = np.histogram(np.clip(ref, -1, 1), bins=20, range=(-1, 1))
    assert int(s.hist.sum()) == ref.size
    assert np.abs(s.hist.numpy() - expected_hist).sum() <= 2  # fp32 vs fp64 at bin edges


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_neurons(backend):
    x_a, x_b = correlated_pair(80, 10, 12)
    x_a[:, 3] = 7.25
    x_b[:, 0] = -1.0
    x_b[:, 11] = 0.0
    corr = run_stream(x_a, x_b, backend, batch=30)
    r = corr.correlation()
    assert torch.isnan(r[3]).all() and torch.isnan(r[:, 0]).all() and torch.isnan(r[:, 11]).all()
    s = corr.summary(bins=10)
    assert (s.n_dead_a, s.n_dead_b) == (1, 2)
    assert torch.isnan(s.max_a[3]) and int(s.argmax_a[3]) == -1 and int(s.argmin_a[3]) == -1
    assert torch.isnan(s.max_b[[0, 11]]).all() and s.argmax_b[[0, 11]].tolist() == [-1, -1]
    assert int(s.hist.sum()) == 9 * 10  # pairs touching a dead neuron are left out
    assert not torch.isnan(s.max_a[[0, 1, 2, 4]]).any()
    assert set(s.argmax_a.tolist()) <= set(range(1, 11)) | {-1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_ties_resolve_to_smallest_index(backend):
    x, _ = correlated_pair(50, 4, 4)
    # columns 0, 1, 3 equal to x_a[:, 0] bit for bit (an affine copy ties only up to fp32 rounding)
    x_b = torch.cat([x[:, :1], x[:, :1], x[:, 1:2], x[:, :1]], 1)
    x_a = torch.cat([x[:, :1], -x[:, :1]], 1)
    s = run_stream(x_a, x_b, backend).summary()
    assert s.argmax_a[0] == 0 and s.argmin_a[1] == 0
    assert s.argmax_b[0] == 0 and s.argmax_b[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rejected_and_state_unchanged(backend):
    x_a, x_b = correlated_pair(20, 6, 5)
    corr = run_stream(x_a, x_b, backend)
    before = {k: v.clone() for k, v in corr.state_dict().items()}
    bad = x_b.clone()
    bad[3, 2] = float("nan")
    bad[5, 4] = float("inf")
    with pytest.raises(ValueError, match=r"x_b contains 2 non-finite values .* 2 neurons \(first: column 2\)"):
        corr.update(x_a, bad)
    bad_a = x_a.clone()
    bad_a[0, 5] = float("-inf")
    with pytest.raises(ValueError, match="x_a contains 1 non-finite"):
        corr.update(bad_a, x_b)
    for k, v in corr.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_float16_overflow_is_named():
    x_a, x_b = correlated_pair(20, 4, 4)
    x_a[5::2, 1] = 1e6  # a spread of 1e6 inside one batch: centred on its mean, ±5e5 exceeds fp16's 65504
    corr = StreamingCorrelation(4, 4, backend="torch", operand_dtype=torch.float16)
    corr.update(x_a[:5], x_b[:5])
    with pytest.raises(ValueError, match="overflow the torch.float16 operand"):
        corr.update(x_a[5:], x_b[5:])


@pytest.mark.parametrize(
    "x_a, x_b, exc, match",
    [
        (torch.zeros(5, 3), torch.zeros(6, 4), ValueError, "x_a has 5 tokens but x_b has 6"),
        (torch.zeros(5, 2), torch.zeros(5, 4), ValueError, "x_a has 2 neurons"),
        (torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 4), TypeError, "float64"),
        (torch.zeros(5, 3, dtype=torch.int32), torch.zeros(5, 4), TypeError, "int32"),
        (torch.zeros(15), torch.zeros(5, 4), ValueError, "2-D"),
        ([[0.0]], torch.zeros(5, 4), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_messages(x_a, x_b, exc, match):
    with pytest.raises(exc, match=match):
        StreamingCorrelation(3, 4).update(x_a, x_b)


def test_device_mismatch_message():
    corr = StreamingCorrelation(3, 4, device="meta")
    with pytest.raises(ValueError, match="on cpu but its accumulator is on meta"):
        corr.update(torch.zeros(2, 3), torch.zeros(2, 4))


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        StreamingCorrelation(3, 4, backend="triton").update(torch.randn(4, 3), torch.randn(4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_continue_equals_uninterrupted(tmp_path, backend):
    x_a, x_b = correlated_pair(120, 21, 18, offset=10.0)
    straight = run_stream(x_a, x_b, backend, batch=20)
    first = run_stream(x_a[:60], x_b[:60], backend, batch=20)
    first.save(tmp_path / "state")
    assert (tmp_path / "state.safetensors").exists() and (tmp_path / "state.json").exists()
    resumed = StreamingCorrelation.load(tmp_path / "state")
    assert resumed.backend == backend and resumed.n == 60
    for t0 in range(60, 120, 20):
        resumed.update(x_a[t0 : t0 + 20], x_b[t0 : t0 + 20])
    assert_close_verbose(resumed.correlation(), straight.correlation(), 1e-6)
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_load_refuses_other_shapes(tmp_path):
    StreamingCorrelation(3, 4, device="cpu").save(tmp_path / "s")
    other = StreamingCorrelation(5, 4)
    state = StreamingCorrelation.load(tmp_path / "s").state_dict()
    with pytest.raises(ValueError, match="written for other models or neurons"):
        other.load_state_dict(state)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="(?i)header|deserial|invalid|metadata"):
        StreamingCorrelation.load(tmp_path / "junk")

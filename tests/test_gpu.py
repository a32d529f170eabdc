"""The same checks on a real GPU (compiled Triton kernels, cuBLAS, real bf16/fp16 rounding); skipped on CPU."""

import pytest
import torch
from kernel_helpers import assert_close_verbose, correlated_pair, reference_r

from univ_kernels import StreamingCorrelation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("gemm", ["cublas", "triton"])
@pytest.mark.parametrize(
    "dtype, operand_dtype, atol",
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float16, 2e-3),
        (torch.float16, torch.bfloat16, 1e-2),
    ],
)
@pytest.mark.parametrize("t, n_a, n_b", [(1, 37, 53), (1000, 300, 257), (4099, 1100, 700)])
def test_gpu_matches_float64(gemm, dtype, operand_dtype, atol, t, n_a, n_b):
    x_a, x_b = correlated_pair(t, n_a, n_b, offset=100.0, dtype=dtype)
    corr = StreamingCorrelation(n_a, n_b, device="cuda", backend="triton", operand_dtype=operand_dtype, gemm=gemm)
    for t0 in range(0, t, 1024):
        corr.update(x_a[t0 : t0 + 1024].cuda(), x_b[t0 : t0 + 1024].cuda())
    ref = reference_r(x_a, x_b)
    assert_close_verbose(corr.correlation().cpu(), ref, atol)
    if t > 1:
        s = corr.summary()
        assert_close_verbose(s.max_a.cpu(), ref.max(1), atol, "max_a")
        assert_close_verbose(s.min_b.cpu(), ref.min(0), atol, "min_b")
        assert int(s.hist.sum()) == n_a * n_b


def test_gpu_summary_equals_torch_reference():
    x_a, x_b = correlated_pair(2000, 700, 900, dtype=torch.float32)
    corr = StreamingCorrelation(700, 900, device="cuda", backend="triton")
    corr.update(x_a.cuda(), x_b.cuda())
    s_triton = corr.summary()
    corr.backend = "torch"
    s_torch = corr.summary()
    for name in ("max_a", "min_a", "max_b", "min_b"):
        torch.testing.assert_close(getattr(s_triton, name), getattr(s_torch, name), atol=1e-6, rtol=0)
    assert (s_triton.hist - s_torch.hist).abs().sum() <= 10

"""Throughput of one co-moment update (pre-pass + GEMM + moments) against the BLAS floor and the paper's scheme.

python3 -m pytest bench/test_bench_update.py --benchmark-only
"""

import pytest

from bench.common import PROVIDERS, SHAPES, clear_cache, extra_info, rounds_for, setup_update, skip_reason


@pytest.fixture(scope="module", autouse=True)
def _free_batches():
    yield
    clear_cache()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("provider", PROVIDERS["update"])
def test_update_speed(benchmark, provider, shape, device):
    reason = skip_reason("update", provider, shape, device)
    if reason:
        pytest.skip(reason)
    run, flops = setup_update(provider, shape, device)  # run() ends with torch.cuda.synchronize() on CUDA
    benchmark.pedantic(run, rounds=rounds_for(run, budget_s=5.0), warmup_rounds=1, iterations=1)
    if not benchmark.disabled:  # --benchmark-disable runs run() once and keeps no stats
        benchmark.extra_info.update(extra_info("update", provider, shape, flops, benchmark.stats["median"], device))

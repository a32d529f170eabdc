"""Throughput of finalize (C → per-neuron extremes and histogram, r never written) against one read of C.

python3 -m pytest bench/test_bench_finalize.py --benchmark-only
"""

import pytest

from bench.common import PROVIDERS, SHAPES, extra_info, rounds_for, setup_finalize, skip_reason


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("provider", PROVIDERS["finalize"])
def test_finalize_speed(benchmark, provider, shape, device):
    reason = skip_reason("finalize", provider, shape, device)
    if reason:
        pytest.skip(reason)
    run, nbytes = setup_finalize(provider, shape, device)  # run() ends with torch.cuda.synchronize() on CUDA
    benchmark.pedantic(run, rounds=rounds_for(run, budget_s=5.0), warmup_rounds=1, iterations=1)
    if not benchmark.disabled:  # --benchmark-disable runs run() once and keeps no stats
        benchmark.extra_info.update(extra_info("finalize", provider, shape, nbytes, benchmark.stats["median"], device))

"""Benchmarks of univ_kernels: pytest-benchmark suites (``bench/test_bench_*.py``) and a runner (``python3 -m bench``).

    python3 -m bench                               # every op, provider and shape this machine can run
    python3 -m bench --quick --csv runs/bench.csv  # small shapes, rows appended to a CSV
    python3 -m pytest bench/ --benchmark-only      # the same setups under pytest-benchmark
    python3 bench/gpu_check.py                     # CUDA: kernel correctness, ceilings, GPT2-small timings

Not collected by the unit tests (``testpaths = ["tests"]``); results and how they were taken: RESULTS.md.
"""

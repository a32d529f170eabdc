"""Shared benchmark setup: one table of shapes, one ``setup_<op>(provider, shape)`` per op, and a timer.

Every provider of an op is built by the same factory from the same data, so the pytest-benchmark suites
(``bench/test_bench_*.py``) and the runner (``python3 -m bench``) time exactly the same callables. Each
callable ends with ``torch.cuda.synchronize()`` on CUDA, so wall-clock time is device time.

Providers of ``update`` (one batch of T tokens into C [n_a, n_b]; FLOPs = 2·T·n_a·n_b):

- ``torch``: ``StreamingCorrelation(backend="torch").update`` — pre-pass, GEMM, float64 moment commit;
- ``triton``: the same with ``backend="triton"`` and the default GEMM (the project's CUDA path);
- ``triton-gemm``: ``backend="triton", gemm="triton"``, the fused-epilogue Triton GEMM (CUDA only);
- ``floor``: one BLAS/cuBLAS ``addmm`` on already-centred operands, the ceiling of any update;
- ``paper``: the original scheme (Gurnee et al.'s ``correlations_fast.py``): an fp32 matmul of the raw
  activations per batch added into a float64 accumulator on the host, plus sums and sums of squares.

Providers of ``finalize`` (C [n_a, n_b] → per-neuron max/argmax/min/argmin and histogram; bytes = 4·n_a·n_b):
``torch`` (``summary_torch``), ``triton`` (the fused kernel, CUDA only), ``floor`` (one reduction over C, the
unavoidable read), ``paper`` (dense float64 r from float64 sums on the host, stored in fp16, then max/argmax).

Triton on CPU exists only under its interpreter, which runs programs one by one in numpy: correct, never a
timing, so the ``triton*`` providers are skipped on CPU.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from univ_kernels import StreamingCorrelation, correlation_summary, summary_torch

OPS = ("update", "finalize")
PROVIDERS = {
    "update": ("torch", "triton", "triton-gemm", "floor", "paper"),
    "finalize": ("torch", "triton", "floor", "paper"),
}
GPU_ONLY_PROVIDERS = ("triton", "triton-gemm")


@dataclass(frozen=True)
class Shape:
    """One benchmark size: T tokens per batch, n_a × n_b neurons."""

    name: str
    t: int
    n_a: int
    n_b: int
    gpu_only: bool = False

    def __str__(self) -> str:
        return f"{self.t}x{self.n_a}x{self.n_b}"


# Toy → GPT2-small. GPT2-small has 12 layers × 3,072 MLP neurons = 36,864; the paper correlates all of one
# seed against all of another. CPU rows are what 2 cores time in seconds; GPU rows need ~40 GB at most.
SHAPES = (
    Shape("toy", 1024, 512, 384),
    Shape("gpt2-layer", 2048, 768, 768),  # d_model-sized: one residual stream against another
    Shape("gpt2-mlp", 4096, 3072, 3072),  # one MLP layer against one
    Shape("gpt2-4layers", 16384, 12288, 12288, gpu_only=True),  # a third of the model, K = 16k
    Shape("gpt2-small", 16384, 36864, 36864, gpu_only=True),  # every MLP neuron against every one, K = 16k
)
QUICK_SHAPES = {"cpu": ("toy", "gpt2-layer"), "cuda": ("toy", "gpt2-layer", "gpt2-mlp", "gpt2-4layers")}


def parse_shape(spec: str) -> Shape:
    """A name from SHAPES, or ``TxN_AxN_B`` (e.g. ``2048x768x768``)."""
    for s in SHAPES:
        if spec == s.name:
            return s
    try:
        t, n_a, n_b = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        names = ", ".join(s.name for s in SHAPES)
        raise ValueError(f"unknown shape {spec!r}: use one of {names}, or TxN_AxN_B such as 2048x768x768") from None
    return Shape(spec, t, n_a, n_b)


def shapes_for(device: torch.device, quick: bool = False) -> list[Shape]:
    if quick:
        return [s for s in SHAPES if s.name in QUICK_SHAPES[device.type]]
    return [s for s in SHAPES if device.type == "cuda" or not s.gpu_only]


# -- environment -----------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def blas_name() -> str:
    """Which BLAS torch was built with (its CPU GEMM), from ``torch.__config__.show()``."""
    config = torch.__config__.show()
    for key in ("BLAS_INFO=",):
        if key in config:
            return config.split(key, 1)[1].split(",", 1)[0].strip()
    return "unknown"


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - machines without triton
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "blas": blas_name()}


def skip_reason(op: str, provider: str, shape: Shape, device: torch.device) -> str | None:
    """Why ``provider`` cannot be timed here, or None when it can."""
    if provider not in PROVIDERS[op]:
        return f"{op} has no provider {provider!r}"
    if shape.gpu_only and device.type != "cuda":
        return f"{shape.name} is a GPU shape"
    if provider in GPU_ONLY_PROVIDERS and device.type != "cuda":
        return "Triton on CPU runs only under its interpreter: correct, but not a timing"
    if device.type == "cuda":
        need = bytes_needed(op, provider, shape)
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            return f"needs ~{need / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB free"
    return None


def bytes_needed(op: str, provider: str, shape: Shape) -> int:
    """Rough peak GPU memory one more provider adds (the shared batches counted until they exist)."""
    c = 4 * shape.n_a * shape.n_b  # one fp32 C
    acts = shape.t * (shape.n_a + shape.n_b)  # elements of one batch, both sides
    if op == "finalize":
        return 2 * c  # C and the torch backend's r chunks / the kernel's partials
    shared = 0 if (shape.t, shape.n_a, shape.n_b, "cuda") in _BATCHES else 2 * 2 * acts  # two bf16 batches
    extra = {
        "torch": c + 2 * acts + 14 * shape.t * max(shape.n_a, shape.n_b),  # fp32 temporaries of prepass_torch
        "triton": 2 * c + 2 * acts,  # C (twice while the Triton GEMM autotunes), fp16 operands
        "triton-gemm": 2 * c + 2 * acts,
        "floor": 2 * c + 2 * acts,  # C and addmm's new output; bf16 operands
        "paper": c + 4 * acts,  # the fp32 product and fp32 copies of the activations
    }[provider]
    return shared + extra


# -- data ------------------------------------------------------------------------------------------------------

_BATCHES: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def activation_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on GPU, as models run there (the update then centres into fp16 operands)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def batches(shape: Shape, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two pre-generated batches of activations (x_a [T, n_a], x_b [T, n_b]), shared by every provider.

    Columns have their own means (up to ±4) and scales, so centring matters; providers alternate between
    the two batches, so no call reuses the inputs of the call before it.
    """
    key = (shape.t, shape.n_a, shape.n_b, str(device))
    if key not in _BATCHES:
        dtype = activation_dtype(device)
        g = torch.Generator(device=device).manual_seed(0)
        out = []
        for _ in range(2):
            pair = []
            for n in (shape.n_a, shape.n_b):
                mean = torch.rand(n, generator=g, device=device) * 8 - 4
                scale = torch.rand(n, generator=g, device=device) + 0.5
                x = torch.randn(shape.t, n, generator=g, device=device) * scale + mean
                pair.append(x.to(dtype))
            out.append(tuple(pair))
        _BATCHES[key] = out
    return _BATCHES[key]


def clear_cache() -> None:
    _BATCHES.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- update ----------------------------------------------------------------------------------------------------


def setup_update(provider: str, shape: Shape, device: torch.device | None = None) -> tuple[Callable[[], None], int]:
    """(run, FLOPs): ``run()`` adds one batch of ``shape`` into an accumulator the way ``provider`` does."""
    device = device or default_device()
    data = batches(shape, device)
    cycle = itertools.cycle(data)
    flops = 2 * shape.t * shape.n_a * shape.n_b

    if provider in ("torch", "triton", "triton-gemm"):
        backend = "torch" if provider == "torch" else "triton"
        gemm = "triton" if provider == "triton-gemm" else None
        corr = StreamingCorrelation(shape.n_a, shape.n_b, device=device, backend=backend, gemm=gemm)
        corr.update(*data[1])  # the first batch fixes the shift (and compiles / autotunes): not timed

        def run():
            corr.update(*next(cycle))
            sync(device)

    elif provider == "floor":
        x_a, x_b = data[0]
        # Centred operands: on GPU bf16 (cuBLAS's bf16 ceiling), on CPU fp32 (its BLAS's only fast path).
        op_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        a = (x_a.float() - x_a.float().mean(0)).to(op_dtype)
        b = (x_b.float() - x_b.float().mean(0)).to(op_dtype)
        c = torch.zeros(shape.n_a, shape.n_b, device=device)
        if device.type == "cuda":

            def run():
                torch.addmm(c, a.T, b, out_dtype=torch.float32)  # β = 1: C is read, the sum written
                sync(device)

        else:

            def run():
                c.addmm_(a.T, b)

    elif provider == "paper":
        # The original accumulates on the host in float64 whatever device computed the product.
        acc = torch.zeros(shape.n_a, shape.n_b, dtype=torch.float64)
        sums = [torch.zeros(n, dtype=torch.float64) for n in (shape.n_a, shape.n_a, shape.n_b, shape.n_b)]

        def run():
            x_a, x_b = next(cycle)
            x_a, x_b = x_a.float(), x_b.float()
            prod = (x_a.T @ x_b).cpu()  # fp32 matmul on the activations' device; the GPU → host copy of C
            acc.add_(prod)  # the paper's `+=`: float32 added into float64, promoted element by element
            for s, v in zip(sums, (x_a.sum(0), x_a.square().sum(0), x_b.sum(0), x_b.square().sum(0)), strict=True):
                s.add_(v.cpu())
            sync(device)

    else:
        raise ValueError(f"unknown update provider {provider!r}; one of {PROVIDERS['update']}")
    return run, flops


# -- finalize --------------------------------------------------------------------------------------------------

PAPER_ROWS_PER_CHUNK = 3072  # the paper finalizes one layer (3,072 GPT2-small neurons) of model 1 at a time


def finalize_inputs(shape: Shape, device: torch.device):
    """C [n_a, n_b] fp32 with r ~ N(0, 0.3²) (some clamped), offsets u, and 1/σ; 1 % of neurons dead (NaN)."""
    g = torch.Generator(device=device).manual_seed(1)
    c = torch.randn(shape.n_a, shape.n_b, generator=g, device=device) * 0.3
    u_a = torch.randn(shape.n_a, generator=g, device=device) * 0.1
    u_b = torch.randn(shape.n_b, generator=g, device=device) * 0.1
    inv_a = torch.ones(shape.n_a, device=device)
    inv_b = torch.ones(shape.n_b, device=device)
    inv_a[::100] = float("nan")
    inv_b[::100] = float("nan")
    return c, u_a, u_b, inv_a, inv_b


def setup_finalize(provider: str, shape: Shape, device: torch.device | None = None) -> tuple[Callable[[], None], int]:
    """(run, bytes): ``run()`` reduces C [n_a, n_b] to per-neuron extremes and a histogram as ``provider`` does."""
    device = device or default_device()
    nbytes = 4 * shape.n_a * shape.n_b
    c, u_a, u_b, inv_a, inv_b = finalize_inputs(shape, device)

    if provider in ("torch", "triton"):

        def run():
            if provider == "torch":
                summary_torch(c, u_a, u_b, inv_a, inv_b, bins=100)
            else:
                correlation_summary(c, u_a, u_b, inv_a, inv_b, bins=100, backend="triton")
            sync(device)

        run()  # compile: not timed

    elif provider == "floor":

        def run():
            c.amax(dim=1)  # one read of C: what any finalize must at least do
            sync(device)

    elif provider == "paper":
        # float64 sums on the host, as the original kept them: S_xy, S_x, S_y, S_xx, S_yy over n tokens.
        n = 1e6
        sd_a, sd_b = (1 / inv_a.double()).nan_to_num(0.0).cpu(), (1 / inv_b.double()).nan_to_num(0.0).cpu()
        s_x, s_y = (u_a.double() * n**0.5).cpu(), (u_b.double() * n**0.5).cpu()
        s_xx, s_yy = sd_a.square() + s_x.square() / n, sd_b.square() + s_y.square() / n
        s_xy = c.double().cpu()  # so cov = S_xy − S_x S_y / n = C − u_a u_bᵀ: the r the other providers see
        r16 = torch.empty(shape.n_a, shape.n_b, dtype=torch.float16)

        def run():
            norm_y = (s_yy - s_y.square() / n).sqrt()
            for r0 in range(0, shape.n_a, PAPER_ROWS_PER_CHUNK):
                r1 = min(r0 + PAPER_ROWS_PER_CHUNK, shape.n_a)
                cov = s_xy[r0:r1] - torch.outer(s_x[r0:r1], s_y) / n
                norm_x = (s_xx[r0:r1] - s_x[r0:r1].square() / n).sqrt()
                r16[r0:r1] = (cov / torch.outer(norm_x, norm_y)).half()  # stored in fp16, as the paper saved it
            r = r16.float().nan_to_num(0.0)  # the paper set NaNs to zero before taking maxima
            r.max(dim=1), r.max(dim=0), r.min(dim=1), r.min(dim=0)
            torch.histc(r, bins=100, min=-1.0, max=1.0)

    else:
        raise ValueError(f"unknown finalize provider {provider!r}; one of {PROVIDERS['finalize']}")
    return run, nbytes


SETUPS = {"update": setup_update, "finalize": setup_finalize}


# -- throughput and timing -------------------------------------------------------------------------------------


def throughput(op: str, work: int, seconds: float) -> tuple[float, str]:
    """(value, unit): GFLOP/s for the update on CPU, TFLOP/s on GPU scale; GB/s for finalize."""
    if op == "update":
        gflops = work / seconds / 1e9
        return (gflops / 1e3, "TFLOP/s") if gflops >= 1e3 else (gflops, "GFLOP/s")
    return work / seconds / 1e9, "GB/s"


def extra_info(op: str, provider: str, shape: Shape, work: int, seconds: float, device: torch.device) -> dict:
    """What pytest-benchmark's ``extra_info`` and the runner's CSV record for one measurement."""
    info = {"op": op, "provider": provider, "shape": str(shape), "device": device_name(device), **versions()}
    if op == "update":
        info["flops"] = work
        info["gflops"] = work / seconds / 1e9
        info["tflops"] = work / seconds / 1e12
    else:
        info["bytes"] = work
        info["gbps"] = work / seconds / 1e9
    return info


def rounds_for(run: Callable[[], None], budget_s: float, lo: int = 3, hi: int = 20) -> int:
    """How many timed rounds fit in ``budget_s``, from one timed call (which also warms up)."""
    t0 = time.perf_counter()
    run()
    once = max(time.perf_counter() - t0, 1e-6)
    return max(lo, min(hi, int(budget_s / once)))


@dataclass
class Timing:
    samples: list[float]  # seconds, one per kept round
    rounds: int = 0  # rounds run
    quiet: int = 0  # rounds during which other processes left our cores alone (kept if ≥ 3 of them)
    busy: float = 0.0  # median share of the CPUs other processes used during the kept rounds

    def quantile(self, q: float) -> float:
        """Linear interpolation between order statistics (numpy's default)."""
        s = sorted(self.samples)
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def _cpu_busy_s() -> float | None:
    """Seconds of CPU time the whole machine has spent busy (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _others_share(busy0: float | None, cpu0: float, wall0: float) -> float:
    """Share of all CPUs used by *other* processes since (busy0, cpu0, wall0); 0 where unknown."""
    busy1 = _cpu_busy_s()
    if busy0 is None or busy1 is None:
        return 0.0
    wall = time.perf_counter() - wall0
    ours = time.process_time() - cpu0
    return max(0.0, (busy1 - busy0 - ours) / (wall * (os.cpu_count() or 1)))


QUIET_SHARE = 0.10  # a round during which other processes used > 10 % of the CPUs we need is retried


def quiet_limit() -> float:
    """Largest share of all CPUs other processes may use without touching the cores our threads run on.

    With 2 threads on 2 cores that is QUIET_SHARE; with ``torch.set_num_threads(1)`` another process may
    keep one core busy and the round still counts as quiet.
    """
    n_cpu = os.cpu_count() or 1
    spare = max(0, n_cpu - torch.get_num_threads())
    return (spare + QUIET_SHARE * min(n_cpu, torch.get_num_threads())) / n_cpu


def wait_quiet(max_wait_s: float, window_s: float = 0.25) -> bool:
    """Sleep until other processes leave our cores alone (``quiet_limit``) for a window; False after ``max_wait_s``."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        busy0, cpu0, wall0 = _cpu_busy_s(), time.process_time(), time.perf_counter()
        if busy0 is None:
            return True
        time.sleep(window_s)
        if _others_share(busy0, cpu0, wall0) <= quiet_limit():
            return True
        if time.perf_counter() > deadline:
            return False


def measure(
    runs: dict[str, Callable[[], None]], reps: int, warmup: int = 2, budget_s: float = 60.0, wait_s: float = 0.0
) -> dict:
    """Median-of-N wall-clock times, providers interleaved round by round, noisy rounds retried.

    On a shared machine (2 cores here, other people's tests alongside) another process stalls every
    OpenMP parallel region it preempts by a scheduler tick, which hurts providers that issue many small ops
    far more than one big GEMM. So: providers run round-robin (a slow drift hits all alike); before each
    round it waits up to ``wait_s`` for a quiet moment; a round in which other processes used the cores our
    threads need (``quiet_limit``, from /proc/stat) is run again, up to 3 × ``reps`` rounds; if fewer than 3
    rounds were quiet, all rounds are kept (``Timing.quiet`` and ``Timing.busy`` say so). Stops after
    ``reps`` quiet rounds, or (never before 3) once ``budget_s`` is spent. Each ``run`` synchronizes its
    device itself.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    limit = quiet_limit()
    quiet: dict[str, list[float]] = {k: [] for k in runs}
    every: dict[str, list[float]] = {k: [] for k in runs}
    shares: list[float] = []
    start = time.perf_counter()
    rounds = 0
    while rounds < 3 * reps:
        rounds += 1
        if wait_s > 0:
            wait_quiet(wait_s)
        busy0, cpu0, wall0 = _cpu_busy_s(), time.process_time(), time.perf_counter()
        times = {}
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name] = time.perf_counter() - t0
        share = _others_share(busy0, cpu0, wall0)
        for name, t in times.items():
            every[name].append(t)
            if share <= limit:
                quiet[name].append(t)
        shares.append(share)
        n_quiet = len(next(iter(quiet.values()), []))
        if n_quiet >= reps or (rounds >= 3 and time.perf_counter() - start > budget_s):
            break
    n_quiet = len(next(iter(quiet.values()), []))
    keep = quiet if n_quiet >= min(3, reps) else every
    kept_shares = [s for s in shares if s <= limit] if keep is quiet else shares
    busy = statistics.median(kept_shares) if kept_shares else 0.0
    return {k: Timing(v, rounds=rounds, quiet=n_quiet, busy=busy) for k, v in keep.items()}

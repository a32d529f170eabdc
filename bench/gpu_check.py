"""GPU check, in one call: every kernel against float64, the machine's ceilings, and GPT2-small timings.

    python3 bench/gpu_check.py                    # CUDA machine: (a) + (b) + (c); meant to take < 8 min on an H100
    python3 bench/gpu_check.py --skip-timing      # (a) only
    python3 bench/gpu_check.py --interpret        # CPU dry run of (a) under the Triton interpreter (tiny shapes)
    python3 bench/gpu_check.py --out runs/h100    # where gpu_check.json / gpu_check.csv go (default $OUT)

(a) Correctness, on fresh random data at shapes that are not tile multiples, for fp32/fp16/bf16 inputs and
    fp32/fp16/bf16 operands: the pre-pass (operand bits, sums, non-finite counts), the co-moment update via
    the Triton GEMM, the TMA GEMM (``gemm="triton-tma"``, also at 16-byte-aligned shapes where TMA really
    runs) and cuBLAS (C pre-filled, must be kept and added to; C a view inside a NaN buffer for the Triton
    GEMM, so out-of-bounds writes show), the upper-triangle W update (lower triangle NaN-poisoned), the
    whole ``StreamingCorrelation`` against float64 r,
    and the finalize summary (values, indices, histogram, dead neurons). Every buffer a kernel allocates is
    poisoned (``torch.empty`` returns NaN / 0x3ADBEEF) so an unwritten output shows, and every case runs
    three times and must repeat bit for bit (a race shows as a difference). Each case prints its max |Δr|
    (error in units of r) or its own metric, and PASS/FAIL.
(b) Ceilings: a 2 GiB device-to-device copy (GB/s, read + write) and a 16k³ cuBLAS bf16 matmul (TFLOP/s).
(c) Timings at n = 12,288 and n = 36,864 neurons per side (GPT2-small: 12 × 3,072), T = 16,384 tokens:
    pre-pass (GB/s), co-moment update with fp16 operands via Triton, Triton-TMA and cuBLAS (TFLOP/s), the
    within-layer W update on the upper triangle against a full cuBLAS addmm (TFLOP/s of the full GEMM), the full
    update, and finalize (GB/s of C), each as a % of the ceilings; then which GEMM is faster, against
    ``univ_kernels.comoment.DEFAULT_GEMM``.

(d) With ≥ 2 GPUs: ``univ correlate`` under torchrun (NCCL, one rank per GPU) against one process: same r
    (≤ 1e-5) and argmax.
(e) ``univ correlate --method screen`` against ``--method exact`` on the GPU (Triton kernels, fp16 operands),
    the shipped depth zoo's first two seeds: every float column of neurons.parquet within 1e-4 (the two
    methods sum the same fp16 operands in different orders), argmax differences counted, both wall times.

Exit status: 0 when every check passes (or there is no GPU: it says so and stops), 1 when one fails.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POISON_INT = 0x3ADBEEF
CHECK_SHAPES = [(1000, 777, 555), (4097, 1283, 389), (33, 130, 257), (1, 67, 3), (2049, 2053, 1031)]
INTERPRET_SHAPES = [(45, 67, 37), (1, 5, 3)]
TMA_SHAPES = [(3001, 1536, 1024), (16, 64, 8192)]  # 16-byte aligned rows (gemm="triton-tma" uses TMA only there)
TMA_SHAPES_INTERPRET = [(77, 72, 40)]
TIMING_SIZES = [(16384, 12288), (16384, 36864)]  # (T, n): medium, then GPT2-small
# |Δr| tolerances of the whole stream against float64, by operand dtype (tests/test_streaming.py uses the same).
R_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
GEMM_TOL = {"float32": 1e-5, "float16": 1e-4, "bfloat16": 1e-4}  # C error / √(Σa² Σb²), products exact in fp32
SUM_RTOL = 1e-5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and .csv (default $OUT)")
    p.add_argument("--skip-timing", action="store_true", help="correctness only")
    p.add_argument("--interpret", action="store_true", help="CPU dry run of the checks under TRITON_INTERPRET=1")
    p.add_argument("--repeats", type=int, default=3, help="runs per case that must agree bit for bit")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton kernels are defined, i.e. before univ_kernels loads

import torch  # noqa: E402

try:
    import univ_kernels  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import univ_kernels.comoment as comoment_mod  # noqa: E402
from univ_kernels import (  # noqa: E402
    StreamingCorrelation,
    comoment_update,
    correlation_summary,
    prepass,
    prepass_torch,
    summary_torch,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESULTS: list[dict] = []


def record(section: str, name: str, **fields) -> dict:
    row = {"section": section, "name": name, **fields}
    RESULTS.append(row)
    return row


# -- helpers ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def poisoned_empty():
    """Make ``torch.empty`` return NaN-filled float and POISON_INT-filled integer tensors while inside."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else POISON_INT)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def bits(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(xs, ys) -> bool:
    return all(x.shape == y.shape and torch.equal(bits(x), bits(y)) for x, y in zip(xs, ys, strict=True))


def repeat(fn, n: int):
    """Run ``fn`` (returning a tuple of tensors) n times under poisoned allocation; (first result, all bit-equal)."""
    outs = []
    for _ in range(n):
        with poisoned_empty():
            outs.append(tuple(t.clone() for t in fn()))
    return outs[0], all(same_bits(outs[0], o) for o in outs[1:])


def latent_pair(t, n_a, n_b, device, dtype, seed):
    """x_a [t, n_a], x_b [t, n_b] sharing latent factors (so r spans a real range), means ≫ std on some columns."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = max(2, min(n_a, n_b) // 4)
    z = torch.randn(t, k, generator=g, device=device, dtype=torch.float64)

    def side(n):
        x = z @ torch.randn(k, n, generator=g, device=device, dtype=torch.float64) / k**0.5
        x = x + 0.5 * torch.randn(t, n, generator=g, device=device, dtype=torch.float64)
        scale = torch.rand(n, generator=g, device=device, dtype=torch.float64) * 2 + 0.2
        offset = (torch.rand(n, generator=g, device=device, dtype=torch.float64) - 0.5) * 20
        return (x * scale + offset).to(dtype)

    return side(n_a), side(n_b)


def reference_r(x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """Pearson r in float64 from the exact input values; NaN for constant columns."""
    a = x_a.double() - x_a.double().mean(0)
    b = x_b.double() - x_b.double().mean(0)
    sa, sb = a.square().sum(0).sqrt(), b.square().sum(0).sqrt()
    sa[sa == 0], sb[sb == 0] = float("nan"), float("nan")
    return (a.T @ b) / torch.outer(sa, sb)


def nan_max_abs(d: torch.Tensor) -> float:
    d = d[~torch.isnan(d)]
    return float(d.abs().max()) if d.numel() else 0.0


def status(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(row: dict) -> None:
    err = row.get("error")
    err_s = f"{err:.2e}" if isinstance(err, float) else str(err)
    tol = row.get("tol")
    tol_s = f"{tol:.0e}" if isinstance(tol, float) else str(tol if tol is not None else "-")
    print(
        f"  {row['status']}  {row['name']:26s} {row['dtypes']:18s} {row['shape']:16s} {row['metric']:16s} "
        f"{err_s:>10s} (tol {tol_s}) repeat {'bit-equal' if row['repeat_equal'] else 'DIFFERS'}"
        + (f"  {row['note']}" if row.get("note") else ""),
        flush=True,
    )


# -- (a) correctness -------------------------------------------------------------------------------------------


def check_prepass(shape, in_name, op_name, device, repeats):
    t, n_a, _ = shape
    x, _ = latent_pair(t, n_a, 2, device, DTYPES[in_name], seed=11)
    x = x[:, : n_a - 1] if n_a > 2 else x  # a non-contiguous view: row stride n_a, n_a − 1 columns
    shift = x.float().mean(0) + 0.125
    op = DTYPES[op_name]

    def run():
        p = prepass(x, shift, operand_dtype=op, backend="triton")
        return p.operand, p.col_sum, p.col_sumsq, p.nonfinite, p.overflow

    (operand, col_sum, col_sumsq, bad, ovf), equal = repeat(run, repeats)
    ref = (x.float() - shift).to(op)
    mismatched = int((bits(operand) != bits(ref)).sum())
    y = ref.double()
    # Relative to Σ|y| and Σy²: the scale at which fp32 accumulation rounds.
    err_sum = float(((col_sum.double() - y.sum(0)).abs() / y.abs().sum(0).clamp(min=1e-30)).max())
    err_sq = float(((col_sumsq.double() - y.square().sum(0)).abs() / y.square().sum(0).clamp(min=1e-30)).max())
    counts_ok = not bad.any() and not ovf.any()
    ok = mismatched == 0 and max(err_sum, err_sq) <= SUM_RTOL and counts_ok and equal
    row = record(
        "correctness",
        "prepass",
        dtypes=f"{in_name}->{op_name}",
        shape=f"{t}x{x.shape[1]}",
        metric="rel err sums",
        error=max(err_sum, err_sq),
        tol=SUM_RTOL,
        repeat_equal=equal,
        status=status(ok),
        note=f"operand bits differ: {mismatched}" if mismatched else ("" if counts_ok else "non-zero counts"),
    )
    report(row)
    return ok


def check_prepass_nonfinite(device, repeats):
    """NaN / ±Inf counted per column; fp16 overflow after centring counted separately; same as torch."""
    t, n = 777, 300
    x = torch.randn(t, n, device=device)
    x[3, 2], x[500, 2], x[9, 299] = float("nan"), float("inf"), float("-inf")
    x[:, 150] = float("nan")
    x[5, 7], x[6, 7], x[700, 200] = 1e5, 1e5, -1e5  # finite, but outside fp16 after a shift of ~0
    shift = torch.zeros(n, device=device)
    (bad, ovf), equal = repeat(lambda: prepass(x, shift, operand_dtype=torch.float16, backend="triton")[4:], repeats)
    ref = prepass_torch(x, shift, torch.float16)
    ok = torch.equal(bad, ref.nonfinite) and torch.equal(ovf, ref.overflow) and int(bad.sum()) == t + 3
    ok = ok and int(ovf.sum()) == 3 and equal
    row = record(
        "correctness",
        "prepass non-finite",
        dtypes="float32->float16",
        shape=f"{t}x{n}",
        metric="count mismatch",
        error=int((bad != ref.nonfinite).sum() + (ovf != ref.overflow).sum()),
        tol=0,
        repeat_equal=equal,
        status=status(ok),
    )
    report(row)
    return ok


def check_comoment(shape, op_name, gemm, device, repeats):
    t, n_a, n_b = shape
    op = DTYPES[op_name]
    x_a, x_b = latent_pair(t, n_a, n_b, device, torch.float32, seed=22)
    a = (x_a - x_a.mean(0)).to(op)
    b = (x_b - x_b.mean(0)).to(op)
    a = a.t().contiguous().t() if gemm == "triton" else a  # column-major A: strides must be honoured
    s2 = torch.outer(a.double().square().sum(0), b.double().square().sum(0)).sqrt().clamp(min=1e-30)
    c0 = (torch.randn(n_a, n_b, device=device, dtype=torch.float64) * s2 * 0.5).float()
    exact = c0.double() + a.double().T @ b.double()

    def run():
        if gemm == "triton":  # C as a view inside a NaN-filled buffer: writes outside it would show
            buf = torch.full((n_a + 2, n_b + 33), float("nan"), device=device)
            c = buf[1 : 1 + n_a, 16 : 16 + n_b]
        else:
            buf = c = torch.empty(n_a, n_b, device=device)
        c.copy_(c0)
        comoment_update(c, a, b, backend="triton", gemm=gemm)
        return c, buf

    (c, buf), equal = repeat(run, repeats)
    err = float(((c.double() - exact).abs() / s2).max())
    outside_ok = True
    if gemm == "triton":
        inside = torch.zeros_like(buf, dtype=torch.bool)
        inside[1 : 1 + n_a, 16 : 16 + n_b] = True
        outside_ok = bool(torch.isnan(buf[~inside]).all())
    ok = err <= GEMM_TOL[op_name] and equal and outside_ok and bool(torch.isfinite(c).all())
    row = record(
        "correctness",
        f"comoment gemm={gemm}",
        dtypes=f"{op_name} ops",
        shape=f"{t}x{n_a}x{n_b}",
        metric="max |dr|",
        error=err,
        tol=GEMM_TOL[op_name],
        repeat_equal=equal,
        status=status(ok),
        note="" if outside_ok else "WROTE OUTSIDE C",
    )
    report(row)
    return ok


def check_symmetric(shape, op_name, gemm, device, repeats):
    """W += XᵀX on the upper triangle (comoment_update_symmetric): upper part vs float64, lower part poisoned."""
    t, n, _ = shape
    op = DTYPES[op_name]
    x, _ = latent_pair(t, n, 1, device, torch.float32, seed=23)
    x = (x - x.mean(0)).to(op)
    s2 = torch.outer(x.double().square().sum(0), x.double().square().sum(0)).sqrt().clamp(min=1e-30)
    w0 = torch.randn(n, n, device=device, dtype=torch.float64) * s2 * 0.5
    w0 = ((w0 + w0.T) / 2).float()
    lower = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=-1)
    exact = w0.double() + x.double().T @ x.double()

    def run():
        w = torch.where(lower, float("nan"), w0)
        comoment_mod.comoment_update_symmetric(w, x, backend="triton", gemm=gemm)
        return (comoment_mod.symmetrize_upper(w),)

    (full,), equal = repeat(run, repeats)
    err = float(((full.double() - exact).abs() / s2).max())
    ok = err <= GEMM_TOL[op_name] and equal and bool(torch.isfinite(full).all())
    row = record(
        "correctness",
        f"symmetric gemm={gemm}",
        dtypes=f"{op_name} ops",
        shape=f"{t}x{n}x{n}",
        metric="max |dr|",
        error=err,
        tol=GEMM_TOL[op_name],
        repeat_equal=equal,
        status=status(ok),
    )
    report(row)
    return ok


def check_stream(shape, in_name, op_name, gemm, device, repeats):
    t, n_a, n_b = shape
    x_a, x_b = latent_pair(t, n_a, n_b, device, DTYPES[in_name], seed=33)
    x_b[:, -1] = x_a[:, 0].to(x_b.dtype)  # one exact duplicate: r = 1

    def run():
        corr = StreamingCorrelation(n_a, n_b, device=device, backend="triton", operand_dtype=DTYPES[op_name], gemm=gemm)
        step = max(1, -(-t // 3))
        for t0 in range(0, t, step):
            corr.update(x_a[t0 : t0 + step], x_b[t0 : t0 + step])
        return (corr.correlation(),)

    (r,), equal = repeat(run, repeats)
    ref = reference_r(x_a, x_b)
    err = nan_max_abs(r.double() - ref) if t > 1 else 0.0
    nan_ok = torch.equal(torch.isnan(r), torch.isnan(ref))
    ok = err <= R_TOL[op_name] and equal and nan_ok
    row = record(
        "correctness",
        f"stream gemm={gemm}",
        dtypes=f"{in_name}->{op_name}",
        shape=f"{t}x{n_a}x{n_b}",
        metric="max |dr|",
        error=err,
        tol=R_TOL[op_name],
        repeat_equal=equal,
        status=status(ok),
        note="" if nan_ok else "NaN pattern differs",
    )
    report(row)
    return ok


def check_finalize(shape, device, repeats):
    t, n_a, n_b = shape
    t = max(t, 8)
    x_a, x_b = latent_pair(t, n_a, n_b, device, torch.float32, seed=44)
    x_b[:, -1] = x_a[:, 0]
    s_a, s_b = x_a.mean(0) + 0.5, x_b.mean(0) - 0.5
    y_a, y_b = x_a.double() - s_a.double(), x_b.double() - s_b.double()
    c = (y_a.T @ y_b).float()
    u_a, u_b = (y_a.sum(0) / t**0.5).float(), (y_b.sum(0) / t**0.5).float()
    m2_a = y_a.square().sum(0) - y_a.sum(0).square() / t
    m2_b = y_b.square().sum(0) - y_b.sum(0).square() / t
    inv_a, inv_b = m2_a.rsqrt().float(), m2_b.rsqrt().float()
    inv_a[1::97] = float("nan")  # dead neurons: NaN and −1, left out of the histogram
    inv_b[2::89] = float("nan")
    args = (c, u_a, u_b, inv_a, inv_b)
    fields = ("max_a", "argmax_a", "min_a", "argmin_a", "max_b", "argmax_b", "min_b", "argmin_b", "hist")

    def run():
        s = correlation_summary(*args, bins=100, backend="triton")
        return tuple(getattr(s, f) for f in fields)

    got, equal = repeat(run, repeats)
    got = dict(zip(fields, got, strict=True))
    ref = summary_torch(*args, bins=100)
    r64 = (c.double() - torch.outer(u_a.double(), u_b.double())) * torch.outer(inv_a.double(), inv_b.double())
    r64 = r64.clamp(-1, 1)
    rows_ok = ~torch.isnan(inv_a)
    cols_ok = ~torch.isnan(inv_b)
    live = r64[rows_ok][:, cols_ok]
    err = max(
        nan_max_abs(got["max_a"][rows_ok].double() - live.max(1).values),
        nan_max_abs(got["min_b"][cols_ok].double() - live.min(0).values),
        nan_max_abs(got["max_a"] - ref.max_a),
        nan_max_abs(got["min_b"] - ref.min_b),
    )
    # Indices are checked by the value they point at (near-ties may flip between fp32 and float64).
    at_idx = r64[rows_ok].gather(1, got["argmax_a"][rows_ok].clamp(min=0)[:, None]).squeeze(1)
    err_idx = nan_max_abs(at_idx - live.max(1).values)
    dead_ok = bool((got["argmax_a"][~rows_ok] == -1).all() and torch.isnan(got["max_a"][~rows_ok]).all())
    dead_ok = dead_ok and bool((got["argmin_b"][~cols_ok] == -1).all())
    hist_diff = int((got["hist"] - ref.hist).abs().sum())
    n_pairs = int(rows_ok.sum()) * int(cols_ok.sum())
    hist_ok = int(got["hist"].sum()) == n_pairs and hist_diff <= max(2, n_pairs // 100000)
    ok = max(err, err_idx) <= 1e-5 and dead_ok and hist_ok and equal
    note = f"hist L1 vs torch {hist_diff}" + ("" if dead_ok else ", dead neurons wrong")
    row = record(
        "correctness",
        "finalize summary",
        dtypes="float32 C",
        shape=f"{n_a}x{n_b}",
        metric="max |dr| ext/idx",
        error=max(err, err_idx),
        tol=1e-5,
        repeat_equal=equal,
        status=status(ok),
        note=note,
    )
    report(row)
    return ok


def check_pairs(shape, op_name, device, repeats):
    """The gathered candidate-pairs kernel (univ_kernels.pairs) vs float64, C poisoned around, repeats bit-equal."""
    from univ_kernels.pairs import gathered_comoment_update

    t, n_a, n_b = shape
    op = DTYPES[op_name]
    x_a, x_b = latent_pair(t, n_a, n_b, device, torch.float32, seed=23)
    a, b = (x_a - x_a.mean(0)).to(op), (x_b - x_b.mean(0)).to(op)
    k = 37  # not a multiple of the candidate tile
    cand = torch.randint(0, n_b, (n_a, k), device=device, generator=torch.Generator(device=device).manual_seed(5))
    s2 = torch.outer(a.double().square().sum(0), b.double().square().sum(0)).sqrt().clamp(min=1e-30).gather(1, cand)
    exact = (a.double().T @ b.double()).gather(1, cand)

    def run():
        buf = torch.full((n_a + 2, k + 9), float("nan"), device=device)
        c = buf[1 : 1 + n_a, 4 : 4 + k]
        c.zero_()
        gathered_comoment_update(c, a, b, cand, backend="triton")
        return c, buf

    (c, buf), equal = repeat(run, repeats)
    err = float(((c.double() - exact).abs() / s2).max())
    inside = torch.zeros_like(buf, dtype=torch.bool)
    inside[1 : 1 + n_a, 4 : 4 + k] = True
    outside_ok = bool(torch.isnan(buf[~inside]).all())
    ok = err <= 1e-5 and equal and outside_ok and bool(torch.isfinite(c).all())
    row = record("correctness", "candidate pairs", dtypes=f"{op_name} ops", shape=f"{t}x{n_a}x{n_b} k={k}",
                 metric="max |dr|", error=err, tol=1e-5, repeat_equal=equal, status=status(ok),
                 note="" if outside_ok else "WROTE OUTSIDE C")  # fmt: skip
    report(row)
    return ok


def attempt(check, *args) -> bool:
    """Run one check; an exception is a FAIL with its message, and the other checks still run."""
    try:
        return check(*args)
    except Exception as e:  # report every failure, stop at none
        row = record(
            "correctness",
            check.__name__,
            dtypes=str(args[1:3]),
            shape=str(args[0]),
            metric="exception",
            error="-",
            tol=None,
            repeat_equal=False,
            status="FAIL",
            note=f"{type(e).__name__}: {e}"[:300],
        )
        report(row)
        return False


def run_correctness(device, shapes, repeats) -> bool:
    print("(a) correctness: triton kernels vs float64 / torch, poisoned outputs, repeated runs bit for bit", flush=True)
    gemms = ["triton", "triton-tma", "cublas"] if device.type == "cuda" else ["triton", "triton-tma"]
    ok = True
    t0 = time.perf_counter()
    for shape in shapes:
        for in_name in DTYPES:
            for op_name in DTYPES:
                ok &= attempt(check_prepass, shape, in_name, op_name, device, repeats)
        for op_name in DTYPES:
            for gemm in gemms:
                ok &= attempt(check_comoment, shape, op_name, gemm, device, repeats)
        for in_name in DTYPES:
            for op_name in DTYPES:
                for gemm in gemms:
                    ok &= attempt(check_stream, shape, in_name, op_name, gemm, device, repeats)
        for op_name in DTYPES:
            for gemm in gemms:
                ok &= attempt(check_symmetric, shape, op_name, gemm, device, repeats)
        ok &= attempt(check_finalize, shape, device, repeats)
        for op_name in DTYPES:
            ok &= attempt(check_pairs, shape, op_name, device, repeats)
    for shape in TMA_SHAPES if device.type == "cuda" else TMA_SHAPES_INTERPRET:  # aligned rows: TMA really runs
        for op_name in ("float16", "bfloat16"):
            ok &= attempt(check_comoment, shape, op_name, "triton-tma", device, repeats)
    ok &= attempt(check_prepass_nonfinite, device, repeats)
    n_fail = sum(r["status"] == "FAIL" for r in RESULTS if r["section"] == "correctness")
    n_all = sum(r["section"] == "correctness" for r in RESULTS)
    print(f"  -> {n_all - n_fail}/{n_all} correctness checks passed ({time.perf_counter() - t0:.0f} s)\n", flush=True)
    return ok


# -- (b) ceilings and (c) timings ------------------------------------------------------------------------------


def bench_ms(fn, rep_ms: float = 500.0) -> tuple[float, float, float]:
    """(p50, p20, p80) in ms from triton.testing.do_bench (CUDA events, L2 flushed between runs)."""
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=max(25, rep_ms // 5), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def copy_ceiling(device) -> float:
    n = 2**29  # 2 GiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    p50, p20, p80 = bench_ms(lambda: dst.copy_(src))
    gbps = 2 * 4 * n / (p50 * 1e-3) / 1e9
    record("ceiling", "d2d copy 2 GiB", p50_ms=p50, p20_ms=p20, p80_ms=p80, value=gbps, unit="GB/s")
    print(f"  device-to-device copy of 2 GiB: {p50:.3f} ms -> {gbps:.0f} GB/s (read + write)", flush=True)
    return gbps


def matmul_ceiling(device) -> float:
    m = 16384
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    p50, p20, p80 = bench_ms(lambda: a @ b, rep_ms=1000)
    tflops = 2 * m**3 / (p50 * 1e-3) / 1e12
    record("ceiling", "cublas bf16 16k^3", p50_ms=p50, p20_ms=p20, p80_ms=p80, value=tflops, unit="TFLOP/s")
    print(f"  cuBLAS bf16 matmul {m}^3: {p50:.2f} ms -> {tflops:.0f} TFLOP/s", flush=True)
    return tflops


def run_ceilings(device) -> dict:
    print("(b) ceilings", flush=True)
    ceilings = {"GB/s": copy_ceiling(device)}
    torch.cuda.empty_cache()
    ceilings["TFLOP/s"] = matmul_ceiling(device)
    torch.cuda.empty_cache()
    print()
    return ceilings


def time_size(t: int, n: int, device, ceilings: dict) -> str:
    """Time every GPU piece at T = t, n_a = n_b = n; returns the faster co-moment GEMM."""
    shape = f"{t}x{n}x{n}"
    g = torch.Generator(device=device).manual_seed(5)
    x_a = (torch.randn(t, n, generator=g, device=device) + 2).to(torch.bfloat16)
    x_b = (torch.randn(t, n, generator=g, device=device) - 1).to(torch.bfloat16)
    shift_a, shift_b = x_a[:1024].float().mean(0), x_b[:1024].float().mean(0)
    a = prepass(x_a, shift_a, operand_dtype=torch.float16, backend="triton").operand  # also compiles
    b = prepass(x_b, shift_b, operand_dtype=torch.float16, backend="triton").operand
    a_bf, b_bf = a.to(torch.bfloat16), b.to(torch.bfloat16)
    c = torch.zeros(n, n, device=device)
    flops, prep_bytes = 2 * t * n * n, t * n * (2 + 2)  # pre-pass: bf16 read, fp16 written

    def timed(what, fn, work, unit, rep_ms=2000):
        try:
            p50, p20, p80 = bench_ms(fn, rep_ms)
        except Exception as e:  # one failing piece must not hide the timings of the others
            record("timing", what, shape=shape, error=f"{type(e).__name__}: {e}"[:300])
            print(f"  {what:32s} {shape:18s} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return float("inf")
        value = work / (p50 * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
        pct = 100 * value / ceilings[unit]
        record("timing", what, shape=shape, p50_ms=p50, p20_ms=p20, p80_ms=p80, value=value, unit=unit, pct_ceiling=pct)
        spread = f"{p20:.3f}-{p80:.3f}"
        print(f"  {what:32s} {shape:18s} {p50:9.3f} {spread:>17s} {value:9.1f} {unit:7s} {pct:6.1f}%", flush=True)
        return p50

    def prep():
        prepass(x_a, shift_a, operand_dtype=torch.float16, backend="triton")

    timed("prepass triton bf16->fp16", prep, prep_bytes, "GB/s", rep_ms=500)
    gemm_ms = {}
    for gemm in ("triton", "triton-tma", "cublas"):
        with contextlib.suppress(Exception):  # compile and autotune, not timed; a failure shows in timed()
            comoment_update(c, a, b, backend="triton", gemm=gemm)
        gemm_ms[gemm] = timed(
            f"comoment gemm={gemm} fp16", lambda g=gemm: comoment_update(c, a, b, gemm=g), flops, "TFLOP/s"
        )
    timed("floor: cuBLAS addmm fp16->fp32", lambda: torch.addmm(c, a.T, b, out_dtype=torch.float32), flops, "TFLOP/s")
    timed(
        "floor: cuBLAS addmm bf16->fp32",
        lambda: torch.addmm(c, a_bf.T, b_bf, out_dtype=torch.float32),
        flops,
        "TFLOP/s",
    )
    d = min(n, 3072)  # one GPT2-small layer: W_l += X_lᵀX_l, full GEMM vs the upper triangle only
    w = torch.zeros(d, d, device=device)
    sym_flops = 2 * t * d * d
    for gemm in ("triton", "cublas"):
        with contextlib.suppress(Exception):
            comoment_mod.comoment_update_symmetric(w, a[:, :d], backend="triton", gemm=gemm)
        timed(
            f"W upper-triangle gemm={gemm}",
            lambda g=gemm: comoment_mod.comoment_update_symmetric(w, a[:, :d], backend="triton", gemm=g),
            sym_flops,
            "TFLOP/s",
        )
    timed(
        "W full addmm (cuBLAS)",
        lambda: torch.addmm(w, a[:, :d].T, a[:, :d], out_dtype=torch.float32, out=w),
        sym_flops,
        "TFLOP/s",
    )
    for gemm in ("triton", "triton-tma", "cublas"):
        corr = StreamingCorrelation(n, n, device=device, backend="triton", gemm=gemm)
        corr.update(x_a, x_b)  # the first batch fixes the shift: not timed
        timed(f"full update gemm={gemm}", lambda corr=corr: corr.update(x_a, x_b), flops, "TFLOP/s")
        corr = None  # free its C before the next one
        torch.cuda.empty_cache()
    inv, u = torch.full((n,), t**-0.5, device=device), torch.zeros(n, device=device)
    c.normal_(0.0, 0.3 * t)  # r = C / t ~ N(0, 0.3²), like a real run's spread over the histogram
    correlation_summary(c, u, u, inv, inv, backend="triton")  # compile: not timed
    summary = lambda: correlation_summary(c, u, u, inv, inv, backend="triton")  # noqa: E731
    timed("finalize summary triton", summary, 4 * n * n, "GB/s", rep_ms=1000)
    return min(gemm_ms, key=gemm_ms.get)


def run_timings(device, ceilings: dict) -> None:
    print("(c) timings (fp16 operands from bf16 activations)", flush=True)
    print(f"  {'what':32s} {'T x n x n':18s} {'p50 ms':>9s} {'p20-p80 ms':>17s} {'throughput':>17s} {'% ceil':>7s}")
    faster = {}
    for t, n in TIMING_SIZES:
        free, _ = torch.cuda.mem_get_info(device)
        need = 4 * n * n * 3 + t * n * 2 * 8  # C for kernel, stream and autotune copy; bf16 inputs, operands, slack
        if need > 0.9 * free:
            print(f"  skip n = {n}: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
            continue
        faster[f"{t}x{n}x{n}"] = time_size(t, n, device, ceilings)
        torch.cuda.empty_cache()
    print()
    for shape, g in faster.items():
        print(f"  faster co-moment GEMM at {shape}: {g}")
    if faster:
        winner = faster[list(faster)[-1]]  # the largest size run decides: it is what a real run spends its time on
        agree = winner == comoment_mod.DEFAULT_GEMM
        msg = "matches" if agree else f"DIFFERS: set DEFAULT_GEMM = {winner!r} in univ_kernels/comoment.py"
        print(f"  univ_kernels.comoment.DEFAULT_GEMM = {comoment_mod.DEFAULT_GEMM!r}: {msg}")
        record("timing", "default gemm", value=comoment_mod.DEFAULT_GEMM, faster=winner, agree=agree)


# -- main ------------------------------------------------------------------------------------------------------


def write_out(out: Path, device_desc: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    import triton

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_desc,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "results": RESULTS}, indent=2, default=str) + "\n")
    keys = sorted({k for r in RESULTS for k in r}, key=lambda k: (k not in ("section", "name"), k))
    with (out / "gpu_check.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*keys, *meta])
        w.writeheader()
        for r in RESULTS:
            w.writerow({**r, **meta})
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.csv'}")


def check_nccl_run(device) -> bool:
    """(d) ``univ correlate`` under torchrun, one rank per GPU (NCCL), against the one-process run on GPU 0."""
    import subprocess
    import tempfile

    import pandas as pd

    n_gpu = torch.cuda.device_count()
    if device.type != "cuda" or n_gpu < 2:
        print(f"  ----  NCCL run: needs ≥ 2 GPUs, this machine has {n_gpu}; skipped")
        record("distributed", "nccl_vs_single", status="SKIP", gpus=n_gpu)
        return True
    sys.path.insert(0, str(REPO))
    from bench.bench_correlate import make_seeds
    from univ.corpus import write_corpus_files

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seeds = make_seeds(root, 3, "zoo")
        data = write_corpus_files(root, "heldout")
        base = ["-m", "univ", "correlate", *map(str, seeds), "--data", str(data), "--tokens", "20000", "--ctx", "128"]
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        runs = {"single": [sys.executable, *base, "--out", str(root / "single")],
                "nccl": [torchrun, "--standalone", "--nproc-per-node", str(n_gpu), *base, "--out", str(root / "nccl")]}
        for name, cmd in runs.items():
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
            if done.returncode != 0:
                print(f"  FAIL  NCCL run: {name} exited {done.returncode}: {done.stderr[-400:]}")
                record("distributed", "nccl_vs_single", status="FAIL", error=done.stderr[-400:])
                return False
        a, b = (pd.read_parquet(root / n / "neurons.parquet") for n in ("single", "nccl"))
    cols = [c for c in a.columns if c.startswith(("max_corr", "mean_corr", "excess_corr"))]
    err = max(float((a[c] - b[c]).abs().max()) for c in cols)
    same_arg = all(a[c].equals(b[c]) for c in a.columns if c.startswith("argmax_"))
    ok = err <= 1e-5 and same_arg
    print(f"  {status(ok)}  NCCL run on {n_gpu} GPUs vs one process: max |Δr| {err:.2e}, argmax equal {same_arg}")
    record("distributed", "nccl_vs_single", status=status(ok), gpus=n_gpu, max_abs_dr=err, argmax_equal=same_arg)
    return ok


def check_screen_run(device) -> bool:
    """(e) the screen method against the exact one on this GPU: the same table (≤ 1e-4), and both wall times."""
    import subprocess
    import tempfile

    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from univ.corpus import write_corpus_files
    from univ.zoo import resolve_zoo, seed_dirs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seeds = seed_dirs(resolve_zoo("depth"))[:2]
        data = write_corpus_files(root, "heldout")
        base = [sys.executable, "-m", "univ", "correlate", *map(str, seeds), "--data", str(data), "--tokens",
                "100000", "--ctx", "128", "--batch-size", "16"]
        walls = {}
        for method in ("exact", "screen"):
            t0 = time.perf_counter()
            done = subprocess.run([*base, "--method", method, "--screen-tokens", "20000", "--out",
                                   str(root / method)], capture_output=True, text=True, timeout=500, cwd=REPO)
            walls[method] = time.perf_counter() - t0
            if done.returncode != 0:
                print(f"  FAIL  screen run: {method} exited {done.returncode}: {done.stderr[-400:]}")
                record("screen", "screen_vs_exact", status="FAIL", error=done.stderr[-400:])
                return False
        a, b = (pd.read_parquet(root / n / "neurons.parquet") for n in ("exact", "screen"))
        rep = json.loads((root / "screen" / "run.json").read_text())["screen"]
    err = max(float(np.nanmax((a[c] - b[c]).abs())) for c in a.columns if a[c].dtype.kind == "f")
    n_arg = sum(int((a[c] != b[c]).sum()) for c in a.columns if c.startswith("argmax_"))
    ok = err <= 1e-4
    print(f"  {status(ok)}  screen vs exact on {device}: max |Δ| {err:.2e}, argmax differences {n_arg}, "
          f"exact {walls['exact']:.1f} s, screen {walls['screen']:.1f} s, verified flops ratio {rep['flops']['ratio']}")
    record("screen", "screen_vs_exact", status=status(ok), max_abs_diff=err, argmax_diffs=n_arg,
           exact_s=walls["exact"], screen_s=walls["screen"], flops_ratio=rep["flops"]["ratio"])
    return ok


def main() -> int:
    if not torch.cuda.is_available() and not ARGS.interpret:
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False), nothing to check. Run it on a "
            "GPU machine; `python3 bench/gpu_check.py --interpret` dry-runs the correctness checks on CPU."
        )
        return 0
    device = torch.device("cuda" if not ARGS.interpret else "cpu")
    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {desc}; torch {torch.__version__}; DEFAULT_GEMM = {comoment_mod.DEFAULT_GEMM!r}\n", flush=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ok = run_correctness(device, INTERPRET_SHAPES if ARGS.interpret else CHECK_SHAPES, ARGS.repeats)
    if device.type == "cuda":
        ok = attempt(check_nccl_run, device) and ok
        ok = attempt(check_screen_run, device) and ok
    if device.type == "cuda" and not ARGS.skip_timing:
        ceilings = run_ceilings(device)
        run_timings(device, ceilings)
    out = ARGS.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "runs" / "gpu_check")
    write_out(out, desc)
    print(f"\n{'ALL CHECKS PASS' if ok else 'SOME CHECKS FAIL'} ({time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

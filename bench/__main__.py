"""Benchmark runner: every op × provider × shape this machine can run, one table, the goals checked.

    python3 -m bench                                  # CPU: toy → gpt2-mlp; CUDA: toy → GPT2-small (36,864²)
    python3 -m bench --quick                          # small shapes, 3 rounds
    python3 -m bench --shapes gpt2-mlp,8192x1024x1024 --ops update --csv runs/bench.csv

No pytest needed. Providers of one (op, shape) are timed round-robin (see ``bench.common.measure``), so load
from other processes on a shared machine hits all of them alike. Columns: median ms (p20–p80), throughput
(GFLOP/s or TFLOP/s for the update, 2·T·n_a·n_b FLOPs; GB/s of C read for finalize, 4·n_a·n_b bytes),
``x floor`` = floor time / this time (the fraction of the plain BLAS/cuBLAS call reached), ``x paper`` =
paper time / this time (the speed-up over the original scheme).

Goals (the project's performance model), printed PASS/FAIL:
- CPU, at the GPT2-sized shapes: the full update (``torch``) ≥ 0.9 × floor and ≥ 1.5 × the paper's scheme;
- H100, at 36,864 × 36,864 with K ≥ 16k: the full update (``triton``, the CUDA default) ≥ 0.9 × cuBLAS bf16
  and ≥ 650 TFLOP/s;
- memory: a ``univ correlate`` run's measured peak within 10 % of its plan (``--memory``, bench.bench_memory).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    OPS,
    PROVIDERS,
    SETUPS,
    Shape,
    Timing,
    clear_cache,
    default_device,
    device_name,
    measure,
    parse_shape,
    shapes_for,
    skip_reason,
    throughput,
    versions,
)

CPU_GOAL_SHAPES = ("gpt2-layer", "gpt2-mlp")
CPU_MIN_X_FLOOR, CPU_MIN_X_PAPER = 0.9, 1.5
GPU_MIN_X_FLOOR, GPU_MIN_TFLOPS, GPU_GOAL_N, GPU_GOAL_T = 0.9, 650.0, 36864, 16384


@dataclass
class Row:
    op: str
    shape: Shape
    provider: str
    timing: Timing
    work: int  # FLOPs (update) or bytes (finalize)
    x_floor: float | None = None
    x_paper: float | None = None

    @property
    def value_unit(self) -> tuple[float, str]:
        return throughput(self.op, self.work, self.timing.median)


_SAID: set[str] = set()


def run_op(op: str, shape: Shape, device: torch.device, reps: int, budget_s: float, wait_s: float) -> list[Row]:
    runs, works = {}, {}
    for provider in PROVIDERS[op]:
        reason = skip_reason(op, provider, shape, device)  # after earlier setups, so GPU memory is up to date
        if reason:
            if reason not in _SAID or "GiB" in reason:  # each reason once, memory ones every time
                print(f"  skip {op} {provider} {shape.name}: {reason}", flush=True)
                _SAID.add(reason)
            continue
        runs[provider], works[provider] = SETUPS[op](provider, shape, device)
    print(f"  {op} {shape.name} ({shape}): timing {', '.join(runs)}", flush=True)
    timings = measure(runs, reps=reps, warmup=1, budget_s=budget_s, wait_s=wait_s)
    rows = [Row(op, shape, p, timings[p], works[p]) for p in runs]
    floor = timings.get("floor")
    paper = timings.get("paper")
    for r in rows:
        r.x_floor = floor.median / r.timing.median if floor else None
        r.x_paper = paper.median / r.timing.median if paper else None
    del runs
    clear_cache()
    return rows


def print_table(rows: list[Row]) -> None:
    head = f"{'op':9s} {'shape':14s} {'T x n_a x n_b':19s} {'provider':12s} {'median ms':>10s} {'p20-p80 ms':>17s} "
    head += f"{'throughput':>18s} {'x floor':>8s} {'x paper':>8s} {'quiet':>7s} {'busy':>5s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        value, unit = r.value_unit
        spread = f"{r.timing.quantile(0.2) * 1e3:.2f}-{r.timing.quantile(0.8) * 1e3:.2f}"
        xf = f"{r.x_floor:.2f}" if r.x_floor is not None else "-"
        xp = f"{r.x_paper:.2f}" if r.x_paper is not None else "-"
        print(
            f"{r.op:9s} {r.shape.name:14s} {str(r.shape):19s} {r.provider:12s} {r.timing.median * 1e3:10.2f} "
            f"{spread:>17s} {fmt(value):>10s} {unit:7s} {xf:>8s} {xp:>8s} "
            f"{r.timing.quiet:>3d}/{r.timing.rounds:<3d} {100 * r.timing.busy:4.0f}%"
        )
    print(
        "quiet: rounds during which other processes left our threads' cores alone / rounds run; medians are of the\n"
        "quiet rounds when there were >= 3, else of all rounds (then only indicative). busy: other processes'\n"
        "median share of the CPUs during the rounds kept."
    )


def fmt(value: float) -> str:
    """Three significant figures, never scientific notation."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def find(rows: list[Row], op: str, provider: str, shape_name: str | None = None, pred=None) -> Row | None:
    for r in rows:
        if r.op == op and r.provider == provider and (shape_name is None or r.shape.name == shape_name):
            if pred is None or pred(r.shape):
                return r
    return None


def check_goals(rows: list[Row], device: torch.device) -> list[tuple[str, bool | None, str]]:
    """(goal, PASS/FAIL/None = not measured, what was measured)."""
    out = []
    if device.type == "cpu":
        for name in CPU_GOAL_SHAPES:
            r = find(rows, "update", "torch", name)
            if r is None or r.x_floor is None or r.x_paper is None:
                out.append((f"CPU update {name}: >= {CPU_MIN_X_FLOOR} x floor, >= {CPU_MIN_X_PAPER} x paper", None, ""))
                continue
            out.append(
                (
                    f"CPU update {name}: torch >= {CPU_MIN_X_FLOOR} x BLAS addmm",
                    r.x_floor >= CPU_MIN_X_FLOOR,
                    f"{r.x_floor:.2f} x",
                )
            )
            out.append(
                (
                    f"CPU update {name}: torch >= {CPU_MIN_X_PAPER} x paper's scheme",
                    r.x_paper >= CPU_MIN_X_PAPER,
                    f"{r.x_paper:.2f} x",
                )
            )
        return out

    def big(s: Shape) -> bool:
        return s.n_a >= GPU_GOAL_N and s.n_b >= GPU_GOAL_N and s.t >= GPU_GOAL_T

    r = find(rows, "update", "triton", pred=big)
    what = f"update {GPU_GOAL_N}x{GPU_GOAL_N}, K >= {GPU_GOAL_T}"
    if r is None or r.x_floor is None:
        out.append((f"GPU {what}: triton >= {GPU_MIN_X_FLOOR} x cuBLAS bf16", None, "shape not run"))
        out.append((f"GPU {what}: >= {GPU_MIN_TFLOPS:.0f} TFLOP/s on an H100", None, "shape not run"))
        return out
    tflops = r.work / r.timing.median / 1e12
    out.append(
        (f"GPU {what}: triton >= {GPU_MIN_X_FLOOR} x cuBLAS bf16", r.x_floor >= GPU_MIN_X_FLOOR, f"{r.x_floor:.2f} x")
    )
    is_h100 = "H100" in device_name(device)
    out.append(
        (
            f"GPU {what}: >= {GPU_MIN_TFLOPS:.0f} TFLOP/s on an H100",
            tflops >= GPU_MIN_TFLOPS if is_h100 else None,
            f"{tflops:.0f} TFLOP/s" + ("" if is_h100 else " (not an H100: goal not applicable)"),
        )
    )
    for other in ("triton-gemm", "torch"):
        o = find(rows, "update", other, pred=big)
        if o is not None and o.x_floor is not None:
            out.append((f"  (info) {other} at the same shape", None, f"{o.x_floor:.2f} x cuBLAS bf16"))
    return out


def append_csv(path: Path, rows: list[Row], device: torch.device) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    ver = versions()
    dev = device_name(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    fields = ["date", "op", "provider", "shape", "T", "n_a", "n_b", "p50_ms", "p20_ms", "p80_ms", "quiet", "rounds"]
    fields += ["busy"]
    fields += ["throughput", "unit", "x_floor", "x_paper", "device", "torch", "triton", "blas"]
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(fields)
        for r in rows:
            value, unit = r.value_unit
            w.writerow(
                [stamp, r.op, r.provider, r.shape.name, r.shape.t, r.shape.n_a, r.shape.n_b]
                + [f"{r.timing.quantile(q) * 1e3:.4f}" for q in (0.5, 0.2, 0.8)]
                + [r.timing.quiet, r.timing.rounds, f"{r.timing.busy:.3f}", f"{value:.3f}", unit]
                + [f"{x:.4f}" if x is not None else "" for x in (r.x_floor, r.x_paper)]
                + [dev, ver["torch"], ver["triton"], ver["blas"]]
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes only, 3 rounds")
    p.add_argument("--shapes", help="comma-separated names (toy, gpt2-layer, gpt2-mlp, ...) or TxN_AxN_B")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    p.add_argument("--reps", type=int, help="timed rounds per provider (default 7 on CPU, 10 on CUDA, 3 quick)")
    p.add_argument("--budget", type=float, default=90.0, help="seconds of timing per (op, shape) before stopping")
    p.add_argument(
        "--wait", type=float, default=None, help="seconds to wait for a quiet moment before each round (CPU default 10)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, i.e. every core)")
    p.add_argument("--csv", type=Path, help="append one row per measurement to this CSV")
    p.add_argument("--strict", action="store_true", help="exit 1 if a goal FAILs")
    p.add_argument("--memory", default="zoo", metavar="SIZES",
                   help="geometries whose planned vs measured peak memory is checked, one correlate run each "
                        "(bench.bench_memory; e.g. zoo,small; 'none' skips; default zoo)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            p.error(f"unknown op {o!r}; choose from {', '.join(OPS)}")
    try:
        shapes = [parse_shape(s.strip()) for s in args.shapes.split(",")] if args.shapes else None
    except ValueError as e:
        p.error(str(e))
    shapes = shapes or shapes_for(device, quick=args.quick)
    reps = args.reps or (3 if args.quick else 10 if device.type == "cuda" else 7)
    if args.wait is None:  # a GPU timing does not suffer from a busy host the way 2 shared CPU cores do
        args.wait = 0.0 if device.type == "cuda" or args.quick else 10.0

    ver = versions()
    print(f"device: {device_name(device)}")
    print(f"torch {ver['torch']} (BLAS: {ver['blas']}), triton {ver['triton']}, python {sys.version.split()[0]}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            print(f"  {var}={os.environ[var]}")
    if hasattr(os, "getloadavg"):
        print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"rounds: {reps} quiet ones wanted (round-robin over providers, up to {args.wait:.0f} s wait for quiet before"
        f" each), budget {args.budget:.0f} s per (op, shape)\n",
        flush=True,
    )

    rows: list[Row] = []
    for op in ops:
        for shape in shapes:
            rows.extend(run_op(op, shape, device, reps, args.budget, args.wait))
    print()
    print_table(rows)
    if hasattr(os, "getloadavg"):
        print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    print("\ngoals:")
    failed = False
    for goal, ok, measured in check_goals(rows, device):
        verdict = "PASS" if ok else "FAIL" if ok is not None else "----"
        failed |= ok is False
        print(f"  {verdict}  {goal}" + (f": {measured}" if measured else ""))
    if args.memory != "none":
        from bench.bench_memory import one

        for size in args.memory.split(","):
            for r in one(size.strip()):
                ratio = r["measured"] / r["planned"]
                ok = abs(ratio - 1) <= 0.10
                failed |= not ok
                print(f"  {'PASS' if ok else 'FAIL'}  memory at {size} geometry: measured peak within 10 % of the "
                      f"plan: {r['measured'] / 1e9:.2f} GB / {r['planned'] / 1e9:.2f} GB = {ratio:.2f}")
    if args.csv:
        append_csv(args.csv, rows, device)
        print(f"\nappended {len(rows)} rows to {args.csv}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())

"""The CPU floor (issue 13): finalize against its own floor, the paper's update ported faithfully, 16-bit operands.

    python3 -m bench.bench_cpu_floor                     # all three sections, 4 × 1,024 vs 4 × 1,024 neurons
    python3 -m bench.bench_cpu_floor --sections finalize --layers 4 --d 3072   # GPT2-small-like row block
    python3 -m bench.bench_cpu_floor --sections paper --tokens 12288

Sections, each timed round-robin in one process (ratios in one run: the machine is shared):

- ``finalize``: what ``univ/run/finalize.py`` does per block in reference mode with the rotation baseline
  (main summary, then per layer of m: centre, ``cc @ Q``, ``rotated_inv_sd``, row max), once as the run
  called it before (every output computed) and once as now (``outputs=`` what is read), against the
  floor: one read of C plus the GEMMs the baseline needs (``cc @ Q`` and the float64 ``W @ Q``). Goal:
  ≤ 2 × floor.
- ``paper``: one batch of the paper's update (``correlations_fast.py``: fp16 activations, one fp32 einsum
  per layer pair added into a float64 host accumulator, fp16 sums; with the rotation baseline also the
  rotated activations R_l·y_l and their own pair products), against univ's (pre-pass, one GEMM per block,
  the within-layer W on the upper triangle, which the analytic baseline needs), at the paper's batch of
  12,288 tokens (24 × 512) by default.
- ``bf16``: a bf16 × bf16 → fp32 product on this CPU (``torch.matmul`` on bf16 returns bf16, so the
  16-bit path is bf16 operands with an fp32 result via ``out_dtype`` where torch has it, else emulated):
  its speed against the fp32 GEMM, and its error in r against float64. Goal for using it: r within 1e-5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from univ_kernels import ColumnMoments, comoment_update, correlation_summary
from univ_kernels.comoment import comoment_update_symmetric

ROUNDS = 3


def timed(fns: dict, rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin (one warm-up each)."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rotation(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (z / z.norm(dim=0, keepdim=True)).float()  # the paper's Gaussian draw, unit-norm columns


def _rotated_inv_sd(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # As univ.baseline.rotated_inv_sd (bench must not need univ): 1/√diag(QᵀWQ) in float64.
    var = ((w.double() @ q.double()) * q.double()).sum(0)
    return var.clamp(min=1e-300).rsqrt().float()


def finalize_section(layers: int, d: int, rows: int) -> list[str]:
    """One block: ``rows`` neurons of a against ``layers`` × ``d`` neurons of m."""
    g = torch.Generator().manual_seed(0)
    n_m = layers * d
    x = torch.randn(2 * d, n_m, generator=g)  # W_l from real data, so QᵀWQ is a covariance
    c = torch.randn(rows, n_m, generator=g) * 0.3
    u_a, u_m = torch.randn(rows, generator=g) * 0.1, torch.randn(n_m, generator=g) * 0.1
    inv_a, inv_m = torch.ones(rows), torch.ones(n_m)
    ws = [x[:, i * d : (i + 1) * d].T @ x[:, i * d : (i + 1) * d] for i in range(layers)]
    qs = [_rotation(d, i) for i in range(layers)]

    def run(minimal: bool):
        main = {"argmax_a", "hist"} if minimal else None
        kw = {"outputs": main} if minimal else {}
        correlation_summary(c, u_a, u_m, inv_a, inv_m, bins=100, backend="torch", **kw)
        for i in range(layers):
            cols = slice(i * d, (i + 1) * d)
            cc = c[:, cols] - u_a[:, None] * u_m[cols][None, :]
            inv_rot = _rotated_inv_sd(ws[i], qs[i])
            kw = {"outputs": {"max_a"}} if minimal else {}
            correlation_summary(cc @ qs[i], torch.zeros(rows), torch.zeros(d), inv_a, inv_rot, bins=1, **kw)

    blocks = [c[:, i * d : (i + 1) * d].contiguous() for i in range(layers)]  # a strided A slows MKL's GEMM
    ws64, qs64 = [w.double() for w in ws], [q.double() for q in qs]

    def gemms_only():
        for i in range(layers):
            blocks[i] @ qs[i]  # the baseline's GEMMs: C_l Q_l and the float64 W_l Q_l
            ws64[i] @ qs64[i]

    def floor():
        c.amax(dim=1)  # one read of C
        gemms_only()

    t = timed(
        {
            "before": lambda: run(False),
            "now": lambda: run(True),
            "floor": floor,
            "gemms": gemms_only,
            "read": lambda: c.amax(dim=1),
        }
    )
    read = t["read"]
    out = [f"finalize, one block {rows} x ({layers} x {d}), reference mode + rotation baseline, bins=100"]
    for k in ("before", "now", "floor"):
        out.append(f"  {k:<8} {t[k] * 1e3:10.1f} ms   {t[k] / t['floor']:6.2f} x floor")
    out.append(f"  (floor = one read of C {read * 1e3:.1f} ms + baseline GEMMs {t['gemms'] * 1e3:.1f} ms)")
    ok = t["now"] <= 2 * t["floor"]
    out.append(f"  goal finalize <= 2 x floor: {'PASS' if ok else 'FAIL'} ({t['now'] / t['floor']:.2f})")
    return out


def paper_section(tokens: int, layers: int, d: int) -> list[str]:
    """One batch of two models' ``layers`` × ``d`` activations: the paper's update vs univ's, baseline included."""
    g = torch.Generator().manual_seed(1)
    n = layers * d
    x1 = (torch.randn(tokens, n, generator=g) + 1).half()  # the paper's hooks store fp16
    x2 = (torch.randn(tokens, n, generator=g) + 1).half()
    b1 = x1.T.reshape(layers, d, tokens)  # the paper's layout: l n (batch context)
    b2 = x2.T.reshape(layers, d, tokens)
    r16 = torch.stack([_rotation(d, i).T.contiguous() for i in range(layers)]).half()  # R [L, D, D] fp16 rows
    acc = torch.zeros(layers, d, layers, d, dtype=torch.float64)
    acc_rot = torch.zeros_like(acc)
    sums = [torch.zeros(layers, d, dtype=torch.float64) for _ in range(6)]

    def paper(baseline: bool):
        for l1 in range(layers):
            for l2 in range(layers):
                acc[l1, :, l2, :] += torch.einsum("nt,mt->nm", b1[l1].float(), b2[l2].float()).cpu()
        for s, v in zip(sums[:4], (b1.sum(-1), (b1**2).sum(-1), b2.sum(-1), (b2**2).sum(-1)), strict=True):
            s += v.double()  # fp16 sums, as the paper computed them
        if baseline:
            rot = torch.einsum("lij,ljt->lit", r16.float(), b2.float())  # R_l · y_l in fp32
            for l1 in range(layers):
                for l2 in range(layers):
                    acc_rot[l1, :, l2, :] += torch.einsum("nt,mt->nm", b1[l1].float(), rot[l2]).cpu()
            sums[4] += rot.sum(-1).double()
            sums[5] += (rot**2).sum(-1).double()

    m1, m2 = ColumnMoments(n), ColumnMoments(n)
    c = torch.zeros(n, n)
    w = torch.zeros(layers, d, d)

    def univ(baseline: bool):
        p1 = m1.prepare(x1, operand_dtype=torch.float32, backend="torch")
        p2 = m2.prepare(x2, operand_dtype=torch.float32, backend="torch")
        comoment_update(c, p1.operand, p2.operand, backend="torch")
        if baseline:  # the analytic baseline needs only W_l = Σ y_lᵀ y_l of the rotated model
            for i in range(layers):
                sl = p2.operand[:, i * d : (i + 1) * d]
                comoment_update_symmetric(w[i], sl, backend="torch")
        m1.commit(p1)
        m2.commit(p2)

    t = timed(
        {
            "paper": lambda: paper(False),
            "paper+baseline": lambda: paper(True),
            "univ": lambda: univ(False),
            "univ+baseline": lambda: univ(True),
        },
        rounds=2,
    )
    out = [f"update, one batch of {tokens} tokens, 2 models x {layers} layers x {d} neurons (fp16 activations)"]
    for k, v in t.items():
        out.append(
            f"  {k:<15} {v * 1e3:10.1f} ms   paper/this {t['paper' if 'b' not in k else 'paper+baseline'] / v:5.2f}"
        )
    return out


def bf16_section(tokens: int, n: int) -> list[str]:
    """bf16 operands with fp32 accumulation on this CPU: speed against fp32, error in r against float64."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(tokens, n // 2, generator=g, dtype=torch.float64)
    x_a = torch.cat([z, torch.randn(tokens, n - n // 2, generator=g, dtype=torch.float64)], 1) + 3
    x_b = torch.cat([z * 0.7 + 0.3 * torch.randn_like(z), torch.randn(tokens, n - n // 2, dtype=torch.float64)], 1)
    a64, b64 = x_a - x_a.mean(0), x_b - x_b.mean(0)
    r64 = (a64.T @ b64) / torch.outer(a64.norm(dim=0), b64.norm(dim=0))
    a32, b32 = a64.float(), b64.float()
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def fp32():
        return a32.T @ b32

    def bf16_out_fp32():
        try:
            return torch.mm(a16.T, b16, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            return (a16.T @ b16).float()  # torch 2.13 CPU has no aten::mm.dtype: a bf16 result, rounded

    def bf16_emulated():
        return a16.float().T @ b16.float()  # exact products, fp32 accumulation: what fp32 accumulation gives

    t = timed({"fp32": fp32, "bf16->fp32": bf16_out_fp32})
    out = [f"16-bit operands, {tokens} tokens x {n} x {n} (centred, r vs float64)"]
    for name, fn, sd in (
        ("fp32", fp32, (a32.double(), b32.double())),
        ("bf16->fp32", bf16_out_fp32, (a16.double(), b16.double())),
        ("bf16 emulated", bf16_emulated, (a16.double(), b16.double())),
    ):
        cm = fn().double()
        r = cm / torch.outer(sd[0].norm(dim=0), sd[1].norm(dim=0))
        err = (r - r64).abs().max().item()
        speed = f"{t[name] * 1e3:8.1f} ms ({t['fp32'] / t[name]:4.2f} x fp32)" if name in t else " " * 25
        out.append(f"  {name:<14} {speed}  max |r - r64| = {err:.2e}  {'within' if err <= 1e-5 else 'over'} 1e-5")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="finalize,paper,bf16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--rows", type=int, default=None, help="rows of the finalize block (default layers × d)")
    p.add_argument("--tokens", type=int, default=12288, help="tokens per batch (paper: 24 × 512 = 12,288)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {when}")
    for s in args.sections.split(","):
        if s == "finalize":
            lines = finalize_section(args.layers, args.d, args.rows or args.layers * args.d)
        elif s == "paper":
            lines = paper_section(args.tokens, args.layers, args.d)
        elif s == "bf16":
            lines = bf16_section(min(args.tokens, 8192), args.d)
        else:
            print(f"unknown section {s!r}: finalize, paper, bf16", file=sys.stderr)
            return 2
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

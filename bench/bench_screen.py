"""--method screen against --method exact in one run: wall time, FLOPs, memory, the same answer; then the cost
model at 1e8 tokens.

    python -m bench.bench_screen                       # the shipped depth zoo, two seeds, its held-out text
    python -m bench.bench_screen --zoo DIR --screen 8000,34000 --tokens 170000
    python -m bench.bench_screen --shape gpt2-small --tokens 4096 --screen 1024 --draws 1   # random-init 12 x 3,072
    python -m bench.bench_screen --screen 8000 --ranks 2    # each screen also under torchrun on 2 ranks

Each method runs in this process on the same models and tokens (exact first). Reported per run: wall s,
FLOPs done (run.json), × exact (wall), measured peak / planned peak, verified share of neuron × layer rows,
certified share in the first round, and whether the answer is the exhaustive one (max |Δ| over every float
column of neurons.parquet, argmax differences, universal set). With ``--ranks W`` each screen runs again as one
``torchrun --nproc-per-node W`` job (``bench.bench_scaling``'s worker; on CPU each rank gets cores / W threads),
its wall time including the launcher's start.

Extrapolation. A screen run holds, for the neurons it verified against every layer (most of them at a
small S; the harder ones, so the estimate errs high), the exact per-(neuron, layer) maxima and the margin
it measured at S sample tokens. The margin shrinks as 1/√S (a maximum over S tokens moves by
~σ/√S); with the default S = T/50 at T = 1e8 (2 M tokens) this predicts the share of neuron × layer rows a
run would verify: layer l of neuron i is needed when its exact maximum (or any draw's rotated one) is within
twice the margin of the neuron's best. FLOPs then follow ``univ.run.costs`` for the two models' shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def compare(e: pd.DataFrame, s: pd.DataFrame) -> dict:
    worst = max(float(np.nanmax(np.abs(e[c].to_numpy() - s[c].to_numpy()))) for c in e.columns
                if e[c].dtype.kind == "f")
    args = sum(int((e[c] != s[c]).sum()) for c in e.columns if c.startswith("argmax"))
    same_set = set(e.index[e.excess_corr > 0.5]) == set(s.index[s.excess_corr > 0.5])
    return {"max_abs_diff": worst, "argmax_diffs": args, "same_universal_set": same_set}


def predicted_share(state: dict[str, torch.Tensor], s_measured: int, s_target: int) -> float:
    """Share of neuron × layer rows a run at ``s_target`` sample tokens would verify (module docstring)."""
    full = state["done.0"].all(1)  # the rows with every layer verified (the harder ones: a conservative estimate)
    ex = state["ex_max.0"][full]
    m = state["margin.0"][full].double() * math.sqrt(s_measured / s_target)  # [n]
    best = torch.nan_to_num(ex.double(), nan=-9).amax(1, keepdim=True)
    need = torch.nan_to_num(ex.double(), nan=-9) + 2 * m[:, None] >= best
    if "ex_rot.0" in state:
        rot = torch.nan_to_num(state["ex_rot.0"][:, full].double(), nan=-9)
        need |= (rot + 2 * m[None, :, None] >= rot.amax(2, keepdim=True)).any(0)
    return float(need.double().mean())


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import load_file

    from univ.corpus import write_corpus_files
    from univ.run.config import CorrelateConfig
    from univ.run.driver import run
    from univ.zoo import resolve_zoo, seed_dirs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="depth")
    ap.add_argument("--tokens", type=int, default=200_000, help="stream length (the held-out text has ~170 k)")
    ap.add_argument("--screen", default="8000,34000", help="sample sizes to try, comma-separated")
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--out", default="runs/bench-screen")
    ap.add_argument("--ranks", type=int, default=1, help="also run each screen under torchrun on this many ranks")
    ap.add_argument("--shape", default=None, choices=["gpt2-small"],
                    help="two random-init models of this shape instead of the zoo (bench.bench_correlate.make_seeds)")
    args = ap.parse_args(argv)
    root = Path(args.out)
    if args.shape:
        from bench.bench_correlate import make_seeds

        seeds = make_seeds(root / "models", 2, "small")
    else:
        seeds = seed_dirs(resolve_zoo(args.zoo))[:2]
    data = write_corpus_files(root / "data", "heldout")
    base = dict(models=tuple(map(str, seeds)), data=str(data), tokens=args.tokens, ctx=128, batch_size=8,
                backend="torch", baseline_draws=args.draws)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.shape or 'zoo ' + args.zoo} (2 seeds), {args.draws} draws")
    rows, tables = [], {}
    runs = [("exact", {"method": "exact"})]
    for s in args.screen.split(","):
        runs.append((f"screen S={s}", {"method": "screen", "screen_tokens": int(s)}))
        if args.ranks > 1:
            runs.append((f"screen S={s} on {args.ranks} ranks", {"method": "screen", "screen_tokens": int(s)}))
    for name, extra in runs:
        out = root / name.replace(" ", "-").replace("=", "")
        t0 = time.perf_counter()
        if "ranks" in name:
            on_ranks(root, {"out": str(out), **base, **extra, "save_state": True}, args.ranks)
        else:
            run(CorrelateConfig(out=str(out), **base, **extra), overwrite=True, progress=False, log=lambda *a: None)
        wall = time.perf_counter() - t0
        manifest = json.loads((out / "run.json").read_text())
        tables[name] = pd.read_parquet(out / "neurons.parquet")
        mem = manifest["memory"]
        row = {"run": name, "wall_s": round(wall, 1), "tokens": manifest["tokens"],
               "peak_MB": round(mem["measured_peak_bytes"] / 1e6), "peak/plan": round(
                   mem["measured_peak_bytes"] / mem["planned_peak_bytes"], 2)}
        if "screen" in manifest:
            rep = manifest["screen"]
            state = load_file(str(out / "state" / "screen.safetensors"))
            row.update(flops_ratio=rep["flops"]["ratio"], verified=round(float(state["done.0"].float().mean()), 3),
                       certified_first=round(rep["certified_first_round"], 3), rounds=rep["rounds"],
                       margin_median=round(float(state["margin.0"].median()), 4), **compare(tables["exact"],
                                                                                             tables[name]))
            if float(state["done.0"].all(1).float().mean()) > 0.5:
                for target in (2_000_000,):
                    row[f"predicted verified at S={target:,}"] = round(predicted_share(state, rep["screen_tokens"],
                                                                                       target), 3)
        rows.append(row)
        print(row, flush=True)
    frame = pd.DataFrame(rows)
    frame["x exact (wall)"] = (frame.loc[0, "wall_s"] / frame["wall_s"]).round(2)
    print(frame.to_string(index=False))
    cost_model(frame)


def on_ranks(root: Path, cfg: dict, world: int) -> None:
    """One ``torchrun --standalone --nproc-per-node world`` job of ``cfg`` (a fresh --out)."""
    import shutil
    import subprocess
    import sys

    shutil.rmtree(cfg["out"], ignore_errors=True)
    path = root / f"cfg-{world}-ranks.json"
    path.write_text(json.dumps({**cfg, "models": list(cfg["models"])}))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)),
           "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(world), "-m",
           "bench.bench_scaling", "--worker", str(path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def cost_model(frame: pd.DataFrame) -> None:
    """FLOPs at 1e8 tokens, GPT2-small shape (two seeds, 16 draws), for the verified share measured or predicted."""
    from univ.run import costs
    from univ.run.config import CorrelateConfig

    shape = costs.Shape("gpt2-small", 12, 3072, 768, False, 124_000_000)
    cfg = CorrelateConfig(models=("a", "b"), data="x", tokens=100_000_000)
    est = costs.estimate(cfg, [shape, shape], 80e9)
    exact = est["exact"]["flops"]
    print(f"\nGPT2-small, 2 seeds, 1e8 tokens, one 80 GB device: exact {exact:.3g} FLOPs")
    n, d, t, s = 36_864, 3072, 1e8, 2e6
    forward = 2 * shape.forward_flops
    for col in [c for c in frame.columns if c.startswith("predicted")] + ["verified"]:
        for share in frame[col].dropna().unique():
            verify = t * (forward + 2 * n * n * share + 12 * d * d)
            screen = s * (forward + 2 * n * n + 2 * 12 * d * d)
            total = verify + screen
            print(f"  screen at verified share {share:.3f} ({col}): {total:.3g} FLOPs, {exact / total:.2f}× fewer")
    floor = t * (forward + 12 * d * d)
    print(f"  floor (forward and the rotated model's W over every token, nothing else): {exact / floor:.1f}× fewer")


if __name__ == "__main__":
    main()

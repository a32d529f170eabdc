"""How the universal set's stability grows with the number of baseline draws K, and what K draws cost.

    python bench/bench_baseline_draws.py RUN_DIR [--seeds 8] [--threshold 0.5]

RUN_DIR is a finished ``univ correlate`` run with its accumulators kept (``RUN_DIR/state``, one pass, the
default). Every baseline below is computed from those accumulators, as the run's finalize does: for each
baseline seed s the K draws are the first K of seed s's stream, and independent runs of K draws are
different seeds. Printed per K: the Jaccard index of the universal sets of pairs of independent runs (mean
and range over pairs), for the paper's rule (mean over draws) and the >= 95 %-of-draws rule; the Jaccard
against the pooled set of all seeds' draws; how many neurons are borderline; and the finalize time of the
K-draw baseline (bank + batched GEMMs) next to the finalize of C itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from univ.baseline import RotationBank, rotated_max, summarize_draws
from univ_kernels import ColumnMoments, correlation_summary

KS = (1, 2, 4, 8, 16)


def load(run_dir: Path):
    manifest = json.loads((run_dir / "run.json").read_text())
    state = safetensors.torch.load_file(run_dir / "state" / "pass-0.safetensors")
    n = manifest["tokens"]
    meta = manifest["model_meta"]
    moms = {}
    for key in state:
        if key.startswith("moments.") and key.endswith(".shift"):
            i = int(key.split(".")[1])
            moms[i] = ColumnMoments(state[key].numel())
            moms[i].load_state_dict(state, f"moments.{i}", n)
    blocks = {tuple(int(v) for v in k.split(".")[1:3]): v for k, v in state.items() if k.startswith("block.")}
    within = {int(k.split(".")[1]): v for k, v in state.items() if k.startswith("within.")}
    return manifest, moms, blocks, within, meta


def baseline_draws(moms, blocks, within, seed: int, draws: int) -> np.ndarray:
    """[M, K, n_a] per-draw baselines of model 0's neurons against each compared model."""
    out = []
    for (a, m), c in sorted(blocks.items()):
        n_layers, d = within[m].shape[0], within[m].shape[1]
        u_a, inv_a, u_m = moms[a].offset(), moms[a].inv_sd(), moms[m].offset()
        bank = RotationBank("gaussian", seed, draws)
        best = torch.full((draws, c.shape[0]), float("-inf"))
        for layer in range(n_layers):
            cols = slice(layer * d, (layer + 1) * d)
            u_l = u_m[cols]
            q, inv_rot = bank.get(m, layer, within[m][layer] - u_l[:, None] * u_l[None, :])
            cc = c[:, cols] - u_a[:, None] * u_l[None, :]
            best = torch.maximum(best, rotated_max(cc, inv_a, q, inv_rot, draws).nan_to_num(nan=float("-inf")))
        out.append(torch.where(torch.isinf(best), float("nan"), best).numpy())
    return np.stack(out)


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    union = (x | y).sum()
    return float((x & y).sum() / union) if union else 1.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.4])
    args = p.parse_args()
    manifest, moms, blocks, within, _ = load(args.run_dir)
    t0 = time.perf_counter()
    max_corr = np.stack([correlation_summary(c, moms[a].offset(), moms[m].offset(), moms[a].inv_sd(),
                                             moms[m].inv_sd(), bins=100, backend="torch").max_a.numpy()
                         for (a, m), c in sorted(blocks.items())])
    t_c = time.perf_counter() - t0
    kmax = max(KS)
    per_seed = [baseline_draws(moms, blocks, within, 1000 + s, kmax) for s in range(args.seeds)]  # [M, K, n]
    pooled = summarize_draws(max_corr, np.concatenate(per_seed, axis=1))
    print(f"run {args.run_dir}: {manifest['tokens']:,} tokens, models {manifest['labels']}")
    print(f"finalize of C (max, argmax, histogram), all pairs: {t_c:.2f} s")
    times = {}
    for k in KS:
        t0 = time.perf_counter()
        baseline_draws(moms, blocks, within, 5000 + k, k)  # a fresh bank: what one run with K draws pays
        times[k] = time.perf_counter() - t0
    pairs = [(i, i + 1) for i in range(0, args.seeds - 1, 2)]
    fmt = lambda v: f"{np.mean(v):.2f} ({np.min(v):.2f}–{np.max(v):.2f})"  # noqa: E731
    for t in args.thresholds:
        pooled_set = pooled["excess_corr"] > t
        print(f"\nthreshold {t}: pooled over {args.seeds} x {kmax} draws, {int(pooled_set.sum())} universal "
              f"(paper's rule); {len(pairs)} pairs of independent runs per K")
        print("| K | Jaccard, paper's rule | Jaccard, >= 95 % of draws | vs pooled | universal | borderline |"
              " baseline finalize (s) |")
        print("|---|---|---|---|---|---|---|")
        for k in KS:
            sums = [summarize_draws(max_corr, b[:, :k]) for b in per_seed]
            sets_mean = [s["excess_corr"] > t for s in sums]
            sets_q = [s["excess_q05"] > t for s in sums]
            jm = [jaccard(sets_mean[i], sets_mean[j]) for i, j in pairs]
            jq = [jaccard(sets_q[i], sets_q[j]) for i, j in pairs]
            jp = [jaccard(s, pooled_set) for s in sets_mean]
            n_univ = [int(s.sum()) for s in sets_mean]
            border = [int(((s["excess_min"] <= t) & (t < s["excess_max"])).sum()) for s in sums]
            bd = f"{np.mean(border):.1f}" if k > 1 else "–"
            print(f"| {k} | {fmt(jm)} | {fmt(jq) if k > 1 else '= paper'} | {fmt(jp)} | {np.mean(n_univ):.1f} | "
                  f"{bd} | {times[k]:.2f} |")


if __name__ == "__main__":
    main()

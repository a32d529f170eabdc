"""``univ sweep``: universality over training — the same correlate run at every checkpoint, tabulated.

For each revision r — a Hub branch, tag or commit (PolyPythias' ``step12000``) or a local checkpoint subfolder
(the zoo's ``step-000500``, see ``univ zoo train --save-every``) — run ``univ correlate`` on
``[m@r for m in models]``: the reference seed at step r against the other seeds at the same step, on the same
tokens, into ``OUT/<r>/``. Then count the reference model's universal neurons (``univ.universal``'s rule) per
layer and write:

    OUT/sweep.parquet, sweep.csv   one row per (revision, layer) plus layer "all": revision, step (the number
                                   the revision ends with, else NaN), layer, neurons, universal, fraction,
                                   mean_excess (mean excess correlation), tokens, run (the run's folder)
    OUT/sweep.png                  universal fraction against step: one line per layer and the whole model
    OUT/sweep.json                 models, revisions, threshold, rule, the runs

A finished run folder whose ``run.json`` lists the same models is reused and an unfinished one (its checkpoint)
is resumed, so a stopped sweep picks up where it was.

    univ zoo train --out runs/ckpt --seeds 0 1 2 --save-every 500
    univ sweep runs/ckpt --data heldout.txt --tokens 50000 --ctx 128 --out runs/sweep
    univ sweep EleutherAI/pythia-160m-seed1 EleutherAI/pythia-160m-seed2 --revisions step1000 step143000 \\
        --data pile.jsonl --tokens 1000000 --out runs/pythia-sweep
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from univ.errors import UserError

__all__ = ["checkpoint_revisions", "plot_sweep", "register", "run_sweep", "sweep_table"]

TABLE = "sweep.parquet"
FIGURE = "sweep.png"


# --------------------------------------------------------------------------------------------------------------------
# Which checkpoints


def _step_of(revision: str) -> float:
    """The training step a revision names (``step12000``, ``step-000500`` → 12000, 500); NaN if none."""
    match = re.search(r"(\d+)$", revision)
    return float(match.group(1)) if match else float("nan")


def checkpoint_revisions(seed_dirs: Sequence[str | Path]) -> list[str]:
    """The checkpoint subfolders (``step-*`` holding a config.json) that every seed folder has, by step."""
    common: set[str] | None = None
    for d in seed_dirs:
        names = {p.name for p in Path(d).glob("step-*") if (p / "config.json").is_file()}
        common = names if common is None else common & names
    return sorted(common or (), key=lambda r: (_step_of(r), r))


def _expand_zoo(models: Sequence[str], revisions: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """One zoo folder (with manifest.json) → its seed folders and their common checkpoints."""
    from univ import zoo

    if len(models) == 1 and (Path(models[0]) / zoo.MANIFEST).is_file():
        seeds = [str(d) for d in zoo.seed_dirs(models[0])]
        found = checkpoint_revisions(seeds)
        if not revisions and not found:
            raise UserError(
                f"zoo {models[0]!r} has no training checkpoints (step-*/ in its seed folders); train it with "
                "'univ zoo train --save-every N', or pass --revisions"
            )
        return seeds, list(revisions or found)
    if not revisions:
        raise UserError("--revisions is required unless the one MODEL is a zoo folder trained with --save-every")
    return list(models), list(revisions)


def _run_folder(revision: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", revision)


# --------------------------------------------------------------------------------------------------------------------
# Running and tabulating


def _finished(run_dir: Path, models: Sequence[str]) -> bool:
    manifest = run_dir / "run.json"
    if not (manifest.is_file() and (run_dir / "neurons.parquet").is_file()):
        return False
    try:
        return json.loads(manifest.read_text()).get("models") == list(models)
    except (OSError, ValueError):
        return False


def sweep_table(
    runs: Sequence[tuple[str, str | Path]], *, threshold: float | None = None, rule: str = "mean"
) -> pd.DataFrame:
    """Universal counts of each run's reference model per layer (and "all"), one block of rows per revision.

    ``runs``: (revision, run folder) in training order. Columns as in the module docstring.
    """
    from univ.universal import DEFAULT_THRESHOLD, read_neurons, read_run, select_universal, universal_by_layer

    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    frames = []
    for revision, run_dir in runs:
        manifest = read_run(run_dir)
        neurons = read_neurons(run_dir)
        ref = neurons[neurons["model"] == manifest["labels"][0]].copy()
        ref["is_universal"] = select_universal(ref, threshold=threshold, rule=rule)
        counts = universal_by_layer(ref).drop(columns="model")
        excess = ref.groupby("layer")["excess_corr"].mean()
        counts["mean_excess"] = [
            float(ref["excess_corr"].mean()) if layer == "all" else float(excess.get(layer, np.nan))
            for layer in counts["layer"]
        ]
        counts.insert(0, "step", _step_of(revision))
        counts.insert(0, "revision", revision)
        counts["tokens"] = manifest.get("tokens")
        counts["run"] = str(run_dir)
        frames.append(counts)
    table = pd.concat(frames, ignore_index=True)
    table["layer"] = table["layer"].astype(str)  # ints and "all" in one column: parquet needs one type
    return table


def plot_sweep(table: pd.DataFrame, path: str | Path) -> Path:
    """Universal fraction (%) against step: one line per layer (its own style) and the whole model in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    revisions = list(dict.fromkeys(table["revision"]))
    steps = table.drop_duplicates("revision").set_index("revision")["step"]
    by_step = bool(steps.notna().all())
    x_of = {r: (steps[r] if by_step else i) for i, r in enumerate(revisions)}
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    markers = "osD^v<>"
    layers = [layer for layer in dict.fromkeys(table["layer"]) if layer != "all"]
    for i, layer in enumerate(layers):
        rows = table[table["layer"] == layer]
        ax.plot([x_of[r] for r in rows["revision"]], 100 * rows["fraction"], linestyle=styles[i % len(styles)],
                marker=markers[i % len(markers)], markersize=4, linewidth=1.2, label=f"layer {layer}")  # fmt: skip
    rows = table[table["layer"] == "all"]
    ax.plot([x_of[r] for r in rows["revision"]], 100 * rows["fraction"], color="black", linewidth=2.2,
            marker="o", label="all layers")  # fmt: skip
    if by_step:
        ax.set_xlabel("training step")
        positive = steps[steps > 0]
        if len(positive) and steps.max() / positive.min() > 100:
            ax.set_xscale("symlog", linthresh=float(positive.min()))
    else:
        ax.set_xticks(range(len(revisions)), revisions, rotation=30, ha="right")
        ax.set_xlabel("revision")
    ax.set_ylabel("universal neurons (%)")
    ax.set_ylim(bottom=0)
    ax.set_title("Universality over training (reference model against the other seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_sweep(
    models: Sequence[str],
    revisions: Sequence[str] | None,
    base: Any,
    *,
    threshold: float | None = None,
    rule: str = "mean",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Correlate ``[m@r for m in models]`` for every revision r into ``base.out/<r>`` and tabulate (docstring).

    ``base`` is a :class:`univ.correlate.CorrelateConfig` whose ``models`` are replaced per revision and whose
    ``out`` is the sweep's folder. One zoo folder as ``models`` expands to its seeds and checkpoints.
    """
    from univ import correlate
    from univ.run import checkpoint as run_checkpoint

    models, revisions = _expand_zoo(models, revisions)
    if len(models) < 2:
        raise UserError(f"a sweep compares seeds: pass at least two models (got {len(models)})")
    out = Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, revision in enumerate(revisions):
        names = tuple(f"{m}@{revision}" for m in models)
        run_dir = out / _run_folder(revision)
        if _finished(run_dir, names):
            log(f"[{i + 1}/{len(revisions)}] {revision}: reusing the finished run in {run_dir}")
        else:
            # a step stopped midway (Ctrl-C, a crash) left a checkpoint: finish it with the same numbers
            resume = run_checkpoint.exists(run_dir) and not (run_dir / "run.json").exists()
            doing = "resuming" if resume else "correlating"
            log(f"[{i + 1}/{len(revisions)}] {revision}: {doing} {', '.join(names)}")
            correlate.run(replace(base, models=names, out=str(run_dir)), resume=resume, progress=progress, log=log)
        runs.append((revision, run_dir))
    table = sweep_table(runs, threshold=threshold, rule=rule)
    table.to_parquet(out / TABLE, index=False)
    table.to_csv(out / "sweep.csv", index=False)
    plot_sweep(table, out / FIGURE)
    info = {"models": list(models), "revisions": list(revisions), "threshold": threshold, "rule": rule,
            "runs": [str(r) for _, r in runs]}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(info, indent=2) + "\n")
    log(format_sweep(table))
    log(f"wrote {out / TABLE}, {out / 'sweep.csv'} and {out / FIGURE}")
    return table


def format_sweep(table: pd.DataFrame) -> str:
    """The whole-model rows as aligned text: revision, step, universal / neurons, %."""
    lines = [f"{'revision':<20} {'step':>9} {'universal':>9} {'neurons':>8} {'%':>7} {'mean excess':>11}"]
    for row in table[table["layer"] == "all"].itertuples(index=False):
        step = "" if np.isnan(row.step) else f"{row.step:.0f}"
        lines.append(f"{row.revision:<20} {step:>9} {row.universal:>9} {row.neurons:>8} "
                     f"{100 * row.fraction:>6.2f}% {row.mean_excess:>11.3f}")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``univ sweep``."""
    from univ.correlate import MODES
    from univ.run.config import METHODS

    p = subparsers.add_parser(
        "sweep",
        help="universality over training: correlate the seeds at each checkpoint, tabulate and plot",
        description=(
            "Run 'univ correlate' once per checkpoint (the reference seed at step r against the other seeds\n"
            "at step r, same tokens) and tabulate the reference model's universal neurons per step and layer.\n"
            "A MODEL@REVISION is a Hub branch/tag/commit or a local model folder's checkpoint subfolder.\n\n"
            "Writes OUT/<revision>/ (one correlate run each), OUT/sweep.parquet (+csv), OUT/sweep.png."
        ),
        epilog=(
            "examples:\n"
            "  univ zoo train --out runs/ckpt --seeds 0 1 2 --save-every 500\n"
            "  univ sweep runs/ckpt --data heldout.txt --tokens 50000 --ctx 128 --out runs/sweep\n"
            "  univ sweep EleutherAI/pythia-160m-seed1 EleutherAI/pythia-160m-seed2 \\\n"
            "      --revisions step1000 step10000 step143000 --data pile.jsonl --out runs/pythia-sweep"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="seed models without revision (the first is the reference), or one zoo folder")  # fmt: skip
    p.add_argument("--revisions", nargs="+", metavar="REV",
                   help="checkpoints in training order (default for a zoo folder: every common step-*/)")  # fmt: skip
    p.add_argument("--data", required=True, help="text file, directory, tokenized dataset or `datasets` hub name")
    p.add_argument("--tokens", type=int, default=1_000_000, help="kept tokens per checkpoint (default 1,000,000)")
    p.add_argument("--out", default="runs/sweep", help="output directory (default runs/sweep)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per sequence, BOS first (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--mode", choices=MODES, default="reference", help="as in correlate (default reference)")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default 0), the same at every step")
    p.add_argument("--text-field", default="text", help="text column of jsonl/parquet/hub data (default text)")
    p.add_argument("--split", default="train", help="split of a hub dataset (default train)")
    p.add_argument("--keep-newlines", action="store_true", help="do not exclude newline positions")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (correlate's default)")
    p.add_argument("--threshold", type=float, default=None, help="excess-correlation cut (default the paper's 0.5)")
    p.add_argument("--rule", default="mean", choices=["mean", "strict"], help="universal rule (default mean)")
    p.add_argument("--save-state", action="store_true", help="keep each run's accumulators (OUT/<rev>/state)")
    p.add_argument("--method", choices=METHODS, default="auto", help="as in correlate: exact, screen or auto")
    p.add_argument("--screen-tokens", type=int, default=None, help="as in correlate (screen's sample size)")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    from univ.correlate import CorrelateConfig

    base = CorrelateConfig(
        models=("-", "-"), data=args.data, out=args.out, tokens=args.tokens, mode=args.mode, ctx=args.ctx,
        batch_size=args.batch_size, seed=args.seed, text_field=args.text_field, split=args.split,
        exclude_newlines=not args.keep_newlines, device=args.device, dtype=args.dtype, save_state=args.save_state,
        method=args.method, screen_tokens=args.screen_tokens,
    )  # fmt: skip
    run_sweep(args.models, args.revisions, base, threshold=args.threshold, rule=args.rule)
    return 0

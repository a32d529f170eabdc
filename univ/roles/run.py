"""The run directory and the CLI: score, intervene, write the role tables.

``univ roles DIR`` scores every neuron of each analysed model, runs the interventions on a few batches of
the run's data for candidate neurons (universal neurons if ``universal.parquet``/``profiles.parquet`` exist,
else every neuron, the top few by score; or ``--neurons``) and writes:

    roles.parquet              one row per neuron: role, is_* flags, vocab moments, null_share, the top BOS head
    interventions.parquet      entropy curves: one row per (neuron, fixed value), plus random and nominal rows
    attention.parquet          path intervention, one row per (neuron, head) pair
    attention_points.parquet   per-position points of the path intervention (subsampled), for scatter plots
    bos_scores.parquet         histogram of h over every (neuron, later head) pair and of the random baseline
    roles.json                 thresholds, candidates, notes (what was skipped and why)

and joins the role columns into ``profiles.parquet`` when it exists (atomic rewrite). A run with interventions
removes intervention tables it did not produce (an earlier run's, for other candidates); ``--no-interventions``
leaves them in place.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from univ.roles.attention import BosScores, bos_path_intervention, bos_scores, summarize_path
from univ.roles.entropy import DEFAULT_MULTIPLES, default_null_dims, entropy_intervention, entropy_scores
from univ.roles.vocab import ROLE_NAMES, RoleThresholds, classify_roles, top_tokens, vocab_role_scores
from univ.sites import is_sae_run
from univ.tables import check_same_run, write_parquet
from univ.universal import read_run

__all__ = [
    "parse_neurons",
    "register",
    "run_roles",
]

# Tables roles reads (candidates, the join): refused when stamped with another run than run.json's.
STAGE_INPUTS = ["neurons.parquet", "universal.parquet", "profiles.parquet"]
MAX_POINTS = 2000  # per (neuron, head) pair in attention_points.parquet: enough for a scatter plot
ROLE_COLUMNS = [
    "role", "is_prediction", "is_suppression", "is_partition", "is_entropy", "is_attention", "vocab_var_ratio",
    "null_share", "null_norm", "top_bos_head", "bos_layer", "bos_head", "bos_score", "bos_z", "top_promoted",
    "top_suppressed",
]  # fmt: skip  # joined into profiles.parquet


# --------------------------------------------------------------------------------------------------------------------
# The run directory


def parse_neurons(text: str) -> list[tuple[int, int]]:
    """Parse "11.3030,11.2859" (or "L11.N3030") into [(11, 3030), (11, 2859)]."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        parts = item.upper().replace("L", "").replace("N", "").split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"neuron {item!r}: expected LAYER.NEURON, e.g. 11.3030 (comma-separated for several)")
        out.append((int(parts[0]), int(parts[1])))
    if not out:
        raise ValueError(f"no neuron in {text!r}: expected LAYER.NEURON[,LAYER.NEURON…]")
    return out


def _universal_pool(run_dir: Path, label: str) -> tuple[set[tuple[int, int]] | None, str]:
    """The universal neurons of one model, from universal.parquet or profiles.parquet (None: neither)."""
    for name in ("universal.parquet", "profiles.parquet"):
        path = run_dir / name
        if not path.is_file():
            continue
        df = pd.read_parquet(path)
        if "is_universal" in df and name == "profiles.parquet":
            df = df[df["is_universal"].fillna(False).astype(bool)]
        elif name == "profiles.parquet":
            continue
        if "model" in df:
            df = df[df["model"] == label]
        return {(int(r.layer), int(r.neuron)) for r in df[["layer", "neuron"]].itertuples(index=False)}, name
    return None, ""


def _run_batches(manifest: dict, tokenizer: Any, tokens: int, batch_size: int | None, data: str | None) -> list:
    """The run's own token stream and exclusions (as ``univ analyze`` reads them); ``data`` replaces the source."""
    from univ.analyze import run_data_spec, run_excluded

    spec = dict(manifest.get("data") or {})
    if data:
        spec["source"] = data
    if not spec.get("source"):
        raise ValueError("run.json has no data source; pass --data FILE")
    stream = run_data_spec({**manifest, "data": spec}, tokens, batch_size)
    return list(stream.batches(tokenizer, excluded=run_excluded(manifest, tokenizer)))


def _write_parquet(df: pd.DataFrame, path: Path, run: str | None = None) -> None:
    """Atomic, stamped with the run id the table was computed from (univ.tables)."""
    write_parquet(df, path, run)


def _join_profiles(run_dir: Path, roles: pd.DataFrame, run: str | None = None) -> bool:
    """Add (or replace) the role columns of profiles.parquet, keyed by (model, layer, neuron); atomic."""
    path = run_dir / "profiles.parquet"
    if not path.is_file():
        return False
    profiles = pd.read_parquet(path)
    keys = [k for k in ("model", "layer", "neuron") if k in profiles]
    if "layer" not in keys or "neuron" not in keys:
        return False
    if "model" not in keys and roles["model"].nunique() > 1:
        return False  # rows of several models cannot be matched to a table without a model column
    cols = [c for c in ROLE_COLUMNS if c in roles]
    merged = profiles.drop(columns=[c for c in cols if c in profiles]).merge(
        roles[keys + cols], on=keys, how="left", validate="many_to_one"
    )
    _write_parquet(merged, path, run)
    return True


def run_roles(
    run_dir: str | Path,
    *,
    neurons: Sequence[tuple[int, int]] | None = None,
    models: Sequence[str] | None = None,
    tokens: int = 16_384,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    data: str | None = None,
    top: int = 4,
    n_random: int = 6,
    multiples: Sequence[float] = DEFAULT_MULTIPLES,
    values: Sequence[float] | None = None,
    thresholds: RoleThresholds | None = None,
    null_dims: int | None = None,
    n_baseline: int = 1000,
    after_pos: int = 1,
    interventions: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Score every neuron of each analysed model, intervene on candidates, write the role tables.

    Candidates: ``neurons`` if given (both interventions; each neuron's top later head for attention), else
    the top ``top`` by null_norm (entropy) and by |bos_z| (attention) among the universal neurons when the run
    has them, among all neurons otherwise. ``n_random`` random neurons of the entropy candidates' layers
    (not flagged entropy) are the baseline. Returns the path of roles.parquet; ``log`` receives progress lines.
    """
    from univ.correlate import resolve_device
    from univ.models import load_model

    say = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    manifest = read_run(run_dir)
    rid = check_same_run(run_dir, STAGE_INPUTS, stage="univ roles", fix=f"'univ analyze {run_dir}'")
    thresholds = thresholds or RoleThresholds()
    if is_sae_run(manifest):  # latents: vocabulary roles from the decoder rows
        from univ.roles.latents import run_latent_roles

        return run_latent_roles(run_dir, manifest, rid, models=list(models) if models else None, device=device,
                                dtype=dtype, thresholds=thresholds, log=log, write_parquet=_write_parquet)  # fmt: skip
    labels = list(manifest["labels"])
    chosen = list(models) if models else list(manifest["analysed"])
    unknown = [m for m in chosen if m not in labels]
    if unknown:
        raise ValueError(f"model label(s) {unknown} not in this run; its labels are {labels}")
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)

    role_frames, curve_frames, attn_frames, point_frames, hist_frames = [], [], [], [], []
    info: dict[str, Any] = {"run_id": rid, "thresholds": asdict(thresholds), "seed": seed, "tokens": tokens,
                            "models": {}}  # fmt: skip
    for label in chosen:
        lm = load_model(manifest["models"][labels.index(label)], device=dev, dtype=dtype)
        notes: list[str] = []
        say(f"[{label}] weight scores")
        df = vocab_role_scores(lm)
        ent = entropy_scores(lm, null_dims)
        df = df.merge(ent[["layer", "neuron", "null_share", "null_norm"]], on=["layer", "neuron"])
        bos: BosScores | None = None
        try:
            bos = bos_scores(lm, n_random=n_baseline, seed=seed)
            df = df.merge(bos.per_neuron(), on=["layer", "neuron"])
            hist_frames.append(bos.histogram().assign(model=label))
        except NotImplementedError as e:
            notes.append(f"attention scores skipped: {e}")
        df = classify_roles(df.assign(model=label), thresholds)

        for layer, n in neurons or []:
            if not (0 <= layer < lm.n_layers and 0 <= n < lm.d_mlp):
                raise IndexError(f"neuron {layer}.{n}: {label} has {lm.n_layers} layers of {lm.d_mlp} neurons")
        candidates_df, pool_desc = _candidate_pool(df, run_dir, label, neurons)

        # Top tokens for every neuron with a vocabulary role, and for the candidates.
        vocab_roled = df[df[["is_prediction", "is_suppression", "is_partition"]].any(axis=1)]
        token_keys = set(zip(vocab_roled["layer"], vocab_roled["neuron"], strict=True))
        token_keys |= set(neurons or [])
        tops = top_tokens(lm, token_keys)
        top_cols = ["top_promoted", "top_suppressed", "top_promoted_ids", "top_suppressed_ids"]  # ids: the report
        df = df.merge(tops[["layer", "neuron", *top_cols]], on=["layer", "neuron"], how="left")
        for c in top_cols:
            df[c] = df[c].apply(lambda v: list(v) if isinstance(v, (list, np.ndarray)) else [])
        role_frames.append(df)

        model_info: dict[str, Any] = {"pool": pool_desc, "null_dims": null_dims or default_null_dims(lm.d_model),
                                      "notes": notes}  # fmt: skip
        if interventions:
            batches = _run_batches(manifest, lm.tokenizer, tokens, batch_size, data)
            if neurons:
                ent_cands = list(neurons)
            else:
                ranked = candidates_df.sort_values(["is_entropy", "null_norm"], ascending=False)
                ent_cands = list(zip(ranked["layer"].head(top), ranked["neuron"].head(top), strict=True))
            ent_cands = [(int(a), int(b)) for a, b in ent_cands]
            flagged = df.loc[df["is_entropy"], ["layer", "neuron"]].itertuples(index=False)
            excluded = set(ent_cands) | {(int(a), int(b)) for a, b in flagged}
            layers = sorted({layer for layer, _ in ent_cands})
            rand_cands: list[tuple[int, int]] = []
            for i in range(n_random if layers else 0):
                layer = layers[i % len(layers)]
                options = [n for n in range(lm.d_mlp) if (layer, n) not in excluded and (layer, n) not in rand_cands]
                if options:
                    rand_cands.append((layer, int(rng.choice(options))))
            say(f"[{label}] entropy intervention: {len(ent_cands)} candidates, {len(rand_cands)} random")
            curves = entropy_intervention(lm, ent_cands + rand_cands, batches, values, multiples=multiples)
            curves["kind"] = [
                "nominal" if k == "nominal" else ("random" if (a, b) in set(rand_cands) else "candidate")
                for k, a, b in zip(curves["kind"], curves["layer"], curves["neuron"], strict=True)
            ]
            curve_frames.append(curves.assign(model=label))
            model_info["entropy_candidates"] = [f"{a}.{b}" for a, b in ent_cands]
            model_info["random_neurons"] = [f"{a}.{b}" for a, b in rand_cands]

            if bos is not None:
                pairs = _attention_pairs(df, candidates_df, neurons, top)
                say(f"[{label}] BOS path intervention: {len(pairs)} pairs")
                model_info["attention_pairs"] = [f"{a}.{b}->L{c}.H{d}" for (a, b), (c, d) in pairs]
                for neuron, head in pairs:
                    try:
                        points = bos_path_intervention(lm, neuron, head, batches, after_pos=after_pos)
                    except NotImplementedError as e:
                        notes.append(f"path intervention skipped: {e}")
                        break
                    h_val, z_val = bos.pair(neuron, head)
                    key = dict(model=label, layer=neuron[0], neuron=neuron[1], head_layer=head[0], head=head[1])
                    attn_frames.append(pd.DataFrame([{**key, "bos_score": h_val, "bos_z": z_val,
                                                      **summarize_path(points)}]))  # fmt: skip
                    if len(points) > MAX_POINTS:
                        points = points.iloc[np.sort(rng.choice(len(points), MAX_POINTS, replace=False))]
                    point_frames.append(points.assign(**key))
        info["models"][label] = model_info
        del lm

    roles = pd.concat(role_frames, ignore_index=True)
    front = ["model", "layer", "neuron", "role"]
    roles = roles[front + [c for c in roles.columns if c not in front]]
    out = run_dir / "roles.parquet"
    _write_parquet(roles, out, rid)
    written = [out]
    for frames, name in ((curve_frames, "interventions"), (attn_frames, "attention"),
                         (point_frames, "attention_points"), (hist_frames, "bos_scores")):  # fmt: skip
        path = run_dir / f"{name}.parquet"
        if frames:
            table = pd.concat(frames, ignore_index=True)
            table = table[["model"] + [c for c in table.columns if c != "model"]]
            _write_parquet(table, path, rid)
            written.append(path)
        elif interventions or name == "bos_scores":
            path.unlink(missing_ok=True)  # stale: from an earlier run with other candidates or models
    if _join_profiles(run_dir, roles, rid):
        written.append(run_dir / "profiles.parquet")
    info["written"] = [p.name for p in written]
    from univ_kernels.streaming import atomic_write_bytes

    atomic_write_bytes(run_dir / "roles.json", (json.dumps(info, indent=2, default=str) + "\n").encode())
    return out


def _candidate_pool(
    df: pd.DataFrame, run_dir: Path, label: str, neurons: Sequence[tuple[int, int]] | None
) -> tuple[pd.DataFrame, str]:
    """The rows candidates are drawn from, and a description: universal neurons if the run has any, else all."""
    if neurons:
        return df, "given neurons"
    pool, source = _universal_pool(run_dir, label)
    if pool is None:
        return df, "all neurons (no universal table: run 'univ universal' or 'univ analyze' first)"
    if not pool:
        return df, f"all neurons (no universal neuron in {source})"
    keys = pd.MultiIndex.from_frame(df[["layer", "neuron"]].astype(int))
    return df[keys.isin(list(pool))], f"universal neurons ({source})"


def _attention_pairs(
    df: pd.DataFrame, pool: pd.DataFrame, neurons: Sequence[tuple[int, int]] | None, top: int
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(neuron, head) pairs for the path intervention: given neurons' top heads, else the pool's top |bos_z|."""
    if neurons:
        rows = df.set_index(["layer", "neuron"]).loc[list(neurons)].reset_index()
    else:
        rows = pool.assign(_abs=pool["bos_z"].abs()).sort_values("_abs", ascending=False).head(top)
    rows = rows[rows["bos_layer"] >= 0]
    return [((int(r.layer), int(r.neuron)), (int(r.bos_layer), int(r.bos_head))) for r in rows.itertuples(index=False)]


def format_role_table(roles: pd.DataFrame) -> str:
    """Per model and layer: role counts and the median / 95th percentile of vocab kurtosis (CLI output)."""
    lines = [f"{'model':<14} {'layer':>5} {'pred':>5} {'supp':>5} {'part':>5} {'entr':>5} {'attn':>5} "
             f"{'kurt p50':>9} {'kurt p95':>9}"]  # fmt: skip
    for (model, layer), g in roles.groupby(["model", "layer"], sort=True):
        k = g["vocab_kurt"].dropna()
        p50, p95 = (float(np.percentile(k, q)) if len(k) else float("nan") for q in (50, 95))
        counts = [int(g[f"is_{r}"].sum()) for r in ROLE_NAMES]
        lines.append(
            f"{str(model)[:14]:<14} {layer:>5} " + " ".join(f"{c:>5}" for c in counts) + f" {p50:>9.2f} {p95:>9.2f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0,1,2,4") from None


def _main(args: argparse.Namespace) -> int:
    thresholds = RoleThresholds(
        kurt=args.kurt, partition_ratio=args.partition_ratio, partition_var=args.partition_var,
        entropy_share=args.entropy_share, entropy_norm_pct=args.entropy_norm_pct, bos_z=args.bos_z,
    )  # fmt: skip
    out = run_roles(
        args.dir, neurons=parse_neurons(args.neurons) if args.neurons else None,
        models=[args.model] if args.model else None, tokens=args.tokens, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, data=args.data, top=args.top, n_random=args.random,
        multiples=args.multiples, values=args.values, thresholds=thresholds, null_dims=args.null_dims,
        n_baseline=args.baseline_samples, after_pos=args.after_pos, interventions=not args.no_interventions,
        seed=args.seed, log=print,
    )  # fmt: skip
    roles = pd.read_parquet(out)
    print(format_role_table(roles))
    run_dir = out.parent
    if (run_dir / "interventions.parquet").is_file():
        curves = pd.read_parquet(run_dir / "interventions.parquet")
        fixed = curves[curves["kind"] != "nominal"]
        print("\nentropy intervention (mean next-token entropy at the lowest and highest fixed value):")
        for (model, layer, neuron), g in fixed.groupby(["model", "layer", "neuron"], sort=False):
            g = g.sort_values("value")
            print(
                f"  {model} {layer}.{neuron} ({g['kind'].iloc[0]}): entropy {g['entropy'].iloc[0]:.3f} → "
                f"{g['entropy'].iloc[-1]:.3f}, ln scale {g['ln_scale'].iloc[0]:.3f} → {g['ln_scale'].iloc[-1]:.3f}"
            )
    if (run_dir / "attention.parquet").is_file():
        attn = pd.read_parquet(run_dir / "attention.parquet")
        print("\nBOS path intervention (clean − query-ablated):")
        for r in attn.itertuples(index=False):
            print(
                f"  {r.model} {r.layer}.{r.neuron} → L{r.head_layer}.H{r.head}: h={r.bos_score:+.3f} "
                f"(z {r.bos_z:+.1f}), ΔP(BOS) {r.d_p_bos:+.4f}, Δ‖z‖ {100 * r.d_z_norm_frac:+.1f} %"
            )
    print(f"\nwrote {out} (and the other tables listed in {run_dir / 'roles.json'})")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``univ roles``."""
    p = subparsers.add_parser(
        "roles",
        help="weight-level roles: prediction/suppression/partition, entropy and attention-deactivation neurons",
        description=(
            "Classify every neuron of the run's analysed models by what its output weights do (Gurnee et al.\n"
            "2024, §5), on TransformerLens-style processed weights, then check the claims by intervention:\n\n"
            "  prediction / suppression  kurtosis over the vocabulary of cos(W_U[:, v], w_out) > 10, with\n"
            "                            positive / negative skew: the neuron boosts / suppresses a few tokens\n"
            "  partition                 high variance of that cosine: it splits the vocabulary in two\n"
            "  entropy                   a large w_out lying in W_U's effective null space: it rescales the\n"
            "                            final norm (a temperature). Checked by fixing its activation at\n"
            "                            multiples of its typical max against random neurons of its layer\n"
            "  attention (de)activation  w_outᵀ W_Q k_BOS / √d_head far outside the random-direction baseline\n"
            "                            for a later head. Checked by removing the neuron's output from that\n"
            "                            head's queries only (keys, values untouched) and measuring its\n"
            "                            attention to BOS and its output norm (GPT-2 only)\n\n"
            "Interventions run on a few batches of the run's data (run.json) for candidate neurons: universal\n"
            "neurons if 'univ universal' or 'univ analyze' ran, else all neurons, top --top by score; or\n"
            "--neurons. Writes DIR/roles.parquet, interventions.parquet, attention.parquet,\n"
            "attention_points.parquet, bos_scores.parquet, roles.json, and adds the role columns to\n"
            "profiles.parquet if it exists."
        ),
        epilog=(
            "examples:\n"
            "  univ roles runs/small\n"
            "  univ roles runs/small --neurons 11.3030,11.2859 --tokens 65536 --device cuda\n"
            "  univ roles runs/small --no-interventions            # weight scores only, no forward passes\n"
            "  univ roles runs/small --partition-var 0.005         # the paper's absolute partition cut"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="run directory written by 'univ correlate' (run.json)")
    p.add_argument("--neurons", default=None, metavar="L.N,L.N", help="intervene on these neurons only")
    p.add_argument("--model", default=None, metavar="LABEL", help="one analysed model (default: all analysed)")
    p.add_argument(
        "--tokens",
        type=int,
        default=16_384,
        help="kept tokens for the interventions (default 16384; each fixed value is one pass over them)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default: the run's)")
    p.add_argument("--device", default=None, help="cuda, cpu, … (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--data", default=None, help="data source instead of run.json's (same ctx and packing)")
    p.add_argument("--top", type=int, default=4, help="candidates per intervention when --neurons is not given")
    p.add_argument("--random", type=int, default=6, help="random baseline neurons for the entropy intervention")
    p.add_argument(
        "--multiples",
        type=_floats,
        default=list(DEFAULT_MULTIPLES),
        help="fixed values as multiples of each neuron's typical max (default 0,0.5,1,2,3,4)",
    )
    p.add_argument(
        "--values",
        type=_floats,
        default=None,
        help="absolute fixed values instead: --values=-0.17,0,1,2,4,6 (with '=' when the first is negative)",
    )
    p.add_argument("--kurt", type=float, default=10.0, help="vocab kurtosis cut for prediction/suppression (10)")
    p.add_argument("--partition-ratio", type=float, default=5.0, help="vocab_var · d_model cut for partition (5)")
    p.add_argument("--partition-var", type=float, default=None, help="absolute vocab_var cut instead (paper: 0.005)")
    p.add_argument("--entropy-share", type=float, default=0.5, help="null_share cut for entropy neurons (0.5)")
    p.add_argument("--entropy-norm-pct", type=float, default=90.0, help="within-layer ‖w_out‖ percentile cut (90)")
    p.add_argument("--bos-z", type=float, default=5.0, help="|bos_z| cut for attention (de)activation neurons (5)")
    p.add_argument("--null-dims", type=int, default=None, help="smallest singular directions of W_U (default 1%% of d)")
    p.add_argument("--baseline-samples", type=int, default=1000, help="random directions for the BOS baseline")
    p.add_argument("--after-pos", type=int, default=1, help="first query position of the path intervention")
    p.add_argument("--no-interventions", action="store_true", help="weight scores only")
    p.add_argument("--seed", type=int, default=0, help="random baseline neurons and directions")
    p.set_defaults(func=_main)
    return p

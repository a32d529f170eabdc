"""Scaling of a distributed ``univ correlate``: tokens/s and memory per rank for 1, 2, 4 ranks (torchrun).

    python -m bench.bench_scaling                               # CPU, gloo: tiny and zoo-sized GPT-2 seeds
    python -m bench.bench_scaling --sizes small --device cuda   # a multi-GPU machine: GPT2-small geometry, NCCL

Each configuration is one ``torchrun --standalone --nproc-per-node W`` job whose ranks run
``univ.run.distributed.run`` (W = 1 too, so every row goes through the same code, per-batch sync included).
Random-initialised GPT-2 seeds (throughput does not depend on training), reference mode, Gaussian baseline.
Per row, from the ranks' own timings in run.json:

- tok/s: tokens / the streaming loop's wall time (slowest rank; the ranks move in lockstep);
- efficiency: tok/s / (W × tok/s of the 1-rank row of that size);
- sync+comm: share of the run (stream + merge + finalize + reduce) spent in the per-batch agreement (which
  includes waiting for the slowest rank), the token-shard merges and the final reductions;
- accumulators: fp32 co-moments + W held by the busiest rank (the plan); peak RSS: the busiest rank's.

On CPU the ranks share the machine's cores: each rank gets max(1, cores / W) threads, so with more ranks than
cores the efficiency is bounded by cores / W.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_correlate import SIZES, make_seeds


def worker(cfg_path: str) -> None:
    """Inside torchrun: join the group and run the job (the entry point of every rank)."""
    import torch.distributed as dist

    from univ.run.config import CorrelateConfig
    from univ.run.distributed import run

    cfg = json.loads(Path(cfg_path).read_text())
    cfg["models"] = tuple(cfg["models"])
    backend = "nccl" if cfg.get("device") == "cuda" else "gloo"
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        run(CorrelateConfig(**cfg), progress=False, log=lambda *_: None)
    finally:
        dist.destroy_process_group()


def one(root: Path, seeds: list[Path], data: Path, size: str, world: int, shards: int, tokens: int,
        device: str, batch_size: int) -> dict:
    out = root / f"run-{size}-{world}-{shards}"
    cfg = {"models": [str(s) for s in seeds], "data": str(data), "out": str(out), "tokens": tokens,
           "ctx": SIZES[size][4], "batch_size": batch_size, "device": device, "save_state": False,
           "token_shards": shards}
    cfg_path = root / f"cfg-{size}-{world}-{shards}.json"
    cfg_path.write_text(json.dumps(cfg))
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // world)) if device == "cpu" else "4",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(world),
           "-m", "bench.bench_scaling", "--worker", str(cfg_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    info = json.loads((out / "run.json").read_text())
    ranks = info["distributed"]["ranks"]
    t = [r["timings"] for r in ranks]
    stream = max(x["stream_s"] for x in t)
    total = max(x["stream_s"] + x["merge_s"] + x["finalize_s"] + x["reduce_s"] for x in t)
    comm = max(x["sync_s"] + x["merge_s"] + x["reduce_s"] for x in t)
    return {"size": size, "world": world, "token_shards": info["distributed"]["token_shards"],
            "tokens": info["tokens"], "tok_s": info["tokens"] / stream, "comm_share": comm / total,
            "acc_bytes": max(r["accumulator_bytes"] for r in ranks),
            "rss_bytes": max(r["measured_peak_bytes"] for r in ranks), "passes": info["distributed"]["n_passes"]}


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--sizes", nargs="+", default=["tiny", "zoo"], choices=sorted(SIZES))
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tokens", type=int, nargs="+", default=[20_000, 12_000], help="per size, in order")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import platform

    import torch

    from univ.corpus import write_corpus_files

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'}, " \
        f"{os.cpu_count()} cores"
    print(f"univ correlate across ranks on {where} (torch {torch.__version__}), {args.seeds} seeds, reference mode")
    print("size   ranks  K  passes  tokens    tok/s  speed-up  efficiency  sync+comm  accumulators/rank  peak RSS/rank")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_corpus_files(root, "train")
        for size, tokens in zip(args.sizes, args.tokens + args.tokens[-1:] * len(args.sizes), strict=False):
            seeds = make_seeds(root / size, args.seeds, size)
            base = None
            for world in args.worlds:
                for shards in sorted({1, world}):
                    r = one(root, seeds, data, size, world, shards, tokens, args.device, args.batch_size)
                    base = base or r["tok_s"]
                    print(f"{size:5s}  {world:5d}  {r['token_shards']}  {r['passes']:6d}  {r['tokens']:6d}  "
                          f"{r['tok_s']:7,.0f}  {r['tok_s'] / base:8.2f}  {r['tok_s'] / base / world:10.2f}  "
                          f"{100 * r['comm_share']:8.1f}%  {fmt_bytes(r['acc_bytes']):>17s}  "
                          f"{fmt_bytes(r['rss_bytes']):>13s}", flush=True)


if __name__ == "__main__":
    main()

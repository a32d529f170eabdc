"""End-to-end throughput of ``univ correlate``: tokens/s for 2 and 5 seeds, and where the time goes.

    python -m bench.bench_correlate                  # CPU: zoo-sized GPT-2 seeds (2 layers, d_model 256)
    python -m bench.bench_correlate --size small     # GPT2-small geometry (random weights), for a GPU

Models are random-initialised GPT-2s saved with ``save_pretrained`` and loaded by path (the hub code path);
throughput does not depend on training. The share of time in the model forward vs the kernels (pre-pass,
co-moment GEMMs, moments) comes from the run manifest's timings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # (n_layer, n_embd, n_inner, n_head, n_ctx)
    "tiny": (2, 32, 64, 4, 64),  # tests/helpers.py's tiny GPT-2 geometry (bench_scaling)
    "zoo": (2, 256, 1024, 4, 128),
    "small": (12, 768, 3072, 12, 512),
}


def make_seeds(root: Path, n: int, size: str) -> list[Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from univ.corpus import load_tokenizer

    tok = load_tokenizer()
    n_layer, n_embd, n_inner, n_head, n_ctx = SIZES[size]
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        cfg = GPT2Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_inner=n_inner,
            n_head=n_head,
            n_positions=n_ctx,
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        path = root / f"seed-{seed}"
        GPT2LMHeadModel(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths


def bench(n_seeds: int, size: str, tokens: int, device: str | None, batch_size: int) -> dict:
    from univ.corpus import write_corpus_files
    from univ.correlate import CorrelateConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seeds = make_seeds(root, n_seeds, size)
        data = write_corpus_files(root, "train")
        cfg = CorrelateConfig(
            models=tuple(map(str, seeds)),
            data=str(data),
            out=str(root / "run"),
            tokens=tokens,
            ctx=SIZES[size][4],
            batch_size=batch_size,
            device=device,
            save_state=False,
        )
        t0 = time.perf_counter()
        run(cfg, progress=False, log=lambda *_: None)
        wall = time.perf_counter() - t0
        timings = json.loads((root / "run" / "run.json").read_text())["timings"]
    stream = timings["forward_s"] + timings["kernels_s"]
    return {
        "seeds": n_seeds,
        "size": size,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / stream,
        "tokens_per_s_wall": tokens / wall,
        "forward_share": timings["forward_s"] / stream,
        "kernels_share": timings["kernels_s"] / stream,
        "finalize_s": timings["finalize_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="zoo")
    p.add_argument("--tokens", type=int, default=50_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 5])
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"univ correlate end to end on {device} (torch {torch.__version__})")
    print("seeds  size   tokens   tok/s (stream)  tok/s (wall)  forward  kernels  finalize_s")
    for n in args.seeds:
        r = bench(n, args.size, args.tokens, args.device, args.batch_size)
        print(
            f"{r['seeds']:5d}  {r['size']:5s}  {r['tokens']:7d}  {r['tokens_per_s']:14,.0f}  "
            f"{r['tokens_per_s_wall']:12,.0f}  {100 * r['forward_share']:6.1f}%  {100 * r['kernels_share']:6.1f}%  "
            f"{r['finalize_s']:10.2f}"
        )


if __name__ == "__main__":
    main()

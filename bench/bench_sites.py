"""SAE latents vs MLP neurons as the run's units: time per batch of one streamed pair, and the encoder's share.

    python -m bench.bench_sites                  # zoo geometry (2 layers, d_model 256, 2 x 1024 neurons)
    python -m bench.bench_sites --size small --d-sae 3072 --batch-size 4

Per batch of tokens, for a pair of random-initialised GPT-2 seeds (loaded by path, as a run does): the
neuron site (forward with MLP hooks, pre-pass, co-moment update of every neuron against every neuron) against
the SAE site with one SAE per layer at ``blocks.L.hook_resid_post`` of the same width as the MLP (so the
co-moment work is the same): forward with residual hooks, the encoder GEMM + ReLU, pre-pass, update. The
encoder alone is timed too; its share is encoder time / SAE-site time. Providers run round-robin
(``bench.common.measure``), so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch

from bench.bench_correlate import SIZES, make_seeds
from bench.common import measure


def main(argv: list[str] | None = None) -> None:
    from univ.models import collect_mlp_activations, load_model
    from univ.sites import Sae, SiteModel
    from univ_kernels import ColumnMoments, update_pair

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="zoo", choices=sorted(SIZES))
    ap.add_argument("--d-sae", type=int, default=None, help="latents per SAE (default: the MLP width)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    n_layer, d_model, d_mlp, _, ctx = SIZES[args.size]
    d_sae = args.d_sae or d_mlp
    with tempfile.TemporaryDirectory() as tmp:
        models = [load_model(str(p), device="cpu", dtype="float32") for p in make_seeds(Path(tmp), 2, args.size)]
    g = torch.Generator().manual_seed(0)
    sites = [SiteModel(lm, [Sae(path=Path("."), hook=f"blocks.{la}.hook_resid_post", layer=la, point="hook_resid_post",
                                architecture="standard", W_enc=torch.randn(d_model, d_sae, generator=g) / d_model**0.5,
                                b_enc=torch.zeros(d_sae), b_dec=torch.zeros(d_model),
                                W_dec=torch.randn(d_sae, d_model, generator=g), apply_b_dec_to_input=False)
                            for la in range(n_layer)]) for lm in models]  # fmt: skip
    ids = torch.randint(1, models[0].tokenizer.vocab_size, (args.batch_size, ctx), generator=g)
    keep = torch.ones_like(ids, dtype=torch.bool)
    tokens = int(keep.sum())

    def pair(acts: list[torch.Tensor]) -> None:
        moments = [ColumnMoments(a.shape[1]) for a in acts]
        prepped = [m.prepare(a, operand_dtype=torch.float32, backend="torch")
                   for m, a in zip(moments, acts, strict=True)]
        c = torch.zeros(acts[0].shape[1], acts[1].shape[1])
        update_pair(c, prepped[0], prepped[1], backend="torch")

    def neurons() -> None:
        pair([collect_mlp_activations(lm, ids, keep=keep).post.reshape(tokens, -1) for lm in models])

    def saes() -> None:
        pair([s.latents(ids, keep).reshape(tokens, -1) for s in sites])

    resid = [torch.randn(tokens, d_model, generator=g) for _ in range(n_layer)]

    def encoder() -> None:
        for s in sites:
            for sae, x in zip(s.saes, resid, strict=True):
                sae.encode(x)

    t = measure({"neurons": neurons, "sae": saes, "encoder": encoder}, reps=args.reps)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"size {args.size}: {n_layer} layers, d_model {d_model}, {n_layer} x {d_mlp} neurons vs {n_layer} x {d_sae} "
          f"latents, {tokens:,} tokens a batch, one pair")  # fmt: skip
    for name in ("neurons", "sae", "encoder"):
        print(f"  {name:<8} {1e3 * t[name].median:9.1f} ms/batch  {tokens / t[name].median:10,.0f} tok/s")
    print(f"  SAE site / neuron site: {t['sae'].median / t['neurons'].median:.2f}x; encoder share of the SAE site: "
          f"{100 * t['encoder'].median / t['sae'].median:.0f} %")


if __name__ == "__main__":
    main()

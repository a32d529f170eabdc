"""``univ correlate`` on the command line: the parser, options → ``CorrelateConfig``, and ``main``."""

from __future__ import annotations

import argparse
import sys

from univ.baseline import KINDS as BASELINES
from univ.errors import Interrupted, UserError
from univ.run.config import DEFAULT_BASELINE_DRAWS, METHODS, MODES, CorrelateConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "correlate",
        help="correlate every MLP neuron of seed models over a token stream (the paper's experiment)",
        description=(
            "Stream the same tokens through several models that differ only in their training seed and compute,\n"
            "for every MLP neuron of the reference model (or of every model with --mode all-pairs), its maximum\n"
            "Pearson correlation with any neuron of each other model, plus a random-rotation baseline. Nothing of\n"
            "size [tokens × neurons] is kept: fused kernels accumulate co-moments batch by batch.\n\n"
            "Writes OUT/neurons.parquet (+csv), OUT/histograms.parquet, OUT/run.json and OUT/state/."
        ),
        epilog=(
            "examples:\n"
            "  univ correlate stanford-crfm/alias-gpt2-small-x21 stanford-crfm/battlestar-gpt2-small-x49 \\\n"
            "      stanford-crfm/caprica-gpt2-small-x81 --data pile_test.jsonl --tokens 100000000 --out runs/small\n"
            "  univ correlate zoo/seed-0 zoo/seed-1 zoo/seed-2 --data heldout.txt --tokens 60000 --ctx 128\n"
            "  univ correlate A B --data data.txt --out runs/x --resume      # continue an interrupted run\n"
            "  univ correlate A B --data data.txt --out runs/p --paper-exact # the paper's choices (fp16 acts, K=1)\n"
            "  univ correlate A B --data d.txt --method screen   # screen a sample, verify: N² only over the sample\n"
            "  univ correlate meta-llama/Llama-2-7b-hf lmsys/vicuna-7b-v1.5 --data d.txt --dry-run  # plan only\n"
            "  univ correlate A B --data d.txt --dry-run --ranks 8       # plan torchrun's 8 devices\n"
            "  torchrun --nproc-per-node 8 -m univ correlate A B --data d.txt --method screen   # ranks split the rows"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="hub names or local paths; the first is the reference")
    p.add_argument("--data", required=True, help="text file (.txt/.jsonl/.parquet), directory, tokenized dataset, "
                                                 "or a `datasets` hub name (streamed)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="kept tokens to read (default 1,000,000)")
    p.add_argument("--out", default="runs/correlate", help="output directory (default runs/correlate)")
    p.add_argument("--mode", choices=MODES, default="reference",
                   help="reference: model 1 vs each other (the paper); all-pairs: every pair")
    p.add_argument("--baseline", choices=BASELINES, default="gaussian",
                   help="rotation baseline: the paper's row-normalised gaussian, Haar orthogonal, or none")
    p.add_argument("--baseline-seed", type=int, default=0,
                   help="seed of the random rotations; another seed gives another draw of the baseline")
    p.add_argument("--baseline-draws", type=int, default=None, metavar="K",
                   help=f"independent rotations per layer, all from the same accumulators (default "
                        f"{DEFAULT_BASELINE_DRAWS}; 1 is the paper's single draw): neurons.parquet gets the baseline's "
                        "sd over draws and the excess's standard error, 'univ universal --rule draws' the borderline")
    p.add_argument("--paper-exact", action="store_true",
                   help="the paper's choices: fp32 models, activations stored as fp16, one Gaussian draw, exactly "
                        "pad/BOS/EOS and the single newline token excluded (univ.paper)")
    p.add_argument("--no-layer-similarity", action="store_true",
                   help="skip the layer x layer linear CKA (OUT/layer_similarity.parquet; it keeps model a's "
                        "within-layer co-moments too)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per sequence, BOS first (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (which documents fill which batch)")
    p.add_argument("--text-field", default="text", help="text column of jsonl/parquet/hub data")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--keep-newlines", action="store_true", help="do not exclude newline positions")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (default float32; bfloat16 moves r by up to 6e-3)")
    p.add_argument("--operand-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="GEMM operand dtype, after centring (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="correlation kernels: torch (BLAS/cuBLAS), triton (fused, GPU), auto: triton on CUDA")
    p.add_argument("--gemm", default=None, choices=["cublas", "triton", "triton-tma"], help="GPU GEMM path")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="accumulator memory budget (default 90%% of free device memory)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="TOKENS",
                   help="also write a checkpoint every TOKENS tokens; one is always written at the end of "
                        "each pass and on SIGINT/SIGTERM")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (finished or not) and the later stages' outputs there")
    p.add_argument("--no-save-state", action="store_true", help="do not keep the accumulators in OUT/state")
    p.add_argument("--activation-stats", action="store_true",
                   help="also stream the analysed models' pre-activation moments and frequencies in this pass "
                        "(OUT/activation_stats.parquet, the columns of 'univ stats')")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models' own code (off by default)")
    p.add_argument("--token-shards", type=int, default=None, metavar="K",
                   help="under torchrun: K ranks split the token stream, world/K split the accumulators "
                        "(default: the cost model's choice, see README)")
    p.add_argument("--sae", action="append", default=None, metavar="DIR[,DIR...]",
                   help="correlate SAE latents instead of MLP neurons: one --sae per model, in order, each an SAE "
                        "folder in sae_lens's format (cfg.json + sae_weights.safetensors); several SAEs of one model "
                        "comma-separated (see univ.sites)")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="exact: every neuron pair's co-moment (N² accumulators); screen: estimate them on a sample of "
                        "the stream, then compute exactly only the layers that can hold each neuron's best partner, "
                        "with a certificate and an exact fallback (the same answer; see README); auto (default): "
                        "exact when its accumulators fit in one pass (under torchrun: over the ranks), screen "
                        "otherwise; under torchrun the screen's ranks split the neurons")
    p.add_argument("--screen-tokens", type=int, default=None, metavar="N",
                   help="screen sample size, spread evenly over the stream (default: 1/50 of --tokens, at least "
                        "200,000)")
    p.add_argument("--dry-run", action="store_true",
                   help="read only each model's config (no weights, no data); print each method's memory, passes, "
                        "FLOPs and estimated time, and exit: 2 if the method asked for (or auto's pick) does not fit, "
                        "naming the options that would make it fit")
    p.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="--dry-run: plan for N ranks of torchrun (--nproc-per-node N), one device each (default 1)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="TF",
                   help="--dry-run: the device's dense TFLOP/s for the time estimate (default: an H100's bf16, 989)")
    p.set_defaults(func=main)


def config_from_args(args) -> CorrelateConfig:
    return CorrelateConfig(
        models=tuple(args.models), data=args.data, out=args.out, tokens=args.tokens, mode=args.mode,
        baseline=args.baseline, baseline_seed=args.baseline_seed, baseline_draws=args.baseline_draws,
        paper_exact=args.paper_exact, layer_similarity=not args.no_layer_similarity,
        batch_size=args.batch_size, ctx=args.ctx,
        seed=args.seed, text_field=args.text_field, split=args.split, exclude_newlines=not args.keep_newlines,
        device=args.device, dtype=args.dtype, operand_dtype=args.operand_dtype, backend=args.backend, gemm=args.gemm,
        memory_budget_gb=args.memory_budget, checkpoint_every=args.checkpoint_every,
        save_state=not args.no_save_state, activation_stats=args.activation_stats,
        trust_remote_code=args.trust_remote_code, token_shards=args.token_shards,
        sae=tuple(args.sae) if args.sae else None, method=args.method, screen_tokens=args.screen_tokens,
    )


def main(args) -> int:
    from univ.run.driver import run

    if args.dry_run:
        from univ.run.costs import dry_run

        return dry_run(config_from_args(args), peak_tflops=args.peak_tflops, ranks=args.ranks)
    if args.ranks != 1 or args.peak_tflops is not None:
        raise UserError("--ranks and --peak-tflops plan a run with --dry-run; a real run across ranks is "
                        "`torchrun --nproc-per-node N -m univ correlate ...`")
    try:
        run(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    return 0

"""Streaming one pass: batches of tokens → forward every model → pre-pass → co-moment updates.

``stream_pass`` reads the pass's token stream from where the state stopped (``batches_done``) and calls
``process_batch`` per batch; between batches it asks the caller whether to write a checkpoint or stop.
A signal (SIGINT, SIGTERM) only sets a flag (``StopFlag``): a batch is never left half-applied.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import torch

from univ.data import DataError
from univ.errors import UserError
from univ.paper import round_activations
from univ.run.config import CorrelateConfig
from univ.run.state import RunState
from univ_kernels import update_pair

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ActivationError(UserError, ValueError):
    """A model produced activations the accumulators refuse (NaN/Inf, overflow); nothing was accumulated."""


class StopFlag:
    """SIGINT and SIGTERM set a flag checked between batches: an interrupt never lands inside a half-applied
    update, and the run writes a checkpoint before it exits. A second SIGINT gives up at once."""

    def __init__(self):
        self.stop = False
        self.signal_name = ""
        self._old: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop and signum == signal.SIGINT:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.stop = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: finishing this batch, writing a checkpoint, then exiting "
              "(Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def excluded_ids(cfg: CorrelateConfig, tokenizer) -> set[int]:
    """Token ids whose positions the run skips: the paper's exact rule under --paper-exact, else univ's."""
    from univ.data import excluded_token_ids
    from univ.paper import paper_excluded_token_ids

    if cfg.paper_exact:
        return paper_excluded_token_ids(tokenizer)
    return excluded_token_ids(tokenizer, newlines=cfg.exclude_newlines)


def token_stream(cfg: CorrelateConfig, tokenizer, skip_batches: int = 0) -> Iterator:
    from univ.data import token_batches

    excluded = excluded_ids(cfg, tokenizer)
    return token_batches(cfg.data, tokenizer, ctx=cfg.ctx, batch_size=cfg.batch_size, seed=cfg.seed,
                         max_tokens=cfg.tokens, text_field=cfg.text_field, split=cfg.split,
                         skip_batches=skip_batches, excluded=excluded)


def stream_pass(state: RunState, models, cfg: CorrelateConfig, operand_dtype: torch.dtype, timings: dict,
                flag: StopFlag, after_batch: Callable[[RunState, int], None]) -> bool:
    """Stream the rest of the current pass into ``state``; False if ``flag`` stopped it (checkpoint due).

    ``after_batch(state, n_kept)`` runs after every batch (progress, periodic checkpoints): between two
    batches, where the state is consistent.
    """
    with warnings.catch_warnings():  # running out of data is stated in the summary and run.json instead
        warnings.filterwarnings("ignore", message="data source .* ran out")
        for batch in token_stream(cfg, models[0].tokenizer, skip_batches=state.batches_done):
            process_batch(state, models, batch.input_ids, batch.keep, cfg, operand_dtype, timings,
                          active=state.active_models())
            state.batches_done += 1
            state.tokens_done += batch.n_kept
            after_batch(state, batch.n_kept)
            if flag.stop:
                return False
    if state.tokens_done == 0:
        raise DataError(f"no tokens were read from {cfg.data!r}: is it empty, or is every position excluded?")
    return True


def process_batch(state: RunState, models, input_ids: torch.Tensor, keep: torch.Tensor, cfg: CorrelateConfig,
                  operand_dtype: torch.dtype, timings: dict, active: set[int] | None = None) -> None:
    """Forward every model once, pre-pass each once, then update every block (and W on the first pass).

    ``active``: the models to forward (a distributed rank runs only those its blocks need); default all.
    """
    t0 = time.perf_counter()
    want_pre = {i for i in state.act_stats if state.pass_index == state.stats_pass.get(i, 0)}
    acts, pres = forward_activations(models, input_ids, keep, cfg, active, want_pre)
    _sync(state.device)
    t1 = time.perf_counter()
    # Pre-pass every model first: a bad batch raises before any accumulator changes.
    try:
        prepped = [mom.prepare(x.to(state.device), operand_dtype=operand_dtype, backend=cfg.backend)
                   if x is not None else None for mom, x in zip(state.moments, acts, strict=True)]
    except ValueError as e:  # non-finite or overflowing activations: the models' numerics, not a bug of ours
        raise ActivationError(f"batch {state.batches_done + 1} of pass {state.pass_index + 1}: {e} "
                              "(e.g. --dtype float32 for a model that overflows in half precision)") from e
    for b, c in state.blocks.items():  # C += centred GEMM + Chan's merge term (univ_kernels.update_pair)
        d = state.plan.d_mlp[b.a]
        update_pair(c, prepped[b.a], prepped[b.m], rows=slice(b.layer_start * d, b.layer_end * d),
                    backend=cfg.backend, gemm=cfg.gemm)
    if state.collect_within:
        for i, w in state.within.items():
            d = state.plan.d_mlp[i]
            for layer in range(w.shape[0]):
                sl = slice(layer * d, (layer + 1) * d)
                update_pair(w[layer], prepped[i], prepped[i], rows=sl, cols=sl, backend=cfg.backend, gemm=cfg.gemm,
                            symmetric=True)  # upper triangle only: read W through symmetrize_upper
    for mom, p in zip(state.moments, prepped, strict=True):
        if p is not None:
            mom.commit(p)
    for i, (pre, post) in pres.items():  # after the kernels' checks: a rejected batch changes nothing
        state.act_stats[i].update(pre, post)
    _sync(state.device)
    timings["forward_s"] += t1 - t0
    timings["kernels_s"] += time.perf_counter() - t1


def forward_activations(models, input_ids: torch.Tensor, keep: torch.Tensor, cfg: CorrelateConfig,
                        active: set[int] | None, want_pre: set[int]) -> tuple[list, dict]:
    """Each active model's neuron values at the kept positions, [T, L·d] (None for the others), and for the
    models in ``want_pre`` their (pre, post) activations for the statistics."""
    from univ.models import collect_mlp_activations

    activation_dtype = getattr(torch, cfg.activation_dtype) if cfg.activation_dtype else None
    acts, pres = [], {}
    for i, lm in enumerate(models):
        if active is not None and i not in active:
            acts.append(None)
            continue
        if hasattr(lm, "saes"):  # SAE latents as the neurons (univ.sites.SiteModel)
            post = lm.latents(input_ids, keep)  # [T, n_saes, d_sae]
        else:
            got = collect_mlp_activations(lm, input_ids, keep=keep, post=True, pre=i in want_pre)  # [T, L, d]
            if i in want_pre:
                pres[i] = (got.pre, got.post)
            post = got.post
        acts.append(round_activations(post.reshape(post.shape[0], -1), activation_dtype))  # [T, L·d]
    return acts, pres


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: honest timings of forward vs kernels

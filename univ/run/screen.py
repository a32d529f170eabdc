"""``--method screen``: screen a sample of the stream, then verify exactly only what can matter.

    screen   the exact engine (blocks, passes, W) over S tokens spread evenly over the stream (every s-th
             batch), reduced to per-(neuron, layer) maxima: the best r of each neuron with each layer of the
             other model, and per baseline draw the best over that layer's rotated neurons (``univ.run.certify``)
    verify   over all T tokens: every model's moments, the rotated models' W, and for each neuron only the
             co-moments with the layers the screen left in contention (dense GEMMs over gathered rows),
             plus every column that was constant on the sample
    certify  a neuron whose best exact value beats sample max + margin of every unverified layer is
             certified; the others get all their remaining layers verified in one more pass (the fallback)

Memory: one screen block plus O(N·L·K) maxima, then the verified rows' layers; nothing N² over T. The
answer (max_corr, argmax, baseline) is the exhaustive method's; the histogram and layer CKA are the
screen's (run.json says so). A checkpoint is written at the end of the screen, after every verify pass,
every ``--checkpoint-every`` tokens and on SIGINT/SIGTERM; a kill in the screen restarts the screen.

Across ranks (``univ.run.screen_ranks``) the screen's blocks are split as the exact engine splits them and
its maxima are then reduced, so every rank holds the whole screen; the verify stage gives each rank whole
layers of rows (``own.<p>``: the owner of each row layer), so a row's certificate never needs another rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from univ import __version__
from univ.baseline import RotationBank, rotated_max
from univ.errors import Interrupted, Refused
from univ.run import certify, checkpoint, files
from univ.run.config import CorrelateConfig
from univ.run.finalize import block_cka, rotated_by_layer, rotated_by_layer_reverse
from univ.run.plan import Plan, accumulator_budget, analysed_models, format_bytes, make_plan, pairs_for, rotated_models
from univ.run.state import RunState
from univ.run.stream import ActivationError, forward_activations, process_batch, token_stream
from univ.stats import ActivationStats
from univ_kernels import ColumnMoments, correlation_summary, select_columns, update_pair
from univ_kernels.comoment import symmetrize_upper
from univ_kernels.io import StateFileError, read_tensors

MIN_SCREEN_TOKENS = 200_000
SCREEN_FRACTION = 50  # the default sample is 1/50 of the stream (at least MIN_SCREEN_TOKENS)


def default_screen_tokens(tokens: int) -> int:
    return min(tokens, max(MIN_SCREEN_TOKENS, tokens // SCREEN_FRACTION))


def directed_pairs(mode: str, n_models: int) -> list[tuple[int, int]]:
    """(rows, columns) model pairs with a result: (0, m) in reference mode, both directions in all-pairs."""
    pairs = pairs_for(mode, n_models)
    return pairs if mode == "reference" else [d for a, m in pairs for d in ((a, m), (m, a))]


@dataclass
class Item:
    """Verify rows [r0, r1) of the rows of pair p that need layer l of its column model, in one pass."""

    p: int
    layer: int
    r0: int
    r1: int


class ScreenRun:
    """The screen method's whole state: sample maxima, verified maxima, the current verify pass's accumulators."""

    def __init__(self, cfg: CorrelateConfig, models, device: torch.device, operand_dtype: torch.dtype,
                 rank: int = 0, world: int = 1):
        self.cfg, self.models, self.device, self.operand_dtype = cfg, models, device, operand_dtype
        self.rank, self.world = rank, world
        self.n_layers = [lm.n_layers for lm in models]
        self.d = [lm.d_mlp for lm in models]
        self.pairs = directed_pairs(cfg.mode, len(models))
        self.rotated = rotated_models(cfg.mode, len(models)) if cfg.baseline != "none" else []
        self.k = cfg.baseline_draws
        self.screen_tokens = default_screen_tokens(cfg.tokens) if cfg.screen_tokens is None else \
            min(cfg.screen_tokens, cfg.tokens)
        self.stride = max(1, round(cfg.tokens / self.screen_tokens))
        self.t: dict[str, torch.Tensor] = {}  # every tensor of the state by name (the checkpoint)
        self.c: dict = {"stage": "screen", "round": 0, "pass": 0, "items": [], "batches_done": 0,
                        "tokens_done": 0, "tokens_seen": 0, "screen_kept": 0, "screen_passes": 0,
                        "flops_screen": 0, "flops_verify": 0, "certified_first": None, "fallback_rows": 0,
                        "first_alive": 0, "first_fallback": 0}
        self.generation = 0
        self.moments: list[ColumnMoments] = []
        # the analysed models' activation statistics, gathered in the first verify pass (every token)
        self.act_stats = {a: ActivationStats(self.n_layers[a], self.d[a]) for a in
                          analysed_models(cfg.mode, len(models))} if cfg.activation_stats else {}

    # -- names --------------------------------------------------------------------------------------------
    def n_rows(self, p: int) -> int:
        a, _ = self.pairs[p]
        return self.n_layers[a] * self.d[a]

    def layers_of(self, p: int) -> int:
        return self.n_layers[self.pairs[p][1]]

    def own_rows(self, p: int) -> torch.Tensor:
        """[n] bool: the rows of pair p this process verifies (all of them in one process)."""
        owner = self.t.get(f"own.{p}")
        if owner is None:
            return torch.ones(self.n_rows(p), dtype=torch.bool)
        return owner.repeat_interleave(self.d[self.pairs[p][0]]) == self.rank

    def rows_needing(self, p: int, layer: int) -> torch.Tensor:
        """The rows of pair p that this round verifies against layer ``layer`` (cached for the round)."""
        key = (self.c["round"], p, layer)
        if getattr(self, "_rows_key", None) != self.c["round"]:
            self._rows, self._rows_key = {}, self.c["round"]
        if key not in self._rows:
            self._rows[key] = self.t[f"todo.{p}"][:, layer].nonzero().flatten()
        return self._rows[key]

    def verify_line(self) -> str:
        """What this round verifies, against the exhaustive method's every row × layer."""
        todo = sum(int(self.t[f"todo.{p}"].sum()) for p in range(len(self.pairs)))
        total = sum(self.n_rows(p) * self.layers_of(p) for p in range(len(self.pairs)))
        what = "verify" if self.c["round"] == 0 else "fallback (uncertified rows, every remaining layer)"
        return (f"{what}: {todo:,} of {total:,} neuron × layer co-moment rows ({100 * todo / max(total, 1):.1f} %) "
                f"over all {self.cfg.tokens:,} tokens in {len(self.c['items'])} pass"
                f"{'es' if len(self.c['items']) > 1 else ''}; stage memory {format_bytes(self.verify_bytes())}")

    def verify_bytes(self) -> int:
        """The verify stage's largest pass: its row-layer co-moments, W and the always-verified columns (first
        pass), the moments, the maxima and one batch of every model's activations and operands."""
        per_pass = [sum(4 * (it[3] - it[2]) * self.d[self.pairs[it[0]][1]] for it in items)
                    for items in self.c["items"]] or [0]
        maxima = sum(v.numel() * v.element_size() for v in self.t.values())
        return max(per_pass[0] + self._first_pass_bytes(), max(per_pass)) + maxima + self._stage_bytes()

    def peak_bytes(self) -> int:
        """The larger stage's bytes beside the weights: the screen's (``screen_bytes``, set by whoever ran it) or
        the verify stage's largest pass with the forward's transient."""
        from univ.run.memory import forward_bytes

        forward = forward_bytes(self.models, self.cfg.batch_size, self.cfg.ctx)
        return max(self.c.get("screen_bytes", 0), self.c.get("verify_bytes", 0) + forward)

    def _stage_bytes(self) -> int:
        """What every verify pass allocates beside its accumulators: the moments and one batch of every model's
        activations and operands."""
        moments = sum(8 * 4 * n * d for n, d in zip(self.n_layers, self.d, strict=True))
        t_batch = self.cfg.batch_size * self.cfg.ctx
        return moments + sum(t_batch * n * d * (4 + 4 + self.operand_dtype.itemsize)
                             for n, d in zip(self.n_layers, self.d, strict=True))

    # -- screen -------------------------------------------------------------------------------------------
    def screen_batches(self, tokenizer):
        kept = 0
        for i, batch in enumerate(token_stream(self.cfg, tokenizer)):
            if kept >= self.screen_tokens:
                return
            if i % self.stride == 0:
                kept += batch.n_kept
                yield batch

    def screen_cfg(self) -> CorrelateConfig:
        """The exact engine's options for the sample: S tokens, no statistics (those come from every token)."""
        return replace(self.cfg, tokens=self.screen_tokens, activation_stats=False)

    def screen_plan(self, batch_bytes: int) -> Plan:
        return make_plan(self.screen_cfg(), self.n_layers, self.d, self.device, batch_bytes)

    def run_screen(self, state: RunState, timings: dict, progress, stop, active=None) -> None:
        """The exact engine (``state``: the sample's plan, whole or this rank's share of its blocks) over the
        sample, one plan pass at a time, reduced to per-layer maxima. ``stop()`` names a signal to stop for
        (checked after every batch); ``active(p)`` the models pass p forwards here."""
        cfg_s = self.screen_cfg()
        active = active or (lambda p: state.active_models())
        for p, (_, m) in enumerate(self.pairs):
            self.t[f"sc_max.{p}"] = torch.full((self.n_rows(p), self.n_layers[m]), float("-inf"))
            if self.rotated:
                self.t[f"sc_rot.{p}"] = torch.full((self.k, self.n_rows(p), self.n_layers[m]), float("-inf"))
        for a, m in pairs_for(self.cfg.mode, len(self.models)):
            self.t[f"hist.{a}.{m}"] = torch.zeros(self.cfg.bins, dtype=torch.int64)
        while not state.finished:
            forwarded = active(state.pass_index)
            for batch in self.screen_batches(self.models[0].tokenizer):
                if forwarded:
                    process_batch(state, self.models, batch.input_ids, batch.keep, cfg_s, self.operand_dtype,
                                  timings, active=forwarded)
                state.tokens_done += batch.n_kept
                progress(batch.n_kept)
                why = stop()
                if why:
                    raise Interrupted(f"interrupted by {why} in the screen (pass {state.pass_index + 1} of its "
                                      "plan); no checkpoint is kept inside the screen: --resume (or the same "
                                      "command with --overwrite) starts it again")
            self.c["screen_kept"] = state.tokens_done
            self.c["flops_screen"] += 2 * state.tokens_done * sum(c.numel() for c in state.blocks.values())
            if state.pass_index == 0:
                self.c["flops_screen"] += state.tokens_done * sum(w.numel() for w in state.within.values())
            for i, mom in enumerate(state.moments):  # constant on the sample: from the first pass that forwards it
                if mom.n > 0 and f"screen_dead.{i}" not in self.t:
                    self.t[f"screen_dead.{i}"] = mom.dead.cpu()
            self._reduce_screen_pass(state)
            state.start_pass(state.pass_index + 1)
        for (a, m), k in state.cka.items():
            self.t[f"cka.{a}.{m}"] = k
        self.c["screen_passes"] = len(state.plan.passes)
        self.c["screen_plan"] = state.plan.to_dict()

    def _reduce_screen_pass(self, state: RunState) -> None:
        cfg, index = self.cfg, {pr: i for i, pr in enumerate(self.pairs)}
        for b, c in state.blocks.items():
            ma, mm = state.moments[b.a], state.moments[b.m]
            d_a, d_m = self.d[b.a], self.d[b.m]
            inv_a_all, inv_m = ma.inv_sd(), mm.inv_sd()
            rows = slice(b.layer_start * d_a, b.layer_end * d_a)
            fwd, rev = index[(b.a, b.m)], index.get((b.m, b.a))
            for la in range(b.layer_start, b.layer_end):
                r = slice((la - b.layer_start) * d_a, (la - b.layer_start + 1) * d_a)
                ga = slice(la * d_a, (la + 1) * d_a)
                for lm in range(self.n_layers[b.m]):
                    cols = slice(lm * d_m, (lm + 1) * d_m)
                    want = {"max_a", "hist"} | ({"max_b"} if rev is not None else set())
                    s = correlation_summary(c[r, cols], torch.zeros(d_a), torch.zeros(d_m), inv_a_all[ga],
                                            inv_m[cols], bins=cfg.bins, backend=cfg.backend, outputs=want)
                    self.t[f"sc_max.{fwd}"][ga, lm] = s.max_a.cpu()
                    self.t[f"hist.{b.a}.{b.m}"] += s.hist.cpu()
                    if rev is not None:
                        self.t[f"sc_max.{rev}"][cols, la] = s.max_b.cpu()
            block_cka(state, b, c, ma.offset()[rows])
            if not self.rotated:
                continue
            for lm, r in rotated_by_layer(state, b, c, ma.offset()[rows], inv_a_all[rows], cfg):
                self.t[f"sc_rot.{fwd}"][:, rows, lm] = r.cpu()
            if rev is not None:
                for la, r in rotated_by_layer_reverse(state, b, c, ma.offset()[rows], cfg):
                    self.t[f"sc_rot.{rev}"][:, :, la] = r.cpu()

    def start_verify(self) -> None:
        """Round 0's layers per row, who verifies which row layers, the screen-dead columns, empty verified
        maxima. Every rank holds the same screen here, so every rank computes the same split."""
        delta = certify.provisional_delta(self.c["screen_kept"])
        for p in range(len(self.pairs)):
            self.t[f"todo.{p}"] = certify.select_layers(self.t[f"sc_max.{p}"], self.t.get(f"sc_rot.{p}"), delta)
        if self.world > 1:
            self._split_rows()
        for p, (_a, m) in enumerate(self.pairs):
            n, L = self.n_rows(p), self.n_layers[m]
            self.t[f"todo.{p}"] &= self.own_rows(p)[:, None]
            self.t[f"done.{p}"] = torch.zeros((n, L), dtype=torch.bool)
            self.t[f"ex_max.{p}"] = torch.full((n, L), float("nan"))
            self.t[f"ex_arg.{p}"] = torch.full((n, L), -1, dtype=torch.int64)
            if self.rotated:
                self.t[f"ex_rot.{p}"] = torch.full((self.k, n, L), float("nan"))
            self.t[f"extra_cols.{p}"] = self.t[f"screen_dead.{m}"].nonzero().flatten()
            self.t[f"extra_max.{p}"] = torch.full((n,), float("nan"))
            self.t[f"extra_arg.{p}"] = torch.full((n,), -1, dtype=torch.int64)
        self.c.update(stage="verify", round=0, delta=delta)
        self._plan_round()

    def _split_rows(self) -> None:
        """``own.<p>``: each row layer of each pair to one rank, largest verify work first to the least loaded
        (work: the row × layer segments the first round verifies, times their width)."""
        loads = [0] * self.world
        owner = {p: torch.zeros(self.n_layers[a], dtype=torch.int64) for p, (a, _) in enumerate(self.pairs)}
        work = []
        for p, (a, m) in enumerate(self.pairs):
            per_layer = self.t[f"todo.{p}"].sum(1).view(self.n_layers[a], self.d[a]).sum(1)
            work += [(-(int(w) + 1) * self.d[m], p, la) for la, w in enumerate(per_layer.tolist())]
        for w, p, la in sorted(work):
            r = min(range(self.world), key=lambda i: (loads[i], i))
            owner[p][la] = r
            loads[r] -= w
        for p, o in owner.items():
            self.t[f"own.{p}"] = o

    # -- verify -------------------------------------------------------------------------------------------
    def _plan_round(self) -> None:
        """Split the round's (pair, layer, rows) work into passes under the memory budget."""
        # the maxima are held already; the moments and a batch are not yet (the first pass's W and columns: below)
        budget = accumulator_budget(self.cfg, self.device, self._stage_bytes())
        passes: list[list[Item]] = [[]]
        used = self._first_pass_bytes() if self.c["round"] == 0 else 0
        for p, (_, m) in enumerate(self.pairs):
            row_bytes = 4 * self.d[m]
            for layer in range(self.n_layers[m]):
                n = len(self.rows_needing(p, layer))
                r0 = 0
                while r0 < n:
                    fit = min(n - r0, max(0, (budget - used) // row_bytes))
                    if fit == 0:
                        if not passes[-1]:  # not even one row fits beside the first pass's fixed state
                            fit = 1
                        else:
                            passes.append([])
                            used = 0
                            continue
                    passes[-1].append(Item(p, layer, r0, r0 + fit))
                    used += fit * row_bytes
                    r0 += fit
        self.c["items"] = [[[it.p, it.layer, it.r0, it.r1] for it in ps] for ps in passes]
        self.c["pass"] = 0
        self.c["verify_bytes"] = max(self.c.get("verify_bytes", 0), self.verify_bytes())
        self._start_pass()

    def _first_pass_bytes(self) -> int:
        w = sum(4 * self.n_layers[i] * self.d[i] ** 2 for i in self.rotated)
        extra = sum(4 * int(self.own_rows(p).sum()) * len(self.t[f"extra_cols.{p}"]) for p in range(len(self.pairs)))
        return w + extra

    def items(self) -> list[Item]:
        return [Item(*it) for it in self.c["items"][self.c["pass"]]] if self.c["pass"] < len(self.c["items"]) else []

    @property
    def first_pass(self) -> bool:
        return self.c["round"] == 0 and self.c["pass"] == 0

    def _start_pass(self) -> None:
        """Zero the accumulators of the current verify pass (and on the first one: W, extra columns, stats)."""
        for k in [k for k in self.t if k.startswith(("seg.", "mom.", "within.", "extra_c.", "stats."))]:
            del self.t[k]
        self.c.update(batches_done=0, tokens_done=0)
        self.moments = [ColumnMoments(n * d, device=self.device, name=f"model {i} ({lm.name})")
                        for i, (lm, n, d) in enumerate(zip(self.models, self.n_layers, self.d, strict=True))]
        for it in self.items():
            self.t[f"seg.{it.p}.{it.layer}.{it.r0}"] = torch.zeros((it.r1 - it.r0, self.d[self.pairs[it.p][1]]),
                                                                   device=self.device)
        if self.first_pass:
            for i in self.rotated:
                self.t[f"within.{i}"] = torch.zeros((self.n_layers[i], self.d[i], self.d[i]), device=self.device)
            for p in range(len(self.pairs)):
                n_x = len(self.t[f"extra_cols.{p}"])
                n_own = int(self.own_rows(p).sum())
                if n_x and n_own:
                    self.t[f"extra_c.{p}"] = torch.zeros((n_own, n_x), device=self.device)

    def active(self) -> set[int]:
        if self.first_pass:
            return set(range(len(self.models)))
        return {i for it in self.items() for i in self.pairs[it.p]}

    def verify_batch(self, input_ids, keep, timings: dict) -> int:
        """One batch of the current verify pass: forward, pre-pass, gathered-row GEMMs, commit."""
        import time

        t0 = time.perf_counter()
        acts, pres = forward_activations(self.models, input_ids, keep, self.cfg, self.active(),
                                         set(self.act_stats) if self.first_pass else set())
        t1 = time.perf_counter()
        try:
            prepped = [mom.prepare(x.to(self.device), operand_dtype=self.operand_dtype, backend=self.cfg.backend)
                       if x is not None else None for mom, x in zip(self.moments, acts, strict=True)]
        except ValueError as e:
            raise ActivationError(f"batch {self.c['batches_done'] + 1} of the verify pass: {e} (e.g. --dtype "
                                  "float32 for a model that overflows in half precision)") from e
        kw = {"backend": self.cfg.backend, "gemm": self.cfg.gemm}
        for it in self.items():
            a, m = self.pairs[it.p]
            rows = self.rows_needing(it.p, it.layer)[it.r0:it.r1]
            cols = slice(it.layer * self.d[m], (it.layer + 1) * self.d[m])
            update_pair(self.t[f"seg.{it.p}.{it.layer}.{it.r0}"], self._gather(prepped[a], it.p, rows), prepped[m],
                        cols=cols, **kw)
        if self.first_pass:
            for i in self.rotated:
                for layer in range(self.n_layers[i]):
                    sl = slice(layer * self.d[i], (layer + 1) * self.d[i])
                    update_pair(self.t[f"within.{i}"][layer], prepped[i], prepped[i], rows=sl, cols=sl,
                                symmetric=True, **kw)
            for p, (a, m) in enumerate(self.pairs):
                if f"extra_c.{p}" in self.t:
                    rows = self.own_rows(p).nonzero().flatten()
                    update_pair(self.t[f"extra_c.{p}"], self._gather(prepped[a], p, rows),
                                select_columns(prepped[m], self.t[f"extra_cols.{p}"]), **kw)
        for mom, p in zip(self.moments, prepped, strict=True):
            if p is not None:
                mom.commit(p)
        for i, (pre, post) in pres.items():
            self.act_stats[i].update(pre, post)
        timings["forward_s"] += t1 - t0
        timings["kernels_s"] += time.perf_counter() - t1
        n = int(keep.sum())
        self.c["batches_done"] += 1
        self.c["tokens_done"] += n
        return n

    def _gather(self, prepped, p: int, rows: torch.Tensor):
        """The rows' columns of a prepared batch: the batch itself when they are all of them (no copy)."""
        return prepped if len(rows) == self.n_rows(p) else select_columns(prepped, rows)

    def finish_pass(self) -> None:
        """Reduce the pass's accumulators to verified maxima; on the first pass keep the moments, W, stats."""
        t_tok = self.c["tokens_done"]
        if self.first_pass:
            self.c["tokens_seen"] = t_tok
            for i, mom in enumerate(self.moments):
                for k, v in mom.state_dict(f"moments_t.{i}").items():
                    self.t[k] = v
                self.c.setdefault("moments_n", [0] * len(self.models))[i] = mom.n
            for i in self.rotated:
                self.t[f"w_t.{i}"] = self.t.pop(f"within.{i}")
            self.c["flops_verify"] += t_tok * sum(self.n_layers[i] * self.d[i] ** 2 for i in self.rotated)
        inv = [self._final_moments(i).inv_sd() for i in range(len(self.models))]
        bank = RotationBank(self.cfg.baseline, self.cfg.baseline_seed, self.k) if self.rotated else None
        for it in self.items():
            a, m = self.pairs[it.p]
            rows = self.rows_needing(it.p, it.layer)[it.r0:it.r1]
            cols = slice(it.layer * self.d[m], (it.layer + 1) * self.d[m])
            c = self.t.pop(f"seg.{it.p}.{it.layer}.{it.r0}")
            s = correlation_summary(c, torch.zeros(len(rows)), torch.zeros(self.d[m]), inv[a][rows], inv[m][cols],
                                    backend=self.cfg.backend, outputs={"argmax_a"})
            self.t[f"ex_max.{it.p}"][rows, it.layer] = s.max_a.cpu()
            self.t[f"ex_arg.{it.p}"][rows, it.layer] = torch.where(s.argmax_a.cpu() >= 0,
                                                                  s.argmax_a.cpu() + cols.start, -1)
            if bank is not None:
                w = symmetrize_upper(self.t[f"w_t.{m}"][it.layer])
                q, inv_rot = bank.get(m, it.layer, w)
                self.t[f"ex_rot.{it.p}"][:, rows, it.layer] = rotated_max(c, inv[a][rows], q, inv_rot, self.k).cpu()
            self.t[f"done.{it.p}"][rows, it.layer] = True
            self.c["flops_verify"] += 2 * t_tok * c.numel()
        if self.first_pass:
            for p, (a, m) in enumerate(self.pairs):
                c = self.t.pop(f"extra_c.{p}", None)
                if c is None:
                    continue
                cols, rows = self.t[f"extra_cols.{p}"], self.own_rows(p).nonzero().flatten()
                s = correlation_summary(c, torch.zeros(c.shape[0]), torch.zeros(c.shape[1]), inv[a][rows],
                                        inv[m][cols], backend=self.cfg.backend, outputs={"argmax_a"})
                self.t[f"extra_max.{p}"][rows] = s.max_a.cpu()
                self.t[f"extra_arg.{p}"][rows] = torch.where(s.argmax_a.cpu() >= 0,
                                                             cols[s.argmax_a.cpu().clamp(min=0)], -1)
                self.c["flops_verify"] += 2 * t_tok * c.numel()
        self.c["pass"] += 1
        self.c["verify_passes"] = self.c.get("verify_passes", 0) + 1
        if self.c["pass"] >= len(self.c["items"]):
            self._end_round()
        else:
            self._start_pass()

    def _final_moments(self, i: int) -> ColumnMoments:
        if f"moments_t.{i}.mean" not in self.t:
            return self.moments[i]
        mom = ColumnMoments(self.n_layers[i] * self.d[i], name=f"model {i}")
        mom.load_state_dict(self.t, f"moments_t.{i}", self.c["moments_n"][i])
        return mom

    def _end_round(self) -> None:
        """The certificate: rows whose every unverified layer is bounded below their best exact value are done;
        the others get those layers in the next round (from round MAX_ROUNDS − 1 on: all of theirs). The margins
        stop growing then, so a certified row stays certified and the loop ends with the exhaustive answer."""
        needs, n_fallback = {}, 0
        last = self.c["round"] + 1 >= certify.MAX_ROUNDS - 1
        for p in range(len(self.pairs)):
            need = self.uncertified(p, freeze=last and self.c["round"] + 1 > certify.MAX_ROUNDS - 1)
            if last:
                need = need.any(1, keepdim=True) & ~self.t[f"done.{p}"]
            needs[p] = need
            n_fallback += int(need.any(1).sum())
        if self.c["round"] == 0:
            alive = sum(int((~self._final_moments(a).dead.cpu() & self.own_rows(p)).sum())
                        for p, (a, _) in enumerate(self.pairs))
            self.c.update(first_alive=alive, first_fallback=n_fallback, certified_first=1 - n_fallback / max(alive, 1))
        self.c["fallback_rows"] += n_fallback
        if n_fallback == 0:
            self.c["stage"] = "done"
            return
        for p, need in needs.items():
            self.t[f"todo.{p}"] = need
        self.c["round"] += 1
        self._plan_round()

    def uncertified(self, p: int, freeze: bool = False) -> torch.Tensor:
        a, _ = self.pairs[p]
        done = self.t[f"done.{p}"]
        sc_rot, ex_rot = self.t.get(f"sc_rot.{p}"), self.t.get(f"ex_rot.{p}")
        group = torch.arange(self.n_rows(p)) // self.d[a]
        margin = certify.observed_margin(done, self.t[f"sc_max.{p}"], sc_rot, self.t[f"ex_max.{p}"], ex_rot, group,
                                         self.n_layers[a])
        if freeze:
            margin = self.t[f"margin.{p}"].double()
        elif f"margin.{p}" in self.t:  # never shrinks: a certificate given stays given, a later round only adds
            margin = torch.maximum(margin, self.t[f"margin.{p}"].double())
        self.t[f"margin.{p}"] = margin.float()
        best, _ = self.result(p)[:2]
        base = certify.best_rotated(done, ex_rot) if ex_rot is not None else None
        alive = ~self._final_moments(a).dead.cpu() & self.own_rows(p)
        return certify.uncertified(done, alive, self.t[f"sc_max.{p}"], sc_rot, best, base, margin)

    def result(self, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        done = self.t[f"done.{p}"]
        best, arg = certify.best_of(done, self.t[f"ex_max.{p}"], self.t[f"ex_arg.{p}"], self.t[f"extra_max.{p}"],
                                    self.t[f"extra_arg.{p}"])
        base = certify.best_rotated(done, self.t[f"ex_rot.{p}"]) if self.rotated else None
        return best, arg, base

    # -- checkpoint ---------------------------------------------------------------------------------------
    ACCUMULATORS = ("seg.", "within.", "extra_c.")

    def write_checkpoint(self, path, ident: dict, **meta_extra) -> None:
        """The whole state as the run's next checkpoint generation (one atomic file, as the exact method's; under
        torchrun one per rank, ``meta_extra`` naming the rank)."""
        self.generation += 1
        named = dict(self.t)
        for i, mom in enumerate(self.moments):
            named.update(mom.state_dict(f"mom.{i}"))
        for i, st in self.act_stats.items():
            named.update(st.state_dict(f"stats.{i}"))
        counters = {**self.c, "moments_cur_n": [m.n for m in self.moments],
                    "stats_n": {str(i): st.counters() for i, st in self.act_stats.items()}}
        meta = {"kind": checkpoint.KIND, "version": checkpoint.VERSION, "method": "screen", "run_id": ident["run_id"],
                "generation": self.generation, "fingerprint": ident["fingerprint"], "counters": counters,
                "univ_version": __version__, **meta_extra}
        files.write_tensors(path, {k: v.detach().contiguous().cpu() for k, v in named.items()}, meta)

    def load_checkpoint(self, path, meta: dict) -> None:
        """Take over a screen checkpoint (its stage, round, pass and batch); Refused if it does not fit this run."""
        c = meta.get("counters", {})
        self.generation = meta.get("generation", 0)
        if c.get("stage") not in ("verify", "done"):  # killed in the screen: it starts again
            return
        try:
            tensors, _ = read_tensors(path)
        except StateFileError as e:
            raise Refused(f"checkpoint unusable: {e}; start again with --overwrite") from e
        try:
            self.c = {k: v for k, v in c.items() if k not in ("moments_cur_n", "stats_n")}
            self.t = {k: v for k, v in tensors.items()
                      if not k.startswith(("mom.", "stats.", *self.ACCUMULATORS))}
            self._start_pass()  # the current pass's accumulators, zeroed with the shapes the plan implies
            self.c.update(batches_done=c["batches_done"], tokens_done=c["tokens_done"])
            for k, v in self.t.items():
                if k.startswith(self.ACCUMULATORS):
                    if tensors[k].shape != v.shape:
                        raise ValueError(f"{k} is {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
                    v.copy_(tensors[k])
            for i, mom in enumerate(self.moments):
                mom.load_state_dict(tensors, f"mom.{i}", c["moments_cur_n"][i])
            for i, st in self.act_stats.items():
                st.load_state_dict(tensors, f"stats.{i}", c["stats_n"][str(i)])
            for p in range(len(self.pairs)):
                if self.t[f"done.{p}"].shape != (self.n_rows(p), self.layers_of(p)):
                    raise ValueError(f"done.{p} does not match the models' neurons")
            held = sorted({m.n for i, m in enumerate(self.moments) if i in self.active()})
            counted = 0 <= self.c["batches_done"] <= self.c["tokens_done"]
            if self.c["stage"] == "verify" and held != [self.c["tokens_done"]] or not counted:
                raise ValueError(f"counters: tokens_done {self.c['tokens_done']}, batches_done "
                                 f"{self.c['batches_done']}, but the moments hold {held} tokens")
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise Refused(f"checkpoint unusable: {path} does not hold a screen run's state for "
                          f"these models and options ({e}); start again with --overwrite") from e

    # -- summary ------------------------------------------------------------------------------------------
    def exhaustive_flops(self) -> int:
        t = self.c["tokens_seen"]
        pairs = pairs_for(self.cfg.mode, len(self.models))
        n = [a * b for a, b in zip(self.n_layers, self.d, strict=True)]
        rotated = sum(self.n_layers[i] * self.d[i] ** 2 for i in self.rotated)
        return 2 * t * sum(n[a] * n[m] for a, m in pairs) + t * rotated

    def report(self) -> dict:
        """run.json's ``screen``: what was sampled, verified and certified, and the work against exhaustive."""
        layers = [float(self.t[f"done.{p}"].sum(1).float().mean()) for p in range(len(self.pairs))]
        margins = [self.t[f"margin.{p}"][self.own_rows(p)] for p in range(len(self.pairs))]
        done = self.c["flops_screen"] + self.c["flops_verify"]
        return {
            "screen_tokens": self.c["screen_kept"], "screen_tokens_requested": self.screen_tokens,
            "screen_stride_batches": self.stride, "screen_passes": self.c["screen_passes"],
            "provisional_delta": self.c.get("delta"), "gamma": certify.GAMMA, "floor": certify.FLOOR,
            "rounds": self.c["round"] + 1, "verify_passes": self.c.get("verify_passes", 0),
            "certified_first_round": self.c["certified_first"], "fallback_rows": self.c["fallback_rows"],
            "verified_layers_per_row": {f"{a}->{m}": round(v, 3) for (a, m), v in zip(self.pairs, layers,
                                                                                       strict=True)},
            "margin_max": max((float(m.max()) for m in margins if len(m)), default=None),
            "flops": {"screen": self.c["flops_screen"], "verify": self.c["flops_verify"], "total": done,
                      "exhaustive": self.exhaustive_flops(),
                      "ratio": round(done / max(self.exhaustive_flops(), 1), 4)},
            "histogram_and_cka_from": "the screen sample",
        }


__all__ = ["Item", "ScreenRun", "default_screen_tokens", "directed_pairs"]

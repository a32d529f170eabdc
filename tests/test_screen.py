"""--method screen: the same answer as the exhaustive method, on real tiny models and on planted activations built
to defeat a screen (near-ties, weak partners, heavy tails, a partner that only shows late in the stream)."""

from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import corpus_text, tiny_seeds_and_text, tiny_tokenizer

from univ.errors import Refused, UserError
from univ.run import certify
from univ.run.config import CorrelateConfig
from univ.run.driver import run


def _cfg(models, data, out, **kw) -> CorrelateConfig:
    base = dict(tokens=2400, ctx=32, batch_size=4, device="cpu", backend="torch", baseline_draws=3)
    base.update(kw)
    return CorrelateConfig(models=tuple(str(m) for m in models), data=str(data), out=str(out), **base)


def _quiet(*_a, **_k):
    pass


def _both(models, data, tmp_path, name="r", **kw):
    """(exact table, screen table, screen run.json) of the same run."""
    tables = {}
    for method in ("exact", "screen"):
        out = tmp_path / f"{name}-{method}"
        run(_cfg(models, data, out, method=method, **kw), progress=False, log=_quiet)
        tables[method] = pd.read_parquet(out / "neurons.parquet")
    return tables["exact"], tables["screen"], json.loads((tmp_path / f"{name}-screen" / "run.json").read_text())


def assert_same_answer(e: pd.DataFrame, s: pd.DataFrame, tol: float = 1e-5) -> None:
    assert list(e.columns) == list(s.columns)
    for c in e.columns:
        if e[c].dtype.kind == "f":
            np.testing.assert_array_equal(np.isnan(e[c].values), np.isnan(s[c].values), err_msg=c)
            np.testing.assert_allclose(s[c].values, e[c].values, atol=tol, rtol=0, equal_nan=True, err_msg=c)
        else:
            assert (e[c].values == s[c].values).all(), c
    assert set(e.index[e.excess_corr > 0.5]) == set(s.index[s.excess_corr > 0.5])


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Three 4-layer tiny GPT-2 seeds and a text file."""
    root = tmp_path_factory.mktemp("deep")
    return tiny_seeds_and_text(root, range(3), 80_000, n_layer=4)


@pytest.mark.parametrize("mode", ["reference", "all-pairs"])
def test_screen_equals_exact_on_tiny_models(deep, tmp_path, mode):
    paths, data = deep
    e, s, manifest = _both(paths, data, tmp_path, mode=mode, screen_tokens=600)
    assert_same_answer(e, s)
    rep = manifest["screen"]
    assert manifest["method"] == "screen" and rep["screen_tokens"] >= 600
    assert rep["flops"]["exhaustive"] > 0 and 0 <= rep["certified_first_round"] <= 1


def test_screen_without_baseline_and_with_one_draw(deep, tmp_path):
    paths, data = deep
    for kw in ({"baseline": "none"}, {"baseline_draws": 1, "baseline": "orthogonal"}):
        e, s, _ = _both(paths[:2], data, tmp_path, name=kw["baseline"], screen_tokens=500, **kw)
        assert_same_answer(e, s)


def test_forced_fallback_still_exact(deep, tmp_path, monkeypatch):
    """With no window at all (each row verifies only its best sample layer) the certificate fails for many rows:
    the fallback rounds must bring every one of them back to the exhaustive answer."""
    monkeypatch.setattr(certify, "PROVISIONAL_Z", 0.0)
    paths, data = deep
    e, s, manifest = _both(paths, data, tmp_path, screen_tokens=300, mode="all-pairs")
    assert_same_answer(e, s)
    assert manifest["screen"]["fallback_rows"] > 0 and manifest["screen"]["rounds"] >= 2


def test_permuted_copy_recovered_exactly(deep, tmp_path):
    from test_correlate import permuted_copy

    paths, data = deep
    perm, index = permuted_copy(paths[0], tmp_path / "perm")
    out = tmp_path / "perm-run"
    run(_cfg([paths[0], perm], data, out, method="screen", screen_tokens=400), progress=False, log=_quiet)
    t = pd.read_parquet(out / "neurons.parquet")
    label = [c for c in t.columns if c.startswith("max_corr.")][0].split(".", 1)[1]
    assert (t[f"max_corr.{label}"] > 0.99999).all()
    assert (t[f"argmax_layer.{label}"] == t["layer"]).all()
    for layer, p in enumerate(index):  # neuron n of the copy is neuron p[n] of the original
        got = t[t.layer == layer][f"argmax_neuron.{label}"].to_numpy()
        assert (p[torch.from_numpy(got.copy())].numpy() == np.arange(len(p))).all()


# -- planted activations -----------------------------------------------------------------------------------------
class Planted:
    """A stand-in model whose neurons are fixed functions of the token and its predecessor (lookup tables), so a
    test can plant any correlation structure; read through the SAE-site path of the stream (``latents``)."""

    dtype = torch.float32

    def __init__(self, name: str, tables: torch.Tensor, tokenizer):
        self.name, self.tables, self.tokenizer = name, tables, tokenizer  # tables [2, vocab, L, d]
        self.n_layers, self.d_mlp = tables.shape[2], tables.shape[3]
        self.n_neurons = self.n_layers * self.d_mlp
        self.saes = ()
        self.meta = {"source": name}
        cfg = types.SimpleNamespace(hidden_size=8, num_attention_heads=1)
        self.model = types.SimpleNamespace(config=cfg, parameters=lambda: iter([torch.zeros(1)]))

    def latents(self, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        prev = torch.cat([input_ids[:, :1], input_ids[:, :-1]], 1)
        x = self.tables[0][input_ids] + self.tables[1][prev]  # [B, ctx, L, d]
        return x[keep]


def _planted_run(tmp_path, monkeypatch, tables, text: str, name: str, **kw):
    tok = tiny_tokenizer()
    models = [Planted(f"planted-{i}", t, tok) for i, t in enumerate(tables)]
    monkeypatch.setattr("univ.run.driver.load_models", lambda cfg, device: models)
    monkeypatch.setattr("univ.run.identity.model_fingerprint", lambda lm: {"planted": lm.name})
    data = tmp_path / f"{name}.txt"
    data.write_text(text)
    return _both([m.name for m in models], data, tmp_path, name=name, **kw)


def _tables(g, vocab, n_layers, d, *, heavy=False):
    if heavy:  # Student-t with 1.5 degrees of freedom: infinite variance in the population
        return torch.distributions.StudentT(1.5).sample((2, vocab, n_layers, d)).clamp(-1e4, 1e4)
    return torch.randn((2, vocab, n_layers, d), generator=g)


def test_planted_near_ties_weak_partners_and_heavy_tails(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    vocab, L, d = 512, 4, 24
    a = _tables(g, vocab, L, d)
    b = _tables(g, vocab, L, d)
    # near-ties: neuron (0, 0) of A has two partners in B, layers 1 and 3, whose r differ by ~1e-3
    noise = torch.randn((2, vocab), generator=g)
    b[:, :, 1, 5] = a[:, :, 0, 0] + 0.30 * noise
    b[:, :, 3, 7] = a[:, :, 0, 0] + 0.30 * noise + 0.02 * torch.randn((2, vocab), generator=g)
    # weak best partners: layer 2 of A is 0.1 of a permuted copy of B's layer 0
    b[:, :, 0, :] = 0.1 * a[:, :, 2, torch.randperm(d, generator=g)] + b[:, :, 0, :]
    torch.manual_seed(1)
    c = _tables(g, vocab, L, d, heavy=True)
    c[:, :, 2, :] += 3 * a[:, :, 1, :]  # heavy-tailed model, partly a copy of A's layer 1
    e, s, manifest = _planted_run(tmp_path, monkeypatch, [a, b, c], corpus_text()[:60_000], "ties",
                                  screen_tokens=500, mode="all-pairs")
    assert_same_answer(e, s)
    label = [x for x in e.columns if x.startswith("max_corr.")][0].split(".", 1)[1]
    assert abs(e.loc[0, f"max_corr.{label}"] - 0.95) < 0.05  # the planted near-tie is the row's best


def test_partner_that_only_shows_late_in_the_stream(tmp_path, monkeypatch):
    """Neuron (1, 3) of B copies neuron (0, 0) of A (×4) only in the second half of the token stream; before that it
    is independent noise, and layer 2 holds a steady partner with r = 0.5 all along. A screen of the stream's
    first tokens would never see the winner (r ≈ 0.69 over the whole stream); the answer must be it."""
    from univ.run.stream import token_stream

    g = torch.Generator().manual_seed(3)
    vocab, L, d = 512, 3, 20
    a, b = _tables(g, vocab, L, d), _tables(g, vocab, L, d)
    b[:, :, 2, 4] = 0.5 * a[:, :, 0, 0] + 0.866 * torch.randn((2, vocab), generator=g)  # the steady partner
    b_late = b.clone()
    b_late[:, :, 1, 3] = 4 * a[:, :, 0, 0]
    text = corpus_text()[:60_000]
    cfg = _cfg(["x", "y"], "unused", tmp_path / "unused", tokens=3000)
    data = tmp_path / "late.txt"
    data.write_text(text)
    batches = list(token_stream(CorrelateConfig(**{**cfg.__dict__, "data": str(data)}), tiny_tokenizer()))
    late = {bt.input_ids.numpy().tobytes() for bt in batches[len(batches) // 2:]}

    class Late(Planted):
        def latents(self, input_ids, keep):
            if self.name.endswith("1") and input_ids.numpy().tobytes() in late:
                return Planted("late", b_late, self.tokenizer).latents(input_ids, keep)
            return super().latents(input_ids, keep)

    tok = tiny_tokenizer()
    models = [Late(f"planted-{i}", t, tok) for i, t in enumerate([a, b])]
    monkeypatch.setattr("univ.run.driver.load_models", lambda cfg, device: models)
    monkeypatch.setattr("univ.run.identity.model_fingerprint", lambda lm: {"planted": lm.name})
    e, s, _ = _both([m.name for m in models], data, tmp_path, name="late", tokens=3000, screen_tokens=300)
    assert_same_answer(e, s)
    label = [x for x in e.columns if x.startswith("argmax_layer.")][0].split(".", 1)[1]
    assert (e.loc[0, f"argmax_layer.{label}"], e.loc[0, f"argmax_neuron.{label}"]) == (1, 3)
    assert e.loc[0, f"max_corr.{label}"] > 0.6


# -- the certificate's arithmetic ----------------------------------------------------------------------------------
def test_select_layers_window_and_dead_rows():
    sc = torch.tensor([[0.5, 0.49, 0.1], [float("-inf")] * 3, [0.2, float("nan"), 0.9]])
    pick = certify.select_layers(sc, None, delta=0.01)
    assert pick.tolist() == [[True, True, False], [True, True, True], [False, False, True]]


def test_uncertified_flags_only_layers_that_could_win():
    done = torch.tensor([[True, False, False]])
    sc = torch.tensor([[0.60, 0.55, 0.30]])
    best = torch.tensor([0.62])
    need = certify.uncertified(done, torch.tensor([True]), sc, None, best, None, torch.tensor([0.08]))
    assert need.tolist() == [[False, True, False]]  # 0.55 + 0.08 reaches 0.62; 0.30 + 0.08 does not
    dead = certify.uncertified(done, torch.tensor([False]), sc, None, best, None, torch.tensor([0.08]))
    assert not dead.any()


def test_margin_pools_the_rows_of_a_layer():
    done = torch.tensor([[True, False], [True, False], [True, True]])
    sc = torch.tensor([[0.5, 0.1], [0.4, 0.1], [0.3, 0.2]])
    ex = torch.tensor([[0.51, float("nan")], [0.40, float("nan")], [0.3, 0.25]])
    m = certify.observed_margin(done, sc, None, ex, None, torch.tensor([0, 0, 1]), 2)
    # row 0 its own 0.01; row 1 nothing of its own, the 90th percentile of its layer's (0.009); row 2 its own 0.05
    np.testing.assert_allclose(m.numpy(), [0.03, 0.027, 0.15], rtol=1e-5)


def test_best_of_breaks_ties_by_the_smallest_column():
    done = torch.tensor([[True, True]])
    v, i = certify.best_of(done, torch.tensor([[0.7, 0.7]]), torch.tensor([[40, 12]]))
    assert (float(v[0]), int(i[0])) == (pytest.approx(0.7), 12)


# -- options and faults --------------------------------------------------------------------------------------------
def test_auto_picks_exact_when_one_pass_fits_and_screen_otherwise(deep, tmp_path):
    paths, data = deep
    logs = []
    run(_cfg(paths[:2], data, tmp_path / "auto1", tokens=600), progress=False, log=logs.append)
    assert any("auto → exact" in str(x) for x in logs)
    logs.clear()
    run(_cfg(paths[:2], data, tmp_path / "auto2", tokens=600, memory_budget_gb=140_000 / 1e9), progress=False,
        log=logs.append)
    assert any("auto → screen" in str(x) for x in logs)
    assert json.loads((tmp_path / "auto2" / "run.json").read_text())["method"] == "screen"


def test_kill_and_resume_equals_uninterrupted(deep, tmp_path, monkeypatch):
    """A crash at each verify batch in turn (after a periodic checkpoint): --resume gives the same table."""
    from univ.run import screen

    paths, data = deep
    ref = tmp_path / "ref"
    kw = dict(method="screen", screen_tokens=400, tokens=1200, checkpoint_every=300)
    run(_cfg(paths[:2], data, ref, **kw), progress=False, log=_quiet)
    want = pd.read_parquet(ref / "neurons.parquet")
    real = screen.ScreenRun.verify_batch
    for crash_at in (2, 5, 9):
        calls = {"n": 0}

        def crashing(self, *a, _at=crash_at, _calls=calls, **k):
            _calls["n"] += 1
            if _calls["n"] == _at:
                raise RuntimeError("simulated crash")
            return real(self, *a, **k)

        out = tmp_path / f"crash{crash_at}"
        monkeypatch.setattr(screen.ScreenRun, "verify_batch", crashing)
        with pytest.raises(RuntimeError, match="simulated"):
            run(_cfg(paths[:2], data, out, **kw), progress=False, log=_quiet)
        monkeypatch.setattr(screen.ScreenRun, "verify_batch", real)
        with pytest.raises(Refused, match="--resume"):
            run(_cfg(paths[:2], data, out, **kw), progress=False, log=_quiet)
        run(_cfg(paths[:2], data, out, **kw), resume=True, progress=False, log=_quiet)
        got = pd.read_parquet(out / "neurons.parquet")
        pd.testing.assert_frame_equal(got, want)


def test_resume_with_the_other_method_is_refused(deep, tmp_path, monkeypatch):
    from univ.run import screen

    paths, data = deep
    out = tmp_path / "x"

    def crash(self, *a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(screen.ScreenRun, "verify_batch", crash)
    with pytest.raises(RuntimeError):
        run(_cfg(paths[:2], data, out, method="screen", screen_tokens=300, tokens=600), progress=False, log=_quiet)
    monkeypatch.undo()
    with pytest.raises(Refused, match="--method screen"):
        run(_cfg(paths[:2], data, out, method="exact", screen_tokens=300, tokens=600), resume=True, progress=False,
            log=_quiet)


def test_bad_screen_options(deep, tmp_path):
    paths, data = deep
    with pytest.raises(UserError, match="--method"):
        _cfg(paths[:2], data, tmp_path / "a", method="fast")
    with pytest.raises(UserError, match="--screen-tokens"):
        _cfg(paths[:2], data, tmp_path / "a", screen_tokens=0)


# -- a SIGKILL at every write ----------------------------------------------------------------------------------------
FAULT_KW = dict(method="screen", screen_tokens=300, tokens=900, checkpoint_every=200, baseline_draws=2)


@pytest.fixture(scope="module", params=[False, True], ids=["certified", "fallback"])
def uninterrupted(request, deep, tmp_path_factory):
    """(fallback?, the reference table, the number of files an uninterrupted run writes). With the window shut
    (fallback) the run has a second verify round, and so a checkpoint between the rounds."""
    import univ.run.files as files

    paths, data = deep
    out = tmp_path_factory.mktemp("fault-ref") / "r"
    before = files._writes
    with pytest.MonkeyPatch.context() as mp:
        if request.param:
            mp.setattr(certify, "PROVISIONAL_Z", 0.0)
        run(_cfg(paths[:2], data, out, **FAULT_KW), progress=False, log=_quiet)
    rounds = json.loads((out / "run.json").read_text())["screen"]["rounds"]
    assert rounds == (2 if request.param else 1)
    return request.param, pd.read_parquet(out / "neurons.parquet"), files._writes - before


@pytest.mark.parametrize("k", range(1, 13))
def test_sigkill_after_any_write_then_resume(deep, uninterrupted, tmp_path, monkeypatch, k):
    """Killed right after its k-th write (every write of the run in turn): a rerun with --resume (or, when the
    kill came after run.json, nothing) ends with the uninterrupted table."""
    from test_reshard import _killed_single

    from univ.run import checkpoint

    fallback, want, n_writes = uninterrupted
    if k > n_writes:
        pytest.skip(f"the run writes {n_writes} files")
    if fallback:  # the forked child inherits it, and so does the resume
        monkeypatch.setattr(certify, "PROVISIONAL_Z", 0.0)
    paths, data = deep
    out = tmp_path / "r"
    cfg = _cfg(paths[:2], data, out, **FAULT_KW)
    assert _killed_single(cfg.__dict__, k) == -9
    if checkpoint.exists(out) and not (out / "run.json").exists():
        run(cfg, resume=True, progress=False, log=_quiet)
    elif not (out / "run.json").exists():
        run(cfg, progress=False, log=_quiet)
    else:  # finished: a second start refuses, and the folder's table is the answer
        with pytest.raises(Refused):
            run(cfg, progress=False, log=_quiet)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "neurons.parquet"), want)


@pytest.mark.parametrize("stage", ["screen", "verify"])
def test_sigterm_writes_a_checkpoint_and_resume_matches(deep, tmp_path, monkeypatch, stage):
    """SIGTERM in the screen (it restarts on --resume) or in the verify pass (it continues): exit via
    Interrupted, then --resume ends with the uninterrupted table."""
    import os
    import signal

    from univ.errors import Interrupted
    from univ.run import screen

    paths, data = deep
    kw = dict(method="screen", screen_tokens=400, tokens=1200)
    run(_cfg(paths[:2], data, tmp_path / "ref", **kw), progress=False, log=_quiet)
    want = pd.read_parquet(tmp_path / "ref" / "neurons.parquet")
    name, owner = ("process_batch", screen) if stage == "screen" else ("verify_batch", screen.ScreenRun)
    real = getattr(owner, name)
    calls = {"n": 0}

    def terminated(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag: this batch still completes
        return real(*a, **k)

    monkeypatch.setattr(owner, name, terminated)
    out = tmp_path / "r"
    with pytest.raises(Interrupted, match="--resume"):
        run(_cfg(paths[:2], data, out, **kw), progress=False, log=_quiet)
    monkeypatch.setattr(owner, name, real)
    run(_cfg(paths[:2], data, out, **kw), resume=True, progress=False, log=_quiet)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "neurons.parquet"), want)


def test_activation_stats_and_checkpoints_in_a_screen_run(deep, tmp_path, monkeypatch):
    """--activation-stats comes with the first verify pass (every token), also across a crash and --resume."""
    from univ.run import screen

    paths, data = deep
    kw = dict(screen_tokens=400, tokens=1200, activation_stats=True, checkpoint_every=300)
    stats = {}
    for method in ("exact", "screen"):
        out = tmp_path / method
        run(_cfg(paths[:2], data, out, method=method, **kw), progress=False, log=_quiet)
        stats[method] = pd.read_parquet(out / "activation_stats.parquet")
    pd.testing.assert_frame_equal(stats["screen"], stats["exact"], atol=1e-9, rtol=1e-9)
    real, calls = screen.ScreenRun.verify_batch, {"n": 0}

    def crash(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(screen.ScreenRun, "verify_batch", crash)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError):
        run(_cfg(paths[:2], data, out, method="screen", **kw), progress=False, log=_quiet)
    monkeypatch.setattr(screen.ScreenRun, "verify_batch", real)
    run(_cfg(paths[:2], data, out, method="screen", **kw), resume=True, progress=False, log=_quiet)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "activation_stats.parquet"), stats["exact"], atol=1e-9,
                                  rtol=1e-9)


def test_screen_equals_exact_on_the_shipped_zoo(tmp_path):
    """The shipped zoo's three trained seeds (seed 0 against the other two) on its held-out plays."""
    from univ.corpus import write_corpus_files
    from univ.zoo import resolve_zoo, seed_dirs

    seeds = seed_dirs(resolve_zoo("default"))
    data = write_corpus_files(tmp_path / "data", "heldout")
    e, s, manifest = _both(seeds, data, tmp_path, name="zoo", tokens=1500, ctx=128, batch_size=4,
                           screen_tokens=500)
    assert_same_answer(e, s)
    assert len(e) == 2 * 1024 and manifest["screen"]["rounds"] >= 1


def test_screen_equals_exact_at_gpt2_small_depth(tmp_path):
    """Random-init GPT-2s with GPT2-small's depth and MLP ratio (12 layers, d_mlp = 4·d_model), narrowed to
    d_model 32 so that it runs in seconds: 12 layers of candidates per neuron, two directions."""
    models, data = tiny_seeds_and_text(tmp_path, (0, 1), 60_000, n_layer=12, n_inner=128)
    e, s, manifest = _both(models, data, tmp_path, name="g12", mode="all-pairs", screen_tokens=600)
    assert_same_answer(e, s)
    assert len(e) == 2 * 12 * 128
    rep = manifest["screen"]
    assert 1 <= rep["verified_layers_per_row"]["0->1"] <= 12 and rep["flops"]["exhaustive"] > 0

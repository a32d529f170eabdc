"""Report: renders for a real (tiny) run directory, offline, and for partial ones.

The run directory is made by the real stages: ``univ correlate`` on two tiny GPT-2 seeds (~1500 tokens, ctx 32)
and ``univ roles``; the analyze-stage tables are written here from their documented schema, so the page's
statistics, families and contexts sections are tested whatever state ``univ.analyze`` is in (a separate test
runs the real one when it exists).
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import corpus_text, save_tiny_model, tiny_tokenizer
from univ import report as rep
from univ.correlate import CorrelateConfig
from univ.correlate import run as correlate
from univ.errors import Refused, UserError
from univ.roles import run_roles
from univ.tables import run_id, table_run_id, write_parquet

CHROMIUM = Path("/usr/bin/chromium")


def _copy_partial(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("run.json", "neurons.parquet"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def correlated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    models = [save_tiny_model(root, "gpt2", seed=s) for s in (0, 1)]
    text = root / "corpus.txt"
    text.write_text(corpus_text()[:40_000])
    out = root / "run"
    cfg = CorrelateConfig(models=tuple(map(str, models)), data=str(text), out=str(out), tokens=1500, ctx=32,
                          batch_size=4, device="cpu")  # fmt: skip
    correlate(cfg, progress=False, log=lambda *_: None)
    return out


def _fake_analyze(run: Path) -> None:
    """profiles.parquet, families.parquet, top_examples.parquet as 'univ analyze' documents them."""
    rng = np.random.default_rng(0)
    neurons = pd.read_parquet(run / "neurons.parquet")
    prof = neurons[["model", "layer", "neuron", "excess_corr"]].copy()
    prof["is_universal"] = prof["excess_corr"].rank(ascending=False) <= 6
    n = len(prof)
    for col in ("act_mean", "act_var", "act_skew", "act_kurt", "act_freq", "w_in_norm", "w_out_norm", "input_bias",
                "in_out_sim", "l2_penalty", "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"):  # fmt: skip
        prof[col] = rng.normal(size=n)
    prof["family"] = rng.choice(["unigram", "alphabet", "other"], n)
    prof["best_feature"] = rng.choice(["the_unigram", "a_unigram", "is_year"], n)
    prof["best_vr"] = rng.uniform(0, 1, n)
    prof.to_parquet(run / "profiles.parquet", index=False)
    prof[["model", "layer", "neuron", "family", "best_feature", "best_vr"]].to_parquet(run / "families.parquet")
    tok = tiny_tokenizer()
    ids = tok(" Hello <world> & the functions\n of Python's help topics, with a class")["input_ids"]
    rows = []
    for r in prof[prof["is_universal"]].itertuples(index=False):
        for rank in range(3):
            rows.append({"model": r.model, "layer": r.layer, "neuron": r.neuron, "rank": rank, "value": 3.0 - rank,
                         "tokens": ids, "position": 2 + rank, "text": tok.decode(ids)})  # fmt: skip
    pd.DataFrame(rows).to_parquet(run / "top_examples.parquet", index=False)


@pytest.fixture(scope="module")
def full_run(correlated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(correlated, run)
    _fake_analyze(run)
    run_roles(run, tokens=120, top=2, n_random=1, multiples=(0.0, 2.0), device="cpu")
    return run


def _attributes(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.IGNORECASE)


def _assert_offline(page: str) -> None:
    for value in _attributes(page):
        assert not re.match(r"(https?:)?//", value.strip(), flags=re.IGNORECASE), value
    assert "//cdn" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page and "@font-face" not in page


def test_report_full_run(full_run: Path, capsys: pytest.CaptureFixture):
    out = rep.run_report(full_run)
    assert out == full_run / "report.html" and capsys.readouterr().out == ""
    page = out.read_text(encoding="utf-8")
    figures = sorted(p.stem for p in (full_run / "figures").glob("*.png"))
    drawn = sorted(set(rep.FIGURES) - set(rep.CONDITIONAL_FIGURES))  # 2-layer models, no --compare
    assert figures == drawn, set(drawn) ^ set(figures)
    assert page.count("<img") == len(drawn) == page.count('src="data:image/png;base64,')
    assert 'class="missing"' not in page
    _assert_offline(page)
    for anchor in ("run", "correlations", "universal", "statistics", "families", "examples", "prediction", "entropy",
                   "attention"):  # fmt: skip
        assert f'<section id="{anchor}">' in page
    assert "<span>&lt;</span>" in page.replace(' style=""', "") and 'class="max"' in page  # escaped, max outlined
    assert 'class="sortable"' in page and "tables/role_counts.csv" in page
    assert (full_run / "tables" / "role_counts.csv").is_file()
    for href in _attributes(page):
        if not href.startswith(("data:", "#")):
            assert (full_run / href).is_file(), href


def test_report_partial_run(correlated: Path, tmp_path: Path):
    run = _copy_partial(correlated, tmp_path / "partial")
    page = rep.run_report(run).read_text(encoding="utf-8")
    assert sorted(p.stem for p in (run / "figures").glob("*.png")) == [
        "corr_by_layer", "corr_distributions", "summary", "universal_by_layer"
    ]  # fmt: skip
    assert page.count("<img") == 4
    for command in (f"univ analyze {run}", f"univ roles {run}", "histograms.parquet"):
        assert command in page
    assert "excess_corr &gt; 0.5" in page  # universal flags computed from the neuron table, and said so
    _assert_offline(page)


def test_report_only_neuron_table_or_nothing(correlated: Path, tmp_path: Path):
    run = tmp_path / "bare"
    run.mkdir()
    shutil.copy(correlated / "neurons.parquet", run / "neurons.parquet")
    page = rep.run_report(run).read_text(encoding="utf-8")
    assert "No run.json yet" in page and page.count("<img") == 4
    (run / "neurons.parquet").unlink()
    with pytest.raises(UserError, match="univ correlate"):
        rep.run_report(run)


def test_stale_figures_removed(full_run: Path, tmp_path: Path):
    run = tmp_path / "copy"
    shutil.copytree(full_run, run)
    rep.run_report(run)
    assert (run / "figures" / "entropy_curves.png").is_file()
    for name in ("interventions", "attention", "attention_points", "bos_scores", "roles"):
        (run / f"{name}.parquet").unlink()
    page = rep.run_report(run).read_text(encoding="utf-8")
    assert not (run / "figures" / "entropy_curves.png").exists()
    assert "univ roles" in page
    # The layer trend falls back to the vocab moments in profiles.parquet.
    assert (run / "figures" / "prediction_trend.png").is_file() and "vocab moments of profiles.parquet" in page


def test_foreign_table_costs_only_its_section(correlated: Path, tmp_path: Path):
    run = _copy_partial(correlated, tmp_path / "odd")
    pd.DataFrame({"unexpected": [1.0]}).to_parquet(run / "interventions.parquet")
    with pytest.warns(UserWarning, match="Entropy neurons"):
        page = rep.run_report(run).read_text(encoding="utf-8")
    assert "could not be drawn: KeyError" in page and page.count("<img") == 4


def test_context_html_colours_and_escapes():
    tok = tiny_tokenizer()
    ids = tok("a <b> c")["input_ids"]
    plain = rep._context_html(ids, 1, None, tok)
    assert plain.count("<span") == len(ids) and plain.count('class="max"') == 1 and "&lt;" in plain
    coloured = rep._context_html(ids, 0, [2.0] + [1.0] * (len(ids) - 1), tok)
    assert "rgba(255, 140, 0, 1.00)" in coloured and "rgba(255, 140, 0, 0.50)" in coloured


def test_cli_prints_path(full_run: Path, capsys: pytest.CaptureFixture):
    parser = argparse.ArgumentParser()
    rep.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(full_run), "--max-neurons", "2", "--max-examples", "1"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str((full_run / "report.html").resolve())
    page = (full_run / "report.html").read_text(encoding="utf-8")
    assert page.count("<ol>") == 2 + 6 and "2 of 6 neurons" in page  # contexts section + one card each


def test_report_after_real_analyze(correlated: Path, tmp_path: Path):
    analyze = pytest.importorskip("univ.analyze")
    run = tmp_path / "analyzed"
    shutil.copytree(correlated, run)
    analyze.run_analyze(run, tokens=300, top_k=2, syntax="off", verbose=False)
    page = rep.run_report(run).read_text(encoding="utf-8")
    profiles = pd.read_parquet(run / "profiles.parquet")
    stems = ["family_counts", "prediction_trend"] + (["universal_stats"] if profiles["is_universal"].any() else [])
    for stem in stems:
        assert (run / "figures" / f"{stem}.png").is_file(), stem
    assert "No neuron statistics" not in page and "No families" not in page and "No top_examples" not in page
    _assert_offline(page)


def test_summary_card_and_neuron_cards(full_run: Path):
    page = rep.run_report(full_run).read_text(encoding="utf-8")
    profiles = pd.read_parquet(full_run / "profiles.parquet")
    n_uni, n_all = int(profiles["is_universal"].sum()), len(profiles)
    sections = re.findall(r'<section id="([^"]+)">', page)
    assert sections[0] == "glance" and sections[-1] == "glossary" and "cards" in sections
    glance = page[page.index('<section id="glance">'):page.index("</section>")]
    assert f'data-universal="{n_uni}" data-neurons="{n_all}"' in glance
    pct = 100 * n_uni / n_all
    assert f"{pct:.2f} %" in glance and "the paper's 1–5 %" in glance
    assert ("below" if pct < 1 else "within" if pct <= 5 else "above") + " the paper's" in glance
    assert "figures/summary.png" in glance and "tokens" in glance and "1,500 tokens" in glance
    # one card per universal neuron, and every link of the universal table lands on a card
    uni = profiles[profiles["is_universal"]]
    ids = {rep.anchor(m, la, n) for m, la, n in zip(uni["model"], uni["layer"], uni["neuron"], strict=True)}
    assert set(re.findall(r'<div class="card" id="([^"]+)"', page)) == ids
    assert set(re.findall(r'href="#(n-[^"]+)"', page)) == ids
    card = page[page.index('<div class="card" id="'):]
    card = card[: card.index("</div>")]
    assert "Excess correlation" in card and "best match" in card and "percentile in its layer" in card
    assert "Family <strong>" in card and "Role <strong>" in card and "<ol>" in card
    for column in ("in_out_sim", "null_share", "bos_z", "excess_corr", "best_vr"):
        assert f"<dt><code>{column}</code></dt>" in page, column
    assert 'title="' + html.escape(rep.GLOSSARY["excess_corr"]) in page  # table headers carry their meaning


def test_cards_explain_contexts_that_peak_on_another_token(full_run: Path, tmp_path: Path):
    run = tmp_path / "peaks"
    shutil.copytree(full_run, run)
    prof = pd.read_parquet(run / "profiles.parquet")
    prof.loc[prof["is_universal"], ["family", "best_feature", "best_vr"]] = ["unigram", "token:' zebra'", 0.62]
    prof.to_parquet(run / "profiles.parquet", index=False)
    page = rep.run_report(run).read_text(encoding="utf-8")
    assert "not on its best feature" in page and "0.62" in page


def test_empty_sections_say_what_was_looked_for(correlated: Path, tmp_path: Path):
    run = _copy_partial(correlated, tmp_path / "none")
    neurons = pd.read_parquet(run / "neurons.parquet")
    neurons.assign(excess_corr=0.0).to_parquet(run / "neurons.parquet", index=False)
    page = rep.run_report(run).read_text(encoding="utf-8")
    assert 'data-universal="0"' in page and "none found" in page and "no card" in page


def test_byte_tokens_are_readable_and_unseen_tokens_marked():
    assert rep.printable("\x06a\n\ufffd") == "<0x06>a↵<?>"
    tok = tiny_tokenizer()
    label = rep._token_labeler(tok)
    byte_map = rep._bytes_to_unicode()
    cont = tok.convert_tokens_to_ids(byte_map[0x9C])  # a UTF-8 continuation byte on its own
    ctrl = tok.convert_tokens_to_ids(byte_map[0x06])
    assert label(cont) == "<0x9C>" and label(ctrl) == "<0x06>"
    hello = tok("hello")["input_ids"][0]
    text = rep._token_list([hello, ctrl], None, label, seen={hello})
    assert text == f"{label(hello)!r} | '<0x06>'†"


def test_corrupt_table_is_named_corrupt(correlated: Path, tmp_path: Path):
    run = _copy_partial(correlated, tmp_path / "cut")
    data = (run / "neurons.parquet").read_bytes()
    (run / "neurons.parquet").write_bytes(data[: len(data) // 3])
    page = rep.run_report(run).read_text(encoding="utf-8")
    assert "neurons.parquet is corrupt" in page and "No neurons.parquet yet" not in page
    (run / "run.json").unlink()
    with pytest.raises(UserError, match="neurons.parquet is corrupt"):
        rep.run_report(run)


def test_tables_of_another_run_are_left_out_and_listed(full_run: Path, tmp_path: Path):
    run = tmp_path / "mixed"
    shutil.copytree(full_run, run)
    rid = run_id(run)
    assert table_run_id(run / "roles.parquet") == rid  # roles stamped what it wrote
    write_parquet(pd.read_parquet(run / "profiles.parquet"), run / "profiles.parquet", "an-older-run")
    page = rep.run_report(run).read_text(encoding="utf-8")
    box = page[page.index('<div class="problems">'):]
    assert "profiles.parquet was computed from run an-older-run" in box[: box.index("</div>")]
    assert "profiles.parquet (univ analyze)" not in page and "From profiles.parquet" not in page
    with pytest.raises(Refused, match="an-older-run"):
        run_roles(run, tokens=120, top=1, n_random=0, multiples=(0.0,), device="cpu")


# Clicks the "mean_corr" header of the per-layer correlation table twice (descending), then records the column.
_PROBE = """<script>
var th = Array.prototype.filter.call(document.querySelectorAll("table.sortable th"),
                                     function (h) { return h.textContent === "mean_corr"; })[0];
th.click(); th.click();
var col = Array.prototype.indexOf.call(th.parentNode.children, th);
var rows = th.closest("table").tBodies[0].rows;
var vals = Array.prototype.map.call(rows, function (r) { return r.cells[col].textContent; });
document.body.setAttribute("data-probe", th.getAttribute("data-dir") + ":" + vals.join(","));
</script></body>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (optional headless check)")
def test_report_opens_in_chromium(full_run: Path, tmp_path: Path):
    page = rep.run_report(full_run).read_text(encoding="utf-8")
    probe = full_run / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE), encoding="utf-8")
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    probe.unlink()
    assert proc.returncode == 0, proc.stderr[-2000:]
    drawn = set(rep.FIGURES) - set(rep.CONDITIONAL_FIGURES)
    assert "<section" in proc.stdout and proc.stdout.count("<img") == len(drawn)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    profiles = pd.read_parquet(full_run / "profiles.parquet")
    n_uni, n_all = int(profiles["is_universal"].sum()), len(profiles)
    assert f'data-universal="{n_uni}" data-neurons="{n_all}">{n_uni:,} of {n_all:,}</span>' in proc.stdout
    found = re.search(r'data-probe="desc:([^"]*)"', proc.stdout)
    assert found, "the sort script did not run"
    values = [float(v) for v in found.group(1).split(",")]
    assert values == sorted(values, reverse=True) and len(values) >= 2

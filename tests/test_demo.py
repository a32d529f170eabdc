"""The demo path end to end on a micro zoo (seconds to train): correlate → analyze → roles → report."""

import json
import re

import pandas as pd
import pytest

from univ.demo import run_demo
from univ.zoo import train_micro_zoo


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro-zoo")
    train_micro_zoo(root, seeds=(0, 1, 2))
    return root


def test_demo_runs_every_stage(micro_zoo, tmp_path):
    lines = []
    out = run_demo(
        tmp_path / "demo",
        tokens=3000,
        zoo_dir=micro_zoo,
        batch_size=8,
        intervention_tokens=1024,
        progress=False,
        log=lambda *a: lines.append(" ".join(map(str, a))),
    )
    text = "\n".join(lines)
    assert "zoo: 3 seeds" in text and "excess>0.50" in text and "report:" in text
    for stage in ("correlate", "analyze", "roles", "report"):
        assert re.search(rf"^{stage}: [0-9.]+ s$", text, flags=re.M), stage  # each stage's time
    assert str((out / "report.html").resolve()) in lines[-1]
    neurons = pd.read_parquet(out / "neurons.parquet")
    assert len(neurons) == 64 and {"max_corr.seed-1", "max_corr.seed-2", "excess_corr"} <= set(neurons.columns)
    assert json.loads((out / "run.json").read_text())["tokens"] == 3000
    for name in ("profiles.parquet", "roles.parquet", "report.html"):
        assert (out / name).exists(), name

    # the same demo again: every stage is reused (same inputs, same run id), only the report is redrawn
    stamp = (out / "profiles.parquet").stat().st_mtime_ns
    lines.clear()
    run_demo(out, tokens=3000, zoo_dir=micro_zoo, batch_size=8, intervention_tokens=1024, progress=False,
             log=lambda *a: lines.append(" ".join(map(str, a))))  # fmt: skip
    text = "\n".join(lines)
    assert all(f"{stage}: reused" in text for stage in ("correlate", "analyze", "roles")), text
    assert re.search(r"^report: [0-9.]+ s$", text, flags=re.M)
    assert (out / "profiles.parquet").stat().st_mtime_ns == stamp
    # other inputs: nothing is reused
    lines.clear()
    run_demo(out, tokens=2000, zoo_dir=micro_zoo, batch_size=8, intervention_tokens=1024, progress=False,
             log=lambda *a: lines.append(" ".join(map(str, a))))  # fmt: skip
    assert "reused" not in "\n".join(lines) and json.loads((out / "run.json").read_text())["tokens"] == 2000

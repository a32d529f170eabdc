"""The demo path end to end on a micro zoo (seconds to train): correlate → analyze → roles → report."""

import json

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
    neurons = pd.read_parquet(out / "neurons.parquet")
    assert len(neurons) == 64 and {"max_corr.seed-1", "max_corr.seed-2", "excess_corr"} <= set(neurons.columns)
    assert json.loads((out / "run.json").read_text())["tokens"] == 3000
    for name in ("profiles.parquet", "roles.parquet", "report.html"):
        assert (out / name).exists(), name

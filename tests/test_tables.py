"""Run identity and table reading: stamps travel with the file, mixing runs is refused, corrupt is not missing."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from univ.errors import Refused, UserError
from univ.tables import check_same_run, read_table, run_id, table_run_id, try_read, write_parquet


def _run(tmp_path, **extra):
    (tmp_path / "run.json").write_text(json.dumps({"models": ["a", "b"], "labels": ["a", "b"], **extra}))
    return tmp_path


def test_run_id_from_run_json_or_legacy_hash(tmp_path):
    assert run_id(_run(tmp_path, run_id="20261201-abc")) == "20261201-abc"
    legacy = run_id(_run(tmp_path))
    assert legacy.startswith("legacy-")
    assert run_id(_run(tmp_path, tokens=5)) not in (legacy, "20261201-abc")  # another run.json, another id
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(UserError, match="run.json is corrupt"):
        run_id(tmp_path)
    (tmp_path / "run.json").unlink()
    with pytest.raises(UserError, match="univ correlate"):
        run_id(tmp_path)


def test_stamp_round_trip_and_refusal(tmp_path):
    run = _run(tmp_path, run_id="r1")
    df = pd.DataFrame({"layer": [0, 1], "neuron": [3, 4], "x": [0.5, 1.5]})
    write_parquet(df, run / "profiles.parquet", "r1")
    write_parquet(df, run / "universal.parquet", None)
    pd.testing.assert_frame_equal(pd.read_parquet(run / "profiles.parquet"), df)
    assert table_run_id(run / "profiles.parquet") == "r1" and table_run_id(run / "universal.parquet") is None
    assert not list(run.glob(".*.tmp"))  # the atomic write leaves no temporary file behind
    assert check_same_run(run, ["profiles.parquet", "universal.parquet", "absent.parquet"], stage="s", fix="f") == "r1"
    write_parquet(df, run / "profiles.parquet", "r0")
    with pytest.raises(Refused, match=r"computed from run r0, but .* is run r1"):
        check_same_run(run, ["profiles.parquet"], stage="univ roles", fix="'univ analyze DIR'")


def test_corrupt_is_not_missing(tmp_path):
    path = tmp_path / "neurons.parquet"
    assert try_read(path) == (None, None)
    with pytest.raises(UserError, match="not found: run 'univ correlate' first"):
        read_table(path, made_by="univ correlate")
    pd.DataFrame({"a": range(100)}).to_parquet(path)
    path.write_bytes(path.read_bytes()[:40])
    df, problem = try_read(path, made_by="univ correlate")
    assert df is None and "is corrupt" in problem and "rerun 'univ correlate'" in problem
    with pytest.raises(UserError, match="neurons.parquet is corrupt"):
        read_table(path, made_by="univ correlate")
    _run(tmp_path)
    with pytest.raises(UserError, match="neurons.parquet is corrupt.*rerun 'univ correlate'"):
        check_same_run(tmp_path, ["neurons.parquet"], stage="univ roles", fix="'univ correlate'")

"""``univ correlate --dry-run``: plans from configs alone (no weights, no data), for both methods."""

from __future__ import annotations

import pytest
import transformers as tf

from univ.cli import main
from univ.run import costs
from univ.run.config import CorrelateConfig


def _llama_7b(path):
    tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   vocab_size=32000).save_pretrained(path)  # config.json only: no weights exist
    return path


def _gpt2_small(path):
    tf.GPT2Config().save_pretrained(path)
    return path


def test_two_7b_configs_screen_within_one_80gb_device(tmp_path, capsys):
    """fp32 weights (the default) leave too little room: the dry run says so, exits 2 and names what fits."""
    a, b = _llama_7b(tmp_path / "a"), _llama_7b(tmp_path / "b")
    argv = ["correlate", str(a), str(b), "--data", "nowhere.txt", "--tokens", "100000000", "--dry-run",
            "--method", "screen"]
    assert main(argv) == 2
    hint = capsys.readouterr().out.rsplit("it fits with ", 1)[1].split()
    assert "--dtype" in hint
    assert main(argv + hint) == 0
    text = capsys.readouterr().out
    assert "352,256" in text and "screen: peak" in text
    opts = dict(dtype="bfloat16", layer_similarity="--no-layer-similarity" not in hint,
                batch_size=int(hint[hint.index("--batch-size") + 1]) if "--batch-size" in hint else 8)
    est = costs.estimate(CorrelateConfig(models=(str(a), str(b)), data="x", tokens=100_000_000, **opts),
                         [costs.model_shape(str(a))] * 2, 80e9)
    assert est["screen"]["fits"] and est["screen"]["peak"] <= 80e9
    assert est["screen"]["flops"] < est["exact"]["flops"]


def test_a_plan_that_cannot_fit_exits_2(tmp_path, capsys):
    a, b = _llama_7b(tmp_path / "a"), _llama_7b(tmp_path / "b")
    argv = ["correlate", str(a), str(b), "--data", "x", "--dry-run", "--method", "exact", "--memory-budget", "20"]
    assert main(argv) == 2
    assert "cannot fit" in capsys.readouterr().out


def test_gpt2_small_auto_is_exact_and_reads_no_weights(tmp_path, capsys):
    a, b = _gpt2_small(tmp_path / "a"), _gpt2_small(tmp_path / "b")
    assert main(["correlate", str(a), str(b), "--data", "x", "--tokens", "1000000", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "12 layers × 3,072" in text and "auto would run: exact" in text


def test_unknown_architecture_and_missing_config_are_clear(tmp_path):
    from univ.errors import UserError

    bad = tmp_path / "weird"
    tf.PretrainedConfig().save_pretrained(bad)  # no model_type
    with pytest.raises(UserError, match="config"):
        costs.model_shape(str(bad))
    t5 = tmp_path / "t5"
    tf.T5Config(num_layers=1).save_pretrained(t5)  # an architecture univ has no adapter for
    with pytest.raises(UserError, match="t5"):
        costs.model_shape(str(t5))
    with pytest.raises(UserError, match="no such local directory"):
        costs.model_shape(str(tmp_path / "absent"))


def test_ranks_split_the_plan_for_torchrun(tmp_path, capsys):
    """--ranks 8: the exact blocks and the screen's verified rows split over 8 devices; fewer passes, less each."""
    a, b = _llama_7b(tmp_path / "a"), _llama_7b(tmp_path / "b")
    cfg = CorrelateConfig(models=(str(a), str(b)), data="x", tokens=100_000_000, dtype="bfloat16",
                          layer_similarity=False, batch_size=4)
    shapes = [costs.model_shape(str(a))] * 2
    one, eight = costs.estimate(cfg, shapes, 80e9), costs.estimate(cfg, shapes, 80e9, ranks=8)
    assert one["exact"]["passes"] > 8 * (eight["exact"]["passes"] - 1)  # a pass over 8 devices holds 8× the blocks
    assert eight["exact"]["peak"] <= 80e9 and eight["screen"]["peak"] <= 80e9
    assert eight["exact"]["flops"] < one["exact"]["flops"] and eight["screen"]["flops"] < one["screen"]["flops"]
    assert eight["screen"]["verify_passes"] < one["screen"]["verify_passes"]
    argv = ["correlate", str(a), str(b), "--data", "x", "--tokens", "100000000", "--dry-run", "--dtype", "bfloat16",
            "--no-layer-similarity", "--batch-size", "4", "--ranks", "8"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "8 ranks (torchrun --nproc-per-node 8)" in text and "on the busiest rank" in text
    g = _gpt2_small(tmp_path / "g")  # GPT2-small on 2 ranks: one pass, auto stays exact
    assert main(["correlate", str(g), str(g), "--data", "x", "--dry-run", "--ranks", "2"]) == 0
    assert "auto would run: exact" in capsys.readouterr().out


def test_plan_only_flags_without_dry_run_are_refused(tmp_path, capsys):
    g = _gpt2_small(tmp_path / "g")
    assert main(["correlate", str(g), str(g), "--data", "x", "--ranks", "4"]) != 0
    assert "--dry-run" in capsys.readouterr().err

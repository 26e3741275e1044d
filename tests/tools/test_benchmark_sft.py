"""CPU smoke test of tools/benchmark_sft.py: it runs end to end and reports; no timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_sft", ROOT / "tools" / "benchmark_sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_sft"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_a_row(bench, capsys):
    bench.main(
        ["--model", "tiny", "--device", "cpu", "--eager", "--seq-len", "64", "--micro-batch", "1", "--grad-accum", "2",
         "--warmup", "1", "--steps", "1", "--no-record"]
    )  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rows and rows[0]["model"] == "tiny" and rows[0]["tokens_per_sec"] > 0 and rows[0]["step_s"] > 0
    assert 0 <= rows[0]["build_s"] <= rows[0]["compile_s"]  # the first step's time is the rest


def test_flops_per_token_matches_the_issue_ceiling(bench):
    """At 796 TFLOP/s the analytic ceiling for Qwen3-8B is about 25k tokens/s (the issue's own count)."""
    from surogate.models.presets import PRESETS

    ceiling = 796e12 / bench.flops_per_token(PRESETS["qwen3-8b"], 2048)
    assert 24_000 < ceiling < 26_000


def test_table_keeps_the_latest_row_per_setting(bench):
    row = dict(gpu="NVIDIA H100", model="qwen3-8b", recipe="bf16", framework="surogate", passes=True, recompute=False)
    row.update(tokens_per_sec=1000.0, peak_mem_gib=1.0, compile_s=3.0, date="2026-01-01")
    table = bench.render_table([row, {**row, "tokens_per_sec": 2000.0, "date": "2026-01-02"}])
    assert "2.0k" in table and "1.0k" not in table and "2026-01-02" in table


def test_precision_overrides_and_partial_recompute_are_recorded(bench, capsys):
    bench.main(
        ["--model", "tiny", "--device", "cpu", "--eager", "--seq-len", "64", "--micro-batch", "1", "--grad-accum", "1",
         "--warmup", "1", "--steps", "1", "--no-record", "--recipe", "qnf4", "--precision", "compute=fp8",
         "--recompute-layers", "1"]
    )  # fmt: skip
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["recompute"] and row["recompute_layers"] == 1 and row["precision"] == "compute=fp8"
    table = bench.render_table([{**row, "gpu": "NVIDIA H100", "seq_len": 2048}])
    assert "qnf4 (compute=fp8)" in table and "first 1 blocks" in table


def test_precision_override_types_and_errors(bench):
    from surogate.config import ConfigError, recipe_precision

    p = bench.with_overrides(recipe_precision("fp8"), ["fp8_min_features=0", "fp8_lm_head=true"])
    assert p.fp8_min_features == 0 and p.fp8_lm_head is True
    with pytest.raises(SystemExit, match="unknown key"):
        bench.with_overrides(recipe_precision("fp8"), ["fp8_speed=11"])
    with pytest.raises(ConfigError, match="nf4 weights"):
        bench.with_overrides(recipe_precision("qnf4"), ["compute=fp4"])


def test_packed_rows_are_recorded_apart(bench, capsys):
    """--docs-per-row 4 sends position ids (document-masked attention); 1, the default, sends None (plain causal)."""
    s = bench.Setting(micro_batch=2, seq_len=64, grad_accum=1, docs_per_row=4)
    (packed,) = bench.random_batches(100, s, "cpu")
    assert packed["position_ids"].tolist() == [list(range(16)) * 4] * 2
    (plain,) = bench.random_batches(100, bench.Setting(micro_batch=2, seq_len=64, grad_accum=1), "cpu")
    assert plain["position_ids"] is None
    bench.main(
        ["--model", "tiny", "--device", "cpu", "--eager", "--seq-len", "64", "--micro-batch", "1", "--grad-accum", "1",
         "--warmup", "1", "--steps", "1", "--no-record", "--docs-per-row", "4"]
    )  # fmt: skip
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["docs_per_row"] == 4
    table = bench.render_table([{**row, "gpu": "NVIDIA H100", "seq_len": 2048}, {**row, "gpu": "NVIDIA H100",
                                "seq_len": 2048, "docs_per_row": 1, "tokens_per_sec": 5.0}])  # fmt: skip
    assert "4 documents per row" in table and table.count("| tiny |") == 2

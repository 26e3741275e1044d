"""End to end on CPU: `python -m surogate.train recipe=fp8|qfp8` (compiled, FP8 GEMMs emulated) learns."""

import json

import pytest
import torch
from recipe_training import FAST_COMPILED as FAST

from ops import fp8
from surogate.train import main


@pytest.mark.parametrize("recipe", ["fp8", "qfp8"])
def test_fp8_recipe_trains(tmp_path, recipe):
    torch._dynamo.reset()  # other tests' cache entries for Qwen3Block.forward count towards the recompile limit
    fp8.stats.clear()
    out = tmp_path / recipe
    narrow = ["precision.fp8_min_features=0"]  # the tiny model's projections are narrower than the recipe's 2048
    assert main([f"output_dir={out}", f"recipe={recipe}", *FAST, *narrow]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert fp8.stats["fp8_gemms"] > 0  # the FP8 op ran (emulated on CPU), not a bf16 fallback

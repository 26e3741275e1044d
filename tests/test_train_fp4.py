"""End to end on CPU: `python -m surogate.train recipe=fp4|qfp4` (compiled; FP4 GEMMs emulated, or an FP4-stored
base dequantized in the op) learns, in both block formats."""

import json

import pytest
import torch
from recipe_training import FAST_COMPILED as FAST
from safetensors.torch import load_file

from ops import fp4
from surogate.lora import DEFAULT_TARGETS
from surogate.models.presets import PRESETS
from surogate.train import main


# each recipe once, each block format once (the op tests cover every combination; this is ~30 s per run)
@pytest.mark.parametrize("recipe, options", [("fp4", []), ("qfp4", ["precision.fp4_format=mxfp4"])])
def test_fp4_recipe_trains(tmp_path, capsys, recipe, options):
    torch._dynamo.reset()  # other tests' cache entries for Qwen3Block.forward count towards the recompile limit
    fp4.stats.clear()
    out = tmp_path / recipe
    assert main([f"output_dir={out}", f"recipe={recipe}", *FAST, *options]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, (first, last)
    if recipe == "fp4":  # the FP4 op ran (emulated), not a bf16 fallback, and the run said it is emulated
        assert fp4.stats["fp4_gemms"] > 0
        assert "FP4 GEMMs are emulated" in capsys.readouterr().err
    else:  # the op dequantized stored FP4 codes
        assert fp4.stats["fp4_dequantized"] > 0 and fp4.stats["fp4_gemms"] == 0
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * len(DEFAULT_TARGETS) * PRESETS["tiny"].num_layers
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)

"""End to end on CPU: `python -m surogate.train recipe=qnf4` (compiled, NF4-stored base, dequantized in the op)
learns."""

import json

import torch
from safetensors.torch import load_file

from ops import nf4
from surogate.lora import DEFAULT_TARGETS
from surogate.models.presets import PRESETS
from surogate.train import main

FAST = [
    "sequence_len=128",
    "per_device_train_batch_size=2",
    "lora_rank=8",
    "lora_alpha=16",
    "compile=true",
    "dtype=fp32",
    "device=cpu",
    "learning_rate=3e-3",
    "warmup_steps=2",
    "max_steps=8",
]


def test_qnf4_recipe_trains(tmp_path):
    torch._dynamo.reset()  # other tests' cache entries for Qwen3Block.forward count towards the recompile limit
    nf4.stats.clear()
    out = tmp_path / "qnf4"
    assert main([f"output_dir={out}", "recipe=qbnb", *FAST]) == 0  # the alias runs recipes/qnf4.yaml
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert nf4.stats["nf4_dequantized"] > 0  # the NF4 op ran on stored codes, not a dense fallback
    # the adapter holds every LoRA module (NF4LoRALinear included), trained: B moved away from its zero init
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * len(DEFAULT_TARGETS) * PRESETS["tiny"].num_layers
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)

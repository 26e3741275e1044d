"""Shared by the pre-quantized checkpoint tests (FP8, bitsandbytes NF4): a tiny Qwen3 whose projections are
quantized, and the sharded safetensors layout transformers writes for it."""

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_qwen3_config(intermediate_size: int) -> transformers.Qwen3Config:
    """Two blocks, hidden 256, kv 128 rows: `intermediate_size` picks the edge case a format needs."""
    return transformers.Qwen3Config(
        vocab_size=384, hidden_size=256, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
        max_position_embeddings=256,
    )  # fmt: skip


def is_quantized(key: str) -> bool:
    """A decoder-block projection weight: what pre-quantized checkpoints store quantized."""
    return key.startswith("model.layers.") and key.endswith(tuple(f"{p}.weight" for p in PROJS))


def save_shards(path: Path, shards: dict[str, dict[str, torch.Tensor]], quantization_config: dict) -> None:
    """Write `shards` (file name -> tensors) with their index, and add `quantization_config` to config.json."""
    for name, tensors in shards.items():
        save_file(tensors, path / name, {"format": "pt"})
    weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))

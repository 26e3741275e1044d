"""surogate/oom.py's memory estimate: dense models unchanged, Qwen3-MoE counted by its experts (weights quantized by
the q* recipes, per-expert LoRA state, routed-slot activations)."""

import os
from types import SimpleNamespace

import pytest
import torch

from surogate.distributed import base_weight_bytes
from surogate.models.presets import PRESETS
from surogate.oom import estimate_memory_gib


def _cfg(weights: str = "bf16", recompute: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        precision=SimpleNamespace(weights=weights),
        lora_rank=16,
        per_device_train_batch_size=2,
        sequence_len=2048,
        recompute=recompute,
    )


def test_dense_estimate_matches_the_measured_orientation():
    # benchmarks/NOTES.md: measured 36.5-38.6 GiB (qwen3-8b) and 7.7-9.7 GiB (qwen3-0.6b) on one H100
    assert 36.5 < estimate_memory_gib(PRESETS["qwen3-8b"], _cfg(), 2)["total"] < 38.6
    assert 7.0 < estimate_memory_gib(PRESETS["qwen3-0.6b"], _cfg(), 2)["total"] < 9.7


def test_moe_estimate_counts_the_experts():
    args = PRESETS["qwen3-30b-a3b"]
    bf16, fp8, nf4 = (estimate_memory_gib(args, _cfg(w), 2) for w in ("bf16", "fp8", "nf4"))
    assert 55 < bf16["weights"] < 58  # 30.5B parameters in bf16
    assert 0.5 < fp8["weights"] / bf16["weights"] < 0.52  # the experts are stored at 1 byte too
    assert 0.26 < nf4["weights"] / bf16["weights"] < 0.29
    # 128 experts x r16 x 3 projections x 48 layers of LoRA, fp32 with grads and AdamW moments: ~12.6 GiB
    assert 12 < bf16["lora"] < 13
    # 8 routed slots per token: the expert activations dominate, recompute removes almost all of them
    assert 20 < bf16["activations"] < 35
    assert estimate_memory_gib(args, _cfg("fp8", recompute=True), 2)["activations"] < 2


@pytest.mark.parametrize("flag,ratio", [("fp8_blocks", 0.52), ("nf4_blocks", 0.28)])
def test_base_bytes_of_a_quantized_moe_base(flag, ratio):
    args = PRESETS["qwen3-30b-a3b"]
    bf16 = base_weight_bytes(args, torch.bfloat16)
    assert ratio - 0.02 < base_weight_bytes(args, torch.bfloat16, **{flag: True}) / bf16 < ratio


def test_expandable_segments_is_a_default_not_an_override(monkeypatch):
    from surogate.oom import prefer_expandable_segments

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_partial_recompute_estimate_sits_between_none_and_all():
    # measured on one H100 (benchmarks/NOTES.md, session 3): qwen3-8b bf16 18.3 GiB with all 36 blocks
    # checkpointed, 19.3 GiB with 34, 36.2 GiB with none
    args = PRESETS["qwen3-8b"]
    full = estimate_memory_gib(args, _cfg(recompute=True), 2)["activations"]
    none = estimate_memory_gib(args, _cfg(), 2)["activations"]
    partial = SimpleNamespace(**{**vars(_cfg(recompute=True)), "recompute_layers": 34})
    two_whole = estimate_memory_gib(args, partial, 2)["activations"]
    assert full < two_whole < none
    assert 0.7 < two_whole - full < 1.5  # two blocks' activations (measured: 1.0 GiB)


def test_selective_recompute_estimate_counts_the_saves():
    # measured on one H100 (benchmarks/NOTES.md, session 11): qwen3-8b bf16 17.52 GiB with plain checkpointing,
    # 18.62 keeping the residual too, 19.77 keeping residual and attention output (1.1 GiB each over 36 blocks)
    args = PRESETS["qwen3-8b"]
    plain = estimate_memory_gib(args, _cfg(recompute=True), 2)["activations"]
    saves = SimpleNamespace(**{**vars(_cfg(recompute=True)), "recompute_saves": ["lora_xa", "residual", "attention"]})
    residual = SimpleNamespace(**{**vars(saves), "recompute_saves": ["lora_xa", "residual"]})
    assert 1.0 < estimate_memory_gib(args, residual, 2)["activations"] - plain < 1.25
    assert 2.0 < estimate_memory_gib(args, saves, 2)["activations"] - plain < 2.5

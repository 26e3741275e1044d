"""Shared by the recipe-pass tests: a tiny Qwen3 with LoRA on every projection (B != 0) and one packed batch."""

import dataclasses

import torch

from surogate.lora import LoRAConfig, apply_lora
from surogate.models.checkpoint import load_model
from surogate.models.presets import PRESETS


def tiny_lora_model(layers: int):
    args = dataclasses.replace(PRESETS["tiny"], num_layers=layers)
    torch.manual_seed(0)
    model, args = load_model(args, "cpu", torch.float32)
    apply_lora(model, LoRAConfig(rank=4))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # B != 0: every path matters
    return model, args


def random_batch(args):
    """(input_ids, position_ids, labels) for 2 rows of 32 random tokens."""
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    return ids, torch.arange(32).repeat(2, 1), ids.roll(-1, 1)

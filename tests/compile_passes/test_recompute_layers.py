"""surogate/parallelize.py's activation checkpointing: `recompute_layers` wraps exactly the first N blocks."""

from __future__ import annotations

import torch
from tiny_lora import random_batch, tiny_lora_model

from surogate.parallelize import parallelize


def test_recompute_layers_checkpoints_only_the_first_blocks():
    """recompute_layers=N wraps exactly the first N blocks; the model still trains (loss and LoRA grads equal the
    uncheckpointed eager model's: checkpointing recomputes, it does not change the arithmetic)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    torch._dynamo.reset()
    model, args = tiny_lora_model(3)
    reference, _ = tiny_lora_model(3)
    ids, pos, labels = random_batch(args)
    parallelize(model, recipe="bf16", compile=False, recompute=True, recompute_layers=2)
    parallelize(reference, recipe="bf16", compile=False)
    assert [isinstance(b, CheckpointWrapper) for b in model.model.layers] == [True, True, False]
    loss, ref = model(ids, pos, labels)[0], reference(ids, pos, labels)[0]
    loss.backward()
    ref.backward()
    assert torch.equal(loss, ref)
    got = [p.grad for p in model.parameters() if p.requires_grad]
    want = [p.grad for p in reference.parameters() if p.requires_grad]
    assert len(got) == len(want) and all(torch.allclose(g, w, rtol=1e-5, atol=1e-7) for g, w in zip(got, want))

"""Turn the eager model into the fast one, block by block, in torchtitan's order.

    activation checkpointing  ->  per-block torch.compile (our backend)  ->  (later) fully_shard

Regional compilation: every decoder block has the same code and shapes, so Dynamo traces one block and reuses the
compiled code for the others (a 64-layer model compiles once, not 64 times). Checkpointing wraps the block *before*
compiling so the compiled region contains the recompute. The LM head + loss stays eager: it is a chunked custom
autograd function of its own (surogate/loss.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

log = logging.getLogger(__name__)


SHARED_INPUT_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def colocate_shared_input_weights(model: nn.Module) -> int:
    """Store each block's q/k/v (and gate/up) frozen weights back to back in one buffer.

    The shared-input fusion pass runs one GEMM against the concatenated weights of a group; when the weights are
    already adjacent in memory that concatenation is a free view (`ops.lora_linear.frozen_concat`) instead of a
    cached copy (~9 GB extra on Qwen3-8B). Each projection keeps its own `weight` parameter (a view), so module
    paths, state-dict keys and the eager reference are unchanged. Returns the number of groups moved.
    """
    from ops.lora_linear import pack_frozen_weights

    moved = 0
    for block in model.model.layers:
        for parent_name, names in SHARED_INPUT_GROUPS:
            weights = [getattr(getattr(block, parent_name), n).weight for n in names]
            if any(w.requires_grad or w.device.type == "meta" for w in weights):
                continue  # only frozen, materialized weights
            if len({(w.dtype, w.device, w.shape[1:]) for w in weights}) != 1:
                continue
            pack_frozen_weights(weights)
            moved += 1
    return moved


def compile_backend(recipe: str, use_passes: bool, cudagraphs: bool = False):
    """Our FX passes + Inductor, or Inductor alone (`use_passes=False`: what the passes add is then measurable)."""
    from compile_passes.backend import make_backend

    return make_backend(recipe, passes=use_passes, cudagraphs=cudagraphs)


def parallelize(
    model: nn.Module,
    *,
    recipe: str = "bf16",
    compile: bool = True,
    use_passes: bool = True,
    recompute: bool = False,
    cudagraphs: bool = False,
) -> nn.Module:
    """Apply activation checkpointing, then per-block compilation, to `model.model.layers` in place."""
    layers = model.model.layers
    if compile and use_passes:
        colocate_shared_input_weights(model)
    if recompute:
        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block)
    if compile:
        backend = compile_backend(recipe, use_passes, cudagraphs)
        for i, block in enumerate(layers):
            layers[i] = torch.compile(block, backend=backend, fullgraph=True)
    log.info("blocks: %d, recompute=%s, compile=%s, passes=%s", len(layers), recompute, compile, compile and use_passes)
    return model

"""Pass (checkpointed blocks only): route each `low_rank_add`'s xa through `surogate::keep`.

Why: with `recompute=true` the backward of a block recomputes what it needs from the block's input. The LoRA-B
update of the o and down projections (`low_rank_add(y, xa, B, s, r)`, from `down_lora_fusion.py` and
`residual_lora_fusion.py`) needs only xa = x A^T ([tokens, r]) for B's gradient, but xa is an output of a big op:
o's LoRA op (which also runs o's base GEMM) or the SwiGLU kernel (which also writes the [tokens, intermediate]
activation). Recomputing xa recomputes that whole op: on Qwen3-8B the SwiGLU kernel alone is ~150 us per block and
micro-step, ~22 ms of a recompute step (H100 profile, benchmarks/NOTES.md). A copy of xa through its own op
(`ops/keep.py`) gives the checkpoint policy (surogate/recompute.py, `recompute_saves: [lora_xa]`) a tensor to save
on its own, a few hundred KB per block.

Pattern (in the body of an activation checkpoint):

    out = low_rank_add(y, xa, B, s[, r])   ->   out = low_rank_add(y, keep(xa), B, s[, r])

Outside checkpointed blocks nothing is recomputed, so the copy would only cost a kernel: the backend runs this pass
on checkpoint bodies alone.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

import ops.keep  # noqa: F401  (registers surogate::keep)
import ops.low_rank_add  # noqa: F401  (registers surogate::low_rank_add)
from compile_passes._fx_utils import is_call, propagate_fake

__all__ = ["checkpoint_bodies", "keep_lora_xa"]

log = logging.getLogger(__name__)

KEEP = torch.ops.surogate.keep.default
LOW_RANK_ADD = torch.ops.surogate.low_rank_add.default


def checkpoint_bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The child GraphModules that Dynamo made of activation-checkpointed regions (`tag_activation_checkpoint`)."""
    bodies = []
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if is_call(node, (torch.ops.higher_order.tag_activation_checkpoint,)) and node.args[0].op == "get_attr":
                bodies.append(getattr(module, node.args[0].target))
    return bodies


def keep_lora_xa(gm: fx.GraphModule) -> int:
    """Give every `low_rank_add` in `gm` its xa through `surogate::keep`; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, (LOW_RANK_ADD,)) or not isinstance(node.args[1], fx.Node):
            continue
        xa = node.args[1]
        if is_call(xa, (KEEP,)):
            continue
        with gm.graph.inserting_before(node):
            kept = gm.graph.call_function(KEEP, (xa,))
        propagate_fake(gm, kept)
        node.args = (node.args[0], kept, *node.args[2:])
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    log.debug("keep_lora_xa: %d", count)
    return count

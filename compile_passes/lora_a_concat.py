"""Pass: give a B-less projection group its LoRA A matrices as one concatenated graph tensor.

Why: after `swiglu_lora_fusion.py` and `qkv_rope_lora_fusion.py` the gate/up and q/k/v groups run the recipe's
LoRA op without B, and the op concatenates the group's A's itself twice per block and micro-step: for the forward's
`x A^T` (one GEMM for the group) and for the backward's LoRA dX fold (`dx += dxa A`). Each `torch.cat` is a small
kernel of its own (4 per block and micro-step, ~580 per Qwen3-8B step in the H100 profile). Written in the graph,
the concatenation is fused by Inductor into the kernel that already casts the A's to the activation dtype, and its
backward is views of the op's one dA. The op sees a single A ([sum r, in]) for several weights: without B it needs
the ranks nowhere (its consumer splits xa by the B shapes it holds).

Pattern:

    fused = lora_op(x, [W_1, ..., W_n], None, [A_1, ..., A_n], [], s, [])
        -> a = cat([A_1, ..., A_n]); fused = lora_op(x, [W_1, ..., W_n], None, [a], [], s, [])

Left alone: groups with B (the op splits xa per projection for them), with LoRA dropout (each A reads its own
dropped input), single projections.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from compile_passes._fx_utils import is_call, propagate_fake

__all__ = ["concat_lora_as"]

log = logging.getLogger(__name__)


def concat_lora_as(gm: fx.GraphModule, op) -> int:
    """Rewrite every B-less group call of `op` (the recipe's LoRA op) to take one concatenated A; returns how many."""
    count = 0
    for call in list(gm.graph.nodes):
        if not is_call(call, (op,)) or len(call.args) != 7 or call.kwargs:
            continue
        x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = call.args
        if lora_Bs or lora_inputs or len(lora_As) < 2:
            continue
        with gm.graph.inserting_before(call):
            a = gm.graph.call_function(torch.cat, (list(lora_As), 0))
        propagate_fake(gm, a)
        call.args = (x, weights, bias, [a], lora_Bs, scalings, lora_inputs)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    log.debug("concat_lora_as: %d", count)
    return count

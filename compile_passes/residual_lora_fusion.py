"""Pass: add the residual stream inside the LoRA update of the projection that feeds it (`ops.low_rank_add`).

Why: each Qwen3 block ends its two halves with `x + proj(...)`, where proj is the o or the down projection. The
LoRA-B product is added into the projection's output in one pass (read and write of [tokens, hidden]), and the
residual add is another (read both, write the sum): as its own kernel for the down projection (the block's output),
inside the next RMSNorm's kernel for o. One op that writes `residual + y + s xa B^T` reads y and the residual once
and writes once: one read and one write of [tokens, hidden] fewer per projection, block and micro-step.

Patterns, for the recipe's LoRA op (`op`):

    t = low_rank_add(y, xa, B, s)                         # the down projection, from down_lora_fusion.py
    out = t + r   (or r + t)
        -> out = low_rank_add(y, xa, B, s, r)

    o = op(x, [W], None, [A], [B], [s], [])               # a single projection with LoRA: o
    out = getitem(o, 0) + r   (or r + ...)
        -> o = op(x, [W], None, [A], [], [s], [])         # base GEMM and xa = x A^T (the op's no-B mode)
           out = low_rank_add(getitem(o, 0), getitem(o, 1), B, s, r)

Left alone: an output that anything else reads, a residual of another shape or dtype (broadcasting), dropout on
the LoRA input, bias, projection groups.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

import ops.low_rank_add  # noqa: F401  (registers surogate::low_rank_add)
from compile_passes._fx_utils import ADD_TARGETS, example_value, is_call, propagate_fake

__all__ = ["fuse_residual_into_lora"]

log = logging.getLogger(__name__)

LOW_RANK_ADD = torch.ops.surogate.low_rank_add.default


def _residual_add(gm: fx.GraphModule, t: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(the add, the residual) when t's only user is `t + r` / `r + t` with r of t's shape and dtype."""
    if len(t.users) != 1:
        return None
    add = next(iter(t.users))
    if not is_call(add, ADD_TARGETS) or len(add.args) != 2 or add.kwargs or add.args[0] is add.args[1]:
        return None
    r = add.args[1] if add.args[0] is t else add.args[0]
    tv, rv = example_value(gm, t), example_value(gm, r) if isinstance(r, fx.Node) else None
    if tv is None or rv is None or rv.shape != tv.shape or rv.dtype != tv.dtype:
        return None
    return add, r


def _replace(gm: fx.GraphModule, add: fx.Node, args: tuple) -> None:
    with gm.graph.inserting_before(add):
        fused = gm.graph.call_function(LOW_RANK_ADD, args)
    fused.meta.update({k: add.meta[k] for k in ("stack_trace", "nn_module_stack") if k in add.meta})
    propagate_fake(gm, fused)
    add.replace_all_uses_with(fused)
    gm.graph.erase_node(add)


def _fold_into_low_rank_add(gm: fx.GraphModule, t: fx.Node) -> bool:
    if not is_call(t, (LOW_RANK_ADD,)) or len(t.args) != 4 or t.kwargs:
        return False
    match = _residual_add(gm, t)
    if match is None:
        return False
    add, r = match
    _replace(gm, add, (*t.args, r))
    gm.graph.erase_node(t)
    return True


def _fold_into_projection(gm: fx.GraphModule, call: fx.Node, op) -> bool:
    if not is_call(call, (op,)) or len(call.args) != 7 or call.kwargs:
        return False
    _x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = call.args
    if len(weights) != 1 or bias is not None or lora_inputs or len(lora_As) != 1 or len(lora_Bs) != 1:
        return False
    outs = list(call.users)
    if len(outs) != 1 or not is_call(outs[0], (operator.getitem,)) or outs[0].args[1] != 0:
        return False
    y = outs[0]
    match = _residual_add(gm, y)
    if match is None:
        return False
    add, r = match
    (b,), (s,) = lora_Bs, scalings
    call.args = (call.args[0], weights, None, lora_As, [], [s], [])
    propagate_fake(gm, call)
    propagate_fake(gm, y)
    with gm.graph.inserting_after(y):
        xa = gm.graph.call_function(operator.getitem, (call, 1))
    propagate_fake(gm, xa)
    _replace(gm, add, (y, xa, b, s, r))
    return True


def fuse_residual_into_lora(gm: fx.GraphModule, op) -> int:
    """Fold every residual add after a LoRA update (of `op`, the recipe's LoRA op) into it; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        count += _fold_into_low_rank_add(gm, node) or _fold_into_projection(gm, node, op)
    if count:
        gm.graph.lint()
        gm.recompile()
    log.debug("fuse_residual_into_lora: %d", count)
    return count

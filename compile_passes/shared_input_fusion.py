"""Pass: merge LoRA-linear ops that read the same input (q/k/v; gate/up) into one op over the group.

Why: q, k and v (and gate and up) are three (two) GEMMs over the same activation. As one op the input is read by
one base GEMM against the concatenated weight [sum out, in] (larger N: better tensor-core utilisation for the small
k/v projections; for FP8/FP4 recipes the input is also quantized once) and one LoRA-A GEMM against [A_q; A_k; A_v].
The concatenated frozen weight is made once, not per step: `ops.lora_linear.frozen_concat` returns a zero-copy
view when the weights already sit back to back in one storage and otherwise a cached copy keyed on the weights'
data_ptr and version counter. Nothing is concatenated inside the graph, so Inductor never emits a per-step cat of
frozen weights. (The small LoRA A/B are trainable and concatenated inside the op each step: a few hundred KB.)

Pattern: single-projection `lora_linear` calls (as left by `lora_rewrite.py`) with the same input node, the same
LoRA-input mode (all read x, or all have their own dropped input: each LoRA module draws its own dropout mask, so
with dropout the A GEMMs stay per projection but the base GEMM is still shared), and bias on all or none (biases
are concatenated in the graph: [sum out], tiny). Members must not depend on each other's outputs. The fused op is
placed where the first member was (its other inputs, the A/B casts and dropout nodes, are moved up just before
it, keeping their relative order, hence dropout RNG order), and its concatenated output is split back into the
members' outputs.

Checked on: torch 2.13 CPU. torch 2.11 GPU: to be confirmed by the lead.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict

import torch
from torch import fx

from compile_passes._fx_utils import depends_on, example_value, hoist_before, propagate_fake

__all__ = ["fuse_shared_input_lora_linears", "find_shared_input_groups"]

log = logging.getLogger(__name__)


def _single_projection_calls(gm: fx.GraphModule, op) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op and len(n.args[1]) == 1]


def _group_key(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    x, weights, bias, _, _, _, lora_inputs = node.args
    weight = example_value(gm, weights[0])
    if weight is None:
        return None  # shape unknown: cannot split the fused output
    return (x, len(lora_inputs) > 0, bias is not None, weight.dtype, weight.device)


def find_shared_input_groups(gm: fx.GraphModule, op) -> list[list[fx.Node]]:
    """Groups (in graph order, size >= 2) of single-projection calls of `op` that can become one fused call."""
    by_key: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in _single_projection_calls(gm, op):
        key = _group_key(gm, node)
        if key is not None:
            by_key[key].append(node)
    groups = []
    for members in by_key.values():
        member_set = set(members)
        independent = [m for m in members if not any(depends_on(i, member_set) for i in m.all_input_nodes)]
        if len(independent) >= 2:
            groups.append(independent)
    return groups


def _fuse_group(gm: fx.GraphModule, members: list[fx.Node], op) -> None:
    graph = gm.graph
    first = members[0]
    for member in members:
        for node in member.all_input_nodes:
            hoist_before(node, first)
    x = first.args[0]
    weights = [m.args[1][0] for m in members]
    lora_As = [m.args[3][0] for m in members]
    lora_Bs = [m.args[4][0] for m in members]
    scalings = [m.args[5][0] for m in members]
    lora_inputs = [li for m in members for li in m.args[6]]
    out_sizes = [example_value(gm, w).shape[0] for w in weights]
    with graph.inserting_before(first):
        bias = None
        if first.args[2] is not None:
            bias = graph.call_function(torch.cat, ([m.args[2] for m in members],))
        fused = graph.call_function(op, (x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs))
        y = graph.call_function(operator.getitem, (fused, 0))
        parts = graph.call_function(torch.split, (y, out_sizes), {"dim": -1})
        outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    for new in (bias, fused, y, parts, *outs):
        if new is not None:
            new.meta.update({k: first.meta[k] for k in ("stack_trace", "nn_module_stack") if k in first.meta})
    _propagate(gm, [n for n in (bias, fused) if n is not None], y, parts, outs)
    for member, out in zip(members, outs):
        for user in list(member.users):
            if user.target is not operator.getitem or user.args[1] != 0:
                raise RuntimeError(f"unexpected use of {member}: {user.format_node()}")  # xa is never used outside
            user.replace_all_uses_with(out)
            graph.erase_node(user)
        graph.erase_node(member)


def _propagate(gm: fx.GraphModule, calls: list[fx.Node], y: fx.Node, parts: fx.Node, outs: list[fx.Node]) -> None:
    for call in calls:
        propagate_fake(gm, call)
    fused = calls[-1]
    if "example_value" not in fused.meta:
        return
    y.meta["example_value"] = fused.meta["example_value"][0]
    propagate_fake(gm, parts)
    for i, out in enumerate(outs):
        if "example_value" in parts.meta:
            out.meta["example_value"] = parts.meta["example_value"][i]


def fuse_shared_input_lora_linears(gm: fx.GraphModule, op) -> int:
    """Fuse every group of `op` calls sharing an input; returns how many groups were formed."""
    groups = find_shared_input_groups(gm, op)
    for members in groups:
        _fuse_group(gm, members, op)
    if groups:
        gm.graph.lint()
        gm.recompile()
    sizes = [len(g) for g in groups]
    log.debug("fuse_shared_input_lora_linears: %d groups (sizes %s) -> %s", len(groups), sizes, op)
    return len(groups)

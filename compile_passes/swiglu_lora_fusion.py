"""Pass: move the gate/up group's LoRA-B products into SwiGLU (`ops.swiglu_lora`).

Why: the fused gate/up op writes y = x W^T + s xa B^T ([tokens, 2 * intermediate], the block's widest activation)
and SwiGLU reads it; in the backward, SwiGLU's dy is read twice more for the LoRA gradients. With B applied inside
the activation (see `ops/swiglu_lora.py`) y is written once as the bare base output, and the forward and backward
each pass over it two times fewer.

Pattern (as `shared_input_fusion.py` leaves the MLP):

    fused = lora_op(x, [W_gate, W_up], None, [A_gate, A_up], [B_gate, B_up], [s_g, s_u], [])
    g, u = split(getitem(fused, 0), [I, I], dim=-1)
    h = mul(silu(g), u)                  # or mul(u, silu(g))

becomes

    fused = lora_op(x, [W_gate, W_up], None, [A_gate, A_up], [], [s_g, s_u], [])  # no B: y = x W^T, xa = x A^T
    h = swiglu_lora(getitem(fused, 0), getitem(fused, 1), [B_gate, B_up], [s_g, s_u])

`lora_op` is the recipe's LoRA-linear op: every variant runs without B the same way (`ops/lora_linear.py`). Left
alone: groups with LoRA dropout (each projection's A reads its own dropped input), bias, gate and up of different
widths, and a y, g, u or silu(g) that anything else reads.

Checked on: torch 2.13 CPU, torch 2.11 GPU (Dynamo gives F.silu and operator.mul as call_function nodes).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx

import ops.swiglu_lora  # noqa: F401  (registers surogate::swiglu_lora)
from compile_passes._fx_utils import is_call, propagate_fake

__all__ = ["fuse_swiglu_lora"]

log = logging.getLogger(__name__)

SWIGLU_LORA = torch.ops.surogate.swiglu_lora.default
_SILU = (F.silu, torch.ops.aten.silu.default)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def _match(mul: fx.Node, op) -> tuple[fx.Node, fx.Node] | None:
    """(the lora op call, the silu node) when `mul` is SwiGLU over the two halves of a gate/up group's output."""
    if not is_call(mul, _MUL) or len(mul.args) != 2 or mul.kwargs:
        return None
    a, b = mul.args
    silu, up = (a, b) if is_call(a, _SILU) else (b, a)
    if not is_call(silu, _SILU) or silu.kwargs.get("inplace") or len(silu.users) != 1:
        return None
    gate = silu.args[0]
    halves = [gate, up]
    if not all(is_call(h, (operator.getitem,)) and len(h.users) == 1 for h in halves):
        return None
    split = gate.args[0]
    if up.args[0] is not split or [gate.args[1], up.args[1]] != [0, 1] or len(split.users) != 2:
        return None
    if not is_call(split, (torch.split,)) or split.kwargs.get("dim", -1) != -1 or len(split.args) != 2:
        return None
    sizes = split.args[1]
    y = split.args[0]
    if not (isinstance(sizes, (list, tuple)) and len(sizes) == 2 and sizes[0] == sizes[1]):
        return None
    if not is_call(y, (operator.getitem,)) or y.args[1] != 0 or len(y.users) != 1:
        return None
    call = y.args[0]
    if not is_call(call, (op,)):
        return None
    _x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = call.args[:7]
    if len(weights) != 2 or bias is not None or lora_inputs or len(lora_Bs) != 2 or len(call.args) > 7:
        return None
    return call, silu


def _rewrite(gm: fx.GraphModule, mul: fx.Node, call: fx.Node) -> None:
    graph = gm.graph
    lora_Bs, scalings = list(call.args[4]), list(call.args[5])
    call.args = (*call.args[:4], [], *call.args[5:])  # no B; the scalings stay (unused by the op without B)
    propagate_fake(gm, call)
    y = next(u for u in call.users if u.args[1] == 0)
    with graph.inserting_before(mul):  # after y and the B casts (which precede the call)
        xa = graph.call_function(operator.getitem, (call, 1))
        h = graph.call_function(SWIGLU_LORA, (y, xa, lora_Bs, scalings))
    for new in (xa, h):
        new.meta.update({k: mul.meta[k] for k in ("stack_trace", "nn_module_stack") if k in mul.meta})
    if "example_value" in call.meta:
        xa.meta["example_value"] = call.meta["example_value"][1]
        propagate_fake(gm, h)
    mul.replace_all_uses_with(h)
    dead = [mul, *mul.args]  # mul, then silu and up ...
    silu = next(n for n in dead[1:] if is_call(n, _SILU))
    dead += [silu.args[0], silu.args[0].args[0]]  # ... gate, split
    for node in dead:
        if not node.users:
            graph.erase_node(node)


def fuse_swiglu_lora(gm: fx.GraphModule, op) -> int:
    """Rewrite every SwiGLU over a gate/up group of `op` (the recipe's LoRA op); returns how many."""
    matches = [(n, m) for n in gm.graph.nodes if (m := _match(n, op)) is not None]
    for mul, (call, _silu) in matches:
        _rewrite(gm, mul, call)
    if matches:
        gm.graph.lint()
        gm.recompile()
    log.debug("fuse_swiglu_lora: %d", len(matches))
    return len(matches)

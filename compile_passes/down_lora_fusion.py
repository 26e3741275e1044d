"""Pass: give the down projection's LoRA-A product to SwiGLU (`ops.swiglu_lora.swiglu_lora_down`).

Why: the down projection's input h ([tokens, intermediate], the block's second-widest activation) is read three
more times for its LoRA alone: `h A^T` in the forward, `dh += dxa A` (read and write) and `dA = dxa^T h` in the
backward, and it is kept for that backward. SwiGLU writes h and, in its backward, recomputes it tile by tile, so
it can make `h A^T` as it writes h, fold `dxa A` into the dh it reads anyway, and take dA from the h it recomputes.
The down projection then runs its base GEMM alone (the recipe's LoRA op with no A and no B, which saves nothing
of h), and its rank-r term is added by `ops.low_rank_add` (one pass over the output; written as graph ops it cost
Inductor a GEMM output written and read again).

Pattern (as `swiglu_lora_fusion.py` leaves the MLP):

    h = swiglu_lora(y, xa, [B_g, B_u], s)
    down = lora_op(h, [W_d], None, [A_d], [B_d], [s_d], [])

becomes

    h, xa_d = swiglu_lora_down(y, xa, [B_g, B_u], s, A_d)
    down = lora_op(h, [W_d], None, [], [], [s_d], [])        # base GEMM only
    out = low_rank_add(getitem(down, 0), xa_d, B_d, s_d)

Left alone: a down projection with dropout or bias, and an h that anything else reads.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

import ops.low_rank_add  # noqa: F401  (registers surogate::low_rank_add)
import ops.swiglu_lora  # noqa: F401  (registers surogate::swiglu_lora_down)
from compile_passes._fx_utils import hoist_before, is_call, propagate_fake

__all__ = ["fuse_down_lora_into_swiglu"]

log = logging.getLogger(__name__)

SWIGLU_LORA = torch.ops.surogate.swiglu_lora.default
SWIGLU_LORA_DOWN = torch.ops.surogate.swiglu_lora_down.default
LOW_RANK_ADD = torch.ops.surogate.low_rank_add.default


def _match(h: fx.Node, op) -> tuple[fx.Node, fx.Node] | None:
    """(the down projection's op call, its output getitem) when h = swiglu_lora(...) feeds only that call."""
    if not is_call(h, (SWIGLU_LORA,)) or len(h.users) != 1:
        return None
    call = next(iter(h.users))
    if not is_call(call, (op,)) or len(call.args) != 7 or call.kwargs or call.args[0] is not h:
        return None
    _x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = call.args
    if len(weights) != 1 or bias is not None or lora_inputs or len(lora_As) != 1 or len(lora_Bs) != 1:
        return None
    outs = [u for u in call.users if is_call(u, (operator.getitem,))]
    if len(outs) != 1 or len(call.users) != 1 or outs[0].args[1] != 0:
        return None
    return call, outs[0]


def _rewrite(gm: fx.GraphModule, h: fx.Node, call: fx.Node, y_out: fx.Node) -> None:
    graph = gm.graph
    (a_d,), (b_d,), (s_d,) = call.args[3], call.args[4], call.args[5]
    hoist_before(a_d, h)  # A_d's cast comes after h in Dynamo's order
    with graph.inserting_before(h):
        fused = graph.call_function(SWIGLU_LORA_DOWN, (*h.args, a_d))
        new_h = graph.call_function(operator.getitem, (fused, 0))
        xa_d = graph.call_function(operator.getitem, (fused, 1))
    call.args = (new_h, call.args[1], None, [], [], [s_d], [])
    with graph.inserting_before(y_out.next):  # in order, right after y_out
        total = graph.call_function(LOW_RANK_ADD, (y_out, xa_d, b_d, s_d))
    y_out.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    for new in (fused, new_h, xa_d, total):
        new.meta.update({k: call.meta[k] for k in ("stack_trace", "nn_module_stack") if k in call.meta})
    for new in (fused, new_h, xa_d, call, y_out, total):
        propagate_fake(gm, new)
    graph.erase_node(h)


def fuse_down_lora_into_swiglu(gm: fx.GraphModule, op) -> int:
    """Rewrite every down projection of `op` (the recipe's LoRA op) fed by a SwiGLU-LoRA op; returns how many."""
    matches = [(n, m) for n in list(gm.graph.nodes) if (m := _match(n, op)) is not None]
    for h, (call, y_out) in matches:
        _rewrite(gm, h, call, y_out)
    if matches:
        gm.graph.lint()
        gm.recompile()
    log.debug("fuse_down_lora_into_swiglu: %d", len(matches))
    return len(matches)

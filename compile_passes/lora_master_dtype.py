"""Pass: hand our LoRA epilogue ops their LoRA matrices in the master dtype, not the graph's casts of them.

Why: eager LoRA casts A and B to the activation dtype in every forward (`surogate/lora.py`), and after the fusion
passes those casts sit in front of the ops that apply B (and the down projection's A). A cast's backward is another
cast: the op summed the matrix's gradient in fp32 (its kernels' atomics), rounded it to bf16 to match the cast's
output, and the cast's backward turned it back into fp32 for the master. That is one or two small kernels per op
in the backward (H100 profile of Qwen3-4B, benchmarks/NOTES.md), and the rounding loses precision for nothing. The
ops cast their (tiny) matrices on load instead, the same round-to-nearest the graph's cast did, and return the
gradients in the matrices' dtype: the fp32 sums as they are.

    b_q = B_q.to(bf16); ...; qkv_rope_lora(y, xa, [b_q, b_k, b_v], ...)  ->  qkv_rope_lora(y, xa, [B_q, B_k, B_v], ...)

The ops and their LoRA-matrix arguments: `qkv_rope_lora` (the B's), `swiglu_lora` (the B's), `swiglu_lora_down`
(the B's and the down projection's A), `low_rank_add` (the o and down projections' B). An op call is rewritten
only when every one of its LoRA matrices is a `.to(dtype)` cast of a graph input (Dynamo's lifted parameters) and
those inputs share one floating dtype; a cast that still has other users stays for them. The recipe's LoRA-linear
op keeps its casts (its A goes into a bf16 GEMM).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

import ops.low_rank_add  # noqa: F401  (registers surogate::low_rank_add)
import ops.qkv_rope_lora  # noqa: F401  (registers surogate::qkv_rope_lora)
import ops.swiglu_lora  # noqa: F401  (registers surogate::swiglu_lora, surogate::swiglu_lora_down)
from compile_passes._fx_utils import example_value

__all__ = ["pass_lora_masters"]

log = logging.getLogger(__name__)

# op -> positions of its LoRA-matrix arguments (a tensor, or a list of them)
_LORA_MATRIX_ARGS = {
    torch.ops.surogate.qkv_rope_lora.default: (2,),
    torch.ops.surogate.swiglu_lora.default: (2,),
    torch.ops.surogate.swiglu_lora_down.default: (2, 4),
    torch.ops.surogate.low_rank_add.default: (2,),
}


def _cast_source(gm: fx.GraphModule, node: object) -> fx.Node | None:
    """The graph input that `node` casts (`x.to(dtype)`, positional dtype), or None."""
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2 or not isinstance(node.args[1], torch.dtype):
        return None
    is_to = (node.op == "call_method" and node.target == "to") or (
        node.op == "call_function" and node.target is torch.Tensor.to
    )
    source = node.args[0]
    if not is_to or not isinstance(source, fx.Node) or source.op not in ("placeholder", "get_attr"):
        return None
    value = example_value(gm, source)
    return source if value is not None and value.dtype.is_floating_point else None


def _op(call: fx.Node) -> object:
    """The call's op overload (Dynamo records a direct `torch.ops.surogate.x(...)` call as the overload packet)."""
    target = call.target
    return target.default if isinstance(target, torch._ops.OpOverloadPacket) else target


def _matrices(call: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    for position in _LORA_MATRIX_ARGS[_op(call)]:
        arg = call.args[position]
        found.extend(arg if isinstance(arg, (list, tuple)) else [arg])
    return found


def pass_lora_masters(gm: fx.GraphModule) -> int:
    """Rewrite every eligible call of our epilogue ops to take the LoRA matrices' sources; returns how many."""
    count = 0
    casts: set[fx.Node] = set()
    for call in list(gm.graph.nodes):
        if call.op != "call_function" or _op(call) not in _LORA_MATRIX_ARGS or call.kwargs:
            continue
        matrices = _matrices(call)
        sources = {m: _cast_source(gm, m) for m in matrices}
        if not matrices or any(s is None for s in sources.values()):
            continue
        if len({example_value(gm, s).dtype for s in sources.values()}) != 1:
            continue
        args = list(call.args)
        for position in _LORA_MATRIX_ARGS[_op(call)]:
            arg = args[position]
            args[position] = [sources[m] for m in arg] if isinstance(arg, (list, tuple)) else sources[arg]
        call.args = tuple(args)
        casts.update(matrices)
        count += 1
    for cast in casts:
        if not cast.users:
            gm.graph.erase_node(cast)
    if count:
        gm.graph.lint()
        gm.recompile()
    log.debug("pass_lora_masters: %d", count)
    return count

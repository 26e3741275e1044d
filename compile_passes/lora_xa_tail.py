"""Pass: a B-less bf16 LoRA group hands its consumer [y | xa] as one tensor (`lora_linear(..., xa_tail=True)`).

Why: after the B-removing fusions and `lora_a_concat.py`, the q/k/v and gate/up groups run the base GEMM and a
skinny `x A^T` GEMM that reads x again (13-19 us per group on Qwen3-8B shapes, plus cuBLAS's split-K reduction),
and their backward adds the LoRA dX into the base dX with a rank-r pass over dx (`dx += dxa A`, ~26 us per group on
8B, reading and writing [tokens, hidden]). With xa in the last columns of y the consumer's backward returns
[dy | dxa] as one tensor, so both directions can be one GEMM against [W; A]: the frozen weights are packed with
spare rows for A (`surogate.parallelize.colocate_block`), the op copies A's activation-dtype cast into them (a tiny
copy), and the GEMMs' inner or outer size grows by the rank (48 of 6144 for q/k/v, 32 of 24576 for gate/up).

Pattern (as `lora_a_concat.py` leaves the groups):

    fused = lora_linear(x, [W_1, ..., W_n], None, [a], [], s, [])
    out = consumer(getitem(fused, 0), getitem(fused, 1), ...)      # swiglu_lora(_down) or qkv_rope_lora
        -> fused = lora_linear(x, [W_1, ..., W_n], None, [a], [], s, [], True)   # ([y | xa], [N, 0])

The consumer reads xa from y's tail when its xa is [N, 0] (`ops._launch.xa_from_tail`); nothing else in the graph
changes. Only the bf16 op: the FP8/4-bit variants would quantize A with W (other numerics) and keep their path.
Left alone: a y or xa read by anything but the one consumer.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

import ops.lora_linear  # noqa: F401  (registers surogate::lora_linear)
import ops.qkv_rope_lora  # noqa: F401  (registers surogate::qkv_rope_lora)
import ops.swiglu_lora  # noqa: F401  (registers surogate::swiglu_lora, surogate::swiglu_lora_down)
from compile_passes._fx_utils import is_call, propagate_fake

__all__ = ["put_xa_in_tail"]

log = logging.getLogger(__name__)

LORA_LINEAR = torch.ops.surogate.lora_linear.default
CONSUMERS = (
    torch.ops.surogate.swiglu_lora.default,
    torch.ops.surogate.swiglu_lora_down.default,
    torch.ops.surogate.qkv_rope_lora.default,
)


def put_xa_in_tail(gm: fx.GraphModule, op) -> int:
    """Set `xa_tail` on every B-less group call of `op` whose y and xa feed one consumer op; returns how many."""
    if op is not LORA_LINEAR:
        return 0
    count = 0
    for call in list(gm.graph.nodes):
        if not is_call(call, (op,)) or len(call.args) != 7 or call.kwargs:
            continue
        x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = call.args
        if lora_Bs or lora_inputs or bias is not None or len(lora_As) != 1 or len(weights) < 2:
            continue
        items = _items(call)
        if items is None:
            continue
        y, xa = items
        (consumer,) = y.users
        if not is_call(consumer, CONSUMERS) or consumer.args[:2] != (y, xa):
            continue
        call.args = (*call.args, True)
        for node in (call, y, xa):
            propagate_fake(gm, node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    log.debug("put_xa_in_tail: %d", count)
    return count


def _items(call: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(getitem 0, getitem 1) of the call when those are its only users and each has exactly one user, the same."""
    items = {u.args[1]: u for u in call.users if u.target is operator.getitem}
    if len(items) != 2 or len(call.users) != 2 or set(items) != {0, 1}:
        return None
    y, xa = items[0], items[1]
    if len(y.users) != 1 or list(y.users) != list(xa.users):
        return None
    return y, xa

"""Pass: replace each eager linear+LoRA subgraph by one `torch.ops.surogate.lora_linear` call.

Why: the eager module (`surogate/lora.py`) is a frozen base linear plus a rank-r update in four GEMMs and three
pointwise ops. As one op its forward saves only the LoRA input and the [N, r] product, its backward never forms a
gradient for the frozen weight and folds both dX contributions into one buffer, and the recipe (bf16 / FP8 / FP4)
decides which op variant runs (`registry.py`). Everything around the op (norms, RoPE, SwiGLU, residuals) is left to
Inductor.

Pattern (the Dynamo, pre-autograd, torch-level graph of `LoRALinear.forward`):

    base = linear(x, W[, bias])                      # W (and bias) must not require grad
    h    = linear(x_lora, a)                         # x_lora: x | dropout(x, p, training, False)
    lora = linear(h, b)
    out  = base + s * lora   (or lora * s, or scale-less when s == 1)

Matching is on graph structure only, never on names: the parameters may be placeholders (Dynamo lifts them as
inputs named like `L_self_modules_q_proj_parameters_weight_` when it inlines nn.Modules, the default) or get_attr
nodes (older/other configurations); `a`/`b` may be `A.to(dtype)` casts (kept even when the dtypes already agree)
or the parameters themselves. Whatever produces `a`/`b` stays in the graph and feeds the op, so their backward
(cast to the fp32 master dtype) is eager's. A dropout that is a no-op (training False, or p == 0: nn.Dropout in
eval mode) is looked through, so the LoRA branch reads `x` and the op can share one LoRA-A GEMM per group. A real
dropout stays a graph node whose output is the op's `lora_inputs`: Inductor owns its RNG (see ops/lora_linear.py).

The rewrite is exact for any inputs of this shape, whatever produced them (it is the same arithmetic), so there is
nothing else to check but the frozen base, which is required because the op never returns a weight gradient.

Checked on: torch 2.13 CPU (Dynamo lifts parameters as placeholders; `.to()` casts kept as call_method nodes;
`F.dropout(x, p, training, inplace)`; `torch._C._nn.linear`). torch 2.11 GPU: to be confirmed by the lead.
"""

from __future__ import annotations

import logging
import numbers
import operator
from dataclasses import dataclass

from torch import fx

from compile_passes._fx_utils import (
    ADD_TARGETS,
    DROPOUT_TARGETS,
    LINEAR_TARGETS,
    MUL_TARGETS,
    is_call,
    is_frozen,
    linear_args,
    propagate_fake,
)

__all__ = ["LoRAMatch", "match_lora_linear", "rewrite_lora_linears"]

log = logging.getLogger(__name__)


@dataclass
class LoRAMatch:
    out: fx.Node  # the add node whose value the op replaces
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    lora_A: fx.Node
    lora_B: fx.Node
    scaling: float
    lora_input: fx.Node | None  # None: the LoRA branch reads x


def _split_scaled(node: fx.Node) -> tuple[fx.Node, float] | None:
    """`s * t` / `t * s` -> (t, s); a bare linear -> (t, 1.0)."""
    if is_call(node, LINEAR_TARGETS):
        return node, 1.0
    if not is_call(node, MUL_TARGETS) or node.kwargs or len(node.args) != 2:
        return None
    lhs, rhs = node.args
    if isinstance(lhs, numbers.Real) and isinstance(rhs, fx.Node):
        return rhs, float(lhs)
    if isinstance(rhs, numbers.Real) and isinstance(lhs, fx.Node):
        return lhs, float(rhs)
    return None


def _dropout_is_noop(node: fx.Node) -> bool:
    names = ("input", "p", "training", "inplace")
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    p, training, inplace = values.get("p", 0.5), values.get("training", True), values.get("inplace", False)
    if inplace is not False:
        return False  # an in-place dropout also changes x: leave the graph alone
    return training is False or p == 0


def _lora_input(x: fx.Node, x_lora: fx.Node) -> tuple[bool, fx.Node | None]:
    """(ok, lora_input): lora_input None when the LoRA branch reads x itself (directly or via a no-op dropout)."""
    if x_lora is x:
        return True, None
    if is_call(x_lora, DROPOUT_TARGETS) and x_lora.args and x_lora.args[0] is x:
        if _dropout_is_noop(x_lora):
            return True, None
        inplace = x_lora.kwargs.get("inplace", x_lora.args[3] if len(x_lora.args) > 3 else False)
        return inplace is False, x_lora
    return False, None


def match_lora_linear(gm: fx.GraphModule, node: fx.Node) -> LoRAMatch | None:
    """The LoRA subgraph ending at `node` (an add), or None."""
    if not is_call(node, ADD_TARGETS) or node.kwargs or len(node.args) != 2:
        return None
    for base, scaled in (node.args, node.args[::-1]):
        if not (is_call(base, LINEAR_TARGETS) and isinstance(scaled, fx.Node)):
            continue
        split = _split_scaled(scaled)
        if split is None or not is_call(split[0], LINEAR_TARGETS):
            continue
        lora, scaling = split
        h, lora_B, b_bias = linear_args(lora)
        if b_bias is not None or not is_call(h, LINEAR_TARGETS):
            continue
        x_lora, lora_A, a_bias = linear_args(h)
        x, weight, bias = linear_args(base)
        if a_bias is not None or not (is_frozen(gm, weight) and is_frozen(gm, bias)):
            continue
        ok, lora_input = _lora_input(x, x_lora)
        if ok:
            return LoRAMatch(node, x, weight, bias, lora_A, lora_B, scaling, lora_input)
    return None


def _replace_with_op(gm: fx.GraphModule, match: LoRAMatch, op) -> None:
    graph = gm.graph
    with graph.inserting_before(match.out):
        lora_inputs = [] if match.lora_input is None else [match.lora_input]
        call = graph.call_function(
            op,
            (match.x, [match.weight], match.bias, [match.lora_A], [match.lora_B], [match.scaling], lora_inputs),
        )
        y = graph.call_function(operator.getitem, (call, 0))
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in match.out.meta:
            call.meta[key] = y.meta[key] = match.out.meta[key]
    propagate_fake(gm, call)
    if "example_value" in call.meta:
        y.meta["example_value"] = call.meta["example_value"][0]
    match.out.replace_all_uses_with(y)
    graph.erase_node(match.out)


def rewrite_lora_linears(gm: fx.GraphModule, op) -> int:
    """Replace every matched linear+LoRA subgraph in `gm` by `op`; returns how many were rewritten."""
    matches = [m for m in (match_lora_linear(gm, n) for n in list(gm.graph.nodes)) if m is not None]
    for match in matches:
        _replace_with_op(gm, match, op)
    if matches:
        gm.graph.eliminate_dead_code()  # the old GEMMs, the scale, no-op dropouts
        gm.recompile()
    log.debug("rewrite_lora_linears: %d linear+LoRA subgraphs -> %s", len(matches), op)
    return len(matches)

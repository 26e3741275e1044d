"""Pass: hand the NF4 LoRA op the stored NF4 tensors of its base weights instead of dequantized copies (qnf4).

Why: qnf4 (`ops.nf4.NF4LoRALinear`) stores W as NF4 codes + double-quantized block absmax, and its eager forward is
`linear(x, nf4_dequantize(codes, absmax_q, factor, mean)) + lora`. `lora_rewrite.py` and `shared_input_fusion.py`
turn that into a call of the recipe's op (`surogate::lora_linear_nf4`) whose `weights` are the dequantize nodes'
outputs: a dense weight made in the forward graph and saved for the backward (2 bytes per weight per layer, the
memory the recipe exists to save). This pass gives the op the stored tensors instead (`weights=[codes...]`,
`absmax_q=[...]`, `factors=[...]`, `means=[...]`) and the recipe's options (`compute`, `grad_format`): the op
dequantizes inside its forward and again inside its backward, and the dequantize nodes, now unused, are removed.

Pattern: calls of the recipe's op whose weights are all `surogate::nf4_dequantize` outputs, or none of them (a
projection left dense: kept as it is, the op then behaves as `surogate::lora_linear`). A mix cannot come from one
model and is refused.

Checked on: torch 2.13 CPU (Dynamo keeps the custom dequantize op as one call_function node).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

import ops.nf4  # noqa: F401  (registers surogate::lora_linear_nf4, surogate::nf4_dequantize)

__all__ = ["configure_nf4_lora_linears", "nf4_recipe_ops"]

log = logging.getLogger(__name__)


def _is_dequantize(node: object) -> bool:
    targets = (torch.ops.surogate.nf4_dequantize.default, torch.ops.surogate.nf4_dequantize, ops.nf4.nf4_dequantize)
    return isinstance(node, fx.Node) and node.op == "call_function" and any(node.target is t for t in targets)


def configure_nf4_lora_linears(gm: fx.GraphModule, recipe) -> int:
    """Unwrap NF4-dequantized weights of every call of the recipe's op; returns calls changed."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is recipe.lora_linear]
    options = dict(recipe.op_kwargs)
    options = (options.get("compute", "bf16"), options.get("grad_format", "e5m2"))
    changed = 0
    for node in calls:
        weights = node.args[1]
        stored = [_is_dequantize(w) for w in weights]
        if not any(stored):
            continue
        if not all(stored):
            raise RuntimeError(f"{node.format_node()}: mixes NF4-stored and dense base weights in one call")
        codes, absmax_q, factors, means = ([w.args[i] for w in weights] for i in range(4))
        # positional, so the autograd setup_context reads them at fixed positions on every torch version
        node.args = (node.args[0], codes, *node.args[2:7], absmax_q, factors, means, *options)
        node.kwargs = {}
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    log.debug("configure_nf4_lora_linears: %d calls", changed)
    return changed


def nf4_recipe_ops(compute: str = "bf16", grad_format: str = "e5m2"):
    """The RecipeOps of the NF4 op family for these options (qnf4 recipe; see ops/nf4.py): GEMMs in bf16 on the
    dequantized weights, or in FP8 on e4m3 codes made from them (`grad_format`: dy's format in dX)."""
    from compile_passes.registry import RecipeOps

    if compute not in ("bf16", "fp8"):
        raise ValueError(f"compute={compute!r}: use bf16 or fp8")
    return RecipeOps(
        lora_linear=torch.ops.surogate.lora_linear_nf4.default,
        op_kwargs=(("compute", compute), ("grad_format", grad_format)),
        graph_passes=(configure_nf4_lora_linears,),
    )

"""Pass: give the FP4 LoRA op its options and, for FP4-stored base weights, the stored codes and scales (fp4, qfp4).

Why: `lora_rewrite.py` and `shared_input_fusion.py` build calls of the recipe's op with the generic LoRA-linear
arguments only. For the FP4 recipes two things are left to say:

1. The op's options (`fp4_format`, `compute`, `stochastic_rounding`, `hadamard`) come from the recipe
   (`RecipeOps.op_kwargs`); this pass sets them on every call of the op, positionally.
2. qfp4 (`ops.fp4.FP4LoRALinear`) stores W as e2m1 codes + block scales + a global scale, and its eager forward is
   `linear(x, fp4_dequantize(codes, scales, global)) + lora`. After the rewrite the op's `weights` are those
   `fp4_dequantize` nodes: a dense weight made in the forward graph and saved for the backward, the memory the
   recipe exists to save. We hand the op the stored tensors instead (`weights=[codes...]`, `block_scales=[...]`,
   `global_scales=[...]`); the op dequantizes inside its forward and backward, and the dequantize nodes, now unused,
   are removed.

Pattern: calls of the recipe's op whose weights are all `surogate::fp4_dequantize` outputs, or none of them (bf16
weights: the fp4 recipe quantizes them itself, once, so they must be graph inputs). A mix cannot come from one
model and is refused, as is a stored format other than the recipe's.

Checked on: torch 2.13 CPU (Dynamo keeps the custom dequantize op as one call_function node).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

import ops.fp4  # noqa: F401  (registers surogate::lora_linear_fp4, surogate::fp4_dequantize)
from compile_passes.fp8_weights import _check_frozen_input

__all__ = ["configure_fp4_lora_linears", "fp4_recipe_ops"]

log = logging.getLogger(__name__)


def _is_dequantize(node: object) -> bool:
    targets = (torch.ops.surogate.fp4_dequantize.default, torch.ops.surogate.fp4_dequantize, ops.fp4.fp4_dequantize)
    return isinstance(node, fx.Node) and node.op == "call_function" and any(node.target is t for t in targets)


def _stored(node: fx.Node, weights: list, fp4_format: str) -> tuple[list, list | None, list | None]:
    """(weights, block_scales, global_scales) for the op: stored tensors behind dequantize nodes, else as given."""
    stored = [_is_dequantize(w) for w in weights]
    if not any(stored):
        for w in weights:
            _check_frozen_input(node, w)
        return weights, None, None
    if not all(stored):
        raise RuntimeError(f"{node.format_node()}: mixes FP4-stored and bf16 base weights in one call")
    formats = {w.args[3] for w in weights}
    if formats != {fp4_format}:
        raise RuntimeError(f"{node.format_node()}: weights stored as {sorted(formats)}, the recipe says {fp4_format}")
    return [w.args[0] for w in weights], [w.args[1] for w in weights], [w.args[2] for w in weights]


def configure_fp4_lora_linears(gm: fx.GraphModule, recipe) -> int:
    """Set the recipe's options on every call of its op and unwrap FP4-dequantized weights; returns calls changed."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is recipe.lora_linear]
    options = dict(recipe.op_kwargs)
    for node in calls:
        weights, block_scales, global_scales = _stored(node, node.args[1], options["fp4_format"])
        # All options positional: the autograd setup_context then reads them at fixed positions on every torch
        # version (how keyword arguments reach it differs between versions).
        node.args = (
            node.args[0], weights, *node.args[2:7], block_scales, global_scales, options["fp4_format"],
            options["compute"], options["stochastic_rounding"], options["hadamard"], options["grad_format"],
        )  # fmt: skip
        node.kwargs = {}
    if calls:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    log.debug("configure_fp4_lora_linears: %d calls", len(calls))
    return len(calls)


def fp4_recipe_ops(
    fp4_format: str = "nvfp4",
    compute: str = "fp4",
    stochastic_rounding: bool = True,
    hadamard: bool = True,
    grad_format: str = "e5m2",
):
    """The RecipeOps of the FP4 op family for these options (fp4 and qfp4 recipes; see ops/fp4.py)."""
    from compile_passes.registry import RecipeOps

    if fp4_format not in ops.fp4.FORMATS:
        raise ValueError(f"fp4_format={fp4_format!r}: use one of {sorted(ops.fp4.FORMATS)}")
    if compute not in ("fp4", "bf16", "fp8"):
        raise ValueError(f"compute={compute!r}: use fp4, bf16 or fp8 (the last two for FP4-stored weights)")
    options = (
        ("fp4_format", fp4_format),
        ("compute", compute),
        ("stochastic_rounding", bool(stochastic_rounding)),
        ("hadamard", bool(hadamard)),
        ("grad_format", grad_format),
    )
    return RecipeOps(
        lora_linear=torch.ops.surogate.lora_linear_fp4.default,
        op_kwargs=options,
        graph_passes=(configure_fp4_lora_linears,),
    )

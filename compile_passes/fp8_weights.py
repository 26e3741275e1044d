"""Pass: give the FP8 LoRA op its options and, for FP8-stored base weights, the stored codes and scales.

Why: `lora_rewrite.py` and `shared_input_fusion.py` build calls of the recipe's op with the generic LoRA-linear
arguments only. For the FP8 recipes two things are left to say:

1. The op's options (`grad_format`, `compute`) come from the recipe (`RecipeOps.op_kwargs`); this pass sets them
   as keyword arguments on every call of the op.
2. qfp8 (`ops.fp8.FP8LoRALinear`) stores W as e4m3 codes + per-row scales and its eager forward is
   `linear(x, fp8_dequantize(codes, scale)) + lora`. After the rewrite the op's `weights` are those
   `fp8_dequantize` nodes. We hand the op the codes and scales instead (`weights=[codes...]`,
   `weight_scales=[scale...]`): the op runs its FP8 GEMMs on the stored codes, and the dequantize nodes, now
   unused, are removed, so no bf16 copy of a weight is made in the forward or saved for the backward.

Pattern: calls of `ops.lora_linear` (the recipe's op) whose weights are all `surogate::fp8_dequantize` outputs
(unwrapped), or none of them (left as they are: the fp8 recipe quantizes bf16 weights itself). A mix cannot come
from one model and is refused.

Checked on: torch 2.13 CPU (Dynamo keeps the custom dequantize op as one call_function node).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

import ops.fp8  # noqa: F401  (registers surogate::lora_linear_fp8, surogate::fp8_dequantize)

__all__ = ["configure_fp8_lora_linears", "fp8_recipe_ops"]

log = logging.getLogger(__name__)

DEQUANTIZE = torch.ops.surogate.fp8_dequantize.default
BF16_OP = torch.ops.surogate.lora_linear.default


def _too_small_for_fp8(weights: list, min_features: int) -> bool:
    """Whether a call's GEMM has an input or (summed) output width under `min_features` (fp8_min_features): there
    the per-call quantize of the activations costs about what the FP8 GEMM saves (Qwen3-0.6B, all widths 1024 on
    one side: fp8 0.99x bf16 with every projection in FP8), so the call stays a bf16 GEMM."""
    shapes = [w.meta["example_value"].shape for w in weights]
    return min(shapes[0][1], sum(s[0] for s in shapes)) < min_features


def _is_dequantize(node: object) -> bool:
    targets = (DEQUANTIZE, torch.ops.surogate.fp8_dequantize, ops.fp8.fp8_dequantize)
    return isinstance(node, fx.Node) and node.op == "call_function" and any(node.target is t for t in targets)


def _check_frozen_input(node: fx.Node, weight: fx.Node) -> None:
    """bf16 weights must be graph inputs: the op caches their FP8 form by address, and a weight computed inside
    the graph would be re-quantized every step (and saved for the backward): refuse instead of running slowly."""
    if not (isinstance(weight, fx.Node) and weight.op in ("placeholder", "get_attr")):
        raise RuntimeError(
            f"{node.format_node()}: base weight {weight} is computed in the graph ({getattr(weight, 'target', '?')}),"
            " not a module parameter; the FP8 op would re-quantize it every step"
        )


def configure_fp8_lora_linears(gm: fx.GraphModule, recipe) -> int:
    """Set the recipe's options on every call of its op and unwrap dequantized weights; returns calls changed."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is recipe.lora_linear]
    options = dict(recipe.op_kwargs)
    small = 0
    for node in calls:
        weights = node.args[1]
        scales = None
        stored = [_is_dequantize(w) for w in weights]
        if all(stored):
            weights, scales = [w.args[0] for w in weights], [w.args[1] for w in weights]
        elif any(stored):
            raise RuntimeError(f"{node.format_node()}: mixes FP8-stored and bf16 base weights in one call")
        else:
            for w in weights:
                _check_frozen_input(node, w)
            if _too_small_for_fp8(weights, options.get("min_features", 0)):
                node.target = BF16_OP  # same arguments: the bf16 op's schema is the op's without the options
                node.args, node.kwargs = node.args[:7], {}
                small += 1
                continue
        # All options positional: the autograd setup_context then reads them at fixed positions on every torch
        # version (how keyword arguments reach it differs between versions).
        node.args = (
            node.args[0], weights, *node.args[2:7], scales, options["grad_format"], options["compute"],
            options.get("cache_transposed", True),
        )  # fmt: skip
        node.kwargs = {}
    if calls:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    if small:
        log.info(
            "fp8: %d of %d LoRA linear calls per block are narrower than fp8_min_features=%d and run bf16 GEMMs",
            small, len(calls), options["min_features"],
        )  # fmt: skip
    log.debug("configure_fp8_lora_linears: %d calls", len(calls))
    return len(calls)


def fp8_recipe_ops(
    grad_format: str = "e5m2", compute: str = "fp8", cache_transposed: bool = True, min_features: int = 0
):
    """The RecipeOps of the FP8 op family for these options (fp8 and qfp8 recipes; see ops/fp8.py).
    `cache_transposed` (fp8 recipe): also cache each weight's transposed FP8 codes for dX. `min_features` (fp8
    recipe; a pass option, not the op's): calls with a narrower input or output run the bf16 op instead."""
    from compile_passes.registry import RecipeOps

    if grad_format not in ops.fp8.GRAD_FORMATS:
        raise ValueError(f"fp8_grad_format={grad_format!r}: use one of {sorted(ops.fp8.GRAD_FORMATS)}")
    if compute not in ("fp8", "bf16"):
        raise ValueError(f"compute={compute!r}: use fp8 or bf16")
    return RecipeOps(
        lora_linear=torch.ops.surogate.lora_linear_fp8.default,
        op_kwargs=(
            ("grad_format", grad_format),
            ("compute", compute),
            ("cache_transposed", bool(cache_transposed)),
            ("min_features", int(min_features)),
        ),
        graph_passes=(configure_fp8_lora_linears,),
    )

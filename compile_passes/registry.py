"""Recipe -> op registry: which LoRA-linear op variant the passes insert for a precision recipe.

The passes never name an op themselves; they ask `recipe_ops(recipe)`. A new recipe (FP8, FP4, NF4 storage, ...)
registers its variant with `register_recipe` from its own ops module; the passes and the trainer do not change.
A variant's op must have the `surogate::lora_linear` schema (x, weights[], bias?, lora_As[], lora_Bs[], scalings[],
lora_inputs[]) -> (y, xa) so both passes can build single and fused calls of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import ops.lora_linear  # noqa: F401  (registers torch.ops.surogate.lora_linear)

__all__ = ["RecipeOps", "register_recipe", "recipe_ops", "known_recipes"]


@dataclass(frozen=True)
class RecipeOps:
    lora_linear: torch._ops.OpOverload  # single projection or a shared-input group
    fuse_shared_inputs: bool = True  # whether q/k/v and gate/up become one call
    op_kwargs: tuple[tuple[str, object], ...] = ()  # options of the op, set by one of `graph_passes`
    graph_passes: tuple[Callable, ...] = ()  # pass(gm, recipe_ops) -> count, run after rewrite and fusion


_RECIPES: dict[str, RecipeOps] = {
    # bf16: cuBLAS GEMMs in the activation dtype (also serves fp32 activations, e.g. CPU tests).
    "bf16": RecipeOps(lora_linear=torch.ops.surogate.lora_linear.default),
}


def register_recipe(name: str, recipe: RecipeOps) -> None:
    if name in _RECIPES and _RECIPES[name] != recipe:
        raise ValueError(f"recipe {name!r} is already registered with a different op set")
    _RECIPES[name] = recipe


def _register_builtin_variants() -> None:
    """Op families living in their own modules register on first use (fp8, qfp8: compile_passes/fp8_weights.py;
    qnf4, alias qbnb: compile_passes/nf4_weights.py; fp4, qfp4: compile_passes/fp4_weights.py)."""
    if "fp8" not in _RECIPES:
        from compile_passes.fp8_weights import fp8_recipe_ops

        register_recipe("fp8", fp8_recipe_ops())
        register_recipe("qfp8", fp8_recipe_ops())
    if "qnf4" not in _RECIPES:
        from compile_passes.nf4_weights import nf4_recipe_ops

        register_recipe("qnf4", nf4_recipe_ops())
        register_recipe("qbnb", nf4_recipe_ops())
    if "fp4" not in _RECIPES:
        from compile_passes.fp4_weights import fp4_recipe_ops

        register_recipe("fp4", fp4_recipe_ops())  # bf16 weights, emulated NVFP4 GEMMs
        register_recipe("qfp4", fp4_recipe_ops(compute="fp8"))  # NVFP4-stored weights, FP8 GEMMs


def recipe_ops(name: str) -> RecipeOps:
    _register_builtin_variants()
    try:
        return _RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; registered recipes: {sorted(_RECIPES)}") from None


def known_recipes() -> tuple[str, ...]:
    _register_builtin_variants()
    return tuple(sorted(_RECIPES))

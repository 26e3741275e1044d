"""FX passes over Dynamo graphs and the torch.compile backend that runs them before Inductor."""

from compile_passes.backend import PassStats, make_backend, run_passes
from compile_passes.registry import RecipeOps, known_recipes, recipe_ops, register_recipe

__all__ = ["PassStats", "RecipeOps", "known_recipes", "make_backend", "recipe_ops", "register_recipe", "run_passes"]

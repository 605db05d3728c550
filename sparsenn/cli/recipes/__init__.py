"""Recipes: YAML files that describe a whole run (model, data, sparsifier, training, outputs).

    recipe = load_recipe("gmp.yaml", overrides=["train.epochs=1"])   # validated, defaults filled in
    result = run_recipe(recipe)                                     # trains, writes the outputs

``sparsenn run RECIPE.yaml`` is the command-line form; ``sparsenn run --schema`` prints
the schema (:mod:`.schema`). One bundled example per registered method lives in
``sparsenn/recipes/examples/`` (:func:`list_examples`, :func:`example_path`).
"""

from .loader import EXAMPLES_DIR, apply_overrides, example_path, list_examples, load_recipe, parse_recipe
from .runner import Prepared, RunResult, model_from_checkpoint, prepare, run_recipe
from .schema import SCHEMA, RecipeError, describe, validate

__all__ = [
    "EXAMPLES_DIR", "Prepared", "RecipeError", "RunResult", "SCHEMA", "apply_overrides", "describe", "example_path",
    "list_examples", "load_recipe", "model_from_checkpoint", "parse_recipe", "prepare", "run_recipe", "validate",
]

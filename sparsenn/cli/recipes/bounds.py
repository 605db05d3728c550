"""Upper bounds on every size a recipe, a checkpoint's metadata or a command-line option can ask for.

A recipe or a checkpoint written by ``sparsenn run``/``prune`` (``extra["sparsenn"]``)
says how to build a model: name, constructor arguments, input shape, seed. A file from a
stranger could ask for 10**12 classes, a 10**5 x 10**5 x 100 input or a seed of 10**23,
and the build would try to allocate terabytes or fail deep inside torch. Each value is
checked against these bounds first, with a message naming the key and the range; one set
of numbers governs recipes, checkpoints and the command line.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_ARG_ITEMS", "MAX_BATCH_SIZE", "MAX_CLASSES", "MAX_EPOCHS", "MAX_INPUT_DIMS", "MAX_INPUT_ELEMENTS",
           "MAX_MODEL_INT", "MAX_PARAMETERS", "MAX_RECIPE_BYTES", "MAX_SAMPLES", "MAX_SCORE_BATCHES", "MAX_SEED",
           "MAX_THREADS", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "input_shape_problems", "model_args_problems",
           "seed_problems"]

MAX_RECIPE_BYTES = 1 << 20  #: a recipe file or text (recipes are a few hundred bytes)
MAX_YAML_NODES = 100_000  #: YAML nodes once every alias is expanded (billion laughs)
MAX_YAML_DEPTH = 64  #: nesting of YAML collections
MAX_SEED = 2**32 - 1  #: scikit-learn's and NumPy's seeds are 32-bit
MAX_EPOCHS = 10_000  #: train.dense_epochs, train.epochs, --finetune-epochs and the demo's epochs
MAX_BATCH_SIZE = 1 << 16  #: data.batch_size and timed batch sizes
MAX_SAMPLES = 1 << 31  #: data.subset, data.test_subset
MAX_SCORE_BATCHES = 10_000  #: sparsify.score_batches
MAX_CLASSES = 100_000  #: a model's num_classes
MAX_MODEL_INT = 1 << 20  #: any other integer in model.args (widths, features, channels), in absolute value
MAX_ARG_ITEMS = 64  #: entries of a list in model.args (SmallVGG's widths): a model is built once per entry
MAX_PARAMETERS = 10**9  #: parameters of a bundled model (counted on the meta device before building it)
MAX_INPUT_DIMS = 8  #: dimensions of one input sample
MAX_INPUT_ELEMENTS = 1 << 24  #: elements of one input sample (64 MiB of float32)
MAX_THREADS = 1024  #: --threads


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def seed_problems(v: Any, path: str = "seed") -> list[str]:
    """Why ``v`` is not a seed in ``[0, MAX_SEED]``; empty when it is one."""
    return [] if _is_int(v) and 0 <= v <= MAX_SEED else [f"{path}: expected an integer in [0, {MAX_SEED}], got {v!r}"]


def model_args_problems(args: Any, path: str = "model.args") -> list[str]:
    """Integers in a model's arguments outside their bounds: ``num_classes`` in ``[1, MAX_CLASSES]``,
    every other integer (also inside lists) within ``MAX_MODEL_INT``; lists of at most ``MAX_ARG_ITEMS``."""
    if not isinstance(args, dict):
        return [f"{path}: expected a mapping of argument names to values, got {type(args).__name__}"]
    problems: list[str] = []

    def walk(value: Any, where: str, key: str) -> None:
        if isinstance(value, (list, tuple)):
            if len(value) > MAX_ARG_ITEMS:
                problems.append(f"{where}: a list of {len(value)} entries; at most {MAX_ARG_ITEMS}")
                return
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]", key)
        elif isinstance(value, dict):
            for k, item in value.items():
                walk(item, f"{where}.{k}", str(k))
        elif _is_int(value):
            low, high = (1, MAX_CLASSES) if key == "num_classes" else (-MAX_MODEL_INT, MAX_MODEL_INT)
            if not low <= value <= high:
                problems.append(f"{where}: expected an integer in [{low}, {high}], got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}: expected a finite number, got {value!r}")

    for key, value in args.items():
        walk(value, f"{path}.{key}", str(key))
    return problems


def input_shape_problems(shape: Any, path: str = "input_shape") -> list[str]:
    """Why ``shape`` is not the shape of one input sample (at most ``MAX_INPUT_DIMS`` positive
    dimensions, ``MAX_INPUT_ELEMENTS`` elements); empty when it is fine."""
    if not isinstance(shape, (list, tuple)) or not shape:
        return [f"{path}: expected a list of dimensions, got {shape!r}"]
    if len(shape) > MAX_INPUT_DIMS:
        return [f"{path}: {len(shape)} dimensions; at most {MAX_INPUT_DIMS} dimensions per sample"]
    if not all(_is_int(d) and d >= 1 for d in shape):
        return [f"{path}: {list(shape)!r}: every dimension must be an integer >= 1"]
    elements = math.prod(shape)
    if elements > MAX_INPUT_ELEMENTS:
        return [f"{path}: {list(shape)!r} has {elements} elements per sample; at most {MAX_INPUT_ELEMENTS}"]
    return []

"""The recipe schema: every section, key, type, default and choice, written out once.

A recipe is a YAML mapping with the sections ``model``, ``data``, ``sparsify``,
``train`` and ``outputs`` (plus ``name``, ``description`` and ``seed``). :func:`validate`
checks a parsed recipe against :data:`SCHEMA` and returns a complete copy with every
default filled in; every problem is reported with its key path, e.g.

    recipe.yaml: sparsify.method: 'rgl' is not one of: apoz, bn_gamma, grasp, ...

Choices for method, pattern, distribution, schedule and model come from the
registries, so a newly registered method is a valid recipe value at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Every size a recipe can ask for is bounded in one place, .bounds (with checkpoints and the command line)
from .bounds import (
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_SAMPLES,
    MAX_SCORE_BATCHES,
    MAX_SEED,
    input_shape_problems,
    model_args_problems,
)

__all__ = ["DATASETS", "REPORT_FORMATS", "RecipeError", "SCHEMA", "Field", "describe", "input_shape_problems",
           "model_args_problems", "validate"]

REQUIRED = object()  #: marks a field without a default

DATASETS = ("digits", "mnist", "fashion_mnist")
REPORT_FORMATS = ("text", "markdown", "html")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")


class RecipeError(ValueError):
    """A recipe is invalid; ``errors`` lists one ``"key.path: problem"`` per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, list(errors)
        super().__init__("\n".join(f"{source}: {e}" for e in self.errors))


# ----------------------------------------------------------------------------- value checks
# Each check returns None when the value is fine, else the problem (without the key path).


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int = 0, high: int | None = None) -> Callable[[Any], str | None]:
    where = f">= {low}" if high is None else f"in [{low}, {high}]"

    def check(v):
        ok = _is_int(v) and v >= low and (high is None or v <= high)
        return None if ok else f"expected an integer {where}, got {v!r}"
    return check


def number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = True):
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    where = f"in {lo}{low:g}, {high:g}{hi}" if high is not None else (f"> {low:g}" if low_open else f">= {low:g}")

    def check(v):
        ok = _is_num(v) and (v > low if low_open else v >= low)
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        return None if ok else f"expected a number {where}, got {v!r}"
    return check


def string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"expected a non-empty string, got {v!r}"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"expected true or false, got {v!r}"


def one_of(choices: Callable[[], list[str]] | tuple[str, ...]):
    def check(v):
        valid = list(choices() if callable(choices) else choices)
        if isinstance(v, str) and v.lower() in valid:
            return None
        return f"{v!r} is not one of: {', '.join(valid)}"
    return check


def string_list(v: Any) -> str | None:
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list) and all(isinstance(s, str) and s for s in v):
        return None
    return f"expected a list of names, got {v!r}"


def mapping(v: Any) -> str | None:
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return None
    return f"expected a mapping of names to values, got {v!r}"


def optional(check: Callable[[Any], str | None]):
    def opt(v):
        return None if v is None else check(v)
    return opt


@dataclass(frozen=True)
class Field:
    """One key: its check, its default (``REQUIRED`` if none) and a line of help."""

    check: Callable[[Any], str | None]
    default: Any = REQUIRED
    help: str = ""


# ----------------------------------------------------------------------------- registry-backed choices


def _methods() -> list[str]:
    from ...core.methods import list_methods
    return list_methods()


def _distributions() -> list[str]:
    from ...core.distributions import list_distributions
    return list_distributions()


def _schedules() -> list[str]:
    from ...core.schedules import list_schedules
    return list_schedules()


def classifier_models() -> list[str]:
    """Registered models that classify (their constructor takes ``num_classes``)."""
    from ...models.zoo import MODELS
    return [n for n in MODELS.names() if "num_classes" in inspect.signature(MODELS.get(n)).parameters]


def _model_name(v: Any) -> str | None:
    from .factory import factory_problem, is_factory

    if is_factory(v):
        return factory_problem(v)
    problem = one_of(classifier_models)(v)
    return None if problem is None else f"{problem} (or a factory as package.module:function)"


def _pattern(v: Any) -> str | None:
    from ...core.patterns import list_patterns, parse_pattern
    if not isinstance(v, str):
        return f"expected a pattern name, got {v!r}; valid patterns: {', '.join(list_patterns())}"
    try:
        parse_pattern(v)
    except (ValueError, TypeError):
        return (f"{v!r} is not one of: {', '.join(list_patterns())} "
                f"(N:M as e.g. '2:4', blockHxW as e.g. 'block4x4')")
    return None


def _schedule(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return None if v is None else one_of(_schedules)(v)
    if isinstance(v, dict):
        return None  # checked key by key in _validate_schedule
    return f"expected a schedule name or a mapping with 'name', got {v!r}"


def _sparsity(v: Any) -> str | None:
    return None if v is None else number(0.0, 1.0)(v)


def _overrides(v: Any) -> str | None:
    problem = mapping(v)
    if problem is None:
        bad = {k: x for k, x in v.items() if number(0.0, 1.0)(x) is not None}
        if bad:
            return f"every override must be a sparsity in [0, 1), got {bad}"
    return problem


def _report_formats(v: Any) -> str | None:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        return f"expected a list of report formats ({', '.join(REPORT_FORMATS)}), got {v!r}"
    bad = [f for f in v if not (isinstance(f, str) and f.lower() in REPORT_FORMATS)]
    return None if not bad else f"{bad[0]!r} is not one of: {', '.join(REPORT_FORMATS)}"


SCHEMA: dict[str, Any] = {
    "name": Field(optional(string), None, "the run's name (default: the file name without .yaml)"),
    "description": Field(optional(string), None, "free text, shown in the report"),
    "seed": Field(integer(0, MAX_SEED), 0, "seeds model initialization, data order and the sparsifier"),
    "model": {
        "name": Field(_model_name, "lenet300100", "a registered classifier (sparsenn.models.zoo) or your own "
                      "model's factory as package.module:function (imported from sys.path)"),
        "args": Field(mapping, {}, "constructor arguments; in_features/in_channels default to the data's"),
    },
    "data": {
        "name": Field(one_of(DATASETS), "digits", "digits is bundled with scikit-learn; the others need data_dir"),
        "data_dir": Field(optional(string), None, "folder with the IDX gzip files (mnist, fashion_mnist)"),
        "subset": Field(optional(integer(1, MAX_SAMPLES)), None, "use only the first N training samples"),
        "test_subset": Field(optional(integer(1, MAX_SAMPLES)), None, "use only the first N test samples"),
        "batch_size": Field(integer(1, MAX_BATCH_SIZE), 64, "mini-batch size"),
        "verify": Field(boolean, True, "check the IDX files' SHA-256"),
    },
    "sparsify": {
        "method": Field(one_of(_methods), REQUIRED, "a registered method (sparsenn.list_methods())"),
        "sparsity": Field(_sparsity, None, "target fraction of zeros in [0, 1); N:M patterns imply it"),
        "pattern": Field(_pattern, "unstructured", "unstructured, N:M (e.g. 2:4), blockHxW, channel, channel_in"),
        "distribution": Field(one_of(_distributions), "uniform", "per-layer budget"),
        "schedule": Field(_schedule, None, "a schedule name or mapping; default: the method's own"),
        "method_args": Field(mapping, {}, "the method's constructor arguments (e.g. update_every for rigl)"),
        "include": Field(optional(string_list), None, "parameter selectors (names or globs)"),
        "exclude": Field(optional(string_list), None, "parameters to keep dense (names or globs)"),
        "overrides": Field(_overrides, {}, "{parameter name or glob: sparsity}"),
        "score_batches": Field(integer(1, MAX_SCORE_BATCHES), 1, "batches a data-dependent score uses"),
        "couple_batchnorm": Field(boolean, False, "also zero the BatchNorm of pruned channels"),
        "rescale_init": Field(boolean, False, "re-initialize kept weights for their sparse fan-in"),
    },
    "train": {
        "dense_epochs": Field(integer(0, MAX_EPOCHS), 0, "dense training before the sparsifier is attached"),
        "epochs": Field(integer(0, MAX_EPOCHS), 10, "training with the sparsifier (gradual pruning, DST, fine-tuning)"),
        "optimizer": Field(one_of(OPTIMIZERS), "adam", "the optimizer of both phases"),
        "lr": Field(number(0.0, low_open=True), 1e-3, "learning rate of the dense phase"),
        "sparse_lr": Field(optional(number(0.0, low_open=True)), None, "learning rate with the sparsifier "
                           "(default: lr)"),
        "momentum": Field(number(0.0, 1.0), 0.9, "SGD momentum"),
        "weight_decay": Field(number(0.0), 0.0, "weight decay"),
        "lr_schedule": Field(one_of(LR_SCHEDULES), "constant", "per-iteration cosine decay or constant, per phase"),
        "slimming": Field(number(0.0), 0.0, "Network Slimming L1 on BatchNorm scales during the dense phase"),
    },
    "outputs": {
        "dir": Field(optional(string), None, "output folder (default runs/NAME); relative to the working folder"),
        "checkpoint": Field(boolean, True, "write model.safetensors (masks and the recipe included)"),
        "report": Field(_report_formats, ["text", "markdown", "html"], "report formats to write"),
        "convert": Field(boolean, False, "convert to the sparse runtime and measure the speedup"),
    },
}

#: keys of a schedule mapping besides the schedule's own fields (fractions of the sparse-training steps)
SCHEDULE_FRACTIONS = {
    "begin": "first step, as a fraction of the training steps with the sparsifier, in [0, 1]",
    "end": "last step (target reached), as a fraction of those steps, in [0, 1]",
    "updates": "number of mask updates between begin and end (sets frequency)",
}


# ----------------------------------------------------------------------------- validation


def _walk(spec: dict[str, Any], value: Any, path: str, errors: list[str]) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        errors.append(f"{path or 'recipe'}: expected a mapping with keys {', '.join(spec)}, got {value!r}")
        return {}
    out: dict[str, Any] = {}
    for key in value:
        if key not in spec:
            where = f"{path}.{key}" if path else str(key)
            errors.append(f"{where}: unknown key; valid keys{' in ' + path if path else ''}: {', '.join(spec)}")
    for key, sub in spec.items():
        where = f"{path}.{key}" if path else key
        if isinstance(sub, dict):
            out[key] = _walk(sub, value.get(key), where, errors)
            continue
        if key not in value:
            if sub.default is REQUIRED:
                errors.append(f"{where}: required ({sub.help})")
                continue
            out[key] = _copy(sub.default)
            continue
        problem = sub.check(value[key])
        if problem:
            errors.append(f"{where}: {problem}")
        out[key] = value[key]
    return out


def _copy(v: Any) -> Any:
    return {k: _copy(x) for k, x in v.items()} if isinstance(v, dict) else list(v) if isinstance(v, list) else v


def _signature_keys(cls: Any) -> list[str] | None:
    """Keyword arguments ``cls(...)`` accepts, or None when it takes ``**kwargs`` (or has no signature)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _validate_args(cls: Any, args: dict, path: str, what: str, errors: list[str], reserved=()) -> None:
    keys = _signature_keys(cls)
    if keys is None:
        return
    accepted = [k for k in keys if k not in reserved]
    for key in args:
        if key not in accepted and key not in reserved:
            errors.append(f"{path}.{key}: {what} does not take {key!r}; it takes: "
                          f"{', '.join(accepted) or '(no arguments)'}")


def _validate_schedule(spec: dict, errors: list[str]) -> None:
    from ...core.schedules import SCHEDULES

    path = "sparsify.schedule"
    if "name" not in spec:
        errors.append(f"{path}.name: required (one of: {', '.join(_schedules())})")
        return
    problem = one_of(_schedules)(spec["name"])
    if problem:
        errors.append(f"{path}.name: {problem}")
        return
    cls = SCHEDULES.get(spec["name"])
    own = [f.name for f in dataclasses.fields(cls)]
    valid = ["name", *own, *SCHEDULE_FRACTIONS]
    for key, v in spec.items():
        where = f"{path}.{key}"
        if key not in valid:
            errors.append(f"{where}: unknown key for schedule {cls.name!r}; valid keys: {', '.join(valid)}")
        elif key in ("begin", "end"):
            problem = number(0.0, 1.0, high_open=False)(v)
            if problem:
                errors.append(f"{where}: {problem} (a fraction of the training steps)")
        elif key in ("begin_step", "end_step", "rounds", "updates", "frequency"):
            problem = integer(1 if key in ("rounds", "updates", "frequency") else 0)(v)
            if problem:
                errors.append(f"{where}: {problem}")
        elif key == "exponent":
            problem = number(0.0, low_open=True)(v)
            if problem:
                errors.append(f"{where}: {problem}")
    for frac, step in (("begin", "begin_step"), ("end", "end_step"), ("updates", "frequency")):
        if frac in spec and step in spec:
            errors.append(f"{path}: give either {frac} or {step}, not both")
    if _is_num(spec.get("begin")) and _is_num(spec.get("end")) and spec["begin"] > spec["end"]:
        errors.append(f"{path}: begin ({spec['begin']}) must be <= end ({spec['end']})")


def _cross_checks(r: dict[str, Any], errors: list[str]) -> None:
    from ...core.methods import METHODS
    from ...core.patterns import parse_pattern
    from ...models.zoo import MODELS
    from .factory import FactoryError, is_factory, load_factory

    errors.extend(model_args_problems(r["model"]["args"]))
    name = r["model"]["name"]
    if is_factory(name):
        try:  # imports the user's module: its errors are the recipe's
            _validate_args(load_factory(name), r["model"]["args"], "model.args", f"model {name!r}", errors)
        except FactoryError as e:
            errors.append(f"model.name: {e}")
    elif name in classifier_models():
        _validate_args(MODELS.get(name), r["model"]["args"], "model.args", f"model {name!r}", errors)
    sp = r["sparsify"]
    if isinstance(sp.get("method"), str) and sp["method"].lower() in _methods():
        cls = METHODS.get(sp["method"])
        reserved = ("total_steps",) if getattr(cls, "dynamic", False) else ()
        _validate_args(cls, sp["method_args"], "sparsify.method_args", f"method {sp['method']!r}", errors,
                       reserved)
        if "total_steps" in sp["method_args"] and reserved:
            errors.append("sparsify.method_args.total_steps: set by the runner (train.epochs x batches per "
                          "epoch); leave it out")
        patterns = cls.patterns
        if patterns is not None and _pattern(sp["pattern"]) is None:
            if not cls.supports(parse_pattern(sp["pattern"])):
                errors.append(f"sparsify.pattern: method {sp['method']!r} cannot produce pattern "
                              f"{sp['pattern']!r}; it supports: {', '.join(patterns)}")
    if sp["sparsity"] is None and _pattern(sp["pattern"]) is None and parse_pattern(sp["pattern"]).max_density >= 1:
        errors.append(f"sparsify.sparsity: required for pattern {sp['pattern']!r} (a number in [0, 1))")
    if isinstance(sp["schedule"], dict):
        _validate_schedule(sp["schedule"], errors)
    data = r["data"]
    if data["name"] in ("mnist", "fashion_mnist"):
        if data["data_dir"] is None:
            errors.append(f"data.data_dir: required for data.name {data['name']!r} (the folder holding the IDX "
                          f"gzip files)")
        elif isinstance(data["data_dir"], str) and not Path(data["data_dir"]).expanduser().is_dir():
            errors.append(f"data.data_dir: no folder {data['data_dir']!r}")
    if r["train"]["slimming"] and r["train"]["dense_epochs"] == 0:
        errors.append("train.slimming: applies during the dense phase; set train.dense_epochs > 0")


def validate(recipe: Any, source: str = "recipe") -> dict[str, Any]:
    """A complete, checked copy of ``recipe`` (defaults filled in); raises :class:`RecipeError`.

    ``source`` names the recipe in messages (its file name). Names are lower-cased.
    """
    errors: list[str] = []
    if not isinstance(recipe, dict):
        raise RecipeError(source, [f"recipe: expected a mapping with keys {', '.join(SCHEMA)}, got "
                                   f"{type(recipe).__name__}"])
    out = _walk(SCHEMA, recipe, "", errors)
    if not errors:
        _cross_checks(out, errors)
    if errors:
        raise RecipeError(source, errors)
    for section, key in (("data", "name"), ("sparsify", "method"), ("sparsify", "distribution"),
                         ("train", "optimizer"), ("train", "lr_schedule")):
        out[section][key] = out[section][key].lower()
    if ":" not in out["model"]["name"]:  # module names are case-sensitive
        out["model"]["name"] = out["model"]["name"].lower()
    for key in ("include", "exclude"):
        if isinstance(out["sparsify"][key], str):
            out["sparsify"][key] = [out["sparsify"][key]]
    if isinstance(out["outputs"]["report"], str):
        out["outputs"]["report"] = [out["outputs"]["report"]]
    out["outputs"]["report"] = [f.lower() for f in out["outputs"]["report"]]
    return out


def describe() -> str:
    """The schema as indented text (``sparsenn run --schema``)."""
    lines: list[str] = []

    def walk(spec: dict[str, Any], indent: str) -> None:
        for key, sub in spec.items():
            if isinstance(sub, dict):
                lines.append(f"{indent}{key}:")
                walk(sub, indent + "  ")
            else:
                default = "(required)" if sub.default is REQUIRED else f"default {sub.default!r}"
                lines.append(f"{indent}{key}: {default}  # {sub.help}")

    walk(SCHEMA, "")
    lines.append("sparsify.schedule mapping: name plus the schedule's fields (begin_step, end_step, frequency, "
                 "exponent, rounds) or " + "; ".join(f"{k}: {v}" for k, v in SCHEDULE_FRACTIONS.items()))
    return "\n".join(lines)

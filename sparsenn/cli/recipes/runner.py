"""Running a validated recipe: data, model, dense phase, sparsifier, sparse phase, outputs.

Everything that can be checked without training is checked first (:func:`prepare`):
the data loads, the model accepts it, the schedule fits the number of steps, and a
throw-away Sparsifier is built on a copy of the model. Problems there are
:class:`~sparsenn.cli.recipes.schema.RecipeError` (bad recipe: ``sparsenn run`` exits 2);
anything after is a failure of the run (exit 1).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .checks import (
    TargetMissed,
    check_outputs,
    check_schedule_reaches_target,
    check_target_reached,
    output_folder,
    ramp_hint,
)
from .schema import RecipeError

__all__ = ["Prepared", "RunResult", "TargetMissed", "build_data", "build_model", "build_sparsifier",
           "check_outputs", "model_from_checkpoint", "output_folder", "prepare", "run_recipe"]


@dataclass
class Prepared:
    """A recipe made concrete: loaders, the (untrained) model, steps per phase."""

    recipe: dict[str, Any]
    train_set: TensorDataset
    test_set: TensorDataset
    train_loader: DataLoader
    test_loader: DataLoader
    model: nn.Module
    input_shape: tuple[int, ...]
    sparse_steps: int

    @property
    def example(self) -> torch.Tensor:
        """A test batch (for MACs and activation statistics in reports)."""
        return next(iter(self.test_loader))[0]


@dataclass
class RunResult:
    """What :func:`run_recipe` did: accuracies, the trained model (masks attached), report, files."""

    recipe: dict[str, Any]
    model: nn.Module
    sparsifier: Any
    dense_accuracy: float | None
    pruned_accuracy: float | None  #: right after the sparsifier was attached (one-shot: before fine-tuning)
    accuracy: float
    sparsity: float
    report: Any
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    inference: Any = None  #: sparsenn.backend.inference.Measured when outputs.convert

    def metrics(self) -> dict[str, Any]:
        return {"dense_accuracy": self.dense_accuracy, "pruned_accuracy": self.pruned_accuracy,
                "accuracy": self.accuracy, "sparsity": self.sparsity, "seconds": round(self.seconds, 2)}


# ----------------------------------------------------------------------------- data and model


def build_data(data: dict[str, Any], seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train and test sets as images ``(N, C, H, W)`` (digits: ``(N, 1, 8, 8)``), subsets applied."""
    from ...data.datasets import load_digits_tensors, load_idx_dataset

    if data["name"] == "digits":
        train_set, test_set = load_digits_tensors(seed=seed)
        train_set, test_set = (TensorDataset(d.tensors[0].reshape(-1, 1, 8, 8), d.tensors[1])
                               for d in (train_set, test_set))
    else:
        train_set, test_set = load_idx_dataset(data["name"], Path(data["data_dir"]).expanduser(),
                                               verify=data["verify"])

    def cut(d: TensorDataset, n: int | None) -> TensorDataset:
        return d if n is None else TensorDataset(*(t[:n] for t in d.tensors))

    return cut(train_set, data["subset"]), cut(test_set, data["test_subset"])


def build_model(spec: dict[str, Any], input_shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """The model ``spec["name"]`` (a registered model, or a factory ``package.module:function``,
    :mod:`.factory`) with ``spec["args"]``; ``in_features`` and ``in_channels`` default to the
    data's when the constructor takes them.

    Sizes are checked first (:func:`~.schema.model_args_problems`,
    :func:`~.schema.input_shape_problems`) and a registered model is counted on the meta
    device before it is built: a ValueError whose message starts with the key at fault
    (:class:`~.factory.FactoryError` for a factory).
    """
    import inspect

    from .factory import call_factory, is_factory, model_constructor
    from .bounds import MAX_PARAMETERS, input_shape_problems, model_args_problems

    name = spec["name"]
    ctor = model_constructor(name)
    kwargs = dict(spec.get("args") or {})
    problems = model_args_problems(kwargs) + input_shape_problems(tuple(input_shape))
    if problems:
        raise ValueError("\n".join(problems))
    try:
        params = inspect.signature(ctor).parameters
    except (TypeError, ValueError):
        params = {}
    if "in_features" in params and "in_features" not in kwargs:
        kwargs["in_features"] = math.prod(input_shape)
    if "in_channels" in params and "in_channels" not in kwargs:
        kwargs["in_channels"] = input_shape[0]
    if is_factory(name):  # the user's code: built as it is
        torch.manual_seed(seed)
        return call_factory(name, kwargs)
    try:
        with torch.device("meta"):  # sizes only: nothing is allocated
            count = sum(p.numel() for p in ctor(**kwargs).parameters())
    except (ValueError, TypeError) as e:
        raise ValueError(f"model.args: {e}") from None
    if count > MAX_PARAMETERS:
        raise ValueError(f"model.args: model {name!r} with these arguments has {count} parameters; "
                         f"at most {MAX_PARAMETERS}")
    torch.manual_seed(seed)
    return ctor(**kwargs)


def _schedule(spec: Any, total: int) -> Any:
    """A schedule spec with fractions (``begin``, ``end``, ``updates``) turned into steps."""
    if not isinstance(spec, dict):
        return spec
    out = {k: v for k, v in spec.items() if k not in ("begin", "end", "updates")}
    if "begin" in spec:
        out["begin_step"] = int(round(spec["begin"] * total))
    if "end" in spec:
        out["end_step"] = int(round(spec["end"] * total))
    if "updates" in spec:
        span = out.get("end_step", 0) - out.get("begin_step", 0)
        out["frequency"] = max(1, span // spec["updates"])
    return out


def build_sparsifier(recipe: dict[str, Any], model: nn.Module, data: Any, total_steps: int):
    """The recipe's :class:`~sparsenn.Sparsifier` on ``model``, for ``total_steps`` sparse-training steps."""
    from ...core.methods import METHODS
    from ...create.init import rescale_for_sparse_fan_in
    from ...structured.channels import couple_batchnorm
    from ...train.sparsifier import Sparsifier

    s = recipe["sparsify"]
    kwargs = dict(s["method_args"])
    if getattr(METHODS.get(s["method"]), "dynamic", False):
        kwargs["total_steps"] = max(1, total_steps)
    sp = Sparsifier(model, s["sparsity"], method=s["method"], pattern=s["pattern"], distribution=s["distribution"],
                    schedule=_schedule(s["schedule"], total_steps), include=s["include"], exclude=s["exclude"],
                    overrides=s["overrides"] or None, data=data, score_batches=s["score_batches"],
                    seed=recipe["seed"], **kwargs)
    if s["couple_batchnorm"]:
        couple_batchnorm(sp)
    if s["rescale_init"]:
        rescale_for_sparse_fan_in(model, seed=recipe["seed"])
    return sp


def prepare(recipe: dict[str, Any], source: str = "recipe", *, out_dir: str | Path | None = None,
            checkpoint_path: str | Path | None = None) -> Prepared:
    """Load the data, build the model and check everything the run will need; raises RecipeError.

    That is: the output folder can be written (``out_dir`` overrides ``outputs.dir``), the
    model accepts the data, the schedule reaches its target within the run, and a
    throw-away Sparsifier on a copy of the model computes the masks of the first mask
    update and of the target (an N:M pattern cannot follow a gradual ramp from 0).
    """
    from ...core.methods import METHODS
    from ...data.datasets import DatasetError, make_loaders

    check_outputs(recipe, source, out_dir, checkpoint_path)

    try:
        train_set, test_set = build_data(recipe["data"], recipe["seed"])
    except DatasetError as e:
        raise RecipeError(source, [f"data: {e}"]) from None
    if len(train_set) == 0 or len(test_set) == 0:
        raise RecipeError(source, ["data: no samples left (check data.subset and data.test_subset)"])
    input_shape = tuple(train_set.tensors[0].shape[1:])
    train_loader, test_loader = make_loaders(train_set, test_set, batch_size=recipe["data"]["batch_size"],
                                             seed=recipe["seed"])
    from .factory import FactoryError

    try:
        model = build_model(recipe["model"], input_shape, recipe["seed"])
    except FactoryError as e:
        raise RecipeError(source, [f"model.name: {e}"]) from None
    except (ValueError, TypeError) as e:  # the message starts with the key at fault
        raise RecipeError(source, str(e).splitlines()) from None
    try:
        with torch.no_grad():
            model.eval()(train_set.tensors[0][:2])
        model.train()
    except Exception as e:  # noqa: BLE001 - the model's own message says what it expected
        raise RecipeError(source, [f"model.name: {recipe['model']['name']!r} does not accept "
                                   f"{recipe['data']['name']} inputs of shape {input_shape}: {e}"]) from None
    sparse_steps = recipe["train"]["epochs"] * len(train_loader)
    method = METHODS.get(recipe["sparsify"]["method"])
    if getattr(method, "dynamic", False) and sparse_steps == 0:
        raise RecipeError(source, [f"train.epochs: method {recipe['sparsify']['method']!r} trains with the "
                                   f"sparsifier; needs epochs >= 1"])
    from ...core.schedules import make_schedule

    spec = _schedule(recipe["sparsify"]["schedule"], sparse_steps)
    if spec is not None:
        try:
            make_schedule(spec)
        except (ValueError, TypeError) as e:
            raise RecipeError(source, [f"sparsify.schedule: {e} (with {sparse_steps} training steps: "
                                       f"train.epochs={recipe['train']['epochs']} x {len(train_loader)} batches)"])
    if recipe["train"]["slimming"]:
        from ...structured.channels import SlimmingPenalty
        try:
            SlimmingPenalty(model, recipe["train"]["slimming"])
        except ValueError as e:
            raise RecipeError(source, [f"train.slimming: {e}"]) from None
    try:  # a dry run on a copy: pattern vs shapes, selectors, overrides, BatchNorm pairing, data
        dry = build_sparsifier(recipe, copy.deepcopy(model), _first(train_loader), sparse_steps)
    except (ValueError, TypeError) as e:
        from ...core.patterns import parse_pattern

        ramp = spec is not None and make_schedule(spec).gradual and "out of reach" in str(e)
        hint = ramp_hint(parse_pattern(recipe["sparsify"]["pattern"]), ramp)
        raise RecipeError(source, [f"sparsify: {e}{hint}"]) from None
    steps = (f"{sparse_steps} steps with the sparsifier (train.epochs={recipe['train']['epochs']} x "
             f"{len(train_loader)} batches)")
    check_schedule_reaches_target(dry, sparse_steps, steps, source)
    return Prepared(recipe, train_set, test_set, train_loader, test_loader, model, input_shape, sparse_steps)


def _first(loader: DataLoader) -> list:
    return [next(iter(loader))]


# ----------------------------------------------------------------------------- training


def make_optimizer(train: dict[str, Any], params, lr: float) -> torch.optim.Optimizer:
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train["momentum"], weight_decay=train["weight_decay"])
    cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=train["weight_decay"])


def _phase(model, loader, optimizer, train_cfg, epochs, *, sparsifier=None, after_backward=None, desc="train",
           progress=True) -> None:
    from ...train.loop import cosine_schedule, train

    if epochs == 0:
        return
    scheduler = cosine_schedule(optimizer, epochs * len(loader)) if train_cfg["lr_schedule"] == "cosine" else None
    train(model, loader, optimizer, epochs=epochs, sparsifier=sparsifier, scheduler=scheduler,
          after_backward=after_backward, progress=desc if progress else False)


def run_recipe(recipe: dict[str, Any], *, source: str = "recipe", out_dir: str | Path | None = None,
               progress: bool = True, print_fn: Callable[[str], None] = print,
               prepared: Prepared | None = None, checkpoint_path: str | Path | None = None) -> RunResult:
    """Run a validated recipe (see :func:`sparsenn.cli.recipes.load_recipe`) and write its outputs.

    ``out_dir`` overrides ``outputs.dir``; ``checkpoint_path`` the checkpoint's file
    (default ``OUT/model.safetensors``); ``progress`` shows bars (unless quiet mode);
    ``prepared``: the result of :func:`prepare` when the caller already checked the recipe.
    """
    from ...core.metrics import sparsity as measured_sparsity
    from ...report.layer_report import report
    from ...train.loop import evaluate

    start = time.perf_counter()
    if prepared is not None:
        check_outputs(recipe, source, out_dir, checkpoint_path)
    p = prepared or prepare(recipe, source, out_dir=out_dir, checkpoint_path=checkpoint_path)
    out = output_folder(recipe, out_dir)
    model, t = p.model, recipe["train"]
    print_fn(f"{recipe['name']}: {recipe['model']['name']} on {recipe['data']['name']} "
             f"({len(p.train_set)} train / {len(p.test_set)} test), method {recipe['sparsify']['method']}")
    dense_acc = None
    if t["dense_epochs"]:
        opt = make_optimizer(t, model.parameters(), t["lr"])
        hook = None
        if t["slimming"]:
            from ...structured.channels import SlimmingPenalty
            hook = SlimmingPenalty(model, t["slimming"]).apply_
        _phase(model, p.train_loader, opt, t, t["dense_epochs"], after_backward=hook, desc="dense",
               progress=progress)
        dense_acc = evaluate(model, p.test_loader)
        print_fn(f"  dense: {t['dense_epochs']} epochs, test accuracy {dense_acc:.2%}")
    sp = build_sparsifier(recipe, model, p.train_loader, p.sparse_steps)
    pruned_acc = None  # the accuracy of the step-0 masks, before any training with them
    if sp.history and sp.sparsity > 0:
        pruned_acc = evaluate(model, p.test_loader)
        if t["epochs"]:
            print_fn(f"  masks at step 0: sparsity {measured_sparsity(model):.1%}, test accuracy {pruned_acc:.2%}")
    opt = sp.wrap(make_optimizer(t, model.parameters(), t["sparse_lr"] or t["lr"]))
    _phase(model, p.train_loader, opt, t, t["epochs"], sparsifier=sp, desc=recipe["sparsify"]["method"],
           progress=progress)
    acc = evaluate(model, p.test_loader)
    dynamic = callable(getattr(sp.method, "diagnostics", None))
    rep = report(model, example_input=p.example, sparsifier=sp if dynamic else None)
    result = RunResult(recipe, model, sp, dense_acc, pruned_acc, acc, rep.total.sparsity, rep)
    print_fn(f"  {recipe['sparsify']['method']}: {t['epochs']} epochs, sparsity {result.sparsity:.1%}, "
             f"test accuracy {acc:.2%}")
    if recipe["outputs"]["convert"]:
        from ...backend.inference import measure

        result.inference = measure(model, p.example, progress=progress)
    result.seconds = time.perf_counter() - start
    result.out_dir = out
    result.files = write_outputs(result, p, out, checkpoint_path)
    for kind, path in result.files.items():
        print_fn(f"  {kind}: {path}")
    check_target_reached(sp, out)
    return result


# ----------------------------------------------------------------------------- outputs


def checkpoint_meta(result: RunResult, prepared: Prepared) -> dict[str, Any]:
    """What ``sparsenn prune/report/convert`` need to rebuild the model from a checkpoint."""
    r = result.recipe
    return {"model": {"name": r["model"]["name"], "args": dict(r["model"]["args"])},
            "input_shape": list(prepared.input_shape), "data": dict(r["data"]), "seed": r["seed"],
            "recipe": r, "metrics": result.metrics()}


def write_outputs(result: RunResult, prepared: Prepared, out: Path,
                  checkpoint_path: str | Path | None = None) -> dict[str, Path]:
    """The recipe's outputs under ``out``: ``model.safetensors``, ``model.sparse`` (converted),
    ``report.txt``, ``report.md`` + ``plots/``, ``report.html``."""
    from ...report.html import RunSummary, write_report
    from ...train.checkpoint import save

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    o = result.recipe["outputs"]
    if o["checkpoint"]:
        files["checkpoint"] = save(checkpoint_path or out / "model.safetensors", result.model, result.sparsifier,
                                   extra={"sparsenn": checkpoint_meta(result, prepared)})
    if result.inference is not None:
        files["converted"] = result.inference.save(out / "model.sparse")
    formats = [f for f in o["report"] if f != "text"]
    if "text" in o["report"]:
        path = out / "report.txt"
        path.write_text(f"{result.recipe['name']}\n{_metrics_line(result)}\n\n{result.report.to_text()}\n")
        files["text report"] = path
    if formats:
        runs = []
        if result.dense_accuracy is not None:
            runs.append(RunSummary("dense", result.dense_accuracy, 0.0))
        before = result.pruned_accuracy if result.recipe["train"]["epochs"] else None
        runs.append(RunSummary.from_model(result.recipe["sparsify"]["method"], result.model, result.report,
                                          accuracy=result.accuracy, inference=result.inference,
                                          before_finetune=before))
        written = write_report(out, runs, title=f"sparsenn run: {result.recipe['name']}",
                               description=result.recipe.get("description"), formats=formats,
                               recipe=result.recipe)
        files.update({f"{k} report": v for k, v in written.items()})
    return files


def _metrics_line(result: RunResult) -> str:
    parts = [f"sparsity {result.sparsity:.2%}", f"test accuracy {result.accuracy:.2%}"]
    if result.dense_accuracy is not None:
        parts.append(f"dense {result.dense_accuracy:.2%}")
    return ", ".join(parts)


def model_from_checkpoint(path: str | Path, model_name: str | None = None,
                          model_args: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a ``sparsenn`` checkpoint holds (masks attached); returns ``(model, meta)``.

    ``meta`` is what :func:`checkpoint_meta` wrote (empty for checkpoints saved by user
    code, which then need ``model_name``/``model_args``). Every field is checked against
    :mod:`.bounds` first, and the model is built on the ``meta`` device and compared with the
    file's tensors before it is built for real (:mod:`.checkpoint_meta`).
    """
    from ...train.checkpoint import CheckpointError, read, restore
    from .bounds import model_args_problems
    from .checkpoint_meta import check_fits, checked_meta
    from .factory import is_factory, model_constructor

    ckpt = read(path)
    meta = checked_meta(ckpt["extra"].get("sparsenn"), path)
    spec = meta.get("model")
    if model_name is not None:
        problems = model_args_problems(model_args or {}, "--model-arg")  # the command line's own values
        if problems:
            raise ValueError("; ".join(problems))
        spec = {"name": model_name, "args": model_args or {}}
    elif isinstance(spec, dict) and is_factory(spec.get("name")):
        raise ValueError(f"{str(path)!r} names the model factory {spec['name']!r}; sparsenn imports code only when "
                         f"you name it: pass --model {spec['name']} (and --model-arg KEY=VALUE)")
    if spec is None:
        raise ValueError(f"{str(path)!r} does not say which model it holds (it was not written by "
                         f"'sparsenn run' or 'sparsenn prune'); pass --model NAME [--model-arg KEY=VALUE]")
    model_constructor(spec["name"])  # unknown names list the valid ones
    spec = {"name": spec["name"], "args": dict(spec.get("args") or {})}
    shape, seed = tuple(meta.get("input_shape") or (1, 28, 28)), meta.get("seed", 0)
    what = f"{spec['name']}({', '.join(f'{k}={v!r}' for k, v in spec['args'].items())})"
    try:
        with torch.device("meta"):  # shapes only, no memory: compared with the file before building
            probe = build_model(spec, shape, seed)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r}: cannot build the model {what}: {e}") from None
    check_fits(probe, ckpt["model"], what, path)
    model = build_model(spec, shape, seed)
    restore(ckpt, model, source=path)
    meta["model"] = spec
    return model, meta

"""One function per ``sparsenn`` subcommand (``COMMANDS``): each takes the parsed arguments
and returns the exit code; bad input raises :class:`~sparsenn.cli.parser.UsageError`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .parser import UsageError, _usage


def _cmd_demo(args) -> int:
    from .demo import run_demo

    if args.data != "digits" and not args.data_dir:
        raise UsageError(f"--data {args.data} needs --data-dir DIR (the folder holding the IDX gzip files)")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir: no folder {args.data_dir!r}")
    from ..data.datasets import DatasetError

    try:
        run_demo(sparsity=args.sparsity, dense_epochs=args.dense_epochs, prune_epochs=args.prune_epochs,
                 rigl_epochs=args.rigl_epochs, seed=args.seed, data=args.data, data_dir=args.data_dir,
                 subset=args.subset, out=args.out, convert=not args.no_convert,
                 threads=getattr(args, "threads", 1), progress=True)
    except DatasetError as e:  # missing or corrupt IDX files: unusable input, as in `sparsenn run`
        raise UsageError(f"--data-dir: {e}") from e
    return 0


def _cmd_run(args) -> int:
    from .recipes import describe, load_recipe, prepare, run_recipe
    from .recipes.loader import resolve_recipe_path

    if args.schema:
        print(describe())
        return 0
    if not args.recipe:
        raise UsageError("run needs a RECIPE (a YAML file or a bundled example name; see sparsenn list)")
    with _usage():
        source = resolve_recipe_path(args.recipe).name
        recipe = load_recipe(args.recipe, args.set)
        prepared = prepare(recipe, source, out_dir=args.out)
    if args.check:
        print(f"{source}: valid ({recipe['model']['name']} on {recipe['data']['name']}, "
              f"method {recipe['sparsify']['method']})")
        return 0
    run_recipe(recipe, source=source, out_dir=args.out, progress=True, prepared=prepared)
    return 0


def _data_spec(args, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The data to use: --data/--data-dir, else the checkpoint's, else None."""
    if args.data:
        if args.data != "digits" and not args.data_dir:
            raise UsageError(f"--data {args.data} needs --data-dir DIR")
        return {"name": args.data, "data_dir": args.data_dir, "subset": None, "test_subset": None,
                "batch_size": 64, "verify": True}
    spec = meta.get("data")
    if spec and spec.get("name") != "digits" and not Path(str(spec.get("data_dir"))).is_dir():
        return None  # the checkpoint's data folder is not on this machine
    return dict(spec) if spec else None


def _load_checkpoint(args):
    from .recipes import model_from_checkpoint

    if args.model_arg and not args.model:
        raise UsageError("--model-arg needs --model NAME")
    from safetensors import SafetensorError

    with _usage():
        try:
            return model_from_checkpoint(args.checkpoint, args.model, dict(args.model_arg) or None)
        except SafetensorError as e:  # truncated or not a safetensors file at all
            raise ValueError(f"{args.checkpoint!r} is not a readable checkpoint ({e})") from e


def _loaders(spec: dict[str, Any] | None, seed: int):
    if spec is None:
        return None, None
    from ..data.datasets import make_loaders
    from .recipes.runner import build_data

    with _usage():
        train_set, test_set = build_data(spec, seed)
        return make_loaders(train_set, test_set, batch_size=spec.get("batch_size", 64), seed=seed)


def _cmd_prune(args) -> int:
    if (args.checkpoint is None) == (args.recipe is None):
        raise UsageError("prune needs either a CHECKPOINT or --recipe RECIPE (not both)")
    if args.set and not args.recipe:
        raise UsageError("--set applies to --recipe only")
    return _prune_recipe(args) if args.recipe else _prune_checkpoint(args)


def _prune_recipe(args) -> int:
    from ..core.methods import METHODS
    from .recipes import load_recipe, prepare, run_recipe
    from .recipes.loader import resolve_recipe_path

    sets = [*args.set, f"sparsify.sparsity={args.sparsity}", "sparsify.schedule=one_shot",
            f"train.epochs={args.finetune_epochs}", "outputs.report=[]", "outputs.convert=false"]
    for key in ("method", "pattern", "distribution"):
        if getattr(args, key):
            sets.append(f"sparsify.{key}={getattr(args, key)}")
    if args.exclude:
        sets.append(f"sparsify.exclude={json.dumps(args.exclude)}")
    if args.data:
        sets += [f"data.name={args.data}"] + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    with _usage():
        source = resolve_recipe_path(args.recipe).name
        recipe = load_recipe(args.recipe, sets)
        if getattr(METHODS.get(recipe["sparsify"]["method"]), "dynamic", False):
            raise ValueError(f"--method {recipe['sparsify']['method']}: prune needs a pruning criterion, not a "
                             f"dynamic sparse training method (use sparsenn run for those)")
        prepared = prepare(recipe, source, out_dir=Path(args.output).parent, checkpoint_path=args.output)
    result = run_recipe(recipe, source=source, out_dir=Path(args.output).parent,
                        progress=True, prepared=prepared, checkpoint_path=Path(args.output))
    print(f"pruned to {result.sparsity:.2%}, test accuracy {result.accuracy:.2%}: {args.output}")
    return 0


def _prune_checkpoint(args) -> int:
    from ..report.layer_report import report
    from ..train.checkpoint import save
    from ..train.loop import evaluate, train
    from ..train.sparsifier import Sparsifier

    model, meta = _load_checkpoint(args)
    spec = _data_spec(args, meta)
    seed = int(meta.get("seed", 0))
    train_loader, test_loader = _loaders(spec, seed)
    method = args.method or "magnitude"
    from ..core.metrics import sparsity as measured_sparsity

    current = measured_sparsity(model)
    if args.sparsity < current - 1e-6:
        raise UsageError(f"--sparsity {args.sparsity:g} is below the checkpoint's sparsity {current:.4g}; "
                         f"prune only removes weights")
    with _usage():
        from ..core.methods import METHODS

        cls = METHODS.get(method)
        if getattr(cls, "dynamic", False):
            raise ValueError(f"--method {method}: prune needs a pruning criterion, not a dynamic sparse "
                             f"training method (use sparsenn run for those)")
        if (cls.needs_data or args.finetune_epochs) and train_loader is None:
            why = f"method {method!r} scores on data" if cls.needs_data else "--finetune-epochs needs data"
            raise ValueError(f"{why}: pass --data NAME (and --data-dir DIR)")
        sp = Sparsifier(model, args.sparsity, method=method, pattern=args.pattern or "unstructured",
                        distribution=args.distribution or "uniform", schedule="one_shot", exclude=args.exclude,
                        data=train_loader, seed=seed)
    acc = None
    if args.finetune_epochs:
        import torch

        opt = sp.wrap(torch.optim.Adam(model.parameters(), lr=3e-4))
        train(model, train_loader, opt, epochs=args.finetune_epochs, sparsifier=sp, progress="fine-tune")
    if test_loader is not None:
        acc = evaluate(model, test_loader)
    rep = report(model)
    meta = dict(meta)
    meta["metrics"] = {**(meta.get("metrics") or {}), "accuracy": acc, "sparsity": rep.total.sparsity,
                       "dense_accuracy": (meta.get("metrics") or {}).get("dense_accuracy")}
    meta["pruned"] = {"from": str(args.checkpoint), "method": method, "sparsity": args.sparsity,
                      "finetune_epochs": args.finetune_epochs}
    if spec is not None:
        meta["data"] = spec
    save(args.output, model, extra={"sparsenn": meta})
    acc_text = "" if acc is None else f", test accuracy {acc:.2%}"
    print(f"pruned to {rep.total.sparsity:.2%} with {method}{acc_text}: {args.output}")
    return 0


def _cmd_report(args) -> int:
    from ..report.html import RunSummary, write_report
    from ..report.layer_report import report
    from ..train.loop import evaluate

    model, meta = _load_checkpoint(args)
    spec = _data_spec(args, meta)
    _, test_loader = _loaders(spec, int(meta.get("seed", 0)))
    example = None if test_loader is None else next(iter(test_loader))[0]
    rep = report(model, example_input=example)
    if args.format == "text":
        print(rep.to_text())
        return 0
    if args.format == "markdown" and not args.out:
        print(rep.to_markdown())
        return 0
    metrics = meta.get("metrics") or {}
    acc = evaluate(model, test_loader) if test_loader is not None else metrics.get("accuracy")
    inference = None
    if args.convert:
        if example is None:
            raise UsageError("--convert needs example inputs: pass --data NAME (and --data-dir DIR)")
        from ..backend.inference import measure
        inference = measure(model, example, progress=True)
    runs = []
    if metrics.get("dense_accuracy") is not None:
        runs.append(RunSummary("dense", metrics["dense_accuracy"], 0.0))
    label = Path(args.checkpoint).stem
    runs.append(RunSummary.from_model(label, model, rep, accuracy=acc, inference=inference))
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(Path(args.checkpoint).stem + "-report")
    formats = ["markdown", "html"] if args.format == "html" else ["markdown"]
    written = write_report(out, runs, title=f"sparsenn report: {args.checkpoint}", formats=formats,
                           recipe=meta.get("recipe"))
    for kind, path in written.items():
        print(f"{kind} report: {path}")
    return 0


def _example_input(meta: dict[str, Any], test_loader):
    """A batch of the test data, else random inputs of the checkpoint's recorded input shape (batch 1)."""
    if test_loader is not None:
        return next(iter(test_loader))[0]
    if meta.get("input_shape"):
        import torch
        return torch.rand(1, *meta["input_shape"])
    raise UsageError("the checkpoint does not record its input shape: pass --data NAME (and --data-dir DIR)")


def _cmd_convert(args) -> int:
    from ..backend.inference import measure, runtime_convert

    runtime_convert()  # fails early, naming what is missing
    model, meta = _load_checkpoint(args)
    spec = _data_spec(args, meta)
    _, test_loader = _loaders(spec, int(meta.get("seed", 0)))
    example = _example_input(meta, test_loader)
    measured = measure(model, example, batch_sizes=args.batch_sizes, progress=True)
    _print_conversion(measured)
    measured.save(args.output)
    print(f"converted model: {args.output}")
    return 0


def _print_conversion(m) -> None:
    if m.summary is not None:
        print(m.summary)
    print(f"weights: {m.dense_bytes / 1024:.1f} KiB dense -> {m.sparse_bytes / 1024:.1f} KiB stored in the smallest "
          f"exact format ({m.formats})")
    if m.held_bytes:
        print(f"the converted model's layers hold {m.held_bytes / 1024:.1f} KiB (the dense layers: "
              f"{m.dense_held_bytes / 1024:.1f} KiB): packed arrays of the kernels in use, dense weights kept, biases")


def _cmd_bench(args) -> int:
    if args.script:
        return _bench_script(args)
    if args.script_args:
        raise UsageError(f"arguments after -- are for --script: {' '.join(args.script_args)}")
    from .bench import builtin_bench

    with _usage():
        from ..models.zoo import MODELS
        MODELS.get(args.model)
        bad = [s for s in args.sparsities if not 0 <= s < 1]
        if bad:
            raise ValueError(f"--sparsities must be in [0, 1), got {bad[0]:g}")
    builtin_bench(args.model, args.sparsities, args.batch_sizes, progress=True)
    return 0


def _bench_script(args) -> int:
    root = Path(__file__).resolve().parents[2] / "bench"
    if not root.is_dir():
        raise UsageError("--script needs a source checkout (a bench/ folder next to the sparsenn package); "
                         "without one, run the built-in benchmark: sparsenn bench")
    scripts = sorted(p.stem for p in root.glob("*.py"))
    if args.script not in scripts:
        raise UsageError(f"no bench script {args.script!r}; valid: {', '.join(scripts)}")
    extra = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    return subprocess.call([sys.executable, str(root / f"{args.script}.py"), *extra])


def _cmd_list(args) -> int:
    # importing sparsenn.cli imported the whole package first, so every registry is filled
    from ..backend.formats import list_formats
    from ..core.distributions import list_distributions
    from ..core.methods import list_methods
    from ..core.patterns import list_patterns
    from ..core.schedules import list_schedules
    from ..models.zoo import list_models
    from .recipes import list_examples

    rows = [("methods", list_methods()), ("patterns", list_patterns()),
            ("distributions", list_distributions()), ("schedules", list_schedules()),
            ("formats", list_formats()), ("models", list_models()), ("recipes", list_examples())]
    for what, names in rows:
        print(f"{what:<14} {', '.join(names)}")
    return 0


def _cmd_oneshot(args) -> int:
    from .oneshot import cmd_oneshot

    return cmd_oneshot(args)


def _cmd_compress(args) -> int:
    from .compress import cmd_compress

    return cmd_compress(args)


def _cmd_export(args) -> int:
    from .compress import cmd_export

    return cmd_export(args)


COMMANDS = {"compress": _cmd_compress, "export": _cmd_export, "oneshot": _cmd_oneshot, "demo": _cmd_demo, "run": _cmd_run, "prune": _cmd_prune, "report": _cmd_report, "bench": _cmd_bench,
            "convert": _cmd_convert, "list": _cmd_list}

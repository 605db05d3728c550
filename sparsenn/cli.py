"""The ``sparsenn`` command: demo, run, prune, report, bench, convert, list.

Exit codes: 0 on success; 2 on bad usage, an invalid recipe or unusable input (a
missing file, a checkpoint that does not fit); 1 when something fails while running.
Errors print ``sparsenn: error: ...`` on stderr without a traceback
(``SPARSENN_DEBUG=1`` adds it). Progress bars go to stderr; ``--quiet`` (or
``SPARSENN_QUIET=1``) turns them off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any, Iterator

EXAMPLES = """examples:
  sparsenn demo                          dense, GMP 90%, RigL 90% on bundled digits; table + HTML report
  sparsenn run rigl                      run a bundled example recipe (sparsenn list shows them)
  sparsenn run my.yaml --set train.epochs=5
  sparsenn prune runs/magnitude/model.safetensors --sparsity 0.95 -o pruned.safetensors
  sparsenn report pruned.safetensors --format html --out pruned-report
  sparsenn convert pruned.safetensors -o pruned.sparse
  sparsenn bench --sparsities 0.9,0.99
  sparsenn list

Each command has its own --help. Exit codes: 0 ok, 2 bad usage or invalid recipe, 1 failure while running.
"""


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose to the terminal; keeps example lines (indented) and headings (ending in ':') as written.

    Descriptions and epilogs are not %-formatted (argparse only does that when they hold
    ``%(prog)``), so they use a plain ``%``; argument help strings, which are, need ``%%``.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                out.append(textwrap.fill(" ".join(prose), width, initial_indent=indent, subsequent_indent=indent))
                prose.clear()

        for line in text.splitlines():
            if line.strip() and not line[0].isspace() and not line.rstrip().endswith(":"):
                prose.append(line.strip())
                continue
            flush()
            out.append(indent + line if line.strip() else "")
        flush()
        return "\n".join(out)


class UsageError(Exception):
    """Bad arguments or unusable input: exit code 2."""


@contextlib.contextmanager
def _usage() -> Iterator[None]:
    """Errors raised inside are the user's (bad names, values, files): exit code 2."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        # str(KeyError("x")) is "'x'": use the message itself
        message = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
        raise UsageError(message) from e


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


def _kv(text: str) -> tuple[str, Any]:
    from .recipes.loader import _yaml_value

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, _yaml_value(value)


# ----------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars (also SPARSENN_QUIET=1)")
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="PyTorch intra-op threads (default: PyTorch's; the demo uses 1)")
    fmt = _HelpFormatter
    p = argparse.ArgumentParser(prog="sparsenn", description="Sparse neural networks on PyTorch.", epilog=EXAMPLES,
                                formatter_class=fmt, parents=[common])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, epilog="examples:\n" + examples,
                              formatter_class=fmt, parents=[common])

    demo = add("demo", "dense vs pruned vs RigL on bundled digits, with a table and an HTML report",
               "Train a LeNet-300-100-style MLP dense, prune a copy to 90% by gradual magnitude pruning, train "
               "another from scratch with RigL at 90%, convert both to the sparse runtime, print a table "
               "(accuracy, sparsity, bytes, latency vs dense) and write an HTML report. On scikit-learn's "
               "bundled 8x8 digits: no data files, under 2 minutes on 2 cores.",
               "  sparsenn demo\n  sparsenn demo --out /tmp/demo --sparsity 0.95\n"
               "  sparsenn demo --data mnist --data-dir /path/to/datasets\n")
    demo.add_argument("--data", choices=["digits", "mnist", "fashion_mnist"], default="digits",
                      help="dataset (default digits, bundled with scikit-learn)")
    demo.add_argument("--data-dir", help="folder with the IDX gzip files (for mnist, fashion_mnist)")
    demo.add_argument("--sparsity", type=_sparsity, default=0.9, help="target sparsity in [0, 1) (default 0.9)")
    demo.add_argument("--dense-epochs", type=int, help="dense training epochs (digits 30, MNIST 4)")
    demo.add_argument("--prune-epochs", type=int, help="gradual magnitude pruning epochs (digits 60, MNIST 8)")
    demo.add_argument("--rigl-epochs", type=int, help="RigL epochs (digits 90, MNIST 12)")
    demo.add_argument("--subset", type=int, help="use only the first N training images (smoke runs)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--out", default="sparsenn-demo", help="report folder (default ./sparsenn-demo)")
    demo.add_argument("--no-convert", action="store_true", help="skip the sparse runtime and latency")

    run = add("run", "run a recipe (YAML): model, data, sparsifier, training, outputs",
              "Validate a recipe, then run it: data, model, dense phase, sparsifier, sparse phase, then the "
              "outputs (checkpoint, text/Markdown/HTML report, optional conversion). RECIPE is a file or the "
              "name of a bundled example (sparsenn list). The whole recipe is checked before anything runs.",
              "  sparsenn run rigl\n  sparsenn run my.yaml --out runs/try1\n"
              "  sparsenn run my.yaml --set train.epochs=1 --set data.subset=500\n"
              "  sparsenn run my.yaml --check        validate only\n  sparsenn run --schema\n")
    run.add_argument("recipe", nargs="?", help="recipe file or bundled example name")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a recipe value (YAML), e.g. train.epochs=1; repeatable")
    run.add_argument("--out", help="output folder (overrides outputs.dir)")
    run.add_argument("--check", action="store_true", help="validate the recipe and its data/model, run nothing")
    run.add_argument("--schema", action="store_true", help="print the recipe schema and exit")

    prune = add("prune", "prune a checkpoint (or a recipe's model) to a sparsity; write a checkpoint",
                "One-shot pruning of a sparsenn checkpoint's model (or of a recipe's model after its dense "
                "phase) with any registered method, optionally fine-tuned, written as a new checkpoint. "
                "Already pruned weights stay pruned.",
                "  sparsenn prune runs/magnitude/model.safetensors --sparsity 0.95 -o p95.safetensors\n"
                "  sparsenn prune ckpt.safetensors --sparsity 0.9 --method snip --finetune-epochs 2 -o p.safetensors\n"
                "  sparsenn prune --recipe taylor --sparsity 0.8 -o taylor80.safetensors\n")
    prune.add_argument("checkpoint", nargs="?", help="a checkpoint written by sparsenn (run/prune)")
    prune.add_argument("--recipe", help="instead of a checkpoint: a recipe (file or bundled name)")
    prune.add_argument("--sparsity", type=_sparsity, required=True, help="target sparsity in [0, 1)")
    prune.add_argument("--method", help="a registered method (default: the recipe's, else magnitude)")
    prune.add_argument("--pattern", help="unstructured, N:M, blockHxW, channel, channel_in")
    prune.add_argument("--distribution", help="uniform, global, erk, er")
    prune.add_argument("--exclude", action="append", help="parameter names/globs to keep dense; repeatable")
    prune.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune after pruning (default 0)")
    prune.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="with --recipe: override a recipe value, e.g. data.subset=500; repeatable")
    _data_args(prune)
    _model_args(prune)
    prune.add_argument("-o", "--output", required=True, help="checkpoint to write (.safetensors)")

    rep = add("report", "per-layer report of a checkpoint: text, Markdown or HTML with plots",
              "Report a checkpoint's model: per-layer sparsity, MACs, bytes per format, dead units; as text "
              "(stdout), Markdown, or a self-contained HTML report with plots (accuracy vs sparsity, per-layer "
              "sparsity, mask heat maps, MACs and bytes per layer, and with --convert the inference speedup).",
              "  sparsenn report model.safetensors\n  sparsenn report model.safetensors --format markdown\n"
              "  sparsenn report model.safetensors --format html --out report/ --convert\n")
    rep.add_argument("checkpoint", help="a checkpoint written by sparsenn (run/prune), or any with --model")
    rep.add_argument("--format", choices=["text", "markdown", "html"], default="text",
                     help="text and markdown print to stdout (markdown with --out writes a folder); "
                          "html writes report.html + report.md (default text)")
    rep.add_argument("--out", help="folder for the HTML/Markdown report (default: CHECKPOINT-report)")
    rep.add_argument("--convert", action="store_true", help="also convert and time (speedup plot)")
    _data_args(rep)
    _model_args(rep)

    bench = add("bench", "latency of sparse vs dense inference, or a bench/ script of a source checkout",
                "Built in: prune a model by magnitude to each sparsity, convert it to the sparse runtime and "
                "time it against dense PyTorch at each batch size. With --script NAME: run "
                "bench/NAME.py of a source checkout (reproduce, sparse_training, objective, ...), passing the "
                "arguments after --.",
                "  sparsenn bench\n  sparsenn bench --model lenet5 --sparsities 0.9,0.99 --batch-sizes 1,256\n"
                "  sparsenn bench --script reproduce -- --quick\n")
    bench.add_argument("--model", default="lenet300100", help="registered model (default lenet300100)")
    bench.add_argument("--sparsities", type=_csv(float), default=(0.5, 0.8, 0.9, 0.95, 0.99), metavar="S,S,...",
                       help="comma-separated sparsities in [0, 1) (default 0.5,0.8,0.9,0.95,0.99)")
    bench.add_argument("--batch-sizes", type=_csv(int), default=(1, 64), metavar="B,B,...",
                       help="comma-separated batch sizes to time (default 1,64)")
    bench.add_argument("--script", help="run bench/SCRIPT.py of a source checkout instead")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for --script (after --)")

    conv = add("convert", "convert a checkpoint to the sparse runtime; save it and print the summary",
               "Convert a checkpoint's model to the sparse inference runtime (sparsenn.convert): each layer gets "
               "a format and kernel chosen by measurement; prints the conversion summary and the latency vs "
               "dense, and saves the converted model.",
               "  sparsenn convert model.safetensors -o model.sparse\n"
               "  sparsenn convert model.safetensors -o model.sparse --batch-sizes 1,32,256\n")
    conv.add_argument("checkpoint", help="a checkpoint written by sparsenn (run/prune), or any with --model")
    conv.add_argument("-o", "--output", required=True, help="where to save the converted model")
    conv.add_argument("--batch-sizes", type=_csv(int), default=(1, 64), metavar="B,B,...",
                      help="comma-separated batch sizes to time (default 1,64)")
    _data_args(conv)
    _model_args(conv)

    add("list", "list methods, patterns, distributions, schedules, models and bundled recipes",
        "List every registered name a recipe or the Python API accepts, and the bundled example recipes.",
        "  sparsenn list\n")
    return p


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=["digits", "mnist", "fashion_mnist"],
                   help="dataset for scores, fine-tuning and accuracy (default: the checkpoint's)")
    p.add_argument("--data-dir", help="folder with the IDX gzip files (mnist, fashion_mnist)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registered model name, for checkpoints not written by sparsenn")
    p.add_argument("--model-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="model constructor argument (with --model); repeatable")


# ----------------------------------------------------------------------------- commands


def _cmd_demo(args) -> int:
    from .demo import run_demo

    if args.data != "digits" and not args.data_dir:
        raise UsageError(f"--data {args.data} needs --data-dir DIR (the folder holding the IDX gzip files)")
    for name in ("dense_epochs", "prune_epochs", "rigl_epochs", "subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir: no folder {args.data_dir!r}")
    from .data import DatasetError

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
        prepared = prepare(recipe, source)
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
    from .data import make_loaders
    from .recipes.runner import build_data

    with _usage():
        train_set, test_set = build_data(spec, seed)
        return make_loaders(train_set, test_set, batch_size=spec.get("batch_size", 64), seed=seed)


def _cmd_prune(args) -> int:
    if (args.checkpoint is None) == (args.recipe is None):
        raise UsageError("prune needs either a CHECKPOINT or --recipe RECIPE (not both)")
    if args.finetune_epochs < 0:
        raise UsageError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.set and not args.recipe:
        raise UsageError("--set applies to --recipe only")
    return _prune_recipe(args) if args.recipe else _prune_checkpoint(args)


def _prune_recipe(args) -> int:
    from .methods import METHODS
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
        prepared = prepare(recipe, source)
    result = run_recipe(recipe, source=source, out_dir=Path(args.output).parent or Path("."),
                        progress=True, prepared=prepared, checkpoint_path=Path(args.output))
    print(f"pruned to {result.sparsity:.2%}, test accuracy {result.accuracy:.2%}: {args.output}")
    return 0


def _prune_checkpoint(args) -> int:
    from .checkpoint import save
    from .report import report
    from .sparsifier import Sparsifier
    from .train import evaluate, train

    model, meta = _load_checkpoint(args)
    spec = _data_spec(args, meta)
    seed = int(meta.get("seed", 0))
    train_loader, test_loader = _loaders(spec, seed)
    method = args.method or "magnitude"
    from .metrics import sparsity as measured_sparsity

    current = measured_sparsity(model)
    if args.sparsity < current - 1e-6:
        raise UsageError(f"--sparsity {args.sparsity:g} is below the checkpoint's sparsity {current:.4g}; "
                         f"prune only removes weights")
    with _usage():
        from .methods import METHODS

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
    from .html_report import RunSummary, write_report
    from .report import report
    from .train import evaluate

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
        from .inference import measure
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


def _cmd_convert(args) -> int:
    from .inference import measure, runtime_convert

    runtime_convert()  # fails early, naming what is missing
    model, meta = _load_checkpoint(args)
    spec = _data_spec(args, meta)
    _, test_loader = _loaders(spec, int(meta.get("seed", 0)))
    if test_loader is not None:
        example = next(iter(test_loader))[0]
    elif meta.get("input_shape"):
        import torch
        example = torch.rand(1, *meta["input_shape"])
    else:
        raise UsageError("the checkpoint does not record its input shape: pass --data NAME (and --data-dir DIR)")
    if any(b < 1 for b in args.batch_sizes) or not args.batch_sizes:
        raise UsageError(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
    measured = measure(model, example, batch_sizes=args.batch_sizes, progress=True)
    _print_conversion(measured)
    measured.save(args.output)
    print(f"converted model: {args.output}")
    return 0


def _print_conversion(m) -> None:
    if m.summary is not None:
        print(m.summary)
    print(f"weights: {m.dense_bytes / 1024:.1f} KiB dense -> {m.sparse_bytes / 1024:.1f} KiB stored ({m.formats})")


def _cmd_bench(args) -> int:
    if args.script:
        return _bench_script(args)
    if args.script_args:
        raise UsageError(f"arguments after -- are for --script: {' '.join(args.script_args)}")
    from .benchmark import builtin_bench

    with _usage():
        from .models import MODELS
        MODELS.get(args.model)
        bad = [s for s in args.sparsities if not 0 <= s < 1]
        if bad:
            raise ValueError(f"--sparsities must be in [0, 1), got {bad[0]:g}")
        if not args.batch_sizes or any(b < 1 for b in args.batch_sizes):
            raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
    builtin_bench(args.model, args.sparsities, args.batch_sizes, progress=True)
    return 0


def _bench_script(args) -> int:
    root = Path(__file__).resolve().parent.parent / "bench"
    if not root.is_dir():
        raise UsageError("--script needs a source checkout (a bench/ folder next to the sparsenn package); "
                         "without one, run the built-in benchmark: sparsenn bench")
    scripts = sorted(p.stem for p in root.glob("*.py"))
    if args.script not in scripts:
        raise UsageError(f"no bench script {args.script!r}; valid: {', '.join(scripts)}")
    extra = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    return subprocess.call([sys.executable, str(root / f"{args.script}.py"), *extra])


def _cmd_list(args) -> int:
    import sparsenn as sn
    from .models import list_models
    from .recipes import list_examples

    rows = [("methods", sn.list_methods()), ("patterns", sn.list_patterns()),
            ("distributions", sn.list_distributions()), ("schedules", sn.list_schedules()),
            ("models", list_models()), ("recipes", list_examples())]
    try:
        from .formats import list_formats
        rows.insert(4, ("formats", list_formats()))
    except ImportError:
        pass
    for what, names in rows:
        print(f"{what:<14} {', '.join(names)}")
    return 0


COMMANDS = {"demo": _cmd_demo, "run": _cmd_run, "prune": _cmd_prune, "report": _cmd_report, "bench": _cmd_bench,
            "convert": _cmd_convert, "list": _cmd_list}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # bad usage: argparse prints it and exits 2
    if args.command is None:
        parser.print_help()
        return 2
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        parser.error(f"--threads must be a positive integer, got {threads}")
    from .progress import set_quiet

    if getattr(args, "quiet", False):
        set_quiet(True)
    old_threads = _set_threads(threads if args.command != "demo" else None)  # the demo sets its own
    from .recipes.schema import RecipeError

    try:
        return COMMANDS[args.command](args)
    except (UsageError, RecipeError) as e:
        _error(str(e), e)
        return 2
    except KeyboardInterrupt:
        _error("interrupted", None)
        return 130
    except Exception as e:  # noqa: BLE001 - a failure while running: a message, not a traceback
        _error(f"{args.command} failed: {type(e).__name__}: {e}", e)
        return 1
    finally:
        if getattr(args, "quiet", False):
            set_quiet(None)
        _set_threads(old_threads)


def _set_threads(n: int | None) -> int | None:
    """Set PyTorch's intra-op threads to ``n`` (``None``: leave them); returns the previous count."""
    if n is None:
        return None
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def _error(message: str, exc: BaseException | None) -> None:
    if exc is not None and os.environ.get("SPARSENN_DEBUG"):
        traceback.print_exception(exc)
    lines = message.splitlines() or [""]
    print(f"sparsenn: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"sparsenn: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

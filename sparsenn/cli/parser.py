"""The ``sparsenn`` command's argument parser: subcommands, their options, help texts and examples."""

from __future__ import annotations

import argparse
import contextlib
import textwrap
from typing import Any, Iterator

from .recipes.bounds import MAX_BATCH_SIZE, MAX_EPOCHS, MAX_SAMPLES, MAX_SEED, MAX_THREADS

EXAMPLES = """examples:
  sparsenn demo                          dense, GMP 90%, RigL 90% on bundled digits; table + HTML report
  sparsenn run rigl                      run a bundled example recipe (sparsenn list shows them)
  sparsenn run my.yaml --set train.epochs=5
  sparsenn prune runs/magnitude/model.safetensors --sparsity 0.95 -o pruned.safetensors
  sparsenn oneshot ./hf-model --method wanda --sparsity 0.5 --calibration text.txt --out ./hf-model-50
  sparsenn report pruned.safetensors --format html --out pruned-report
  sparsenn convert pruned.safetensors -o pruned.sparse
  sparsenn compress pruned.safetensors -o pruned.sparsenn   Deep Compression into a safe archive
  sparsenn export pruned.safetensors -o pruned.onnx         ONNX with sparse initializers
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


def _int_in(low: int, high: int):
    """An argparse type: an integer in ``[low, high]`` (the bounds of :mod:`.recipes.schema`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {value}")
        return value
    parse.__name__ = "int"
    return parse


def _batch_sizes(text: str) -> tuple[int, ...]:
    values = _csv(int)(text)
    bad = [b for b in values if not 1 <= b <= MAX_BATCH_SIZE]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"every value must be an integer in [1, {MAX_BATCH_SIZE}], got "
                                         f"{bad[0] if bad else text!r}")
    return values


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


def _sparsity01(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _kv(text: str) -> tuple[str, Any]:
    from .recipes.loader import _yaml_value
    from .recipes.safe_yaml import YamlLimitError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, _yaml_value(value)
    except YamlLimitError as e:
        raise argparse.ArgumentTypeError(f"{key}: {e}") from None


# ----------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars (also SPARSENN_QUIET=1)")
    common.add_argument("--threads", type=_int_in(1, MAX_THREADS), default=argparse.SUPPRESS, metavar="N",
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
    demo.add_argument("--dense-epochs", type=_int_in(1, MAX_EPOCHS), help="dense training epochs (digits 30, MNIST 4)")
    demo.add_argument("--prune-epochs", type=_int_in(1, MAX_EPOCHS), help="gradual magnitude pruning epochs (digits 60, MNIST 8)")
    demo.add_argument("--rigl-epochs", type=_int_in(1, MAX_EPOCHS), help="RigL epochs (digits 90, MNIST 12)")
    demo.add_argument("--subset", type=_int_in(1, MAX_SAMPLES), help="use only the first N training images (smoke runs)")
    demo.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, help="random seed (default 0)")
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
    prune.add_argument("--finetune-epochs", type=_int_in(0, MAX_EPOCHS), default=0, help="fine-tune after pruning (default 0)")
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
    bench.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 64), metavar="B,B,...",
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
    conv.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 64), metavar="B,B,...",
                      help="comma-separated batch sizes to time (default 1,64)")
    _data_args(conv)
    _model_args(conv)

    one = add("oneshot", "one-shot pruning of a Hugging Face model folder from calibration text",
              "Prune the Linear layers inside a transformers model's blocks without training (sparsenn.oneshot): "
              "magnitude, Wanda or SparseGPT, unstructured or N:M, from calibration windows of a text file; "
              "writes a model folder that transformers loads (exact zeros) plus the masks and a per-layer "
              "report (sparsenn_oneshot.json). --eval prints the perplexity before and after. --stream "
              "never loads the whole model: one block's weights at a time from its safetensors files "
              "(sparsenn.oneshot_streaming), for models larger than memory.",
              "  sparsenn oneshot ./smollm2 --method wanda --sparsity 0.5 --calibration calib.txt --out ./smollm2-50\n"
              "  sparsenn oneshot ./smollm2 --method sparsegpt --pattern 2:4 --calibration calib.txt --out ./s24 "
              "--eval eval.txt\n")
    one.add_argument("model_dir", help="a transformers model folder (config.json, weights, tokenizer)")
    one.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default="sparsegpt",
                     help="default sparsegpt")
    one.add_argument("--sparsity", type=_sparsity, default=0.5, help="target sparsity in [0, 1) (default 0.5)")
    one.add_argument("--pattern", default="unstructured", help="unstructured (default), per_row, 2:4, 4:8, any N:M")
    one.add_argument("--distribution", choices=["uniform", "owl", "erk", "er"], default="uniform",
                     help="per-layer sparsities (default uniform; owl: by outliers, Yin et al. 2024)")
    one.add_argument("--refit", action="store_true", help="re-fit the kept weights by least squares")
    one.add_argument("--permute", action="store_true",
                     help="N:M only: permute MLP input channels so the mask keeps more (RIA)")
    one.add_argument("--calibration", required=True, help="UTF-8 text file for calibration windows")
    one.add_argument("--samples", type=_int_in(1, 100_000), default=128, help="calibration windows (default 128)")
    one.add_argument("--length", type=_int_in(2, 1_000_000), default=512, help="tokens per window (default 512)")
    one.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, help="window offsets' seed (default 0)")
    one.add_argument("--blocks", help="dotted name of the block list if not found (e.g. model.layers)")
    one.add_argument("--exclude", action="append", help="substring of Linear names to keep dense; repeatable")
    one.add_argument("--eval", help="text file: print the perplexity before and after (causal models)")
    one.add_argument("--eval-tokens", type=_int_in(2, 100_000_000), default=32768, help="default 32768")
    one.add_argument("--window", type=_int_in(2, 1_000_000), default=512, help="perplexity window (default 512)")
    one.add_argument("--out", required=True, help="folder to write the pruned model to")
    one.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    one.add_argument("--stream", action="store_true",
                     help="load, prune and write one block at a time (models larger than memory; no --eval)")

    comp = add("compress", "Deep Compression of a pruned model into a .sparsenn archive; bytes per stage",
               "Compress a pruned model (a sparsenn checkpoint, or a Hugging Face model folder such as sparsenn "
               "oneshot writes) into a sparse archive (sparsenn.archive: safetensors + a JSON manifest, no pickle). "
               "By default Deep Compression (Han et al. 2016): per-layer weight sharing by k-means (optionally "
               "fine-tuned on the checkpoint's data), Huffman-coded cluster and relative indices; --lossless keeps "
               "the weights exactly (bitmask / N:M / dense per tensor, whichever is smallest). Prints the bytes per "
               "stage: dense, pruned CSR, shared weights, Huffman, and the archive file.",
               "  sparsenn compress p95.safetensors -o p95.sparsenn\n"
               "  sparsenn compress p95.safetensors -o p95.sparsenn --fc-bits 5 --conv-bits 8 --finetune-epochs 2\n"
               "  sparsenn compress ./smollm2-50 -o smollm2-50.sparsenn --lossless\n"
               "  python -c \"import sparsenn as sn; m = sn.archive.load('p95.sparsenn')\"\n")
    comp.add_argument("source", help="a sparsenn checkpoint, or a Hugging Face model folder (config.json)")
    comp.add_argument("-o", "--output", required=True, help="archive to write (.sparsenn file, or a folder)")
    comp.add_argument("--lossless", action="store_true", help="no weight sharing: the weights exactly")
    comp.add_argument("--fc-bits", type=_int_in(1, 16), default=5, help="cluster-index bits of Linear layers (default 5)")
    comp.add_argument("--conv-bits", type=_int_in(1, 16), default=8, help="cluster-index bits of convolutions (default 8)")
    comp.add_argument("--fc-index-bits", type=_int_in(1, 16), default=5,
                      help="relative-index bits of Linear layers (default 5)")
    comp.add_argument("--conv-index-bits", type=_int_in(1, 16), default=8,
                      help="relative-index bits of convolutions (default 8)")
    comp.add_argument("--finetune-epochs", type=_int_in(0, MAX_EPOCHS), default=0,
                      help="fine-tune the shared centroids on the data (default 0)")
    comp.add_argument("--lr", type=float, default=1e-3, help="centroid fine-tuning learning rate (default 1e-3)")
    comp.add_argument("--seq-len", type=_int_in(1, 1_000_000), default=16, help=argparse.SUPPRESS)
    _data_args(comp)
    _model_args(comp)

    exp = add("export", "export a pruned model to ONNX with sparse initializers",
              "Export a pruned model (a sparsenn checkpoint, or a Hugging Face model folder) to ONNX "
              "(sparsenn.export_onnx): weights with at least --min-sparsity zeros are stored as sparse "
              "initializers (COO), the file is checked with onnx.checker. ONNX Runtime densifies sparse "
              "initializers when it loads the model: the gain is the file size. --dense writes plain "
              "initializers for tools that do not read sparse ones.",
              "  sparsenn export p95.safetensors -o p95.onnx\n"
              "  sparsenn export p95.safetensors -o p95.onnx --dense --opset 13\n"
              "  sparsenn export ./smollm2-50 -o smollm2-50.onnx --seq-len 32\n")
    exp.add_argument("source", help="a sparsenn checkpoint, or a Hugging Face model folder (config.json)")
    exp.add_argument("-o", "--output", required=True, help="ONNX file to write")
    exp.add_argument("--dense", action="store_true", help="plain dense initializers (the fallback)")
    exp.add_argument("--min-sparsity", type=_sparsity01, default=0.5,
                     help="fraction of zeros from which a weight is stored sparse (default 0.5)")
    exp.add_argument("--opset", type=_int_in(9, 20), default=17, help="ONNX opset (default 17)")
    exp.add_argument("--seq-len", type=_int_in(1, 1_000_000), default=16,
                     help="Hugging Face models: tokens in the example input (default 16; the axis stays dynamic "
                          "only for the batch)")
    _data_args(exp)
    _model_args(exp)

    add("list", "list methods, patterns, distributions, schedules, models and bundled recipes",
        "List every registered name a recipe or the Python API accepts, and the bundled example recipes.",
        "  sparsenn list\n")
    return p


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=["digits", "mnist", "fashion_mnist"],
                   help="dataset for scores, fine-tuning and accuracy (default: the checkpoint's)")
    p.add_argument("--data-dir", help="folder with the IDX gzip files (mnist, fashion_mnist)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME|MODULE:FACTORY",
                   help="the checkpoint's model: a registered name (sparsenn list), or your own as "
                        "package.module:function returning an nn.Module, imported from sys.path (the working "
                        "folder, PYTHONPATH); needed for checkpoints not written by sparsenn and for those of a "
                        "user's model. A Hugging Face model folder comes later, with the transformer support.")
    p.add_argument("--model-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="argument of the model's constructor or factory (with --model); repeatable")

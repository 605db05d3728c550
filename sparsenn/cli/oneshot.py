"""``sparsenn oneshot MODEL_DIR``: one-shot pruning of a Hugging Face model folder, written as a folder
that ``transformers`` loads (exact zeros) and ``sparsenn.from_pretrained`` loads with its masks."""

from __future__ import annotations

import json
from pathlib import Path

from .parser import UsageError


def _check_folder(model_dir: str) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        what = "not a folder" if path.exists() else "no such folder"
        raise UsageError(f"{model_dir}: {what} (expected a Hugging Face model folder with config.json)")
    if not (path / "config.json").is_file():
        raise UsageError(f"{model_dir}: not a transformers model folder (no config.json)")
    return path


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("sparsenn oneshot needs transformers: pip install 'sparsenn[hf]'") from None
    return transformers


def _calibration(tokenizer, args):
    """The calibration batches of --calibration (--samples windows of --length tokens, --seed)."""
    from ..data.text import TextError, calibration_batches

    try:
        return calibration_batches(tokenizer, Path(args.calibration), samples=args.samples, length=args.length,
                                   seed=args.seed)
    except TextError as e:
        raise UsageError(str(e)) from None


def model_class(model_dir: str):
    """``(folder, transformers Auto class, causal)`` of a model folder: AutoModelForCausalLM when its
    config's architectures name a causal LM, else AutoModel."""
    path = _check_folder(model_dir)
    transformers = _transformers()
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{model_dir}/config.json: not readable JSON ({e})") from None
    causal = any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])
    return path, transformers.AutoModelForCausalLM if causal else transformers.AutoModel, causal


def _load(model_dir: str):
    path, cls, causal = model_class(model_dir)
    transformers = _transformers()
    try:
        model = cls.from_pretrained(path, dtype="float32")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{model_dir}: transformers cannot load it ({type(e).__name__}: {e})") from None
    return model.eval(), tokenizer, causal


def cmd_oneshot(args) -> int:
    from ..create.oneshot import OneShotError, oneshot
    from ..data.text import TextError, read_text, tokenize
    from ..report.language import perplexity
    from ..train.pretrained import save_pretrained

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{args.out}: the folder exists and is not empty (pass --force to write into it)")
    if args.stream:
        return _stream(args)
    model, tokenizer, causal = _load(args.model_dir)
    calibration = _calibration(tokenizer, args)
    try:
        evaluation = tokenize(tokenizer, read_text(Path(args.eval)))[:args.eval_tokens] if args.eval else None
    except TextError as e:
        raise UsageError(str(e)) from None
    if evaluation is not None and not causal:
        raise UsageError("--eval measures perplexity, which needs a causal language model (…ForCausalLM)")
    before = perplexity(model, evaluation, window=args.window, stride=args.window) if evaluation is not None \
        else None
    try:
        oneshot(model, args.method, args.sparsity, args.pattern, calibration, distribution=args.distribution,
                refit=args.refit, permute=args.permute, blocks=args.blocks, exclude=args.exclude or (),
                progress=True)
    except OneShotError as e:
        raise UsageError(str(e)) from None
    print(model.oneshot_report.table())
    if before is not None:
        after = perplexity(model, evaluation, window=args.window, stride=args.window)
        print(f"perplexity on {evaluation.numel()} tokens of {args.eval}: {before:.3f} dense -> {after:.3f} pruned "
              f"({after / before:.3f}x)")
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, out)
    tokenizer.save_pretrained(out)
    (out / "sparsenn_oneshot.json").write_text(json.dumps(model.oneshot_report.to_dict(), indent=1))
    print(f"pruned model: {out} (transformers loads it with exact zeros; sparsenn.from_pretrained re-attaches "
          "the masks)")
    return 0


def _stream(args) -> int:
    """--stream: the model is never loaded whole; the tokenizer is."""
    from ..create.oneshot import OneShotError, oneshot_streaming

    if args.eval:
        raise UsageError("--eval needs the whole model in memory, which --stream avoids; evaluate the --out folder "
                         "afterwards")
    path = _check_folder(args.model_dir)
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{args.model_dir}: transformers cannot load its tokenizer ({type(e).__name__}: {e})") \
            from None
    calibration = _calibration(tokenizer, args)
    try:
        report = oneshot_streaming(path, args.out, args.method, args.sparsity, args.pattern, calibration,
                                   distribution=args.distribution, refit=args.refit, permute=args.permute,
                                   blocks=args.blocks, exclude=args.exclude or (), progress=True, force=args.force)
    except OneShotError as e:
        raise UsageError(str(e)) from None
    print(report.table())
    print(f"pruned model: {args.out} (transformers loads it with exact zeros; written one block at a time)")
    return 0

"""``sparsenn compress`` and ``sparsenn export``: a pruned model made small on disk, or written for other tools.

Both take a sparsenn checkpoint (``sparsenn run``/``prune``; ``--model`` for others) or a
Hugging Face model folder (``sparsenn oneshot``'s output; masks re-attached from
``sparsenn_masks.safetensors`` when present).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .parser import UsageError, _usage


def _hf_folder(source: str) -> bool:
    path = Path(source)
    return path.is_dir() and (path / "config.json").is_file()


def _load_hf(source: str, seq_len: int):
    """A transformers model folder: the model (masks re-attached) and example token ids."""
    import torch

    from ..train.pretrained import from_pretrained
    from .oneshot import model_class

    path, cls, _ = model_class(source)
    try:
        model = from_pretrained(cls, path, dtype="float32").eval()
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{source}: transformers cannot load it ({type(e).__name__}: {e})") from None
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise UsageError(f"{source}: its config has no vocab_size to make example token ids from")
    ids = (torch.arange(seq_len) * 7919 % vocab).view(1, seq_len)  # any valid tokens: only shapes matter
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _source(args) -> tuple[Any, Any, tuple[Any, Any]]:
    """``(model, example input, (train loader, test loader))`` of ``args.source``: a Hugging Face folder
    (no loaders) or a sparsenn checkpoint (its data, or --data; ``None`` where there is none)."""
    if _hf_folder(args.source):
        if args.model or args.model_arg:
            raise UsageError("--model / --model-arg apply to checkpoints, not to a Hugging Face model folder")
        model, example = _load_hf(args.source, args.seq_len)
        return model, example, (None, None)
    if not Path(args.source).is_file():
        raise UsageError(f"{args.source}: no such checkpoint file or Hugging Face model folder")
    from .commands import _data_spec, _example_input, _load_checkpoint, _loaders

    args.checkpoint = args.source  # what the checkpoint helpers read
    model, meta = _load_checkpoint(args)
    loaders = _loaders(_data_spec(args, meta), int(meta.get("seed", 0)))
    return model.eval(), _example_input(meta, loaders[1])[:1], loaders


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def cmd_export(args) -> int:
    from ..compress.onnx_export import export_onnx

    model, example, _ = _source(args)
    import warnings

    import torch

    with _usage(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the tracer's notes on input checks in forward
        report = export_onnx(model, example, args.output, sparse_initializers=not args.dense,
                             opset=args.opset, min_sparsity=args.min_sparsity)
    kind = "dense initializers" if args.dense else f"{len(report.sparse)} sparse initializers"
    print(f"ONNX model: {report.path} ({_kib(report.file_bytes)}; dense export {_kib(report.dense_file_bytes)}; "
          f"{kind}; opset {report.opset})")
    print(f"inputs: {', '.join(report.input_names)}; outputs: {', '.join(report.output_names)}")
    if not args.dense:
        print("ONNX Runtime densifies sparse initializers when it loads the model: the gain is file size, not speed")
    return 0


def _accuracy(model, loader) -> float | None:
    if loader is None:
        return None
    from ..train.loop import evaluate

    return evaluate(model, loader)


def cmd_compress(args) -> int:
    from ..compress import archive
    from ..compress.deep_compression import STAGE_TITLES, deep_compress

    model, _, (train_loader, test_loader) = _source(args)
    if args.finetune_epochs and train_loader is None:
        raise UsageError("--finetune-epochs needs training data: pass --data NAME (and --data-dir DIR)")
    if args.lossless:
        written = archive.save(args.output, model)
        dense = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if not n.endswith("_mask"))
        size = _file_bytes(written)
        print(f"archive: {written} ({_kib(size)}; the dense tensors {_kib(dense)}: {dense / size:.1f}x smaller)")
        return 0
    with _usage():
        fine_tune = ({"loader": train_loader, "epochs": args.finetune_epochs, "lr": args.lr, "progress": True}
                     if args.finetune_epochs else None)
        result = deep_compress(model, bits={"fc": args.fc_bits, "conv": args.conv_bits},
                               index_bits={"fc": args.fc_index_bits, "conv": args.conv_index_bits},
                               fine_tune=fine_tune)
    plan = {name: ("deep", {"bits": p.bits, "index_bits": p.index_bits}) for name, p in result.plans.items()}
    written = archive.save(args.output, result.model, codec=plan)
    rows = [(STAGE_TITLES[r["stage"]], r["bytes"], r["ratio"]) for r in result.report()]
    size = _file_bytes(written)
    rows.append(("archive file (+ manifest, masks)", size, result.bytes("dense") / size))
    width = max(len(r[0]) for r in rows)
    print(f"{'stage':<{width}}  {'bytes':>12}  ratio")
    for title, n, ratio in rows:
        print(f"{title:<{width}}  {n:>12,}  {ratio:5.1f}x")
    before, after = _accuracy(model, test_loader), _accuracy(result.model, test_loader)
    if before is not None:
        print(f"test accuracy: {before:.4f} pruned -> {after:.4f} shared weights")
    print(f"archive: {written} (load it with sparsenn.archive.load)")
    return 0


def _file_bytes(path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size

"""Streaming one-shot pruning: a model folder larger than memory, one block's weights at a time.

``oneshot_streaming(model_dir, out_dir, ...)`` builds the model's skeleton with empty (meta)
parameters, loads from the safetensors files only what lies outside the blocks (embeddings,
norms, head) and, for each block in turn, its weights; runs the same pipeline as
:func:`~sparsenn.create.oneshot.oneshot` (calibration inputs captured at the first block, each
block pruned from its inputs' statistics, the pruned block's outputs feeding the next); writes
the pruned block to its own shard of ``out_dir`` and frees it. Resident: the non-block weights,
one block, the calibration hidden states and one block's statistics.

``out_dir`` becomes a model folder that ``transformers`` loads (sharded safetensors with an
index, the source folder's config and tokenizer files). The masks are the exact zeros (there is
no model in memory to attach them to). On any error the partial shards are removed and
``out_dir`` holds nothing new; the source folder is only read.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ...core.masks import remove_masks
from .blocks import OneShotError, find_blocks
from .pipeline import BlockHooks, OneShotReport, oneshot, run_oneshot

__all__ = ["oneshot_streaming"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class _Checkpoint:
    """The tensors of a safetensors model folder (one file or shards with an index): names, files, shapes
    and dtypes read from the headers first; tensors read on demand, each file opened (memory-mapped) only
    for the read, so that no page of it stays mapped into the process."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX).is_file():
            try:
                index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
                weight_map = index["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise OneShotError(f"{folder / INDEX}: not a safetensors index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise OneShotError(f"{folder / INDEX}: weight_map must map tensor names to file names")
            files = sorted(set(weight_map.values()))
        elif (folder / WEIGHTS).is_file():
            files = [WEIGHTS]
        else:
            raise OneShotError(f"{folder}: no {WEIGHTS} or {INDEX} (streaming reads safetensors weights)")
        self.where: dict[str, str] = {}
        self._header: dict[str, tuple[tuple[int, ...], str]] = {}
        for name in files:
            path = folder / name
            if Path(name).name != name or not path.is_file():
                raise OneShotError(f"{folder}: the index names {name!r}, which is not a file in the folder")
            try:
                with self._open(name) as handle:
                    for key in handle.keys():
                        piece = handle.get_slice(key)
                        self.where[key] = name
                        self._header[key] = (tuple(piece.get_shape()), piece.get_dtype())
            except OneShotError:
                raise
            except Exception as e:  # a corrupt header, from safetensors
                raise OneShotError(f"{path}: not a readable safetensors file ({e})") from None

    def _open(self, name: str):
        from safetensors import safe_open

        return safe_open(str(self.folder / name), framework="pt")

    def shape(self, name: str) -> tuple[int, ...]:
        return self._header[name][0]

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's dtype in the file (None: one torch has no name for)."""
        return _DTYPES.get(self._header[name][1])

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (copies: nothing refers to the files afterwards)."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with self._open(file) as handle:
                for k in keys:
                    out[k] = handle.get_tensor(k).clone()
        return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _model_class(config: Any, model_class: Any):
    import transformers

    if model_class is not None:
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    return transformers.AutoModel.from_config  # no architecture named: the base model


def _skeleton(model_dir: Path, dtype: torch.dtype, model_class: Any) -> nn.Module:
    """The model with every parameter on the meta device (no memory), buffers real."""
    try:
        import transformers
        from accelerate import init_empty_weights
    except ImportError:
        raise OneShotError("streaming needs transformers and accelerate: pip install 'sparsenn[hf]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise OneShotError(f"{model_dir}: not a transformers model folder ({type(e).__name__}: {e})") from None
    with init_empty_weights(include_buffers=False):
        model = _model_class(config, model_class)(config)
    return model.eval()


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of parameter or buffer ``name`` (a meta placeholder or a real tensor)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[attr] = value


def _tie(model: nn.Module, loaded: set[str]) -> None:
    """Tied parameters absent from the files (an LM head tied to the embedding) share the loaded tensor."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in dict(tied).items():
        if target not in loaded and source in loaded:
            owner, _, attr = target.rpartition(".")
            src_owner, _, src_attr = source.rpartition(".")
            model.get_submodule(owner)._parameters[attr] = model.get_submodule(src_owner)._parameters[src_attr]


class _Stream(BlockHooks):
    """Loads block ``i``'s tensors before it runs; after it is pruned writes them to a shard and frees them."""

    def __init__(self, model: nn.Module, ckpt: _Checkpoint, path: str, dtype: torch.dtype, out: Path, total: int):
        self.model, self.ckpt, self.path, self.dtype, self.out, self.total = model, ckpt, path, dtype, out, total
        self.weight_map: dict[str, str] = {}
        self.written: list[Path] = []
        self.resident = 0  # blocks whose weights are in memory now (at most one)

    def _names(self, index: int, block: nn.Module) -> dict[str, str]:
        prefix = f"{self.path}.{index}."
        return {rel: prefix + rel for rel in block.state_dict(keep_vars=True)}

    def load(self, index: int, block: nn.Module) -> None:
        for full, tensor in self.ckpt.read(list(self._names(index, block).values())).items():
            _set(self.model, full, _cast(tensor, self.dtype))
        self.resident += 1

    def release(self, index: int, block: nn.Module, pruned: bool) -> None:
        if pruned:
            from safetensors.torch import save_file

            remove_masks(block)  # the weights keep their exact zeros
            state = block.state_dict()
            tensors = {full: _cast(state[rel], self.ckpt.dtype(full)).contiguous()
                       for rel, full in self._names(index, block).items()}
            name = f"model-{index + 1:05d}-of-{self.total:05d}.safetensors"
            save_file(tensors, str(self.out / name), metadata={"format": "pt"})
            self.written.append(self.out / name)
            self.weight_map.update({k: name for k in tensors})
        block.to("meta")  # frees the block's weights
        self.resident -= 1

    def partial(self, path: str, first: int, last: int) -> str:
        return f" The source folder is unchanged; nothing was written to {self.out} (blocks {first}-{last} of " \
               f"{path} had been pruned)."


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@torch.no_grad()
def oneshot_streaming(model_dir: str | Path, out_dir: str | Path, method: str = "sparsegpt", sparsity: float = 0.5,
                      pattern: str = "unstructured", calibration: Iterable[Any] | None = None, *,
                      dtype: torch.dtype = torch.float32, model_class: Any = None, force: bool = False,
                      **options: Any) -> OneShotReport:
    """Prune the model in ``model_dir`` (a ``transformers`` folder with safetensors weights) block by block
    without ever holding all its blocks, writing the pruned model to ``out_dir``; returns the report.

    ``method``, ``sparsity``, ``pattern``, ``calibration`` and ``**options`` (``distribution``,
    ``refit``, ``permute``, ``blocks``, ``exclude``, ``damp``, ...) are those of
    :func:`~sparsenn.create.oneshot.oneshot`, which this equals on the same data. ``dtype``: the
    compute precision (weights are written back in the files' own dtype). ``model_class``: the
    ``transformers`` class to build (default: the config's first architecture). ``force``: write
    into a non-empty ``out_dir``.
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise OneShotError(f"{model_dir}: not a transformers model folder (no config.json)")
    if out.resolve() == model_dir.resolve():
        raise OneShotError(f"out_dir {out} is the source folder; write the pruned model elsewhere")
    if out.exists() and any(out.iterdir()) and not force:
        raise OneShotError(f"{out}: the folder exists and is not empty (force=True writes into it)")
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise OneShotError(f"oneshot_streaming got unknown options {unknown}; valid: {', '.join(sorted(_OPTIONS))}")
    ckpt = _Checkpoint(model_dir)
    model = _skeleton(model_dir, dtype, model_class)
    path, blocks = find_blocks(model, options.get("blocks"))
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    outside = [k for k in expected if not k.startswith(path + ".")]
    missing = [k for k in expected if k not in ckpt.where and k not in _tied_targets(model)
               and not _non_persistent(model, k)]
    wrong = [f"{k} {ckpt.shape(k)} (the model expects {expected[k]})" for k in expected
             if k in ckpt.where and ckpt.shape(k) != expected[k]]
    if missing or wrong:
        raise OneShotError(f"{model_dir}: the weights do not fit {type(model).__name__}: "
                           + "; ".join(([f"missing {', '.join(missing[:5])}"] if missing else [])
                                       + ([f"shape of {', '.join(wrong[:5])}"] if wrong else [])))
    loaded = set()
    for k, tensor in ckpt.read([k for k in outside if k in ckpt.where]).items():
        _set(model, k, _cast(tensor, dtype))
        loaded.add(k)
    _tie(model, loaded)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stream = _Stream(model, ckpt, path, dtype, out, len(blocks) + 1)
    try:
        run_oneshot(model, method, sparsity, pattern, calibration, hooks=stream, **{**_DEFAULTS, **options})
        _finish(model, ckpt, model_dir, out, stream, loaded, len(blocks) + 1)
    except BaseException:
        for f in stream.written:
            f.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return model.oneshot_report


def _tied_targets(model: nn.Module) -> set[str]:
    return set((getattr(model, "all_tied_weights_keys", None) or {}).keys())


def _non_persistent(model: nn.Module, key: str) -> bool:
    owner, _, attr = key.rpartition(".")
    return attr in model.get_submodule(owner)._non_persistent_buffers_set


def _finish(model: nn.Module, ckpt: _Checkpoint, model_dir: Path, out: Path, stream: _Stream, loaded: set[str],
            total: int) -> None:
    """The non-block shard, the index, the config/tokenizer files and the report."""
    from safetensors.torch import save_file

    state = model.state_dict(keep_vars=True)
    rest = {k: _cast(state[k].detach(), ckpt.dtype(k)).contiguous() for k in sorted(loaded)}
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file(rest, str(out / name), metadata={"format": "pt"})
    stream.written.append(out / name)
    stream.weight_map.update({k: name for k in rest})
    size = sum((out / f).stat().st_size for f in set(stream.weight_map.values()))
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": stream.weight_map},
                                        indent=1))
    stream.written.append(out / INDEX)
    for f in model_dir.iterdir():  # config, generation config, tokenizer: everything but the weights
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")) and f.name != INDEX:
            shutil.copyfile(f, out / f.name)
            stream.written.append(out / f.name)
    (out / "sparsenn_oneshot.json").write_text(json.dumps(model.oneshot_report.to_dict(), indent=1))


#: oneshot's keyword-only options and their defaults
_DEFAULTS = {k: p.default for k, p in inspect.signature(oneshot).parameters.items() if p.kind is p.KEYWORD_ONLY}
_OPTIONS = set(_DEFAULTS)

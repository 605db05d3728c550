"""``sn.export_onnx``: a pruned model -> an ONNX file whose sparse weights are ``sparse_initializer``s.

Steps (the model passed in is never changed):

1. A deep copy in eval mode, made plain: ``torch.nn.utils.prune`` reparametrizations and
   torch parametrizations are resolved into ordinary parameters (the effective weight),
   sparsenn's mask buffers removed (:func:`sparsenn.core.masks.remove_masks`, which writes
   exact zeros first), so no ``*_mask`` tensor becomes an input or initializer; a
   ``transformers`` config gets ``use_cache=False`` (no key-value cache objects as outputs).
2. ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter: it needs nothing but
   ``onnx`` (the dynamo exporter also needs ``onnxscript``) and exports MLPs, CNNs and
   ``transformers`` models alike. The copy is called through a small wrapper that takes
   the example inputs positionally (keyword inputs by name) and returns the outputs as a
   flat tuple, named by their keys (``logits``) or position; the batch axis (dimension 0
   of every input, and of every output whose first dimension is the batch) is dynamic
   unless ``dynamic_batch=False``. The exporter folds constants, so a weight may be stored
   transposed (``onnx::MatMul_12`` holding W^T): its zeros are the same.
3. :func:`sparsenn.compress.onnx_sparse.sparsify_initializers` moves every float
   initializer with at least ``min_sparsity`` zeros, where that is smaller, into
   ``graph.sparse_initializer`` (see that module for the format and what ONNX Runtime does).
4. ``onnx.checker.check_model``, then an atomic write (:func:`sparsenn.train.atomic.atomic_write`).

ONNX Runtime densifies sparse initializers when it creates a session: the gain is the
file (download, storage), not memory or speed. Files over protobuf's 2 GiB limit (which
would need ONNX external data) are not supported: a larger model is refused before export.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..core.checks import sparsity as _fraction
from ..core.plain import plain_copy
from ..train.atomic import atomic_write
from .onnx_sparse import SparseInitializer, sparsify_initializers

__all__ = ["DEFAULT_OPSET", "OPSETS", "PROTOBUF_LIMIT", "OnnxExportReport", "export_onnx"]

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; ONNX Runtime >= 1.11 runs it
OPSETS = range(9, 21)  # what the TorchScript exporter writes (torch.onnx._constants: 9 .. 20)
PROTOBUF_LIMIT = 2**31 - 1  # the largest serialized protobuf message: one ONNX file without external data
_WRAPPED = "model"  # the wrapper's attribute holding the copy; stripped from initializer names again


@dataclass(frozen=True)
class OnnxExportReport:
    """What :func:`export_onnx` wrote: the file, its size, the dense file's size, the sparse initializers."""

    path: Path
    file_bytes: int
    dense_file_bytes: int
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    sparse: tuple[SparseInitializer, ...]

    @property
    def num_sparse_initializers(self) -> int:
        return len(self.sparse)

    @property
    def compression(self) -> float:
        """Dense file bytes / this file's bytes."""
        return self.dense_file_bytes / self.file_bytes

    def __str__(self) -> str:
        lines = [(f"{self.path}: {self.file_bytes:,} bytes (dense export {self.dense_file_bytes:,} bytes, "
                 f"{self.compression:.2f}x), opset {self.opset}, {self.num_sparse_initializers} sparse initializers")]
        lines += [f"  {s.name}  {'x'.join(map(str, s.shape))}  {s.dtype}  nnz {s.nnz:,} ({s.sparsity:.1%} zeros)"
                  for s in self.sparse]
        return "\n".join(lines)


# -- arguments ----------------------------------------------------------------------------------------------


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"path {str(out)!r} is a folder; give the file to write, e.g. {str(out / 'model.onnx')!r}")
    if not out.parent.is_dir():
        raise ValueError(f"path {str(out)!r}: its folder {str(out.parent)!r} does not exist")
    return out


def _split_inputs(example_inputs: object) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """The example tensors in order, and their keyword names (``None``: positional)."""
    valid = "a tensor, a tuple/list of tensors, or a dict of keyword tensors ({'input_ids': ..., 'attention_mask': ...})"
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), None
    if isinstance(example_inputs, (tuple, list)):
        items, keys = tuple(example_inputs), None
    elif isinstance(example_inputs, Mapping):
        bad_keys = [k for k in example_inputs if not isinstance(k, str) or not k.isidentifier()]
        if bad_keys:
            raise TypeError(f"example_inputs keys must be argument names, got {bad_keys[0]!r}")
        keys, items = tuple(example_inputs), tuple(example_inputs.values())
    else:
        raise TypeError(f"example_inputs must be {valid}; got {type(example_inputs).__name__}")
    if not items:
        raise ValueError(f"example_inputs is empty; pass {valid}")
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            where = repr(keys[i]) if keys else i
            raise TypeError(f"example_inputs[{where}] must be a tensor, got {type(item).__name__}; "
                            f"example_inputs must be {valid}")
    return items, keys


def _default_input_names(count: int, keys: tuple[str, ...] | None) -> tuple[str, ...]:
    if keys is not None:
        return keys
    return ("input",) if count == 1 else tuple(f"input_{i}" for i in range(count))


def _check_names(kind: str, names: object, count: int) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{kind} must be a list of str, got {names!r}")
    names = tuple(names)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(f"{kind} must be non-empty str, got {bad[0]!r} in {list(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} must be unique, got {list(names)!r}")
    if len(names) != count:
        raise ValueError(f"{kind} has {len(names)} names {list(names)!r}, the model has {count}")
    return names


def _check_opset(opset: object) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise ValueError(f"opset must be an int in [{OPSETS.start}, {OPSETS.stop - 1}] "
                         f"(the TorchScript exporter's range), got {opset!r}")
    return opset


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


# -- the model ----------------------------------------------------------------------------------------------


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _plain_copy(model: nn.Module) -> nn.Module:
    """An eval-mode plain copy (:func:`sparsenn.core.plain.plain_copy`), without a key-value cache."""
    plain = plain_copy(model).eval()
    config = getattr(plain, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False  # a key-value cache is an object, not a tensor output
    return plain


def _flatten(out: object, name: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model output, with names: a dict's keys, a sequence's positions; ``None`` skipped."""
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, Mapping):  # also transformers' ModelOutput
        items = [(f"{name}.{k}" if name else str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"{name}_{i}" if name else f"output_{i}", v) for i, v in enumerate(out)]
    else:
        raise TypeError(f"the model's output {name or 'output'!r} is a {type(out).__name__}; "
                        "ONNX export needs tensors (or tuples, lists, dicts of them)")
    return [pair for key, value in items for pair in _flatten(value, key)]


class _FlatOutputs(nn.Module):
    """Calls the model with the example tensors (keywords by name) and returns its tensors as a flat tuple."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...] | None):
        super().__init__()
        setattr(self, _WRAPPED, model)
        self.keys = keys

    def call(self, tensors) -> object:
        """The model's own output for ``tensors``."""
        model = getattr(self, _WRAPPED)
        return model(*tensors) if self.keys is None else model(**dict(zip(self.keys, tensors)))

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in _flatten(self.call(tensors), ""))


def _output_names(out: object) -> tuple[str, ...]:
    names = [name for name, _ in _flatten(out, "")]
    return ("output",) if names == [""] else tuple(names)


def _batch_size(inputs, input_names) -> int:
    """The inputs' common first dimension (``dynamic_batch=True`` needs one)."""
    batch = {int(t.shape[0]) for t in inputs if t.dim() > 0}
    if any(t.dim() == 0 for t in inputs) or len(batch) != 1:
        raise ValueError("dynamic_batch=True needs every input to have the same first (batch) dimension; got "
                         + ", ".join(f"{n}: {tuple(t.shape)}" for n, t in zip(input_names, inputs))
                         + "; pass dynamic_batch=False for fixed shapes")
    return batch.pop()


def _dynamic_axes(size: int, input_names, outputs, output_names) -> dict[str, dict[int, str]]:
    """Dimension 0 of every input, and of every output as long as the batch, named ``batch``."""
    axes = {n: {0: "batch"} for n in input_names}
    axes.update({n: {0: "batch"} for n, t in zip(output_names, outputs) if t.dim() > 0 and t.shape[0] == size})
    return axes


# -- the ONNX graph -----------------------------------------------------------------------------------------


def _subgraphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _subgraphs(sub)


def _strip_wrapper_prefix(model: onnx.ModelProto) -> None:
    """Name initializers like the user's state dict (``fc1.weight``, not ``model.fc1.weight``), in place."""
    graphs = list(_subgraphs(model.graph))
    taken = {name for g in graphs for n in g.node for name in (*n.input, *n.output)}
    taken |= {v.name for g in graphs for v in (*g.input, *g.output, *g.initializer)}
    prefix = _WRAPPED + "."
    rename = {}
    for init in model.graph.initializer:
        new = init.name[len(prefix):]
        if init.name.startswith(prefix) and new and new not in taken:
            rename[init.name] = new
            taken.add(new)
    if not rename:
        return
    for init in model.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for g in graphs:
        for node in g.node:
            for i, name in enumerate(node.input):
                node.input[i] = rename.get(name, name)


def _export_dense(wrapper: nn.Module, inputs, opset: int, input_names, output_names, dynamic_axes) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        torch.onnx.export(wrapper, tuple(inputs), buffer, dynamo=False, opset_version=opset,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes or None)
    return buffer.getvalue()


def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, sparse_initializers: bool = True, *,
                opset: int | None = None, dynamic_batch: bool = True, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, min_sparsity: float = 0.5) -> OnnxExportReport:
    """Export ``model`` to ONNX at ``path``, its pruned weights as ``sparse_initializer``s (module docstring).

    ``example_inputs``: a tensor, a tuple/list of tensors (positional), or a dict of keyword
    tensors (``{"input_ids": ids, "attention_mask": mask}`` for ``transformers`` models); the
    graph inputs are named ``input`` / ``input_0, input_1, ...`` / the dict's keys unless
    ``input_names`` says otherwise; outputs ``output`` / ``output_0, ...`` / the output's keys
    (``logits``) unless ``output_names``. ``sparse_initializers=False`` writes the dense file
    (the fallback for tools that cannot read sparse initializers). ``min_sparsity`` in [0, 1]:
    the fraction of zeros from which an initializer is stored sparse (where sparse is smaller).
    ``opset``: 9 to 20, default 17. Returns an :class:`OnnxExportReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparse_initializers = _check_bool("sparse_initializers", sparse_initializers)
    dynamic_batch = _check_bool("dynamic_batch", dynamic_batch)
    min_sparsity = _fraction("min_sparsity", min_sparsity, allow_one=True)
    opset = _check_opset(opset)
    target = _check_path(path)
    inputs, keys = _split_inputs(example_inputs)
    in_names = _default_input_names(len(inputs), keys) if input_names is None \
        else _check_names("input_names", input_names, len(inputs))
    batch = _batch_size(inputs, in_names) if dynamic_batch else None
    size = _tensor_bytes(model)
    if size > PROTOBUF_LIMIT:
        raise ValueError(f"the model's parameters and buffers take {size:,} bytes; ONNX files over 2 GiB "
                         f"({PROTOBUF_LIMIT:,} bytes, protobuf's limit) need external data, which export_onnx "
                         "does not write")

    wrapper = _FlatOutputs(_plain_copy(model), keys).eval()
    with torch.no_grad():
        reference = wrapper.call(inputs)
    outputs = [t for _, t in _flatten(reference, "")]
    if not outputs:
        raise ValueError("the model returned no tensors for example_inputs; there is nothing to export")
    out_names = _output_names(reference) if output_names is None \
        else _check_names("output_names", output_names, len(outputs))
    axes = _dynamic_axes(batch, in_names, outputs, out_names) if dynamic_batch else {}

    dense = _export_dense(wrapper, inputs, opset, in_names, out_names, axes)
    proto = onnx.load_model_from_string(dense)
    _strip_wrapper_prefix(proto)
    dense_bytes = proto.ByteSize()
    sparse = sparsify_initializers(proto, min_sparsity) if sparse_initializers else []
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if len(data) > PROTOBUF_LIMIT:
        raise ValueError(f"the ONNX model takes {len(data):,} bytes, over protobuf's 2 GiB limit")
    atomic_write(target, data)
    return OnnxExportReport(target, len(data), dense_bytes, opset, tuple(in_names), tuple(out_names), tuple(sparse))

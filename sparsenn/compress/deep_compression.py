"""Deep Compression (Han, Mao & Dally 2016): weight sharing, then Huffman coding, on a pruned model.

:func:`deep_compress` takes a pruned model (masks attached, or plain zeros), clusters each
layer's kept weights (:mod:`.weight_sharing`), optionally fine-tunes the codebooks, and
stores every layer as a float32 codebook plus two canonical Huffman streams (:mod:`.huffman`):
the cluster index of every entry and its relative position (:mod:`.relative_index`, with the
paper's padding fillers). The result holds the shared-weight model, the encodings, and a
byte-exact size report per stage; :meth:`DeepCompressed.decompress` decodes the streams back
into a model whose tensors equal the shared-weight model's bit for bit.

How the stages are counted (bytes; every other tensor of the state dict, biases included, is
added to every stage at its own size, 4 bytes per float32 value; masks are not counted: the
indices carry them; shapes and the few integers of ``meta`` are not counted in any stage):

* ``dense``: 4 bytes per weight.
* ``pruned``: CSR of the weight as a ``(rows, numel / rows)`` matrix, as Han et al. (2015) count
  it, ``2a + n + 1`` numbers of 4 bytes: a float32 value and an int32 column index per kept
  weight, ``rows + 1`` int32 row pointers.
* ``shared``: every entry (kept weights and fillers) with a ``bits``-bit cluster index and an
  ``index_bits``-bit relative index, each stream rounded up to whole bytes, plus the float32
  codebook (the values it holds).
* ``huffman``: the bytes of the arrays :func:`encode_layer` returns: the two streams, their code
  length tables (one byte per symbol) and the codebook.

:func:`encode_layer` / :func:`decode_layer` are also the archive's ``deep`` codec: exact for a
weight that already has few distinct values, and ``decode_layer`` checks everything from a
stranger before it allocates (:class:`~sparsenn.backend.runtime.errors.ArchiveError`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backend.runtime.errors import ArchiveError
from ..core.masks import MASK_SUFFIX, get_masks, load_masks
from . import huffman
from .relative_index import entry_positions, relative_indices
from .weight_sharing import (
    MAX_BITS,
    SharingPlan,
    finalize_sharing,
    fine_tune_shared,
    share_weights,
    shared_layers,
)

__all__ = [
    "CODEC",
    "MAX_ELEMENTS",
    "STAGES",
    "DeepCompressed",
    "LayerBytes",
    "decode_layer",
    "deep_compress",
    "encode_layer",
]

CODEC = "deep_compression"
VERSION = 1
MAX_ELEMENTS = 1 << 28  # the largest layer decode_layer builds unless told otherwise (1 GiB of float32)
STAGES = ("dense", "pruned", "shared", "huffman")
STAGE_TITLES = {"dense": "dense fp32", "pruned": "pruned (CSR)", "shared": "weight-shared", "huffman": "Huffman-coded"}
_ARRAYS = {"codebook": np.dtype(np.float32), "weight_code_lengths": np.dtype(np.uint8),
           "weight_stream": np.dtype(np.uint8), "index_code_lengths": np.dtype(np.uint8),
           "index_stream": np.dtype(np.uint8)}
_META = ("codec", "version", "dtype", "numel", "bits", "index_bits", "entries", "kept", "zero_slot")


# ------------------------------------------------------------------ one layer: encode / decode

def _float32_bits(t: torch.Tensor, what: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{what} is {t.dtype}; the deep_compression codec stores float32 (valid: torch.float32)")
    return t.detach().cpu().contiguous().view(torch.int32).numpy().view(np.uint32).ravel()


def encode_layer(weight: torch.Tensor, *, index_bits: int = 5, bits: int | None = None,
                 mask: torch.Tensor | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One float32 weight as ``(arrays, meta)``: codebook, Huffman tables and streams; exact.

    The entries are the ``mask``'s kept positions (default: the non-zero bit patterns, so ``-0.0``
    counts as a value), each coded by its value's slot in the codebook (the distinct kept values;
    slot 0 is the fillers' zero when the layer has fillers) and its ``index_bits``-bit gap. The
    codebook must fit ``bits`` bits (default: the fewest that do); a weight with more distinct values
    is a ValueError: share its weights first (:func:`deep_compress` or
    :func:`~sparsenn.compress.weight_sharing.share_weights`). ``meta`` holds only scalars.
    """
    patterns = _float32_bits(weight, "weight")
    if mask is None:
        kept = patterns != 0
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, got {got}")
        kept = mask.detach().cpu().contiguous().numpy().ravel()
        stray = np.flatnonzero(~kept & (patterns != 0))
        if stray.size:
            raise ValueError(f"the weight is not +0.0 at masked position {int(stray[0])} (of {stray.size}); "
                             "decoding could not give it back")
    positions = np.flatnonzero(kept)
    gaps, filler = relative_indices(positions, index_bits)
    zero_slot = bool(filler.any())
    values, slots = np.unique(patterns[positions], return_inverse=True)
    need = values.size + zero_slot
    if bits is None:
        bits = max(1, math.ceil(math.log2(need))) if need > 1 else 1
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}] or None, got {bits!r}")
    if need > 1 << bits:
        raise ValueError(f"the weight has {values.size} distinct kept values{' and fillers' if zero_slot else ''}, "
                         f"{need} codes, but bits={bits} allows {1 << bits}: share its weights first "
                         "(sparsenn.compress.deep_compression.deep_compress or weight_sharing.share_weights) or "
                         "raise bits")
    symbols = np.zeros(gaps.size, dtype=np.int64)
    symbols[~filler] = slots.ravel() + zero_slot
    weight_lengths = huffman.code_lengths(np.bincount(symbols, minlength=need))
    index_lengths = huffman.code_lengths(np.bincount(gaps)) if gaps.size else np.zeros(0, dtype=np.uint8)
    arrays = {"codebook": values.astype(np.uint32).view(np.float32),
              "weight_code_lengths": weight_lengths, "weight_stream": huffman.encode(symbols, weight_lengths),
              "index_code_lengths": index_lengths, "index_stream": huffman.encode(gaps, index_lengths)}
    meta = {"codec": CODEC, "version": VERSION, "dtype": "float32", "numel": int(patterns.size), "bits": bits,
            "index_bits": int(index_bits), "entries": int(gaps.size), "kept": int(positions.size),
            "zero_slot": zero_slot}
    return arrays, meta


def _meta_int(meta: Mapping, key: str, low: int, high: int) -> int:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ArchiveError(f"deep_compression meta {key!r} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def _check_meta(meta: Any, max_elements: int) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise ArchiveError(f"deep_compression meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in _META if k not in meta]
    extra = [k for k in meta if k not in _META]
    if missing or extra:
        raise ArchiveError(f"deep_compression meta: missing keys {missing}, unknown keys {extra}; "
                           f"expected exactly {list(_META)}")
    if meta["codec"] != CODEC or meta["version"] != VERSION:
        raise ArchiveError(f"deep_compression meta: codec {meta['codec']!r} version {meta['version']!r}; "
                           f"this reader knows {CODEC!r} version {VERSION}")
    if meta["dtype"] != "float32":
        raise ArchiveError(f"deep_compression meta: dtype {meta['dtype']!r}; valid: 'float32'")
    if not isinstance(meta["zero_slot"], bool):
        raise ArchiveError(f"deep_compression meta 'zero_slot' must be true or false, got {meta['zero_slot']!r}")
    out = {"numel": _meta_int(meta, "numel", 0, max_elements), "bits": _meta_int(meta, "bits", 1, MAX_BITS),
           "index_bits": _meta_int(meta, "index_bits", 1, 16), "zero_slot": meta["zero_slot"]}
    out["entries"] = _meta_int(meta, "entries", 0, out["numel"])
    out["kept"] = _meta_int(meta, "kept", 0, out["entries"])
    return out


def _check_arrays(arrays: Any, m: dict[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping) or set(arrays) != set(_ARRAYS):
        got = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
        raise ArchiveError(f"deep_compression arrays must be exactly {sorted(_ARRAYS)}, got {got}")
    for key, dtype in _ARRAYS.items():
        a = arrays[key]
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1:
            got = f"{a.dtype} of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ArchiveError(f"deep_compression array {key!r} must be 1-D {dtype}, got {got}")
    codes = arrays["codebook"].size + m["zero_slot"]
    if codes > 1 << m["bits"]:
        raise ArchiveError(f"deep_compression: {codes} codebook slots do not fit bits={m['bits']}")
    if arrays["weight_code_lengths"].size != codes:
        raise ArchiveError(f"deep_compression: the cluster table has {arrays['weight_code_lengths'].size} lengths "
                           f"for {codes} codebook slots")
    if arrays["index_code_lengths"].size > 1 << m["index_bits"]:
        raise ArchiveError(f"deep_compression: the index table has {arrays['index_code_lengths'].size} lengths; "
                           f"index_bits={m['index_bits']} allows {1 << m['index_bits']}")
    return dict(arrays)


def decode_layer(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, shape: Iterable[int] | None = None,
                 max_elements: int = MAX_ELEMENTS, return_kept: bool = False):
    """The float32 weight :func:`encode_layer` stored (1-D, or ``shape``); ``return_kept`` adds the kept positions.

    Every size, code and index is checked against ``meta`` before the result is allocated (at most
    ``max_elements`` values); anything wrong is an :class:`ArchiveError` saying what.
    """
    m = _check_meta(meta, max_elements)
    if shape is not None:
        shape = tuple(shape)
        if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in shape) \
                or math.prod(shape) != m["numel"]:
            raise ArchiveError(f"deep_compression: shape {list(shape)} does not hold numel={m['numel']} values")
    a = _check_arrays(arrays, m)
    gaps = huffman.decode(a["index_stream"], a["index_code_lengths"], m["entries"], "deep_compression index stream")
    symbols = huffman.decode(a["weight_stream"], a["weight_code_lengths"], m["entries"],
                             "deep_compression cluster stream")
    filler = symbols == 0 if m["zero_slot"] else np.zeros(symbols.size, dtype=bool)
    full_gap = (1 << m["index_bits"]) - 1
    odd = np.flatnonzero(filler & (gaps != full_gap))
    if odd.size:
        raise ArchiveError(f"deep_compression: filler entry {int(odd[0])} has gap {int(gaps[odd[0]])}; a filler "
                           f"always has the full gap {full_gap}")
    if filler.size and filler[-1]:
        raise ArchiveError("deep_compression: the last entry is a filler (fillers only precede a kept weight)")
    if int(filler.size - filler.sum()) != m["kept"]:
        raise ArchiveError(f"deep_compression: {int(filler.size - filler.sum())} kept entries decoded, meta says "
                           f"{m['kept']}")
    positions = entry_positions(gaps)
    if positions.size and positions[-1] >= m["numel"]:
        raise ArchiveError(f"deep_compression: entry position {int(positions[-1])} is outside the "
                           f"{m['numel']} values")
    kept_at = positions[~filler]
    out = np.zeros(m["numel"], dtype=np.float32)
    out[kept_at] = a["codebook"][symbols[~filler] - m["zero_slot"]]
    weight = torch.from_numpy(out)
    if shape is not None:
        weight = weight.reshape(shape)
    if not return_kept:
        return weight
    kept = torch.zeros(m["numel"], dtype=torch.bool)
    kept[torch.from_numpy(kept_at)] = True
    return weight, kept.reshape(weight.shape)


# ------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class LayerBytes:
    """One compressed layer: its shape, counts and bytes at every stage (see the module docstring)."""

    name: str
    shape: tuple[int, ...]
    kept: int
    entries: int
    bits: int
    index_bits: int
    clusters: int  # distinct values in the stored codebook
    dense: int
    pruned: int
    shared: int
    huffman: int
    cluster_stream: int  # bytes of the Huffman-coded cluster indices
    index_stream: int  # bytes of the Huffman-coded relative indices

    @property
    def cluster_bits(self) -> float:
        """Huffman-coded bits per entry for the cluster index (the paper's Table 2 "weight bits")."""
        return 8 * self.cluster_stream / self.entries if self.entries else 0.0

    @property
    def relative_index_bits(self) -> float:
        """Huffman-coded bits per entry for the relative index (Table 2 "index bits")."""
        return 8 * self.index_stream / self.entries if self.entries else 0.0


def _layer_bytes(name: str, shape: tuple[int, ...], arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> LayerBytes:
    numel, kept, entries = meta["numel"], meta["kept"], meta["entries"]
    rows = shape[0] if shape else 1
    codebook = arrays["codebook"].nbytes
    return LayerBytes(
        name=name, shape=shape, kept=kept, entries=entries, bits=meta["bits"], index_bits=meta["index_bits"],
        clusters=arrays["codebook"].size, dense=4 * numel, pruned=4 * (2 * kept + rows + 1),
        shared=(entries * meta["bits"] + 7) // 8 + (entries * meta["index_bits"] + 7) // 8 + codebook,
        huffman=sum(a.nbytes for a in arrays.values()), cluster_stream=arrays["weight_stream"].nbytes,
        index_stream=arrays["index_stream"].nbytes)


@dataclass
class DeepCompressed:
    """What :func:`deep_compress` returns.

    ``model``: the shared-weight model (plain weights ``codebook[cluster]``, masks as the input
    had them); ``plans``: ``{weight name: SharingPlan}``; ``encodings``: ``{weight name: (arrays,
    meta)}`` of :func:`encode_layer`; ``others``: every other state-dict tensor but the masks (copies,
    stored as they are); ``layers``: bytes per layer and stage.
    """

    model: nn.Module = field(repr=False)
    plans: dict[str, SharingPlan]
    encodings: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = field(repr=False)
    others: dict[str, torch.Tensor] = field(repr=False)
    layers: list[LayerBytes]
    masked: list[str] = field(default_factory=list)  # weight names whose layers carry a mask

    @property
    def other_bytes(self) -> int:
        """Bytes of the tensors stored as they are (biases, ...), counted in every stage."""
        return sum(t.numel() * t.element_size() for t in self.others.values())

    def bytes(self, stage: str = "huffman") -> int:
        """Total bytes at ``stage`` (one of :data:`STAGES`)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(map(repr, STAGES))}")
        return sum(getattr(layer, stage) for layer in self.layers) + self.other_bytes

    def ratio(self, stage: str = "huffman") -> float:
        """Dense float32 bytes / bytes at ``stage``."""
        return self.bytes("dense") / self.bytes(stage)

    def report(self) -> list[dict[str, Any]]:
        """One row per stage: ``{"stage", "bytes", "ratio"}``."""
        return [{"stage": s, "bytes": self.bytes(s), "ratio": self.ratio(s)} for s in STAGES]

    def as_dict(self) -> dict[str, Any]:
        """The report and the per-layer sizes, JSON-ready."""
        layers = [dict(asdict(layer), shape=list(layer.shape), cluster_bits=layer.cluster_bits,
                       relative_index_bits=layer.relative_index_bits) for layer in self.layers]
        return {"stages": self.report(), "other_bytes": self.other_bytes, "layers": layers}

    def markdown(self) -> str:
        """The stages as a Markdown table."""
        lines = ["| stage | bytes | ratio |", "|---|---|---|"]
        lines += [f"| {STAGE_TITLES[r['stage']]} | {r['bytes']:,} | {r['ratio']:.1f}x |" for r in self.report()]
        return "\n".join(lines)

    def decompress(self, into: nn.Module | None = None) -> nn.Module:
        """Decode every layer back: a model bitwise equal to :attr:`model`.

        ``into``: a model of the same architecture to load into (in place; masks are attached where
        the shared model has them); default a copy of :attr:`model` with every tensor overwritten
        from the encodings. Everything is decoded before ``into`` changes.
        """
        target = copy.deepcopy(self.model) if into is None else into
        if into is None:
            with torch.no_grad():
                for p in target.parameters():
                    p.zero_()
        shapes = {name: tuple(p.shape) for name, p in target.named_parameters()}
        state: dict[str, torch.Tensor] = {k: v.clone() for k, v in self.others.items()}
        masks = {}
        for name, (arrays, meta) in self.encodings.items():
            if name not in shapes:
                raise ValueError(f"the model to decompress into has no parameter {name!r}")
            state[name], kept = decode_layer(arrays, meta, shape=shapes[name], return_kept=True)
            if name in self.masked:
                masks[name] = kept
                state[name + MASK_SUFFIX] = kept
        load_masks(target, masks)
        target.load_state_dict(state, strict=True)
        return target


# ------------------------------------------------------------------ the procedure


def deep_compress(model: nn.Module, *, bits=None, index_bits=None,
                  fine_tune: Callable[[nn.Module], Any] | Mapping[str, Any] | None = None,
                  layers: Iterable[str] | None = None, max_iter: int = 300) -> DeepCompressed:
    """Weight sharing + Huffman coding of a pruned ``model`` (Han, Mao & Dally 2016); ``model`` is not changed.

    ``bits`` / ``index_bits``: per-layer widths of the cluster and relative indices (an int, ``None``
    for the paper's 8 bits for convolutions and 5 for Linear layers, or ``{layer or "conv"/"fc":
    int}``). ``fine_tune``: ``None``; a callable ``fine_tune(shared_model)`` that trains the
    shared-weight model in place with your own loop (its trainable tensors are the codebooks and
    the other parameters); or a dict of arguments for
    :func:`~sparsenn.compress.weight_sharing.fine_tune_shared` (``{"loader": ..., "epochs": 2,
    "lr": 1e-3}``). ``layers``: module names to compress (default every Linear and convolution).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if fine_tune is not None and not callable(fine_tune) and not isinstance(fine_tune, Mapping):
        raise TypeError(f"fine_tune must be None, a callable or a dict of fine_tune_shared arguments, "
                        f"got {type(fine_tune).__name__}")
    if isinstance(fine_tune, Mapping) and "loader" not in fine_tune:
        raise ValueError("fine_tune as a dict needs 'loader' (the training batches) for fine_tune_shared")
    shared = copy.deepcopy(model)
    plans = share_weights(shared, bits=bits, index_bits=index_bits, layers=layers, max_iter=max_iter)
    if callable(fine_tune):
        fine_tune(shared)
    elif fine_tune is not None:
        fine_tune_shared(shared, **fine_tune)
    kept = {f"{name}.weight" if name else "weight": p.kept.clone() for name, _, p in shared_layers(shared)}
    finalize_sharing(shared)
    params = dict(shared.named_parameters())
    encodings, sizes = {}, []
    for name, plan in plans.items():
        arrays, meta = encode_layer(params[name].detach(), index_bits=plan.index_bits, bits=plan.bits,
                                    mask=kept[name])
        encodings[name] = (arrays, meta)
        sizes.append(_layer_bytes(name, tuple(params[name].shape), arrays, meta))
    masked = [n for n in get_masks(shared) if n in plans]
    skip = set(plans) | {n + MASK_SUFFIX for n in get_masks(shared)}
    others = {k: v.detach().cpu().clone() for k, v in shared.state_dict().items() if k not in skip}
    return DeepCompressed(shared, plans, encodings, others, sizes, masked)

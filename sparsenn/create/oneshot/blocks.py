"""The repeated blocks of a transformer, and the inputs the first of them receives.

A pretrained transformer is embeddings, a list of identical blocks (``model.layers`` of
a LLaMA, ``encoder.layer`` of a BERT, ``transformer.h`` of a GPT-2) and a head. One-shot
pruning runs the calibration data block by block, so it needs that list and what the
model hands its first block: the hidden states and every keyword the block takes
(attention mask, position ids, rotary embeddings, ...). Those are captured by a
pre-forward hook on the first block, exactly as the model builds them, rather than
rebuilt here: the code works for any model whose blocks are called one after the other
on the previous block's output.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["BlockInputs", "OneShotError", "capture_block_inputs", "find_blocks"]


class OneShotError(ValueError):
    """One-shot pruning cannot go on: bad model, calibration data, pattern or numbers (the message says
    what and where, and which blocks, if any, were already pruned)."""


def _linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, list[nn.Module]]:
    """``(dotted name, blocks)`` of the model's repeated blocks.

    ``path`` (``"model.layers"``) names the ``nn.ModuleList`` / ``nn.Sequential`` yourself.
    Otherwise: of the module lists whose members all have one class and hold ``nn.Linear``
    layers, the one with the most parameters.
    """
    if not isinstance(model, nn.Module):
        raise OneShotError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if path is not None:
        if not isinstance(path, str):
            raise OneShotError(f"blocks must be a dotted module name such as 'model.layers', got {path!r}")
        try:
            found = model.get_submodule(path)
        except AttributeError:
            raise OneShotError(f"blocks={path!r}: {type(model).__name__} has no submodule {path!r}; candidates: "
                               f"{', '.join(_candidates(model)) or 'none'}") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise OneShotError(f"blocks={path!r} is a {type(found).__name__}, not a non-empty ModuleList or "
                               "Sequential of blocks")
        return path, list(found)
    candidates = _candidates(model)
    if not candidates:
        raise OneShotError(f"{type(model).__name__} has no list of repeated blocks holding Linear layers; "
                           "name it with blocks='<dotted name>' (e.g. 'model.layers')")
    best = max(candidates, key=lambda n: sum(p.numel() for p in model.get_submodule(n).parameters()))
    return best, list(model.get_submodule(best))


def _candidates(model: nn.Module) -> list[str]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 1 and name:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and all(_linears(m) for m in module) and not isinstance(module[0], nn.Linear):
                out.append(name)
    return out


class _Captured(Exception):
    """Raised by the hook on the first block: the rest of the model need not run."""


class BlockInputs:
    """What the first block received for each calibration batch: the positional arguments
    (the hidden states first), the keyword arguments, and the mask of real (not padding) tokens."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []
        self.args: list[tuple[Any, ...]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.tokens: list[torch.Tensor | None] = []

    def __len__(self) -> int:
        return len(self.hidden)

    def call(self, block: nn.Module, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``block`` on batch ``i`` with ``hidden`` as its hidden states; returns its hidden states."""
        out = block(hidden, *self.args[i], **self.kwargs[i])
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not torch.is_tensor(out) or out.shape != hidden.shape:
            raise OneShotError(f"block {type(block).__name__} returned {type(out).__name__} "
                               f"{tuple(getattr(out, 'shape', ()))} for hidden states of shape "
                               f"{tuple(hidden.shape)}; one-shot pruning needs blocks that map hidden states "
                               "to hidden states of the same shape")
        return out


def _shared(value: Any, first: Any) -> Any:
    """``value`` with every tensor equal to the first batch's counterpart replaced by that tensor: rotary
    embeddings and attention masks are usually the same for every batch, and need not be held 128 times."""
    if torch.is_tensor(value):
        same = (torch.is_tensor(first) and first.shape == value.shape and first.dtype == value.dtype
                and first.device == value.device and torch.equal(first, value))
        return first if same else value.detach()
    if isinstance(value, (tuple, list)) and isinstance(first, (tuple, list)) and len(first) == len(value):
        items = [_shared(v, f) for v, f in zip(value, first)]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def capture_block_inputs(model: nn.Module, first: nn.Module, batches: Iterable[dict[str, Any]]) -> BlockInputs:
    """Run the model on each batch (a dict of model inputs) until its first block and record what the
    block receives; the model's own forward builds masks, positions and rotary embeddings."""
    captured = BlockInputs()

    def hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        else:
            raise OneShotError(f"the first block ({type(module).__name__}) was called without hidden states")
        if isinstance(kwargs.get("use_cache"), bool):
            kwargs = {**kwargs, "use_cache": False}
        captured.hidden.append(hidden.detach())
        first = captured.args[0] if captured.args else None
        captured.args.append(_shared(rest, first) if first is not None else rest)
        captured.kwargs.append({k: _shared(v, captured.kwargs[0].get(k)) if captured.kwargs else v
                                for k, v in kwargs.items()})
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            captured.tokens.append(None if mask is None else mask.to(torch.bool))
            try:
                model(**batch)
            except _Captured:
                continue
            raise OneShotError(f"{type(model).__name__}'s forward returned without calling its first block: "
                               "is blocks= the list the model runs?")
    finally:
        handle.remove()
    return captured

"""How far a converted model's outputs are from the dense model's: max abs error, and perplexity on text.

With ``weights="bf16"`` or ``"int8"`` the converted model does not compute exactly what
the dense one does; :func:`sparsenn.convert` reports the change on the example input
(the largest absolute difference of any output, e.g. logits) and, when token ids are
given (``text=``), the perplexity of both models on them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs as I


@torch.no_grad()
def output_change(converted: nn.Module, example: Any, reference: Any) -> dict[str, float]:
    """``{"max_abs_error", "max_abs_output"}`` of the converted model's outputs against ``reference``."""
    worst = largest = 0.0
    for y, r in zip(I.output_tensors(I.call_model(converted, example)), I.output_tensors(reference)):
        if y.shape != r.shape or not r.is_floating_point():
            continue
        if r.numel():
            worst = max(worst, float((y.float() - r.float()).abs().max()))
            largest = max(largest, float(r.float().abs().max()))
    return {"max_abs_error": worst, "max_abs_output": largest}


def token_ids(text: Any) -> torch.Tensor:
    """``text`` as a 1-D LongTensor of token ids (a tensor or sequence of ints), else TypeError/ValueError."""
    if isinstance(text, torch.Tensor):
        ids = text
    elif isinstance(text, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in text):
        ids = torch.tensor(text, dtype=torch.long)
    else:
        raise TypeError(f"text must be token ids (a 1-D integer tensor or a list of ints; tokenize the text "
                        f"first), got {type(text).__name__}")
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1 and not (ids.dim() == 2 and ids.shape[0] == 1):
        raise ValueError(f"text must be a 1-D integer tensor of token ids, got dtype {ids.dtype} and shape "
                         f"{tuple(ids.shape)}")
    ids = ids.reshape(-1).long()
    if ids.numel() < 2:
        raise ValueError(f"text needs at least 2 tokens to measure perplexity, got {ids.numel()}")
    return ids


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512) -> float:
    """Perplexity of a causal language model (``model(input_ids=...).logits``) on ``ids`` in disjoint windows."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1]
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[:-1].unsqueeze(0)).logits[0].float()
        total += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(total / count)

"""Measuring language models: sliding-window perplexity, and embedding fidelity of encoders.

Perplexity follows the standard sliding-window procedure (the one of the ``transformers``
documentation): windows of ``window`` tokens advance by ``stride``; each window scores
only the tokens not scored by the previous one, with the rest as context; the result is
``exp`` of the mean negative log-likelihood over every scored token (token-count
weighted). The first token of the text has no context and is not scored.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.text import TextError, read_text, tokenize

__all__ = ["embedding_fidelity", "perplexity"]


def _ids(tokenizer_or_ids: Any, text: str | os.PathLike | None) -> torch.Tensor:
    if torch.is_tensor(tokenizer_or_ids):
        ids = tokenizer_or_ids
        if ids.dtype.is_floating_point or ids.dtype is torch.bool:
            raise TextError(f"token ids must be an integer tensor, got {ids.dtype}")
        return ids.reshape(-1).to(torch.long)
    if text is None:
        raise TextError("text= is needed with a tokenizer")
    if isinstance(text, os.PathLike):
        text = read_text(text)
    return tokenize(tokenizer_or_ids, text)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer_or_ids: Any, text: str | os.PathLike | None = None, *, window: int = 512,
               stride: int = 256, max_tokens: int | None = None) -> float:
    """Perplexity of a causal language model on ``text`` (or on a 1-D tensor of token ids).

    ``window``: tokens per forward pass (at most the model's context); ``stride``: how far
    the window advances (``stride == window``: disjoint windows, no overlap; smaller: each
    scored token sees at least ``window - stride`` tokens of context). ``max_tokens``: only
    the first this many tokens.
    """
    for key, value in (("window", window), ("stride", stride)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} would leave tokens unscored")
    ids = _ids(tokenizer_or_ids, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel()
    if n < 2:
        raise TextError(f"perplexity needs at least 2 tokens, got {n}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        raise TextError(f"token ids in [{int(ids.min())}, {int(ids.max())}], the model's vocabulary is [0, {vocab})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, scored_to = 0.0, 0, 1  # tokens before index scored_to are scored (token 0 never is)
    try:
        begin = 0
        while scored_to < n:
            end = min(begin + window, n)
            chunk = ids[begin:end].unsqueeze(0).to(device)
            logits = model(input_ids=chunk, use_cache=False).logits if _takes_cache(model) else model(chunk).logits
            logp = F.log_softmax(logits[0, :-1].float(), dim=-1)
            targets = chunk[0, 1:]
            # logits position predicting token scored_to; a window starting at scored_to (stride == window)
            # cannot score its own first token, which then stays unscored
            first = max(scored_to - begin - 1, 0)
            nll = -logp[first:].gather(1, targets[first:].unsqueeze(1)).squeeze(1)
            total += float(nll.sum(dtype=torch.float64))
            count += nll.numel()
            scored_to = end
            if end == n:
                break
            begin += stride
    finally:
        model.train(was_training)
    return math.exp(total / count)


def _takes_cache(model: nn.Module) -> bool:
    import inspect
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def embedding_fidelity(model: nn.Module, reference: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean cosine similarity of mean-pooled last hidden states (padding excluded) of ``model`` and the
    dense ``reference`` over ``batches`` (dicts with ``input_ids`` and optionally ``attention_mask``)."""
    sims = []
    for batch in batches:
        mask = batch.get("attention_mask")
        mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
        pooled = []
        for m in (model, reference):
            h = m(**batch).last_hidden_state
            w = mask.unsqueeze(-1).to(h.dtype)
            pooled.append((h * w).sum(1) / w.sum(1).clamp_min(1))
        sims.append(F.cosine_similarity(pooled[0], pooled[1], dim=-1))
    if not sims:
        raise ValueError("embedding_fidelity needs at least one batch")
    return float(torch.cat(sims).mean())

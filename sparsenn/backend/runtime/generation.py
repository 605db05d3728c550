"""Timing text generation: prefill (the prompt in one pass) and decode (one token at a time), separately.

``model.generate`` of a converted decoder works unchanged (the KV cache, greedy search
and sampling are the model's own code; only its Linear layers were swapped).
:func:`generation_speed` times it the way the two phases cost: *prefill* multiplies
every weight by all prompt tokens at once (compute-bound), *decode* reads every weight
once per generated token at batch 1 (memory-bound: bytes per token decide).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GenerationSpeed:
    """Median seconds of a prefill of ``prompt_tokens`` and of one decoded token (after the prompt)."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s_per_token: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token

    def __str__(self) -> str:
        return (f"prefill {self.prompt_tokens} tokens: {self.prefill_s * 1e3:.1f} ms "
                f"({self.prefill_tokens_per_s:.0f} tokens/s); decode: {self.decode_s_per_token * 1e3:.2f} ms/token "
                f"({self.decode_tokens_per_s:.1f} tokens/s, {self.new_tokens} new tokens)")


def _generate(model: nn.Module, ids: torch.Tensor, n: int) -> float:
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   pad_token_id=0)
    return time.perf_counter() - t0


@torch.inference_mode()
def generation_speed(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 128, *,
                     prefill_ids: torch.Tensor | None = None, repeats: int = 3) -> GenerationSpeed:
    """Time ``model.generate`` (greedy) on ``input_ids`` (``(1, L)``): decode seconds per token and prefill time.

    Decode: ``(t(new_tokens + 1) - t(1)) / new_tokens``, where ``t(n)`` is a ``generate``
    of ``n`` tokens after the prompt (the first token comes out of the prefill, so the
    difference is ``new_tokens`` decoding steps with the KV cache). Prefill: a
    ``generate`` of one token after ``prefill_ids`` (default ``input_ids``). Medians of
    ``repeats`` runs after one untimed warm-up.
    """
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"{type(model).__name__} has no generate(); generation_speed times text generators "
                        "(e.g. transformers' *ForCausalLM models)")
    for name, ids in (("input_ids", input_ids), ("prefill_ids", prefill_ids)):
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1
                                or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] < 1):
            got = f"shape {tuple(ids.shape)}, dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be a (1, L) integer tensor of token ids with L >= 1, got {got}")
    for name, value in (("new_tokens", new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    prefill_ids = input_ids if prefill_ids is None else prefill_ids
    _generate(model, input_ids, 2)  # warm-up: kernels compiled or loaded, buffers allocated
    one, many, prefill = [], [], []
    for _ in range(repeats):
        one.append(_generate(model, input_ids, 1))
        many.append(_generate(model, input_ids, new_tokens + 1))
        prefill.append(_generate(model, prefill_ids, 1))
    decode = max(statistics.median(many) - statistics.median(one), 1e-9) / new_tokens
    return GenerationSpeed(int(prefill_ids.shape[1]), new_tokens, statistics.median(prefill), decode)

"""Calibration samples from plain text: random windows of a tokenized file.

As in the Wanda and SparseGPT reference code (random 2048-token windows of C4
documents), a calibration set is ``samples`` windows of ``length`` consecutive tokens
drawn at seeded random offsets from the tokenized text, here one local file (e.g.
``shared/datasets/text/pydocs/calibration.txt``): no download at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["MAX_TEXT_BYTES", "TextError", "calibration_batches", "read_text", "tokenize"]

MAX_TEXT_BYTES = 256 << 20  # a calibration or evaluation text larger than this is refused before reading


class TextError(ValueError):
    """A text file or token sequence that cannot serve as calibration or evaluation data."""


def read_text(source: str | os.PathLike) -> str:
    """The UTF-8 text of a file (``str`` sources that are not existing files are refused: pass a Path
    or use the text directly with :func:`tokenize`)."""
    path = Path(source)
    if not path.is_file():
        raise TextError(f"{str(path)!r}: no such file")
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise TextError(f"{path}: {size} bytes; a text file may have at most {MAX_TEXT_BYTES}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """1-D int64 token ids of ``text`` (a ``transformers`` tokenizer: no special tokens added)."""
    if not isinstance(text, str):
        raise TextError(f"text must be a str, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def calibration_batches(tokenizer_or_ids: Any, text: str | os.PathLike | None = None, *, samples: int = 128,
                        length: int = 512, batch_size: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """``samples`` windows of ``length`` tokens at random offsets, as ``batch_size x length`` input_ids tensors.

    ``tokenizer_or_ids``: a tokenizer (with ``text``: a file path or the text itself) or a 1-D tensor
    of token ids. Raises :class:`TextError` when the text is shorter than one window.
    """
    for key, value in (("samples", samples), ("length", length), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TextError(f"{key} must be an int >= 1, got {value!r}")
    if torch.is_tensor(tokenizer_or_ids):
        ids = tokenizer_or_ids.reshape(-1).to(torch.long)
    else:
        if text is None:
            raise TextError("text= is needed with a tokenizer (a file path or the text)")
        if isinstance(text, os.PathLike) or (isinstance(text, str) and "\n" not in text and len(text) < 4096
                                             and Path(text).is_file()):
            text = read_text(text)
        ids = tokenize(tokenizer_or_ids, text)
    if ids.numel() < length + 1:
        raise TextError(f"the calibration text has {ids.numel()} tokens, fewer than one sample of {length} "
                        f"(+1); use a longer text or a smaller length=")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (samples,), generator=g)
    windows = torch.stack([ids[s:s + length] for s in starts.tolist()])
    return [windows[i:i + batch_size] for i in range(0, samples, batch_size)]

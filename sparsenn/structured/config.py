"""Keeping a ``transformers`` model's config true after shrinking, so that ``save_pretrained`` /
``from_pretrained`` rebuild the shrunk model.

A config holds one size for all layers: ``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``intermediate_size``, ``hidden_size`` and (for RMSNorm models)
``rms_norm_eps``, which a shrunk hidden size changes (an RMSNorm over ``d'`` of ``d``
channels uses ``eps * d / d'``; :mod:`.norms`). :func:`config_layers` notes, before
shrinking, which modules carry each size; :func:`update_config` writes their new value
when all of them agree. ``head_dim`` is written explicitly, since a LLaMA-style config
otherwise derives it as ``hidden_size // num_attention_heads``. Last, the config must
validate (``LlamaConfig`` refuses a ``hidden_size`` that is not a multiple of
``num_attention_heads``, which is why ``sn.shrink`` rounds a hidden size to that multiple)
and a model built from it on the meta device must have the shrunk model's tensor shapes;
otherwise the reason is returned (``shrink_notes``) instead of a silently wrong config.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .attention import _heads, attention_modules
from .norms import eps_attribute, norm_kind

_READ = {
    "intermediate_size": lambda m: m.out_features,
    "hidden_size": lambda m: m.embedding_dim,
    "rms_norm_eps": lambda m: getattr(m, eps_attribute(m)),
}


def config_layers(model: nn.Module) -> dict[str, list[str]]:
    """Before shrinking: the modules holding each of the config's sizes: ``intermediate_size`` (the
    Linear layers producing it: LLaMA's gate/up projections, BERT's ``intermediate.dense``),
    ``hidden_size`` (the Embeddings of that width), ``rms_norm_eps`` (the RMSNorms using it)."""
    config = getattr(model, "config", None)
    named = list(model.named_modules())
    out: dict[str, list[str]] = {}
    size = getattr(config, "intermediate_size", None)
    if isinstance(size, int):
        out["intermediate_size"] = [n for n, m in named if isinstance(m, nn.Linear) and m.out_features == size]
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int):
        out["hidden_size"] = [n for n, m in named if isinstance(m, nn.Embedding) and m.embedding_dim == hidden]
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, float):
        out["rms_norm_eps"] = [n for n, m in named
                               if norm_kind(m) == "rms" and getattr(m, eps_attribute(m), None) == eps]
    return out


def intermediate_layers(model: nn.Module) -> list[str]:
    """Names of the Linear layers whose output is the config's ``intermediate_size``."""
    return config_layers(model).get("intermediate_size", [])


def rebuild_problem(model: nn.Module) -> str | None:
    """Why ``from_pretrained`` could not rebuild ``model`` from its config (``None``: it can, or this cannot
    be checked): the config does not validate, or a model built from it has other tensor shapes."""
    config = model.config
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as e:  # noqa: BLE001  (any validator's complaint is the reason)
            return f"the shrunk config does not validate ({e}), so save_pretrained refuses it"
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(config))
    except Exception:  # noqa: BLE001  (a model not built from its config alone: not checked)
        return None
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for k, v in model.state_dict().items():
        if k in expected and expected[k] != tuple(v.shape):
            return (f"from_pretrained would build {k} as {expected[k]}, but it is {tuple(v.shape)}: the config "
                    "cannot describe the shrunk model (save it with torch.save or sn.save instead)")
    return None


def update_config(model: nn.Module, layers: dict[str, list[str]] | list[str]) -> str | None:
    """Make ``model.config`` (a ``transformers`` config) describe the shrunk sizes, so that
    ``save_pretrained`` / ``from_pretrained`` round-trip; ``None``, or why it cannot (sizes
    differ between layers: the config has one size for all; or :func:`rebuild_problem`).
    ``layers``: what :func:`config_layers` said before the model was shrunk (a list: the
    ``intermediate_size`` layers alone)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    if isinstance(layers, list):
        layers = {"intermediate_size": layers}
    attn = attention_modules(model)
    modules = dict(model.named_modules())
    sizes: dict[str, set] = {"num_attention_heads": {_heads(m)[0] for _, m in attn},
                             "num_key_value_heads": {_heads(m)[1] for _, m in attn}}
    sizes.update({key: {_READ[key](modules[n]) for n in names} for key, names in layers.items()})
    mixed = [k for k, v in sizes.items() if len(v) > 1]
    if mixed:
        eps = "" if "rms_norm_eps" not in mixed else (
            " (an RMSNorm over d' of its d channels uses eps * d / d', so the hidden size's norms and the others, "
            "such as per-head query/key norms, no longer share one epsilon)")
        return (f"layers differ in {', '.join(mixed)}{eps}: the config holds one size for all layers, so "
                "from_pretrained cannot rebuild this model (save it with torch.save or sn.save instead)")
    old_hidden = getattr(config, "hidden_size", None)
    if attn and hasattr(config, "num_attention_heads"):
        config.head_dim = attn[0][1].head_dim  # no longer hidden_size // num_attention_heads
    for key, v in sizes.items():
        if v and hasattr(config, key):
            setattr(config, key, next(iter(v)))
    hidden = getattr(config, "hidden_size", None)
    for m in modules.values():  # modules that keep a copy of a size
        if hasattr(m, "intermediate_size") and isinstance(getattr(m, "down_proj", None), nn.Linear):
            m.intermediate_size = m.down_proj.in_features
        for attr in ("hidden_size", "embed_dim") if hidden != old_hidden else ():
            value = getattr(m, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == old_hidden:
                setattr(m, attr, hidden)
    return rebuild_problem(model)


__all__ = ["config_layers", "intermediate_layers", "rebuild_problem", "update_config"]

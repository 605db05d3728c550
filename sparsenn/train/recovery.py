"""Sparse recovery of a pruned causal language model: a short masked fine-tune, optionally distilled
from the dense model.

After one-shot pruning (``sn.oneshot``: Wanda, SparseGPT) a few hundred steps of training win
back much of the lost perplexity. Distilling from the dense model's next-token distribution
(Hinton et al. 2015 on every token position; for pruned LLMs e.g. Kurtic et al. 2023, "Sparse
Fine-tuning for Inference Acceleration of Large Language Models") gives the student a full
distribution per token instead of one label. The masks stay exact throughout: the optimizer is
masked (:class:`~sparsenn.train.masked_optim.MaskedOptimizerHooks` over the masks on the model, as
``sn.oneshot`` leaves them, or the given Sparsifier's :meth:`~sparsenn.Sparsifier.wrap`), so
gradients at pruned positions are zeroed before every step and pruned weights are written back to
+0.0 after it.

Your own loop needs only :func:`causal_lm_labels` and :func:`~sparsenn.train.distillation.distillation_loss`
(or :func:`causal_lm_distillation_loss`); :func:`recover` is that loop with a step or time budget.
"""

from __future__ import annotations

import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import checks
from ..core.masks import masked_parameters
from .distillation import distillation_loss, logits_of
from .masked_optim import MaskedOptimizerHooks, clip_grad_norm_

__all__ = ["RECOVERY_LOSSES", "RecoveryResult", "causal_lm_distillation_loss", "causal_lm_labels", "recover"]

RECOVERY_LOSSES = ("distill", "lm")


def causal_lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets aligned with the logits: ``labels[:, t] = input_ids[:, t + 1]``; the last
    position, and positions whose next token is padding (``attention_mask == 0``), are ``ignore_index``."""
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a 2-D integer tensor (batch, tokens), got "
                         f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} for input_ids of shape "
                             f"{tuple(input_ids.shape)}")
        labels[:, :-1][attention_mask[:, 1:] == 0] = ignore_index
    return labels


def causal_lm_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                                input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                                temperature: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """:func:`~sparsenn.train.distillation.distillation_loss` over the token positions of a causal LM
    (``(batch, tokens, vocab)`` logits), targets from :func:`causal_lm_labels`. ``alpha=0`` is the
    plain language-model loss (``teacher_logits`` may be None)."""
    labels = causal_lm_labels(input_ids, attention_mask)
    return distillation_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha)


@dataclass
class RecoveryResult:
    """What :func:`recover` did: the loss, steps and tokens trained, seconds, why it stopped
    (``"steps"`` or ``"time"``) and the loss of every step."""

    loss: str
    steps: int
    tokens: int
    seconds: float
    stopped_by: str
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(batches: Iterable[Any]) -> list[dict[str, torch.Tensor]]:
    if torch.is_tensor(batches) or isinstance(batches, dict):
        raise TypeError("batches must be an iterable of batches (input_ids tensors or dicts of model inputs), got "
                        f"a single {type(batches).__name__}; wrap it in a list")
    out = []
    for i, item in enumerate(batches):
        batch = {"input_ids": item} if torch.is_tensor(item) else item
        if not isinstance(batch, dict) or not torch.is_tensor(batch.get("input_ids")):
            raise TypeError(f"batch {i}: expected an input_ids tensor or a dict with 'input_ids', got "
                            f"{type(item).__name__}")
        batch = {k: v for k, v in batch.items() if k != "labels"}  # the loss is ours: no second one in the model
        ids = batch["input_ids"]
        if ids.dim() == 1:
            batch = {**batch, "input_ids": ids.unsqueeze(0)}
        if batch["input_ids"].dim() != 2 or batch["input_ids"].is_floating_point() or batch["input_ids"].shape[1] < 2:
            raise ValueError(f"batch {i}: input_ids must be integer (batch, tokens) with at least 2 tokens, got "
                             f"{batch['input_ids'].dtype} {tuple(batch['input_ids'].shape)}")
        out.append(batch)
    if not out:
        raise ValueError("batches is empty: nothing to train on")
    return out


def _takes_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], no_cache: bool) -> torch.Tensor:
    return logits_of(model(**batch, use_cache=False) if no_cache else model(**batch))


def _budget(steps: Any, time_budget_s: Any) -> tuple[int | None, float | None]:
    if steps is None and time_budget_s is None:
        raise ValueError("give steps=<int >= 1>, time_budget_s=<seconds>, or both (whichever ends first)")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if time_budget_s is not None:
        time_budget_s = checks.positive("time_budget_s", time_budget_s)
    return steps, time_budget_s


def recover(model: nn.Module, batches: Iterable[Any], *, teacher: nn.Module | None = None, loss: str = "distill",
            steps: int | None = None, time_budget_s: float | None = None, lr: float = 2e-5,
            weight_decay: float = 0.0, temperature: float = 1.0, alpha: float = 1.0, max_grad_norm: float | None = 1.0,
            optimizer: torch.optim.Optimizer | None = None, sparsifier=None,
            on_step: Callable[[int, float], None] | None = None) -> RecoveryResult:
    """Fine-tune a pruned causal LM in place with its masks kept exact; returns a :class:`RecoveryResult`.

    Args:
        model: the pruned model, masks attached (``sn.oneshot``, a Sparsifier, ``sn.load``).
        batches: ``input_ids`` tensors (``(batch, tokens)`` or 1-D) or dicts of model inputs
            (``attention_mask`` is honoured); cycled until the budget ends.
        teacher: the dense model, for ``loss="distill"`` (run in eval mode without gradients).
        loss: ``"distill"``: :func:`causal_lm_distillation_loss` with ``temperature`` and ``alpha``
            (default 1.0 and 1.0: the KL divergence to the teacher's next-token distribution alone);
            ``"lm"``: the plain next-token cross-entropy.
        steps, time_budget_s: stop after this many optimizer steps, or at the first step boundary
            after this many seconds (wall clock, teacher included), whichever comes first.
        lr, weight_decay: for the default optimizer, AdamW over the parameters that require grad.
        max_grad_norm: clip the (masked) gradient norm before each step; ``None``: no clipping.
        optimizer: your own (not yet masked) optimizer instead of the default.
        sparsifier: the model's :class:`~sparsenn.Sparsifier`, if one manages the masks: the optimizer is
            wrapped by it and ``sparsifier.step()`` follows every step (dynamic sparse methods keep
            working); else every mask on the model is enforced by masked-optimizer hooks.
        on_step: ``on_step(step, loss)`` after every step.
    """
    if loss not in RECOVERY_LOSSES:
        raise ValueError(f"unknown recovery loss {loss!r}; valid: {', '.join(RECOVERY_LOSSES)}")
    if loss == "distill" and teacher is None:
        raise ValueError('loss="distill" needs teacher=<the dense model>; loss="lm" trains without one')
    steps, time_budget_s = _budget(steps, time_budget_s)
    lr, weight_decay = checks.nonnegative("lr", lr), checks.nonnegative("weight_decay", weight_decay)
    if max_grad_norm is not None:
        max_grad_norm = checks.positive("max_grad_norm", max_grad_norm)
    alpha = alpha if loss == "distill" else 0.0
    data = _batches(batches)
    if optimizer is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no parameter that requires grad: nothing to fine-tune")
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    hooks = None
    if sparsifier is not None:
        sparsifier.wrap(optimizer)
    else:
        masked = masked_parameters(model)
        if not masked:
            raise ValueError("the model has no masks: recover keeps pruned weights at zero; prune it first "
                             "(sn.oneshot, a Sparsifier) or pass the sparsifier that manages it")
        hooks = MaskedOptimizerHooks(optimizer, lambda: masked)
    no_cache = _takes_cache(model)
    teacher_no_cache = teacher is not None and _takes_cache(teacher)
    was_training = model.training
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    model.train()
    result = RecoveryResult(loss=loss, steps=0, tokens=0, seconds=0.0, stopped_by="steps")
    start = time.perf_counter()
    try:
        for batch in itertools.cycle(data):
            if steps is not None and result.steps >= steps:
                break
            if time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
                result.stopped_by = "time"
                break
            teacher_logits = None
            if alpha > 0:
                with torch.no_grad():
                    teacher_logits = _forward(teacher, batch, teacher_no_cache)
            optimizer.zero_grad(set_to_none=True)
            value = causal_lm_distillation_loss(_forward(model, batch, no_cache), teacher_logits, batch["input_ids"],
                                                batch.get("attention_mask"), temperature=temperature, alpha=alpha)
            value.backward()
            if max_grad_norm is not None:
                clip_grad_norm_(model, max_grad_norm)  # masked gradients zeroed first: the norm is the sparse one
            optimizer.step()
            if sparsifier is not None:
                sparsifier.step()
            result.steps += 1
            result.tokens += int(batch["input_ids"].numel())
            result.losses.append(float(value.detach()))
            if not math.isfinite(result.losses[-1]):
                raise FloatingPointError(f"the recovery loss is {result.losses[-1]} at step {result.steps}; "
                                         f"lower lr (now {lr:g}) or set max_grad_norm")
            if on_step is not None:
                on_step(result.steps, result.losses[-1])
    finally:
        result.seconds = time.perf_counter() - start
        if hooks is not None:
            hooks.remove()
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    return result

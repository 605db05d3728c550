"""Knowledge distillation into sparse students (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge
in a Neural Network").

The student learns from the teacher's temperature-softened class probabilities and from the labels::

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

The soft term's gradient with respect to a student logit is ``(q_i - p_i) / T``; multiplied by
``T^2`` it is ``T (q_i - p_i)``, which for large ``T`` tends to ``((z_i - mean z) - (v_i - mean v)) / C``
(Hinton et al. 2015, section 2.1): its scale no longer depends on ``T``, so ``alpha`` weighs the
two terms the same way whatever the temperature.

Two ways in, both with any pruning or dynamic-sparse method (the Sparsifier's hooks keep the
masks; distillation only changes the loss):

* your own loop: ``loss = kd(student(x), teacher_logits, y)`` with ``kd = DistillationLoss(...)``
  and ``teacher_logits = logits_of(teacher(x))`` under ``torch.no_grad()`` (or cached:
  :class:`~sparsenn.train.teacher_cache.TeacherCache`);
* :func:`distill`, the small loop of :mod:`sparsenn.train.loop` with a teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checks

__all__ = ["DistillationLoss", "distill", "distillation_loss", "distillation_terms", "logits_of"]

Tensor = torch.Tensor


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, a ``transformers`` output's ``.logits``, or the first
    element of a tuple."""
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}: expected a tensor, "
                    "an object with .logits, or a tuple whose first element is a tensor")


def _check_hyper(temperature: Any, alpha: Any) -> tuple[float, float]:
    return (checks.positive("temperature", temperature),
            checks.real("alpha", alpha, low=0.0, high=1.0, noun="a number"))


def _check_logits(student: Any, teacher: Any, target: Any, alpha: float, custom_task: bool) -> None:
    if not torch.is_tensor(student) or not student.is_floating_point() or student.dim() < 1:
        raise TypeError("student_logits must be a floating-point tensor of shape (..., classes), got "
                        f"{type(student).__name__} {getattr(student, 'dtype', '')} {tuple(getattr(student, 'shape', ()))}")
    if alpha > 0:
        if teacher is None:
            raise ValueError(f"teacher_logits are needed when alpha > 0 (alpha={alpha:g}); alpha=0 is the task "
                             "loss alone")
        if not torch.is_tensor(teacher) or not teacher.is_floating_point():
            raise TypeError(f"teacher_logits must be a floating-point tensor, got {type(teacher).__name__} "
                            f"{getattr(teacher, 'dtype', '')}")
        if teacher.shape != student.shape:
            raise ValueError(f"teacher_logits of shape {tuple(teacher.shape)} do not match student_logits of shape "
                             f"{tuple(student.shape)}")
    if target is None:
        if alpha < 1:
            raise ValueError(f"target is needed when alpha < 1 (alpha={alpha:g}: the task loss has weight "
                             f"{1 - alpha:g}); alpha=1 is distillation alone")
        return
    if custom_task:
        return
    if not torch.is_tensor(target) or target.is_floating_point() or target.dtype is torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {type(target).__name__} "
                        f"{getattr(target, 'dtype', '')}")
    if target.shape != student.shape[:-1]:
        raise ValueError(f"target of shape {tuple(target.shape)} does not match student_logits of shape "
                         f"{tuple(student.shape)} (expected {tuple(student.shape[:-1])})")


def distillation_terms(student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor | None = None, *,
                       temperature: float = 4.0, alpha: float = 0.9, ignore_index: int = -100,
                       task_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """:func:`distillation_loss` and its two terms: ``{"loss", "soft", "task"}`` (``soft`` already
    multiplied by ``T^2``; a term with weight 0 is a detached 0)."""
    temperature, alpha = _check_hyper(temperature, alpha)
    _check_logits(student_logits, teacher_logits, target, alpha, task_loss is not None)
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes)
    keep = None
    if target is not None and task_loss is None:
        flat = target.reshape(-1)
        keep = flat != ignore_index
    zero = s.sum() * 0.0  # connected to the graph: backward works when a term is absent
    soft = task = zero
    if alpha > 0:
        t = teacher_logits.detach().reshape(-1, classes)
        log_q = F.log_softmax(s.float() / temperature, dim=-1)
        log_p = F.log_softmax(t.float() / temperature, dim=-1)
        p = log_p.exp()
        # per position, summed over classes; a class the teacher rules out (p = 0) adds 0, not 0 * inf
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
        if keep is not None:
            kl = kl[keep]
        soft = (kl.mean() if kl.numel() else zero) * temperature ** 2
    if alpha < 1:
        if task_loss is not None:
            task = task_loss(student_logits, target)
        elif bool(keep.any()):
            task = F.cross_entropy(s.float(), flat, ignore_index=ignore_index)
    loss = alpha * soft + (1.0 - alpha) * task
    return {"loss": loss.to(student_logits.dtype), "soft": soft.detach(), "task": task.detach()}


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor | None = None, *,
                      temperature: float = 4.0, alpha: float = 0.9, ignore_index: int = -100,
                      task_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * task`` (Hinton et al. 2015).

    ``student_logits`` and ``teacher_logits``: ``(..., classes)``, the same shape (any leading
    dimensions: ``(batch, classes)``, a language model's ``(batch, tokens, vocab)``); the teacher's
    are detached. ``target``: class indices of shape ``(...)``; positions equal to ``ignore_index``
    count in neither term. The KL divergence is summed over classes and averaged over positions
    (PyTorch's ``reduction="batchmean"``); the task term is cross-entropy on the unsoftened logits,
    or ``task_loss(student_logits, target)`` when given. ``alpha=0``: the task loss alone
    (``teacher_logits`` may be None); ``alpha=1``: distillation alone (``target`` may be None).
    """
    return distillation_terms(student_logits, teacher_logits, target, temperature=temperature, alpha=alpha,
                              ignore_index=ignore_index, task_loss=task_loss)["loss"]


class DistillationLoss(nn.Module):
    """:func:`distillation_loss` with its hyperparameters fixed: ``kd(student_logits, teacher_logits, target)``.

    ``last_terms`` holds the detached ``{"loss", "soft", "task"}`` of the last call, for logging."""

    def __init__(self, *, temperature: float = 4.0, alpha: float = 0.9, ignore_index: int = -100,
                 task_loss: Callable[[Tensor, Tensor], Tensor] | None = None):
        super().__init__()
        self.temperature, self.alpha = _check_hyper(temperature, alpha)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if task_loss is not None and not callable(task_loss):
            raise TypeError(f"task_loss must be callable (student_logits, target) -> loss, got {task_loss!r}")
        self.ignore_index, self.task_loss = ignore_index, task_loss
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor | None = None) -> Tensor:
        terms = distillation_terms(student_logits, teacher_logits, target, temperature=self.temperature,
                                   alpha=self.alpha, ignore_index=self.ignore_index, task_loss=self.task_loss)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return terms["loss"]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, alpha={self.alpha:g}"


def _unpack(batch: Any, has_teacher: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError("distill expects batches (input, target), or (input, target, teacher_logits) from "
                         f"TeacherCache.loader; got {type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}")
    if len(batch) == 3 and has_teacher:
        raise ValueError("the batches carry cached teacher logits and a teacher was given too: pass teacher=None "
                         "to use the cache, or batches of (input, target) to run the teacher")
    if len(batch) == 2 and not has_teacher:
        raise ValueError("no teacher: pass teacher=<model>, or batches of (input, target, teacher_logits) "
                         "(TeacherCache.loader)")
    return batch[0], batch[1], batch[2] if len(batch) == 3 else None


def distill(student: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, teacher: nn.Module | None = None,
            loss: DistillationLoss | None = None, epochs: int = 1, sparsifier=None, scheduler=None,
            features=None, feature_weight: float = 1.0, on_step: Callable[[], None] | None = None) -> list[float]:
    """Train ``student`` on ``loss`` (default ``DistillationLoss()``) against ``teacher``; returns the mean
    loss per epoch. The loop of :func:`sparsenn.train.loop.train`: after every optimizer step,
    ``scheduler.step()``, ``sparsifier.step()``, ``on_step()``; wrap the optimizer with the
    sparsifier first (``sp.wrap(opt)``), as for any sparse training.

    ``loader`` yields ``(input, target)`` (the teacher runs on each batch, in eval mode, without
    gradients) or ``(input, target, teacher_logits)`` from :meth:`TeacherCache.loader` (no teacher).
    ``features``: a :class:`~sparsenn.train.feature_distillation.FeatureDistiller` on the same pair;
    ``feature_weight * features.loss()`` is added (its projections must be in ``optimizer``).
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    feature_weight = checks.nonnegative("feature_weight", feature_weight)
    loss = loss if loss is not None else DistillationLoss()
    if not callable(loss):
        raise TypeError(f"loss must be a DistillationLoss (or a callable like it), got {type(loss).__name__}")
    if features is not None and teacher is None:
        raise ValueError("feature distillation needs the teacher's forward pass (its hidden states are not cached): "
                         "pass teacher=<model> and batches of (input, target)")
    if teacher is not None:
        teacher_was_training = teacher.training
        teacher.eval()
    losses = []
    try:
        for _ in range(epochs):
            student.train()
            total, count = 0.0, 0
            for batch in loader:
                x, y, cached = _unpack(batch, teacher is not None)
                if cached is None:
                    with torch.no_grad():
                        cached = logits_of(teacher(x))
                optimizer.zero_grad(set_to_none=True)
                value = loss(logits_of(student(x)), cached, y)
                if features is not None:
                    value = value + feature_weight * features.loss()
                value.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if sparsifier is not None:
                    sparsifier.step()
                if on_step is not None:
                    on_step()
                total += value.item() * len(y)
                count += len(y)
            losses.append(total / max(count, 1))
    finally:
        if teacher is not None:
            teacher.train(teacher_was_training)
    return losses

"""Hidden-state (feature) distillation: the student's intermediate outputs regress the teacher's.

FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"): a student layer's output
is mapped by a learned regressor onto a teacher layer's output and the distance between them is
added to the loss. Here a pair is named by module (``{"student.module": "teacher.module"}``);
forward hooks record both outputs as the models run, and :meth:`FeatureDistiller.loss` returns
the mean distance over the pairs. Where the widths differ, a learned projection maps the
student's features to the teacher's width: a bias-free ``Linear`` on the last dimension, or a
1x1 ``Conv2d`` on the channels of ``(N, C, H, W)`` features. The projections are this module's
parameters: add them to the optimizer (``[*student.parameters(), *distiller.parameters()]``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FEATURE_DISTANCES", "FeatureDistiller"]

FEATURE_DISTANCES = ("mse", "cosine")

_WIDTH_ATTRS = ("out_features", "out_channels", "embedding_dim", "hidden_size", "num_features")


def _first_tensor(output: Any) -> torch.Tensor:
    """A module's output features: the tensor, or the first tensor of a tuple (transformer blocks)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if torch.is_tensor(hidden):
        return hidden
    raise TypeError(f"a distilled module must output a tensor (or a tuple starting with one), got {type(output).__name__}")


def _module(model: nn.Module, name: str, which: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise ValueError(f"the {which} has no module named {name!r}; its modules: {shown}") from None


def _declared_width(module: nn.Module) -> int | None:
    for attr in _WIDTH_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple) and len(shape) == 1:
        return int(shape[0])
    weight = getattr(module, "weight", None)  # an RMSNorm or other per-feature scale
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    return None


def _feature_width(features: torch.Tensor) -> int:
    return features.shape[1] if features.dim() == 4 else features.shape[-1]


class FeatureDistiller(nn.Module):
    """Distance between named student and teacher features, through a projection where widths differ.

    Args:
        student, teacher: the two models; hooks are registered on the named modules.
        pairs: ``{student module name: teacher module name}``.
        distance: ``"mse"`` (mean squared error) or ``"cosine"`` (1 - cosine similarity along the
            feature dimension, averaged).
        example_input: an input both models accept; when given, both run once (without gradients)
            to find each pair's feature shape. Otherwise widths are read from the modules
            (``out_features``, ``out_channels``, ``embedding_dim``, ``hidden_size``, ...).
        always_project: learn a projection for every pair, also where the widths agree (FitNets'
            regressor); default only where they differ.

    Use: run ``student(x)`` and (under ``torch.no_grad()``) ``teacher(x)``, then add
    ``weight * distiller.loss()``. :meth:`remove` (or ``with``) removes the hooks.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: dict[str, str], *, distance: str = "mse",
                 example_input: Any = None, always_project: bool = False):
        super().__init__()
        if not isinstance(pairs, dict) or not pairs:
            raise ValueError(f"pairs must be a non-empty dict {{student module: teacher module}}, got {pairs!r}")
        if distance not in FEATURE_DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(FEATURE_DISTANCES)}")
        self.distance = distance
        self.pairs = dict(pairs)
        modules = {s: (_module(student, s, "student"), _module(teacher, t, "teacher")) for s, t in self.pairs.items()}
        self._student_out: dict[str, torch.Tensor] = {}
        self._teacher_out: dict[str, torch.Tensor] = {}
        self._handles = []
        for s, (sm, tm) in modules.items():
            self._handles.append(sm.register_forward_hook(self._recorder(self._student_out, s, detach=False)))
            self._handles.append(tm.register_forward_hook(self._recorder(self._teacher_out, s, detach=True)))
        shapes = self._shapes(student, teacher, example_input, modules)
        self.projections = nn.ModuleDict()
        for s, (s_shape, t_shape) in shapes.items():
            projection = self._projection(s, s_shape, t_shape, always_project)
            if projection is not None:
                self.projections[self._key(s)] = projection

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__") or "__root__"

    @staticmethod
    def _recorder(store: dict, key: str, detach: bool):
        def hook(module, args, output):
            features = _first_tensor(output)
            store[key] = features.detach() if detach else features
        return hook

    def _shapes(self, student, teacher, example_input, modules) -> dict[str, tuple[tuple, tuple]]:
        """Per pair ``(student feature shape, teacher feature shape)``; only the width matters where
        they come from the modules' declarations (``(None, width)``)."""
        if example_input is not None:
            with torch.no_grad():
                for model in (student, teacher):
                    was = model.training
                    model.eval()
                    try:
                        model(example_input)
                    finally:
                        model.train(was)
            found = {s: (tuple(self._student_out[s].shape), tuple(self._teacher_out[s].shape)) for s in self.pairs}
            self._student_out.clear()
            self._teacher_out.clear()
            return found
        shapes = {}
        for s, (sm, tm) in modules.items():
            ws, wt = _declared_width(sm), _declared_width(tm)
            if ws is None or wt is None:
                which = f"student module {s!r}" if ws is None else f"teacher module {self.pairs[s]!r}"
                raise ValueError(f"cannot tell the output width of {which} ({type(sm if ws is None else tm).__name__}); "
                                 "pass example_input=<an input both models accept> to measure it")
            conv = isinstance(sm, nn.Conv2d) or isinstance(tm, nn.Conv2d)
            shapes[s] = ((None, ws, None, None), (None, wt, None, None)) if conv else ((None, ws), (None, wt))
        return shapes

    def _projection(self, name: str, s_shape: tuple, t_shape: tuple, always: bool) -> nn.Module | None:
        if len(s_shape) != len(t_shape):
            raise ValueError(f"pair {name!r} -> {self.pairs[name]!r}: student features have shape {s_shape}, teacher "
                             f"features {t_shape}; they need the same number of dimensions")
        conv = len(s_shape) == 4
        ws, wt = (s_shape[1], t_shape[1]) if conv else (s_shape[-1], t_shape[-1])
        other = [(a, b) for i, (a, b) in enumerate(zip(s_shape, t_shape))
                 if i != (1 if conv else len(s_shape) - 1) and None not in (a, b) and a != b]
        if other:
            raise ValueError(f"pair {name!r} -> {self.pairs[name]!r}: features of shape {s_shape} and {t_shape} differ "
                             "outside the feature dimension (only the width may differ)")
        if ws == wt and not always:
            return None
        return nn.Conv2d(ws, wt, kernel_size=1, bias=False) if conv else nn.Linear(ws, wt, bias=False)

    def projection(self, student_module: str) -> nn.Module | None:
        """The learned projection of a pair (``None`` where the widths agree)."""
        key = self._key(student_module)
        return self.projections[key] if key in self.projections else None  # noqa: SIM401 (ModuleDict has no get)

    def loss(self) -> torch.Tensor:
        """Mean distance over the pairs, from the features recorded by the last forward passes; the
        recorded features are then released (each call needs new forward passes of both models)."""
        missing = [s for s in self.pairs if s not in self._student_out or s not in self._teacher_out]
        if missing:
            raise RuntimeError(f"no features recorded for pairs {missing} since the last loss(): run student(x) and "
                               "teacher(x) first")
        total = 0.0
        for s in self.pairs:
            fs, ft = self._student_out.pop(s), self._teacher_out.pop(s)
            projection = self.projection(s)
            if projection is not None:
                fs = projection(fs)  # Linear on the last dimension; 1x1 Conv2d on (N, C, H, W)
            if fs.shape != ft.shape:
                raise ValueError(f"pair {s!r} -> {self.pairs[s]!r}: student features {tuple(fs.shape)} (after the "
                                 f"projection) vs teacher features {tuple(ft.shape)}")
            ft = ft.to(fs.dtype)
            if self.distance == "mse":
                total = total + F.mse_loss(fs, ft)
            else:
                dim = 1 if fs.dim() == 4 else -1
                total = total + (1 - F.cosine_similarity(fs, ft, dim=dim)).mean()
        return total / len(self.pairs)

    def remove(self) -> None:
        """Remove the forward hooks from both models."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._student_out.clear()
        self._teacher_out.clear()

    def __enter__(self) -> FeatureDistiller:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

"""The Sparsifier: one object that composes score, pattern, distribution and schedule.

Lifecycle ``prepare -> step -> finalize`` (torch.ao.pruning): the constructor
validates everything, attaches masks and, if the schedule says so at step 0, prunes;
``sp.step()`` after each optimizer step advances the schedule and recomputes masks on
update steps; ``sp.finalize()`` leaves plain parameters with exact zeros.

The user keeps their loop (JaxPruner's ``wrap_optax``)::

    sp = sn.Sparsifier(model, sparsity=0.9, schedule=sn.Polynomial(end_step=1000, frequency=100))
    opt = sp.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3))
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sp.step()
    sp.finalize()
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core import checks
from ..core.distributions import DISTRIBUTIONS, layer_densities
from ..core.masks import (
    MaskedParam,
    attach_mask,
    attach_masks,
    get_masks,
    has_mask,
    masked_parameters,
    remove_masks,
    snapshot,
    unchanged_since,
    zero_masked_,
)
from ..core.methods import Method, ScoreContext, check_scores_informative, make_method
from ..core.patterns import Pattern, check_layers, parse_pattern
from ..core.schedules import Schedule, make_schedule
from ..core.targets import Selector, select_parameters
from .backends import training_backend
from .checkpoint_checks import check_sparsifier
from .distributed import (
    DEFAULT_ARRIVAL_TIMEOUT_S,
    arrival_timeout_seconds,
    check_masks_consistent,
    compare_masks_across_ranks,
    is_distributed,
    unwrap_model,
)
from .layer_swap import SWAP_MODES, LayerSwap
from .masked_optim import MaskedOptimizerHooks

_SEED_SALT = 0x5EED_5A17  # decorrelates the sparsifier's draws from torch.manual_seed(seed)'s


def _check_sparsity(value: Any, what: str = "sparsity") -> float:
    return checks.sparsity(what, value)


def _check_maskable(params: dict[str, torch.Tensor]) -> None:
    """Masks are kept through gradients and optimizer steps: only trainable floating-point parameters
    can be masked. Checked before anything is attached, so a refusal leaves the model as it was."""
    wrong_dtype = [f"{n} ({p.dtype})" for n, p in params.items() if not p.is_floating_point()]
    if wrong_dtype:
        raise TypeError(f"only floating-point parameters can be masked, not {', '.join(wrong_dtype)}; "
                        "exclude them (exclude=[...])")
    frozen = [n for n, p in params.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"parameters {', '.join(frozen)} do not require grad (frozen); a Sparsifier masks "
                         "parameters it trains: unfreeze them (requires_grad_(True)) or exclude them (exclude=[...])")


def _make_method_checked(method: Method | str, kwargs: dict) -> Method:
    if isinstance(method, Method) or not kwargs:
        return make_method(method, **kwargs)
    from ..core.methods import METHODS

    cls = METHODS.get(method)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {method!r} does not take {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted) or '(no options)'}"
        )
    return cls(**kwargs)


class Sparsifier:
    """Masks a model's parameters and keeps them on a sparsity schedule.

    Args:
        model: any ``nn.Module``. A ``DistributedDataParallel`` (or ``DataParallel``) model is
            unwrapped: names, masks and scores are those of ``model.module`` (``fc1.weight``,
            no ``module.`` prefix), the same as when given ``model.module``.
        sparsity: global target fraction of zeros in [0, 1). Defaults to ``1 - N/M``
            for an N:M pattern; required otherwise.
        method: a registered method name (``sn.list_methods()``) or a :class:`Method`.
        pattern: ``"unstructured"``, ``"N:M"``, ``"blockHxW"``, ``"channel"``,
            ``"channel_in"`` or a :class:`Pattern`.
        distribution: ``"uniform"``, ``"global"``, ``"erk"`` or ``"er"``.
        schedule: a :class:`Schedule`, a schedule name or its dict; default the method's
            ``default_schedule()`` (DST: constant, every ``update_every`` steps), else one-shot at step 0.
        include, exclude: selectors (module types, name patterns, lists); see
            :mod:`sparsenn.core.targets`. Default: the weights of Linear, Conv and
            MultiheadAttention modules. A ``channel`` pattern leaves the model's output layer
            dense (with a warning) unless ``include`` names it.
        overrides: ``{parameter name or glob: sparsity}`` fixed per layer; the rest of the
            budget is redistributed so the global target holds.
        data: any iterable of ``(input, target)`` batches, used by data-dependent scores.
        loss_fn: ``loss_fn(model(input), target)``; cross-entropy by default.
        score_batches: how many batches a data-dependent score draws per update.
        seed: seeds the sparsifier's own generator (random scores, random growth). Under DDP, the
            same on every rank. The seed is salted: ``torch.manual_seed(s)`` before building the
            model and ``seed=s`` here draw different streams, so a random mask is independent of
            the initial weights (unsalted, it would keep exactly the largest initial weights of a
            uniform init, since both come from the same uniform draws).
        check_distributed: when ``torch.distributed`` is initialized, verify in every ``set_masks``
            (so at every update), before anything changes, and before the first step for the
            initial masks, that all ranks hold the same masks
            (:func:`sparsenn.train.distributed.check_masks_consistent`, a collective).
        process_group: the group whose ranks must agree; default the DDP model's, else the
            default group.
        arrival_timeout: seconds a rank waits for the others at such a check before raising
            :class:`~sparsenn.train.rendezvous.RanksOutOfStepError` (a rank alone in ``set_masks``);
            longer than the ranks can legitimately drift apart between two collectives.
        backend: how masked layers are stored while they train. ``"dense"`` (default): dense
            parameters, zeros enforced by the mask hooks. ``"sparse"``: masked ``nn.Linear`` layers
            become sparse-training layers whose parameter is the vector of active values
            (SparseProp, Nikdan et al. 2023; :mod:`sparsenn.train.layer_swap`): forward, input
            gradient and weight gradient skip the zeros, and optimizer state is kept per active
            value. Same results to float tolerance; optimizers must be wrapped (:meth:`wrap`).
            Not with ``torch.distributed``, nor with methods that read every step's dense gradient
            (movement).
        swap: with ``backend="sparse"``: ``"measured"`` (default) swaps a layer only where one
            training step is measured faster sparse, at the first step (on the first training
            batch's inputs) and again when its number of active weights changes; ``"always"``
            swaps every candidate at once. :meth:`backend_report` says what was decided.
        **method_kwargs: passed to the method's constructor.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        *,
        method: Method | str = "magnitude",
        pattern: Pattern | str = "unstructured",
        distribution: str = "uniform",
        schedule: Schedule | str | dict | None = None,
        include: Selector = None,
        exclude: Selector = None,
        overrides: dict[str, float] | None = None,
        data: Iterable | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        score_batches: int = 1,
        seed: int = 0,
        check_distributed: bool = True,
        process_group: Any = None,
        arrival_timeout: float = DEFAULT_ARRIVAL_TIMEOUT_S,
        backend: str = "dense",
        swap: str = "measured",
        **method_kwargs: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(check_distributed, bool):
            raise TypeError(f"check_distributed must be True or False, got {check_distributed!r}")
        training = training_backend(backend)  # unknown names list the valid ones
        if swap not in SWAP_MODES:
            raise ValueError(f"swap must be one of {', '.join(map(repr, SWAP_MODES))}, got {swap!r}")
        model, ddp_group = unwrap_model(model)  # DDP: same names as for ddp.module
        if training is not None and (ddp_group is not None or is_distributed(process_group)):
            raise ValueError(f"backend={backend!r} does not support torch.distributed training; use backend='dense'")
        self.check_distributed = check_distributed
        self.process_group = process_group if process_group is not None else ddp_group
        self.arrival_timeout = arrival_timeout_seconds(arrival_timeout)
        self.pattern = parse_pattern(pattern)
        if sparsity is None:
            if self.pattern.max_density >= 1.0:
                raise ValueError("sparsity is required (a number in [0, 1)) for pattern "
                                 f"{self.pattern.name!r}")
            sparsity = 1.0 - self.pattern.max_density
        self.target = _check_sparsity(sparsity)
        if 1.0 - self.target > self.pattern.max_density + 1e-12:
            raise ValueError(
                f"pattern {self.pattern.name} keeps at most {self.pattern.max_density:g} of the weights, "
                f"so sparsity must be >= {1 - self.pattern.max_density:g}; got {self.target:g}"
            )
        self.method = _make_method_checked(method, method_kwargs)
        if training is not None and self.method.observes_every_step:
            raise ValueError(f"method {self.method.name!r} reads the dense gradient at every step, which "
                             f"backend={backend!r} does not compute; use backend='dense'")
        if not self.method.supports(self.pattern):
            raise ValueError(
                f"method {self.method.name!r} cannot produce pattern {self.pattern.name!r}; "
                f"it supports: {', '.join(self.method.patterns)}"
            )
        DISTRIBUTIONS.get(distribution)  # unknown names raise, listing the valid ones
        self.distribution = distribution.lower()
        if schedule is None:
            schedule = self.method.default_schedule() or "one_shot"
        self.schedule = make_schedule(schedule)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not isinstance(score_batches, int) or score_batches < 1:
            raise ValueError(f"score_batches must be a positive integer, got {score_batches!r}")
        if self.method.needs_data and data is None:
            raise ValueError(
                f"method {self.method.name!r} scores weights on data: pass data=<iterable of (input, target) batches>"
            )
        self.overrides = {k: _check_sparsity(v, f"override for {k!r}") for k, v in (overrides or {}).items()}
        self.model = model
        self.data = data
        self.loss_fn = loss_fn
        self.score_batches = score_batches
        self.seed = seed
        self.include, self.exclude = include, exclude
        self.names = select_parameters(model, include, exclude, pattern=self.pattern)  # channel: head stays dense
        _check_maskable({n: model.get_parameter(n) for n in self.names})
        # resolved once: the per-step hooks must not walk the model (the Python cost of a masked step)
        self._own = [MaskedParam(n, model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])
                     for n in self.names]
        self._all = list(self._own)  # own + dependents, in named_parameters order
        params = dict(model.named_parameters())
        check_layers(self.pattern, {n: tuple(params[n].shape) for n in self.names})  # names all misfits
        layer_densities(self.distribution, {n: tuple(params[n].shape) for n in self.names}, self.target,
                        overrides=self.overrides,
                        scores={n: params[n].detach().abs() for n in self.names}
                        if self.distribution == "global" else None)  # validates overrides
        self.generator = torch.Generator().manual_seed((int(seed) + _SEED_SALT) % 2**63)
        self._pending_weights: dict[str, torch.Tensor] | None = None  # see _install_weights
        self.step_count = 0
        self.sparsity = 0.0  # the schedule's value at the last mask update
        self.history: list[tuple[int, float]] = []
        self.dense_grads = False  # True: gradient hooks let dense gradients through (RigL update steps)
        self._dense_for_update = False  # dense_grads was set for the method (wants_dense_grad)
        self.dependents: list[str] = []  # masks enforced and finalized here but never rescored
        self._optimizers: list[MaskedOptimizerHooks] = []
        self._grad_hooks: list[Any] = []
        self._zeroed: dict[int, tuple[Any, ...]] = {}  # id(param) -> snapshot(grad, mask) when the hook zeroed it
        self.finalized = False

        first = None
        if self.schedule.is_update_step(0):
            first = self.schedule.sparsity_at(0, self.target)
            new_masks = self._compute_masks(first, self._current_masks())  # may raise: model untouched
        # a tied parameter: one mask beside each of its names; no new masks: keep existing ones
        attach_masks(model, {n: None if first is None else new_masks[n] for n in self.names},
                     pattern=self.pattern.name)
        self._install_weights()
        self._register_grad_hooks()
        if first is not None:
            self.sparsity = first
            self.history.append((0, first))
        self._arm_dense_grads()
        # the initial masks are checked before the first step: a DDP built after this broadcasts rank 0's
        self._check_pending = True
        self.backend = backend.lower()
        self._dense_depth = 0  # densified() blocks open: the layers stay masked-dense
        self._swap = None if training is None else LayerSwap(
            training, model, self._own, lambda: [h.optimizer for h in self._optimizers], swap)
        self._sync_backend()

    # -- masks --------------------------------------------------------------------------------
    @property
    def masked(self) -> list[MaskedParam]:
        """The masked parameters this sparsifier manages."""
        return [mp for mp in self._own if has_mask(mp.module, mp.attr)]

    @property
    def enforced(self) -> list[MaskedParam]:
        """The masked parameters whose zeros this sparsifier's hooks enforce: its own and its dependents."""
        return [mp for mp in self._all if has_mask(mp.module, mp.attr)]

    def add_dependents(self, names: Iterable[str]) -> None:
        """Enforce (optimizer hooks, gradient hooks) and finalize masks set by someone else, e.g. the
        BatchNorm masks of :func:`sparsenn.structured.channels.couple_batchnorm`; they are never rescored."""
        self._check_live()
        masked = {mp.name: mp for mp in masked_parameters(self.model)}
        new = [n for n in names if n not in self.names and n not in self.dependents]
        missing = [n for n in new if n not in masked]
        if missing:
            raise ValueError(f"no mask on {missing}; attach masks before adding them as dependents")
        self._check_pending = self._check_pending or bool(new)
        for n in new:
            self.dependents.append(n)
            self._all.append(masked[n])
            self._grad_hooks.append(self._register_grad_hook(masked[n]))
        order = {name: i for i, (name, _) in enumerate(self.model.named_parameters())}
        self._all.sort(key=lambda mp: order[mp.name])

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {mp.name: mp.mask for mp in self.masked}

    def _current_masks(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        existing = get_masks(self.model)
        return {n: existing[n] if n in existing else torch.ones_like(params[n], dtype=torch.bool) for n in self.names}

    def context(self, masks: dict[str, torch.Tensor] | None = None) -> ScoreContext:
        return ScoreContext(
            model=self.model, params={mp.name: mp.param for mp in self._own},
            masks=masks if masks is not None else self.masks, data=self.data, loss_fn=self.loss_fn,
            num_batches=self.score_batches, generator=self.generator,
        )

    def _compute_masks(self, sparsity: float, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        for name in self.names:
            if not torch.isfinite(params[name]).all():
                raise ValueError(f"parameter {name!r} contains NaN or Inf; cannot score it")
        ctx = self.context(current)
        scores = self.method.score(ctx)
        if sparsity >= self.sparsity:  # pruning only removes: keep pruned weights pruned
            scores = {n: s.masked_fill(~current[n].to(s.device), -math.inf) for n, s in scores.items()}
        densities = layer_densities(
            self.distribution, {n: tuple(params[n].shape) for n in self.names}, sparsity,
            overrides=self.overrides, scores=scores if self.distribution == "global" else None,
        )
        solved = self.method.reconstruct(ctx, densities, self.pattern)  # SparseGPT: masks and weights at once
        weights = None
        if solved is not None:
            masks, weights = solved
            masks = {n: masks[n].to(device=params[n].device, dtype=torch.bool) for n in self.names}
        else:
            masks = {n: self.pattern.topk(scores[n], densities[n], n).to(params[n].device) for n in self.names}
        if self.method.data_driven:  # zero gradients: equal scores, a mask chosen by memory position
            check_scores_informative(self.method.name, scores, masks, joint=self.distribution == "global")
        self._pending_weights = weights  # installed with the masks
        return masks

    @torch.no_grad()
    def update(self, sparsity: float | None = None) -> None:
        """Recompute every mask now, at ``sparsity`` (default: the schedule's value at this step)."""
        self._check_live()
        if sparsity is None:
            sparsity = self.schedule.sparsity_at(self.step_count, self.target)
        sparsity = _check_sparsity(sparsity)
        with self.densified():  # scores, drops and growth see the dense weights (backend="sparse")
            new = self.method.update_masks(self, sparsity)  # methods that move masks themselves (DST)
            if new is None:
                new = self._compute_masks(sparsity, self.masks)
            self._set_masks(new)  # compares the new masks across ranks before installing them
            self._install_weights()
        self.sparsity = sparsity
        self.history.append((self.step_count, sparsity))

    @torch.no_grad()
    def _install_weights(self) -> None:
        """Write the weights a reconstructing method (:meth:`Method.reconstruct`) chose with its masks."""
        weights, self._pending_weights = self._pending_weights, None
        for mp in self._own if weights else ():
            if mp.name in weights:
                mp.param.copy_(weights[mp.name].to(mp.param.dtype).reshape(mp.param.shape))
                zero_masked_(mp.param, mp.mask)

    @torch.no_grad()
    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace masks, zero newly pruned and newly enabled weights, reset optimizer state where a
        mask changed (a regrown weight starts at 0 with fresh state, as in RigL).

        Under ``torch.distributed`` (``check_distributed``) a collective: every rank must call it, and
        the resulting masks are compared across ranks first; if they differ,
        :class:`~sparsenn.train.distributed.MaskMismatchError` on every rank and nothing changes."""
        self._check_live()
        with self.densified():
            self._set_masks(masks)

    def _set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        checked = self.check_distributed and is_distributed(self.process_group)
        if checked:  # here, not at the next step: DDP's next forward would overwrite differing masks
            compare_masks_across_ranks(
                {mp.name: masks[mp.name] if mp.name in masks and mp.name in self.names else mp.mask
                 for mp in self.enforced}, self.process_group, call="set_masks", timeout=self.arrival_timeout)
        self._check_pending = not checked
        for mp in self.masked:
            if mp.name not in masks:
                continue
            new = masks[mp.name].to(device=mp.mask.device, dtype=torch.bool)
            changed = new ^ mp.mask
            attach_mask(mp.module, mp.attr, new, pattern=self.pattern.name)
            if changed.any():
                mp.param.masked_fill_(changed & new, 0)
                for hooks in self._optimizers:
                    hooks.reset(mp.param, changed)

    # -- training-loop integration ---------------------------------------------------------------
    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make ``optimizer`` masked (in place, via step hooks) and return it."""
        self._check_live()
        hooks = MaskedOptimizerHooks(optimizer, lambda: self.enforced, self._observe, self._grad_is_zeroed)
        if self._swap is not None:
            try:  # an optimizer built over the model's dense weights moves to the sparse layers' values
                self._swap.adopt(optimizer)
            except ValueError:
                hooks.remove()
                raise
        self._optimizers.append(hooks)
        return optimizer

    # -- the training backend ----------------------------------------------------------------------
    def _sync_backend(self) -> None:
        """backend="sparse": the layers sparse, unless this step needs dense gradients (RigL's update steps)."""
        if self._swap is not None and not self.finalized and not self._dense_depth:
            self._swap.sync(dense=self.dense_grads)

    @contextmanager
    def densified(self):
        """``with sp.densified():`` every layer is its masked-dense ``nn.Linear`` inside the block (the model's
        ``state_dict``, reports and checkpoints are then those of ``backend="dense"``); the sparse layers come
        back after. A no-op for ``backend="dense"``."""
        if self._swap is None or self.finalized:
            yield self.model
            return
        self._swap.unswap_all()
        self._dense_depth += 1
        try:
            yield self.model
        finally:
            self._dense_depth -= 1
            self._sync_backend()

    def backend_report(self) -> list[dict[str, Any]]:
        """``backend="sparse"``: per masked parameter, whether it trains sparse, why, and the measured
        milliseconds per step each way; ``[]`` for ``backend="dense"``."""
        return [] if self._swap is None else self._swap.report()

    def _check_ranks(self) -> None:
        """All ranks hold the same masks, or :class:`~sparsenn.train.distributed.MaskMismatchError` on every rank."""
        if self.check_distributed and is_distributed(self.process_group):
            check_masks_consistent(self, self.process_group, call="the check before an optimizer step")
        self._check_pending = False

    def _observe(self) -> None:
        if self._check_pending:
            self._check_ranks()
        if type(self.method).observe is not Method.observe:
            self.method.observe(self.context())
        if self._dense_for_update:  # the dense gradient served its one observation
            self.dense_grads = self._dense_for_update = False

    def _arm_dense_grads(self) -> None:
        """Let dense gradients through the next backward pass if the method needs them for the update
        that ends the next step (RigL); the optimizer pre-hook switches them off after ``observe``."""
        nxt = self.step_count + 1
        want = self.schedule.is_update_step(nxt) and self.method.wants_dense_grad(nxt)
        if want or self._dense_for_update:
            self.dense_grads = self._dense_for_update = want

    def _register_grad_hooks(self) -> None:
        for mp in self.masked:
            self._grad_hooks.append(self._register_grad_hook(mp))

    def _register_grad_hook(self, mp: MaskedParam):
        """Zero ``.grad`` at masked positions, in place, right after backward accumulates it.

        A post-accumulate-grad hook rather than a tensor hook: a tensor hook may not modify the
        gradient it is given (it can be shared with other branches of the graph), so it must
        return a new tensor, and allocating a fresh gradient per parameter per step cost more
        than all the other mask work of a training step together. ``.grad`` belongs to the
        parameter, so zeroing it in place is safe. Under DDP the hook runs inside the
        parameter's AccumulateGrad node, before the reducer's hook reads ``.grad`` into its
        bucket, so the all-reduced gradient is zero there too."""
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if self.dense_grads or self.finalized or grad is None:
                return
            mask = mp.mask
            with torch.no_grad():
                zero_masked_(grad, mask)
            self._zeroed[id(param)] = snapshot(grad, mask)

        return mp.param.register_post_accumulate_grad_hook(hook)

    def _grad_is_zeroed(self, mp: MaskedParam) -> bool:
        """True if ``mp.param.grad`` is the very tensor the gradient hook zeroed under the current
        mask, unwritten since (same object, same version counter; the mask likewise): the
        optimizer pre-hook can then skip zeroing it again. Any later write, e.g. clipping in
        place, DDP copying the all-reduced gradient back, or ``p.grad = ...``, fails the test."""
        rec, grad = self._zeroed.get(id(mp.param)), mp.param.grad
        return rec is not None and grad is not None and unchanged_since(rec, grad, mp.mask)

    def step(self) -> bool:
        """Advance the schedule by one training step; returns True if masks were recomputed."""
        self._check_live()
        if self._check_pending:
            self._check_ranks()
        self.step_count += 1
        updated = self.schedule.is_update_step(self.step_count)
        if updated:
            self.update()
        self._arm_dense_grads()
        self._sync_backend()
        return updated

    def finalize(self) -> nn.Module:
        """Remove masks and hooks; parameters keep their exact zeros. Returns the model."""
        self._check_live()
        if self._swap is not None:  # the model's own nn.Linear layers come back, holding the trained weights
            self._swap.remove_hooks()
            self._swap.unswap_all()
        for h in self._grad_hooks:
            h.remove()
        for hooks in self._optimizers:
            hooks.remove()
        self._grad_hooks, self._optimizers = [], []
        remove_masks(self.model, list(self.names) + self.dependents)
        self.finalized = True
        return self.model

    def _check_live(self) -> None:
        if self.finalized:
            raise RuntimeError("this Sparsifier was finalized; create a new one to sparsify again")

    # -- state ---------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor's choices as a JSON-serializable dict."""
        return {
            "sparsity": self.target, "method": self.method.name, "method_config": self.method.config(),
            "pattern": self.pattern.name, "distribution": self.distribution,
            "schedule": self.schedule.to_dict(), "parameters": list(self.names),
            "overrides": dict(self.overrides), "score_batches": self.score_batches, "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters, generator and method state (masks live in the model's state_dict)."""
        return {
            "step_count": self.step_count, "sparsity": self.sparsity,
            "history": [list(h) for h in self.history], "generator": self.generator.get_state(),
            "method": self.method.state_dict(), "config": self.config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the whole state is checked first (a
        :class:`~sparsenn.CheckpointError` naming the field), so a bad one changes nothing."""
        check_sparsifier(state, self)
        self.method.load_state_dict(state.get("method", {}))
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step_count"])
        self.sparsity = float(state["sparsity"])
        self.history = [(int(s), float(v)) for s, v in state.get("history", [])]
        self._arm_dense_grads()
        self._check_pending = True  # resumed masks: verified across ranks before the next step
        self._sync_backend()

    def __repr__(self) -> str:
        return (f"Sparsifier(sparsity={self.target:g}, method={self.method.name!r}, pattern={self.pattern.name!r}, "
                f"distribution={self.distribution!r}, schedule={self.schedule!r}, layers={len(self.names)}, "
                f"step={self.step_count}{'' if self._swap is None else f', backend={self.backend!r}'})")

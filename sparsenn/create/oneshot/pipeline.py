"""``oneshot``: prune a pretrained transformer block by block from calibration data.

The SparseGPT procedure (Frantar & Alistarh 2023), for every method that needs data:
run the calibration batches up to the first block and record what it receives; then for
each block: run it with hooks that accumulate every Linear's input statistics, prune its
Linears (masks attached), run the *pruned* block to produce the next block's inputs. At
any time the process holds the model, one set of hidden states per calibration batch and
one block's statistics, never every layer's activations.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ...core import checks
from ...core.distributions import layer_densities
from ...core.masks import attach_mask, has_mask
from ...core.memory import release_free_memory
from ...core.patterns import NM, Row, Unstructured, parse_pattern
from ...core.progress import Bar
from .blocks import BlockInputs, OneShotError, capture_block_inputs, find_blocks
from .allocation import outlier_ratio, owl_sparsities
from .permute import nm_permutation
from .solvers import (HessianError, magnitude_prune, reconstruction_error, refit, sparsegpt_prune, wanda_prune,
                      wanda_scores)
from .stats import record_inputs

__all__ = ["DISTRIBUTIONS", "ONESHOT_METHODS", "BlockHooks", "LayerResult", "OneShotReport", "oneshot", "run_oneshot"]

ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class LayerResult:
    """One pruned Linear: its block, name (in the model), shape, achieved sparsity, relative
    reconstruction error ``||W X - W' X|| / ||W X||`` on the calibration inputs (``None``
    without data), and the seconds its pruning took."""

    block: int
    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float | None
    seconds: float


@dataclass
class OneShotReport:
    """What :func:`oneshot` did: settings, per-layer results, total seconds."""

    method: str
    pattern: str
    sparsity: float
    blocks: str
    calibration_batches: int
    calibration_tokens: int
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        """A plain-text table, one row per layer."""
        head = f"{'block':>5}  {'layer':<40} {'shape':>12} {'sparsity':>8} {'rel. error':>10} {'time':>7}"
        lines = [f"one-shot {self.method}, {self.pattern}, sparsity {self.sparsity:g}: "
                 f"{len(self.layers)} layers in {self.blocks}, {self.calibration_batches} calibration batches "
                 f"({self.calibration_tokens} tokens), {self.seconds:.1f} s", head, "-" * len(head)]
        for r in self.layers:
            err = "-" if r.error is None else f"{r.error:.4f}"
            lines.append(f"{r.block:>5}  {r.name:<40} {'x'.join(map(str, r.shape)):>12} {r.sparsity:>8.3f} "
                         f"{err:>10} {r.seconds:>6.2f}s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return self.table()


def _as_batches(calibration: Any, model: nn.Module) -> list[dict[str, Any]]:
    """Validated model-input dicts from an iterable of ``input_ids`` tensors or of input dicts."""
    if calibration is None:
        return []
    if torch.is_tensor(calibration) or isinstance(calibration, (dict, str, bytes)):
        raise OneShotError("calibration must be an iterable of batches (input_ids tensors or dicts of model "
                           f"inputs), got a single {type(calibration).__name__}; wrap it in a list")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    out = []
    for i, item in enumerate(calibration):
        batch = {"input_ids": item} if torch.is_tensor(item) else item
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise OneShotError(f"calibration batch {i}: expected an input_ids tensor or a dict with 'input_ids', "
                               f"got {type(item).__name__}")
        ids = batch["input_ids"]
        if not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.dtype is torch.bool or ids.numel() == 0:
            raise OneShotError(f"calibration batch {i}: input_ids must be a non-empty integer tensor, got "
                               f"{type(ids).__name__} {getattr(ids, 'dtype', '')}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise OneShotError(f"calibration batch {i}: input_ids must be 1-D or 2-D (batch x tokens), got shape "
                               f"{tuple(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise OneShotError(f"calibration batch {i}: token ids in [{low}, {high}], the model's vocabulary is "
                               f"[0, {vocab})")
        batch = {**batch, "input_ids": ids}
        mask = batch.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or tuple(mask.shape) != tuple(ids.shape)):
            raise OneShotError(f"calibration batch {i}: attention_mask of shape "
                               f"{tuple(getattr(mask, 'shape', ()))} for input_ids of shape {tuple(ids.shape)}")
        out.append(batch)
    return out


def _accepts(model: nn.Module, keyword: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _block_linears(name: str, block: nn.Module, exclude: tuple[str, ...]) -> dict[str, nn.Linear]:
    return {f"{name}.{n}": m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and not any(x in f"{name}.{n}" for x in exclude)}


def _check_shapes(layers: dict[str, nn.Linear], pattern, sparsity: float, method: str) -> None:
    """Every layer can carry the pattern at the sparsity, before anything changes."""
    bad = []
    for n, m in layers.items():
        if isinstance(pattern, NM) and m.in_features % pattern.m:
            bad.append(f"{n} ({m.in_features} inputs)")
    if bad:
        raise OneShotError(f"pattern {pattern.name} needs an input dimension divisible by {pattern.m}; not so in "
                           f"{', '.join(bad)}; leave them dense with exclude=[...]")
    if isinstance(pattern, NM) and abs(sparsity - (1 - pattern.max_density)) > 1e-9 and method == "sparsegpt":
        raise OneShotError(f"sparsegpt with {pattern.name} prunes exactly {1 - pattern.max_density:g}; got "
                           f"sparsity {sparsity:g}")
    if isinstance(pattern, NM) and sparsity < 1 - pattern.max_density - 1e-9:
        raise OneShotError(f"pattern {pattern.name} prunes at least {1 - pattern.max_density:g}; sparsity "
                           f"{sparsity:g} is out of reach")
    if method == "sparsegpt" and not isinstance(pattern, (Unstructured, Row, NM)):
        raise OneShotError(f"sparsegpt supports the patterns unstructured, per_row and N:M, got {pattern.name!r}")


DISTRIBUTIONS = ("uniform", "owl", "erk", "er")
#: a Linear (block-relative name) whose input is produced channel by channel (an elementwise activation,
#: gating) by these Linears' outputs and nothing else: permuting its inputs and their outputs alike
#: leaves the block's function unchanged (LLaMA/Mistral/Qwen MLPs, BERT, OPT)
PRODUCERS = {"mlp.down_proj": ("mlp.gate_proj", "mlp.up_proj"), "output.dense": ("intermediate.dense",),
             "fc2": ("fc1",), "mlp.fc2": ("mlp.fc1",)}


@dataclass(frozen=True)
class _Plan:
    """How every layer is pruned (the validated arguments of :func:`oneshot`)."""

    method: str
    pattern: Any
    per_row: bool
    block_size: int
    damp: float
    refit: bool
    measure_error: bool
    permute: bool = False

    @property
    def kind(self) -> str | None:
        """The input statistics the plan needs: ``hessian`` (SparseGPT, refit), ``norms`` (Wanda), none."""
        if self.method == "sparsegpt" or self.refit:
            return "hessian"
        return "norms" if self.method == "wanda" else None


def _layer_sparsities(distribution: str, sparsity: float, layers: list[dict[str, nn.Linear]], pattern,
                      ratios: list[float] | None, owl_lambda: float) -> dict[str, float]:
    names = {n: m for d in layers for n, m in d.items()}
    if distribution == "uniform":
        return {n: sparsity for n in names}
    if isinstance(pattern, NM):
        raise OneShotError(f"distribution {distribution!r} gives layers different sparsities; pattern "
                           f"{pattern.name} fixes every layer at {1 - pattern.max_density:g}: use "
                           "distribution='uniform'")
    if distribution == "owl":
        try:
            per_block = owl_sparsities(ratios, sparsity, owl_lambda)
        except ValueError as e:
            raise OneShotError(str(e)) from None
        return {n: per_block[i] for i, d in enumerate(layers) for n in d}
    densities = layer_densities(distribution, {n: tuple(m.weight.shape) for n, m in names.items()}, sparsity)
    return {n: 1.0 - d for n, d in densities.items()}


def _outlier_ratios(block_list: list[nn.Module], layers: list[dict[str, nn.Linear]], inputs: BlockInputs,
                    m: float, hooks: BlockHooks) -> list[float]:
    """OWL's per-block outlier ratios of Wanda scores, from the *dense* model's activations (one pass per
    block on a copy of the first block's inputs)."""
    hidden = [h.clone() for h in inputs.hidden]
    ratios = []
    for i, (block, linears) in enumerate(zip(block_list, layers)):
        hooks.load(i, block)
        recorder = _recorded_pass(block, linears, "norms", inputs, hidden, advance=True)
        ratios.append(outlier_ratio([wanda_scores(lin.weight, recorder.of(n).norms) for n, lin in linears.items()],
                                    m))
        hooks.release(i, block, pruned=False)
    return ratios


class BlockHooks:
    """What the pipeline calls around each block: :meth:`load` before the block runs, :meth:`release`
    after (``pruned``: its masks are attached and its outputs computed). The default does nothing;
    streaming (:mod:`.streaming`) loads the block's weights from files and writes them back."""

    def load(self, index: int, block: nn.Module) -> None:
        pass

    def release(self, index: int, block: nn.Module, pruned: bool) -> None:
        pass

    def partial(self, path: str, first: int, last: int) -> str:
        """What an error says when blocks ``first``..``last`` were pruned before it."""
        return f" Blocks {first}-{last} of {path} were already pruned (masks attached)."


@torch.no_grad()
def oneshot(model: nn.Module, method: str = "sparsegpt", sparsity: float = 0.5, pattern: str = "unstructured",
            calibration: Iterable[Any] | None = None, *, distribution: str = "uniform", refit: bool = False,
            permute: bool = False,
            blocks: str | None = None, per_row: bool | None = None, block_size: int = 128, damp: float = 0.01,
            owl_m: float = 5.0, owl_lambda: float = 0.08, exclude: Iterable[str] = (), progress: bool = False,
            measure_error: bool = True) -> nn.Module:
    """Prune ``model``'s Linear layers inside its repeated blocks in place, one block at a time; returns the
    model with masks attached (``finalize``, ``report``, ``convert``, ``save`` work on it) and the
    :class:`OneShotReport` as ``model.oneshot_report``.

    ``method``: ``"magnitude"`` (no data), ``"wanda"`` or ``"sparsegpt"``. ``calibration``: an
    iterable of ``input_ids`` tensors (1-D or batch x tokens) or of dicts of model inputs.
    ``pattern``: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``; sparsity ``1 - N/M``);
    magnitude and wanda also take block and channel patterns. ``distribution``: ``"uniform"``
    (every layer at ``sparsity``), ``"owl"`` (per block by its outliers; Yin et al. 2024;
    ``owl_m``, ``owl_lambda``), ``"erk"`` / ``"er"`` (by layer shape); the average is
    ``sparsity``. ``refit``: after the mask is chosen, re-fit each row's kept weights to the
    exact least-squares optimum on the calibration inputs (:func:`.solvers.refit`). ``permute``
    (N:M only): permute the inputs of the layers fed channel by channel by others (a LLaMA's
    ``down_proj``, a BERT's ``output.dense``) so that the mask keeps more (RIA, Zhang et al.
    2024); their producers' outputs are permuted alike, so the model computes the same function.
    ``per_row``:
    unstructured budgets per output row (default: True for magnitude and wanda, as in Wanda;
    False for sparsegpt, whose mask is chosen per block of ``block_size`` columns, as in
    SparseGPT). ``blocks``: the dotted name of the block list when it is not found
    automatically. ``exclude``: substrings of Linear names to leave dense. Embeddings, norms and
    the head (outside the blocks) stay dense. ``damp``: dampening as a fraction of the mean
    Hessian diagonal. ``measure_error``: the report's per-layer reconstruction error for methods
    without a Hessian (an extra product per Linear in the pass that feeds the next block).
    """
    return run_oneshot(model, method, sparsity, pattern, calibration, distribution=distribution, refit=refit,
                       permute=permute, blocks=blocks, per_row=per_row, block_size=block_size, damp=damp,
                       owl_m=owl_m, owl_lambda=owl_lambda, exclude=exclude, progress=progress,
                       measure_error=measure_error)


@torch.no_grad()
def run_oneshot(model: nn.Module, method: str, sparsity: float, pattern: str, calibration: Iterable[Any] | None, *,
                distribution: str, refit: bool, permute: bool, blocks: str | None, per_row: bool | None,
                block_size: int, damp: float, owl_m: float, owl_lambda: float, exclude: Iterable[str],
                progress: bool, measure_error: bool, hooks: BlockHooks | None = None) -> nn.Module:
    """:func:`oneshot` with :class:`BlockHooks` around every block (streaming)."""
    hooks = hooks or BlockHooks()
    if method not in ONESHOT_METHODS:
        raise OneShotError(f"unknown one-shot method {method!r}; valid: {', '.join(ONESHOT_METHODS)}")
    if distribution not in DISTRIBUTIONS:
        raise OneShotError(f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
    try:
        sparsity = checks.sparsity("sparsity", sparsity)
        pattern = parse_pattern(pattern)
        damp = checks.positive("damp", damp)
        owl_m, owl_lambda = checks.positive("owl_m", owl_m), checks.nonnegative("owl_lambda", owl_lambda)
    except (ValueError, TypeError) as e:
        raise OneShotError(str(e)) from None
    if not (isinstance(block_size, int) and block_size >= 1):
        raise OneShotError(f"block_size must be an int >= 1, got {block_size!r}")
    if permute and not isinstance(pattern, NM):
        raise OneShotError(f"permute=True raises what an N:M mask keeps; pattern {pattern.name!r} is not N:M")
    if permute and method == "magnitude":
        raise OneShotError("permute=True needs input statistics: method 'wanda' or 'sparsegpt'")
    if isinstance(pattern, Row):
        per_row = True
    plan = _Plan(method, pattern, method != "sparsegpt" if per_row is None else bool(per_row), block_size, damp,
                 bool(refit), bool(measure_error), bool(permute))
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    path, block_list = find_blocks(model, blocks)
    layers = [_block_linears(f"{path}.{i}", b, exclude) for i, b in enumerate(block_list)]
    every = {n: m for d in layers for n, m in d.items()}
    if not every:
        raise OneShotError(f"no Linear layer to prune in {path} (exclude={list(exclude)})")
    _check_shapes(every, pattern, sparsity, method)
    batches = _as_batches(calibration, model)
    needs_data = plan.kind is not None or distribution == "owl"
    if needs_data and not batches:
        raise OneShotError(f"method {method!r}{' with refit' if refit else ''}"
                           f"{' and distribution owl' if distribution == 'owl' else ''} needs calibration data: "
                           "calibration=<iterable of input_ids tensors>")
    if distribution not in ("uniform", "owl"):
        _layer_sparsities(distribution, sparsity, layers, pattern, None, owl_lambda)  # errors before any pass

    start = time.perf_counter()
    report = OneShotReport(method, pattern.name, sparsity, path, len(batches),
                           sum(int(b["input_ids"].numel()) for b in batches))
    was_training = model.training
    model.eval()
    done: list[int] = []
    bar = Bar(len(block_list), f"oneshot {method}", unit="block", enabled=progress)
    try:
        inputs = None
        if needs_data:
            extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
            inputs = capture_block_inputs(model, block_list[0], ({**b, **extra} for b in batches))
            release_free_memory()  # the embedding pass's temporaries
        ratios = _outlier_ratios(block_list, layers, inputs, owl_m, hooks) if distribution == "owl" else None
        sparsities = _layer_sparsities(distribution, sparsity, layers, pattern, ratios, owl_lambda)
        for i, block in enumerate(block_list):
            hooks.load(i, block)
            _prune_block(i, block, layers[i], inputs if plan.kind is not None else None, plan, sparsities, report)
            hooks.release(i, block, pruned=True)
            done.append(i)
            bar.update()
    except (OneShotError, HessianError, ValueError, RuntimeError) as e:
        where = hooks.partial(path, done[0], done[-1]) if done else " Nothing was changed."
        raise OneShotError(f"{e}{where}") from e
    finally:
        bar.close()
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    model.oneshot_report = report
    return model


def _solve_shared(layers: dict[str, nn.Linear], recorder, plan: _Plan,
                  sparsities: dict[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """SparseGPT on the layers of a block, one solve per shared input (q/k/v, gate/up) and sparsity: their
    rows are stacked under one inverse Hessian, each layer keeping its own budget (``segments``); the
    result equals separate solves. ``{name: (weight, keep, seconds)}``, the seconds split by rows."""
    out = {}
    for shared in recorder.groups():
        by_sparsity: dict[float, list[str]] = {}
        for n in shared:
            by_sparsity.setdefault(sparsities[n], []).append(n)
        for sparsity, group in by_sparsity.items():
            t0 = time.perf_counter()
            weights = [layers[n].weight.detach() for n in group]
            rows = [w.shape[0] for w in weights]
            new, keep = sparsegpt_prune(torch.cat(weights), recorder.of(group[0]).hessian, sparsity, plan.pattern,
                                        block_size=plan.block_size, damp=plan.damp, per_row=plan.per_row,
                                        name=", ".join(group), segments=rows)
            seconds = time.perf_counter() - t0
            for n, w_new, k in zip(group, new.split(rows), keep.split(rows)):
                out[n] = (w_new, k, seconds * w_new.shape[0] / sum(rows))
    return out


def _permute_inputs(block: nn.Module, layers: dict[str, nn.Linear], recorder, pattern) -> list[str]:
    """Permute the inputs of every known consumer (:data:`PRODUCERS`) for its N:M mask (RIA, Zhang et al.
    2024), and its producers' outputs alike: weights, biases, masks already attached, and the consumer's
    input statistics. Returns the consumers permuted."""
    names = dict(block.named_modules())
    done = []
    for relative, producers in PRODUCERS.items():
        consumer = layers.get(_full(layers, names, relative))
        sources = [layers.get(_full(layers, names, p)) for p in producers]
        if consumer is None or any(s is None for s in sources):
            continue
        full = _full(layers, names, relative)
        shared = next(g for g in recorder.groups() if full in g)
        if len(shared) > 1 or consumer.in_features % pattern.m:
            continue
        stats = recorder.of(full)
        perm = nm_permutation(wanda_scores(consumer.weight, stats.norms), pattern.n, pattern.m)
        # in place: a pretrained model's weights are often views of one memory-mapped file, which a new
        # tensor would leave mapped beside its copy (on SmolLM2 best 4:8 held 3 extra MB per layer)
        consumer.weight.data.copy_(consumer.weight.data[:, perm])
        if has_mask(consumer, "weight"):
            consumer.weight_mask.data.copy_(consumer.weight_mask.data[:, perm])
        for src in sources:
            src.weight.data.copy_(src.weight.data[perm])
            if src.bias is not None:
                src.bias.data.copy_(src.bias.data[perm])
            if has_mask(src, "weight"):
                src.weight_mask.data.copy_(src.weight_mask.data[perm])
        stats.norms = stats.norms[perm]
        if stats.hessian is not None:
            stats.hessian = stats.hessian[perm][:, perm]
        done.append(full)
    return done


def _full(layers: dict[str, nn.Linear], names: dict[str, nn.Module], relative: str) -> str | None:
    """The full name in ``layers`` of the block's module ``relative`` (None if absent)."""
    module = names.get(relative)
    return next((n for n, m in layers.items() if m is module), None) if module is not None else None


def _recorded_pass(block: nn.Module, layers: dict[str, nn.Linear], kind: str, inputs: BlockInputs,
                   hidden: list[torch.Tensor], advance: bool) -> record_inputs:
    """Run ``block`` on every calibration batch (``hidden[b]`` its hidden states) with hooks accumulating its
    Linears' input statistics of ``kind``, padding excluded; ``advance``: copy each output into ``hidden[b]``
    in place. Returns the recorder."""
    current = {"mask": None}
    with record_inputs(layers, kind, lambda: current["mask"]) as recorder:
        for b in range(len(inputs)):
            current["mask"] = inputs.tokens[b]
            recorder.next_batch()
            out = inputs.call(block, b, hidden[b])
            if advance:
                hidden[b].copy_(out)
            del out
    return recorder


def _prune_block(index: int, block: nn.Module, layers: dict[str, nn.Linear], inputs: BlockInputs | None,
                 plan: _Plan, sparsities: dict[str, float], report: OneShotReport) -> None:
    recorder = None
    if inputs is not None and layers:
        recorder = _recorded_pass(block, layers, plan.kind, inputs, inputs.hidden, advance=False)
        missing = [n for n in layers if not recorder.seen(n)]
        if missing:
            raise OneShotError(f"{', '.join(missing)}: never called in the block's forward pass; leave them out "
                               "with exclude=[...]")
        if plan.permute:
            _permute_inputs(block, layers, recorder, plan.pattern)
        release_free_memory()  # the statistics pass's temporaries, before the solvers allocate theirs
    originals, rows = {}, []
    solved = _solve_shared(layers, recorder, plan, sparsities) if plan.method == "sparsegpt" else {}
    release_free_memory()
    for name, layer in layers.items():
        t0 = time.perf_counter()
        weight, sparsity = layer.weight.detach(), sparsities[name]
        if plan.method == "magnitude":
            new, keep = magnitude_prune(weight, sparsity, plan.pattern, per_row=plan.per_row, name=name)
        elif plan.method == "wanda":
            new, keep = wanda_prune(weight, recorder.of(name).norms, sparsity, plan.pattern, per_row=plan.per_row,
                                    name=name)
        else:
            new, keep, seconds = solved[name]
            t0 -= seconds
        if plan.refit:
            new = refit(weight, keep, recorder.of(name).hessian, damp=plan.damp, start=new, name=name)
            release_free_memory()  # the float64 work tensors of the refit
        error = None
        if plan.kind == "hessian":
            error = reconstruction_error(weight, new, recorder.of(name).hessian)
        elif plan.measure_error and inputs is not None:
            originals[name] = weight.clone()
        layer.weight.data.copy_(new.to(layer.weight.dtype))
        attach_mask(layer, "weight", keep, pattern=plan.pattern.name)
        rows.append(LayerResult(index, name, tuple(weight.shape), 1.0 - float(keep.float().mean()), error,
                                time.perf_counter() - t0))
    recorder = None  # one block's statistics at a time
    if inputs is None:
        report.layers.extend(rows)
        return
    errors = {n: [0.0, 0.0] for n in originals}
    handles = []
    for name, w in originals.items():
        def hook(module, args, output, name=name, w=w):
            dense = torch.nn.functional.linear(args[0], w)
            pruned = output if module.bias is None else output - module.bias
            errors[name][0] += float(((dense - pruned) ** 2).sum(dtype=torch.float64))
            errors[name][1] += float((dense ** 2).sum(dtype=torch.float64))
        handles.append(layers[name].register_forward_hook(hook))
    try:
        for b in range(len(inputs)):
            # the pruned block feeds the next; written in place so that the freed output is reused by the next
            # batch's (a fresh tensor per batch fragments the heap by about the size of all hidden states)
            inputs.hidden[b].copy_(inputs.call(block, b, inputs.hidden[b]))
    finally:
        for h in handles:
            h.remove()
    release_free_memory()
    for r in rows:
        if r.name in errors:
            num, den = errors[r.name]
            r.error = math.sqrt(num / den) if den > 0 else 0.0
    report.layers.extend(rows)

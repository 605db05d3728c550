"""What a run is checked for beyond the schema: before training (the output folders can be
written, the schedule reaches its target within the run and its masks can be computed)
and after it (the masks are at the target)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .schema import RecipeError

__all__ = ["TargetMissed", "check_outputs", "check_schedule_reaches_target", "check_target_reached",
           "output_folder", "ramp_hint"]


def output_folder(recipe: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """Where a run writes: ``out_dir``, else ``outputs.dir``, else ``runs/NAME``."""
    return Path(out_dir or recipe["outputs"]["dir"] or Path("runs") / recipe["name"])


def check_outputs(recipe: dict[str, Any], source: str, out_dir: str | Path | None = None,
                  checkpoint_path: str | Path | None = None) -> None:
    """Fail before training, not after, when the output folder (or the checkpoint's) cannot be written."""
    _check_writable(output_folder(recipe, out_dir), "outputs.dir" if out_dir is None else "output folder", source)
    if checkpoint_path is not None:
        _check_writable(Path(checkpoint_path).parent, "checkpoint folder", source)


def _check_writable(folder: Path, what: str, source: str) -> None:
    """``folder``, or where it does not exist yet its nearest existing parent, must be a folder
    this process can create files in: a probe file is created there and removed."""
    import os
    import tempfile

    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise RecipeError(source, [f"{what}: cannot create {str(folder)!r}: {str(existing)!r} is a file"])
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparsenn-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        goal = "" if existing == folder else f" to create {str(folder)!r}"
        raise RecipeError(source, [f"{what}: cannot write in {str(existing)!r}{goal} "
                                   f"([Errno {e.errno}] {e.strerror})"]) from None


def check_schedule_reaches_target(sp: Any, total: int, steps: str, source: str) -> None:
    """The schedule ends at its target within ``total`` steps, and the masks of its first
    update and of the target can be computed (on the dry-run Sparsifier ``sp``)."""
    schedule, target = sp.schedule, sp.target
    reached = schedule.sparsity_at(total, target)
    if reached < target - 1e-9:
        raise RecipeError(source, [f"sparsify.schedule: the run has {steps} but the schedule reaches its target "
                                   f"{target:g} at step {schedule.end_step}; at step {total} it is at sparsity "
                                   f"{reached:.4g} (give end as a fraction of the run, e.g. end: 0.75, or fewer "
                                   f"steps)"])
    if getattr(sp.method, "dynamic", False):
        return  # DST moves masks at a constant sparsity (checked at step 0 by the constructor)
    candidates = sorted({schedule.begin_step, *getattr(schedule, "round_steps", ()), schedule.end_step})
    first = next((s for s in candidates if s <= total and schedule.is_update_step(s)), None)
    done = {h[1] for h in sp.history}  # the constructor computed the masks of step 0
    updates = [(first, schedule.sparsity_at(first, target))] if first is not None else []
    updates.append((schedule.end_step, target))
    for step, sparsity in updates:
        if sparsity in done:
            continue
        try:
            sp.update(sparsity)
        except (ValueError, TypeError) as e:
            raise RecipeError(source, [f"sparsify.schedule: the mask update at step {step} (sparsity "
                                       f"{sparsity:.4g}) is out of reach: {e}"
                                       f"{ramp_hint(sp.pattern, sparsity < target)}"]) from None
        done.add(sparsity)


def ramp_hint(pattern: Any, ramp: bool) -> str:
    """Why a gradual schedule fails with an N:M pattern (each layer's density is fixed at N/M)."""
    if not ramp or pattern.max_density >= 1:
        return ""
    return "; N:M patterns fix the sparsity: use schedule one_shot (or constant), or pattern unstructured for a " \
           "gradual ramp"


class TargetMissed(RuntimeError):
    """A run ended below its target sparsity (its outputs are written): ``sparsenn run`` exits 1."""


def check_target_reached(sp: Any, out: Path) -> None:
    """After the run: the schedule's last mask update was at the target, and the masks hold it."""
    masks = [mp.mask for mp in sp.masked]
    kept = sum(int(m.sum()) for m in masks)
    total = sum(m.numel() for m in masks)
    measured = 1.0 - kept / total if total else 0.0
    tolerance = 0.02 if not sp.overrides else 1.0  # overrides change the budget; rounding of small layers
    if sp.sparsity >= sp.target - 1e-9 and measured >= sp.target - tolerance:
        return
    last = (f"the schedule's last mask update set {sp.history[-1][1]:.4g}, at step {sp.history[-1][0]}"
            if sp.history else "no mask update happened")
    raise TargetMissed(f"the run ended at sparsity {measured:.1%} ({last}) but the target is {sp.target:.1%}; "
                       f"the outputs are in {str(out)!r}")

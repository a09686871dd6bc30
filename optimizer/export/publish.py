"""Export: bake one trial's steering into a copy of the model's weights, verify it, publish it.

For every target matrix W the trial steers with weight w along r̂, the export writes
W' = W − w·r̂(r̂ᵀW) (per expert for expert stacks, and per expert tensor when a checkpoint
stores experts separately), and b' = b − w·r̂(r̂·b) for a projection's bias. Shard by shard:
a shard without edited tensors is copied byte for byte; in the others only the edited
tensors are new, the rest is written back unchanged. A quantized matrix is dequantized
with its own mode, group size and bits, edited in float32, then re-quantized the same way
(``keep``) or stored dense (``none``). Memory stays near one shard plus one tensor.

Everything is written to a hidden sibling of OUT_DIR, then checked (see :data:`TOLERANCES`):
the exported model is loaded back with mlx-lm and its next-token logits on a few harmful
and harmless eval prompts are compared (1) with the same trial baked into the loaded model
in memory, stored at the export's precision — the file must be exactly that — and (2) with
the runtime-steered model the trial was scored with. Only if both hold is the directory
renamed to OUT_DIR; any failure leaves no partial OUT_DIR behind.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import optuna

from optimizer.errors import UserError
from optimizer.export.card import model_card
from optimizer.export.checkpoint import checkpoint_tensors, edit_units
from optimizer.export.edit import (
    EXPORT_DTYPES,
    QUANTIZE_CHOICES,
    ExportOptions,
    TargetEdits,
    export_tier,
)
from optimizer.export.verify import (
    Agreement,
    VerificationFailed,
    reference_logits,
    verification_prompts,
    verify,
)
from optimizer.export.write import WriteResult, write_model
from optimizer.files import current_umask
from optimizer.study.plan import StudyPlan
from optimizer.study.steered import load_trial_model


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well it matched."""

    out_dir: Path
    trial: int
    source: Path
    write: WriteResult = field(repr=False)
    agreement: Agreement
    seconds: dict[str, float]  # per phase: reference, write, verify
    peak_memory: dict[str, int]  # MLX's peak allocation per phase, bytes


def check_options(options: ExportOptions) -> None:
    """Refuse option values the CLI would not pass."""
    if options.dtype is not None and options.dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {options.dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    if options.quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {options.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")


def check_out_dir(out: Path, source: Path, force: bool) -> None:
    """Refuse an OUT_DIR that exists (without ``force``), is a file, or overlaps the source model."""
    real = out.resolve()
    if real == source or real in source.parents or source in real.parents:
        raise UserError(f"OUT_DIR {out} overlaps the source model directory {source}; choose a directory outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise UserError(f"OUT_DIR {out} exists and is not a directory; choose another path")
        if not force:
            raise UserError(f"OUT_DIR {out} already exists; choose another directory or pass --force to replace it")
    if not out.parent.is_dir():
        raise UserError(f"the parent directory of OUT_DIR, {out.parent}, does not exist; create it first")


def export_trial(
    plan: StudyPlan,
    study: optuna.Study,
    number: int,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    *,
    log: Callable[[str], None] = lambda _: None,
) -> ExportResult:
    """Bake trial ``number``'s steering into a copy of the study's model at ``out_dir``, verified."""
    check_options(options)
    out = Path(out_dir).expanduser().absolute()
    source = plan.model_path.resolve()
    check_out_dir(out, source, options.force)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.abopt-export-", dir=out.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; OUT_DIR gets the usual mode
    except OSError as error:
        raise UserError(f"cannot write in {out.parent} ({error.strerror or error}); choose a writable OUT_DIR") from None
    try:
        result = _export_into(plan, study, number, staging, out, options, log)
        _publish(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise UserError(
                f"writing the export failed ({error.strerror or error}); nothing was written to {out} — "
                "free some disk space or choose another OUT_DIR"
            ) from None
        raise
    log(f"exported to {out}")
    return ExportResult(out, number, source, *result)


def _export_into(
    plan: StudyPlan,
    study: optuna.Study,
    number: int,
    staging: Path,
    out: Path,
    options: ExportOptions,
    log: Callable[[str], None],
) -> tuple[WriteResult, Agreement, dict[str, float], dict[str, int]]:
    seconds: dict[str, float] = {}
    peaks: dict[str, int] = {}
    start = time.perf_counter()
    mx.reset_peak_memory()
    log(f"loading {plan.config.model} with trial {number}'s steering")
    trial_model = load_trial_model(plan, study, number)
    tensors = checkpoint_tensors(plan.model_path)
    units = edit_units(trial_model.loaded.targets, tensors)
    weights, record, params = trial_model.weights, trial_model.record, trial_model.params
    # Post-norm targets' rows depend on the norms' weights: read them while the model is loaded.
    edits = TargetEdits.of(trial_model.loaded.targets, trial_model.direction, **params.steering_options())
    tier = export_tier(units, weights, tensors, options, trial_model.loaded.dtype)
    reference = reference_logits(
        trial_model.loaded,
        trial_model.model.steering,
        weights,
        edits,
        units,
        tensors,
        options,
        verification_prompts(plan),
        plan.config.prompts.system_prompt,
    )
    del trial_model  # the weights are streamed from disk from here on
    gc.collect()
    mx.clear_cache()
    seconds["reference"], peaks["reference"] = time.perf_counter() - start, mx.get_peak_memory()

    start = time.perf_counter()
    mx.reset_peak_memory()
    result = write_model(plan.model_path, staging, units, weights, edits, options, log=log)
    seconds["write"], peaks["write"] = time.perf_counter() - start, mx.get_peak_memory()

    start = time.perf_counter()
    mx.reset_peak_memory()
    log(f"verifying: reloading the export and comparing next-token logits on {len(reference.prompts)} prompts")
    agreement = verify(staging, reference, tier, plan.config.dtype)
    seconds["verify"], peaks["verify"] = time.perf_counter() - start, mx.get_peak_memory()
    if not agreement.passed:
        raise VerificationFailed(agreement)
    log(f"verified: {agreement.describe()}")
    card = model_card(plan, study, record, params, weights, out, options, units, result, agreement)
    (staging / "README.md").write_text(card)
    return result, agreement, seconds, peaks


def _publish(staging: Path, out: Path) -> None:
    """Move the finished export to ``out``, replacing an existing directory only at the end."""
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.abopt-replaced-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)



"""Checking an export: loaded back, the written model must give the trial's logits (see TOLERANCES)."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import mlx.core as mx
import numpy as np

from optimizer.engine.bake import QUANTIZED_TYPES, bake_target
from optimizer.engine.model import (
    LoadedModel,
    chat_tokens,
    forward,
    last_positions_only,
    load_model,
    pad_left,
)
from optimizer.engine.steering import Steering
from optimizer.errors import UserError
from optimizer.export.checkpoint import (
    QUANT_PARTS,
    SAFETENSORS_DTYPES,
    EditUnit,
    TensorInfo,
    source_float_dtype,
)
from optimizer.export.edit import (
    EXPORT_DTYPES,
    ExportOptions,
    TargetEdits,
    as_edits,
    edited_tensors,
    export_tier,
    stored_dtype,
    unit_scale,
)
from optimizer.study.plan import StudyPlan

VERIFY_PROMPTS = 4  # per kind: the first harmful and the first harmless eval prompts


# What the exported model's next-token logits must satisfy, by how its edited tensors are
# stored (measurements behind the numbers: README, "Verification, and its tolerances"). "relative" is
# max|Δlogit| / max|logit|; KL is KL(runtime-steered ‖ exported), mean over the prompts;
# "effect" is KL(runtime-steered ‖ original), how much the trial changes the model.
#   exact:       edited tensors stored dense in float32, compared in float32: the export
#                is the runtime-steered model up to float32 summation order.
#   float:       edited (or all) tensors rounded to float16/bfloat16, or compared in them.
#   requantized: edited tensors re-quantized to their original packing: one more rounding
#                to a 4/8-bit grid, as large as the model's own quantization error.
# In the float and requantized tiers the file must first equal the same trial baked into the
# loaded model in memory at the export's precision (relative ≤ BAKE_RELATIVE for the compute
# dtype: catches wrong tensors, directions, layers, experts, packing, corruption); then the
# rounding must not undo the trial: its KL to the runtime-steered model must stay below
# kl_floor or kl_of_effect × the trial's effect.
TOLERANCES = {
    "exact": {"relative": 1e-4},
    "float": {"kl_floor": 1e-3, "kl_of_effect": 0.1},
    "requantized": {"kl_floor": 1e-2, "kl_of_effect": 0.5},
}
# 16-bit logits carry ~1e-2 relative rounding of their own, whatever the weights.
BAKE_RELATIVE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}



@dataclass(frozen=True)
class Reference:
    """Next-token logits the export is checked against, on the verification prompts."""

    prompts: tuple[str, ...]
    system_prompt: str
    dtype: str  # the compute dtype, which the export is loaded in too
    steered: np.ndarray  # the runtime-steered model: what the trial measured
    original: np.ndarray  # the untouched model
    baked: np.ndarray | None = None  # the trial baked in memory at the export's precision


@dataclass(frozen=True)
class Agreement:
    """How the exported model's next-token distributions compare with the references."""

    tier: str  # key of TOLERANCES
    compute_dtype: str
    prompts: int
    relative: float  # max|Δlogit| / max|logit| against the runtime-steered model
    bake_relative: float | None  # the same against the in-memory bake (float/requantized tiers)
    mean_kl: float  # KL(runtime-steered ‖ exported), mean over the prompts
    max_kl: float
    top1_agree: int  # prompts whose most likely next token is the runtime-steered model's
    effect_kl: float  # KL(runtime-steered ‖ original), mean: what the trial changes

    @property
    def kl_limit(self) -> float:
        limits = TOLERANCES[self.tier]
        return max(limits["kl_floor"], limits["kl_of_effect"] * self.effect_kl) if self.tier != "exact" else 0.0

    @property
    def file_ok(self) -> bool:
        """The files hold exactly the edit abopt meant to write."""
        if self.tier == "exact":
            return self.relative <= TOLERANCES["exact"]["relative"]
        return self.bake_relative is not None and self.bake_relative <= self.bake_limit

    @property
    def bake_limit(self) -> float:
        return BAKE_RELATIVE.get(self.compute_dtype, BAKE_RELATIVE["bfloat16"])

    @property
    def passed(self) -> bool:
        return self.file_ok and (self.tier == "exact" or self.mean_kl <= self.kl_limit)

    def describe(self) -> str:
        limits = TOLERANCES[self.tier]
        if self.tier == "exact":
            parts = [f"max relative logit error {self.relative:.1e} (limit {limits['relative']:.0e})"]
        else:
            bake = "n/a" if self.bake_relative is None else f"{self.bake_relative:.1e}"
            parts = [
                f"equals the in-memory bake to {bake} (limit {self.bake_limit:.0e})",
                f"KL to the runtime-steered model {self.mean_kl:.1e} (limit {self.kl_limit:.1e})",
            ]
        parts.append(f"top-1 token agrees on {self.top1_agree}/{self.prompts}")
        return f"{self.tier} tier, {self.prompts} prompts: " + ", ".join(parts) + f"; the trial's own effect is KL {self.effect_kl:.3g}"


class VerificationFailed(UserError):
    """The exported model does not compute what the trial does."""

    def __init__(self, agreement: Agreement) -> None:
        self.agreement = agreement
        if agreement.file_ok:
            advice = "the edit itself is lost in the rounding; export with --quantize none (or --dtype float32)"
        else:
            advice = "please report this as an abopt bug"
        super().__init__(
            f"export verification failed: the exported model disagrees with the trial's runtime steering "
            f"({agreement.describe()}); nothing was written to OUT_DIR — {advice}"
        )


def verification_prompts(plan: StudyPlan) -> list[str]:
    """The first few harmful and harmless eval prompts."""
    return list(plan.prompts.harmful_eval[:VERIFY_PROMPTS]) + list(plan.prompts.harmless_eval[:VERIFY_PROMPTS])


def next_token_logits(loaded: LoadedModel, prompts: Sequence[str], system_prompt: str = "") -> np.ndarray:
    """Float32 logits of the first response token for each prompt: (N, vocab)."""
    encoded = [chat_tokens(loaded.tokenizer, p, system_prompt) for p in prompts]
    tokens, padding = pad_left(encoded, loaded.tokenizer.pad_token_id or 0)
    with last_positions_only(loaded.model, 1):
        logits = forward(loaded.model, tokens, padding)[:, -1, :].astype(mx.float32)
    mx.eval(logits)
    return np.array(logits)


def reference_logits(
    loaded: LoadedModel,
    steering: Steering,
    layer_weights: Mapping[str, Sequence[float] | np.ndarray],
    direction: np.ndarray | TargetEdits,
    units: Sequence[EditUnit],
    tensors: Mapping[str, TensorInfo],
    options: ExportOptions,
    prompts: Sequence[str],
    system_prompt: str = "",
) -> Reference:
    """Untouched, runtime-steered and (unless the tier is exact) in-memory baked logits.

    ``steering`` is installed on ``loaded``. Baking removes it and changes the weights in
    place: use the model for nothing else afterwards.
    """
    edits = as_edits(direction)
    steering.clear()
    original = next_token_logits(loaded, prompts, system_prompt)
    steering.set(layer_weights, edits.directions, norm_preserving=edits.norm_preserving, post_norm=edits.post_norm)
    steered = next_token_logits(loaded, prompts, system_prompt)
    baked = None
    if export_tier(units, layer_weights, tensors, options, loaded.dtype) != "exact":
        steering.remove()
        bake_as_exported(loaded, units, layer_weights, edits, tensors, options)
        baked = next_token_logits(loaded, prompts, system_prompt)
    return Reference(tuple(prompts), system_prompt, loaded.dtype, steered, original, baked)


def bake_as_exported(
    loaded: LoadedModel,
    units: Sequence[EditUnit],
    layer_weights: Mapping[str, Sequence[float] | np.ndarray],
    edits: TargetEdits,
    tensors: Mapping[str, TensorInfo],
    options: ExportOptions,
) -> None:
    """Bake the edit into the loaded (unhooked) model in place, rounded as the export stores it.

    Works on the model's modules (expert stacks whole, whatever the checkpoint layout), so
    it shares only the arithmetic with :func:`write_weights`, not the key mapping or I/O.
    """
    compute = getattr(mx, loaded.dtype)
    first_unit = {}
    for unit in units:
        first_unit.setdefault(unit.path, unit)
    for target in loaded.targets:
        unit = first_unit[target.path]
        scale = unit_scale(unit, layer_weights)
        if scale == 0.0:
            continue
        module, r = target.module, edits.basis(target.layer, target.path)
        storage = stored_dtype(unit, tensors, options)
        if storage is None:  # re-quantized in place, by the very arithmetic the writer uses
            new = edited_tensors(
                _parts_as_stored(module, unit, tensors),
                unit.quantization,
                scale,
                r,
                weight_dtype=None,
                bias_dtype=EXPORT_DTYPES[options.dtype or SAFETENSORS_DTYPES[tensors[unit.key("bias")].dtype]] if "bias" in module else None,
                norm_preserving=edits.norm_preserving,
            )
            for part, value in new.items():
                current = module[part] if part in module else getattr(module, part, None)
                floating = current is not None and mx.issubdtype(current.dtype, mx.floating)
                setattr(module, part, value.astype(current.dtype) if floating else value)
        else:
            if isinstance(module, QUANTIZED_TYPES):  # dequantize from float32 scales, as the export does
                for part in ("scales", "biases"):
                    if part in module and module[part] is not None and mx.issubdtype(module[part].dtype, mx.floating):
                        setattr(module, part, module[part].astype(mx.float32))
            module = bake_target(
                loaded.model, target, scale, r, dtype=EXPORT_DTYPES[storage], norm_preserving=edits.norm_preserving
            ).module
            module.weight = module.weight.astype(compute)  # as loading the export does
            if "bias" in module:
                module.bias = module.bias.astype(compute)
        mx.eval(module.parameters())
    if options.dtype and options.dtype != source_float_dtype(tensors):
        _round_floats(loaded.model, EXPORT_DTYPES[options.dtype], compute)


def _parts_as_stored(module: object, unit: EditUnit, tensors: Mapping[str, TensorInfo]) -> dict[str, mx.array]:
    """A loaded quantized projection's arrays as its checkpoint stores them (the loaded model
    computes in float32; its float parts came from the checkpoint's dtype, exactly)."""
    parts = {}
    for part in ("weight", "scales", "biases", "bias"):
        value = module[part] if part in module else None
        if value is None:
            continue
        info = tensors.get(unit.key(part))
        stored = SAFETENSORS_DTYPES.get(info.dtype) if info else None
        parts[part] = value.astype(EXPORT_DTYPES[stored]) if stored and mx.issubdtype(value.dtype, mx.floating) else value
    global_scale = getattr(module, "global_scale", None)
    if global_scale is not None:
        parts["global_scale"] = global_scale
    return parts


def _round_floats(model, storage: mx.Dtype, compute: mx.Dtype) -> None:
    """Round every float weight (not quantization scales) to ``storage``, as the export stores it."""
    for _, module in model.named_modules():
        quantized = "scales" in module  # QuantizedLinear, QuantizedEmbedding, expert stacks...
        for name, value in list(module.items()):
            if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating) and not (quantized and name in QUANT_PARTS):
                setattr(module, name, value.astype(storage).astype(compute))
                mx.eval(module[name])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p, q = _log_softmax(p_logits), _log_softmax(q_logits)
    return np.maximum((np.exp(p) * (p - q)).sum(axis=-1), 0.0)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare(reference: Reference, exported: np.ndarray, tier: str) -> Agreement:
    """Agreement of the exported model's logits (N, vocab) with ``reference`` at ``tier``."""
    kl = _kl(reference.steered, exported)
    return Agreement(
        tier=tier,
        compute_dtype=reference.dtype,
        prompts=len(exported),
        relative=_relative(exported, reference.steered),
        bake_relative=None if reference.baked is None else _relative(exported, reference.baked),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        top1_agree=int((reference.steered.argmax(axis=-1) == exported.argmax(axis=-1)).sum()),
        effect_kl=float(_kl(reference.steered, reference.original).mean()),
    )


def verify(directory: Path, reference: Reference, tier: str, dtype: str = "auto") -> Agreement:
    """Load the exported model from ``directory`` in ``dtype`` and compare it with ``reference``."""
    loaded = load_model(str(directory), dtype=dtype)
    exported = next_token_logits(loaded, reference.prompts, reference.system_prompt)
    del loaded
    gc.collect()
    mx.clear_cache()
    return compare(reference, exported, tier)



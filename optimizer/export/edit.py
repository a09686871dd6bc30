"""The edit itself: each steered matrix W becomes (W − w·UUᵀW)·diag(k), its bias b − w·UUᵀb
(see :mod:`optimizer.engine.bake`), stored dense, in float, or re-quantized to its own
packing; and which verification tier that makes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import mlx.core as mx
import numpy as np

from optimizer.engine.bake import (
    ablate_bias,
    ablate_matrix,
    dequantize_arrays,
    layer_basis,
    quantize_arrays,
    target_basis,
)
from optimizer.engine.model import Target
from optimizer.export.checkpoint import (
    QUANT_PARTS,
    SAFETENSORS_DTYPES,
    EditUnit,
    Quantization,
    TensorInfo,
    source_float_dtype,
)

EXPORT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
QUANTIZE_CHOICES = ("keep", "none")


@dataclass(frozen=True)
class ExportOptions:
    """Choices of ``abopt export``."""

    dtype: str | None = None  # float dtype of rewritten float tensors; None: the source's
    quantize: str = "keep"  # quantized matrices: re-quantize ("keep") or store dense ("none")
    force: bool = False  # replace an existing OUT_DIR



def unit_scale(unit: EditUnit, layer_weights: Mapping[str, Sequence[float] | np.ndarray]) -> float:
    weights = layer_weights.get(unit.component)
    return 0.0 if weights is None else float(weights[unit.layer])


@dataclass(frozen=True)
class TargetEdits:
    """A trial's edit as export applies it, matrix by matrix, after the model is gone."""

    directions: np.ndarray  # as ``Steering.set`` takes them: (D,), (L, D) or (L, k, D)
    norm_preserving: bool = False
    post_norm: bool = False
    # Per target path, the rows removed where they are not the layer's directions (post-norm
    # targets: they depend on the norm's weights, read while the model was loaded).
    bases: Mapping[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(
        cls, targets: Sequence[Target], directions: np.ndarray, *, norm_preserving: bool = False, post_norm: bool = False
    ) -> "TargetEdits":
        directions = np.asarray(directions, dtype=np.float32)
        bases = {t.path: target_basis(t, directions, True) for t in targets if post_norm and t.post_norm is not None}
        return cls(directions, norm_preserving, post_norm, bases)

    def basis(self, layer: int, path: str) -> np.ndarray:
        """The (D,) or (k, D) rows removed at the target ``path`` of decoder layer ``layer``."""
        return self.bases[path] if path in self.bases else layer_basis(self.directions, layer)


def as_edits(direction: np.ndarray | TargetEdits) -> TargetEdits:
    """The original edit (one direction, removed as it is) from a bare direction array."""
    return direction if isinstance(direction, TargetEdits) else TargetEdits(np.asarray(direction, dtype=np.float32))


def stored_dtype(unit: EditUnit, tensors: Mapping[str, TensorInfo], options: ExportOptions) -> str | None:
    """The float dtype an edited matrix is written in; None when it is re-quantized."""
    if unit.quantization is not None:
        return None if options.quantize == "keep" else options.dtype or source_float_dtype(tensors)
    return options.dtype or SAFETENSORS_DTYPES.get(tensors[unit.key("weight")].dtype, "float32")


def export_tier(
    units: Sequence[EditUnit],
    layer_weights: Mapping[str, Sequence[float] | np.ndarray],
    tensors: Mapping[str, TensorInfo],
    options: ExportOptions,
    compute_dtype: str,
) -> str:
    """Which row of :data:`TOLERANCES` applies to this export, compared in ``compute_dtype``."""
    edited = [u for u in units if unit_scale(u, layer_weights) != 0.0]
    stored = {stored_dtype(u, tensors, options) for u in edited} | ({options.dtype} if options.dtype else set())
    if None in stored:
        return "requantized"
    return "exact" if compute_dtype == "float32" and stored <= {"float32"} else "float"


def edited_tensors(
    source: Mapping[str, mx.array],
    quantization: Quantization | None,
    scale: float,
    direction: np.ndarray | mx.array,
    *,
    weight_dtype: mx.Dtype | None,
    bias_dtype: mx.Dtype | None = None,
    norm_preserving: bool = False,
) -> dict[str, mx.array | None]:
    """New arrays for one matrix's parts (``source``: part → array as stored); None drops a part.

    The weight is stored dense in ``weight_dtype``, or, when that is None and the matrix is
    quantized, re-quantized to its own packing (from the scales' dtype, as mlx-lm quantizes).
    The bias, if any, gets the same edit and is stored in ``bias_dtype`` (default: its own).
    """
    out: dict[str, mx.array | None] = {}
    if quantization is None:
        edited = ablate_matrix(source["weight"].astype(mx.float32), direction, scale, norm_preserving=norm_preserving)
    else:
        q = quantization
        floats = {p: source[p].astype(mx.float32) for p in ("scales", "biases") if p in source and mx.issubdtype(source[p].dtype, mx.floating)}
        dense = dequantize_arrays(
            source["weight"],
            floats.get("scales", source["scales"]),
            floats.get("biases", source.get("biases")),
            group_size=q.group_size,
            bits=q.bits,
            mode=q.mode,
            global_scale=source.get("global_scale"),
        )
        edited = ablate_matrix(dense, direction, scale, norm_preserving=norm_preserving)
    if weight_dtype is not None:
        out["weight"] = edited.astype(weight_dtype)
        out.update({part: None for part in QUANT_PARTS if part in source})
    elif quantization is None:
        raise ValueError("a dense matrix needs a weight_dtype")
    else:
        out.update(requantized(edited, quantization, source["scales"].dtype, "global_scale" in source))
        if set(out) != set(source) - {"bias"}:
            raise RuntimeError(f"re-quantizing gave parts {sorted(out)}, the checkpoint has {sorted(source)}")
    if "bias" in source:
        bias = source["bias"]
        out["bias"] = ablate_bias(bias.astype(mx.float32), direction, scale).astype(bias_dtype or bias.dtype)
    return out


def requantized(edited: mx.array, q: Quantization, scales_dtype: mx.Dtype, global_scale: bool) -> dict[str, mx.array]:
    # Affine scales take the input's dtype: quantize from the dtype the source's scales have.
    if mx.issubdtype(scales_dtype, mx.floating):
        edited = edited.astype(scales_dtype)
    return quantize_arrays(edited, group_size=q.group_size, bits=q.bits, mode=q.mode, global_scale=global_scale)



"""The steering edit baked into weights: W' = (W − w·UUᵀW)·diag(k), b' = b − w·UUᵀb.

Runtime steering (:mod:`optimizer.steering`) replaces a projection's output y = Wx + b by
y − w·UUᵀy, where the rows of U are the orthonormal directions removed at that projection
(one refusal direction r̂, or a refusal subspace). Since UUᵀ(Wx + b) = UUᵀWx + UUᵀb, the
same map is the projection with weight (I − w·UUᵀ)W and bias (I − w·UUᵀ)b. The
norm-preserving edit also rescales each column of the edited weight (the vector input
channel j writes into the residual) back to its original norm: k_j = ‖c_j‖ / ‖c_j − w·UUᵀc_j‖,
a per-channel scale on the projection's *input*, which steering applies at runtime and
baking multiplies into the columns. These are pure functions on arrays (computed in float32,
returned in the input dtype), plus :func:`bake_into`, which applies them to a model's target
projections in place: export uses it, and the tests use it as the reference that runtime
steering must reproduce.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from optimizer.engine.directions import orthonormal_rows
from optimizer.engine.model import LoadedModel, Target, norm_scale

QUANTIZED_TYPES = (nn.QuantizedLinear, QuantizedSwitchLinear)
# A column lying (almost) wholly in the removed subspace keeps at most this share of its squared
# norm: its norm-preserving factor is capped at 1/sqrt(MIN_KEPT) = 100 instead of blowing up.
MIN_KEPT = 1e-4


def _unit(direction: mx.array | np.ndarray) -> mx.array:
    r = mx.array(direction).astype(mx.float32)
    if r.ndim != 1:
        raise ValueError(f"a direction is one vector, got shape {tuple(r.shape)}")
    return r / mx.linalg.norm(r)


def _rows(direction: mx.array | np.ndarray) -> mx.array:
    """(k, D) float32: one direction (normalised here) or k orthonormal rows (as given)."""
    r = mx.array(direction).astype(mx.float32)
    if r.ndim == 1:
        return _unit(r)[None]
    if r.ndim != 2:
        raise ValueError(f"expected a direction (D,) or orthonormal rows (k, D), got shape {tuple(r.shape)}")
    return r


def layer_basis(directions: np.ndarray, layer: int) -> np.ndarray:
    """One layer's directions from (D,) (the same everywhere), (L, D) or (L, k, D)."""
    return directions if directions.ndim == 1 else directions[layer]


def target_basis(target: Target, directions: np.ndarray, post_norm: bool = False) -> np.ndarray:
    """What steering removes from ``target``'s output: (D,) or (k, D) orthonormal rows.

    With ``post_norm`` on a projection whose output passes through an RMS norm (scale s)
    before the residual add, each r̂ becomes s ⊙ r̂ (orthonormalized): the norm's output
    along r̂ is (s ⊙ r̂)·y / rms(y), so removing s ⊙ r̂ from y removes r̂ from what reaches
    the residual, exactly.
    """
    rows = layer_basis(np.asarray(directions, dtype=np.float32), target.layer)
    if not post_norm or target.post_norm is None:
        return rows
    mapped = orthonormal_rows(np.atleast_2d(rows) * norm_scale(target.post_norm, rows.shape[-1]))
    return mapped[0] if rows.ndim == 1 else mapped


def norm_factor(column_sq: mx.array, removed_sq: mx.array, scale: float) -> mx.array:
    """Per input channel, ‖c‖ / ‖c − w·UUᵀc‖ from ‖c‖² and ‖Uᵀc‖² (float32, any shape)."""
    kept = 1.0 - (2.0 * scale - scale * scale) * removed_sq / mx.maximum(column_sq, 1e-30)
    return mx.rsqrt(mx.maximum(kept, MIN_KEPT))


def ablate_matrix(
    weight: mx.array, direction: mx.array | np.ndarray, scale: float, *, norm_preserving: bool = False
) -> mx.array:
    """(W − scale·UUᵀW)·diag(k) for W of shape (out, in), or per expert for (experts, out, in).

    ``out`` is the residual dimension the projection writes to; ``direction`` is one vector
    (normalised here) or (k, out) orthonormal rows. k = 1 unless ``norm_preserving``.
    """
    if weight.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D weight, got shape {tuple(weight.shape)}")
    rows = _rows(direction)
    if rows.shape[1] != weight.shape[-2]:
        raise ValueError(f"direction of size {rows.shape[1]} does not match weight output size {weight.shape[-2]}")
    w = weight.astype(mx.float32)
    along = rows @ w  # (k, in) or (experts, k, in): UᵀW
    if rows.shape[0] == 1:  # one direction: the original edit's arithmetic, unchanged
        edited = w - scale * rows[0][:, None] * along
    else:
        edited = w - scale * (rows.T @ along)
    if norm_preserving:
        factor = norm_factor(mx.sum(w * w, axis=-2), mx.sum(along * along, axis=-2), scale)
        edited = edited * mx.expand_dims(factor, -2)
    return edited.astype(weight.dtype)


def ablate_bias(bias: mx.array, direction: mx.array | np.ndarray, scale: float) -> mx.array:
    """b − scale·UUᵀb for b of shape (out,), or per expert for (experts, out)."""
    rows = _rows(direction)
    b = bias.astype(mx.float32)
    if rows.shape[0] == 1:
        r = rows[0]
        return (b - scale * (b @ r)[..., None] * r).astype(bias.dtype)
    return (b - scale * ((b @ rows.T) @ rows)).astype(bias.dtype)


def dequantize_arrays(
    weight: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    group_size: int,
    bits: int,
    mode: str,
    global_scale: mx.array | None = None,
    dtype: mx.Dtype = mx.float32,
) -> mx.array:
    """The dense weight that packed ``weight``/``scales``/``biases`` (as a checkpoint stores
    them, 2-D or an expert stack) stand for, as ``dtype``.

    ``global_scale`` is nvfp4's per-expert tensor scale of an expert stack, shape (experts,).
    """

    def dequantize(w: mx.array, s: mx.array, b: mx.array | None, g: mx.array | None) -> mx.array:
        return mx.dequantize(w, s, b, group_size=group_size, bits=bits, mode=mode, global_scale=g, dtype=dtype)

    if global_scale is None:
        return dequantize(weight, scales, biases, None)
    # One tensor scale per expert: dequantize expert by expert.
    return mx.stack(
        [
            dequantize(weight[e], scales[e], None if biases is None else biases[e], global_scale[e])
            for e in range(weight.shape[0])
        ]
    )


def quantize_arrays(
    weight: mx.array, *, group_size: int, bits: int, mode: str, global_scale: bool = False
) -> dict[str, mx.array]:
    """``weight`` quantized as mlx-lm stores it: "weight", "scales", and "biases" (affine) or
    "global_scale" (nvfp4 expert stacks quantized with one tensor scale per expert)."""
    if global_scale:
        scale = mx.max(mx.abs(weight), axis=(-2, -1)).astype(mx.float32)  # as mlx-lm computes it
        parts = [mx.quantize(weight[e], group_size, bits, mode=mode, global_scale=scale[e]) for e in range(weight.shape[0])]
        return {"weight": mx.stack([q for q, _ in parts]), "scales": mx.stack([s for _, s in parts]), "global_scale": scale}
    packed, scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
    return {"weight": packed, "scales": scales, **({"biases": biases[0]} if biases else {})}


def dequantized_weight(module: nn.Module, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The dense (out, in) or (experts, out, in) weight of a (quantized) projection, as ``dtype``.

    QuantizedLinear / QuantizedSwitchLinear are dequantized with their own mode, group size
    and bits (non-affine modes have no biases; nvfp4 expert stacks may carry a per-expert
    global scale); Linear / SwitchLinear return their weight.
    """
    if not isinstance(module, QUANTIZED_TYPES):
        return module["weight"].astype(dtype)
    return dequantize_arrays(
        module["weight"],
        module["scales"],
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
        global_scale=getattr(module, "global_scale", None),
        dtype=dtype,
    )


def _float_dtype(module: nn.Module) -> mx.Dtype:
    """The float dtype a projection computes in (scales of mxfp/nvfp modes are uint8)."""
    for name in ("bias", "scales", "weight"):
        if name in module and mx.issubdtype(module[name].dtype, mx.floating):
            return module[name].dtype
    return mx.float32


def _dense_module(module: nn.Module, weight: mx.array) -> nn.Module:
    """A Linear / SwitchLinear holding ``weight`` (and the module's bias, if any)."""
    has_bias = "bias" in module
    if weight.ndim == 3:
        experts, out_dims, in_dims = weight.shape
        dense = SwitchLinear(in_dims, out_dims, experts, bias=has_bias)
    else:
        out_dims, in_dims = weight.shape
        dense = nn.Linear(in_dims, out_dims, bias=has_bias)
    dense.weight = weight  # the random initial weight is lazy and never evaluated
    if has_bias:
        dense.bias = module["bias"]
    return dense


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent: object = model
    *parents, name = path.split(".")
    for part in parents:
        parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
    setattr(parent, name, module)


def bake_target(
    model: nn.Module,
    target: Target,
    scale: float,
    direction: np.ndarray,
    *,
    dtype: mx.Dtype | None = None,
    norm_preserving: bool = False,
) -> Target:
    """Bake one target's edit (``direction``: its (D,) or (k, D) rows, as :func:`target_basis`
    gives them) into ``model`` in place; returns the target with its current module."""
    module = target.module
    if scale == 0.0:
        return target
    out_dtype = dtype or _float_dtype(module)
    weight = ablate_matrix(dequantized_weight(module), direction, scale, norm_preserving=norm_preserving).astype(out_dtype)
    bias = ablate_bias(module["bias"], direction, scale) if "bias" in module else None
    if isinstance(module, QUANTIZED_TYPES):
        module = _dense_module(module, weight)
        _set_submodule(model, target.path, module)
    else:
        module.weight = weight
    if bias is not None:
        module.bias = bias.astype(out_dtype)
    mx.eval(module.parameters())
    return replace(target, module=module)


def bake_into(
    loaded_or_model: LoadedModel | nn.Module,
    targets: Sequence[Target],
    weights: Mapping[str, Sequence[float] | np.ndarray],
    directions: np.ndarray | mx.array,
    *,
    dtype: mx.Dtype | None = None,
    norm_preserving: bool = False,
    post_norm: bool = False,
) -> tuple[Target, ...]:
    """Apply the steering edit ``weights``/``directions`` (as in ``Steering.set``) to the weights.

    In place: a dense target gets its weight (and bias) replaced by the ablated arrays; a
    quantized target is replaced by a dense Linear / SwitchLinear holding its dequantized,
    then ablated weight (in ``dtype``, default the module's float dtype). Targets whose
    weight is 0 are left untouched. Returns the targets with their current modules.
    """
    model = loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model
    directions = np.asarray(directions, dtype=np.float32)
    return tuple(
        bake_target(
            model,
            target,
            float(weights[target.component][target.layer]) if target.component in weights else 0.0,
            target_basis(target, directions, post_norm),
            dtype=dtype,
            norm_preserving=norm_preserving,
        )
        for target in targets
    )

"""Runtime ablation: each target projection's output y becomes y − w·(y·r̂)·r̂, or y − w·UUᵀy
for a refusal subspace with orthonormal rows U.

The projections keep their own weights (dense, quantized or expert stacks) and compute as
before; steering adds one dot product and one scaled subtraction on their output. Moving
to the next trial only replaces per-projection floats and direction vectors, so a study
never copies, dequantizes or reloads a weight. The norm-preserving edit adds a per-channel
scale on the projection's input (see :mod:`optimizer.engine.bake`), computed once per trial
from the matrix's column norms (measured once per matrix and kept) and UᵀW (one product of
the directions with the packed weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Sequence

import mlx.core as mx
import numpy as np

from optimizer.engine.bake import QUANTIZED_TYPES, dequantized_weight, norm_factor, target_basis
from optimizer.engine.model import COMPONENTS, Target
from optimizer.engine.patch import patch, set_private, unpatch


def _steer_hook(module: Any, base_call: Any, *args: Any, **kwargs: Any) -> mx.array:
    factor = module._abopt_input_scale
    if factor is not None and module._abopt_scale != 0.0:
        x = args[0]
        # An expert stack's down projection gets each token's input per chosen expert, with
        # the expert indices as its second argument: scale by that expert's factors.
        x = x * (factor if factor.ndim == 1 else mx.expand_dims(factor[args[1]], -2))
        args = (x, *args[1:])
    y = _steer(module, base_call(module, *args, **kwargs))
    if y.ndim >= 3 and y.shape[-2] > 1:
        # A pass over whole prompts (a KL pass, a prefill) on a large model runs for
        # seconds: evaluating it projection by projection gives Ctrl-C and SIGTERM a point
        # to land on every layer, at no cost on a CPU and a few syncs per pass on a GPU.
        # Decode steps (one position) stay one graph each.
        mx.eval(y)
    return y


def _steer(module: Any, y: mx.array) -> mx.array:
    if module._abopt_scale == 0.0:
        return y
    direction, scale = module._abopt_direction, module._abopt_scale_array
    if direction.dtype != y.dtype:
        # Cast once to the dtype the projection computes in, and keep the cast.
        direction, scale = direction.astype(y.dtype), scale.astype(y.dtype)
        set_private(module, _abopt_direction=direction, _abopt_scale_array=scale)
    if module._abopt_compiled:
        return (_remove_subspace_compiled if direction.ndim == 2 else _remove_compiled)(y, direction, scale)
    return (_remove_subspace if direction.ndim == 2 else _remove)(y, direction, scale)


# How many times mx.compile traced the steering ops (a trace runs the Python body once): a
# new trial's weights and directions are array inputs, so they never cause another.
TRACES = {"count": 0}


def _remove(y: mx.array, direction: mx.array, scale: mx.array) -> mx.array:
    """y − w·(y·r̂)·r̂ for one unit direction r̂."""
    TRACES["count"] += 1
    return y - (scale * (y @ direction))[..., None] * direction


def _remove_subspace(y: mx.array, rows: mx.array, scale: mx.array) -> mx.array:
    """y − w·UUᵀy for orthonormal rows U."""
    TRACES["count"] += 1
    return y - scale * ((y @ rows.T) @ rows)


# One fused kernel for the scaling and the subtraction instead of three, for a GPU, where
# each kernel is a launch. On a CPU it measured no faster (organism, 64-row decode step with
# every projection steered: 17.7 ms op by op, 18.9 ms compiled on a quiet machine; in whole
# trials ×0.94–1.01), so there steering runs op by op unless told otherwise.
# Shapeless: the batch shrinks as answers finish, and must not cause a trace either.
_remove_compiled = partial(mx.compile, shapeless=True)(_remove)
_remove_subspace_compiled = partial(mx.compile, shapeless=True)(_remove_subspace)


def _column_sq(module: Any) -> mx.array:
    """Squared norm of each column of the (dequantized) weight: (in,) or (experts, in), float32.

    Measured once per matrix (a transient dense copy, one matrix at a time) and kept.
    """
    cached = getattr(module, "_abopt_column_sq", None)
    if cached is None:
        dense = dequantized_weight(module)
        cached = mx.sum(dense * dense, axis=-2)
        mx.eval(cached)
        del dense
        set_private(module, _abopt_column_sq=cached)
    return cached


def _along(module: Any, rows: mx.array) -> mx.array:
    """UᵀW from the projection's own (packed) weight: (k, in) or (experts, k, in), float32."""
    rows = rows.astype(_float_dtype(module))
    if not isinstance(module, QUANTIZED_TYPES):
        return (rows @ module["weight"]).astype(mx.float32)
    packed, scales, biases = module["weight"], module["scales"], module.get("biases")
    kwargs = dict(transpose=False, group_size=module.group_size, bits=module.bits, mode=module.mode)
    if packed.ndim == 2:
        return mx.quantized_matmul(rows, packed, scales, biases, **kwargs).astype(mx.float32)
    experts = packed.shape[0]
    stacked = mx.broadcast_to(rows, (experts, *rows.shape))
    global_scale = getattr(module, "global_scale", None)
    return mx.gather_qmm(
        stacked, packed, scales, biases, rhs_indices=mx.arange(experts), global_scale=global_scale, **kwargs
    ).astype(mx.float32)


def input_scale(module: Any, basis: np.ndarray, scale: float) -> mx.array:
    """The norm-preserving per-input-channel factor of a steered projection for one trial."""
    rows = mx.array(np.atleast_2d(basis)).astype(mx.float32)
    along = _along(module, rows)
    return norm_factor(_column_sq(module), mx.sum(along * along, axis=-2), scale).astype(_float_dtype(module))


def _float_dtype(module: Any) -> mx.Dtype:
    """The float dtype a projection computes in; mxfp4/mxfp8/nvfp4 scales are uint8."""
    for name in ("scales", "biases", "bias", "weight"):
        value = module.get(name) if name in module else None
        if value is not None and mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


@dataclass(frozen=True)
class Steering:
    """Steering hooks installed on a model's target projections."""

    targets: tuple[Target, ...]

    def set(
        self,
        weights: Mapping[str, Sequence[float] | np.ndarray],
        directions: np.ndarray | mx.array,
        *,
        norm_preserving: bool = False,
        post_norm: bool = False,
    ) -> None:
        """Steer with per-layer ``weights[component][layer]`` along ``directions``.

        ``directions`` is (D,) for one direction everywhere, (L, D) for one per layer, or
        (L, k, D) for k orthonormal directions per layer; rows must be unit vectors. A
        component missing from ``weights`` is not steered. ``norm_preserving`` and
        ``post_norm`` choose the edit as in :func:`optimizer.engine.bake.bake_into`.
        """
        directions = np.asarray(directions, dtype=np.float32)
        pending = []
        for target in self.targets:
            scale = float(weights[target.component][target.layer]) if target.component in weights else 0.0
            basis = target_basis(target, directions, post_norm)
            factor = input_scale(target.module, basis, scale) if norm_preserving and scale != 0.0 else None
            pending += [factor] if factor is not None else []
            dtype = _float_dtype(target.module)
            set_private(
                target.module,
                _abopt_scale=scale,
                _abopt_scale_array=mx.array(scale, dtype=dtype),
                _abopt_direction=mx.array(basis).astype(dtype),
                _abopt_input_scale=factor,
            )
        mx.eval(pending)

    def compile(self, on: bool = True) -> None:
        """Whether the steering ops run as one compiled kernel or op by op."""
        for target in self.targets:
            set_private(target.module, _abopt_compiled=on)

    @property
    def compiled(self) -> bool:
        return bool(self.targets) and self.targets[0].module._abopt_compiled

    def clear(self) -> None:
        """All weights 0: the model computes exactly as if unsteered."""
        for target in self.targets:
            set_private(target.module, _abopt_scale=0.0)

    def remove(self) -> None:
        """Uninstall the hooks, giving the projections back their own classes."""
        for target in self.targets:
            unpatch(target.module)


def install(targets: Sequence[Target], *, compiled: bool | None = None) -> Steering:
    """Hook every target projection; starts with all weights 0. ``compiled``: see
    ``Steering.compile``; by default on a GPU only (see ``_remove_compiled``)."""
    compiled = mx.default_device() == mx.gpu if compiled is None else compiled
    for target in targets:
        if target.component not in COMPONENTS:
            raise ValueError(f"unknown component {target.component!r}")
        set_private(target.module, _abopt_scale=0.0, _abopt_direction=None, _abopt_input_scale=None, _abopt_compiled=compiled)
        patch(target.module, _steer_hook)
    return Steering(tuple(targets))

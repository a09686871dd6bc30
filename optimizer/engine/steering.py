"""Runtime ablation: each target projection's output y becomes y − w·(y·r̂)·r̂.

The projections keep their own weights (dense, quantized or expert stacks) and compute as
before; steering adds one dot product and one scaled subtraction on their output. Moving
to the next trial only replaces per-projection floats and direction vectors, so a study
never copies, dequantizes or reloads a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import mlx.core as mx
import numpy as np

from optimizer.engine.model import COMPONENTS, Target
from optimizer.engine.patch import patch, set_private, unpatch


def _steer_hook(module: Any, base_call: Any, *args: Any, **kwargs: Any) -> mx.array:
    y = _steer(module, base_call(module, *args, **kwargs))
    if y.ndim >= 3 and y.shape[-2] > 1:
        # A pass over whole prompts (a KL pass, a prefill) on a large model runs for
        # seconds: evaluating it projection by projection gives Ctrl-C and SIGTERM a point
        # to land on every layer, at no cost on a CPU and a few syncs per pass on a GPU.
        # Decode steps (one position) stay one graph each.
        mx.eval(y)
    return y


def _steer(module: Any, y: mx.array) -> mx.array:
    scale = module._abopt_scale
    if scale == 0.0:
        return y
    direction = module._abopt_direction
    if direction.dtype != y.dtype:
        # Cast once to the dtype the projection computes in, and keep the cast.
        direction = direction.astype(y.dtype)
        set_private(module, _abopt_direction=direction)
    return y - (scale * (y @ direction))[..., None] * direction


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
    ) -> None:
        """Steer with per-layer ``weights[component][layer]`` along ``directions``.

        ``directions`` is (D,) for one direction everywhere or (L, D) for one per layer;
        rows must be unit vectors. A component missing from ``weights`` is not steered.
        """
        directions = mx.array(directions) if isinstance(directions, np.ndarray) else directions
        per_layer = directions.ndim == 2
        for target in self.targets:
            scale = float(weights[target.component][target.layer]) if target.component in weights else 0.0
            direction = directions[target.layer] if per_layer else directions
            set_private(target.module, _abopt_scale=scale, _abopt_direction=direction.astype(_float_dtype(target.module)))

    def clear(self) -> None:
        """All weights 0: the model computes exactly as if unsteered."""
        for target in self.targets:
            set_private(target.module, _abopt_scale=0.0)

    def remove(self) -> None:
        """Uninstall the hooks, giving the projections back their own classes."""
        for target in self.targets:
            unpatch(target.module)


def install(targets: Sequence[Target]) -> Steering:
    """Hook every target projection; starts with all weights 0."""
    for target in targets:
        if target.component not in COMPONENTS:
            raise ValueError(f"unknown component {target.component!r}")
        set_private(target.module, _abopt_scale=0.0, _abopt_direction=None)
        patch(target.module, _steer_hook)
    return Steering(tuple(targets))

"""Ablation-weight profiles: how strongly each decoder layer is steered, and a trial's whole
ablation (both components' profiles and its direction choice) as data.

A profile is set by four numbers: it equals ``max_weight`` at ``max_weight_position``, falls
to ``min_weight`` at ``min_weight_distance`` layers away, and is 0 beyond that distance.
``tent`` falls linearly (as heretic does); ``bell`` falls along a raised cosine, which has the
same end points but zero slope at the peak and at the far end.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from optimizer.engine.directions import Directions

SHAPES = ("bell", "tent")
DIRECTION_KINDS = ("difference", "orthogonal")  # "orthogonal": made orthogonal to the harmless mean
MAX_DIRECTIONS = 4  # per layer: its refusal direction and up to three of its nearest layers'


def _check(shape: str, max_weight: float, min_weight: float, min_weight_distance: float) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown profile shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if not (math.isfinite(min_weight_distance) and min_weight_distance > 0):
        raise ValueError(f"min_weight_distance must be a finite number > 0, got {min_weight_distance}")
    if not (math.isfinite(max_weight) and math.isfinite(min_weight)):
        raise ValueError(f"weights must be finite, got max {max_weight}, min {min_weight}")


def weight_at(
    shape: str,
    distance: float | np.ndarray,
    max_weight: float,
    min_weight: float,
    min_weight_distance: float,
) -> np.ndarray:
    """Profile weight at ``distance`` (≥ 0, any real, array or scalar) from the peak, in float64."""
    _check(shape, max_weight, min_weight, min_weight_distance)
    d = np.abs(np.asarray(distance, dtype=np.float64))
    t = np.minimum(d / min_weight_distance, 1.0)
    # Fraction of the way from min_weight (0) up to max_weight (1). Writing the result as a
    # convex combination makes both end points exact: max at t = 0, min at t = 1.
    if shape == "tent":
        rise = 1.0 - t
    else:
        rise = 0.5 * (1.0 + np.cos(np.pi * t))
    w = max_weight * rise + min_weight * (1.0 - rise)
    # Rounding can push a convex combination one ulp outside its end points; clip it back.
    w = np.clip(w, min(max_weight, min_weight), max(max_weight, min_weight))
    return np.where(d > min_weight_distance, 0.0, w)


def layer_weights(
    shape: str,
    n_layers: int,
    max_weight: float,
    max_weight_position: float,
    min_weight: float,
    min_weight_distance: float,
) -> np.ndarray:
    """Weight of each decoder layer 0 … n_layers − 1, as float32."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise ValueError(f"n_layers must be an integer >= 1, got {n_layers!r}")
    if not math.isfinite(max_weight_position):
        raise ValueError(f"max_weight_position must be finite, got {max_weight_position}")
    d = np.abs(np.arange(n_layers, dtype=np.float64) - max_weight_position)
    w = weight_at(shape, d, max_weight, min_weight, min_weight_distance)
    return w.astype(np.float32)


@dataclass(frozen=True)
class ComponentProfile:
    """The four profile numbers of one component, with min_weight as an absolute weight."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float


@dataclass(frozen=True)
class AblationParams:
    """Everything needed to steer a model the way one trial did.

    The last four fields choose the edit; their defaults are the original one (one
    difference-of-means direction, removed as it is), which is what trials stored before
    they existed did.
    """

    shape: str
    direction_scope: str
    direction_index: float | None
    components: dict[str, ComponentProfile]
    direction_kind: str = "difference"  # or "orthogonal": made orthogonal to the harmless mean
    n_directions: int = 1  # the layer's refusal direction plus those of its n − 1 nearest layers
    norm_preserving: bool = False  # each edited column keeps its norm
    post_norm: bool = False  # removal through the output norm of post-norm layers (gemma3 …)

    def layer_weights(self, n_layers: int) -> dict[str, np.ndarray]:
        """Per-layer weight of each steered component."""
        return {
            name: layer_weights(
                self.shape,
                n_layers,
                p.max_weight,
                p.max_weight_position,
                p.min_weight,
                p.min_weight_distance,
            )
            for name, p in self.components.items()
        }

    def direction(self, directions: Directions) -> np.ndarray:
        """(D,) for one global direction, (L, D) for one per layer, (L, k, D) for k per layer
        (a global subspace repeated at every layer)."""
        if self.direction_kind == "difference" and self.n_directions == 1:
            # The original edit's directions, computed as they always were.
            if self.direction_scope == "global":
                return directions.interpolated(float(self.direction_index))
            return directions.vectors
        if self.direction_scope == "global":
            rows = directions.interpolated_basis(self.direction_kind, self.n_directions, float(self.direction_index))
            if self.n_directions == 1:
                return rows[0]
            return np.broadcast_to(rows, (directions.n_layers, *rows.shape))
        rows = directions.basis(self.direction_kind, self.n_directions)
        return rows[:, 0] if self.n_directions == 1 else rows

    def steering_options(self) -> dict[str, bool]:
        """The keyword arguments of ``Steering.set`` and ``bake_into`` that this edit takes."""
        return {"norm_preserving": self.norm_preserving, "post_norm": self.post_norm}

    def edit_text(self) -> str:
        """The edit in words: 'difference', 'orthogonal ×2, norm-preserving, post-norm'."""
        parts = [self.direction_kind + (f" ×{self.n_directions}" if self.n_directions > 1 else "")]
        parts += ["norm-preserving"] * self.norm_preserving + ["post-norm"] * self.post_norm
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AblationParams":
        edit = {name: data[name] for name in ("direction_kind", "n_directions", "norm_preserving", "post_norm") if name in data}
        return cls(
            shape=data["shape"],
            direction_scope=data["direction_scope"],
            direction_index=data["direction_index"],
            components={name: ComponentProfile(**values) for name, values in data["components"].items()},
            **edit,
        )

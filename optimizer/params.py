"""A trial's ablation parameters: sampled from a search space, turned into steering.

Optuna parameter names are the search-space keys (``direction_scope``, ``direction_index``,
``attn.max_weight``, ``mlp.min_weight_distance``, ...). Fixed ranges are not sampled. The
resolved parameters are also stored whole on each trial (user attr ``ablation``), so a trial
can be re-applied — shown, chatted with, exported — without its search-space file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import optuna

from optimizer.config import Range, SearchSpace
from optimizer.directions import Directions
from optimizer.profile import layer_weights


@dataclass(frozen=True)
class ComponentProfile:
    """The four profile numbers of one component, with min_weight as an absolute weight."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float


@dataclass(frozen=True)
class AblationParams:
    """Everything needed to steer a model the way one trial did."""

    shape: str
    direction_scope: str
    direction_index: float | None
    components: dict[str, ComponentProfile]

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
        """(D,) for the global scope, (L, D) for per-layer directions."""
        if self.direction_scope == "global":
            return directions.interpolated(float(self.direction_index))
        return directions.vectors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AblationParams":
        return cls(
            shape=data["shape"],
            direction_scope=data["direction_scope"],
            direction_index=data["direction_index"],
            components={name: ComponentProfile(**values) for name, values in data["components"].items()},
        )


def _suggest(trial: optuna.Trial, spec: Range, bounds: dict[str, tuple[float, float]]) -> float:
    low, high = bounds[spec.name]
    if low == high:
        return low
    return trial.suggest_float(spec.name, low, high)


def suggest(trial: optuna.Trial, space: SearchSpace, n_layers: int) -> AblationParams:
    """Sample one trial's parameters from ``space`` for a model with ``n_layers`` layers."""
    bounds = space.resolve(n_layers)
    scopes = space.direction_scopes
    scope = scopes[0] if len(scopes) == 1 else trial.suggest_categorical("direction_scope", list(scopes))
    index = _suggest(trial, space.direction_index, bounds) if scope == "global" else None
    components = {}
    for name, component in space.components().items():
        max_weight = _suggest(trial, component.max_weight, bounds)
        components[name] = ComponentProfile(
            max_weight=max_weight,
            max_weight_position=_suggest(trial, component.max_weight_position, bounds),
            min_weight=max_weight * _suggest(trial, component.min_weight_fraction, bounds),
            min_weight_distance=_suggest(trial, component.min_weight_distance, bounds),
        )
    return AblationParams(space.shape, scope, index, components)

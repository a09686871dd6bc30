"""How a study samples: multivariate TPE, and a trial's ablation parameters from a search space."""

from __future__ import annotations

from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial

from optimizer.engine.profile import AblationParams, ComponentProfile
from optimizer.study.config import Range, SearchSpace, StudyConfig


class _StampingTPESampler(optuna.samplers.TPESampler):
    """TPE that hands each new trial to ``on_new_trial`` before anything else happens to it."""

    def __init__(self, on_new_trial: Callable[[optuna.Study, FrozenTrial], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_new_trial = on_new_trial

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._on_new_trial(study, trial)
        super().before_trial(study, trial)


def make_sampler(config: StudyConfig, worker_index: int, on_new_trial: Callable[[optuna.Study, FrozenTrial], None]) -> optuna.samplers.TPESampler:
    """Multivariate TPE, the same settings on every start; each worker its own seed.

    ``on_new_trial`` hears of each trial the moment Optuna has created it, before its
    heartbeat starts: a worker can say whose trial it is before it could die unseen."""
    o = config.optimization
    return _StampingTPESampler(
        on_new_trial,
        multivariate=True,
        group=True,  # direction_index exists only in global-scope trials
        n_startup_trials=o.n_startup_trials,
        seed=o.seed + worker_index,
    )


def sampler_settings(sampler: optuna.samplers.BaseSampler, study: optuna.Study) -> dict[str, Any]:
    """What a live sampler will actually do on ``study`` (read back from the object itself)."""
    settings: dict[str, Any] = {"sampler": "TPESampler" if isinstance(sampler, optuna.samplers.TPESampler) else type(sampler).__name__}
    if isinstance(sampler, optuna.samplers.TPESampler):
        settings.update(
            multivariate=sampler._is_multivariate(study),
            group=bool(sampler._group),
            n_startup_trials=sampler._n_startup_trials,
        )
    return settings


def _suggest(trial: optuna.Trial, spec: Range, bounds: dict[str, tuple[float, float]]) -> float:
    low, high = bounds[spec.name]
    if low == high:
        return low
    return trial.suggest_float(spec.name, low, high)


def _choose(trial: optuna.Trial, name: str, choices: tuple) -> Any:
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def suggest(trial: optuna.Trial, space: SearchSpace, n_layers: int, *, post_norm: bool = False) -> AblationParams:
    """Sample one trial's parameters from ``space`` for a model with ``n_layers`` layers
    (``post_norm``: the model's blocks normalise their output before the residual add)."""
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
    return AblationParams(
        space.shape,
        scope,
        index,
        components,
        direction_kind=_choose(trial, "direction_kind", space.direction_kinds),
        n_directions=_choose(trial, "n_directions", space.n_directions),
        norm_preserving=_choose(trial, "norm_preserving", space.norm_preserving),
        post_norm=post_norm,
    )

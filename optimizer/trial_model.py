"""A study's model with one trial's steering applied at runtime, for chat and export.

The model is loaded as the study scored it (same source, same dtype), the directions come
from the study's cache, and the trial's stored parameters are turned into steering exactly
as the trial did, so what a user tries with ``abopt chat`` is what the trial measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from optimizer.cache import OnceStore
from optimizer.directions import Directions, cached_directions
from optimizer.errors import UserError
from optimizer.model import LoadedModel, load_model
from optimizer.params import AblationParams
from optimizer.steering import Steering, install
from optimizer.storage import complete_trial
from optimizer.study import StudyPlan, trial_params


@dataclass(frozen=True)
class TrialModel:
    """A loaded model with steering hooks, and the trial whose steering they apply."""

    plan: StudyPlan = field(repr=False)
    trial: FrozenTrial = field(repr=False)
    loaded: LoadedModel = field(repr=False)
    steering: Steering = field(repr=False)
    directions: Directions = field(repr=False)
    params: AblationParams
    weights: dict[str, np.ndarray] = field(repr=False)  # per component, per layer
    direction: np.ndarray = field(repr=False)  # (D,) global or (L, D) per layer, unit rows

    @property
    def number(self) -> int:
        return self.trial.number

    def steer(self) -> None:
        """Apply the trial's steering."""
        self.steering.set(self.weights, self.direction)

    def clear(self) -> None:
        """Back to the untouched model."""
        self.steering.clear()


def trial_steering(trial: FrozenTrial, directions: Directions, n_layers: int) -> tuple[AblationParams, dict[str, np.ndarray], np.ndarray]:
    """A trial's parameters, per-layer weights and direction(s), as the trial applied them."""
    if "ablation" not in trial.user_attrs:
        raise UserError(f"trial {trial.number} has no stored ablation parameters; it was not run by abopt")
    params = trial_params(trial)
    return params, params.layer_weights(n_layers), np.asarray(params.direction(directions), dtype=np.float32)


def load_trial_model(plan: StudyPlan, study: optuna.Study, number: int, *, steer: bool = True) -> TrialModel:
    """Load the plan's model, get the study's directions, and set up trial ``number``'s steering."""
    trial = complete_trial(study, number)
    config = plan.config
    loaded = load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    steering = install(loaded.targets)
    store = OnceStore(plan.storage_url)
    try:
        directions, _ = cached_directions(
            store,
            loaded,
            plan.prompts.harmful_measure,
            plan.prompts.harmless_measure,
            system_prompt=config.prompts.system_prompt,
            batch_size=config.evaluation.batch_size or 32,
        )
    finally:
        store.close()
    params, weights, direction = trial_steering(trial, directions, loaded.n_layers)
    model = TrialModel(plan, trial, loaded, steering, directions, params, weights, direction)
    if steer:
        model.steer()
    return model

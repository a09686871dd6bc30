"""A study's model, steered at runtime: loaded once per command that needs one.

``load_steered`` loads the model as the study scores it (same source, same dtype), installs
the steering hooks and takes the directions from the study's compute-once store (measuring
them only if no worker has), for the run loop, ``chat``, ``export`` and ``measure`` alike.
A trial's stored parameters then become steering exactly as the trial applied them, so
what a user tries with ``abopt chat`` is what the trial measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import optuna

from optimizer.engine.directions import (
    Directions,
    fingerprint,
    from_bytes,
    measure,
    to_bytes,
)
from optimizer.engine.judge import Judge, load_judge
from optimizer.engine.model import LoadedModel, compute_path, load_model
from optimizer.engine.profile import AblationParams
from optimizer.engine.steering import Steering, install
from optimizer.errors import UserError
from optimizer.study.plan import StudyPlan
from optimizer.study.record import TrialRecord, read_trial
from optimizer.study.storage import OnceStore, complete_trial


@dataclass(frozen=True)
class SteeredModel:
    """A study's model with steering hooks installed (all weights 0) and its directions."""

    loaded: LoadedModel = field(repr=False)
    steering: Steering = field(repr=False)
    directions: Directions = field(repr=False)
    measured: bool  # whether this process measured the directions

    def steer(self, params: AblationParams) -> dict[str, np.ndarray]:
        """Steer as ``params`` say; returns the per-layer weights."""
        weights = params.layer_weights(self.loaded.n_layers)
        self.steering.set(weights, params.direction(self.directions), **params.steering_options())
        return weights


def load_study_model(plan: StudyPlan, *, lazy: bool = False, unpack: bool = False) -> LoadedModel:
    """The study's model, as its study file says to load it (``lazy``: checked, not read;
    ``unpack``: dequantized on a CPU when it fits, for scoring, see ``load_model``)."""
    config = plan.config
    return load_model(
        config.model,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        lazy=lazy,
        unpack=unpack,
        fast_exp=config.evaluation.fast_exp,
    )


def load_steered(
    plan: StudyPlan, *, loaded: LoadedModel | None = None, log: Callable[[str], None] = lambda _: None, unpack: bool = False
) -> SteeredModel:
    """Load the study's model (unless given), install steering, get the study's directions."""
    if loaded is None:
        log(f"loading {plan.config.model}")
        loaded = load_study_model(plan, unpack=unpack)
    if unpack:
        log(compute_path(loaded))  # the search's one line on which weights it computes with
    steering = install(loaded.targets)
    store = OnceStore(plan.storage_url)
    try:
        directions, measured = cached_directions(
            store,
            loaded,
            plan.prompts.harmful_measure,
            plan.prompts.harmless_measure,
            system_prompt=plan.config.prompts.system_prompt,
            batch_size=plan.config.evaluation.batch_size or 32,
            thinking=plan.config.prompts.thinking,
            log=log,
        )
    finally:
        store.close()
    return SteeredModel(loaded, steering, directions, measured)


def cache_key(directions_fingerprint: str) -> str:
    """The study-cache key under which directions with this fingerprint are stored."""
    return "directions:" + directions_fingerprint


def cached_directions(
    store: OnceStore,
    loaded: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    system_prompt: str = "",
    batch_size: int = 32,
    thinking: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[Directions, bool]:
    """Directions from the study's cache, measured here only if no one has yet.

    Returns them and whether this call measured them; ``log`` hears when measuring starts
    and which worker this call waits for while another one measures.
    """
    key = fingerprint(loaded, harmful, harmless, system_prompt, thinking)

    def compute() -> bytes:
        log(f"measuring refusal directions on {len(harmful)} harmful and {len(harmless)} harmless prompts")
        return to_bytes(measure(loaded, harmful, harmless, system_prompt=system_prompt, batch_size=batch_size, thinking=thinking))

    payload, measured = store.get_or_compute(cache_key(key), compute, on_wait=log)
    return from_bytes(payload, key), measured


@dataclass(frozen=True)
class TrialModel:
    """A steered model and the trial whose steering it applies."""

    plan: StudyPlan = field(repr=False)
    record: TrialRecord = field(repr=False)
    model: SteeredModel = field(repr=False)
    params: AblationParams
    weights: dict[str, np.ndarray] = field(repr=False)  # per component, per layer
    direction: np.ndarray = field(repr=False)  # (D,) global, (L, D) per layer or (L, k, D), unit rows

    @property
    def number(self) -> int:
        return self.record.number

    @property
    def loaded(self) -> LoadedModel:
        return self.model.loaded

    @property
    def directions(self) -> Directions:
        return self.model.directions

    def steer(self) -> None:
        """Apply the trial's steering."""
        self.model.steering.set(self.weights, self.direction, **self.params.steering_options())

    def clear(self) -> None:
        """Back to the untouched model."""
        self.model.steering.clear()


def trial_steering(record: TrialRecord, directions: Directions, n_layers: int) -> tuple[AblationParams, dict[str, np.ndarray], np.ndarray]:
    """A trial's parameters, per-layer weights and direction(s), as the trial applied them."""
    if record.ablation is None:
        raise UserError(f"trial {record.number} has no stored ablation parameters; it was not run by abopt")
    params = record.ablation
    return params, params.layer_weights(n_layers), np.asarray(params.direction(directions), dtype=np.float32)


def load_trial_model(plan: StudyPlan, study: optuna.Study, number: int, *, steer: bool = True) -> TrialModel:
    """Load the plan's model and set up trial ``number``'s steering."""
    record = read_trial(complete_trial(study, number))
    model = load_steered(plan)
    params, weights, direction = trial_steering(record, model.directions, model.loaded.n_layers)
    trial_model = TrialModel(plan, record, model, params, weights, direction)
    if steer:
        trial_model.steer()
    return trial_model


def load_study_judge(plan: StudyPlan, log: Callable[[str], None]) -> Judge | None:
    """The study's judge model, loaded once per worker (None when markers judge)."""
    e = plan.config.evaluation
    if e.judge == "markers":
        return None
    log(f"loading the judge {e.judge}")
    judge = load_judge(e.judge, template=e.judge_template or None, dtype=plan.config.dtype)
    log(f"judge {e.judge}: {judge.parameters / 1e6:.1f} M parameters, {judge.nbytes / 2**20:.0f} MiB in memory")
    return judge

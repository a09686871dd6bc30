"""Confirming a front trial: re-scored on long answers, for over-refusal and for damage.

The search scores every trial cheaply (short answers, the first token's KL). A trial that
enters the front is scored again, once, whichever worker or command gets to it first:
harmful answers of ``confirm_tokens`` tokens judged (refused, complied or degenerate),
harmless answers judged too (a harmless request refused is over-refusal), and the KL over
the original model's first 16 answer tokens, teacher-forced (damage beyond the first token).
The untouched model is confirmed the same way once per study, as the yardstick.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.trial import TrialState

from optimizer.engine.evaluate import EvalSettings, Evaluator
from optimizer.engine.judge import Judge
from optimizer.engine.profile import AblationParams
from optimizer.errors import UserError
from optimizer.study.plan import StudyPlan
from optimizer.study.record import (
    Confirmation,
    TrialResult,
    confirmation_key,
    read_confirmation_baseline,
    read_confirmations,
    read_trial,
    write_confirmation_baseline,
)
from optimizer.study.steered import SteeredModel, load_steered, load_study_judge
from optimizer.study.storage import OnceStore, complete_trial, require_complete

CONFIRM_KL_TOKENS = 16


@dataclass
class Confirmer:
    """Re-scores the steered model on long answers (built once per worker, when first needed)."""

    plan: StudyPlan
    model: SteeredModel
    judge: Judge | None
    evaluator: Evaluator

    @classmethod
    def build(cls, plan: StudyPlan, model: SteeredModel, judge: Judge | None) -> "Confirmer":
        e, p = plan.config.evaluation, plan.config.prompts
        settings = EvalSettings(e.confirm_tokens, CONFIRM_KL_TOKENS, e.batch_size, p.system_prompt, p.thinking)
        evaluator = Evaluator(model.loaded, plan.prompts.harmful_eval, plan.prompts.harmless_eval, plan.markers, settings, judge=judge)
        return cls(plan, model, judge, evaluator)

    def score(self) -> Confirmation:
        """The model as it is steered now, confirmed."""
        harmful = self.evaluator.refusals()
        harmless = self.evaluator.harmless_answers()
        return Confirmation(
            tokens=self.plan.config.evaluation.confirm_tokens,
            judge=self.plan.config.evaluation.judge,
            refused=harmful.refused,
            degenerate=harmful.degenerate,
            total=harmful.total,
            harmless_refused=harmless.refused,
            harmless_degenerate=harmless.degenerate,
            harmless_total=harmless.total,
            kl_answer=self.evaluator.kl_divergence(),
        )

    def trial(self, params: AblationParams) -> Confirmation:
        """A trial's steering, confirmed (the model is left unsteered)."""
        self.model.steer(params)
        try:
            return self.score()
        finally:
            self.model.steering.clear()


def confirm_once(
    store: OnceStore, study: optuna.Study, number: int, compute: Callable[[], Confirmation], log: Callable[[str], None] = lambda _: None
) -> Confirmation:
    """Trial ``number``'s confirmation, computed here only if no worker has (stored in the study's
    compute-once store, where :func:`read_confirmations` finds it)."""
    payload, _ = store.get_or_compute(
        confirmation_key(study.study_name, number), lambda: json.dumps(compute().to_dict()).encode(), on_wait=log
    )
    return Confirmation.from_dict(json.loads(payload))


def confirm_baseline(store: OnceStore, study: optuna.Study, plan: StudyPlan, confirmer: Confirmer) -> Confirmation:
    """The untouched model confirmed, once per study (the yardstick for over-refusal)."""
    stored = read_confirmation_baseline(study)
    if stored is not None:
        return stored
    key = "confirm-baseline:" + "".join(plan.signature[k] for k in ("model_identity", "prompts", "scoring"))
    payload, _ = store.get_or_compute(key, lambda: json.dumps(confirmer.score().to_dict()).encode())
    baseline = Confirmation.from_dict(json.loads(payload))
    write_confirmation_baseline(study, baseline)
    return baseline


def enters_front(study: optuna.Study, result: TrialResult) -> bool:
    """Whether a just-scored (still running) trial is on the front of the study's complete trials."""
    if result.feasible is False:
        return False
    kl, rate = result.values
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.values is None or any(v > 0 for v in trial.constraints.values()):
            continue
        other_kl, other_rate = trial.values
        if other_kl <= kl and other_rate <= rate and (other_kl < kl or other_rate < rate):
            return False
    return True


def confirm_trials(
    plan: StudyPlan, study: optuna.Study, numbers: list[int], log: Callable[[str], None] = lambda _: None
) -> dict[int, Confirmation]:
    """Confirm trials ``numbers`` of a study now (those confirmed already are read back)."""

    done = read_confirmations(study)
    records = {n: read_trial(complete_trial(study, n)) for n in numbers if n not in done}
    if not records:
        return {n: done[n] for n in numbers}
    model = load_steered(plan, log=log, unpack=True)
    confirmer = Confirmer.build(plan, model, load_study_judge(plan, log))
    store = OnceStore(plan.storage_url)
    try:
        confirm_baseline(store, study, plan, confirmer)
        for number, record in records.items():
            log(f"confirming trial {number} on {plan.config.evaluation.confirm_tokens}-token answers")
            done[number] = confirm_once(store, study, number, lambda r=record: confirmer.trial(r.ablation), log)
    finally:
        store.close()
    return {n: done[n] for n in numbers}


def trial_numbers(study: optuna.Study, which: str) -> list[int]:
    """The trials ``--trials`` names: "front", "all" (complete ones) or "N,M,...".

    A UserError for anything else or a trial that is not complete.
    """

    complete = require_complete(study)
    if which == "front":
        return sorted(t.number for t in study.best_trials)
    if which == "all":
        return [t.number for t in complete]
    parts = [p.strip() for p in which.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UserError(f"--trials {which!r} is not front, all or trial numbers like 3,7,12")
    return [complete_trial(study, int(p)).number for p in parts]

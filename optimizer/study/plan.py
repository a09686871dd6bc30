"""A study file resolved into a plan, and the study it names: created, signed, checked.

Everything a study depends on is resolved and checked before its storage is opened (see
:func:`plan`), so a bad study file, model or prompt set never touches the database. The
study remembers what it was created with (model identity, prompts, search space, scoring
settings) and refuses to resume with anything else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from optimizer import __version__
from optimizer.engine.fingerprint import model_identity, same_model
from optimizer.engine.judge import load_template
from optimizer.engine.markers import load_markers
from optimizer.engine.model import read_config, resolve_model_path
from optimizer.engine.prompts import load_prompts, shared_prompts
from optimizer.errors import UserError
from optimizer.study.config import StudyConfig
from optimizer.study.record import BASELINE_ATTR, METRIC_NAMES
from optimizer.study.storage import find_study, make_storage, open_study, redact

SIGNATURE_ATTR = "abopt_signature"



@dataclass(frozen=True)
class PromptSets:
    harmful_measure: tuple[str, ...]
    harmless_measure: tuple[str, ...]
    harmful_eval: tuple[str, ...]
    harmless_eval: tuple[str, ...]


@dataclass(frozen=True)
class StudyPlan:
    """A study file with everything it names resolved and checked; no storage opened yet."""

    config: StudyConfig
    storage_url: str
    model_path: Path
    n_layers: int
    prompts: PromptSets
    markers: tuple[str, ...]
    signature: dict[str, str] = field(repr=False)
    notes: tuple[str, ...] = ()  # what a user should know at start (e.g. prompt sets cut short)


def load_prompt_sets(config: StudyConfig) -> PromptSets:
    """The four prompt sets of a study, limited to its counts, eval disjoint from measure."""
    p, base = config.prompts, config.base_dir
    sets = PromptSets(
        harmful_measure=tuple(load_prompts(p.harmful_measure, base_dir=base, limit=p.n_measure)),
        harmless_measure=tuple(load_prompts(p.harmless_measure, base_dir=base, limit=p.n_measure)),
        harmful_eval=tuple(load_prompts(p.harmful_eval, base_dir=base, limit=p.n_eval)),
        harmless_eval=tuple(load_prompts(p.harmless_eval, base_dir=base, limit=p.n_eval)),
    )
    for kind in ("harmful", "harmless"):
        overlap = shared_prompts(list(getattr(sets, f"{kind}_measure")), list(getattr(sets, f"{kind}_eval")))
        if overlap:
            raise UserError(
                f"{config.path}: {len(overlap)} {kind} eval prompt(s) also appear in the measure set "
                f"(e.g. {overlap[0][:60]!r}); eval prompts must be disjoint from measure prompts"
            )
    return sets


def short_prompt_sets(config: StudyConfig, prompts: PromptSets) -> tuple[str, ...]:
    """One line per prompt set that has fewer prompts than the study file asks for."""
    p = config.prompts
    notes = []
    for kind in ("harmful", "harmless"):
        for split, wanted in (("measure", p.n_measure), ("eval", p.n_eval)):
            got = len(getattr(prompts, f"{kind}_{split}"))
            if got < wanted:
                notes.append(
                    f"note: {kind}_{split} ({getattr(p, f'{kind}_{split}')}) has {got} prompts, "
                    f"fewer than n_{split} = {wanted}; using all {got}"
                )
    return tuple(notes)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def plan(config: StudyConfig, storage_url: str) -> StudyPlan:
    """Resolve and check a study's model, prompts and markers without loading weights."""
    path = resolve_model_path(config.model)
    model_config = read_config(path)
    text_config = model_config.get("text_config", model_config)
    n_layers = int(text_config.get("num_hidden_layers") or text_config.get("n_layer") or 0)
    if n_layers < 1:
        raise UserError(f"{path / 'config.json'} does not say how many layers the model has (num_hidden_layers)")
    config.search_space.resolve(n_layers)  # bad ranges for this depth fail here, not mid-study
    prompts = load_prompt_sets(config)
    markers = load_markers(config.evaluation.markers, base_dir=config.base_dir)
    e = config.evaluation
    # The template's text, not its path, is what scores a trial.
    judge_template = load_template(e.judge_template or None, judge=e.judge) if e.judge != "markers" else ""
    signature = {
        "model": config.model,
        "model_identity": model_identity(path),
        "prompts": _digest(
            [list(getattr(prompts, f)) for f in PromptSets.__dataclass_fields__]
            + [config.prompts.system_prompt]
            + (["thinking"] if config.prompts.thinking else [])
        ),
        "search_space": config.search_space.fingerprint()[:16],
        "scoring": _digest([e.max_new_tokens, e.kl_tokens, list(markers), config.dtype, SCORING_VERSION, e.judge, judge_template]),
        "scoring_version": str(SCORING_VERSION),
    }
    return StudyPlan(config, storage_url, path, n_layers, prompts, markers, signature, short_prompt_sets(config, prompts))


_SIGNED = {
    "model": "model",
    "model_identity": "model weights",
    "prompts": "prompt sets",
    "search_space": "search space",
    "scoring": "scoring settings (max_new_tokens, kl_tokens, markers, dtype, judge and its template)",
}
SCORING_VERSION = 2  # 2: three verdicts (an empty, looping or garbled answer is not compliance)


def check_signature(study: optuna.Study, plan: StudyPlan) -> None:
    """Refuse to resume a study with a different model, prompts, search space or scoring."""
    stored = study.user_attrs.get(SIGNATURE_ATTR)
    if stored is None:
        raise UserError(
            f"study {study.study_name!r} in {redact(plan.storage_url)} was not created by abopt; "
            "pick another study name"
        )
    if "scoring_version" not in stored:
        raise UserError(
            f"study {study.study_name!r} was scored by abopt 0.1.0, which counted empty, looping or garbled "
            "answers as compliance; its refusal rates are not comparable with today's three verdicts. "
            "Browse and export it as it is, or start a new study (change `name`) to go on searching"
        )
    for key, label in _SIGNED.items():
        if not _signature_matches(key, stored.get(key), plan):
            detail = f" ({stored.get(key)} then, {plan.signature[key]} now)" if key == "model" else ""
            raise UserError(
                f"study {study.study_name!r} was created with different {label}{detail} than "
                f"{plan.config.path.name} now gives; restore them or start a new study (change `name`)"
            )


def _signature_matches(key: str, stored: Any, plan: StudyPlan) -> bool:
    if key == "model_identity" and isinstance(stored, str):
        return same_model(stored, plan.model_path, plan.signature[key])
    return stored == plan.signature[key]


def never_started(study: optuna.Study) -> bool:
    """No baseline measured and no trial that got anywhere: what a failed first run leaves.

    Such a study holds nothing that depends on its settings, so a corrected study file
    (a repaired model, say) may take it over instead of being refused.
    """
    return BASELINE_ATTR not in study.user_attrs and all(
        t.state == TrialState.FAIL for t in study.get_trials(deepcopy=False)
    )


def _sign(study: optuna.Study, plan: StudyPlan) -> None:
    study.set_metric_names(list(METRIC_NAMES))
    study.set_user_attr(SIGNATURE_ATTR, plan.signature)
    study.set_user_attr("study_file", str(plan.config.path))
    study.set_user_attr("model", plan.config.model)
    study.set_user_attr("n_layers", plan.n_layers)
    study.set_user_attr("abopt_version", __version__)


def open_or_create(plan: StudyPlan) -> optuna.Study:
    """Resume the plan's study, after checking it matches, or create it."""
    storage = make_storage(plan.storage_url)
    study = find_study(storage, plan.config.name)
    if study is None:
        study = optuna.create_study(
            study_name=plan.config.name,
            storage=storage,
            directions=["minimize", "minimize"],
            load_if_exists=True,  # another worker may have created it a moment ago
        )
        if SIGNATURE_ATTR not in study.user_attrs:
            _sign(study, plan)
            return study
    try:
        check_signature(study, plan)
    except UserError:
        if SIGNATURE_ATTR not in study.user_attrs or not never_started(study):
            raise
        _sign(study, plan)
    return study


def open_existing(plan: StudyPlan) -> optuna.Study:
    """The plan's study, which must exist and match the plan (for export and its checks)."""
    study = open_study(plan.config.name, plan.storage_url, str(plan.config.path))
    check_signature(study, plan)
    return study

"""Optuna glue: the study in its storage, the trial objective, one worker's run loop.

Everything a study depends on is resolved and checked before its storage is opened (see
:func:`plan`), so a bad study file, model or prompt set never touches the database. The
study remembers what it was created with (model identity, prompts, search space, scoring
settings) and refuses to resume with anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState

from optimizer import __version__
from optimizer.cache import OnceStore, make_engine, serialized_setup
from optimizer.config import StudyConfig
from optimizer.dashboard import annotate_trial
from optimizer.directions import Directions, cached_directions
from optimizer.errors import UserError
from optimizer.evaluate import EvalSettings, Evaluator
from optimizer.markers import load_markers
from optimizer.fingerprint import model_identity, same_model
from optimizer.model import LoadedModel, load_model, read_config, resolve_model_path
from optimizer.params import AblationParams, suggest
from optimizer.prompts import load_prompts, shared_prompts
from optimizer.steering import Steering, install
from optimizer.stopping import pid_alive, stop_reason
from optimizer.storage import MAX_RETRIES, RetryDeadTrial, find_study, make_storage, redact

METRIC_NAMES = ("kl_divergence", "refusal_rate")
SIGNATURE_ATTR = "abopt_signature"
BASELINE_ATTR = "baseline"

# Optuna logs every failed trial with its traceback at WARNING; abopt reports failures itself
# (an interrupted trial is expected, and a real error propagates with its traceback).
optuna.logging.set_verbosity(optuna.logging.ERROR)
# Heartbeats, the retry callback, metric names and grouped TPE are all "experimental" in
# Optuna 5 but are exactly what abopt relies on; the warnings would only be noise to users.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


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
    signature = {
        "model": config.model,
        "model_identity": model_identity(path),
        "prompts": _digest([list(getattr(prompts, f)) for f in PromptSets.__dataclass_fields__] + [config.prompts.system_prompt]),
        "search_space": config.search_space.fingerprint()[:16],
        "scoring": _digest([e.max_new_tokens, e.kl_tokens, list(markers), config.dtype]),
    }
    return StudyPlan(config, storage_url, path, n_layers, prompts, markers, signature, short_prompt_sets(config, prompts))


_SIGNED = {
    "model": "model",
    "model_identity": "model weights",
    "prompts": "prompt sets",
    "search_space": "search space",
    "scoring": "scoring settings (max_new_tokens, kl_tokens, markers, dtype)",
}


def check_signature(study: optuna.Study, plan: StudyPlan) -> None:
    """Refuse to resume a study with a different model, prompts, search space or scoring."""
    stored = study.user_attrs.get(SIGNATURE_ATTR)
    if stored is None:
        raise UserError(
            f"study {study.study_name!r} in {redact(plan.storage_url)} was not created by abopt; "
            "pick another study name"
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
    """The plan's study, which must exist and match the plan (for front, show, export...)."""
    study = find_study(make_storage(plan.storage_url), plan.config.name)
    if study is None:
        raise UserError(
            f"no study {plan.config.name!r} in {redact(plan.storage_url)}; "
            f"start it with: abopt run {plan.config.path}"
        )
    check_signature(study, plan)
    return study


def trial_params(trial: FrozenTrial) -> AblationParams:
    """The ablation a trial applied, as stored with it."""
    return AblationParams.from_dict(trial.user_attrs["ablation"])


def make_sampler(config: StudyConfig, worker_index: int) -> optuna.samplers.TPESampler:
    """Multivariate TPE, the same settings on every start; each worker its own seed."""
    o = config.optimization
    return optuna.samplers.TPESampler(
        multivariate=True,
        group=True,  # direction_index exists only in global-scope trials
        n_startup_trials=o.n_startup_trials,
        seed=o.seed + worker_index,
    )


# --- one worker --------------------------------------------------------------------------

_workers = sa.Table(
    "abopt_workers",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study", sa.String(512), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("sampler", sa.Text),  # the live sampler's settings, as JSON
)


def register_worker(storage_url: str, study_name: str) -> tuple[int, int]:
    """Register this process; returns its row id and its worker index within the study.

    The index is how many workers registered before this one. Seeds are ``seed + index``,
    so two processes never replay the same random samples, whether they start together,
    on other machines, or after a resume.
    """
    engine = make_engine(storage_url)
    serialized_setup(storage_url, lambda: _workers.metadata.create_all(engine, checkfirst=True))
    with engine.begin() as connection:
        row_id = connection.execute(
            _workers.insert().values(study=study_name, host=socket.gethostname(), pid=os.getpid(), started=time.time())
        ).inserted_primary_key[0]
        index = connection.execute(
            sa.select(sa.func.count()).select_from(_workers).where(_workers.c.study == study_name, _workers.c.id < row_id)
        ).scalar()
    engine.dispose()
    return int(row_id), int(index)


def sampler_settings(sampler: optuna.samplers.BaseSampler, study: optuna.Study) -> dict[str, Any]:
    """What a live sampler will actually do on ``study`` (read back from the object itself)."""
    settings: dict[str, Any] = {"sampler": type(sampler).__name__}
    if isinstance(sampler, optuna.samplers.TPESampler):
        settings.update(
            multivariate=sampler._is_multivariate(study),
            group=bool(sampler._group),
            n_startup_trials=sampler._n_startup_trials,
        )
    return settings


def worker_records(storage_url: str, study_name: str) -> list[dict[str, Any]]:
    """Every worker that ever ran on the study, oldest first, with its sampler settings."""
    engine = make_engine(storage_url)
    serialized_setup(storage_url, lambda: _workers.metadata.create_all(engine, checkfirst=True))
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(_workers).where(_workers.c.study == study_name).order_by(_workers.c.id)
        ).mappings().all()
    engine.dispose()
    return [dict(row, sampler=json.loads(row["sampler"]) if row["sampler"] else None) for row in rows]


def _record_sampler(storage_url: str, row_id: int, settings: dict[str, Any]) -> None:
    engine = make_engine(storage_url)
    with engine.begin() as connection:
        connection.execute(_workers.update().where(_workers.c.id == row_id).values(sampler=json.dumps(settings)))
    engine.dispose()


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker process on this host is gone.

    Heartbeats catch them too, but only after the grace period; a restart on the same
    machine (the common case after a crash) knows at once. Returns the failed numbers.
    """
    host = socket.gethostname()
    retry = RetryDeadTrial(max_retry=MAX_RETRIES)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", {})
        if worker.get("host") != host or pid_alive(int(worker.get("pid", 0))) or worker.get("pid") == os.getpid():
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "failure", f"worker process {worker['pid']} died")
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        retry(study, study._storage.get_trial(trial._trial_id))
        failed.append(trial.number)
    return failed


def completed_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


@dataclass
class Worker:
    """One process's share of a study: model loaded and steered, prompts prepared."""

    plan: StudyPlan
    study: optuna.Study  # with this worker's sampler
    loaded: LoadedModel
    steering: Steering
    directions: Directions
    evaluator: Evaluator
    baseline: dict[str, Any]
    index: int
    measured: bool
    on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None
    timings: list[float] = field(default_factory=list)

    @property
    def config(self) -> StudyConfig:
        return self.plan.config


def baseline_of(evaluator: Evaluator, sample_count: int) -> dict[str, Any]:
    """The untouched model's scores (steering must be clear)."""
    result = evaluator.refusals()
    return {
        "kl_divergence": 0.0,
        "refusal_rate": result.rate,
        "refused": result.refused,
        "total": result.total,
        "answers": list(result.answers[:sample_count]),
    }


def load_study_model(plan: StudyPlan, *, lazy: bool = False) -> LoadedModel:
    """The study's model, as its study file says to load it."""
    config = plan.config
    return load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code, lazy=lazy)


def start_worker(
    plan: StudyPlan, study: optuna.Study, log: Callable[[str], None] = print, loaded: LoadedModel | None = None
) -> Worker:
    """Load the model (unless given), get the directions (measuring only if nobody has) and the baseline."""
    config = plan.config
    if loaded is None:
        log(f"loading {config.model}")
        loaded = load_study_model(plan)
    steering = install(loaded.targets)
    store = OnceStore(plan.storage_url)
    prompts = plan.prompts
    directions, measured = cached_directions(
        store,
        loaded,
        prompts.harmful_measure,
        prompts.harmless_measure,
        system_prompt=config.prompts.system_prompt,
        batch_size=config.evaluation.batch_size or 32,
        log=log,
    )
    log(
        f"directions {'measured' if measured else 'from the study cache'} "
        f"({directions.n_layers} layers, best separation at layer {directions.best_layer}"
        f"{f', {directions.seconds:.1f} s' if measured else ''})"
    )
    e = config.evaluation
    evaluator = Evaluator(
        loaded,
        prompts.harmful_eval,
        prompts.harmless_eval,
        plan.markers,
        EvalSettings(e.max_new_tokens, e.kl_tokens, e.batch_size, config.prompts.system_prompt),
    )
    payload, _ = store.get_or_compute(
        "baseline:" + plan.signature["model_identity"] + plan.signature["prompts"] + plan.signature["scoring"],
        lambda: json.dumps(baseline_of(evaluator, e.sample_answers)).encode(),
        on_wait=log,
    )
    store.close()
    baseline = json.loads(payload)
    if BASELINE_ATTR not in study.user_attrs:
        study.set_user_attr(BASELINE_ATTR, baseline)
    row_id, index = register_worker(plan.storage_url, config.name)
    sampler = make_sampler(config, index)
    study = optuna.load_study(study_name=config.name, storage=study._storage, sampler=sampler)
    _record_sampler(plan.storage_url, row_id, sampler_settings(sampler, study) | {"seed": config.optimization.seed + index})
    return Worker(plan, study, loaded, steering, directions, evaluator, baseline, index, measured)


class _Skip(optuna.TrialPruned):
    """Raised for a trial started after the study already had its trials."""


def _objective(worker: Worker, target: int) -> Callable[[optuna.Trial], tuple[float, float]]:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "index": worker.index})
        retried = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retried is not None:
            trial.set_user_attr("retry_of", retried)
        # Workers ask for trials concurrently: the lowest-numbered ones up to the target
        # run, any beyond it are dropped, so the study ends with exactly `target` trials.
        earlier = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if t.number < trial.number
        ]
        if len(earlier) >= target:
            raise _Skip(f"the study already has {len(earlier)} complete or running trials")
        try:
            return run_trial(worker, trial)
        except KeyboardInterrupt as stop:
            abandon(trial, f"interrupted ({stop_reason(stop)})")
            raise

    return objective


def abandon(trial: optuna.Trial, reason: str) -> None:
    """Record why a running trial stops unfinished and queue its parameters to run again.

    Optuna then stores it as FAIL; the next worker to ask for a trial replays it.
    """
    study = trial.study
    study._storage.set_trial_user_attr(trial._trial_id, "failure", reason)
    # An interruption is not the trial's fault: no retry limit.
    RetryDeadTrial(max_retry=None)(study, study._storage.get_trial(trial._trial_id))


def run_trial(worker: Worker, trial: optuna.Trial) -> tuple[float, float]:
    """Steer as the trial's parameters say, score, and record everything on the trial."""
    start = time.perf_counter()
    params = suggest(trial, worker.config.search_space, worker.loaded.n_layers)
    weights = apply(worker, params)
    kl_start = time.perf_counter()
    kl = worker.evaluator.kl_divergence()
    kl_seconds = time.perf_counter() - kl_start
    ceiling = worker.config.optimization.kl_ceiling
    feasible = not ceiling or kl <= ceiling
    refusal_seconds = 0.0
    if feasible:
        refusal_start = time.perf_counter()
        result = worker.evaluator.refusals()
        refusal_seconds = time.perf_counter() - refusal_start
        rate, refused, total, answers = result.rate, result.refused, result.total, list(result.answers)
        generated = result.generated_tokens
    else:
        # Not worth generating for: recorded as infeasible with the worst refusal rate.
        rate, refused, total, answers, generated = 1.0, None, len(worker.evaluator.harmful_tokens), [], 0
        trial.set_user_attr("refusal_stage", f"skipped: KL {kl:.3f} above the ceiling {ceiling:g}")
    if ceiling:
        trial.set_constraint("kl_ceiling", kl - ceiling)
        trial.set_user_attr("feasible", feasible)  # optuna-dashboard 0.21 shows user attrs only
    worker.steering.clear()
    n = worker.config.evaluation.sample_answers
    harmful = worker.plan.prompts.harmful_eval
    trial.set_user_attr("ablation", params.to_dict())
    trial.set_user_attr("layer_weights", {k: [round(float(x), 5) for x in v] for k, v in weights.items()})
    trial.set_user_attr("refused", refused)
    trial.set_user_attr("total", total)
    trial.set_user_attr("sample_answers", [{"prompt": p, "answer": a} for p, a in zip(harmful[:n], answers[:n])])
    trial.set_user_attr("generated_tokens", generated)
    engine_seconds = kl_seconds + refusal_seconds
    trial.set_user_attr(
        "seconds",
        {"kl": round(kl_seconds, 4), "refusal": round(refusal_seconds, 4), "trial": round(time.perf_counter() - start, 4)},
    )
    annotate_trial(trial, worker.plan, (kl, rate), worker.baseline)  # dashboard note + profile plot
    worker.timings.append(engine_seconds)
    return kl, rate


def apply(worker: Worker, params: AblationParams) -> dict[str, Any]:
    """Set the model's steering to ``params``; returns the per-layer weights."""
    weights = params.layer_weights(worker.loaded.n_layers)
    worker.steering.set(weights, params.direction(worker.directions))
    return weights


def _wait_for_work(study: optuna.Study, target: int) -> bool:
    """True when this worker should start another trial, False when the study is done.

    While the other workers' running trials would complete the study, wait: if one of
    them dies instead, its trial is failed (same host at once, others by heartbeat) and
    re-queued, and there is work again.
    """
    while True:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        if complete >= target:
            return False
        if len(trials) < target:
            return True
        time.sleep(1.0)
        recover_dead_trials(study)
        optuna.storages.fail_stale_trials(study)


def run_worker(worker: Worker, target: int) -> None:
    """Run trials until the study has ``target`` complete ones (raises KeyboardInterrupt on Ctrl-C)."""
    study = worker.study
    recover_dead_trials(study)
    if not _wait_for_work(study, target):
        return

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        if worker.on_trial is not None:
            worker.on_trial(study, trial)
        if not _wait_for_work(study, target):
            study.stop()

    study.optimize(_objective(worker, target), callbacks=[after_trial], gc_after_trial=False)

"""One worker's share of a study: the model steered and scored, trial after trial.

The run loop knows nothing of how trials are shown: whoever starts it passes callbacks
(progress, dashboard notes) that see each trial's record.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

import mlx.core as mx
import optuna
from optuna.trial import FrozenTrial, TrialState

from optimizer.engine import fastexp
from optimizer.engine.evaluate import EvalSettings, Evaluator, replay_budget
from optimizer.engine.judge import Judge
from optimizer.engine.model import LoadedModel
from optimizer.engine.replay import first_steered_layer
from optimizer.study.config import StudyConfig
from optimizer.study.confirm import (
    Confirmer,
    confirm_baseline,
    confirm_once,
    enters_front,
)
from optimizer.study.plan import StudyPlan
from optimizer.study.record import (
    Baseline,
    Confirmation,
    SampleAnswer,
    Timings,
    TrialResult,
    WorkerInfo,
    read_trial,
    write_baseline,
    write_failure,
    write_result,
    write_retry_of,
    write_worker,
)
from optimizer.study.sampling import make_sampler, sampler_settings, suggest
from optimizer.study.screen import Screen, front_points
from optimizer.study.steered import SteeredModel, load_steered, load_study_judge
from optimizer.study.stopping import pid_alive, stop_reason
from optimizer.study.storage import (
    GRACE_SECONDS,
    MAX_RETRIES,
    OnceStore,
    RetryDeadTrial,
    record_sampler,
    register_worker,
)


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker process is known to be gone.

    Heartbeats catch them too, but only after the grace period; a restart on the same
    machine (the common case after a crash) knows at once. A trial whose worker never
    said who it is died between Optuna creating it and the worker stamping it (see
    ``make_sampler``), which no heartbeat shows: failed once the grace period is over.
    Returns the failed numbers.
    """
    host = socket.gethostname()
    retry = RetryDeadTrial(max_retry=MAX_RETRIES)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = read_trial(trial).worker
        if worker is None:
            if trial.datetime_start is None or datetime.now() - trial.datetime_start < timedelta(seconds=GRACE_SECONDS):
                continue
            reason = "its worker process died before it started"
        elif worker.host != host or worker.pid == os.getpid() or pid_alive(worker.pid):
            continue
        else:
            reason = f"worker process {worker.pid} died"
        try:
            write_failure(study, trial._trial_id, reason)
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        retry(study, study._storage.get_trial(trial._trial_id))
        failed.append(trial.number)
    return failed


ResultHook = Callable[[optuna.Trial, TrialResult, Baseline, Confirmation | None], None]


@dataclass
class Worker:
    """One process's share of a study: model loaded and steered, prompts prepared.

    ``on_result`` hooks see each scored trial while it still runs (the dashboard's note and
    plot must be written then); ``on_trial`` hooks see the study after each trial ends.
    """

    plan: StudyPlan
    study: optuna.Study  # with this worker's sampler
    model: SteeredModel
    evaluator: Evaluator
    baseline: Baseline
    index: int
    judge: Judge | None = None
    log: Callable[[str], None] = print
    confirmer: Confirmer | None = None  # built when the first trial enters the front
    on_result: list[ResultHook] = field(default_factory=list)
    on_trial: list[Callable[[optuna.Study], None]] = field(default_factory=list)

    @property
    def config(self) -> StudyConfig:
        return self.plan.config

    @property
    def measured(self) -> bool:
        return self.model.measured


def measure_baseline(evaluator: Evaluator, sample_count: int) -> Baseline:
    """The untouched model's scores (steering must be clear)."""
    result = evaluator.refusals()
    return Baseline(result.rate, result.refused, result.total, tuple(result.answers[:sample_count]), result.degenerate)


def start_worker(
    plan: StudyPlan, study: optuna.Study, log: Callable[[str], None] = print, loaded: LoadedModel | None = None
) -> Worker:
    """Load the model (unless given), get the directions (measuring only if nobody has) and the baseline."""
    config = plan.config
    model = load_steered(plan, loaded=loaded, log=log, unpack=True)
    directions = model.directions
    log(
        f"directions {'measured' if model.measured else 'from the study cache'} "
        f"({directions.n_layers} layers, best separation at layer {directions.best_layer}"
        f"{f', {directions.seconds:.1f} s' if model.measured else ''})"
    )
    e = config.evaluation
    judge = load_study_judge(plan, log)
    evaluator = Evaluator(
        model.loaded,
        plan.prompts.harmful_eval,
        plan.prompts.harmless_eval,
        plan.markers,
        EvalSettings(
            e.max_new_tokens, e.kl_tokens, e.batch_size, config.prompts.system_prompt, config.prompts.thinking,
            replay_bytes=replay_budget() if e.replay_layers else 0,
            share_prefix=e.share_prefix,
        ),
        judge=judge,
    )
    log(replay_line(evaluator, config))
    store = OnceStore(plan.storage_url)
    try:
        payload, _ = store.get_or_compute(
            "baseline:" + plan.signature["model_identity"] + plan.signature["prompts"] + plan.signature["scoring"],
            lambda: json.dumps(measure_baseline(evaluator, e.sample_answers).to_dict()).encode(),
            on_wait=log,
        )
    finally:
        store.close()
    baseline = Baseline.from_dict(json.loads(payload))
    write_baseline(study, baseline)
    row_id, index = register_worker(plan.storage_url, config.name)
    me = WorkerInfo.this_process(index)
    sampler = make_sampler(config, index, on_new_trial=lambda study, trial: write_worker(study, trial._trial_id, me))
    study = optuna.load_study(study_name=config.name, storage=study._storage, sampler=sampler)
    record_sampler(plan.storage_url, row_id, sampler_settings(sampler, study) | {"seed": config.optimization.seed + index})
    return Worker(plan, study, model, evaluator, baseline, index, judge, log)


class _Skip(optuna.TrialPruned):
    """Raised for a trial started after the study already had its trials."""


def _objective(worker: Worker, target: int) -> Callable[[optuna.Trial], tuple[float, float]]:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        # A stop can land on any line: wherever it does, the trial is failed and re-queued.
        try:
            write_retry_of(trial)
            # Workers ask for trials concurrently: the lowest-numbered ones up to the target
            # run, any beyond it are dropped, so the study ends with exactly `target` trials.
            earlier = [
                t
                for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if t.number < trial.number
            ]
            if len(earlier) >= target:
                raise _Skip(f"the study already has {len(earlier)} complete or running trials")
            result = run_trial(worker, trial)
            write_result(trial, result)
            confirmation = confirm_if_on_front(worker, trial, result)
            for hook in worker.on_result:
                hook(trial, result, worker.baseline, confirmation)
        except KeyboardInterrupt as stop:
            abandon(trial, f"interrupted ({stop_reason(stop)})")
            raise
        return result.values

    return objective


def confirm_if_on_front(worker: Worker, trial: optuna.Trial, result: TrialResult) -> Confirmation | None:
    """Confirm a trial that enters the front (once, whichever worker gets to it first)."""
    if not worker.config.evaluation.confirm_tokens or not enters_front(worker.study, result):
        return None
    if worker.confirmer is None:
        worker.confirmer = Confirmer.build(worker.plan, worker.model, worker.judge)
    confirmer, start = worker.confirmer, time.perf_counter()
    store = OnceStore(worker.plan.storage_url)
    try:
        confirm_baseline(store, worker.study, worker.plan, confirmer)
        confirmation = confirm_once(store, worker.study, trial.number, lambda: confirmer.trial(result.ablation), worker.log)
    finally:
        store.close()
    worker.log(
        f"trial {trial.number} confirmed on {confirmation.tokens}-token answers in {time.perf_counter() - start:.1f} s: "
        f"{confirmation.not_complied_rate:.1%} not complied, {confirmation.over_refusal_rate:.1%} harmless refused, "
        f"KL over 16 tokens {confirmation.kl_answer:.3f}"
    )
    return confirmation


def abandon(trial: optuna.Trial, reason: str) -> None:
    """Record why a running trial stops unfinished and queue its parameters to run again.

    Optuna then stores it as FAIL; the next worker to ask for a trial replays it.
    """
    study = trial.study
    write_failure(study, trial._trial_id, reason)
    # An interruption is not the trial's fault: no retry limit.
    RetryDeadTrial(max_retry=None)(study, study._storage.get_trial(trial._trial_id))


def replay_line(evaluator: Evaluator, config: StudyConfig) -> str:
    """One line at start: how much of each trial the worker skips, and why not more."""
    depth, n_layers = evaluator.kl_replay.depth, evaluator.loaded.n_layers
    if not config.evaluation.replay_layers:
        replay = "off (replay_layers = false)"
    elif depth:
        size = (evaluator.kl_replay.nbytes + evaluator.prefill_replay.nbytes) / 2**20
        replay = f"up to {depth} of {n_layers} leading layers kept ({size:,.0f} MiB)"
    else:
        replay = "off (no memory for it, or this architecture does not replay exactly)"
    screening = "on" if config.optimization.screening else "off (screening = false)"
    return f"layer replay {replay}; screening {screening}; {prefix_line(evaluator)}; {exp_line(evaluator, config)}"


def exp_line(evaluator: Evaluator, config: StudyConfig) -> str:
    """Which exp the model's SiLU and attention run with, and why."""
    if fastexp.installed(evaluator.loaded.model):
        return "SiLU and attention on abopt's fast exp (a CPU; fast_exp = false for mlx's own)"
    if not config.evaluation.fast_exp:
        return "mlx's own exp (fast_exp = false)"
    if mx.default_device() == mx.gpu:
        return "mlx's own exp (a GPU's is fast)"
    return "mlx's own exp (this architecture has its own SiLU and attention code)"


def prefix_line(evaluator: Evaluator) -> str:
    """What the prompts' shared chat-template prefix saves, or why it runs with every prompt."""
    if not evaluator.settings.share_prefix:
        return "shared prefix off (share_prefix = false)"
    if not evaluator.joinable:
        return "shared prefix off (this model's caches are not plain KV caches)"
    kl, refusal = evaluator.shared_prefix(evaluator.kl_inputs, evaluator.settings.kl_tokens), evaluator.shared_prefix(evaluator.harmful_tokens)
    if not kl and not refusal:
        return "shared prefix off (the prompts share too few leading tokens)"
    return f"shared prefix: {kl} + {refusal} leading tokens run once per pass (KL + refusal prompts)"


def run_trial(worker: Worker, trial: optuna.Trial) -> TrialResult:
    """Steer as the trial's parameters say and score it (its constraint is set on the trial)."""
    start = time.perf_counter()
    params = suggest(trial, worker.config.search_space, worker.model.loaded.n_layers, post_norm=worker.model.loaded.post_norm)
    weights = worker.model.steer(params)
    # Layers before the first steered one compute what the untouched model computes.
    first = min(first_steered_layer(weights, worker.model.loaded.n_layers), worker.evaluator.kl_replay.depth)
    kl_start = time.perf_counter()
    kl = worker.evaluator.kl_divergence(start=first)
    kl_seconds = time.perf_counter() - kl_start
    ceiling = worker.config.optimization.kl_ceiling
    feasible = not ceiling or kl <= ceiling
    refusal_seconds, skipped, screened, judged = 0.0, None, None, None
    if feasible:
        refusal_start = time.perf_counter()
        total = len(worker.evaluator.harmful_tokens)
        screen = Screen(front_points(worker.study), kl, total) if worker.config.optimization.screening else None
        refusals = worker.evaluator.refusals(start=first, give_up=screen)
        refusal_seconds = time.perf_counter() - refusal_start
        rate, refused, total, answers, generated = (
            refusals.rate, refusals.refused, refusals.total, refusals.answers, refusals.generated_tokens
        )
        verdicts, scores, degenerate = refusals.verdicts, refusals.scores, refusals.degenerate
        if refusals.screened and screen is not None:
            screened, judged = screen.reason(refusals.judged), refusals.judged
    else:
        # Not worth generating for: recorded as infeasible with the worst refusal rate.
        rate, refused, total, answers, generated = 1.0, None, len(worker.evaluator.harmful_tokens), (), 0
        verdicts, scores, degenerate = (), None, None
        skipped = f"skipped: KL {kl:.3f} above the ceiling {ceiling:g}"
    if ceiling:
        trial.set_constraint("kl_ceiling", kl - ceiling)
    worker.model.steering.clear()
    n = worker.config.evaluation.sample_answers
    harmful = worker.plan.prompts.harmful_eval
    return TrialResult(
        kl_divergence=kl,
        refusal_rate=rate,
        refused=refused,
        total=total,
        ablation=params,
        layer_weights={k: tuple(round(float(x), 5) for x in v) for k, v in weights.items()},
        samples=tuple(
            SampleAnswer(p, a, v, scores[i] if scores else None)
            for i, (p, a, v) in enumerate(zip(harmful[:n], answers[:n], verdicts[:n]))
            if v  # a screened trial's answers without a verdict are not samples of anything
        ),
        generated_tokens=generated,
        timings=Timings(kl_seconds, refusal_seconds, time.perf_counter() - start),
        feasible=feasible if ceiling else None,
        refusal_stage=skipped,
        degenerate=degenerate,
        screened=screened,
        judged=judged,
        replayed_layers=first,
    )


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

    def after_trial(study: optuna.Study, _trial: FrozenTrial) -> None:
        for hook in worker.on_trial:
            hook(study)
        if not _wait_for_work(study, target):
            study.stop()

    study.optimize(_objective(worker, target), callbacks=[after_trial], gc_after_trial=False)

"""What a trial produced, as one typed record; the only module that reads or writes it in Optuna.

A trial's record is stored as Optuna user attributes, one per field, so optuna-dashboard
shows them as they are, with ``record_version`` beside them. Studies written by abopt 0.1.0
stored the same keys without a version (version 1); both read the same way. Browsing,
export, progress and the dashboard take :class:`TrialRecord` and :class:`Baseline`, never
raw attributes.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimizer.engine.profile import AblationParams
from optimizer.study.storage import done_payloads, study_engine

RECORD_VERSION = 2
BASELINE_ATTR = "baseline"
CONFIRMATION_BASELINE_ATTR = "confirm_baseline"
METRIC_NAMES = ("kl_divergence", "refusal_rate")


@dataclass(frozen=True)
class SampleAnswer:
    """One harmful eval prompt, the steered model's answer to it, and the answer's verdict."""

    prompt: str
    answer: str
    verdict: str | None = None  # None: written before verdicts were stored
    score: float | None = None  # the judge's P(complied); None: markers judged

    def to_dict(self) -> dict[str, Any]:
        extra = {k: v for k, v in (("verdict", self.verdict), ("score", self.score)) if v is not None}
        return {"prompt": self.prompt, "answer": self.answer, **extra}


@dataclass(frozen=True)
class Timings:
    """Seconds a trial spent: the KL stage, the refusal stage, and the whole trial."""

    kl: float
    refusal: float
    trial: float


@dataclass(frozen=True)
class WorkerInfo:
    """Which process ran a trial: its machine, its pid and its worker index in the study."""

    host: str
    pid: int
    index: int | None = None

    @classmethod
    def this_process(cls, index: int) -> "WorkerInfo":
        return cls(socket.gethostname(), os.getpid(), index)


@dataclass(frozen=True)
class TrialResult:
    """What scoring one trial produced: its objectives and everything needed to re-apply it."""

    kl_divergence: float
    refusal_rate: float  # the share of harmful answers not complied with: refused or degenerate
    refused: int | None  # None: the refusal stage was skipped (see refusal_stage)
    total: int
    ablation: AblationParams
    layer_weights: dict[str, tuple[float, ...]]
    samples: tuple[SampleAnswer, ...]
    generated_tokens: int
    timings: Timings
    feasible: bool | None = None  # None: the study has no KL ceiling
    refusal_stage: str | None = None  # why the refusal stage was skipped
    degenerate: int | None = None  # degenerate answers; None: before three verdicts (0.1.0)
    # Why scoring stopped early (see study/screen.py): the trial could not reach the front.
    # Its refusal rate is then a bound (answers known not to comply so far ÷ total), and
    # refused/degenerate count the answers judged so far (``judged`` of ``total``).
    screened: str | None = None
    judged: int | None = None  # None: every answer (not screened)
    replayed_layers: int = 0  # leading layers taken from the untouched model (see engine/replay.py)

    @property
    def values(self) -> tuple[float, float]:
        """The objectives in Optuna's order (metric names ``METRIC_NAMES``)."""
        return self.kl_divergence, self.refusal_rate


@dataclass(frozen=True)
class Confirmation:
    """A trial (or the untouched model) scored again on long answers: see study/confirm.py."""

    tokens: int  # answer length judged
    judge: str  # "markers" or the judge model
    refused: int  # harmful answers refused
    degenerate: int  # harmful answers degenerate
    total: int  # harmful answers
    harmless_refused: int  # harmless answers refused: over-refusal
    harmless_degenerate: int
    harmless_total: int
    kl_answer: float  # KL over the original's first 16 answer tokens, teacher-forced

    @property
    def not_complied_rate(self) -> float:
        return (self.refused + self.degenerate) / self.total if self.total else 0.0

    @property
    def over_refusal_rate(self) -> float:
        return self.harmless_refused / self.harmless_total if self.harmless_total else 0.0

    @property
    def degenerate_rate(self) -> float:
        """Degenerate answers among harmful and harmless ones."""
        total = self.total + self.harmless_total
        return (self.degenerate + self.harmless_degenerate) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Confirmation":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TrialRecord:
    """A stored trial as abopt sees it, whatever its state."""

    number: int
    state: TrialState
    result: TrialResult | None  # a complete trial's (None before it completes, or if it failed)
    params: dict[str, Any] = field(default_factory=dict)  # Optuna's sampled parameters
    worker: WorkerInfo | None = None
    retry_of: int | None = None
    failure: str | None = None
    constraint_ok: bool = True  # False: the trial broke the KL ceiling
    started: datetime.datetime | None = None
    completed: datetime.datetime | None = None
    confirmed: Confirmation | None = None  # scored again on long answers (front trials)

    @property
    def kl_divergence(self) -> float:
        return self.result.kl_divergence if self.result else float("nan")

    @property
    def refusal_rate(self) -> float:
        return self.result.refusal_rate if self.result else float("nan")

    @property
    def refused(self) -> int | None:
        return self.result.refused if self.result else None

    @property
    def total(self) -> int | None:
        return self.result.total if self.result else None

    @property
    def ablation(self) -> AblationParams | None:
        return self.result.ablation if self.result else None

    @property
    def layer_weights(self) -> dict[str, tuple[float, ...]]:
        return self.result.layer_weights if self.result else {}

    @property
    def degenerate(self) -> int | None:
        return self.result.degenerate if self.result else None

    @property
    def best_refusal_rate(self) -> float:
        """The refusal rate to trust: the confirmed one where there is one, else the search's."""
        return self.confirmed.not_complied_rate if self.confirmed else self.refusal_rate


@dataclass(frozen=True)
class Baseline:
    """The untouched model's scores on the eval prompts, stored once per study."""

    refusal_rate: float
    refused: int | None
    total: int | None
    answers: tuple[str, ...] = ()
    degenerate: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Baseline":
        return cls(
            float(data["refusal_rate"]), data.get("refused"), data.get("total"), tuple(data.get("answers") or ()),
            data.get("degenerate"),
        )

    def to_dict(self) -> dict[str, Any]:
        """As the study and the study cache store it."""
        stored = {
            "kl_divergence": 0.0,
            "refusal_rate": self.refusal_rate,
            "refused": self.refused,
            "total": self.total,
            "answers": list(self.answers),
        }
        return stored | ({"degenerate": self.degenerate} if self.degenerate is not None else {})


# --- writing ---------------------------------------------------------------------------------


def write_worker(study: optuna.Study, trial_id: int, worker: WorkerInfo) -> None:
    """Record which process runs the trial, so that a dead one is found."""
    study._storage.set_trial_user_attr(trial_id, "worker", {"host": worker.host, "pid": worker.pid, "index": worker.index})


def write_retry_of(trial: optuna.Trial) -> int | None:
    """For a re-queued trial, record which trial it replays; returns that trial's number."""
    retried = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
    if retried is not None:
        trial.set_user_attr("retry_of", retried)
    return retried


def write_result(trial: optuna.Trial, result: TrialResult) -> None:
    """Store what the trial produced (its objective values are Optuna's to store)."""
    if result.refusal_stage is not None:
        trial.set_user_attr("refusal_stage", result.refusal_stage)
    if result.feasible is not None:
        trial.set_user_attr("feasible", result.feasible)  # optuna-dashboard 0.21 shows user attrs only
    trial.set_user_attr("ablation", result.ablation.to_dict())
    trial.set_user_attr("layer_weights", {k: list(v) for k, v in result.layer_weights.items()})
    trial.set_user_attr("refused", result.refused)
    if result.degenerate is not None:
        trial.set_user_attr("degenerate", result.degenerate)
    trial.set_user_attr("total", result.total)
    trial.set_user_attr("sample_answers", [s.to_dict() for s in result.samples])
    trial.set_user_attr("generated_tokens", result.generated_tokens)
    if result.screened is not None:
        trial.set_user_attr("screened", result.screened)
        trial.set_user_attr("judged", result.judged)
    if result.replayed_layers:
        trial.set_user_attr("replayed_layers", result.replayed_layers)
    t = result.timings
    trial.set_user_attr("seconds", {"kl": round(t.kl, 4), "refusal": round(t.refusal, 4), "trial": round(t.trial, 4)})
    trial.set_user_attr("record_version", RECORD_VERSION)


def write_failure(study: optuna.Study, trial_id: int, reason: str) -> None:
    """Record why a trial did not complete (works on a trial another process ran)."""
    study._storage.set_trial_user_attr(trial_id, "failure", reason)


def write_baseline(study: optuna.Study, baseline: Baseline) -> None:
    """Store the untouched model's scores on the study, once."""
    if BASELINE_ATTR not in study.user_attrs:
        study.set_user_attr(BASELINE_ATTR, baseline.to_dict())


# --- reading ---------------------------------------------------------------------------------


def read_baseline(study: optuna.Study) -> Baseline | None:
    """The untouched model's scores, if the study has measured them."""
    data = study.user_attrs.get(BASELINE_ATTR)
    return Baseline.from_dict(data) if data else None


def write_confirmation_baseline(study: optuna.Study, baseline: Confirmation) -> None:
    """Store the untouched model's confirmation on the study, once."""
    if CONFIRMATION_BASELINE_ATTR not in study.user_attrs:
        study.set_user_attr(CONFIRMATION_BASELINE_ATTR, baseline.to_dict())


def read_confirmation_baseline(study: optuna.Study) -> Confirmation | None:
    data = study.user_attrs.get(CONFIRMATION_BASELINE_ATTR)
    return Confirmation.from_dict(data) if data else None


def confirmation_key(study_name: str, number: int) -> str:
    """Where trial ``number``'s confirmation lives in the study's compute-once store.

    Not on the trial (a finished trial takes no attributes) nor in the study's system
    attributes (read whole, with every dashboard note, on each read).
    """
    return f"confirm:{study_name}:{number}"


def read_confirmations(study: optuna.Study) -> dict[int, Confirmation]:
    """Every confirmation of the study's trials, by trial number."""
    prefix = confirmation_key(study.study_name, 0)[:-1]
    payloads = done_payloads(study_engine(study), prefix)
    return {
        int(key.removeprefix(prefix)): Confirmation.from_dict(json.loads(value))
        for key, value in payloads.items()
        if key.removeprefix(prefix).isdigit()  # not another study whose name starts like this one's
    }


def read_trial(trial: FrozenTrial, confirmations: Mapping[int, Confirmation] | None = None) -> TrialRecord:
    """A stored trial as a record (any state, any record version); ``confirmations`` are the
    study's (see :func:`read_confirmations`)."""
    attrs = trial.user_attrs
    worker = attrs.get("worker")
    return TrialRecord(
        number=trial.number,
        state=trial.state,
        result=_result(trial) if trial.state == TrialState.COMPLETE else None,
        params=dict(trial.params),
        worker=WorkerInfo(worker.get("host", ""), int(worker.get("pid", 0)), worker.get("index")) if worker else None,
        retry_of=attrs.get("retry_of"),
        failure=attrs.get("failure"),
        constraint_ok=all(value <= 0 for value in trial.constraints.values()),
        started=trial.datetime_start,
        completed=trial.datetime_complete,
        confirmed=(confirmations or {}).get(trial.number),
    )


def read_trials(study: optuna.Study, states: Iterable[TrialState] | None = None) -> list[TrialRecord]:
    """The study's trials as records (with their confirmations), in trial order."""
    confirmations = read_confirmations(study)
    return [read_trial(t, confirmations) for t in study.get_trials(deepcopy=False, states=tuple(states) if states else None)]


def _result(trial: FrozenTrial) -> TrialResult | None:
    attrs = trial.user_attrs
    if "ablation" not in attrs or trial.values is None:
        return None  # complete, but not written by abopt
    kl, rate = trial.values
    seconds = attrs.get("seconds") or {}
    return TrialResult(
        kl_divergence=float(kl),
        refusal_rate=float(rate),
        refused=attrs.get("refused"),
        total=attrs.get("total"),
        ablation=AblationParams.from_dict(attrs["ablation"]),
        layer_weights={k: tuple(v) for k, v in (attrs.get("layer_weights") or {}).items()},
        samples=tuple(
            SampleAnswer(s["prompt"], s["answer"], s.get("verdict"), s.get("score")) for s in attrs.get("sample_answers", [])
        ),
        generated_tokens=attrs.get("generated_tokens"),
        timings=Timings(seconds.get("kl", 0.0), seconds.get("refusal", 0.0), seconds.get("trial", 0.0)),
        feasible=attrs.get("feasible"),
        refusal_stage=attrs.get("refusal_stage"),
        degenerate=attrs.get("degenerate"),
        screened=attrs.get("screened"),
        judged=attrs.get("judged"),
        replayed_layers=attrs.get("replayed_layers", 0),
    )

"""The Pareto front of a study: which trials are worth choosing from, and how good they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

# (label, KL below, refusal rate below): the first row a trial fits names it.
QUALITY_LEVELS = (
    ("Excellent", 0.15, 0.01),
    ("Very good", 0.25, 0.025),
    ("Good", 0.40, 0.05),
    ("Acceptable", 0.60, 0.10),
)


def quality(kl_divergence: float, refusal_rate: float) -> str:
    """A label for a trade-off: Excellent, Very good, Good, Acceptable or Poor."""
    for label, kl_limit, rate_limit in QUALITY_LEVELS:
        if kl_divergence < kl_limit and refusal_rate < rate_limit:
            return label
    return "Poor"


@dataclass(frozen=True)
class FrontEntry:
    """One trial's scores, as the front and the progress display show them."""

    number: int
    kl_divergence: float
    refusal_rate: float
    refused: int | None
    total: int | None
    quality: str
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number,
            "kl_divergence": self.kl_divergence,
            "refusal_rate": self.refusal_rate,
            "refused": self.refused,
            "total": self.total,
            "quality": self.quality,
            "params": self.params,
        }


def entry(trial: FrozenTrial) -> FrontEntry:
    kl, rate = trial.values
    return FrontEntry(
        number=trial.number,
        kl_divergence=float(kl),
        refusal_rate=float(rate),
        refused=trial.user_attrs.get("refused"),
        total=trial.user_attrs.get("total"),
        quality=quality(kl, rate),
        params=dict(trial.params),
    )


def pareto_front(study: optuna.Study) -> list[FrontEntry]:
    """Non-dominated complete (and feasible) trials, lowest refusal rate first."""
    entries = [entry(t) for t in study.best_trials]
    return sorted(entries, key=lambda e: (e.refusal_rate, e.kl_divergence, e.number))


def baseline(study: optuna.Study) -> dict[str, Any] | None:
    """The untouched model's scores, stored when the study started."""
    return study.user_attrs.get("baseline")

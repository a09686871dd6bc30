"""The Pareto front of a study: which trials are worth choosing from, and how good they are."""

from __future__ import annotations

import optuna

from optimizer.study.record import TrialRecord, read_trial

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


def percent(rate: float) -> str:
    """0.125 → '12.5%'."""
    return f"{100 * rate:.1f}%"


def counts(refused: int | None, total: int | None) -> str:
    """' (1/8)' when the counts are known, else ''."""
    return f" ({refused}/{total})" if refused is not None and total is not None else ""


def pareto_front(study: optuna.Study) -> list[TrialRecord]:
    """Non-dominated complete (and feasible) trials, lowest refusal rate first."""
    front = [read_trial(t) for t in study.best_trials]
    return sorted(front, key=lambda r: (r.refusal_rate, r.kl_divergence, r.number))

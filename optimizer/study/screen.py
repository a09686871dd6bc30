"""Screening: a trial that can no longer reach the front stops being scored.

Once a trial's KL is known, its refusal rate can only be as low as the answers already known
not to comply allow (none known: 0). If a complete trial has values that dominate every
rate still possible, the trial is dominated whatever its remaining answers turn out to be,
and scoring them cannot change the front. Such a trial is stored with that bound as its
refusal rate, which the dominating trial also dominates: the front is exactly the one full
scoring gives (a screened trial's bound can only push off the front trials that its
dominator pushes off anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import optuna
from optuna.trial import TrialState


@dataclass(frozen=True)
class Point:
    """A complete, feasible trial's objective values."""

    number: int
    kl: float
    rate: float


def front_points(study: optuna.Study) -> tuple[Point, ...]:
    """The non-dominated values among the study's complete, feasible trials."""
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.values is None or any(v > 0 for v in trial.constraints.values()):
            continue
        points.append(Point(trial.number, float(trial.values[0]), float(trial.values[1])))
    return pareto(points)


def pareto(points: Iterable[Point]) -> tuple[Point, ...]:
    """The points no other point dominates (one of several with equal values)."""
    # Lowest KL first: a point is on the front when its rate beats every rate before it.
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p.kl, p.rate, p.number)):
        if p.rate < best:
            front.append(p)
            best = p.rate
    return tuple(front)


@dataclass
class Screen:
    """Decides, as a trial's answers come in, whether the trial can still reach the front."""

    points: tuple[Point, ...]
    kl: float
    total: int  # harmful prompts: the refusal rate's denominator
    by: Point | None = field(default=None, init=False)  # the trial that dominated it
    bound: float = field(default=0.0, init=False)

    def __call__(self, not_complied: int) -> bool:
        """Whether ``not_complied`` answers known not to comply make the trial dominated."""
        # The same division the refusal rate is computed with, so ties compare exactly.
        bound = not_complied / self.total if self.total else 0.0
        for p in self.points:
            if p.kl <= self.kl and p.rate <= bound and (p.kl < self.kl or p.rate < bound):
                self.by, self.bound = p, bound
                return True
        return False

    def reason(self, judged: int) -> str:
        """Why the trial stopped, for its record."""
        p = self.by
        assert p is not None
        return (
            f"screened after {judged} of {self.total} answers: dominated by trial {p.number} "
            f"(KL {p.kl:.4f} vs {self.kl:.4f}, refusal rate {p.rate:.4f} vs at least {self.bound:.4f})"
        )

"""What `abopt run` shows while it works: a live panel on a terminal, log lines otherwise."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from optimizer.browse.front import counts, pareto_front, percent, quality, trial_quality
from optimizer.study.record import (
    Confirmation,
    TrialRecord,
    read_confirmation_baseline,
    read_trial,
)
from optimizer.study.storage import completed_count

SHOWN_TRADE_OFFS = 5


@dataclass
class Snapshot:
    """What the display knows of the study at one moment."""

    completed: int
    target: int
    front: list[TrialRecord]  # best trade-offs first: confirmed refusal rates where there are
    last: TrialRecord | None
    failed: int
    yardstick: Confirmation | None = None


def snapshot(study: optuna.Study, target: int) -> Snapshot:
    """Read the study's state in one pass over its trials."""
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    last = read_trial(max(completed, key=lambda t: t.datetime_complete or t.datetime_start)) if completed else None
    failed = sum(t.state == TrialState.FAIL for t in trials)
    front = sorted(pareto_front(study), key=lambda r: (r.best_refusal_rate, r.kl_divergence)) if completed else []
    return Snapshot(len(completed), target, front, last, failed, read_confirmation_baseline(study))


def trade_offs_table(front: list[TrialRecord], yardstick: Confirmation | None = None, limit: int = SHOWN_TRADE_OFFS) -> Table:
    """The front's best trade-offs: lowest (confirmed, where there is one) refusal rate first."""
    table = Table(title=f"Pareto front: {len(front)} trial(s)", title_justify="left", expand=False)
    for column in ("trial", "refusals", "confirmed", "KL", "quality"):
        table.add_column(column, justify="right" if column != "quality" else "left")
    for r in front[:limit]:
        c = r.confirmed
        table.add_row(
            f"#{r.number}",
            percent(r.refusal_rate) + counts(r.refused, r.total, r.degenerate),
            percent(c.not_complied_rate) if c else "",
            f"{r.kl_divergence:.3f}",
            trial_quality(r, yardstick),
        )
    return table


@dataclass
class Progress:
    """Live progress of a study run toward ``target`` complete trials (a run's display)."""

    study_name: str
    target: int
    started_completed: int = 0
    start: float = field(default_factory=time.monotonic)
    console: Console = field(default_factory=lambda: Console(stderr=False))
    _live: Live | None = None

    @property
    def interactive(self) -> bool:
        return self.console.is_terminal

    def __enter__(self) -> "Progress":
        if self.interactive:
            self._live = Live(Text("starting…"), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def log(self, message: str) -> None:
        """A line above the live panel (or on its own when not on a terminal)."""
        if self._live is not None:
            self._live.console.print(message)
        else:
            print(message, flush=True)

    def begin(self, study: optuna.Study) -> None:
        """Count from the trials the study already has (for the ETA)."""
        self.started_completed = completed_count(study)

    def show(self, study: optuna.Study) -> None:
        """The study after a trial ended."""
        self.update(snapshot(study, self.target))

    def eta(self, snap: Snapshot) -> float | None:
        done_here = snap.completed - self.started_completed
        if done_here <= 0:
            return None
        per_trial = (time.monotonic() - self.start) / done_here
        return per_trial * max(snap.target - snap.completed, 0)

    def update(self, snap: Snapshot) -> None:
        if self._live is not None:
            self._live.update(self.render(snap))
        elif snap.last is not None:
            self.log(self.line(snap))

    def line(self, snap: Snapshot) -> str:
        """One plain log line per finished trial."""
        t = snap.last
        best = snap.front[0] if snap.front else None
        best_text = (
            f" best #{best.number} {best.kl_divergence:.3f}/{percent(best.best_refusal_rate)} "
            f"{trial_quality(best, snap.yardstick)}"
            if best
            else ""
        )
        eta = self.eta(snap)
        return (
            f"trial {snap.completed}/{snap.target} #{t.number}: KL {t.kl_divergence:.4f}, "
            f"refusals {percent(t.refusal_rate)}{counts(t.refused, t.total, t.degenerate)}"
            f" | front {len(snap.front)}{best_text} | elapsed {_duration(time.monotonic() - self.start)}"
            f"{f', ETA {_duration(eta)}' if eta is not None else ''}"
        )

    def render(self, snap: Snapshot) -> Group:
        eta = self.eta(snap)
        header = Text.assemble(
            (f"{self.study_name}  ", "bold"),
            f"trial {snap.completed}/{snap.target}  ",
            f"elapsed {_duration(time.monotonic() - self.start)}  ",
            f"ETA {_duration(eta) if eta is not None else '…'}",
            (f"  ({snap.failed} failed)" if snap.failed else "", "yellow"),
        )
        parts: list = [header]
        last = snap.last
        if last is not None:
            kl, rate = last.kl_divergence, last.refusal_rate
            screened = last.result is not None and last.result.screened is not None
            parts.append(
                Text(
                    f"last: #{last.number}  KL {kl:.4f}  refusals {'≥ ' if screened else ''}{percent(rate)}"
                    f"{counts(last.refused, last.total, last.degenerate)}  {'screened' if screened else quality(kl, rate)}"
                )
            )
        if snap.front:
            parts.append(trade_offs_table(snap.front, snap.yardstick))
        return Group(*parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()

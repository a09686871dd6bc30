"""How a run stops early: Ctrl-C, SIGTERM or SIGHUP, a time budget, or its parent's death.

Each becomes one exception, :class:`Stopped`, raised in the main thread between two
forward passes (signal handlers run whenever the interpreter gets control back from mlx),
so the running trial is abandoned within seconds, however large the model: it is failed
as "interrupted" and its parameters re-queued, as a killed worker's trial is.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from optimizer.errors import UserError

# Exit statuses, as shells report a process ended by the signal (128 + its number).
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
SIGNAL_REASONS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
TIMEOUT_EXIT = 0  # a used-up time budget ends a run as a finished one does


class Stopped(KeyboardInterrupt):
    """The run was asked to stop; ``reason`` says by what, ``exit_code`` how to exit."""

    def __init__(self, reason: str, exit_code: int, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code
        self.timed_out = timed_out


def stop_reason(error: BaseException) -> str:
    """What stopped a run, for a failed trial's record ("Ctrl-C" for a plain KeyboardInterrupt)."""
    return error.reason if isinstance(error, Stopped) else "Ctrl-C"


@dataclass
class _State:
    stopping: bool = False
    parent_gone: bool = False


_state = _State()


def _raise_stop(signum: int, _frame: object) -> None:
    if _state.stopping:
        return  # already stopping: let the clean-up finish
    _state.stopping = True
    reason = "the parent process died" if _state.parent_gone else SIGNAL_REASONS[signal.Signals(signum)]
    raise Stopped(reason, EXIT_CODES[signal.Signals(signum)])


def _raise_timeout(_signum: int, _frame: object) -> None:
    if _state.stopping:
        return
    _state.stopping = True
    raise Stopped("time budget used up", TIMEOUT_EXIT, timed_out=True)


def handle_stop_signals(timeout: float | None = None) -> None:
    """Turn SIGINT, SIGTERM and SIGHUP (and, after ``timeout`` seconds, SIGALRM) into :class:`Stopped`."""
    _state.stopping = False
    for signum in EXIT_CODES:
        signal.signal(signum, _raise_stop)
    if timeout is not None:
        signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001))


def cancel_timeout() -> None:
    """Disarm the time budget (the run ended on its own)."""
    signal.setitimer(signal.ITIMER_REAL, 0)


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``90m``, ``8h``, ``1h30m``, ``45s`` or ``2d``."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    parts = re.fullmatch(r"\s*((?:\d+(?:\.\d+)?[dhms]\s*)+)", text.lower())
    if not parts:
        raise UserError(f"--timeout {text!r} is not a duration; write it like 90m, 8h, 1h30m or 45s")
    seconds = sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([dhms])", text.lower()))
    if seconds <= 0:
        raise UserError(f"--timeout {text!r} is no time at all; give a positive duration like 90m")
    return seconds


def watch_parent(interval: float = 0.5) -> None:
    """Stop this process (as SIGTERM would) as soon as the process that started it is gone.

    Workers of ``abopt run --workers N`` run this, so a parent killed with kill -9 does not
    leave them running unseen; their trials are then recovered as any dead trial is.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        _state.parent_gone = True
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="abopt-parent-watch", daemon=True).start()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, dead but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS): its parent reaps it
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"

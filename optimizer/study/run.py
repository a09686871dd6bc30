"""`abopt run`: one worker in this process, or several worker processes on one storage.

A run ends when the study has its trials, or early: Ctrl-C, SIGTERM, SIGHUP or the time
budget (see :mod:`optimizer.stopping`). Either way the running trial is failed and
re-queued, never left RUNNING, and the same command resumes the study.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, Sequence

import optuna

from optimizer.errors import UserError
from optimizer.study.config import StudyConfig
from optimizer.study.plan import StudyPlan, open_or_create, plan
from optimizer.study.steered import load_study_model
from optimizer.study.stopping import EXIT_CODES, Stopped, cancel_timeout, watch_parent
from optimizer.study.storage import beside_study, completed_count, find_study
from optimizer.study.worker import ResultHook, run_worker, start_worker

LOGS_SUFFIX = ".abopt-logs"
WORKER_STOP_SECONDS = 60  # how long stopped workers get to fail their trials before a kill


@dataclass(frozen=True)
class RunResult:
    """How a run ended: with its trials, or ``stopped`` early (and by what)."""

    plan: StudyPlan
    target: int
    completed: int
    stopped: Stopped | None = None


class RunDisplay(Protocol):
    """What a run shows while it works; the command that starts the run supplies it."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...

    def log(self, message: str) -> None:
        """A line of news (a model loading, directions measured, a worker failing)."""

    def begin(self, study: optuna.Study) -> None:
        """The study as the run starts on it."""

    def show(self, study: optuna.Study) -> None:
        """The study after a trial ended."""


def keep_awake() -> subprocess.Popen | None:
    """On macOS, stop the machine sleeping while this process lives (studies run for hours)."""
    if sys.platform == "darwin" and shutil.which("caffeinate"):
        return subprocess.Popen(["caffeinate", "-i", "-w", str(os.getpid())])
    return None


def run_study(
    config: StudyConfig,
    storage_url: str,
    *,
    n_trials: int | None,
    workers: int,
    display: RunDisplay,
    timeout: float | None = None,
    on_result: Sequence[ResultHook] = (),
) -> RunResult:
    """Create or resume the study and run it to ``n_trials`` complete trials.

    The model is loaded (with several workers: built and checked without reading its
    weights) before the study is created or touched, so a broken model leaves no study
    behind that would refuse the repaired one. ``timeout`` is the time budget in seconds,
    only passed on to worker processes (this process's own is armed by the caller).
    ``on_result`` hooks see each scored trial while it runs (worker processes get the
    command's own hooks, as they run the same command).
    """
    study_plan = plan(config, storage_url)
    for note in study_plan.notes:
        display.log(note)
    target = n_trials or config.optimization.n_trials
    if workers == 1:
        display.log(f"loading {config.model}")
    loaded = load_study_model(study_plan, lazy=workers > 1, unpack=True)
    study = open_or_create(study_plan)
    keep_awake()
    display.begin(study)
    stopped = None
    try:
        if workers > 1:
            stopped = _run_processes(study_plan, target, workers, display, timeout)
        else:
            with display:
                worker = start_worker(study_plan, study, log=display.log, loaded=loaded)
                worker.on_result.extend(on_result)
                worker.on_trial.append(display.show)
                run_worker(worker, target)
    except Stopped as stop:
        stopped = stop
    finally:
        cancel_timeout()
    return RunResult(study_plan, target, completed_count(study), stopped)


def run_as_worker(
    config: StudyConfig, storage_url: str, n_trials: int | None, number: int, on_result: Sequence[ResultHook] = ()
) -> int:
    """The body of one of several worker processes (plain log lines on stderr); its exit code."""
    watch_parent()

    def log(message: str) -> None:
        print(f"[worker {number}, pid {os.getpid()}] {message}", file=sys.stderr, flush=True)

    try:
        study_plan = plan(config, storage_url)
        target = n_trials or config.optimization.n_trials
        study = open_or_create(study_plan)
        worker = start_worker(study_plan, study, log=log)
        worker.on_result.extend(on_result)
        log(f"sampler seed {config.optimization.seed + worker.index} (the study's worker #{worker.index}, counting every run)")
        run_worker(worker, target)
    except Stopped as stop:
        log(f"stopped ({stop.reason})")
        return stop.exit_code
    finally:
        cancel_timeout()
    return 0


def _worker_command(study_plan: StudyPlan, target: int, number: int, deadline: float | None) -> list[str]:
    command = [sys.executable, "-m", "optimizer", "run", str(study_plan.config.path), "--n-trials", str(target)]
    command += ["--storage", study_plan.storage_url, "--as-worker", str(number)]
    if deadline is not None:
        command += ["--timeout", f"{max(deadline - time.time(), 0.001):.3f}s"]
    return command


def _run_processes(study_plan: StudyPlan, target: int, workers: int, display: RunDisplay, timeout: float | None) -> Stopped | None:
    """Run ``workers`` processes on the study, with progress, until all have stopped."""
    config = study_plan.config
    env = dict(os.environ)
    # Each process gets its share of the cores rather than all of them each.
    env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    log_dir = beside_study(study_plan.storage_url, config.base_dir, config.name, LOGS_SUFFIX)
    log_dir.mkdir(exist_ok=True)
    deadline = time.time() + timeout if timeout is not None else None
    logs: list[IO[str]] = [(log_dir / f"worker-{k}.log").open("w") for k in range(workers)]
    processes = [
        subprocess.Popen(_worker_command(study_plan, target, k, deadline), env=env, stdout=log, stderr=log)
        for k, log in enumerate(logs)
    ]
    study = find_study(study_plan.storage_url, config.name)
    stopped = None
    with display:
        display.log(f"{workers} workers started; their logs: {log_dir}")
        try:
            _follow(processes, study, display)
        except Stopped as stop:
            stopped = stop
            if not stop.timed_out:  # on a time budget the workers stop by their own clocks
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
            _wait_for(processes)
        display.show(study)
    for log in logs:
        log.close()
    errors = _worker_failures(processes, log_dir, display, stopped)
    if not errors:
        shutil.rmtree(log_dir, ignore_errors=True)  # kept only when there is something to read
    user_errors = [line.removeprefix("abopt: error: ") for line in errors if line.startswith("abopt: error: ")]
    if user_errors:
        raise UserError(user_errors[0])
    return stopped


def _follow(processes: list[subprocess.Popen], study: optuna.Study, display: RunDisplay) -> None:
    seen = -1
    # Poll every process each time (not any(), which stops at the first live one): a dead
    # worker left unreaped is a zombie whose pid still looks alive to the others.
    while [p.poll() for p in processes].count(None):
        completed = completed_count(study)
        if completed != seen:
            seen = completed
            display.show(study)
        time.sleep(1.0)


def _wait_for(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        try:
            process.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _worker_failures(processes: list[subprocess.Popen], log_dir: Path, display: RunDisplay, stopped: Stopped | None) -> list[str]:
    """Report each worker that failed (not merely stopped) and return its last log line."""
    failures = []
    stop_codes = set(EXIT_CODES.values())
    for k, process in enumerate(processes):
        if process.returncode == 0 or (process.returncode in stop_codes and stopped is not None):
            continue
        log = log_dir / f"worker-{k}.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        display.log(f"worker {k} (pid {process.pid}) exited with code {process.returncode}: {' | '.join(tail)} (log: {log})")
        failures.append(tail[-1] if tail else "")
    return failures

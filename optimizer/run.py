"""`abopt run`: one worker in this process, or several worker processes on one storage."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from optimizer.config import StudyConfig
from optimizer.progress import Progress, snapshot
from optimizer.study import (
    StudyPlan,
    completed_count,
    make_storage,
    open_or_create,
    plan,
    run_worker,
    start_worker,
)

INTERRUPTED = 130


@dataclass(frozen=True)
class RunResult:
    """How a run ended."""

    plan: StudyPlan
    target: int
    completed: int
    interrupted: bool


def keep_awake() -> subprocess.Popen | None:
    """On macOS, stop the machine sleeping while this process lives (studies run for hours)."""
    if sys.platform == "darwin" and shutil.which("caffeinate"):
        return subprocess.Popen(["caffeinate", "-i", "-w", str(os.getpid())])
    return None


def run_study(config: StudyConfig, storage_url: str, *, n_trials: int | None, workers: int, progress: Progress) -> RunResult:
    """Create or resume the study and run it to ``n_trials`` complete trials."""
    study_plan = plan(config, storage_url)
    target = n_trials or config.optimization.n_trials
    study = open_or_create(study_plan)
    keep_awake()
    progress.started_completed = completed_count(study)
    if workers > 1:
        interrupted = _run_processes(study_plan, target, workers, progress)
    else:
        interrupted = _run_here(study_plan, study, target, progress)
    return RunResult(study_plan, target, completed_count(study), interrupted)


def _run_here(study_plan: StudyPlan, study, target: int, progress: Progress) -> bool:
    try:
        with progress:
            worker = start_worker(study_plan, study, log=progress.log)
            worker.on_trial = lambda s, _: progress.update(snapshot(s, target))
            run_worker(worker, target)
    except KeyboardInterrupt:
        return True
    return False


def run_as_worker(config: StudyConfig, storage_url: str, n_trials: int | None) -> bool:
    """The body of one of several worker processes: plain log lines on stderr."""
    study_plan = plan(config, storage_url)
    target = n_trials or config.optimization.n_trials
    study = open_or_create(study_plan)

    def log(message: str) -> None:
        print(f"[worker {os.getpid()}] {message}", file=sys.stderr, flush=True)

    try:
        worker = start_worker(study_plan, study, log=log)
        log(f"worker index {worker.index}, seed {config.optimization.seed + worker.index}")
        run_worker(worker, target)
    except KeyboardInterrupt:
        return True
    return False


def _worker_command(study_plan: StudyPlan, target: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "optimizer",
        "run",
        str(study_plan.config.path),
        "--n-trials",
        str(target),
        "--storage",
        study_plan.storage_url,
        "--as-worker",
    ]


def _run_processes(study_plan: StudyPlan, target: int, workers: int, progress: Progress) -> bool:
    """Start ``workers`` processes on the study and show progress until all have stopped."""
    env = dict(os.environ)
    # Each process gets its share of the cores rather than all of them each.
    env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    log_dir = Path(tempfile.mkdtemp(prefix="abopt-workers-"))
    processes = []
    for k in range(workers):
        log = (log_dir / f"worker-{k}.log").open("w")
        processes.append((subprocess.Popen(_worker_command(study_plan, target), env=env, stdout=log, stderr=log), log))
    study = optuna.load_study(study_name=study_plan.config.name, storage=make_storage(study_plan.storage_url))
    interrupted = False
    seen = -1
    with progress:
        progress.log(f"{workers} workers started; their logs: {log_dir}")
        try:
            while any(p.poll() is None for p, _ in processes):
                snap = snapshot(study, target)
                if snap.completed != seen:
                    seen = snap.completed
                    progress.update(snap)
                time.sleep(1.0)
        except KeyboardInterrupt:
            interrupted = True
            for process, _ in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)
            for process, _ in processes:
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        snap = snapshot(study, target)
        progress.update(snap)
    failed = False
    for k, (process, log) in enumerate(processes):
        log.close()
        if process.returncode == INTERRUPTED:
            interrupted = True
        elif process.returncode != 0 and not interrupted:
            failed = True
            tail = (log_dir / f"worker-{k}.log").read_text().strip().splitlines()[-3:]
            progress.log(f"worker {k} exited with code {process.returncode}: " + " | ".join(tail))
    if not failed:
        shutil.rmtree(log_dir, ignore_errors=True)  # kept only when there is something to read
    return interrupted

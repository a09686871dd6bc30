"""Stopping a run early, by signal, time budget, crash or full disk: nothing lost, resumable.

Real processes on real SQLite files: each test stops `abopt run` the way a user, a
service manager or the machine would, then checks that no trial is left RUNNING, the
stopped trial is queued again with its parameters, and the same command finishes the
study with exactly N complete trials.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import run_abopt, start_abopt, write_study
from optimizer.study.stopping import pid_alive

optuna.logging.set_verbosity(optuna.logging.WARNING)

# The organism with long answers: a trial takes about a second, so a signal lands mid-trial.
LONG_ANSWERS = {"prompts": {"n_measure": 32, "n_eval": 64}, "evaluation": {"max_new_tokens": 200}}


def load(db: Path, name: str = "t") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def query(db: Path, sql: str) -> list[tuple]:
    """Rows read with plain sqlite3, safe while another process writes (empty if not yet there)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=30) as connection:
            return connection.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def complete_count(db: Path) -> int:
    return len(query(db, "select 1 from trials where state = 'COMPLETE'"))


def trial_running_with_params(db: Path) -> bool:
    return bool(
        query(db, "select 1 from trials t join trial_params p using (trial_id) where t.state = 'RUNNING' limit 1")
    )


def wait_for(condition, timeout: float = 300, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(step)


def check_stopped_cleanly(db: Path, reason: str) -> None:
    """No trial RUNNING; each interrupted trial failed with ``reason`` and was queued again
    with its parameters."""
    study = load(db)
    trials = study.get_trials()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert interrupted, "the stop landed between trials; no trial was abandoned"
    for trial in interrupted:
        assert trial.user_attrs["failure"] == f"interrupted ({reason})"
        queued = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
        assert len(queued) == 1 and queued[0].state == TrialState.WAITING
        assert queued[0].params == trial.params


def resume_to(study_file: Path, n: int, cwd: Path, *args: str) -> None:
    result = run_abopt("run", study_file, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    trials = load(study_file.with_suffix(".db")).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    retried = [t for t in trials if "retry_of" in t.user_attrs]
    assert retried and all(t.state == TrialState.COMPLETE for t in retried), "the queued trial was not replayed"


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, reason", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")])
def test_sigterm_and_sighup_stop_like_ctrl_c(tmp_path, signum, code, reason):
    study_file = write_study(tmp_path, "organism", n_trials=4, **LONG_ANSWERS)
    db = tmp_path / "t.db"
    process = start_abopt("run", study_file, cwd=tmp_path)
    wait_for(lambda: complete_count(db) >= 1 and trial_running_with_params(db))
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert f"interrupted ({reason}) at" in stdout and "resume with:" in stdout
    assert "Pareto front" in stdout
    check_stopped_cleanly(db, reason)
    resume_to(study_file, 4, tmp_path)


@pytest.mark.slow
def test_ctrl_c_mid_trial_returns_within_seconds(tmp_path):
    study_file = write_study(tmp_path, "organism", n_trials=20, **LONG_ANSWERS)
    db = tmp_path / "t.db"
    process = start_abopt("run", study_file, cwd=tmp_path)
    wait_for(lambda: complete_count(db) >= 1 and trial_running_with_params(db))
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    seconds = time.monotonic() - sent
    print(f"\nSIGINT to exit: {seconds:.2f} s")
    assert process.returncode == 130, stderr
    assert seconds < 5
    check_stopped_cleanly(db, "Ctrl-C")


@pytest.mark.slow
def test_timeout_stops_on_time_and_the_same_command_continues(tmp_path):
    study_file = write_study(tmp_path, "organism", n_trials=5, **LONG_ANSWERS)
    db = tmp_path / "t.db"
    started = time.monotonic()
    first = run_abopt("run", study_file, "--timeout", "8s", cwd=tmp_path)
    seconds = time.monotonic() - started
    assert first.returncode == 0, first.stderr
    assert "time budget of 8s used up at" in first.stdout and "continue with:" in first.stdout
    assert seconds < 8 + 10  # interpreter start-up plus printing the front, not another trial
    assert complete_count(db) < 5
    check_stopped_cleanly(db, "time budget used up")
    runs = 1
    while "done: 5 complete trials" not in (result := run_abopt("run", study_file, "--timeout", "8s", cwd=tmp_path)).stdout:
        assert result.returncode == 0, result.stderr
        runs += 1
        assert runs < 20, "no progress under an 8 s budget"
    assert not query(db, "select 1 from trials where state in ('RUNNING', 'WAITING')")
    assert complete_count(db) == 5


def test_timeout_is_checked_before_anything_runs(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir)
    result = run_abopt("run", study_file, "--timeout", "soon", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "abopt: error: --timeout 'soon' is not a duration; write it like 90m, 8h, 1h30m or 45s"
    assert not (tmp_path / "t.db").exists()


@pytest.mark.slow
def test_kill_9_while_measuring_directions_is_taken_over_at_once(tmp_path):
    # One prompt per forward pass: measuring takes seconds, long enough to be killed in.
    study_file = write_study(
        tmp_path, "organism", n_trials=1, prompts={"n_measure": 128, "n_eval": 8}, evaluation={"batch_size": 1}
    )
    db = tmp_path / "t.db"
    process = start_abopt("run", study_file, cwd=tmp_path)
    for line in process.stdout:
        if "measuring refusal directions" in line:
            break
    process.kill()
    process.wait()
    assert query(db, "select status from abopt_cache where key like 'directions:%'") == [("computing",)]
    started = time.monotonic()
    again = start_abopt("run", study_file, cwd=tmp_path)
    lines = []
    for line in again.stdout:
        lines.append(line)
        if "measuring refusal directions" in line:
            break
    seconds = time.monotonic() - started
    stdout, stderr = again.communicate(timeout=300)
    print(f"\nmeasuring again after {seconds:.1f} s")
    assert again.returncode == 0, stderr
    assert seconds < 5, "".join(lines)
    assert query(db, "select computations from abopt_cache where key like 'directions:%'") == [(1,)]


@pytest.mark.slow
def test_workers_stop_when_their_parent_is_killed(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=400, evaluation={"max_new_tokens": 64})
    db = tmp_path / "t.db"
    parent = start_abopt("run", study_file, "--workers", "2", cwd=tmp_path)
    wait_for(lambda: complete_count(db) >= 4 and len(query(db, "select pid from abopt_workers")) == 2)
    logs = tmp_path / "t.abopt-logs"
    assert sorted(p.name for p in logs.iterdir()) == ["worker-0.log", "worker-1.log"]
    workers = {int(pid) for (pid,) in query(db, "select pid from abopt_workers")}
    assert len(workers) == 2
    parent.kill()
    parent.wait()
    wait_for(lambda: not any(pid_alive(pid) for pid in workers), timeout=15)
    for k in (0, 1):
        assert f"[worker {k}, pid " in (logs / f"worker-{k}.log").read_text()
        assert "stopped (the parent process died)" in (logs / f"worker-{k}.log").read_text()
    assert not query(db, "select 1 from trials where state = 'RUNNING'")
    result = run_abopt("run", study_file, "--n-trials", str(complete_count(db) + 2), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_dead_child_not_yet_reaped_is_not_alive():
    child = subprocess.Popen(["true"])
    try:
        # Exited, but its parent has not waited for it: a zombie, whose pid still answers kill(0).
        wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", timeout=10)
        os.kill(child.pid, 0)
        assert not pid_alive(child.pid)
    finally:
        child.wait()
    assert pid_alive(os.getpid())


@pytest.mark.slow
def test_a_dead_worker_is_named_as_its_log_names_it(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=30, evaluation={"max_new_tokens": 32})
    db = tmp_path / "t.db"
    parent = start_abopt("run", study_file, "--workers", "2", cwd=tmp_path)
    wait_for(lambda: complete_count(db) >= 2 and len(query(db, "select pid from abopt_workers")) == 2)
    logs = tmp_path / "t.abopt-logs"
    wait_for(lambda: "pid " in (logs / "worker-1.log").read_text())
    victim = int((logs / "worker-1.log").read_text().split("pid ", 1)[1].split("]", 1)[0])
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = parent.communicate(timeout=600)
    assert f"worker 1 (pid {victim}) exited with code -9" in stdout
    assert f"(log: {logs / 'worker-1.log'})" in stdout
    assert f"[worker 1, pid {victim}]" in (logs / "worker-1.log").read_text()
    assert complete_count(db) == 30  # the other worker finished the study, dead trial included


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs mounted for the test (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the disk is full, down to its last bytes; returns it."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(descriptor, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(descriptor)
    return filler


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_mid_run_is_one_line_and_resumable(small_disk):
    study_file = write_study(small_disk, "organism", n_trials=5, **LONG_ANSWERS)
    db = small_disk / "t.db"
    process = start_abopt("run", study_file, cwd=small_disk)
    wait_for(lambda: complete_count(db) >= 2)
    filler = fill(small_disk)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("abopt: error: the disk holding"), stderr
    assert "free some space and run the same command again" in lines[0]
    filler.unlink()
    with sqlite3.connect(db) as connection:
        assert connection.execute("pragma integrity_check").fetchone() == ("ok",)
    result = run_abopt("run", study_file, cwd=small_disk)
    assert result.returncode == 0, result.stderr
    assert complete_count(db) == 5

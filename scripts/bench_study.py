#!/usr/bin/env python
"""Trials per hour and Optuna + storage overhead of ``abopt run``: ``python scripts/bench_study.py --help``.

Runs a study file (default: the bundled demo) from scratch in a temporary directory, once
per worker count, exactly as a user would (``abopt run STUDY --workers N --storage ...``),
then reads the finished study and reports:

- set-up time (loading, directions, baselines) and trial-phase time, trials per hour;
- per trial, the engine's time (steering + KL stage + refusal stage, as stored on each
  trial) against the trial's share of the trial phase's wall time x workers: what is left
  is Optuna's sampling, the storage's transactions and abopt's bookkeeping (the overhead).

    python scripts/bench_study.py                    # demo, 1 and 2 workers
    python scripts/bench_study.py --workers 1 --n-trials 200
    python scripts/bench_study.py studies/qwen3-4b.toml --workers 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "studies" / "demo.toml"


def run_study(study: Path, workers: int, n_trials: int | None, workdir: Path) -> tuple[str, float]:
    """Run the study into a fresh SQLite file; its storage URL and wall seconds."""
    storage = f"sqlite:///{workdir / f'w{workers}.db'}"
    command = [sys.executable, "-m", "optimizer", "run", str(study), "--workers", str(workers), "--storage", storage]
    if n_trials:
        command += ["--n-trials", str(n_trials)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=workdir, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return storage, time.perf_counter() - start


def report(study: Path, storage: str, wall: float, workers: int) -> str:
    import optuna
    from optuna.trial import TrialState

    from optimizer.study.config import load_study

    name = load_study(study).name
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.COMPLETE,))
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    phase = (last - first).total_seconds()
    engine = [t.user_attrs["seconds"]["kl"] + t.user_attrs["seconds"]["refusal"] for t in trials]
    per_trial = phase * workers / len(trials)  # worker-seconds each trial took, waits included
    overhead = per_trial - statistics.mean(engine)
    return "\n".join(
        [
            f"workers {workers}: {len(trials)} trials, wall {wall:.1f} s = set-up {wall - phase:.1f} s + trials {phase:.1f} s",
            f"  trials per hour   {len(trials) / phase * 3600:,.0f} (trial phase), {len(trials) / wall * 3600:,.0f} (whole run)",
            f"  per trial         {per_trial * 1000:.0f} ms of a worker: engine {statistics.mean(engine) * 1000:.0f} ms "
            f"(median {statistics.median(engine) * 1000:.0f}), Optuna + storage + bookkeeping {overhead * 1000:.0f} ms "
            f"= {overhead / per_trial:.1%} of the trial",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", nargs="?", type=Path, default=DEMO, help="study file (default: studies/demo.toml)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default: 1 2)")
    parser.add_argument("--n-trials", type=int, help="trials per run (default: the study file's)")
    args = parser.parse_args(argv)
    print(f"study {args.study}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="abopt-bench-study-") as tmp:
        for workers in args.workers:
            storage, wall = run_study(args.study.resolve(), workers, args.n_trials, Path(tmp))
            print(report(args.study, storage, wall, workers), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

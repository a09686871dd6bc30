#!/usr/bin/env python
"""What replay, screening and the shared prefix buy a whole study: ``python scripts/bench_savings.py --help``.

Runs the demo study's settings (the bundled organism) with ``search_space = "default"``
from scratch, alternately with the savings off (``replay_layers = false``,
``screening = false``, ``share_prefix = false``: every trial scored in full, as before;
the compiled steering stays on) and on, each run exactly as
a user would run it (``abopt run STUDY --storage ...``), and reports per run: trials per
hour (trial phase: first trial start to last trial end), the wall time to reach the run's
final hypervolume and the hypervolume both runs reach, the KL and refusal stages' seconds,
trials screened and layers replayed; then the ratio of each adjacent off/on pair, since the
machines these run on are shared and their load varies. Load averages are printed with
every run.

    python scripts/bench_savings.py                    # 2 pairs, 60 trials, 1 BLAS thread
    python scripts/bench_savings.py --pairs 3 --n-trials 100
    python scripts/bench_savings.py --system-prompt "You are a helpful assistant."   # a longer shared prefix
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "studies" / "demo.toml"
REFERENCE = (1.0, 1.0)  # (KL, refusal rate), as the heretic comparison kit takes it


@dataclass(frozen=True)
class Run:
    savings: bool
    wall: float
    phase: float
    trials: int
    kl_seconds: float
    refusal_seconds: float
    screened: int
    replayed: float  # mean leading layers replayed per trial
    history: tuple[tuple[float, float], ...]  # (seconds since start, hypervolume) per completed trial
    load: tuple[float, float]  # 1-minute load average at start and end

    @property
    def per_hour(self) -> float:
        return self.trials / self.phase * 3600

    @property
    def hypervolume(self) -> float:
        return self.history[-1][1]

    def time_to(self, target: float) -> float:
        """Seconds from the run's start until its hypervolume reached ``target``."""
        return next(t for t, hv in self.history if hv >= target - 1e-12)


def study_text(name: str, savings: bool, n_trials: int | None, confirm_tokens: int | None = None, system_prompt: str = "") -> str:
    """The demo study file with the default search space and the savings on or off."""
    text = DEMO.read_text()
    text = re.sub(r'(?m)^name = .*$', f'name = "{name}"', text)
    text = re.sub(r'(?m)^search_space = .*$', 'search_space = "default"', text)
    flag = "true" if savings else "false"
    for key in ("replay_layers", "screening", "share_prefix"):
        text, found = re.subn(rf"(?m)^{key} = \w+", f"{key} = {flag}", text)
        assert found == 1, f"{DEMO} has no line {key} = ..."
    if system_prompt:
        text = re.sub(r"(?m)^system_prompt = .*$", lambda _: f"system_prompt = {json.dumps(system_prompt)}", text)
    if confirm_tokens is not None:
        text, found = re.subn(r"(?m)^confirm_tokens = \d+", f"confirm_tokens = {confirm_tokens}", text)
        if not found:
            text = re.sub(r"(?m)^\[evaluation\]$", f"[evaluation]\nconfirm_tokens = {confirm_tokens}", text)
    if n_trials:
        text = re.sub(r"(?m)^n_trials = \d+", f"n_trials = {n_trials}", text)
        text = re.sub(r"(?m)^n_startup_trials = \d+", f"n_startup_trials = {max(1, round(0.2 * n_trials))}", text)
    return text


def run_once(workdir: Path, index: int, savings: bool, n_trials: int | None, confirm_tokens: int | None, system_prompt: str) -> Run:
    from optimizer.browse.report import hypervolume

    name = f"run{index}_{'on' if savings else 'off'}"
    study = workdir / f"{name}.toml"
    study.write_text(study_text(name, savings, n_trials, confirm_tokens, system_prompt))
    storage = f"sqlite:///{workdir / (name + '.db')}"
    load_start = os.getloadavg()[0]
    start = time.time()
    subprocess.run(
        [sys.executable, "-m", "optimizer", "run", str(study), "--storage", storage],
        check=True, cwd=workdir, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.time() - start
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.COMPLETE,))
    trials.sort(key=lambda t: t.datetime_complete)
    points, history = [], []
    for t in trials:
        points.append(tuple(t.values))
        history.append((t.datetime_complete.timestamp() - start, hypervolume(points, REFERENCE)))
    seconds = [t.user_attrs["seconds"] for t in trials]
    return Run(
        savings=savings,
        wall=wall,
        phase=(trials[-1].datetime_complete - min(t.datetime_start for t in trials)).total_seconds(),
        trials=len(trials),
        kl_seconds=sum(s["kl"] for s in seconds),
        refusal_seconds=sum(s["refusal"] for s in seconds),
        screened=sum("screened" in t.user_attrs for t in trials),
        replayed=statistics.mean(t.user_attrs.get("replayed_layers", 0) for t in trials),
        history=tuple(history),
        load=(load_start, os.getloadavg()[0]),
    )


def describe(index: int, run: Run) -> str:
    return (
        f"run {index} savings {'on ' if run.savings else 'off'}: {run.trials} trials, wall {run.wall:.1f} s, "
        f"trial phase {run.phase:.1f} s = {run.per_hour:,.0f} trials/h; stages KL {run.kl_seconds:.1f} s + "
        f"refusals {run.refusal_seconds:.1f} s; screened {run.screened}, layers replayed {run.replayed:.2f}/trial; "
        f"hypervolume {run.hypervolume:.4f} at {run.time_to(run.hypervolume):.1f} s; load {run.load[0]:.2f} → {run.load[1]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="off/on pairs to run, interleaved (default 2)")
    parser.add_argument("--n-trials", type=int, help="trials per run (default: the demo study's 60)")
    parser.add_argument(
        "--confirm-tokens", type=int, help="confirm front trials on answers this long (default: the demo's, 128; 0: no confirmation)"
    )
    parser.add_argument("--system-prompt", default="", help="a system turn before every prompt (default: the demo's, none)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1; 0 leaves it alone)")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    confirm = "the demo's" if args.confirm_tokens is None else args.confirm_tokens
    print(f"demo study, search_space default, confirm_tokens {confirm}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="abopt-bench-savings-") as tmp:
        for pair in range(args.pairs):
            for savings in (False, True):
                runs.append(run_once(Path(tmp), len(runs), savings, args.n_trials, args.confirm_tokens, args.system_prompt))
                print(describe(len(runs) - 1, runs[-1]), flush=True)
    print("adjacent pairs (savings on ÷ off):")
    for off, on in zip(runs[::2], runs[1::2]):
        target = min(off.hypervolume, on.hypervolume)
        print(
            f"  trials/h ×{on.per_hour / off.per_hour:.2f}; wall ×{off.wall / on.wall:.2f} faster; "
            f"KL stage ×{off.kl_seconds / on.kl_seconds:.2f}, refusal stage ×{off.refusal_seconds / max(on.refusal_seconds, 1e-9):.2f} "
            f"less time; to hypervolume {target:.4f} (both reach it): off {off.time_to(target):.1f} s, on {on.time_to(target):.1f} s "
            f"(×{off.time_to(target) / on.time_to(target):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

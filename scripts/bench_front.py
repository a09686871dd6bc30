#!/usr/bin/env python
"""The front a 60-trial study finds on the organism, per search space and per edit: ``python scripts/bench_front.py --help``.

Runs ``abopt run`` on the bundled organism with the settings of the heretic side-by-side kit
(/work/shared/peers/heretic: first 128 + 128 measure prompts, first 64 + 64 eval prompts,
system prompt "You are a helpful assistant.", 32 new tokens, first-token KL, 60 trials of
which 12 random, seed 0), then prints each front's hypervolume (reference KL 1.0, refusal
rate 1.0, as the kit computes it) and its best trade-offs. The runs are deterministic: the
same code gives the same numbers on any load.

    python scripts/bench_front.py                          # search_space = "default", the targets checked
    python scripts/bench_front.py --space default wide     # several spaces
    python scripts/bench_front.py --ablation               # each edit alone and combined, on default's ranges

An edit variant (``--ablation``) is the space with its edit keys (direction_kind,
n_directions, norm_preserving) replaced; everything else (ranges, shape) stays the space's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = (1.0, 1.0)
TARGET_HYPERVOLUME = 0.97
TARGET_KL, TARGET_REFUSED = 0.08, 1  # a front trial with at most 1 of 64 not complied at KL <= 0.08
EDIT_KEYS = ("direction_kind", "n_directions", "norm_preserving")
# name -> the edit keys it sets; the original edit is the three defaults.
ABLATION = {
    "original": {"direction_kind": "difference", "n_directions": 1, "norm_preserving": False},
    "orthogonal": {"direction_kind": "orthogonal", "n_directions": 1, "norm_preserving": False},
    "norm-preserving": {"direction_kind": "difference", "n_directions": 1, "norm_preserving": True},
    "2 directions": {"direction_kind": "difference", "n_directions": 2, "norm_preserving": False},
    "orthogonal + norm-preserving": {"direction_kind": "orthogonal", "n_directions": 1, "norm_preserving": True},
    "all searched (default)": {"direction_kind": ["difference", "orthogonal"], "n_directions": [1, 2], "norm_preserving": [False, True]},
}


def variant_space(space: str, edit: dict, directory: Path, name: str) -> Path:
    """A copy of the search space ``space`` with its edit keys set to ``edit``."""
    from optimizer.study.config import load_search_space

    source = load_search_space(space).path
    kept = [line for line in source.read_text().splitlines() if not line.split("=")[0].strip() in EDIT_KEYS]
    head = [f"{key} = {json.dumps(value)}" for key, value in edit.items()]  # JSON scalars and lists are TOML
    path = directory / f"space-{name.replace(' ', '_').replace('+', 'and')}.toml"
    path.write_text("\n".join(head + kept) + "\n")
    return path


def write_study(directory: Path, name: str, space: str | Path, n_trials: int, n_startup: int, seed: int) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(
        f'''name = "{name}"
model = "organism"
search_space = "{space}"
dtype = "auto"
[prompts]
n_measure = 128
n_eval = 64
system_prompt = "You are a helpful assistant."
[evaluation]
max_new_tokens = 32
kl_tokens = 1
markers = "bundled"
batch_size = 0
sample_answers = 3
[optimization]
n_trials = {n_trials}
n_startup_trials = {n_startup}
seed = {seed}
kl_ceiling = 0.0
'''
    )
    return path


def run(study: Path, storage: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "optimizer", "run", str(study), "--storage", storage],
        cwd=study.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if done.returncode != 0:
        raise SystemExit(f"abopt run {study.name} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def summary(study_name: str, storage: str) -> dict:
    """Hypervolume and trade-offs of a finished study's trials."""
    import optuna

    from optimizer.browse.report import hypervolume
    from optimizer.study.record import read_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = [t for t in read_trials(optuna.load_study(study_name=study_name, storage=storage)) if t.result]
    points = [(t.kl_divergence, t.refusal_rate) for t in trials]
    total = trials[0].total
    low_kl = [t for t in trials if t.kl_divergence <= TARGET_KL]
    best_low_kl = min(low_kl, key=lambda t: (t.refusal_rate, t.kl_divergence), default=None)
    few = [t for t in trials if round(t.refusal_rate * total) <= TARGET_REFUSED]
    best_few = min(few, key=lambda t: t.kl_divergence, default=None)
    edits: dict[str, int] = {}
    for t in trials:
        edits[t.ablation.edit_text()] = edits.get(t.ablation.edit_text(), 0) + 1
    return {
        "hypervolume": hypervolume(points, REFERENCE),
        "total": total,
        "best_at_kl": None if best_low_kl is None else (round(best_low_kl.refusal_rate * total), best_low_kl.kl_divergence, best_low_kl.number, best_low_kl.ablation.edit_text()),
        "lowest_kl_few": None if best_few is None else (round(best_few.refusal_rate * total), best_few.kl_divergence, best_few.number, best_few.ablation.edit_text()),
        "edits": edits,
    }


def line(label: str, s: dict, seconds: float) -> str:
    n = s["total"]
    at = s["best_at_kl"]
    few = s["lowest_kl_few"]
    at_text = f"{at[0]}/{n} at KL {at[1]:.3f} (#{at[2]}, {at[3]})" if at else "none"
    few_text = f"KL {few[1]:.3f} with {few[0]}/{n} (#{few[2]}, {few[3]})" if few else "none"
    return (
        f"{label:<30} HV {s['hypervolume']:.4f} | best at KL ≤ {TARGET_KL}: {at_text} | "
        f"lowest KL at ≤ {TARGET_REFUSED}/{n}: {few_text} | {seconds:.0f} s"
    )


def meets_targets(s: dict) -> bool:
    at = s["best_at_kl"]
    return s["hypervolume"] >= TARGET_HYPERVOLUME and at is not None and at[0] <= TARGET_REFUSED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", nargs="+", default=["default"], help="search spaces to run (default: default)")
    parser.add_argument("--ablation", action="store_true", help="run each edit variant on the first space")
    parser.add_argument("--only", nargs="+", help="with --ablation: only these variants (names as printed)")
    parser.add_argument("--n-trials", type=int, default=60)
    parser.add_argument("--n-startup", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the studies (SQLite) in this directory")
    args = parser.parse_args(argv)
    print(f"organism, heretic-kit settings, {args.n_trials} trials ({args.n_startup} random), seed {args.seed}; "
          f"hypervolume reference KL {REFERENCE[0]}, refusal rate {REFERENCE[1]}; deterministic", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="abopt-bench-front-") as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        runs: list[tuple[str, str | Path]] = []
        if args.ablation:
            for name, edit in ABLATION.items():
                if not args.only or name in args.only:
                    runs.append((f"{args.space[0]}: {name}", variant_space(args.space[0], edit, directory, name)))
        else:
            runs = [(space, space) for space in args.space]
        for index, (label, space) in enumerate(runs):
            study = write_study(directory, f"front{index}", space, args.n_trials, args.n_startup, args.seed)
            storage = f"sqlite:///{directory / f'front{index}.db'}"
            seconds = run(study, storage)
            s = summary(f"front{index}", storage)
            print(line(label, s, seconds), flush=True)
            if not args.ablation:
                ok = meets_targets(s)
                failed |= not ok
                print(f"  targets (HV ≥ {TARGET_HYPERVOLUME}, ≤ {TARGET_REFUSED}/{s['total']} at KL ≤ {TARGET_KL}): "
                      f"{'met' if ok else 'NOT met'}; edits tried: {s['edits']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

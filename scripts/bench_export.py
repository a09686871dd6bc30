#!/usr/bin/env python
"""Time ``abopt export`` and measure its memory: ``python scripts/bench_export.py --help``.

Runs a tiny study (2 trials) on the model to have a trial to export, then exports it in a
fresh process and reports the time of each phase (loading + reference logits, writing,
verifying), MLX's peak allocation per phase, and the process's peak RSS, next to the size
of the model and of its largest shard. On Linux it re-executes itself once with OpenBLAS
preloaded when that is installed (see DESIGN.md).

    python scripts/bench_export.py --model organism
    python scripts/bench_export.py --synthetic llama:100M --quantize 4 --shards 4
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
sys.path.insert(0, str(ROOT))

from optimizer.blas import ensure_fast_blas  # noqa: E402  (before mlx is imported)

STUDY = """name = "bench"
model = "{model}"
[prompts]
n_measure = 16
n_eval = 8
[evaluation]
max_new_tokens = 8
[optimization]
n_trials = 2
n_startup_trials = 2
"""


def child(study_file: str, out_dir: str, quantize: str) -> None:
    """Export the study's best trial in this process and print what it cost, as JSON."""
    from optimizer.study.config import load_study
    from optimizer.export.edit import ExportOptions
    from optimizer.export.publish import export_trial
    from optimizer.bench.benchmark import max_rss
    from optimizer.study.plan import open_existing, plan

    config = load_study(study_file)
    study_plan = plan(config, config.storage_url)
    study = open_existing(study_plan)
    trial = min(study.best_trials, key=lambda t: (t.values[1], t.values[0]))
    start = time.perf_counter()
    result = export_trial(study_plan, study, trial.number, out_dir, ExportOptions(quantize=quantize))
    total = time.perf_counter() - start
    print(
        json.dumps(
            {
                "trial": trial.number,
                "seconds": result.seconds | {"total": total},
                "mlx_peak": result.peak_memory,
                "peak_rss": max_rss(),
                "written": result.write.total_size,
                "edited": len(result.write.edited),
                "files": len(result.write.files),
                "copied_files": len(result.write.copied_files),
                "verification": result.agreement.describe(),
            }
        )
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help='"organism", a model directory or a Hugging Face id')
    which.add_argument("--synthetic", metavar="ARCH:SIZE", help="random-weight model of a real architecture, e.g. llama:100M")
    parser.add_argument("--quantize", type=int, default=0, metavar="BITS", help="quantize the synthetic model (e.g. 4)")
    parser.add_argument("--shards", type=int, default=1, help="weight files of the synthetic model")
    parser.add_argument("--export-quantize", choices=["keep", "none"], default="keep", help="abopt export --quantize")
    parser.add_argument("--workdir", type=Path, help="keep the model, study and export here (default: a temporary directory)")
    parser.add_argument("--child", nargs=2, metavar=("STUDY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.export_quantize)
        return 0
    if not (args.model or args.synthetic):
        parser.error("one of --model or --synthetic is required")

    from optimizer.bench.benchmark import blas_in_use, synthetic_dir
    from optimizer.export.checkpoint import checkpoint_tensors
    from optimizer.engine.model import resolve_model_path

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="abopt-bench-export-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        print(f"building synthetic {args.synthetic}" + (f", {args.quantize}-bit" if args.quantize else "") + f", {args.shards} shard(s)")
        model = synthetic_dir(args.synthetic, args.quantize, workdir, shards=args.shards)
        source = f"synthetic {args.synthetic}" + (f" {args.quantize}-bit" if args.quantize else "")
    else:
        model, source = args.model, args.model
    study_file = workdir / "bench.toml"
    study_file.write_text(STUDY.format(model=model))
    print(f"running a 2-trial study on {source} (to have a trial to export)")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "optimizer", "run", str(study_file)], cwd=workdir, capture_output=True, text=True)
    if run.returncode != 0:
        print(run.stdout + run.stderr, file=sys.stderr)
        return run.returncode
    print(f"  study: {time.perf_counter() - start:.1f} s")

    out = workdir / "export"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(study_file), str(out), "--export-quantize", args.export_quantize]
    exported = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=dict(os.environ))
    if exported.returncode != 0:
        print(exported.stdout + exported.stderr, file=sys.stderr)
        return exported.returncode
    report = json.loads(exported.stdout.strip().splitlines()[-1])

    tensors = checkpoint_tensors(resolve_model_path(str(model)))
    shard_sizes: dict[str, int] = {}
    for info in tensors.values():
        shard_sizes[info.file] = shard_sizes.get(info.file, 0) + info.nbytes
    s, peak = report["seconds"], report["mlx_peak"]
    print(f"\nabopt export of {source} (--quantize {args.export_quantize}), BLAS: {blas_in_use()}")
    print(f"  model: {_mb(sum(shard_sizes.values()))} in {len(shard_sizes)} file(s), largest {_mb(max(shard_sizes.values()))}, largest tensor {_mb(max(i.nbytes for i in tensors.values()))}")
    print(f"  trial {report['trial']}: {report['edited']} tensors edited, {report['files'] - report['copied_files']}/{report['files']} files rewritten, {_mb(report['written'])} written")
    print(f"  time: {s['total']:.1f} s = load + reference logits {s['reference']:.1f} s, write {s['write']:.1f} s, verify {s['verify']:.1f} s")
    print(f"  MLX peak allocation: reference {_mb(peak['reference'])}, write {_mb(peak['write'])}, verify {_mb(peak['verify'])}")
    print(f"  peak RSS of the export process: {_mb(report['peak_rss'])}")
    print(f"  verification: {report['verification']}")
    print(f"  (files in {workdir})" if args.workdir else "")
    return 0


if __name__ == "__main__":
    ensure_fast_blas()
    sys.exit(main(sys.argv[1:]))

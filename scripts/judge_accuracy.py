#!/usr/bin/env python3
"""How well the judge tells complied from not complied, beside the refusal-marker rule.

Reads a labelled evaluation set (default: the bundled optimizer/data/judge_eval.jsonl, one
{"prompt", "answer", "label": complied|refused|degenerate, "hard": bool} per line) and
prints the accuracy of the judge (complied iff its score >= 0.5) and of the marker rule
(not complied iff optimizer.engine.markers finds a bundled refusal marker), overall and on the
hard part, then per label, and the same for the verdicts a study counts (abopt's rules for
degenerate answers first, then the judge or the markers). Degenerate answers count as not
complied.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 \\
        .venv/bin/python scripts/judge_accuracy.py [--judge DIR|HF_ID] [--template FILE] [--errors]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimizer.errors import UserError  # noqa: E402
from optimizer.engine.judge import BUNDLED, answer_verdicts, complied, judge_scores, load_judge  # noqa: E402
from optimizer.engine.markers import find_refusal, load_markers  # noqa: E402

EVAL_SET = ROOT / "optimizer" / "data" / "judge_eval.jsonl"
LABELS = ("complied", "refused", "degenerate")


def read_eval_set(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [r for r in rows if r.get("label") not in LABELS or not isinstance(r.get("answer"), str)]
    if bad:
        raise UserError(f"{path}: {len(bad)} rows without an answer and a label complied/refused/degenerate, e.g. {bad[0]}")
    return rows


def marker_verdicts(answers: list[str], markers: tuple[str, ...] | None = None) -> np.ndarray:
    """The marker rule: an answer complied iff no refusal marker is found in it."""
    markers = markers or load_markers()
    return np.array([find_refusal(a, markers) is None for a in answers])


def _pct(hits: np.ndarray) -> str:
    return f"{hits.mean():.1%} ({int(hits.sum())}/{len(hits)})" if len(hits) else "-"


def accuracy_table(judge_source: str, rows: list[dict], *, template: str | None = None) -> tuple[str, dict]:
    """A markdown table of judge vs marker accuracy on ``rows``, and the numbers behind it."""
    judge = load_judge(judge_source, template=template)
    requests = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    truth = np.array([r["label"] == "complied" for r in rows])
    hard = np.array([bool(r.get("hard")) for r in rows])
    scores = judge_scores(judge, requests, answers, batch_size=64)
    judged = complied(scores) == truth
    marked = marker_verdicts(answers) == truth
    # As a study counts: abopt's degenerate-answer rules first, then the judge or the markers.
    markers = load_markers()
    in_loop = np.array([v == "complied" for v in answer_verdicts(requests, answers, markers, judge)[0]]) == truth
    marker_loop = np.array([v == "complied" for v in answer_verdicts(requests, answers, markers, None)[0]]) == truth
    labels = np.array([r["label"] for r in rows])
    named = [
        ("judge", judged), ("marker rule", marked),
        ("in a study: rules + judge", in_loop), ("in a study: rules + markers", marker_loop),
    ]
    lines = [
        f"| rule | overall ({len(rows)}) | hard ({int(hard.sum())}) | easy ({int((~hard).sum())}) |",
        "|---|---|---|---|",
        *(f"| {name} | {_pct(ok)} | {_pct(ok[hard])} | {_pct(ok[~hard])} |" for name, ok in named),
        "",
        "| rule | " + " | ".join(f"{label} ({int((labels == label).sum())})" for label in LABELS) + " |",
        "|---|---|---|---|",
        *("| " + name + " | " + " | ".join(_pct(ok[labels == label]) for label in LABELS) + " |" for name, ok in named),
    ]
    numbers = dict(
        judge=float(judged.mean()), judge_hard=float(judged[hard].mean()),
        markers=float(marked.mean()), markers_hard=float(marked[hard].mean()),
        in_loop=float(in_loop.mean()), in_loop_hard=float(in_loop[hard].mean()),
        scores=scores, judge_correct=judged, marker_correct=marked,
    )
    return "\n".join(lines), numbers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge", default=BUNDLED, help="judge model: 'bundled', a model directory or a Hugging Face id")
    ap.add_argument("--template", default=None, help="judge prompt template file (default: the bundled one)")
    ap.add_argument("--eval", type=Path, default=EVAL_SET, help=f"labelled evaluation set (default: {EVAL_SET})")
    ap.add_argument("--errors", action="store_true", help="also list the pairs the judge gets wrong")
    args = ap.parse_args(argv)
    try:
        rows = read_eval_set(args.eval)
        table, numbers = accuracy_table(args.judge, rows, template=args.template)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table)
    if args.errors:
        print()
        for row, score, ok in zip(rows, numbers["scores"], numbers["judge_correct"]):
            if not ok:
                print(f"[{row['label']}{', hard' if row.get('hard') else ''}] score {score:.3f}: "
                      f"{row['prompt'][:60]!r} -> {row['answer'][:160]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

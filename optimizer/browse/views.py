"""What a finished (or running) study looks like in a terminal: the front table and one trial.

``front`` and ``show`` read only the storage, as trial records. Nothing here loads a model.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any, Mapping, Sequence

import optuna
from rich.console import Group
from rich.table import Table
from rich.text import Text

from optimizer.browse.front import (
    COUNTS_LEGEND,
    counts,
    pareto_front,
    percent,
    quality,
    trial_quality,
)
from optimizer.engine.directions import Directions
from optimizer.engine.profile import AblationParams, ComponentProfile
from optimizer.study.record import (
    Baseline,
    Confirmation,
    TrialRecord,
    read_baseline,
    read_confirmation_baseline,
    read_confirmations,
    read_trial,
)
from optimizer.study.storage import complete_trial, completed_count, require_complete

COMPONENT_LABELS = {"attn": "attention (o_proj)", "mlp": "MLP (down_proj)"}
BAR_WIDTH = 24
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def front_of(study: optuna.Study) -> list[TrialRecord]:
    """The front, lowest refusal rate first; a UserError while no trial is complete."""
    require_complete(study)
    return pareto_front(study)


# --- parameters in words ----------------------------------------------------------------


def direction_text(ablation: AblationParams) -> str:
    """Where the direction comes from and which edit removes it: 'global, layer 7.35 ·
    difference' or 'per layer · orthogonal ×2, norm-preserving'."""
    return f"{scope_text(ablation)} · {ablation.edit_text()}"


def scope_text(ablation: AblationParams) -> str:
    """'global, layer 7.35' or 'per layer'."""
    return f"global, layer {ablation.direction_index:.2f}" if ablation.direction_scope == "global" else "per layer"


def component_text(profile: ComponentProfile) -> str:
    """One component's profile in a cell: 'max weight @ layer ±reach →min weight'."""
    return (
        f"{profile.max_weight:.2f} @{profile.max_weight_position:.1f} "
        f"±{profile.min_weight_distance:.1f} →{profile.min_weight:.2f}"
    )


PROFILE_LEGEND = "attn/mlp: max weight @ layer ± reach in layers → min weight at the reach"


def clean(text: str) -> str:
    """Model output made safe to print: control characters escaped, newlines kept."""
    if text.isprintable():
        return text
    return "".join(
        c if c in "\n\t" or unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode()
        for c in text
    )


# --- the front ----------------------------------------------------------------------------


def confirmation_json(c: Confirmation | None) -> dict[str, Any] | None:
    """A confirmation with its rates, for JSON output."""
    if c is None:
        return None
    return c.to_dict() | {"not_complied_rate": c.not_complied_rate, "over_refusal_rate": c.over_refusal_rate}


def front_json(record: TrialRecord, yardstick: Confirmation | None = None) -> dict[str, Any]:
    """One front trial as `front --json` prints it: search values, and confirmed ones when there are."""
    return {
        "trial": record.number,
        "baseline": False,
        "kl_divergence": record.kl_divergence,
        "refusal_rate": record.refusal_rate,
        "refused": record.refused,
        "total": record.total,
        "quality": trial_quality(record, yardstick),
        "params": record.params,
        "ablation": record.ablation.to_dict() if record.ablation else None,
        "degenerate": record.degenerate,
        "confirmed": confirmation_json(record.confirmed),
    }


def baseline_json(base: Baseline, yardstick: Confirmation | None = None) -> dict[str, Any]:
    """The untouched model as the first element of `front --json`."""
    return {
        "trial": None,
        "baseline": True,
        "kl_divergence": 0.0,
        "refusal_rate": base.refusal_rate,
        "refused": base.refused,
        "total": base.total,
        "quality": quality(0.0, base.refusal_rate),
        "params": {},
        "ablation": None,
        "degenerate": base.degenerate,
        "confirmed": confirmation_json(yardstick),
    }


def front_records(study: optuna.Study) -> list[dict[str, Any]]:
    """The untouched model (when measured), then the front, lowest refusal rate first."""
    front = front_of(study)
    base, yardstick = read_baseline(study), read_confirmation_baseline(study)
    return ([baseline_json(base, yardstick)] if base else []) + [front_json(r, yardstick) for r in front]


def confirmed_text(c: Confirmation | None) -> str:
    """A confirmation in a cell: 'refusals 3.1% · harmless 1.6% · KL16 0.052'."""
    if c is None:
        return ""
    return f"{percent(c.not_complied_rate)}{counts(c.refused, c.total, c.degenerate)} · harmless {percent(c.over_refusal_rate)} · KL16 {c.kl_answer:.3f}"


def front_table(study: optuna.Study) -> Table:
    """The front as a table, the untouched model on top."""
    front = front_of(study)
    table = Table(
        title=f"Pareto front of {study.study_name!r}: {len(front)} of {completed_count(study)} complete trial(s)",
        title_justify="left",
        caption=f"{COUNTS_LEGEND}; confirmed: on long answers, harmless over-refusal, KL over 16 tokens\n{PROFILE_LEGEND}",
        caption_justify="left",
    )
    yardstick = read_confirmation_baseline(study)
    for column in ("trial", "refusals", "KL", "quality", "confirmed", "direction", "attn", "mlp"):
        numeric = column in ("trial", "refusals", "KL")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=numeric or column == "quality")
    base = read_baseline(study)
    if base:
        table.add_row(
            "original",
            percent(base.refusal_rate) + counts(base.refused, base.total, base.degenerate),
            "0",
            quality(0.0, base.refusal_rate),
            confirmed_text(yardstick),
            "untouched model",
            "",
            "",
            style="dim",
            end_section=True,
        )
    for r in front:
        components = r.ablation.components if r.ablation else {}
        table.add_row(
            f"#{r.number}",
            percent(r.refusal_rate) + counts(r.refused, r.total, r.degenerate),
            f"{r.kl_divergence:.4f}",
            trial_quality(r, yardstick),
            confirmed_text(r.confirmed),
            direction_text(r.ablation) if r.ablation else "",
            component_text(components["attn"]) if "attn" in components else "off",
            component_text(components["mlp"]) if "mlp" in components else "off",
        )
    if not front:
        table.add_row("", "no feasible trial yet (all above the KL ceiling)", "", "", "", "", "", "")
    return table


# --- one trial ------------------------------------------------------------------------------


def trial_json(study: optuna.Study, record: TrialRecord) -> dict[str, Any]:
    """Everything stored about one trial, with the original model's answers beside its own."""
    result = record.result
    base, yardstick = read_baseline(study), read_confirmation_baseline(study)
    original = base.answers if base else ()
    samples = [
        {"prompt": s.prompt, "answer": s.answer, "original": original[i] if i < len(original) else None}
        | ({"verdict": s.verdict} if s.verdict else {})
        | ({"score": s.score} if s.score is not None else {})
        for i, s in enumerate(result.samples if result else ())
    ]
    front_numbers = {t.number for t in study.best_trials}
    worker = record.worker
    return {
        "trial": record.number,
        "state": record.state.name,
        "kl_divergence": record.kl_divergence,
        "refusal_rate": record.refusal_rate,
        "refused": record.refused,
        "total": record.total,
        "quality": trial_quality(record, yardstick),
        "degenerate": record.degenerate,
        "confirmed": confirmation_json(record.confirmed),
        "on_front": record.number in front_numbers,
        "feasible": record.constraint_ok,
        "refusal_stage": result.refusal_stage if result else None,
        "screened": result.screened if result else None,  # the refusal rate is then a bound
        "judged": result.judged if result else None,
        "baseline": {k: v for k, v in base.to_dict().items() if k != "answers"} if base else None,
        "params": record.params,
        "ablation": record.ablation.to_dict() if record.ablation else None,
        "layer_weights": {k: list(v) for k, v in record.layer_weights.items()} or None,
        "seconds": {"kl": result.timings.kl, "refusal": result.timings.refusal, "trial": result.timings.trial} if result else None,
        "generated_tokens": result.generated_tokens if result else None,
        "worker": {"host": worker.host, "pid": worker.pid, "index": worker.index} if worker else None,
        "retry_of": record.retry_of,
        "started": record.started.isoformat() if record.started else None,
        "completed": record.completed.isoformat() if record.completed else None,
        "sample_answers": samples,
    }


def bar(value: float, scale: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of ``value`` out of ``scale``, in eighths of a character."""
    if not math.isfinite(value) or value <= 0 or scale <= 0:
        return ""
    eighths = round(min(value / scale, 1.0) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[rest] if rest else "")


def weights_chart(layer_weights: Mapping[str, Sequence[float]]) -> Table:
    """Per-layer weights of each component as bars, one row per layer."""
    names = [n for n in ("attn", "mlp") if n in layer_weights]
    n_layers = max(len(layer_weights[n]) for n in names)
    scale = max([1.0] + [w for n in names for w in layer_weights[n]])
    table = Table(title="weight per layer (█ = weight, full bar = " f"{scale:.2f})", title_justify="left", box=None, pad_edge=False)
    table.add_column("layer", justify="right")
    for name in names:
        table.add_column(name, no_wrap=True, min_width=BAR_WIDTH + 6)
    for layer in range(n_layers):
        cells = []
        for name in names:
            w = layer_weights[name][layer] if layer < len(layer_weights[name]) else 0.0
            cells.append(f"{bar(w, scale):<{BAR_WIDTH}} {w:.2f}" if w else "·")
        table.add_row(str(layer), *cells)
    return table


def profile_table(ablation: AblationParams) -> Table:
    """The four profile numbers of each component."""
    title = f"profile ({ablation.shape}), direction {scope_text(ablation)}\nedit: {ablation.edit_text()}"
    table = Table(title=title, title_justify="left")
    for column in ("component", "max weight", "at layer", "min weight", "reach (layers)"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for name, p in ablation.components.items():
        table.add_row(
            COMPONENT_LABELS.get(name, name),
            f"{p.max_weight:.3f}",
            f"{p.max_weight_position:.2f}",
            f"{p.min_weight:.3f}",
            f"{p.min_weight_distance:.2f}",
        )
    return table


def answers_view(record: dict[str, Any]) -> Group:
    """Each sample prompt, then the original model's answer beside the trial's."""
    parts: list[Any] = [Text("sample answers to harmful eval prompts", style="bold")]
    for i, sample in enumerate(record["sample_answers"], start=1):
        table = Table(title=f"{i}. {clean(sample['prompt'])}", title_justify="left", title_style="", expand=True)
        table.add_column("original model", ratio=1, overflow="fold")
        table.add_column(f"trial #{record['trial']}", ratio=1, overflow="fold")
        original = sample["original"]
        table.add_row(
            Text(clean(original)) if original is not None else Text("(not stored)", style="dim"),
            Text(clean(sample["answer"])),
        )
        parts.append(table)
    return Group(*parts)


def trial_view(study: optuna.Study, record: TrialRecord) -> Group:
    """`abopt show`: scores, parameters, per-layer weights, timings and sample answers."""
    r = trial_json(study, record)
    where = "on the Pareto front" if r["on_front"] else "not on the Pareto front"
    if not r["feasible"]:
        where = "infeasible: " + (r["refusal_stage"] or "breaks the KL ceiling")
    elif r["screened"]:
        where = r["screened"]
    parts: list[Any] = [
        Text.assemble((f"trial #{r['trial']}", "bold"), f" of study {study.study_name!r} · {r['quality']} · {where}"),
    ]
    scores = Table(box=None, show_header=True, pad_edge=False)
    for column in ("", "refusals", "KL divergence"):
        scores.add_column(column, justify="left" if not column else "right")
    scores.add_row(
        "this trial",
        ("≥ " if r["screened"] else "") + percent(r["refusal_rate"]) + counts(r["refused"], r["total"], r["degenerate"]),
        f"{r['kl_divergence']:.5f}",
    )
    if r["baseline"]:
        b = r["baseline"]
        scores.add_row("original model", percent(b["refusal_rate"]) + counts(b["refused"], b["total"], b.get("degenerate")), "0")
    if record.confirmed:
        scores.add_row(f"confirmed, {record.confirmed.tokens} tokens", confirmed_text(record.confirmed), "")
    parts += [Text(""), scores]
    if record.ablation:
        parts += [Text(""), profile_table(record.ablation)]
    if record.layer_weights:
        parts += [Text(""), weights_chart(record.layer_weights)]
    seconds = r["seconds"] or {}
    timing = [f"{label} {seconds[key]:.3f} s" for key, label in (("kl", "KL"), ("refusal", "refusals"), ("trial", "whole trial")) if key in seconds]
    if r["generated_tokens"] is not None:
        timing.append(f"{r['generated_tokens']} tokens generated")
    worker = r["worker"] or {}
    if worker:
        timing.append(f"worker {worker.get('index')} ({worker.get('host')}, pid {worker.get('pid')})")
    if r["retry_of"] is not None:
        timing.append(f"retry of trial {r['retry_of']}")
    if timing:
        parts += [Text(""), Text("timings: " + " · ".join(timing))]
    if r["sample_answers"]:
        parts += [Text(""), answers_view(r)]
    return Group(*parts)


def directions_table(directions: Directions) -> Table:
    """Per-layer separation as a table with a bar (`abopt measure`)."""
    table = Table(title="refusal direction per layer", title_justify="left")
    for column in ("layer", "separation (d)", "‖mean gap‖", "cos(next)", ""):
        table.add_column(column, justify="right" if column else "left")
    top = float(directions.separation.max()) or 1.0
    vectors = directions.vectors
    for layer in range(directions.n_layers):
        d = float(directions.separation[layer])
        following = f"{float(vectors[layer] @ vectors[layer + 1]):.3f}" if layer + 1 < directions.n_layers else ""
        bar = "█" * max(0, round(20 * d / top))
        best = " ← best" if layer == directions.best_layer else ""
        table.add_row(str(layer), f"{d:.2f}", f"{float(directions.mean_gap[layer]):.3f}", following, bar + best)
    return table


def confirmations_table(study: optuna.Study, confirmations: Mapping[int, Confirmation]) -> Table:
    """Search and confirmed values of the trials `abopt confirm` confirmed."""
    yardstick = read_confirmation_baseline(study)
    stored = read_confirmations(study)
    table = Table(title=f"confirmed trials of {study.study_name!r}", title_justify="left", caption=COUNTS_LEGEND, caption_justify="left")
    for column in ("trial", "search: refusals", "KL", "confirmed", "quality"):
        table.add_column(column, justify="left" if column in ("confirmed", "quality") else "right")
    if yardstick is not None:
        table.add_row("original", "", "0", confirmed_text(yardstick), "", style="dim", end_section=True)
    for number in confirmations:
        r = read_trial(complete_trial(study, number), stored)
        table.add_row(
            f"#{number}",
            percent(r.refusal_rate) + counts(r.refused, r.total, r.degenerate),
            f"{r.kl_divergence:.4f}",
            confirmed_text(r.confirmed),
            trial_quality(r, yardstick),
        )
    return table

"""`abopt report --html`: one self-contained HTML file (plotly.js inside) about a study.

Four plots: the Pareto front over all trials (hover shows each trial's number and
parameters), the per-layer weight profiles of the front's trials, the history of both
objectives and of the front's hypervolume, and parameter importances (PED-ANOVA, which
needs no extra packages). Nothing in the file is fetched from the network.
"""

from __future__ import annotations

import datetime
import html
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from optimizer.browse.front import counts, percent, quality, trial_quality
from optimizer.browse.views import (
    PROFILE_LEGEND,
    component_text,
    confirmed_text,
    direction_text,
    front_of,
)
from optimizer.errors import UserError
from optimizer.files import write_atomic
from optimizer.study.record import (
    Baseline,
    Confirmation,
    TrialRecord,
    read_baseline,
    read_confirmation_baseline,
    read_confirmations,
    read_trial,
)
from optimizer.study.storage import require_complete

FRONT_DIV = "front-plot"
PROFILES_DIV = "profiles-plot"
HISTORY_DIV = "history-plot"
IMPORTANCE_DIV = "importance-plot"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
GREY = "#b0b0b0"
MIN_TRIALS_FOR_IMPORTANCE = 4
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"


def hover_text(r: TrialRecord) -> str:
    """Trial number, scores and parameters, as the front plot's hover label shows them."""
    lines = [
        f"<b>trial #{r.number}</b> ({trial_quality(r)})",
        f"refusals {percent(r.refusal_rate)}{counts(r.refused, r.total, r.degenerate)}",
        f"KL {r.kl_divergence:.4f}",
    ]
    if r.confirmed:
        lines.append(f"confirmed: {html.escape(confirmed_text(r.confirmed))}")
    if not r.constraint_ok:
        stage = r.result.refusal_stage if r.result else None
        lines.append("infeasible: " + html.escape(stage or "above the KL ceiling"))
    if r.ablation:
        lines.append(f"direction: {direction_text(r.ablation)} · {r.ablation.shape}")
        lines += [f"{name}: {component_text(p)}" for name, p in r.ablation.components.items()]
    return "<br>".join(lines)


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both objectives minimised) and bounded by ``reference``."""
    area, best_y = 0.0, reference[1]
    for x, y in sorted(p for p in points if p[0] < reference[0]):
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


def hypervolume_reference(trials: list[TrialRecord]) -> tuple[float, float]:
    """(10% above the largest feasible KL, refusal rate 1): every feasible trial counts."""
    largest = max((t.kl_divergence for t in trials if t.constraint_ok), default=0.0)
    return (largest * 1.1 if largest > 0 else 1.0, 1.0)


def hypervolume_history(trials: list[TrialRecord], reference: tuple[float, float]) -> list[tuple[int, float]]:
    """(trial number, hypervolume of the feasible trials up to it), in trial order."""
    history: list[tuple[int, float]] = []
    points: list[tuple[float, float]] = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.constraint_ok:
            points.append((trial.kl_divergence, trial.refusal_rate))
        history.append((trial.number, hypervolume(points, reference)))
    return history


# --- figures ---------------------------------------------------------------------------------


def _colors(front: list[TrialRecord]) -> dict[int, str]:
    return {t.number: PALETTE[i % len(PALETTE)] for i, t in enumerate(front)}


def front_figure(trials: list[TrialRecord], front: list[TrialRecord], base: Baseline | None) -> go.Figure:
    """Every complete trial in the objective plane; the front drawn as its staircase."""
    numbers = {t.number for t in front}
    others = [t for t in trials if t.number not in numbers and t.constraint_ok]
    infeasible = [t for t in trials if not t.constraint_ok]
    by_kl = sorted(front, key=lambda t: t.kl_divergence)
    figure = go.Figure()

    def points(group: list[TrialRecord], name: str, **style: Any) -> go.Scatter:
        return go.Scatter(
            x=[t.kl_divergence for t in group],
            y=[100 * t.refusal_rate for t in group],
            text=[hover_text(t) for t in group],
            hovertemplate="%{text}<extra></extra>",
            name=name,
            **style,
        )

    figure.add_trace(points(others, f"other trials ({len(others)})", mode="markers", marker={"color": GREY, "size": 7}))
    if infeasible:
        figure.add_trace(
            points(infeasible, f"infeasible ({len(infeasible)})", mode="markers", marker={"color": GREY, "symbol": "x", "size": 7})
        )
    figure.add_trace(
        points(
            by_kl,
            f"Pareto front ({len(front)})",
            mode="lines+markers",
            line={"shape": "hv", "color": "#d62728", "width": 1.5},
            marker={"color": [_colors(front)[t.number] for t in by_kl], "size": 11, "line": {"color": "black", "width": 1}},
            uid="pareto-front",
        )
    )
    if base:
        figure.add_trace(
            go.Scatter(
                x=[0.0],
                y=[100 * base.refusal_rate],
                mode="markers",
                name="original model",
                marker={"symbol": "star", "size": 14, "color": "black"},
                hovertemplate=f"<b>original model</b><br>refusals {percent(base.refusal_rate)}"
                f"{counts(base.refused, base.total)}<br>KL 0<extra></extra>",
            )
        )
    figure.update_layout(
        title="Pareto front: damage (KL) against refusals left; hover a point for its trial and parameters",
        xaxis_title="KL divergence on harmless prompts (lower = less damage)",
        yaxis_title="refusal rate on harmful prompts, % (lower = fewer refusals)",
        hovermode="closest",
        height=520,
        legend={"orientation": "h", "y": -0.18},
    )
    return figure


def profiles_figure(front: list[TrialRecord]) -> go.Figure:
    """Per-layer weights of each front trial, one panel per component."""
    names = [n for n in ("attn", "mlp") if any(n in t.layer_weights for t in front)] or ["attn"]
    figure = make_subplots(
        rows=1,
        cols=len(names),
        shared_yaxes=True,
        subplot_titles=[{"attn": "attention (o_proj)", "mlp": "MLP (down_proj)"}.get(n, n) for n in names],
    )
    colors = _colors(front)
    for trial in front:
        weights = trial.layer_weights
        kl, rate = trial.kl_divergence, trial.refusal_rate
        for col, name in enumerate(names, start=1):
            if name not in weights:
                continue
            figure.add_trace(
                go.Scatter(
                    x=list(range(len(weights[name]))),
                    y=list(weights[name]),
                    mode="lines+markers",
                    name=f"#{trial.number}: {percent(rate)}, KL {kl:.3f}",
                    legendgroup=str(trial.number),
                    showlegend=col == 1,
                    line={"color": colors[trial.number]},
                    hovertemplate=f"trial #{trial.number} {name}<br>layer %{{x}}: weight %{{y:.3f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    n_layers = max((len(w) for t in front for w in t.layer_weights.values()), default=1)
    figure.update_xaxes(title_text="layer", dtick=max(1, n_layers // 16))
    figure.update_yaxes(title_text="ablation weight", row=1, col=1)
    figure.update_layout(title="Weight profiles of the front's trials (legend: click to hide a trial)", height=440)
    return figure


def history_figure(trials: list[TrialRecord], front: list[TrialRecord], reference: tuple[float, float]) -> go.Figure:
    """Both objectives per trial, and the hypervolume of the front so far."""
    figure = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=(
            "KL divergence per trial",
            "refusal rate per trial (%)",
            f"hypervolume of the front so far (reference KL {reference[0]:.3g}, refusals 100%)",
        ),
    )
    numbers = {t.number for t in front}
    ordered = sorted(trials, key=lambda t: t.number)
    on = [t for t in ordered if t.number in numbers]
    off = [t for t in ordered if t.number not in numbers]
    for row, index, scale in ((1, 0, 1.0), (2, 1, 100.0)):
        for group, name, color, size in ((off, "other trials", GREY, 6), (on, "front trials", "#d62728", 9)):
            figure.add_trace(
                go.Scatter(
                    x=[t.number for t in group],
                    y=[scale * (t.kl_divergence, t.refusal_rate)[index] for t in group],
                    mode="markers",
                    name=name,
                    legendgroup=name,
                    showlegend=row == 1,
                    marker={"color": color, "size": size},
                    text=[hover_text(t) for t in group],
                    hovertemplate="%{text}<extra></extra>",
                ),
                row=row,
                col=1,
            )
    history = hypervolume_history(trials, reference)
    figure.add_trace(
        go.Scatter(
            x=[n for n, _ in history],
            y=[v for _, v in history],
            mode="lines",
            line={"shape": "hv", "color": "#2ca02c"},
            name="hypervolume",
            hovertemplate="after trial %{x}: %{y:.4g}<extra></extra>",
        ),
        row=3,
        col=1,
    )
    figure.update_xaxes(title_text="trial number", row=3, col=1)
    figure.update_layout(title="History", height=720, hovermode="closest")
    return figure


def importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    """PED-ANOVA importance of each parameter for each objective, over the feasible trials."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    feasible = [t for t in complete if read_trial(t).constraint_ok]
    if len(feasible) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    scratch = optuna.create_study(directions=study.directions)
    scratch.add_trials(feasible)
    result = {}
    for index, name in enumerate(("kl_divergence", "refusal_rate")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result[name] = optuna.importance.get_param_importances(
                    scratch,
                    evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                    target=lambda t, i=index: t.values[i],
                )
            except (ValueError, RuntimeError, ZeroDivisionError):
                return {}
    return result


def importance_figure(values: dict[str, dict[str, float]], n_trials: int) -> go.Figure:
    """Grouped horizontal bars: how much each parameter matters for each objective."""
    figure = go.Figure()
    if not values:
        figure.add_annotation(
            text=f"needs at least {MIN_TRIALS_FOR_IMPORTANCE} feasible complete trials with varied parameters "
            f"(this study has {n_trials})",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
        figure.update_xaxes(visible=False)
        figure.update_yaxes(visible=False)
    params = sorted({p for v in values.values() for p in v}, key=lambda p: -sum(v.get(p, 0) for v in values.values()))
    for name, color in (("kl_divergence", "#1f77b4"), ("refusal_rate", "#d62728")):
        if name in values:
            figure.add_trace(
                go.Bar(
                    y=params,
                    x=[values[name].get(p, 0.0) for p in params],
                    name=name,
                    orientation="h",
                    marker={"color": color},
                    hovertemplate=f"{name}<br>%{{y}}: %{{x:.3f}}<extra></extra>",
                )
            )
    figure.update_layout(
        title="Parameter importances (PED-ANOVA: what it takes to reach each objective's best 10%)",
        barmode="group",
        height=max(320, 60 + 28 * len(params)),
        yaxis={"autorange": "reversed"},
        xaxis_title="importance",
    )
    return figure


# --- the page ----------------------------------------------------------------------------------

STYLE = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } .meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 4px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.baseline td { color: #666; font-style: italic; }
.note { color: #666; font-size: 12px; }
.plot { margin: 18px 0; border-top: 1px solid #eee; }
"""


def front_html_table(front: list[TrialRecord], base: Baseline | None, yardstick: Confirmation | None = None) -> str:
    """The front as an HTML table, the original model first."""
    head = "".join(
        f'<th class="{"l" if c in ("quality", "confirmed", "direction", "attn", "mlp") else ""}">{c}</th>'
        for c in ("trial", "refusals", "KL", "quality", "confirmed", "direction", "attn", "mlp")
    )
    rows = []
    if base:
        rows.append(
            f'<tr class="baseline"><td>original</td><td>{percent(base.refusal_rate)}'
            f'{counts(base.refused, base.total)}</td><td>0</td>'
            f'<td class="l">{quality(0.0, base.refusal_rate)}</td><td class="l">{html.escape(confirmed_text(yardstick))}</td>'
            '<td class="l">untouched model</td><td></td><td></td></tr>'
        )
    for t in front:
        kl, rate = t.kl_divergence, t.refusal_rate
        comps = t.ablation.components if t.ablation else {}
        cells = [f"#{t.number}", percent(rate) + counts(t.refused, t.total, t.degenerate), f"{kl:.4f}"]
        left = [
            trial_quality(t, yardstick),
            confirmed_text(t.confirmed),
            direction_text(t.ablation) if t.ablation else "",
            component_text(comps["attn"]) if "attn" in comps else "off",
            component_text(comps["mlp"]) if "mlp" in comps else "off",
        ]
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "".join(f'<td class="l">{html.escape(c)}</td>' for c in left) + "</tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _div(figure: go.Figure, div_id: str) -> str:
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)


def report_html(study: optuna.Study) -> str:
    """The whole report page as one string."""
    confirmations = read_confirmations(study)
    trials = [read_trial(t, confirmations) for t in require_complete(study)]
    front = front_of(study)
    base, yardstick = read_baseline(study), read_confirmation_baseline(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    reference = hypervolume_reference(trials)
    model = study.user_attrs.get("model", "?")
    summary = (
        f"model {html.escape(str(model))} · {len(trials)} complete trials"
        + (f", {states.count(TrialState.FAIL)} failed" if TrialState.FAIL in states else "")
        + (f", {states.count(TrialState.RUNNING)} running" if TrialState.RUNNING in states else "")
        + f" · front of {len(front)} · written {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    figures = [
        _div(front_figure(trials, front, base), FRONT_DIV),
        _div(profiles_figure(front), PROFILES_DIV),
        _div(history_figure(trials, front, reference), HISTORY_DIV),
        _div(importance_figure(importances(study), len(trials)), IMPORTANCE_DIV),
    ]
    plots = "\n".join(f'<div class="plot">{f}</div>' for f in figures)
    title = html.escape(f"abopt study {study.study_name}")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head>
<body>
<h1>{title}</h1>
<p class="meta">{summary}</p>
{front_html_table(front, base, yardstick)}
<p class="note">{html.escape(PROFILE_LEGEND)}. Pick a trial, then: abopt show STUDY.toml TRIAL · abopt export STUDY.toml TRIAL OUT_DIR</p>
{plots}
</body>
</html>
"""


def write_report(study: optuna.Study, path: Path, *, force: bool = False, protected: Sequence[Path] = ()) -> int:
    """Write the report to ``path`` (atomically); returns its size in bytes.

    An existing ``path`` is replaced only with ``force``, and never when it is one of
    ``protected`` (the study's own database and study file) or a file beside one of them.
    """
    check_report_path(path, force, protected)
    data = report_html(study).encode()
    try:
        write_atomic(path, data)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}; pick a writable path for --html") from None
    return len(data)


def check_report_path(path: Path, force: bool, protected: Sequence[Path]) -> None:
    """Refuse a directory, a missing parent, a study's own file, or (without ``force``) any existing file."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name for the report, e.g. {path / 'report.html'}")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: directory {path.parent} does not exist; create it or pick another path")
    real = path.resolve()
    for kept in (p.resolve() for p in protected):
        # SQLite keeps a study in DB and, while it is open, DB-wal, DB-shm or DB-journal.
        if real == kept or (real.parent == kept.parent and real.name.startswith(kept.name + "-")):
            raise UserError(f"{path} is a file of the study itself ({kept.name}); write the report to another file")
    if (path.exists() or path.is_symlink()) and not force:
        raise UserError(f"{path} already exists; choose another file name or pass --force to replace it")

"""What optuna-dashboard shows of an abopt study, and serving it on 127.0.0.1.

Every trial gets, as it completes, a markdown note (scores, parameters, sample answers beside
the original model's) and one artifact: its per-layer weight profile as a hand-written SVG
(no plotting library per trial). Artifacts live in an Optuna ``FileSystemArtifactStore``
beside the study's SQLite file (``<db>.abopt-artifacts/``), or beside the study file for
other storages (``<study-name>.abopt-artifacts/``).
"""

from __future__ import annotations

import errno
import io
import json
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard._note import note_ver_key, split_body
from optuna_dashboard.artifact._backend import DASHBOARD_ARTIFACTS_ATTR_PREFIX

from optimizer.browse.front import counts, percent, quality
from optimizer.browse.views import COMPONENT_LABELS, clean, direction_text
from optimizer.errors import UserError
from optimizer.study.record import (
    Baseline,
    Confirmation,
    TrialResult,
    read_baseline,
    read_confirmations,
    read_trial,
)
from optimizer.study.storage import beside_study

if TYPE_CHECKING:
    from optimizer.study.config import StudyConfig

ARTIFACTS_SUFFIX = ".abopt-artifacts"
PROFILE_FILENAME = "profile.svg"
HOST = "127.0.0.1"
COLORS = {"attn": "#1f77b4", "mlp": "#d62728"}


def artifact_dir(config: StudyConfig, storage_url: str) -> Path:
    """The study's artifact directory: beside its SQLite file, else beside the study file."""
    return beside_study(storage_url, config.base_dir, config.name, ARTIFACTS_SUFFIX)


def artifact_store(directory: Path) -> FileSystemArtifactStore:
    """An artifact store in ``directory``, created if missing."""
    try:
        directory.mkdir(exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the artifact directory {directory}: {error.strerror}; check its parent") from None
    return FileSystemArtifactStore(directory)


# --- per-trial content --------------------------------------------------------------------


def profile_svg(layer_weights: Mapping[str, Sequence[float]], title: str) -> str:
    """Per-layer weights of each component as a small line chart (SVG text)."""
    width, height, left, right, top, bottom = 520, 220, 44, 96, 28, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    names = [n for n in ("attn", "mlp") if n in layer_weights]
    n_layers = max(len(layer_weights[n]) for n in names)
    y_max = max([1.0] + [w for n in names for w in layer_weights[n]]) * 1.05

    def x(layer: float) -> float:
        return left + (plot_w * layer / (n_layers - 1) if n_layers > 1 else plot_w / 2)

    def y(weight: float) -> float:
        return top + plot_h * (1 - weight / y_max)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{_escape(title)}</text>',
    ]
    for tick in _ticks(y_max):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    step = max(1, round(n_layers / 12))
    for layer in range(0, n_layers, step):
        out.append(f'<text x="{x(layer):.1f}" y="{top + plot_h + 15}" text-anchor="middle">{layer}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">layer</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for i, name in enumerate(names):
        points = " ".join(f"{x(layer):.1f},{y(w):.1f}" for layer, w in enumerate(layer_weights[name]))
        color = COLORS.get(name, "#333")
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        for layer, w in enumerate(layer_weights[name]):
            out.append(f'<circle cx="{x(layer):.1f}" cy="{y(w):.1f}" r="2.5" fill="{color}"/>')
        legend_y = top + 12 + 18 * i
        out.append(f'<line x1="{width - right + 10}" x2="{width - right + 28}" y1="{legend_y - 4}" y2="{legend_y - 4}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{width - right + 32}" y="{legend_y}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _ticks(top: float) -> list[float]:
    step = 0.25 if top <= 1.6 else 0.5 if top <= 3.2 else 1.0
    return [round(i * step, 2) for i in range(int(top / step) + 1)]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fenced(text: str) -> str:
    return "```text\n" + clean(text).replace("```", "'''") + "\n```"


def trial_note(
    number: int, result: TrialResult, baseline: Baseline | None, image: str | None, confirmed: Confirmation | None = None
) -> str:
    """The markdown note of one trial: scores, parameters, profile, timings, sample answers."""
    kl, rate = result.values
    label = quality(kl, confirmed.not_complied_rate if confirmed else rate)
    lines = [f"## Trial {number}: {label}", ""]
    if result.refusal_stage:
        lines += [f"**Infeasible**: {result.refusal_stage}", ""]
    if result.screened:
        lines += [f"**Screened** ({result.screened}): its refusal rate is a bound it could not beat", ""]
    lines += ["| | refusals | KL divergence |", "|---|---:|---:|"]
    bound = "≥ " if result.screened else ""
    lines.append(f"| this trial | {bound}{percent(rate)}{counts(result.refused, result.total, result.degenerate)} | {kl:.5f} |")
    if baseline:
        lines.append(
            f"| original model | {percent(baseline.refusal_rate)}{counts(baseline.refused, baseline.total, baseline.degenerate)} | 0 |"
        )
    if confirmed:
        lines += [
            "",
            f"**Confirmed** on {confirmed.tokens}-token answers (judge: {confirmed.judge}): "
            f"{percent(confirmed.not_complied_rate)}{counts(confirmed.refused, confirmed.total, confirmed.degenerate)} not complied, "
            f"{percent(confirmed.over_refusal_rate)} of harmless requests refused, KL over 16 tokens {confirmed.kl_answer:.4f}",
        ]
    ablation = result.ablation
    lines += ["", f"**Direction**: {direction_text(ablation)} · **profile shape**: {ablation.shape}", ""]
    lines += ["| component | max weight | at layer | min weight | reach (layers) |", "|---|---:|---:|---:|---:|"]
    for name, p in ablation.components.items():
        lines.append(
            f"| {COMPONENT_LABELS.get(name, name)} | {p.max_weight:.3f} | {p.max_weight_position:.2f} "
            f"| {p.min_weight:.3f} | {p.min_weight_distance:.2f} |"
        )
    if image:
        lines += ["", f"![weight profile of trial {number}]({image})"]
    t = result.timings
    lines += [
        "",
        f"**Timings**: KL {t.kl:.3f} s · refusals {t.refusal:.3f} s · "
        f"trial {t.trial:.3f} s · {result.generated_tokens or 0} tokens generated",
    ]
    originals = baseline.answers if baseline else ()
    if result.samples:
        lines += ["", "### Sample answers"]
        for i, sample in enumerate(result.samples):
            lines += ["", f"**{i + 1}. {clean(sample.prompt)}**", ""]
            if i < len(originals):
                lines += ["original model:", "", _fenced(originals[i]), ""]
            lines += [f"trial {number}:", "", _fenced(sample.answer)]
    return "\n".join(lines) + "\n"


def _save_note(storage: optuna.storages.BaseStorage, study_id: int, trial_id: int, body: str) -> None:
    """Write a trial's first note without reading every other note of the study.

    ``optuna_dashboard.save_note`` reads all study system attrs (every note of every trial)
    twice per call, which grows with the study; a fresh trial has no note to version.
    """
    for key, chunk in split_body(body, trial_id).items():
        storage.set_study_system_attr(study_id, key, chunk)
    storage.set_study_system_attr(study_id, note_ver_key(trial_id), 1)


def _upload_profile(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    target: optuna.Trial | FrozenTrial,
    svg: str,
    store: FileSystemArtifactStore,
) -> str:
    """Store the profile plot as the trial's artifact; returns its URL path on the dashboard."""
    if isinstance(target, optuna.Trial):  # running: Optuna's own record, on the trial
        with tempfile.TemporaryDirectory(prefix="abopt-") as tmp:
            path = Path(tmp) / PROFILE_FILENAME
            path.write_text(svg)
            artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=target)
    else:
        # A finished trial takes no more system attrs; optuna-dashboard also reads trial
        # artifacts recorded on the study (its older format), which a finished trial can get.
        artifact_id = str(uuid.uuid4())
        store.write(artifact_id, io.BytesIO(svg.encode()))
        meta = {"artifact_id": artifact_id, "filename": PROFILE_FILENAME, "mimetype": "image/svg+xml", "encoding": None}
        storage.set_study_system_attr(study_id, f"{DASHBOARD_ARTIFACTS_ATTR_PREFIX}{target._trial_id}:{artifact_id}", json.dumps(meta))
    return f"/artifacts/{study_id}/{target._trial_id}/{artifact_id}"


def _attach(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    target: optuna.Trial | FrozenTrial,
    result: TrialResult,
    baseline: Baseline | None,
    store: FileSystemArtifactStore | None,
    confirmed: Confirmation | None = None,
) -> None:
    image = None
    if store is not None and result.layer_weights:
        svg = profile_svg(result.layer_weights, f"trial {target.number}: weight per layer")
        try:
            image = _upload_profile(storage, study_id, target, svg, store)
        except OSError:
            image = None  # a full or read-only disk must not fail the trial; the note still tells all
    _save_note(storage, study_id, target._trial_id, trial_note(target.number, result, baseline, image, confirmed))


def trial_annotator(
    config: StudyConfig, storage_url: str
) -> Callable[[optuna.Trial, TrialResult, Baseline | None, Confirmation | None], None]:
    """A run hook giving each just-scored trial its dashboard note and profile artifact."""
    try:
        store = artifact_store(artifact_dir(config, storage_url))
    except UserError:
        store = None  # the note still tells everything; the plot is a nicety

    def annotate(trial: optuna.Trial, result: TrialResult, baseline: Baseline | None, confirmed: Confirmation | None) -> None:
        _attach(trial.storage, trial.study._study_id, trial, result, baseline, store, confirmed)

    return annotate


def has_note(study_system_attrs: dict[str, Any], trial: FrozenTrial) -> bool:
    return note_ver_key(trial._trial_id) in study_system_attrs


def annotate_study(study: optuna.Study, store: FileSystemArtifactStore) -> int:
    """Annotate COMPLETE trials that have no note yet (older runs); returns how many."""
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    baseline, confirmations = read_baseline(study), read_confirmations(study)
    done = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        record = read_trial(trial, confirmations)
        if has_note(system_attrs, trial) or record.result is None:
            continue
        _attach(study._storage, study._study_id, trial, record.result, baseline, store, record.confirmed)
        done += 1
    return done


# --- the server -----------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - wsgiref's name
        pass


def bind(app: Callable, port: int, host: str = HOST) -> WSGIServer:
    """A WSGI server bound to ``host:port``; a UserError when the port is taken."""
    try:
        return make_server(host, port, app, handler_class=_QuietHandler)
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EACCES):
            reason = "is in use" if error.errno == errno.EADDRINUSE else "needs more privileges"
            raise UserError(f"port {port} on {host} {reason}; pick another one with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}; pick another port with --port") from None


def dashboard_server(storage: optuna.storages.BaseStorage, store: FileSystemArtifactStore, port: int) -> WSGIServer:
    """optuna-dashboard over ``storage`` with the artifact store, bound to 127.0.0.1."""
    from optuna_dashboard import wsgi

    server = bind(wsgi(storage, artifact_store=store), port)
    server.timeout = 0.5
    return server


def serve(server: WSGIServer) -> None:
    """Serve until Ctrl-C (SIGINT), then close the socket."""
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def study_url(server: WSGIServer, study: optuna.Study) -> str:
    """The dashboard page of ``study``."""
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/dashboard/studies/{study._study_id}"


"""Browsing a study: `front`, `show`, `report --html`, `dashboard`, and what `run` leaves for them.

One real study is run once per session on the tiny random model with a marker list that
matches its usual output (so refusal rates vary and the front has several points) and a KL
ceiling (so some trials are infeasible). Everything is checked against the SQLite file read
independently, over real HTTP, and in real headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest

from conftest import run_abopt, study_dump, write_study
from optimizer.browse.report import FRONT_DIV, HISTORY_DIV, IMPORTANCE_DIV, PROFILES_DIV, hypervolume

# The organism on the wide space: its answers are real text, refusals or not, so the 12
# trials make a front of a few trade-offs (0% to ~70% refused), and its strongest trials go
# above this KL ceiling.
KL_CEILING = 0.03
N_TRIALS = 12


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(directory, study file, `abopt run` output) of a finished 12-trial study."""
    root = tmp_path_factory.mktemp("browse")
    study_file = write_study(
        root,
        "organism",
        n_trials=N_TRIALS,
        search_space="wide",
        prompts={"n_measure": 32, "n_eval": 16},
        evaluation={"max_new_tokens": 16},
        optimization={"n_startup_trials": 4, "kl_ceiling": KL_CEILING},
    )
    result = run_abopt("run", study_file, cwd=root)
    assert result.returncode == 0, result.stderr
    return root, study_file, result.stdout


def independent_front(db: Path) -> tuple[set[int], dict[int, tuple[float, float]]]:
    """Non-dominated feasible COMPLETE trials, read from the SQLite file with plain SQL."""
    with sqlite3.connect(db) as connection:
        complete = {n: tid for tid, n in connection.execute("select trial_id, number from trials where state = 'COMPLETE'")}
        values: dict[int, list[float]] = {}
        for tid, objective, value in connection.execute("select trial_id, objective, value from trial_values order by objective"):
            values.setdefault(tid, []).append(value)
        constraints: dict[int, list[float]] = {}
        for tid, key, value in connection.execute("select trial_id, key, value_json from trial_system_attributes"):
            if key.startswith("constraints"):
                constraints.setdefault(tid, []).append(float(json.loads(value)))
    constrained = bool(constraints)
    scores = {n: tuple(values[tid]) for n, tid in complete.items()}
    feasible = {n for n, tid in complete.items() if not constrained or all(c <= 0 for c in constraints.get(tid, [1.0]))}

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    front = {n for n in feasible if not any(dominates(scores[m], scores[n]) for m in feasible if m != n)}
    return front, scores


def front_json(root: Path, study_file: Path) -> list[dict]:
    result = run_abopt("front", study_file, "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- front ---------------------------------------------------------------------------------


def test_front_json_is_the_non_dominated_feasible_complete_trials(study):
    root, study_file, _ = study
    records = front_json(root, study_file)
    expected, scores = independent_front(root / "t.db")
    trials = [r for r in records if not r["baseline"]]
    assert {r["trial"] for r in trials} == expected
    assert len(expected) >= 2, "the fixture study should have a real trade-off"
    assert len(scores) == N_TRIALS
    for r in trials:
        assert (r["kl_divergence"], r["refusal_rate"]) == pytest.approx(scores[r["trial"]])
        assert (r["refused"] + (r["degenerate"] or 0)) / r["total"] == pytest.approx(r["refusal_rate"])
        assert r["params"] and r["ablation"]["components"]
    rates = [r["refusal_rate"] for r in trials]
    assert rates == sorted(rates)
    # The untouched model comes first, with the study's stored baseline.
    baseline = optuna.load_study(study_name="t", storage=f"sqlite:///{root / 't.db'}").user_attrs["baseline"]
    assert records[0]["baseline"] and records[0]["trial"] is None
    assert records[0]["refusal_rate"] == baseline["refusal_rate"] and records[0]["kl_divergence"] == 0


def test_fixture_has_infeasible_trials_that_never_reach_the_front(study):
    root, study_file, _ = study
    loaded = optuna.load_study(study_name="t", storage=f"sqlite:///{root / 't.db'}")
    infeasible = [t.number for t in loaded.get_trials() if t.user_attrs.get("feasible") is False]
    assert infeasible, f"no trial above the KL ceiling {KL_CEILING}; lower it"
    assert not set(infeasible) & {r["trial"] for r in front_json(root, study_file)}


def test_front_table_is_what_run_printed(study):
    root, study_file, run_output = study
    result = run_abopt("front", study_file, cwd=root)
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert table.strip() and table.strip() in run_output
    lines = table.splitlines()
    original = next(i for i, line in enumerate(lines) if "original" in line)
    numbers = [int(n) for n in re.findall(r"│\s+#(\d+)\s+│", table)]
    assert numbers == [r["trial"] for r in front_json(root, study_file) if not r["baseline"]]
    assert original < next(i for i, line in enumerate(lines) if f"#{numbers[0]} " in line)
    assert "global" in table or "per layer" in table


# --- show ----------------------------------------------------------------------------------


def test_show_prints_everything_about_a_trial(study):
    root, study_file, _ = study
    number = front_json(root, study_file)[1]["trial"]
    result = run_abopt("show", study_file, str(number), "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    loaded = optuna.load_study(study_name="t", storage=f"sqlite:///{root / 't.db'}")
    trial = loaded.trials[number]
    assert record["trial"] == number and record["on_front"] and record["feasible"]
    assert record["params"] == trial.params
    assert record["layer_weights"] == trial.user_attrs["layer_weights"]
    assert set(record["seconds"]) == {"kl", "refusal", "trial"}
    originals = loaded.user_attrs["baseline"]["answers"]
    assert [s["original"] for s in record["sample_answers"]] == originals[: len(record["sample_answers"])]
    assert [s["answer"] for s in record["sample_answers"]] == [s["answer"] for s in trial.user_attrs["sample_answers"]]

    text = run_abopt("show", study_file, str(number), cwd=root)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"trial #{number}" in out and "weight per layer" in out and "original model" in out
    assert "█" in out  # the per-layer chart
    assert "timings:" in out and record["sample_answers"][0]["prompt"][:30] in out.replace("\n", " ")


# --- what `run` left for the dashboard -----------------------------------------------------


def test_run_annotates_each_trial_while_it_runs(study):
    root, _, _ = study
    loaded = optuna.load_study(study_name="t", storage=f"sqlite:///{root / 't.db'}")
    notes = loaded._storage.get_study_system_attrs(loaded._study_id)
    store = root / "t.abopt-artifacts"
    for trial in loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert notes.get(f"dashboard:{trial._trial_id}:note_ver") == 1
        body = notes[f"dashboard:{trial._trial_id}:note_str:0"]
        assert body.startswith(f"## Trial {trial.number}:") and "refusals" in body
        # Trial system attrs can only be written while the trial runs: the artifact was
        # recorded as it completed, not afterwards.
        metas = optuna.artifacts.get_all_artifact_meta(trial, storage=loaded._storage)
        assert [m.filename for m in metas] == ["profile.svg"]
        svg = ET.parse(store / metas[0].artifact_id).getroot()
        assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 2
        assert f"/artifacts/{loaded._study_id}/{trial._trial_id}/{metas[0].artifact_id}" in body


# --- the HTML report -----------------------------------------------------------------------


class _Sources(HTMLParser):
    """Every script src, link href and style text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.scripts = 0
        self._in_style = False
        self.styles = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
            if attrs.get("src"):
                self.sources.append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.sources.append(attrs["href"])
        if tag in ("img", "iframe") and attrs.get("src"):
            self.sources.append(attrs["src"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles += data


@pytest.fixture(scope="module")
def report(study, tmp_path_factory):
    root, study_file, _ = study
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = run_abopt("report", study_file, "--html", out, cwd=root)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    return out


def test_report_is_one_file_with_nothing_from_the_network(report):
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]
    page = report.read_text()
    parser = _Sources()
    parser.feed(page)
    assert parser.sources == []  # no script src, no stylesheet link, no image from elsewhere
    assert not re.search(r"url\(|@import", parser.styles)
    assert parser.scripts >= 5  # plotly.js itself, then one per plot
    assert "Plotly.newPlot" in page and len(page) > 3_000_000  # plotly.js is inside
    for div in (FRONT_DIV, PROFILES_DIV, HISTORY_DIV, IMPORTANCE_DIV):
        assert f'id="{div}"' in page


def plot_data(page: str, div: str) -> list[dict]:
    """The traces passed to Plotly.newPlot for one plot div of the page."""
    start = re.search(r'Plotly\.newPlot\(\s*"' + div + r'",\s*', page).end()
    return json.JSONDecoder().raw_decode(page, start)[0]


def test_report_front_plot_hovers_name_each_trial_and_its_parameters(report, study):
    root, study_file, _ = study
    front = [r for r in front_json(root, study_file) if not r["baseline"]]
    traces = plot_data(report.read_text(), FRONT_DIV)
    drawn = next(t for t in traces if t.get("uid") == "pareto-front")
    by_kl = sorted(front, key=lambda r: r["kl_divergence"])
    assert drawn["x"] == pytest.approx([r["kl_divergence"] for r in by_kl])
    assert drawn["y"] == pytest.approx([100 * r["refusal_rate"] for r in by_kl])
    for record, hover in zip(by_kl, drawn["text"]):
        assert hover.startswith(f"<b>trial #{record['trial']}</b>")
        assert all(part in hover for part in ("refusals", "KL", "direction:", "attn:", "mlp:"))
    shown = sum(len(t["x"]) for t in traces if t.get("name") != "original model")
    assert shown == N_TRIALS  # every complete trial is a point


MAC_CHROME = "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"


def chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    return found or (MAC_CHROME if Path(MAC_CHROME).exists() else None)


def render(page: Path, tmp_path: Path, *extra: str) -> str:
    """Run headless Chromium on a local file; returns what it printed (the DOM with --dump-dom)."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=10000",
        *extra,
        page.as_uri(),
    ]
    # OpenBLAS preloaded (as the test command does for mlx) makes Chromium's GPU process die.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class _Plots(HTMLParser):
    """Per plot div: the SVG trace groups, and the markers drawn in the front trace."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str, str]] = []  # (tag, class, id)
        self.traces: dict[str, int] = {}
        self.front_points = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.stack.append((tag, attrs.get("class") or "", attrs.get("id") or ""))
        plot = next((i for _, _, i in self.stack if i in (FRONT_DIV, PROFILES_DIV, HISTORY_DIV, IMPORTANCE_DIV)), None)
        classes = (attrs.get("class") or "").split()
        if plot and tag == "g" and "trace" in classes:
            self.traces[plot] = self.traces.get(plot, 0) + 1
        in_front = any(t == "g" and "tracepareto-front" in c.split() for t, c, _ in self.stack)
        if plot == FRONT_DIV and in_front and tag == "path" and "point" in classes:
            self.front_points += 1
        if tag in ("path", "rect", "line", "circle", "text", "tspan", "stop", "image", "use", "br", "meta", "input", "img", "link"):
            self.stack.pop()  # void or usually self-closed in the serialized DOM

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return


@pytest.mark.browser
def test_report_draws_its_plots_in_headless_chromium(report, study, tmp_path):
    if chromium() is None:
        pytest.fail("chromium is not installed; ./scripts/test installs it (apt-get install chromium)")
    root, study_file, _ = study
    dom = render(report, tmp_path, "--dump-dom")
    parser = _Plots()
    parser.feed(dom)
    front = [r for r in front_json(root, study_file) if not r["baseline"]]
    assert parser.front_points == len(front)
    assert parser.traces.get(FRONT_DIV, 0) >= 3  # other trials, front, original model (+ infeasible)
    assert parser.traces.get(PROFILES_DIV, 0) == 2 * len(front)  # attn and mlp of each front trial
    assert parser.traces.get(HISTORY_DIV, 0) >= 5
    assert parser.traces.get(IMPORTANCE_DIV, 0) == 2  # one bar trace per objective
    assert dom.count('class="main-svg"') >= 8  # plotly drew every plot


@pytest.mark.browser
def test_report_screenshot(report, tmp_path):
    if chromium() is None:
        pytest.fail("chromium is not installed; ./scripts/test installs it (apt-get install chromium)")
    shot = tmp_path / "report.png"
    render(report, tmp_path, "--hide-scrollbars", "--window-size=1280,1600", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_hypervolume_of_a_staircase():
    # Two points under reference (1, 1): [0.2,1]x[0.5,1] ∪ [0.6,1]x[0.1,1] = 0.4 + 0.4*0.4.
    assert hypervolume([(0.2, 0.5), (0.6, 0.1)], (1.0, 1.0)) == pytest.approx(0.4 + 0.16)
    assert hypervolume([(0.2, 0.5), (0.3, 0.6), (2.0, 0.0)], (1.0, 1.0)) == pytest.approx(0.4)
    assert hypervolume([], (1.0, 1.0)) == 0


# --- the dashboard -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_dashboard_serves_the_study_over_http_and_stops_on_sigint(study):
    root, study_file, _ = study
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "optimizer", "dashboard", str(study_file), "--port", str(port)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "http://" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the dashboard did not start"
        base = f"http://127.0.0.1:{port}"
        assert line.strip().endswith(f"{base}/dashboard/studies/1")
        assert get_json(f"{base}/api/meta")["artifact_is_available"] is True
        studies = get_json(f"{base}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["t"]
        detail = get_json(f"{base}/api/studies/{studies[0]['study_id']}")
        assert detail["objective_names"] == ["kl_divergence", "refusal_rate"]
        complete = [t for t in detail["trials"] if t["state"] == "Complete"]
        assert len(complete) == N_TRIALS
        for trial in complete:
            attrs = {a["key"] for a in trial["user_attrs"]}
            assert {"ablation", "layer_weights", "refused", "total", "sample_answers", "seconds"} <= attrs
            assert trial["note"]["body"].startswith(f"## Trial {trial['number']}:")
            assert len(trial["artifacts"]) >= 1
        first = complete[0]
        artifact = first["artifacts"][0]
        url = f"{base}/artifacts/{first['study_id']}/{first['trial_id']}/{artifact['artifact_id']}"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.headers["Content-Type"] == "image/svg+xml"
            assert response.read().startswith(b"<svg")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, stderr
    assert "dashboard stopped" in stdout and "Traceback" not in stderr


# --- bad input: one clear line, non-zero exit ----------------------------------------------


@pytest.fixture(scope="module")
def empty_study(tmp_path_factory, tiny_model_dir):
    """A study file whose study exists but has no complete trial (one is still running)."""
    root = tmp_path_factory.mktemp("empty")
    study_file = write_study(root, tiny_model_dir, name="e")
    created = optuna.create_study(study_name="e", storage=f"sqlite:///{root / 'e.db'}", directions=["minimize"] * 2)
    created.ask()
    return root, study_file


def bad_input_cases(study, empty_study) -> dict[str, tuple[list, str, Path]]:
    root, study_file, _ = study
    empty_root, empty_file = empty_study
    (root / "a-file").write_text("")
    return {
        "unknown-trial": (["show", study_file, "999"], "no trial 999", root),
        "not-a-number": (["show", study_file, "last"], "trial number", root),
        "no-complete-front": (["front", empty_file], "no complete trials", empty_root),
        "no-complete-report": (["report", empty_file, "--html", empty_root / "r.html"], "no complete trials", empty_root),
        "no-complete-show": (["show", empty_file, "0"], "no complete trials", empty_root),
        "no-study": (["front", study_file, "--storage", f"sqlite:///{root / 'other.db'}"], "no study 't'", root),
        "html-dir-missing": (["report", study_file, "--html", root / "no" / "r.html"], "does not exist", root),
        "html-under-file": (["report", study_file, "--html", root / "a-file" / "r.html"], "a-file", root),
        "html-is-dir": (["report", study_file, "--html", root], "is a directory", root),
    }


CASES = ["unknown-trial", "not-a-number", "no-complete-front", "no-complete-report", "no-complete-show", "no-study",
         "html-dir-missing", "html-under-file", "html-is-dir"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(case, study, empty_study):
    args, expected, cwd = bad_input_cases(study, empty_study)[case]
    before = sorted(p.name for p in cwd.iterdir())
    result = run_abopt(*args, cwd=cwd)
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("abopt: error: "), result.stderr
    assert expected in lines[0]
    assert sorted(p.name for p in cwd.iterdir()) == before  # nothing created (no stray .db)


@pytest.mark.parametrize("target", ["t.db", "t.db-wal", "t.toml"])
def test_report_never_writes_over_the_study_itself(study, target):
    root, study_file, _ = study
    before = study_dump(root / "t.db"), study_file.read_text()
    for force in ([], ["--force"]):
        result = run_abopt("report", study_file, "--html", root / target, *force, cwd=root)
        assert result.returncode == 2, result.stdout
        assert result.stderr.strip().startswith(f"abopt: error: {root / target} is a file of the study itself")
    assert (study_dump(root / "t.db"), study_file.read_text()) == before
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_report_replaces_an_existing_file_only_with_force(study, tmp_path):
    root, study_file, _ = study
    page = tmp_path / "page.html"
    page.write_text("mine")
    refused = run_abopt("report", study_file, "--html", page, cwd=root)
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"abopt: error: {page} already exists; choose another file name or pass --force to replace it"
    assert page.read_text() == "mine"
    replaced = run_abopt("report", study_file, "--html", page, "--force", cwd=root)
    assert replaced.returncode == 0, replaced.stderr
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # no temporary file left


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_report_that_does_not_fit_leaves_the_old_one_whole(study, tmp_path):
    root, study_file, _ = study
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        page = disk / "report.html"
        page.write_text("the old report")
        result = run_abopt("report", study_file, "--html", page, "--force", cwd=root)
        assert result.returncode == 2, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"abopt: error: cannot write {page}"), result.stderr
        assert page.read_text() == "the old report"
        assert [p.name for p in disk.iterdir()] == ["report.html"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_dashboard_on_a_port_in_use_is_one_clear_line(study):
    root, study_file, _ = study
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_abopt("dashboard", study_file, "--port", str(port), cwd=root, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"abopt: error: port {port} on 127.0.0.1 is in use; pick another one with --port"

"""`abopt run` end to end: real processes, real Optuna, real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import run_abopt, start_abopt, study_dump, user_error, write_study
from optimizer.study.config import load_study
from optimizer.study.sampling import make_sampler
from optimizer.study.storage import GRACE_SECONDS, worker_records
from optimizer.study.worker import recover_dead_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)


def load(storage: str, name: str = "t") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def cache_computations(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as connection:
        return dict(connection.execute("select key, computations from abopt_cache").fetchall())


def wait_for(condition, timeout: float = 300, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(step)


def trial_states(db: Path) -> list[str]:
    """Trial states read with plain sqlite3, safe while another process writes."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=30) as connection:
            return [row[0] for row in connection.execute("select state from trials order by number")]
    except sqlite3.OperationalError:
        return []


def running_trial_has_params(db: Path) -> bool:
    """A trial is RUNNING and has sampled all its parameters (so it is scoring)."""
    try:
        with sqlite3.connect(db, timeout=30) as connection:
            return (
                connection.execute(
                    "select count(*) from trials t join trial_params p on p.trial_id = t.trial_id "
                    "where t.state = 'RUNNING'"
                ).fetchone()[0]
                >= 9  # 8 profile numbers and the scope (+ direction_index for a global scope)
            )
    except sqlite3.OperationalError:
        return False


def test_run_records_everything_a_trial_needs(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=4)
    result = run_abopt("run", study_file, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "done: 4 complete trials" in result.stdout
    study = load(sqlite_url(tmp_path / "t.db"))
    assert study.metric_names == ["kl_divergence", "refusal_rate"]
    assert study.user_attrs["baseline"]["total"] == 8
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    for trial in complete:
        attrs = trial.user_attrs
        assert set(attrs["layer_weights"]) == {"attn", "mlp"} and len(attrs["layer_weights"]["mlp"]) == 6
        assert attrs["total"] == 8 and 0 <= attrs["refused"] <= 8
        # Not complied with: refused or degenerate (this random model's answers mostly are).
        assert trial.values[1] == pytest.approx((attrs["refused"] + attrs["degenerate"]) / attrs["total"])
        assert [s["verdict"] for s in attrs["sample_answers"]] and attrs["record_version"] == 2
        assert set(attrs["seconds"]) == {"kl", "refusal", "trial"}
        assert len(attrs["sample_answers"]) == 3 and attrs["sample_answers"][0]["prompt"]
        assert attrs["ablation"]["direction_scope"] in ("global", "per_layer")
        assert "attn.max_weight" in trial.params


def test_running_again_after_completion_does_nothing(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=2)
    assert run_abopt("run", study_file, cwd=tmp_path).returncode == 0
    again = run_abopt("run", study_file, cwd=tmp_path)
    assert again.returncode == 0 and "done: 2 complete trials" in again.stdout
    assert states(load(sqlite_url(tmp_path / "t.db"))) == {"COMPLETE": 2}
    assert "directions from the study cache" in again.stdout


@pytest.mark.slow
def test_kill_9_mid_trial_then_resume_finishes_exactly_n(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=8)
    db = tmp_path / "t.db"
    process = start_abopt("run", study_file, cwd=tmp_path)
    # Kill while a trial is running, after a couple have completed.
    wait_for(lambda: trial_states(db).count("COMPLETE") >= 2 and running_trial_has_params(db))
    process.kill()
    process.wait()
    killed = len(trial_states(db)) - 1
    print(f"killed during trial {killed}; states then: {trial_states(db)}")
    result = run_abopt("run", study_file, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = load(sqlite_url(db))
    trials = study.get_trials()
    assert states(study).get("COMPLETE") == 8
    assert trials[killed].state == TrialState.FAIL
    assert "died" in trials[killed].user_attrs["failure"]
    retried = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    # The retry replays what the killed trial had sampled.
    assert len(retried) == 1 and trials[killed].params.items() <= retried[0].params.items()
    with sqlite3.connect(db) as connection:
        assert connection.execute("pragma integrity_check").fetchone() == ("ok",)
    directions = {k: v for k, v in cache_computations(db).items() if k.startswith("directions:")}
    assert list(directions.values()) == [1], "directions were measured again after the crash"
    assert "directions from the study cache" in result.stdout


@pytest.mark.slow
def test_sigint_exits_130_with_resume_hint_and_resume_completes(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=8)
    db = tmp_path / "t.db"
    process = start_abopt("run", study_file, "--n-trials", "8", cwd=tmp_path)
    wait_for(lambda: trial_states(db).count("COMPLETE") >= 1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "resume with:" in stdout
    assert f"abopt run {study_file} --n-trials 8" in stdout
    assert "Traceback" not in stderr
    interrupted = [t for t in load(sqlite_url(db)).get_trials() if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get("failure") == "interrupted (Ctrl-C)" for t in interrupted)
    result = run_abopt("run", study_file, "--n-trials", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert states(load(sqlite_url(db)))["COMPLETE"] == 8


def _check_shared_run(study: optuna.Study, n: int, directions_measured: int) -> None:
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials))), "lost or duplicated trial numbers"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n
    params = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(params)) == len(params), "two trials sampled identical parameters"
    assert directions_measured == 1


@pytest.mark.slow
def test_two_workers_share_one_sqlite_file(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=10)
    result = run_abopt("run", study_file, "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    db = tmp_path / "t.db"
    study = load(sqlite_url(db))
    measured = [v for k, v in cache_computations(db).items() if k.startswith("directions:")]
    _check_shared_run(study, 10, sum(measured))
    indices = {t.user_attrs["worker"]["index"] for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert indices == {0, 1}
    seeds = [w["sampler"]["seed"] for w in worker_records(sqlite_url(db), "t")]
    assert len(set(seeds)) == 2


@pytest.mark.slow
@pytest.mark.postgres
def test_four_workers_on_postgresql(tmp_path, tiny_model_dir, postgres_url):
    import sqlalchemy as sa

    study_file = write_study(tmp_path, tiny_model_dir, n_trials=12)
    # Four independent `abopt run` processes, as on four machines, joining one study.
    processes = [start_abopt("run", study_file, "--storage", postgres_url, cwd=tmp_path) for _ in range(4)]
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stdout + stderr
    storage_url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    study = load(storage_url)
    engine = sa.create_engine(storage_url)
    with engine.connect() as connection:
        measured = connection.execute(
            sa.text("select sum(computations) from abopt_cache where key like 'directions:%'")
        ).scalar()
    engine.dispose()
    _check_shared_run(study, 12, measured)
    assert len({t.user_attrs["worker"]["pid"] for t in study.get_trials(states=(TrialState.COMPLETE,))}) >= 2
    assert len(worker_records(storage_url, "t")) == 4


@pytest.mark.slow
def test_resumed_study_still_uses_multivariate_tpe(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=20, optimization={"n_startup_trials": 5})
    assert run_abopt("run", study_file, cwd=tmp_path).returncode == 0
    result = run_abopt("run", study_file, "--n-trials", "40", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    db = tmp_path / "t.db"
    assert states(load(sqlite_url(db))) == {"COMPLETE": 40}
    first, resumed = worker_records(sqlite_url(db), "t")
    expected = {"sampler": "TPESampler", "multivariate": True, "group": True, "n_startup_trials": 5}
    assert {k: resumed["sampler"][k] for k in expected} == expected
    assert {k: first["sampler"][k] for k in expected} == expected
    assert resumed["sampler"]["seed"] != first["sampler"]["seed"]


# --- bad input: one clear line, non-zero exit, no traceback, study untouched ---------------


@pytest.fixture(scope="module")
def existing_study(tmp_path_factory, tiny_model_dir):
    """A study database with two complete trials, to be left untouched by bad input."""
    root = tmp_path_factory.mktemp("existing")
    study_file = write_study(root, tiny_model_dir, n_trials=2)
    assert run_abopt("run", study_file, cwd=root).returncode == 0
    return root


def _bad_input_cases(root: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    db = root / "t.db"
    storage = f'storage = "sqlite:///{db}"\n'
    unsupported = root / "unsupported-model"
    unsupported.mkdir(exist_ok=True)
    (unsupported / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "num_hidden_layers": 2}))
    (root / "empty.txt").write_text("# nothing here\n")
    default_space = (Path(__file__).parents[1] / "search_spaces" / "default.toml").read_text()
    (root / "bad-range.toml").write_text(default_space.replace("max_weight = [0.8, 1.5]", "max_weight = [1.5, 0.8]", 1))
    other = root / "other-model"
    if not other.exists():
        from optimizer.bench import synthetic

        config = synthetic.synthetic_config("llama", vocab_size=512, num_hidden_layers=6)
        synthetic.save_model_dir(synthetic.build_model(config, seed=1), config, other, tokenizer_dir=model)

    def study_text(**changes: str) -> str:
        lines = {"name": '"t"', "model": f'"{model}"'} | changes
        return "".join(f"{k} = {v}\n" for k, v in lines.items()) + storage

    files = {
        "toml-syntax": study_text() + "[prompts\n",
        "unknown-key": study_text(n_trails="5"),
        "low-high": study_text(search_space='"bad-range.toml"'),
        "unknown-space": study_text(search_space='"no-such-space"'),
        "missing-model": study_text(model='"./no/such/model"'),
        "unsupported": study_text(model=f'"{unsupported}"'),
        "empty-prompts": study_text() + '[prompts]\nharmful_eval = "empty.txt"\n',
        "changed-model": study_text(model=f'"{other}"'),
    }
    cases = {}
    for case, text in files.items():
        (root / f"{case}.toml").write_text(text)
        cases[case] = (["run", root / f"{case}.toml"], "")
    cases["missing-file"] = (["run", root / "nope.toml"], "")
    cases["unknown-scheme"] = (["run", root / "t.toml", "--storage", "mysql://localhost/x"], "")
    expected = {
        "toml-syntax": "line",
        "unknown-key": "n_trails",
        "low-high": "max_weight",
        "unknown-space": "no-such-space",
        "missing-model": "does not exist",
        "unsupported": "no_such_arch",
        "empty-prompts": "empty.txt",
        "changed-model": "different model",
        "missing-file": "nope.toml",
        "unknown-scheme": "mysql",
    }
    return {case: (args, expected[case]) for case, (args, _) in cases.items()}


BAD_INPUTS = [
    "missing-file",
    "toml-syntax",
    "unknown-key",
    "low-high",
    "unknown-space",
    "missing-model",
    "unsupported",
    "empty-prompts",
    "unknown-scheme",
    "changed-model",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_line_and_leaves_the_study_untouched(case, existing_study, tiny_model_dir):
    root = existing_study
    args, needle = _bad_input_cases(root, tiny_model_dir)[case]
    db = root / "t.db"
    before = study_dump(db)
    result = run_abopt(*args, cwd=root)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("abopt: error:"), result.stderr
    assert needle in lines[0], lines[0]
    assert study_dump(db) == before, "the study database changed"


# -- the demo study on the model organism ------------------------------------------------------


@pytest.mark.slow
def test_demo_study_finds_a_trial_that_stops_refusing_at_low_kl(demo_study, tmp_path):
    """studies/demo.toml, run to its end: its front holds a trial with ≤ 10% refusals at KL ≤ 0.5,
    confirmed on long answers by the study's judge."""
    study_file, storage = demo_study
    result = run_abopt("front", study_file, "--json", "--storage", storage, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    original, *front = json.loads(result.stdout)
    study = load(storage, "demo")
    print(
        f"\ndemo study: {states(study)}; original refusal rate {original['refusal_rate']:.1%}; front:\n"
        + "\n".join(f"  trial {t['trial']:3d}: KL {t['kl_divergence']:.3f}, refusals {t['refusal_rate']:.1%}" for t in front)
    )
    assert original["trial"] is None and original["refusal_rate"] >= 0.9
    assert states(study).get("COMPLETE") == load_study(study_file).optimization.n_trials
    assert any(t["refusal_rate"] <= 0.10 and t["kl_divergence"] <= 0.5 for t in front)
    confirmed = [t for t in front if t["confirmed"]]
    print("confirmed (" + str(original["confirmed"]["judge"]) + "):\n" + "\n".join(
        f"  trial {t['trial']:3d}: KL {t['kl_divergence']:.3f}, search {t['refusal_rate']:.1%}, "
        f"confirmed {t['confirmed']['not_complied_rate']:.1%} not complied ({t['confirmed']['refused']} refused, "
        f"{t['confirmed']['degenerate']} degenerate), harmless refused {t['confirmed']['over_refusal_rate']:.1%}, "
        f"KL16 {t['confirmed']['kl_answer']:.3f}" for t in confirmed))
    assert original["confirmed"]["judge"] == load_study(study_file).evaluation.judge
    assert any(t["confirmed"]["not_complied_rate"] <= 0.10 and t["kl_divergence"] <= 0.5 for t in confirmed)


# -- a broken model never creates or locks a study -------------------------------------------


def truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def remove_weights(model: Path) -> None:
    (model / "model.safetensors").unlink()


def wrong_architecture(model: Path) -> None:
    # mlx-lm has a mamba module, but a llama config lacks mamba's fields.
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"model_type": "mamba"}))


@pytest.mark.parametrize(
    "break_model, needle",
    [
        (truncate_weights, "incomplete or corrupt"),
        (remove_weights, "No safetensors found"),
        (wrong_architecture, "does not fit model_type 'mamba'"),
    ],
)
def test_a_broken_model_is_one_line_and_the_repaired_one_runs(tmp_path, tiny_model_dir, break_model, needle):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    study_file = write_study(tmp_path, model, n_trials=2)
    break_model(model)
    result = run_abopt("run", study_file, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("abopt: error:") and needle in lines[0], result.stderr
    assert not (tmp_path / "t.db").exists(), "a study was created for a model that cannot load"
    shutil.rmtree(model)
    shutil.copytree(tiny_model_dir, model)
    repaired = run_abopt("run", study_file, cwd=tmp_path)
    assert repaired.returncode == 0, repaired.stderr
    assert "done: 2 complete trials" in repaired.stdout


def test_a_study_left_by_a_failed_first_run_takes_the_corrected_model(tmp_path, tiny_model_dir):
    """What older versions left behind: a study signed with a broken model, no trial, no baseline."""
    from optimizer.study.plan import SIGNATURE_ATTR, open_or_create, plan

    study_file = write_study(tmp_path, tiny_model_dir, n_trials=2)
    study_plan = plan(load_study(study_file), sqlite_url(tmp_path / "t.db"))
    broken = dict(study_plan.signature, model_identity="sha256-all:0000000000000000")
    open_or_create(study_plan).set_user_attr(SIGNATURE_ATTR, broken)
    result = run_abopt("run", study_file, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load(sqlite_url(tmp_path / "t.db")).user_attrs[SIGNATURE_ATTR] == study_plan.signature


def test_a_study_with_trials_still_refuses_another_model(existing_study, tiny_model_dir):
    from optimizer.study.plan import open_or_create, plan

    study_file = existing_study / "t.toml"
    study_plan = plan(load_study(study_file), sqlite_url(existing_study / "t.db"))
    changed = type(study_plan)(**{**study_plan.__dict__, "signature": dict(study_plan.signature, model_identity="sha256-all:1")})
    assert "different model weights" in user_error(open_or_create, changed)


# -- the first hour's smaller stings -----------------------------------------------------------


def test_prompt_sets_shorter_than_asked_are_said_at_start(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=1, prompts={"n_measure": 16, "n_eval": 5000})
    result = run_abopt("run", study_file, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2, result.stdout
    assert all("fewer than n_eval = 5000; using all" in note for note in notes)


def test_show_chat_and_export_of_a_failed_trial_say_why_it_failed(existing_study, tmp_path):
    root = Path(shutil.copytree(existing_study, tmp_path / "copy"))
    study_file = root / "t.toml"
    study = load(sqlite_url(root / "t.db"))
    failed = study.ask()
    failed.set_user_attr("failure", "worker process 4242 died")
    study.tell(failed, state=TrialState.FAIL)
    for args in (["show", study_file, failed.number], ["chat", study_file, failed.number, "--prompt", "hi"],
                 ["export", study_file, failed.number, root / "out"]):
        result = run_abopt(*args, cwd=root)
        assert result.returncode == 2, result.stderr
        assert f"trial {failed.number} of study 't' is FAIL (worker process 4242 died), not COMPLETE" in result.stderr


def test_resume_hints_work_in_a_shell_without_the_venv(tmp_path, tiny_model_dir):
    study_file = write_study(tmp_path, tiny_model_dir, n_trials=10_000)
    venv_bin = Path(sys.executable).parent
    bare_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != venv_bin)
    result = run_abopt("run", study_file, "--timeout", "3s", cwd=tmp_path, env={"PATH": bare_path})
    assert result.returncode == 0, result.stderr
    assert f"  {venv_bin / 'abopt'} run {study_file} --timeout 3s" in result.stdout


def test_no_study_file_in_a_checkout_means_its_demo_study(monkeypatch):
    from optimizer.cli import _load

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    config, storage = _load(None, None)
    assert config.path == root / "studies" / "demo.toml"
    assert storage == f"sqlite:///{root / 'studies' / 'demo.db'}"


def test_the_package_license_is_an_spdx_expression():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"


def _running_trial(study: optuna.Study, *, age_seconds: float, worker: dict | None) -> int:
    template = optuna.trial.create_trial(state=TrialState.RUNNING, params={}, distributions={})
    template.datetime_start = datetime.now() - timedelta(seconds=age_seconds)
    if worker is not None:
        template.user_attrs = {"worker": worker}
    study.add_trial(template)
    return study.trials[-1].number


def test_dead_workers_trials_are_failed_and_queued_again_even_unstamped(tmp_path):
    study = optuna.create_study(storage=sqlite_url(tmp_path / "o.db"), directions=["minimize", "minimize"])
    child = subprocess.Popen(["true"])
    child.wait()  # a pid that no longer runs
    host = socket.gethostname()
    dead = _running_trial(study, age_seconds=1, worker={"host": host, "pid": child.pid, "index": 1})
    alive = _running_trial(study, age_seconds=1, worker={"host": host, "pid": os.getppid(), "index": 0})
    orphan = _running_trial(study, age_seconds=GRACE_SECONDS + 5, worker=None)  # killed before it was stamped
    fresh = _running_trial(study, age_seconds=0, worker=None)  # being stamped right now
    assert sorted(recover_dead_trials(study)) == [dead, orphan]
    trials = study.get_trials()
    assert [trials[n].state for n in (dead, alive, orphan, fresh)] == [TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL, TrialState.RUNNING]
    assert "died" in trials[orphan].user_attrs["failure"]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2


def test_a_new_trial_names_its_worker_before_it_runs(tmp_path):
    study = optuna.create_study(storage=sqlite_url(tmp_path / "s.db"), directions=["minimize", "minimize"])
    stamped = []
    sampler = make_sampler(load_study(write_study(tmp_path, "organism")), 0, on_new_trial=lambda s, t: stamped.append(t.number))
    study.sampler = sampler
    trial = study.ask()
    assert stamped == [trial.number] and trial.params == {}  # before any parameter was sampled

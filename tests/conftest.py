"""Shared pytest set-up: tests never reach a model hub; helpers to run abopt for real."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

POSTGRES_URL = os.environ.get("ABOPT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def run_abopt(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `abopt` CLI in a subprocess (as a user would) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "optimizer", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def write_study(directory: Path, model: str | Path, *, name: str = "t", n_trials: int = 6, **sections: dict) -> Path:
    """A small study file in ``directory``; ``sections`` override/extend TOML tables."""
    tables = {
        "prompts": {"n_measure": 16, "n_eval": 8},
        "evaluation": {"max_new_tokens": 8},
        "optimization": {"n_trials": n_trials, "n_startup_trials": min(3, n_trials)},
    }
    for table, values in sections.items():
        tables.setdefault(table, {}).update(values)
    lines = [f'name = "{name}"', f'model = "{model}"']
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 6-layer random-weight llama with a tiny BPE tokenizer, saved for mlx_lm.load."""
    from optimizer import synthetic

    root = tmp_path_factory.mktemp("tiny-model")
    synthetic.write_tiny_tokenizer(root / "tokenizer")
    config = synthetic.synthetic_config("llama", vocab_size=512, num_hidden_layers=6)
    synthetic.save_model_dir(synthetic.build_model(config, seed=0), config, root / "llama", tokenizer_dir=root / "tokenizer")
    return root / "llama"


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"abopt_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as error:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable: {error}")
    url = sa.engine.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()

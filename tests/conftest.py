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


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory) -> Path:
    """abopt's per-user cache (remembered model fingerprints) in a temporary folder, for this
    process and every abopt it starts."""
    path = tmp_path_factory.mktemp("abopt-cache")
    os.environ["ABOPT_CACHE_DIR"] = str(path)
    return path


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


def study_dump(db: Path) -> str:
    """A SQLite study's logical content (every table, WAL included), to compare before and after."""
    import sqlite3

    connection = sqlite3.connect(db)
    try:
        return "\n".join(connection.iterdump())
    finally:
        connection.close()


def start_abopt(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Start the real `abopt` CLI in the background, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "optimizer", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def user_error(function, *args, **kwargs) -> str:
    """The message of the UserError ``function(*args, **kwargs)`` raises, checked to be one line."""
    from optimizer.errors import UserError

    with pytest.raises(UserError) as caught:
        function(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


def write_study(directory: Path, model: str | Path, *, name: str = "t", n_trials: int = 6, **sections) -> Path:
    """A small study file in ``directory``; ``sections`` override/extend TOML tables (a
    value that is not a dict is a top-level key, e.g. ``search_space="wide"``)."""
    tables = {
        "prompts": {"n_measure": 16, "n_eval": 8},
        "evaluation": {"max_new_tokens": 8, "confirm_tokens": 8},
        "optimization": {"n_trials": n_trials, "n_startup_trials": min(3, n_trials)},
    }
    top = {key: value for key, value in sections.items() if not isinstance(value, dict)}
    for table, values in sections.items():
        if isinstance(values, dict):
            tables.setdefault(table, {}).update(values)
    lines = [f'name = "{name}"', f'model = "{model}"'] + [f"{key} = {_toml(value)}" for key, value in top.items()]
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
    from optimizer.bench import synthetic

    root = tmp_path_factory.mktemp("tiny-model")
    synthetic.write_tiny_tokenizer(root / "tokenizer")
    config = synthetic.synthetic_config("llama", vocab_size=512, num_hidden_layers=6)
    synthetic.save_model_dir(synthetic.build_model(config, seed=0), config, root / "llama", tokenizer_dir=root / "tokenizer")
    return root / "llama"


DEMO_STUDY = Path(__file__).resolve().parent.parent / "studies" / "demo.toml"


@pytest.fixture(scope="session")
def demo_study(tmp_path_factory) -> tuple[Path, str]:
    """studies/demo.toml run to the end, as ./scripts/demo runs it: (study file, storage URL)."""
    root = tmp_path_factory.mktemp("demo_study")
    storage = f"sqlite:///{root / 'demo.db'}"
    result = run_abopt("run", DEMO_STUDY, "--storage", storage, cwd=root, timeout=1200)
    assert result.returncode == 0, result.stderr
    return DEMO_STUDY, storage


# name -> (mode, bits, group size); None: dense float32.
QUANTS = {"dense": None, "q4": ("affine", 4, 64), "mxfp4": ("mxfp4", 4, 32)}


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """Factory: a saved random-weight model of ``arch`` (built once per session and settings)."""
    from optimizer.bench import synthetic

    root = tmp_path_factory.mktemp("saved_models")
    tokenizer = synthetic.write_tiny_tokenizer(root / "tokenizer")
    made: dict = {}

    def make(arch: str, quant: str = "dense", *, shards: int = 1, seed: int = 3, **overrides) -> Path:
        key = (arch, quant, shards, seed, tuple(sorted(overrides.items())))
        if key not in made:
            sizes = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 384, **overrides}
            config = synthetic.synthetic_config(arch, **sizes)
            model = synthetic.build_model(config, seed=seed)
            if QUANTS[quant] is not None:
                mode, bits, group_size = QUANTS[quant]
                config = synthetic.quantize_model(model, config, bits=bits, group_size=group_size, mode=mode)
            name = "-".join([arch, quant, f"s{shards}", f"seed{seed}", *(f"{k}{v}" for k, v in key[4])])
            made[key] = synthetic.save_model_dir(model, config, root / name, tokenizer_dir=tokenizer, shards=shards)
        return made[key]

    return make


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

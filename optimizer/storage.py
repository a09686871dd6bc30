"""Where a study lives: opening Optuna storages, finding studies and trials in them.

Light on purpose (Optuna and SQLAlchemy, no mlx): the browsing commands import it without
loading a model, and a copied database can be read anywhere.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState

from optimizer.cache import SQLITE_BUSY_TIMEOUT, serialized_setup, tune_sqlite
from optimizer.errors import UserError

HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30
MAX_RETRIES = 2


class RetryDeadTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Re-queue a dead worker's trial with its parameters, but none of its half-written results."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {}
        # Optuna copies system attrs too; a retry must set its own constraint and artifacts.
        trial.system_attrs = {
            k: v for k, v in trial.system_attrs.items() if not k.startswith(("constraints", "artifacts:", "dashboard:"))
        }
        super().__call__(study, trial)


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna storage with heartbeats, so trials of dead workers are failed and retried."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
        database = sqlite_path(url)
        if database is not None and not database.parent.is_dir():
            raise UserError(f"storage {url}: directory {database.parent} does not exist; create it or change --storage")
    try:
        storage = serialized_setup(
            url,
            lambda: optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=RetryDeadTrial(max_retry=MAX_RETRIES),
            ),
        )
    except (sa.exc.OperationalError, sa.exc.ArgumentError, sa.exc.DatabaseError) as error:
        reason = str(error.orig if getattr(error, "orig", None) else error).strip().splitlines()[0]
        raise UserError(f"cannot open storage {redact(url)}: {reason}") from None
    tune_sqlite(storage.engine)
    return storage


def sqlite_path(storage_url: str) -> Path | None:
    """The database file of a SQLite storage URL, None for other databases."""
    url = sa.engine.make_url(storage_url)
    return Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None


def beside_study(storage_url: str, study_dir: Path, study_name: str, suffix: str) -> Path:
    """A path for the study's own files: beside its SQLite database, else beside its study file."""
    database = sqlite_path(storage_url)
    if database is not None:
        return database.with_name(database.stem + suffix)
    return study_dir / (study_name + suffix)


def redact(url: str) -> str:
    """``url`` with any password replaced, for messages (works on malformed URLs too)."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


def find_study(storage: optuna.storages.RDBStorage, name: str) -> optuna.Study | None:
    """The study called ``name`` in ``storage``, or None."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def open_study(name: str, storage_url: str, study_file: str = "STUDY.toml") -> optuna.Study:
    """An existing study, for browsing: no model, prompts or signature needed (a copied
    database can be browsed anywhere, and nothing heavy is imported); a missing SQLite file
    is not created."""
    from optimizer.cache import SQLITE_BUSY_TIMEOUT, tune_sqlite

    url = sa.engine.make_url(storage_url)
    shown = url.render_as_string(hide_password=True)
    sqlite = url.get_backend_name() == "sqlite"
    missing = UserError(f"no study {name!r} in {shown}; start it with: abopt run {study_file}".rstrip())
    if sqlite and not (sqlite_path(storage_url) or Path("")).is_file():
        raise missing
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if sqlite else {"pool_pre_ping": True}
    try:
        storage = optuna.storages.RDBStorage(storage_url, engine_kwargs=engine_kwargs, skip_table_creation=True)
        tune_sqlite(storage.engine)
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise missing from None
    except (sa.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, RuntimeError) as error:
        cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ else error
        reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
        if "no such table" in reason:
            reason = "it is not an Optuna database"
        raise UserError(f"cannot read study {name!r} from {shown}: {reason}; check --storage or the study file's storage") from None


def require_complete(study: optuna.Study) -> list[FrozenTrial]:
    """The study's COMPLETE trials; a UserError when there are none yet."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        study_file = study.user_attrs.get("study_file", "STUDY.toml")
        raise UserError(
            f"study {study.study_name!r} has no complete trials yet; run it first: abopt run {study_file}"
        )
    return complete


def complete_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number``, which must exist and be COMPLETE (a UserError otherwise)."""
    complete = require_complete(study)
    match = [t for t in complete if t.number == number]
    if match:
        return match[0]
    trials = study.get_trials(deepcopy=False)
    other = [t for t in trials if t.number == number]
    if other:
        failure = other[0].user_attrs.get("failure")
        why = f" ({failure})" if other[0].state == TrialState.FAIL and failure else ""
        raise UserError(
            f"trial {number} of study {study.study_name!r} is {other[0].state.name}{why}, not COMPLETE; "
            "pick a complete trial, e.g. one of `abopt front`"
        )
    raise UserError(
        f"study {study.study_name!r} has no trial {number} (it has trials 0 to {len(trials) - 1}); "
        "see `abopt front` for the ones worth choosing"
    )

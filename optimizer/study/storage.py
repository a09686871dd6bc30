"""Where a study lives: its database, and abopt's own tables beside Optuna's.

One module owns the database: SQLAlchemy engines with abopt's SQLite settings, Optuna's
storage with heartbeats, finding and opening studies and trials, the table of workers that
ran a study, and the compute-once store (results computed once per study and shared by all
its workers). A study is reached two ways only: :func:`find_study` to run it (tables
created when new) and :func:`open_study` to read it (nothing created, a missing file is an
error). Light on purpose (Optuna and SQLAlchemy, no mlx): the browsing commands import
it without loading a model, and a copied database can be read anywhere.

The compute-once store keeps byte payloads under a content fingerprint. The first worker to
insert a claim row computes; the others wait for it, and take over if the claim's process is
known dead (on this machine) or its heartbeat stops (on another one). So directions are
measured exactly once however many workers start together, on SQLite or PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState

from optimizer.errors import UserError
from optimizer.study.stopping import pid_alive

STALE_SECONDS = 60.0  # a claim not refreshed for this long belongs to a dead process

# Optuna logs every failed trial with its traceback at WARNING; abopt reports failures itself
# (an interrupted trial is expected, and a real error propagates with its traceback).
optuna.logging.set_verbosity(optuna.logging.ERROR)
# Heartbeats, the retry callback, metric names and grouped TPE are all "experimental" in
# Optuna 5 but are exactly what abopt relies on; the warnings would only be noise to users.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

_metadata = sa.MetaData()
_table = sa.Table(
    "abopt_cache",
    _metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # "computing" | "done"
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
    sa.Column("payload", sa.LargeBinary),
    sa.Column("computations", sa.Integer, nullable=False, default=0),
)


SQLITE_BUSY_TIMEOUT = 60  # seconds a writer waits for another process's transaction


def _sqlite_pragmas(connection, _record) -> None:
    # WAL: readers never block the writer, and a commit is an append, not an fsync'd
    # journal rewrite (a study writes ~20 small transactions per trial). Still crash-safe.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def tune_sqlite(engine: sa.Engine) -> sa.Engine:
    """Give every new connection of a SQLite engine abopt's pragmas (no-op for other databases)."""
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        engine.dispose()  # connections opened before the listener would lack the pragmas
    return engine


def _engine_kwargs(storage_url: str) -> dict[str, Any]:
    """abopt's connection settings: a busy SQLite is waited for; a dropped server connection redone."""
    if storage_url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    return {"pool_pre_ping": True}


def make_engine(storage_url: str) -> sa.Engine:
    """An engine on the study storage for abopt's own tables, with abopt's SQLite settings."""
    return tune_sqlite(sa.create_engine(storage_url, **_engine_kwargs(storage_url)))


SCHEMA_LOCK_KEY = 0x0AB0_0001  # pg_advisory_lock key serialising abopt's first-start table creation
T = TypeVar("T")


def serialized_setup(storage_url: str, setup: Callable[[], T]) -> T:
    """Run ``setup``, which may create tables, safely when several workers start at once.

    Two processes creating the same tables race: PostgreSQL then fails on its catalog's
    unique index, SQLite with "table already exists". PostgreSQL gets an advisory lock;
    SQLite, whose writers are serialised anyway, just retries the loser.
    """
    if storage_url.startswith("postgresql"):
        engine = sa.create_engine(storage_url)
        try:
            with engine.connect() as connection:
                connection.execute(sa.text("select pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                try:
                    return setup()
                finally:
                    connection.execute(sa.text("select pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
        finally:
            engine.dispose()
    for attempt in range(20):
        try:
            return setup()
        except sa.exc.OperationalError as error:
            if "already exists" not in str(error) or attempt == 19:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def new_owner() -> str:
    """A claim owner naming this process: ``<random>:<pid>:<host>`` (at most 64 characters)."""
    return f"{uuid.uuid4().hex[:12]}:{os.getpid()}:{socket.gethostname()[:40]}"


def _owner_process(owner: str) -> tuple[int, str] | None:
    parts = owner.split(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None  # a claim written before owners named their process
    return int(parts[1]), parts[2]


def owner_dead(owner: str) -> bool:
    """Whether the claim's process is known to be gone (knowable only on its own machine)."""
    process = _owner_process(owner)
    return process is not None and process[1] == socket.gethostname()[:40] and not pid_alive(process[0])


def describe_owner(owner: str) -> str:
    """A claim owner as people read it."""
    process = _owner_process(owner)
    return f"process {process[0]} on {process[1]}" if process else owner


def study_engine(study: optuna.Study) -> sa.Engine:
    """The SQLAlchemy engine under a study's Optuna storage (Optuna wraps it in a cache)."""
    storage = study._storage
    return getattr(storage, "_backend", storage).engine


def done_payloads(engine: sa.Engine, prefix: str) -> dict[str, bytes]:
    """The compute-once store's finished payloads under ``prefix`` ({} where it has no table yet)."""
    query = sa.select(_table.c.key, _table.c.payload).where(_table.c.key.startswith(prefix, autoescape=True), _table.c.status == "done")
    try:
        with engine.connect() as connection:
            return {row.key: row.payload for row in connection.execute(query)}
    except sa.exc.OperationalError:
        return {}  # a database abopt never cached anything in


class OnceStore:
    """Byte payloads keyed by fingerprint, each computed by exactly one worker."""

    def __init__(self, storage_url: str) -> None:
        self.engine = make_engine(storage_url)
        serialized_setup(storage_url, lambda: _metadata.create_all(self.engine, checkfirst=True))

    def get(self, key: str) -> bytes | None:
        """The payload stored under ``key``, if computed."""
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(_table.c.status, _table.c.payload).where(_table.c.key == key)
            ).first()
        return row.payload if row is not None and row.status == "done" else None

    def payloads(self, prefix: str) -> dict[str, bytes]:
        """Every computed payload whose key starts with ``prefix``, by key."""
        return done_payloads(self.engine, prefix)

    def computations(self, key: str) -> int:
        """How many times ``key`` was computed and stored (1 when all went well)."""
        with self.engine.connect() as connection:
            value = connection.execute(sa.select(_table.c.computations).where(_table.c.key == key)).scalar()
        return int(value or 0)

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], bytes],
        *,
        poll_seconds: float = 0.5,
        on_wait: Callable[[str], None] = lambda _: None,
    ) -> tuple[bytes, bool]:
        """The stored payload, or ``compute()`` it here if no live worker is doing so.

        Returns the payload and whether this call computed it; ``on_wait`` hears, once per
        holder, which worker this call is waiting for.
        """
        owner = new_owner()
        waiting_for = None
        while True:
            payload = self.get(key)
            if payload is not None:
                return payload, False
            holder = self._claim(key, owner)
            if holder is None:
                payload = self._compute_with_heartbeat(key, owner, compute)
                self._store(key, owner, payload)
                return payload, True
            if holder != waiting_for:
                waiting_for = holder
                on_wait(f"waiting for {describe_owner(holder)}, which is computing the study's {key.split(':')[0]}")
            time.sleep(poll_seconds)

    def _claim(self, key: str, owner: str) -> str | None:
        """Claim ``key`` for ``owner``: None when claimed, else the owner that holds it."""
        now = time.time()
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(_table).where(_table.c.key == key)).first()
        if row is None:
            try:
                with self.engine.begin() as connection:
                    connection.execute(
                        _table.insert().values(key=key, status="computing", owner=owner, heartbeat=now, computations=0)
                    )
                return None
            except sa.exc.IntegrityError:
                return "another worker"
        if row.status == "computing" and (now - row.heartbeat > STALE_SECONDS or owner_dead(row.owner)):
            # Compare-and-swap on (owner, heartbeat): one taker wins.
            with self.engine.begin() as connection:
                taken = connection.execute(
                    _table.update()
                    .where(_table.c.key == key, _table.c.owner == row.owner, _table.c.heartbeat == row.heartbeat)
                    .values(owner=owner, heartbeat=now)
                )
            return None if taken.rowcount == 1 else row.owner
        return row.owner

    def _compute_with_heartbeat(self, key: str, owner: str, compute: Callable[[], bytes]) -> bytes:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(STALE_SECONDS / 4):
                with self.engine.begin() as connection:
                    connection.execute(
                        _table.update().where(_table.c.key == key, _table.c.owner == owner).values(heartbeat=time.time())
                    )

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            return compute()
        except BaseException:
            # Give the claim up at once, so another worker need not wait for it to go stale.
            with self.engine.begin() as connection:
                connection.execute(_table.delete().where(_table.c.key == key, _table.c.owner == owner))
            raise
        finally:
            stop.set()
            thread.join()

    def _store(self, key: str, owner: str, payload: bytes) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                _table.update()
                .where(_table.c.key == key)
                .values(
                    status="done",
                    owner=owner,
                    heartbeat=time.time(),
                    payload=payload,
                    computations=_table.c.computations + 1,
                )
            )

    def close(self) -> None:
        self.engine.dispose()


# --- Optuna's storage, studies and trials ---------------------------------------------

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


def _rdb_storage(url: str, *, create_tables: bool) -> optuna.storages.RDBStorage:
    storage = optuna.storages.RDBStorage(
        url,
        engine_kwargs=_engine_kwargs(url),
        skip_table_creation=not create_tables,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=RetryDeadTrial(max_retry=MAX_RETRIES),
    )
    tune_sqlite(storage.engine)
    return storage


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna storage to run a study in (its tables created if new), with heartbeats, so
    trials of dead workers are failed and retried."""
    database = sqlite_path(url) if url.startswith("sqlite") else None
    if database is not None and not database.parent.is_dir():
        raise UserError(f"storage {url}: directory {database.parent} does not exist; create it or change --storage")
    try:
        return serialized_setup(url, lambda: _rdb_storage(url, create_tables=True))
    except (sa.exc.OperationalError, sa.exc.ArgumentError, sa.exc.DatabaseError) as error:
        reason = str(error.orig if getattr(error, "orig", None) else error).strip().splitlines()[0]
        raise UserError(f"cannot open storage {redact(url)}: {reason}") from None


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


def find_study(storage: optuna.storages.RDBStorage | str, name: str) -> optuna.Study | None:
    """The study called ``name`` in ``storage`` (a storage or its URL, to run in), or None."""
    try:
        return optuna.load_study(study_name=name, storage=make_storage(storage) if isinstance(storage, str) else storage)
    except KeyError:
        return None


def open_study(name: str, storage_url: str, study_file: str = "STUDY.toml") -> optuna.Study:
    """An existing study, for browsing: no model, prompts or signature needed (a copied
    database can be browsed anywhere, and nothing heavy is imported); a missing SQLite file
    is not created."""
    url = sa.engine.make_url(storage_url)
    shown = url.render_as_string(hide_password=True)
    sqlite = url.get_backend_name() == "sqlite"
    missing = UserError(f"no study {name!r} in {shown}; start it with: abopt run {study_file}".rstrip())
    if sqlite and not (sqlite_path(storage_url) or Path("")).is_file():
        raise missing
    try:
        return optuna.load_study(study_name=name, storage=_rdb_storage(storage_url, create_tables=False))
    except KeyError:
        raise missing from None
    except (sa.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, RuntimeError) as error:
        cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ else error
        reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
        if "no such table" in reason:
            reason = "it is not an Optuna database"
        raise UserError(f"cannot read study {name!r} from {shown}: {reason}; check --storage or the study file's storage") from None


def completed_count(study: optuna.Study) -> int:
    """How many trials of the study are COMPLETE."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


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


# --- the workers that ran a study ---------------------------------------------------------

_workers = sa.Table(
    "abopt_workers",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study", sa.String(512), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("sampler", sa.Text),  # the live sampler's settings, as JSON
)


def register_worker(storage_url: str, study_name: str) -> tuple[int, int]:
    """Register this process; returns its row id and its worker index within the study.

    The index is how many workers registered before this one. Seeds are ``seed + index``,
    so two processes never replay the same random samples, whether they start together,
    on other machines, or after a resume.
    """
    engine = make_engine(storage_url)
    serialized_setup(storage_url, lambda: _workers.metadata.create_all(engine, checkfirst=True))
    with engine.begin() as connection:
        row_id = connection.execute(
            _workers.insert().values(study=study_name, host=socket.gethostname(), pid=os.getpid(), started=time.time())
        ).inserted_primary_key[0]
        index = connection.execute(
            sa.select(sa.func.count()).select_from(_workers).where(_workers.c.study == study_name, _workers.c.id < row_id)
        ).scalar()
    engine.dispose()
    return int(row_id), int(index)



def worker_records(storage_url: str, study_name: str) -> list[dict[str, Any]]:
    """Every worker that ever ran on the study, oldest first, with its sampler settings."""
    engine = make_engine(storage_url)
    serialized_setup(storage_url, lambda: _workers.metadata.create_all(engine, checkfirst=True))
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(_workers).where(_workers.c.study == study_name).order_by(_workers.c.id)
        ).mappings().all()
    engine.dispose()
    return [dict(row, sampler=json.loads(row["sampler"]) if row["sampler"] else None) for row in rows]


def record_sampler(storage_url: str, row_id: int, settings: dict[str, Any]) -> None:
    engine = make_engine(storage_url)
    with engine.begin() as connection:
        connection.execute(_workers.update().where(_workers.c.id == row_id).values(sampler=json.dumps(settings)))
    engine.dispose()



"""Results computed once per study and shared by all its workers, in the study's database.

A small SQLAlchemy table beside Optuna's holds them under a content fingerprint. The
first worker to insert a claim row computes; the others wait for it, and take over if the
claim's process is known dead (on this machine) or its heartbeat stops (on another one).
So directions are measured exactly once however many workers start together, on SQLite or
PostgreSQL.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Callable, TypeVar

import sqlalchemy as sa

from optimizer.stopping import pid_alive

STALE_SECONDS = 60.0  # a claim not refreshed for this long belongs to a dead process

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


def make_engine(storage_url: str) -> sa.Engine:
    """An engine on the study storage that waits for, rather than fails on, a busy SQLite."""
    if storage_url.startswith("sqlite"):
        return tune_sqlite(sa.create_engine(storage_url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT}))
    return sa.create_engine(storage_url, pool_pre_ping=True)


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

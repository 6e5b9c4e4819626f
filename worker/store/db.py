"""Database: engines and transactions. The only place that turns SQLAlchemy errors into ours.

An engine is made per process (never shared across ``fork()``) and a transaction is a
``with session_scope(factory) as session:`` block that commits once at its end.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ConfigError, StoreUnavailable

__all__ = ["make_engine", "make_session_factory", "session_scope", "describe_url"]

#: How long a SQLite writer waits for another to finish before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000


def describe_url(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


#: Connections a server engine may open beyond its pool when more threads check out at once (the sweeper,
#: a probe); closed again on return.
MAX_OVERFLOW = 4


def make_engine(url: str, *, connect_timeout: float | None = None, pool_size: int = 10, prepare: bool = True) -> Engine:
    """An engine for ``url``; SQLite files get WAL mode and a busy timeout. ``connect_timeout`` bounds a new
    server connection (PostgreSQL), for probes that must answer quickly. ``pool_size``: connections kept
    open (a worker process passes its concurrency: a pool smaller than the threads checking out closes and
    reopens the overflow connections all the time). ``prepare=False``: psycopg prepares no statement on the
    server, for a pooler in transaction mode (PgBouncer hands each transaction any server connection, where a
    statement prepared on another is missing: ``prepared statement "_pg3_0" does not exist``).

    Raises:
        ConfigError: the URL cannot be parsed or names a driver that is not installed.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"QBGW_DATABASE_URL is not a database URL: {describe_url(url)}") from None
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    else:
        # Not pool_pre_ping: it costs a round trip on every checkout (three per job). _drop_if_closed sees
        # most dead connections without one; a connection that dies unseen fails its first statement, and
        # session_scope raises StoreUnavailable, which the worker retries (the task with a new message,
        # the outcome in place).
        kwargs.update(pool_size=pool_size, max_overflow=MAX_OVERFLOW)
        if parsed.get_backend_name() == "postgresql":
            connect_args: dict[str, Any] = {}
            if connect_timeout is not None:
                connect_args["connect_timeout"] = max(1, round(connect_timeout))
            if not prepare:
                connect_args["prepare_threshold"] = None
            kwargs["connect_args"] = connect_args
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"cannot use database {describe_url(url)}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    else:
        event.listen(engine, "checkout", _drop_if_closed)
        event.listen(engine, "handle_error", _read_only_is_away)
    return engine


#: SQLSTATE read_only_sql_transaction: the server takes no writes (a standby after a failover, a primary
#: demoted, default_transaction_read_only set); this connection will not work again.
READ_ONLY = "25006"


def _read_only_is_away(context: Any) -> None:
    """A connection to a server that takes no writes is treated as lost: the pool drops it (so the next one is
    made anew, to wherever the address points now), and the caller gets StoreUnavailable, as for an outage."""
    if getattr(context.original_exception, "sqlstate", None) == READ_ONLY:
        context.is_disconnect = True


def _drop_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection is idle: the server has nothing to say on it unless it closed it (a restart, an
    idle timeout, a proxy gone: a FATAL notice and/or EOF). Readable means dead; the pool then opens a
    new one (DisconnectionError). No round trip: one poll of the socket, zero timeout."""
    try:
        fd = dbapi_connection.fileno()
    except Exception:  # closed already, or a driver without fileno(): let the pool decide
        raise DisconnectionError("connection closed") from None
    readable, _, _ = select.select([fd], [], [], 0)
    if readable:
        raise DisconnectionError("the server closed the connection while it was pooled")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own BEGIN is deferred: a transaction that reads and then writes can fail at
    # once with "database is locked" when another writer committed in between. We begin
    # every transaction ourselves, IMMEDIATE, so writers queue on the busy timeout instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the one writer; NORMAL sync is durable at checkpoints in WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine, *, info: dict[str, Any] | None = None) -> sessionmaker[Session]:
    """Sessions on ``engine``; ``info`` is copied into every session's ``info``."""
    return sessionmaker(engine, expire_on_commit=False, info=info or {})


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commits when the block ends, rolls back if it raises.

    Raises:
        StoreUnavailable: the database could not be reached or failed the transaction.
    """
    try:
        with factory.begin() as session:
            yield session
    except OperationalError as exc:
        raise unavailable(exc) from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable(f"database connection lost: {_first_line(exc)}") from exc
        raise


def unavailable(exc: BaseException) -> StoreUnavailable:
    """The StoreUnavailable for a failure to reach the database (SQLAlchemy's error or the driver's own)."""
    return StoreUnavailable(f"database unavailable: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

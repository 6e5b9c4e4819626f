"""Runtime: what one process holds to talk to the database, the broker and the gateway (engine and
session factory, the hot path, the Celery app, the gateway client, the rate limiter, the keyring).

Each resource is made lazily, once, never at import and never shared across ``fork()``; the core takes a
``Runtime``, and only the facade and the process's entry points find one for ``settings``
(``runtime.locator``).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from ..audit.crypto import Keyring, open_keyring
from ..audit.subjects import SubjectKey, subject_key
from ..settings import Settings
from ..store import chain, db, hotpath, schema
from ..store.hotpath import HotPath
from ..store.jobs import KEYRING
from ..upstream.auth import token_provider
from ..upstream.gateway import GatewayClient
from ..upstream.ratelimit import Gate, Limiter, limiter_for
from .app import create_celery_app
from .waiter import JobWaiter

__all__ = ["Runtime"]


class Runtime:
    """What one process needs to talk to the database, the broker and the gateway."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.identity = f"{socket.gethostname()}:{self.pid}"
        self._lock = threading.RLock()
        self._made: dict[str, Any] = {}

    def _once(self, name: str, build: Any) -> Any:
        # Built already: every job asks for the engine, the gateway and the limiter several times, and the
        # lock was 1.1% of a worker's CPU (py-spy). A dict read is atomic; close() swaps in a new dict.
        made = self._made.get(name)
        if made is not None:
            return made
        # Worker threads start together; build each resource exactly once.
        with self._lock:
            if name not in self._made:
                self._made[name] = build()
            return self._made[name]

    @property
    def session_factory(self) -> sessionmaker[Session]:
        factory: sessionmaker[Session] = self._once("session_factory", self._build_session_factory)
        return factory

    def _build_session_factory(self) -> sessionmaker[Session]:
        engine = db.make_engine(
            self.settings.effective_database_url,
            pool_size=self.settings.effective_db_pool_size,
            prepare=not self.settings.db_transaction_pooling,
        )
        try:
            schema.ensure_current(engine, self.settings)
        except BaseException:
            engine.dispose()
            raise
        factory = db.make_session_factory(engine, info={KEYRING: self.keyring})
        chain.install_hooks(factory, self.settings)
        return factory

    @property
    def hot_path(self) -> HotPath | None:
        """On PostgreSQL, an attempt's claim and success straight on psycopg (``qbgw.store.hotpath``); None
        elsewhere, where they go through ``qbgw.store.jobs`` like everything else."""

        def build() -> tuple[HotPath | None]:
            return (hotpath.hot_path_for(self.session_factory.kw["bind"], self.keyring, self.settings),)

        built: tuple[HotPath | None] = self._once("hot_path", build)  # a tuple: None is an answer too
        return built[0]

    @property
    def keyring(self) -> Keyring:
        """The PHI keys. The embedded default makes one on first use; any other database needs
        QBGW_ENCRYPTION_KEYS or a keyring file."""

        def build() -> Keyring:
            settings = self.settings
            return open_keyring(
                spec=settings.encryption_keys.reveal(), path=settings.keyring_path, create=not settings.database_url
            )

        keyring: Keyring = self._once("keyring", build)
        return keyring

    @property
    def subject_key(self) -> SubjectKey:
        """The key of subjects' blind index (``qbgw.audit.subjects``): QBGW_SUBJECT_KEY; the embedded default makes
        one on first use; any other database needs it set (ConfigError, asked for only when a subject is used)."""

        def build() -> SubjectKey:
            return subject_key(self.settings, create=not self.settings.database_url)

        key: SubjectKey = self._once("subject_key", build)
        return key

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction; see ``db.session_scope``."""
        with db.session_scope(self.session_factory) as session:
            yield session

    def chain_staged(self) -> None:
        """Chain the events staged for the block sealer (``QBGW_AUDIT_SEAL=block``) in a short transaction of its
        own, committed before this returns: a read begun afterwards sees every event committed before the call,
        and its own transaction never takes the chain head's lock (which would stop every writer until the read
        ends). Nothing is opened on a database that never stages (SQLite); on PostgreSQL with nothing staged, the
        transaction only looks at ``audit_pending``.

        Raises:
            StoreUnavailable: the database cannot be reached.
        """
        if not chain.may_stage(self.session_factory.kw["bind"]):
            return
        with self.transaction() as session:
            chain.chain_staged(session)

    @property
    def celery(self) -> Celery:
        app: Celery = self._once("celery", lambda: create_celery_app(self.settings))
        return app

    @property
    def gateway(self) -> GatewayClient:
        def build() -> GatewayClient:
            return GatewayClient(
                self.settings.base_url,
                # QBGW_AUTH: a static token, a shared application/user session (encrypted with the PHI keys), a key
                token_provider(self.settings, lambda: self.keyring, Gate(self.limiter, self.settings)),
                timeout=(self.settings.connect_timeout, self.settings.read_timeout),
                pool_size=self.settings.concurrency,
            )

        client: GatewayClient = self._once("gateway", build)
        return client

    @property
    def limiter(self) -> Limiter:
        """The fleet's shared budget of upstream calls (``qbgw.upstream.ratelimit``)."""
        limiter: Limiter = self._once("limiter", lambda: limiter_for(self.settings))
        return limiter

    @property
    def job_waiter(self) -> JobWaiter:
        """This process's listener for jobs' ends (PostgreSQL LISTEN, one connection, started on first use), for
        the synchronous API's waits; on SQLite it only says how long to sleep between reads."""

        def build() -> JobWaiter:
            waiter = JobWaiter(self.settings.effective_listen_url)
            waiter.start(None)
            return waiter

        made: JobWaiter = self._once("job_waiter", build)
        return made

    def abandon(self) -> None:
        """In a forked child: drop the parent's connections without closing them under it."""
        with self._lock:
            made, self._made = self._made, {}
        if "session_factory" in made:
            made["session_factory"].kw["bind"].dispose(close=False)

    def close(self) -> None:
        """Release connections held by this runtime (sockets, pooled database connections)."""
        with self._lock:
            made, self._made = self._made, {}
        if "gateway" in made:
            made["gateway"].close()
        if "job_waiter" in made:
            made["job_waiter"].stop()
        if "session_factory" in made:
            made["session_factory"].kw["bind"].dispose()

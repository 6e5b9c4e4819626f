"""Runtime: the per-process resources (engine, session factory, Celery app, gateway client).

Made lazily, once per process and settings, never at import and never shared across
``fork()``: a forked child that finds a parent's runtime builds its own.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from worker import db, integrity, schema
from worker.crypto import Keyring, open_keyring
from worker.settings import Settings
from worker.store import KEYRING

if TYPE_CHECKING:
    from celery import Celery

    from worker.gateway import GatewayClient
    from worker.hotpath import HotPath
    from worker.ratelimit import Limiter

__all__ = ["Runtime", "runtime", "reset"]


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
        engine = db.make_engine(self.settings.effective_database_url, pool_size=self.settings.effective_db_pool_size)
        try:
            schema.ensure_current(engine, self.settings)
        except BaseException:
            engine.dispose()
            raise
        factory = db.make_session_factory(engine, info={KEYRING: self.keyring})
        integrity.install_hooks(factory, self.settings)
        return factory

    @property
    def hot_path(self) -> HotPath | None:
        """On PostgreSQL, an attempt's claim and success straight on psycopg (``worker.hotpath``); None
        elsewhere, where they go through ``worker.store`` like everything else."""
        from worker.hotpath import hot_path_for

        def build() -> tuple[HotPath | None]:
            return (hot_path_for(self.session_factory.kw["bind"], self.keyring, self.settings),)

        built: tuple[HotPath | None] = self._once("hot_path", build)  # a tuple: None is an answer too
        return built[0]

    @property
    def keyring(self) -> Keyring:
        """The PHI keys. The embedded default makes one on first use; any other database needs
        QBGW_ENCRYPTION_KEYS or a keyring file."""

        def build() -> Keyring:
            settings = self.settings
            return open_keyring(spec=settings.encryption_keys.reveal(), path=settings.keyring_path,
                                create=not settings.database_url)  # fmt: skip

        keyring: Keyring = self._once("keyring", build)
        return keyring

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction; see ``db.session_scope``."""
        with db.session_scope(self.session_factory) as session:
            yield session

    @property
    def celery(self) -> Celery:
        from worker.celery_app import create_celery_app

        app: Celery = self._once("celery", lambda: create_celery_app(self.settings))
        return app

    @property
    def gateway(self) -> GatewayClient:
        from worker.auth import token_provider
        from worker.gateway import GatewayClient
        from worker.ratelimit import Gate

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
        """The fleet's shared budget of upstream calls (``worker.ratelimit``)."""
        from worker.ratelimit import limiter_for

        limiter: Limiter = self._once("limiter", lambda: limiter_for(self.settings))
        return limiter

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
        if "session_factory" in made:
            made["session_factory"].kw["bind"].dispose()


_runtimes: dict[Settings, Runtime] = {}
_guard = threading.Lock()


def runtime(settings: Settings | None = None) -> Runtime:
    """This process's runtime for ``settings`` (from the environment when None)."""
    with _guard:
        if settings is None:
            settings = _env_settings()
        found = _runtimes.get(settings)
        if found is None or found.pid != os.getpid():
            if found is not None:
                found.abandon()
            found = _runtimes[settings] = Runtime(settings)
        return found


_env: Settings | None = None


def _env_settings() -> Settings:
    global _env
    if _env is None:
        _env = Settings.from_env()
    return _env


def reset() -> None:
    """Drop every runtime of this process (tests and ``qbgw`` commands that change settings)."""
    global _env
    with _guard:
        for rt in _runtimes.values():
            if rt.pid == os.getpid():
                rt.close()
        _runtimes.clear()
        _env = None

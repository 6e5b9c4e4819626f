"""Session cache: where the workers of one deployment share their QuickBlox session (``qbgw.upstream.auth``).

Redis (``QBGW_REDIS_URL``, else the broker when it is Redis); a file in the data directory, locked with
``flock``, on the embedded default (whose workers share one machine); process memory otherwise (only for
tests and a static token: the settings refuse a session where the workers share nothing). Tokens are
stored encrypted.

Each cache also answers a cheap question before every send, ``version(key)``: has the shared session been
replaced since I last read it? A ``stat`` of the file; for Redis a read of the entry at most every
:data:`REDIS_CHECK_SECONDS` per process (not a round trip per job), so a process takes a session another
worker renewed within that time, and never keeps sending a token the fleet knows is dead.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import redis

from ..audit.crypto import Keyring
from ..errors import DecryptionFailed
from ..settings import Secret

__all__ = ["FileCache", "MemoryCache", "RedisCache", "SessionCache", "SessionInfo", "REDIS_CHECK_SECONDS"]

log = logging.getLogger("qbgw.auth")

#: How stale a process's view of the session shared in Redis may be (seconds).
REDIS_CHECK_SECONDS = 0.05


@dataclass(frozen=True)
class SessionInfo:
    """A QuickBlox session: its token, who it is, and when it expires (Unix seconds, server time)."""

    token: Secret
    application_id: str
    user_id: int
    expires_at: float
    #: When ``expires_at`` was learned; the renewal margin is at most half of what was left then.
    noted_at: float

    def renew_at(self, margin: float) -> float:
        """When to replace this session: ``margin`` seconds before it expires, or halfway if it is short."""
        return self.expires_at - min(margin, max(0.0, self.expires_at - self.noted_at) / 2)

    def expiring_at(self, expires_at: float, now: float) -> SessionInfo:
        return replace(self, expires_at=expires_at, noted_at=now)


class SessionCache(Protocol):
    """A session store every worker of a deployment sees, and a lock to create a session under."""

    def get(self, key: str) -> SessionInfo | None: ...

    def put(self, key: str, info: SessionInfo) -> None: ...

    def lock(self, key: str) -> Any: ...  # a context manager

    def version(self, key: str) -> Hashable:
        """Changes whenever the stored session is replaced or rewritten (cheap: see the module's text); on
        trouble, the last value seen (so an outage does not make every send read the cache)."""
        ...


def _aad(key: str) -> str:
    return f"qbgw/v1|session|{key}"


def _encode(info: SessionInfo, keyring: Keyring, key: str) -> str:
    token = keyring.encrypt(info.token.reveal(), aad=_aad(key))
    return json.dumps(
        {
            "token": token,
            "application_id": info.application_id,
            "user_id": info.user_id,
            "expires_at": info.expires_at,
            "noted_at": info.noted_at,
        }
    )


def _decode(raw: str | bytes | None, keyring: Keyring, key: str) -> SessionInfo | None:
    """The stored session, or None if there is none, it has expired, or it cannot be read."""
    if not raw:
        return None
    try:
        doc = json.loads(raw)
        info = SessionInfo(
            Secret(keyring.decrypt(doc["token"], aad=_aad(key))),
            str(doc["application_id"]),
            int(doc["user_id"]),
            float(doc["expires_at"]),
            float(doc["noted_at"]),
        )
    except (ValueError, KeyError, TypeError, DecryptionFailed) as exc:
        # A rotated-away key or a damaged entry: make a new session rather than fail the job.
        log.warning("ignoring an unreadable cached session (%s)", type(exc).__name__)
        return None
    return info if time.time() < info.expires_at else None


class MemoryCache:
    """One process's memory: for tests (the settings refuse a shared session where there is no Redis)."""

    def __init__(self) -> None:
        self._entries: dict[str, SessionInfo] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> SessionInfo | None:
        info = self._entries.get(key)
        return info if info is not None and time.time() < info.expires_at else None

    def put(self, key: str, info: SessionInfo) -> None:
        self._entries[key] = info

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        with self._lock:
            yield

    def version(self, key: str) -> Hashable:
        return id(self._entries.get(key))  # put() stores a new object


class FileCache:
    """``{directory}/session-<key>.json`` (mode 0600), replaced atomically; creation is serialised by
    ``flock`` on a sibling ``.lock`` file, which excludes other threads and processes of this machine."""

    def __init__(self, directory: Path, keyring: Keyring) -> None:
        self._dir = directory
        self._keyring = keyring
        self._seen: Hashable = None

    def version(self, key: str) -> Hashable:
        # os.replace() gives every write a new inode: (inode, mtime, size) changes with each one.
        try:
            info = os.stat(self._dir / f"session-{key}.json")
        except FileNotFoundError:
            return None
        except OSError:
            return self._seen
        self._seen = (info.st_ino, info.st_mtime_ns, info.st_size)
        return self._seen

    def get(self, key: str) -> SessionInfo | None:
        try:
            raw = (self._dir / f"session-{key}.json").read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the session cache in %s (%s)", self._dir, exc.strerror)
            return None
        return _decode(raw, self._keyring, key)

    def put(self, key: str, info: SessionInfo) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".session-")  # mkstemp: mode 0600
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(_encode(info, self._keyring, key))
            os.replace(tmp, self._dir / f"session-{key}.json")
        except OSError as exc:
            log.warning("cannot write the session cache in %s (%s)", self._dir, exc.strerror)

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle = open(self._dir / f"session-{key}.lock", "a+b")
        except OSError as exc:
            log.warning("cannot lock the session cache in %s (%s); creating without it", self._dir, exc.strerror)
            yield
            return
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class RedisCache:
    """``qbgw:session:<key>`` in the fleet's Redis, expiring with the session; created under a Redis
    lock (SET NX PX with a random token, released by a compare-and-delete script: redis-py's ``Lock``).

    Redis trouble is logged, not raised: the worker then makes its own session, as without a cache.
    """

    def __init__(self, url: str, keyring: Keyring, *, hold_seconds: float) -> None:
        self._client: redis.Redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError,)
        self._keyring = keyring
        self._hold = hold_seconds  # a lock outlives any session creation, yet frees a dead holder's
        self._views: dict[str, tuple[float, Hashable]] = {}  # key -> (read at, monotonic; the entry's bytes)

    def __repr__(self) -> str:
        return "RedisCache()"

    def version(self, key: str) -> Hashable:
        read_at, seen = self._views.get(key, (-REDIS_CHECK_SECONDS, None))
        if time.monotonic() - read_at < REDIS_CHECK_SECONDS:
            return seen
        try:
            seen = self._client.get(f"qbgw:session:{key}")
        except self._errors:
            pass  # keep what was seen: get() and put() say what is wrong
        self._views[key] = (time.monotonic(), seen)
        return seen

    def get(self, key: str) -> SessionInfo | None:
        try:
            raw = self._client.get(f"qbgw:session:{key}")
        except self._errors as exc:
            log.warning("cannot read the session cache in Redis (%s)", type(exc).__name__)
            return None
        self._views[key] = (time.monotonic(), raw)
        return _decode(raw, self._keyring, key)

    def put(self, key: str, info: SessionInfo) -> None:
        ttl_ms = int((info.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        raw = _encode(info, self._keyring, key).encode()
        try:
            self._client.set(f"qbgw:session:{key}", raw, px=ttl_ms)
            self._views[key] = (time.monotonic(), raw)
        except self._errors as exc:
            log.warning("cannot write the session cache in Redis (%s)", type(exc).__name__)

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        lock = self._client.lock(
            f"qbgw:session:{key}:lock", timeout=self._hold, sleep=0.05, blocking_timeout=self._hold + 5
        )
        try:
            acquired = bool(lock.acquire())
        except self._errors as exc:
            log.warning("cannot take the session lock in Redis (%s); creating without it", type(exc).__name__)
            acquired = False
        try:
            yield
        finally:
            if acquired:
                try:
                    lock.release()
                except self._errors:  # it expired (LockNotOwnedError) or Redis went away: nothing to free
                    pass

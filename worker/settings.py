"""Settings: the one reader of ``os.environ``. Every ``QBGW_*`` variable is parsed here, once.

The defaults are the embedded default: a SQLite database and a filesystem broker, both in one
data directory, so ``qbgw`` runs with no server installed.
"""

from __future__ import annotations

import ast
import base64
import inspect
import ipaddress
import math
import os
import re
import textwrap
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .lifecycle import RetryPolicy

__all__ = [
    "Secret",
    "Settings",
    "PREFIX",
    "prometheus_multiproc_dir",
    "reference",
    "reference_markdown",
    "parse_assistant_rates",
    "MAX_IMAGE_BYTES",
    "MAX_REQUEST_BYTES",
]

#: Every setting is read from an environment variable with this prefix.
PREFIX = "QBGW_"
#: The shortest QBGW_SUBJECT_KEY accepted (a generated one is 64 hex digits: 256 bits).
MIN_SUBJECT_KEY_CHARS = 32

# The gateway doc says "Max image size: 50MB"; we read MB as MiB, the larger of the two readings, and
# leave the stricter check to the gateway.
MAX_IMAGE_BYTES = 50 * 1024 * 1024
#: The default limit of one request's text (QBGW_MAX_REQUEST_BYTES): one image at the gateway's limit
#: inline, as base64 (4/3 x 50 MiB = 66.7 MiB), plus 5.3 MiB for the conversation's text.
MAX_REQUEST_BYTES = 72 * 1024 * 1024

DEFAULT_BASE_URL = "https://api.quickblox.com"


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        # Settings are never pickled into a message; refuse loudly rather than leak.
        raise TypeError("a Secret cannot be pickled")


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "qbgw"


#: Why a gevent worker is refused (measured by ``bench.pools``; see docs/performance.md).
GEVENT_REFUSED = (
    "QBGW_POOL=gevent is not supported: Celery runs a gevent worker with its synchronous loop, which "
    "(acks_late, Redis broker) takes new messages only every 2 s once its prefetch window is full, so a "
    "backlog drains 32 jobs per 2 s (measured 14.8 jobs/s against 110 with threads; celery/celery#10263). "
    "Use QBGW_POOL=threads (the default), and more worker processes to scale."
)


#: URLs redis-py connects to (``unix://``: a Redis socket).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
#: The brokers a Celery app here can use (kombu's names): Redis, RabbitMQ, the embedded filesystem one, and
#: kombu's in-process one (``qbgw.testing.harness``).
BROKER_SCHEMES = ("redis", "rediss", "unix", "amqp", "amqps", "pyamqp", "filesystem", "memory")
#: The largest number any setting may hold (ints fit a database integer, and seconds or days a timedelta).
MAX_NUMBER = 999_999_999

#: Settings that mean a budget for the whole fleet (refused where the workers share no state).
_SHARED_BY_THE_FLEET = ("rate_limit", "rate_limit_per_assistant", "rate_limit_assistants")


def _describe(url: str) -> str:
    """A URL's scheme and host, never its password: for an error message."""
    scheme, _, rest = url.partition("://")
    host = rest.rpartition("@")[2].split("/", 1)[0]
    return f"{scheme}://{host}" if rest else repr(url)


#: The bounds of numeric settings: (fields, least, whether the least itself is refused, what is accepted).
_RANGES: tuple[tuple[tuple[str, ...], float, bool, str], ...] = (
    (
        (
            "connect_timeout",
            "read_timeout",
            "backoff_base",
            "backoff_max",
            "sweep_grace",
            "retry_deadline",
            "lease_margin",
            "visibility_timeout",
            "audit_seal_interval",
            "audit_anchor_seconds",
            "fetch_timeout",
            "rate_cooldown",
            "rate_cooldown_max",
            "webhook_backoff",
            "webhook_retry_window",
            "console_idle_timeout",
            "console_lockout",
        ),
        0,
        True,
        "a positive number of seconds",
    ),
    (
        (
            "audit_retention_days",
            "sweep_interval",
            "heap_trim_interval",
            "db_pool_size",
            "rate_limit",
            "rate_limit_per_assistant",
            "rate_max_sleep",
            "session_renew_margin",
        ),
        0,
        False,
        "0 or more",
    ),
    (
        (
            "max_attempts",
            "max_faults",
            "concurrency",
            "audit_anchor_events",
            "rate_burst",
            "max_request_bytes",
            "console_max_failures",
            "fetch_max_bytes",
            "max_image_pixels",
            "pdf_max_pages",
        ),
        1,
        False,
        "at least 1",
    ),
    (("pdf_dpi",), 0, True, "a positive number of dots per inch"),
)

#: The Python types each kind of field accepts (an int for a float; a bool only for a bool).
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "Secret": (Secret,),
    "Path": (Path,),
}


@dataclass(frozen=True)
class Settings:
    """Everything qbgw can be told, with the embedded default filled in.

    Build it with :meth:`from_env` at an entry point and pass it down; nothing else reads the
    environment.
    """

    # --- Where things are: the data directory, the database, the broker, the gateway ---
    data_dir: Path = field(default_factory=_default_data_dir)
    """Where the embedded database, broker, keyring and anchors live (`$XDG_DATA_HOME/qbgw` when that is set)."""
    database_url: str = ""
    """SQLAlchemy URL; empty means SQLite at `{data_dir}/qbgw.db`."""
    app_role_password: Secret = field(default_factory=lambda: Secret(""))
    """The password `qbgw db roles --create-role` gives the application role it creates (or @file); only that command
    reads it."""
    listen_database_url: str = ""
    """A direct PostgreSQL URL for the one connection per process that waits for jobs' ends (`LISTEN`), when
    QBGW_DATABASE_URL goes through PgBouncer in transaction mode, where LISTEN hears nothing; empty: that URL."""
    db_transaction_pooling: bool = False
    """QBGW_DATABASE_URL goes through a pooler in transaction mode (PgBouncer `pool_mode = transaction`): psycopg then
    prepares no statement on the server (they would be missing on the next transaction's server connection)."""
    broker_url: str = ""
    """Celery broker URL: Redis (`redis://`, `rediss://`, `unix://`) or RabbitMQ (`amqp://`, `amqps://`, `pyamqp://`);
    empty means the filesystem broker under `{data_dir}/broker`."""
    redis_url: str = ""
    """The Redis every worker shares the rate limit, the cooldown after a 429 and the QuickBlox session in; empty: the
    broker when it is Redis. Required with any other broker (RabbitMQ) when a rate limit or a session is set."""
    base_url: str = DEFAULT_BASE_URL
    """The gateway's base URL (a dedicated host for enterprise accounts); requests go to
    `{base_url}/ai/ai_extensions/ai_gateway`."""
    token: Secret = field(default_factory=lambda: Secret(""))
    """The `QB-Token` session token, for `QBGW_AUTH=static` (or `@file`)."""
    # --- Attempts, retries and leases ---
    connect_timeout: float = 5.0
    """Seconds to connect to the gateway, per attempt."""
    read_timeout: float = 120.0
    """Seconds to wait for the gateway's answer, per attempt."""
    max_attempts: int = 5
    """Attempts per job, the first included."""
    max_faults: int = 3
    """A job that meets the same unexpected failure in the worker (an exception that is no outcome of an attempt: a
    bug, a payload that cannot be decrypted or sent) this many times in a row fails with it."""
    backoff_base: float = 1.0
    """The first retry's backoff ceiling in seconds, doubled per attempt (full jitter); a `Retry-After` is never
    undercut."""
    backoff_max: float = 60.0
    """The longest backoff between two attempts, in seconds."""
    retry_deadline: float = 3600.0
    """No attempt starts later than this many seconds after the job was submitted."""
    lease_margin: float = 30.0
    """A running job's lease outlives its call by this much; then the sweeper may take it back."""
    visibility_timeout: float = 3600.0
    """Redis re-delivers a message unacknowledged this long; no message is scheduled beyond it."""
    sweep_interval: float = 5.0
    """Seconds between the sweeps a worker runs in the background (0: none; run `qbgw sweep`)."""
    sweep_grace: float = 60.0
    """A queued job whose message has not started it after this many seconds is re-announced."""
    heap_trim_interval: float = 30.0
    """Seconds between handing the allocator's free heap back to the OS in each worker (0: never)."""
    # --- Workers and queues ---
    concurrency: int = 32
    """Worker threads per process: about (calls per second) x (upstream latency)."""
    pool: str = "threads"
    """The worker pool: `threads` (the default), `prefork` or `solo`; `gevent` is refused (see Performance)."""
    db_pool_size: int = 0
    """Database connections each worker process keeps open (0: one per thread, i.e. the concurrency, for threads; 1
    per prefork child). PostgreSQL must allow workers x this + a few per worker."""
    queue: str = "qbgw"
    """The Celery queue for interactive jobs."""
    batch_queue: str = ""
    """Batch jobs wait here; workers take interactive jobs first (empty: "<queue>-batch")."""
    actor: str = ""
    """Who a producer is in the audit trail when the caller names nobody (at most 128 characters, no controls, not
    only spaces)."""
    assistant_id: str = ""
    """The smart_chat_assistant_id `qbgw submit` uses when none is given."""
    # --- Encryption and the audit trail ---
    encryption_keys: Secret = field(default_factory=lambda: Secret(""))
    """Keys for PHI at rest: "kid1:base64key,kid2:base64key", the first encrypts; empty: the keyring file."""
    keyring_file: str = ""
    """The keyring file (rotated by `qbgw keys rotate`); empty: keyring.json in the data directory."""
    anchor_key: Secret = field(default_factory=lambda: Secret(""))
    """Signs the audit chain's anchors (HMAC-SHA256; at least 32 characters); empty: a key generated in the data
    directory."""
    subject_key: Secret = field(default_factory=lambda: Secret(""))
    """Keys the blind index of a job's subject (HMAC-SHA256; at least 32 characters, not the PHI key); empty: a key
    generated in the data directory (embedded default only: PostgreSQL needs it set)."""
    audit_anchor_file: str = ""
    """Where signed chain heads are appended, outside the database; empty: in the data directory."""
    audit_anchor_events: int = 1000
    """An anchor (the chain head, signed, appended to the anchor file) is written at least every this many audit
    events."""
    audit_anchor_seconds: float = 60.0
    """An anchor is also written at least every this many seconds (by each worker's sweeper), even when idle."""
    audit_seal: str = "commit"
    """How audit events join the chain: "commit" (each transaction's at its COMMIT, under the chain head's lock)
    or "block" (PostgreSQL: staged without the lock, chained by each worker's sealer in blocks, every
    QBGW_AUDIT_SEAL_INTERVAL; for fleets whose commits the one lock would cap; see docs/audit.md)."""
    audit_seal_interval: float = 0.2
    """Block sealing: seconds between a worker's sealer runs (staged events wait at most about this long)."""
    audit_retention_days: int = 2190
    """Audit events younger than this many days can never be dropped (HIPAA: six years)."""
    # --- QuickBlox authentication (see worker/auth.py) ---
    auth: str = "static"
    """How workers get a QB-Token: static (QBGW_TOKEN), application, user, or apikey."""
    application_id: str = ""
    """The QuickBlox application id, for `application` and `user` sessions."""
    auth_key: str = ""
    """The application's auth key, for `application` and `user` sessions."""
    auth_secret: Secret = field(default_factory=lambda: Secret(""))
    """The application's auth secret (or `@file`), for `application` and `user` sessions."""
    user_login: str = ""
    """The user of a `user` session."""
    user_password: Secret = field(default_factory=lambda: Secret(""))
    """The password of a `user` session (or `@file`)."""
    api_key: Secret = field(default_factory=lambda: Secret(""))
    """A server-side API key, sent as "Authorization: ApiKey ..." (unverified for the AI gateway)."""
    session_renew_margin: float = 300.0
    """A session is renewed this many seconds before the expiry the server announces."""
    # --- Images and documents by reference (see worker/images/) ---
    image_roots: str = ""
    """Local folders image and PDF references may point into (os.pathsep-separated); empty: none."""
    fetch_remote_images: bool = False
    """Fetch https:// images in the worker and send them inline (SSRF-guarded), instead of as URLs."""
    fetch_max_bytes: int = 50 * 1024 * 1024
    """The largest remote image fetched, in bytes."""
    fetch_timeout: float = 20.0
    """The longest one remote image fetch may take, in seconds."""
    max_image_pixels: int = 100_000_000
    """Largest image in pixels (width x height), against decompression bombs."""
    max_request_bytes: int = MAX_REQUEST_BYTES
    """The most text one request may carry (UTF-8 bytes of its strings, inline data URIs included), checked before
    anything is copied: one 50 MiB image as base64 (66.7 MiB) plus 5.3 MiB of text."""
    pdf_max_pages: int = 10
    """The most PDF pages rendered per document (each becomes a PNG image part)."""
    pdf_dpi: float = 110.0
    """The resolution PDF pages are rendered at (dots per inch)."""
    # --- Webhooks of qbgw serve (see docs/webhooks.md) ---
    webhooks_development: bool = False
    """Allow http:// and private or loopback webhook URLs (a receiver on this machine): development and tests only."""
    webhook_backoff: float = 5.0
    """The first wait before a failed webhook delivery is tried again, in seconds; it doubles, up to an hour."""
    webhook_retry_window: float = 86400.0
    """How long a webhook delivery is retried, in seconds from its event, before it is marked failed."""
    # --- The browser console of qbgw serve, /console (see docs/console.md) ---
    console_idle_timeout: float = 900.0
    """A console session idle this many seconds is signed out (HIPAA 164.312(a)(2)(iii): 15 minutes)."""
    console_max_failures: int = 5
    """Failed console sign-ins in a row before a user is locked out (a source address: 4 times as many)."""
    console_lockout: float = 900.0
    """How long a locked-out console user, or source address, is refused, in seconds."""
    console_behind_tls: bool = False
    """The server is reached over TLS through a proxy: the console's cookie is marked Secure even over plain HTTP."""
    trusted_proxies: str = ""
    """Proxies in front of qbgw serve whose X-Forwarded-For and X-Forwarded-Proto are believed: comma-separated
    addresses or networks ("127.0.0.1", "10.0.0.0/8"); empty: none, a client's address is its TCP peer's."""
    # --- One rate limit for the fleet (see worker/ratelimit.py) ---
    rate_limit: float = 0.0
    """Upstream calls per second for every worker together (gateway and session creation); 0: no limit."""
    rate_burst: int = 1
    """Calls that may go at once after a quiet spell; any one-second window holds at most limit + burst - 1."""
    rate_limit_per_assistant: float = 0.0
    """A budget of calls per second for each assistant, under the global one; 0: none."""
    rate_limit_assistants: str = ""
    """Budgets for named assistants: "ASSISTANT_ID=CALLS_PER_SECOND,..." (over the per-assistant one)."""
    rate_max_sleep: float = 1.0
    """The longest a worker thread sleeps for its slot; a job that must wait longer is rescheduled."""
    rate_cooldown: float = 2.0
    """After a 429 without `Retry-After`, every worker pauses this many seconds, doubled for each 429 in a row (up
    to `QBGW_RATE_COOLDOWN_MAX`)."""
    rate_cooldown_max: float = 60.0
    """The longest pause after 429s in a row, in seconds."""
    rate_scope: str = ""
    """The budget's name, shared by every worker that uses it; empty: one per upstream and application."""
    # --- Operations (see worker/metrics.py, worker/logs.py, worker/health.py) ---
    metrics_port: int = 0
    """The port each `qbgw worker` serves Prometheus metrics on (/metrics); 0: no endpoint."""
    metrics_host: str = "127.0.0.1"
    """The address that endpoint (and `qbgw metrics serve`) binds; 0.0.0.0 in a container."""
    log_format: str = "auto"
    """Log lines as "json" (one object per line), "text" (for people), or "auto": text on a terminal."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``QBGW_*`` variables (``os.environ`` by default).

        Raises:
            ConfigError: a variable is set but cannot be parsed, or a value is out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, f.type)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``QBGW_*`` variables that rebuild these settings in a child process (secrets
        revealed: for a child's environment only, never for printing)."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            env[PREFIX + f.name.upper()] = value.reveal() if isinstance(value, Secret) else str(value)
        return env

    def __post_init__(self) -> None:
        # Every Settings is valid, however it was made: from_env, with_, or the constructor in a caller's code.
        self.validate()

    def __repr__(self) -> str:
        # The dataclass's own, but a URL's password blotted out, as a secret's value is (Secret's repr).
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in URLS_WITH_CREDENTIALS and (password := _url_password(value)):
                value = value.replace(f":{password}@", ":***@", 1)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated, as every Settings is)."""
        return replace(self, **changes)

    def validate(self) -> None:
        """Raises ConfigError for values of the wrong type or out of range."""
        self._check_types()
        self._check_ranges()
        self._check_texts()
        if self.visibility_timeout <= self.lease_seconds:
            raise ConfigError(
                f"{PREFIX}VISIBILITY_TIMEOUT ({self.visibility_timeout:g}s) must exceed an attempt's lease "
                f"({self.lease_seconds:g}s = connect + read timeout + lease margin), or Redis would re-deliver "
                "a message whose attempt is still running"
            )
        if self.rate_max_sleep > self.lease_margin / 2:
            raise ConfigError(
                f"{PREFIX}RATE_MAX_SLEEP ({self.rate_max_sleep:g}s) must be at most half of {PREFIX}LEASE_MARGIN "
                f"({self.lease_margin:g}s): a claimed job waits at most that half for its slot in the rate limit, "
                "so a job admitted to sleep longer would be held back unsent and rescheduled every time"
            )
        if self.pool == "gevent":
            raise ConfigError(GEVENT_REFUSED)
        for name, allowed in (
            ("auth", ("static", "application", "user", "apikey")),
            ("pool", ("threads", "prefork", "solo")),
            ("log_format", ("auto", "json", "text")),
            ("audit_seal", ("commit", "block")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{PREFIX}{name.upper()} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        try:
            self.assistant_rates  # noqa: B018 - parsed now, so a typo fails at start, not at the first job
        except ValueError as exc:
            raise ConfigError(f"{PREFIX}RATE_LIMIT_ASSISTANTS: {exc}") from None
        if self.audit_seal == "block" and not self.effective_database_url.startswith("postgresql"):
            raise ConfigError(
                f"{PREFIX}AUDIT_SEAL=block needs PostgreSQL ({PREFIX}DATABASE_URL=postgresql+psycopg://...): "
                "it lifts the one chain-head lock that a fleet's commits share, and SQLite writes one transaction "
                f"at a time anyway; use {PREFIX}AUDIT_SEAL=commit"
            )
        self.trusted_proxy_list  # noqa: B018 - parsed now, so a typo fails at start
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{PREFIX}BASE_URL must start with http:// or https://; got {self.base_url!r}")
        self._check_coordination()

    def _check_coordination(self) -> None:
        """A fleet-wide rate limit or a shared session needs a place every worker shares: refused, not
        weakened to one per process, when there is none (a RabbitMQ broker and no QBGW_REDIS_URL)."""
        if self.redis_url and not self.redis_url.startswith(REDIS_SCHEMES):
            raise ConfigError(
                f"{PREFIX}REDIS_URL must be a Redis URL ({', '.join(REDIS_SCHEMES)}...); "
                f"got {_describe(self.redis_url)}"
            )
        if self.coordination_url or self.is_embedded_broker:
            return
        needs = [f"{PREFIX}{name.upper()}" for name in _SHARED_BY_THE_FLEET if getattr(self, name) not in ("", 0, 0.0)]
        if self.auth in ("application", "user"):
            needs.append(f"{PREFIX}AUTH={self.auth} (one QuickBlox session for every worker)")
        if needs:
            raise ConfigError(
                f"{', '.join(needs)} must hold for the whole fleet, but the broker ({_describe(self.broker_url)}) is "
                "neither Redis nor the filesystem, so the workers share no state: each process would keep its own "
                f"limit (10 workers would send 10 times the plan) and its own session. Set {PREFIX}REDIS_URL to a "
                "Redis every worker reaches (redis://host:6379/0); the broker may stay as it is"
            )

    def _check_texts(self) -> None:
        if self.subject_key and len(self.subject_key.reveal().strip()) < MIN_SUBJECT_KEY_CHARS:
            raise ConfigError(
                f"{PREFIX}SUBJECT_KEY: must be at least {MIN_SUBJECT_KEY_CHARS} characters (e.g. openssl rand -hex 32)"
            )
        if len(self.actor) > 128 or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in self.actor):
            raise ConfigError(f"{PREFIX}ACTOR must be at most 128 characters, without control characters")
        if self.actor and not self.actor.strip():  # an audit event's "who" that shows nothing
            raise ConfigError(f"{PREFIX}ACTOR must not be only whitespace (leave it empty for the default)")
        if self.anchor_key and len(self.anchor_key.reveal().strip()) < MIN_SUBJECT_KEY_CHARS:
            raise ConfigError(
                f"{PREFIX}ANCHOR_KEY: must be at least {MIN_SUBJECT_KEY_CHARS} characters (e.g. openssl rand -hex 32): "
                "it signs the audit chain's anchors"
            )
        if self.subject_key and self.subject_key.reveal().strip() in self._phi_key_spellings():
            raise ConfigError(
                f"{PREFIX}SUBJECT_KEY must not be the PHI key ({PREFIX}ENCRYPTION_KEYS) in any spelling: a key of "
                "its own, so that one leaked key does not give both"
            )
        if self.batch_queue and self.batch_queue == self.queue:
            raise ConfigError(
                f"{PREFIX}BATCH_QUEUE must differ from {PREFIX}QUEUE ({self.queue!r}): batches wait behind interactive "
                "jobs only in a queue of their own"
            )
        if self.rate_cooldown > self.rate_cooldown_max:
            raise ConfigError(
                f"{PREFIX}RATE_COOLDOWN ({self.rate_cooldown:g}s) must be at most {PREFIX}RATE_COOLDOWN_MAX "
                f"({self.rate_cooldown_max:g}s)"
            )
        scheme = self.broker_url.partition("://")[0].lower() if "://" in self.broker_url else ""
        if self.broker_url and scheme not in BROKER_SCHEMES:
            raise ConfigError(
                f"{PREFIX}BROKER_URL must be a Redis or RabbitMQ URL ({', '.join(s + '://' for s in BROKER_SCHEMES)}), "
                f"or empty for the embedded broker; got {_describe(self.broker_url)}"
            )
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ConfigError(f"{PREFIX}DATA_DIR ({self.data_dir}) is a file; it must be a directory (made if missing)")

    def _phi_key_spellings(self) -> set[str]:
        """QBGW_ENCRYPTION_KEYS whole, and each of its keys as written (base64), decoded as hex, and as it was."""
        raw = self.encryption_keys.reveal().strip()
        spellings = {raw} if raw else set()
        for part in raw.split(","):
            written = part.partition(":")[2].strip()
            if not written:
                continue
            spellings.add(written)
            try:
                decoded = base64.b64decode(written, validate=True)
            except ValueError:
                continue
            spellings.update({decoded.hex(), decoded.hex().upper()})
        return spellings

    def _check_types(self) -> None:
        """A value of another type than its field's (``Settings(max_attempts="3")``) is refused by name, not met
        later as a TypeError in a comparison, or stored as it came."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and f.type in ("Path", "Secret"):  # a path or a secret given as text
                value = Path(value) if f.type == "Path" else Secret(value)
                object.__setattr__(self, f.name, value)
            accepted = _TYPES[str(f.type)]
            if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
                names = " or ".join(kind.__name__ for kind in accepted)
                raise ConfigError(
                    f"{PREFIX}{f.name.upper()} (Settings.{f.name}) must be {names}, got {type(value).__name__}"
                )

    def _check_ranges(self) -> None:
        for f in fields(self):  # bounds every number shares: a database column, a timedelta, a sleep can take it
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{PREFIX}{f.name.upper()} must be a finite number; got {value!r}")
            if abs(value) > MAX_NUMBER:
                raise ConfigError(f"{PREFIX}{f.name.upper()} must be at most {MAX_NUMBER:,}; got {value:g}")
        for names, least, above, words in _RANGES:
            for name in names:
                value = getattr(self, name)
                if value < least or (above and value == least):
                    raise ConfigError(f"{PREFIX}{name.upper()} must be {words}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"{PREFIX}METRICS_PORT must be a TCP port (1-65535), or 0 for no endpoint")

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts, base=self.backoff_base, cap=self.backoff_max, deadline=self.retry_deadline
        )

    @property
    def effective_db_pool_size(self) -> int:
        """Pooled database connections per process: a connection for each task that can run at once, so no
        steady-state reconnects (a prefork child runs one task at a time)."""
        if self.db_pool_size:
            return self.db_pool_size
        return self.concurrency if self.pool == "threads" else 1

    @property
    def lease_seconds(self) -> float:
        """How long a claim holds a job: longer than any call can take."""
        return self.connect_timeout + self.read_timeout + self.lease_margin

    @property
    def countdown_limit(self) -> float:
        """The longest wait handed to the broker as a countdown; longer waits are kept in the
        database and dispatched by the sweeper (a Redis countdown past the visibility timeout
        runs the task twice)."""
        return min(300.0, self.visibility_timeout / 4)

    @cached_property
    def assistant_rates(self) -> Mapping[str, float]:
        """QBGW_RATE_LIMIT_ASSISTANTS parsed (raises ValueError naming a bad entry)."""
        return parse_assistant_rates(self.rate_limit_assistants)

    @property
    def image_root_paths(self) -> tuple[Path, ...]:
        return tuple(Path(p).expanduser() for p in self.image_roots.split(os.pathsep) if p.strip())

    @property
    def trusted_proxy_list(self) -> list[str]:
        """``trusted_proxies`` as a list, each an address or a network (ConfigError for anything else)."""
        found = []
        for entry in (e.strip() for e in self.trusted_proxies.split(",")):
            if not entry:
                continue
            try:
                ipaddress.ip_network(entry) if "/" in entry else ipaddress.ip_address(entry)
            except ValueError:
                raise ConfigError(
                    f"{PREFIX}TRUSTED_PROXIES: {entry[:64]!r} is not an IP address or network; give addresses or "
                    'networks, comma-separated ("127.0.0.1,10.0.0.0/8"; a network without host bits: 10.0.0.0/8, '
                    "not 10.0.0.1/8)"
                ) from None
            found.append(entry)
        return found

    @property
    def effective_batch_queue(self) -> str:
        return self.batch_queue or f"{self.queue}-batch"

    @property
    def queues(self) -> tuple[str, str]:
        """The queues a worker consumes, the interactive one first (it is asked first)."""
        return self.queue, self.effective_batch_queue

    def queue_for(self, *, in_batch: bool) -> str | None:
        """Where a job's message goes: a batch's job to the batch queue, behind interactive ones (None: the
        app's default, the interactive queue)."""
        return self.effective_batch_queue if in_batch else None

    @property
    def keyring_path(self) -> Path:
        return Path(self.keyring_file) if self.keyring_file else self.data_dir / "keyring.json"

    @property
    def anchor_path(self) -> Path:
        return Path(self.audit_anchor_file) if self.audit_anchor_file else self.data_dir / "audit-anchors.jsonl"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'qbgw.db'}"

    @property
    def effective_listen_url(self) -> str:
        """Where a process LISTENs for jobs' ends: QBGW_LISTEN_DATABASE_URL, else the database."""
        return self.listen_database_url or self.effective_database_url

    @property
    def effective_broker_url(self) -> str:
        # An explicit host keeps kombu from warning "No hostname was supplied".
        return self.broker_url or "filesystem://localhost/"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def is_embedded_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")

    @property
    def coordination_url(self) -> str:
        """The Redis the workers share their rate limit, 429 cooldown and session in: QBGW_REDIS_URL, else the
        broker when it is Redis; empty when there is none (the embedded default shares files instead)."""
        if self.redis_url:
            return self.redis_url
        broker = self.effective_broker_url
        return broker if broker.startswith(REDIS_SCHEMES) else ""

    @property
    def secret_values(self) -> tuple[str, ...]:
        """Every secret these settings hold, revealed, for the log filter to blot out: whole values,
        each key of QBGW_ENCRYPTION_KEYS, and the password of a database or broker URL."""
        found = [v.reveal() for f in fields(self) if isinstance(v := getattr(self, f.name), Secret) and v]
        found += [part.partition(":")[2] for part in self.encryption_keys.reveal().split(",")]
        urls = [getattr(self, name) for name in URLS_WITH_CREDENTIALS]
        found += [_url_password(url) for url in urls]
        return tuple(sorted({s.strip() for s in found if len(s.strip()) >= 6}, key=len, reverse=True))


@dataclass(frozen=True)
class Documented:
    """One setting as the configuration reference shows it."""

    variable: str
    kind: str
    default: str
    meaning: str
    section: str


_KINDS = {
    "str": "text",
    "int": "integer",
    "float": "number",
    "bool": "true/false",
    "Path": "path",
    "Secret": "secret (text, or `@file`)",
}


def reference() -> list[Documented]:
    """Every setting in declaration order: its variable, type, default and meaning (the attribute docstring
    under its field), and the section it is declared in (a ``# --- Section ---`` comment above it)."""
    source = inspect.getsource(Settings)
    tree = ast.parse(textwrap.dedent(source))
    lines = textwrap.dedent(source).splitlines()
    body = tree.body[0].body  # type: ignore[attr-defined]
    defaults = {f.name: f for f in fields(Settings)}
    found, section, seen_line = [], "General", 0
    for node, after in zip(body, [*body[1:], None], strict=True):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        for text in lines[seen_line : node.lineno - 1]:
            if text.strip().startswith("# ---"):
                section = text.strip().strip("# -").split(" (")[0]
        seen_line = node.lineno
        doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
        name = node.target.id
        found.append(
            Documented(
                PREFIX + name.upper(),
                "URL (text, or `@file`)"
                if name in URLS_WITH_CREDENTIALS
                else _KINDS.get(ast.unparse(node.annotation), "text"),
                _shown_default(defaults[name]),
                " ".join(str(doc).split()),
                section,
            )
        )
    return found


def _shown_default(f: Any) -> str:
    if f.name == "data_dir":  # from the environment of whoever builds the page: show the documented default
        return "`~/.local/share/qbgw`"
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if isinstance(value, Secret):
        value = value.reveal()
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        return f"`{'~' + text[len(home) :] if text.startswith(home) else text}`"
    if value == "" or value is None:
        return "(empty)"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value:_}`".replace("_", ",") if isinstance(value, int) and value >= 10_000 else f"`{value}`"


def reference_markdown() -> str:
    """The configuration reference as Markdown tables, one per section (``docs/configuration.md`` holds it; a
    test fails when they drift)."""
    out: list[str] = []
    sections: dict[str, list[Documented]] = {}
    for item in reference():
        sections.setdefault(item.section, []).append(item)
    for section, items in sections.items():
        out += [f"### {section}", "", "| variable | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{i.variable}` | {i.kind} | {i.default} | {i.meaning.replace('|', '&#124;')} |" for i in items]
        out.append("")
    return "\n".join(out)


def prometheus_multiproc_dir() -> Path | None:
    """prometheus_client's own ``PROMETHEUS_MULTIPROC_DIR`` (it reads the variable itself; this says
    whether it will): set, every process writes its metrics to files there, aggregated at a scrape."""
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


_ASSISTANT = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def parse_assistant_rates(raw: str) -> Mapping[str, float]:
    """``"id1=10,id2=2.5"`` → {id: calls per second}. Raises ValueError naming the bad entry."""
    rates: dict[str, float] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = entry.partition("=")
        try:
            rate = float(value) if sep and name.strip() else -1.0
        except ValueError:
            rate = -1.0
        if rate < 0 or not math.isfinite(rate):
            raise ValueError(f"{entry!r} is not ASSISTANT_ID=CALLS_PER_SECOND (a number >= 0)")
        if not _ASSISTANT.fullmatch(name.strip()):
            raise ValueError(f"{name.strip()[:64]!r} is not an assistant id (letters, digits, _ . : -)")
        if name.strip() in rates:
            raise ValueError(f"{name.strip()!r} is given twice")
        rates[name.strip()] = rate
    return rates


def _url_password(url: str) -> str:
    # scheme://user:password@host/...; no parsing library: a wrong guess only redacts too little.
    netloc = url.partition("://")[2].partition("/")[0]
    userinfo = netloc.rpartition("@")[0]
    return userinfo.partition(":")[2]


#: The URLs that may carry a password: like a secret, "@/run/secrets/database_url" reads one from a file.
URLS_WITH_CREDENTIALS = ("database_url", "listen_database_url", "broker_url", "redis_url")


def _parse(name: str, raw: str, kind: Any) -> Any:
    var = PREFIX + name.upper()
    kind = str(kind)
    try:
        if kind == "Path":
            return Path(raw).expanduser()
        if kind == "Secret":
            return Secret(_read_secret(var, raw))
        if name in URLS_WITH_CREDENTIALS:  # its password is a secret too: it may come from a file
            url = _read_secret(var, raw)
            if not url:  # not the empty default (SQLite, the filesystem broker) by a mistake in a file
                raise ConfigError(f"{var}: secret file {raw[1:]} is empty; it must hold the URL")
            return url
        if kind in ("float", "int"):
            return _number(raw, kind)
        if kind == "bool":
            return _bool(var, raw)
    except ValueError:
        raise ConfigError(f"{var} must be {'an' if kind == 'int' else 'a'} {kind}; got {raw!r}") from None
    return raw


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number(raw: str, kind: str) -> int | float:
    """An int or a float as people write one in ASCII (not Python's "5_0", full-width digits, inf or nan)."""
    if not (_INTEGER if kind == "int" else _DECIMAL).fullmatch(raw.strip()):
        raise ValueError(raw)
    value = int(raw) if kind == "int" else float(raw)
    if not math.isfinite(value):  # 1e999
        raise ValueError(raw)
    return value


def _bool(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var} must be true or false; got {raw!r}")


def _read_secret(var: str, raw: str) -> str:
    # "@/run/secrets/qb_token" reads the secret from a file, as docker secrets mount it.
    if raw.startswith("@"):
        try:
            return Path(raw[1:]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{var}: cannot read secret file {raw[1:]}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{var}: secret file {raw[1:]} is not UTF-8 text") from None
    return raw

"""Health: is each thing a worker depends on there? (``qbgw health``, container health checks.)

Each check runs on its own short timeout and says one line: what it found, or what is wrong and
what to do. Nothing is created on the way (no database file, no key, no anchor key) and nothing
is printed of a secret. The upstream is probed with a request the gateway must refuse (an empty
message list): it costs no AI call, yet passes the token and feature checks first, so a 401 or a
405 is told apart from "reachable and authenticated".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import redis

from .. import errors
from ..audit.anchors import last_anchor
from ..audit.crypto import open_keyring
from ..runtime.app import backlog, create_celery_app, ping_broker
from ..settings import PREFIX, Settings
from ..store import schema
from ..store.db import describe_url
from ..store.reads import key_ids_in_use
from ..upstream.auth import token_provider
from ..upstream.gateway import GatewayClient

__all__ = ["CHECKS", "Check", "PROBE_BODY", "check_health"]

#: What ``qbgw health`` checks, in this order (each can be skipped by name).
CHECKS = ("database", "broker", "upstream", "audit", "keys")

#: Valid JSON the gateway rejects after authenticating the caller and checking the feature switch.
PROBE_BODY = b'{"smart_chat_assistant_id":"","messages":[]}'

#: Statuses that refuse the probe's body: the caller got past authentication and the feature switch.
_PROBE_REFUSED = (400, 404, 422)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    #: What was found (ok), or what is wrong.
    detail: str
    #: What to do about it (only when not ok).
    fix: str = ""
    #: It failed because a setting is wrong (a malformed QBGW_ENCRYPTION_KEYS), not a dependency: exit 7, not 10.
    settings_wrong: bool = False

    def line(self) -> str:
        text = f"{'ok  ' if self.ok else 'FAIL'} {self.name:<9} {self.detail}"
        return text + (f"; fix: {self.fix}" if self.fix and not self.ok else "")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_health(
    settings: Settings, *, skip: Iterable[str] = (), timeout: float = 5.0, max_checkpoint_age: float | None = None
) -> list[Check]:
    """Run every check not in ``skip``; each returns a Check.

    Raises:
        ConfigError: the database's or the broker's URL is unusable (the settings are wrong).
    """
    quick = settings.with_(
        connect_timeout=min(settings.connect_timeout, timeout), read_timeout=min(settings.read_timeout, timeout)
    )
    runs: dict[str, Callable[[], Check]] = {
        "database": lambda: _database(quick, timeout),
        "broker": lambda: _broker(quick, timeout),
        "upstream": lambda: _upstream(quick),
        "audit": lambda: _audit(quick, max_checkpoint_age),
        "keys": lambda: _keys(quick, timeout, skip_database="database" in set(skip)),
    }
    results = []
    for name in CHECKS:
        if name in set(skip):
            continue
        try:
            results.append(runs[name]())
        except Exception as exc:  # a check must say what broke, not crash the report
            if isinstance(exc, errors.ConfigError) and name in ("database", "broker"):
                raise  # its URL is unusable: the settings are wrong (exit 7), not the service
            first = (str(exc).strip().splitlines() or [""])[0]  # one line (a driver's error can hold the SQL)
            results.append(Check(name, False, f"the check itself failed: {type(exc).__name__}: {first}"))
    return results


def _database(settings: Settings, timeout: float) -> Check:

    url = settings.effective_database_url
    where = describe_url(url)
    if not settings.database_url and not (settings.data_dir / "qbgw.db").exists():
        return Check("database", True, f"{where} not created yet: the first worker or command creates and migrates it")
    try:
        current, head = schema.probe(url, timeout=timeout)
    except errors.StoreUnavailable as exc:
        return Check("database", False, str(exc), f"is the database running and {PREFIX}DATABASE_URL right?")
    if current != head:
        return Check(
            "database", False, f"{where} is at revision {current or 'none'}, not {head}", "run `qbgw db upgrade`"
        )
    return Check("database", True, f"{where} reachable, schema at {head}")


def _broker(settings: Settings, timeout: float) -> Check:

    app = create_celery_app(settings)
    try:
        ping_broker(app, timeout=timeout)
        queues = settings.queues
        depths = [f"{backlog(app, q, unknown_queue=0)} waiting in {q}" for q in queues]
    except errors.BrokerUnavailable as exc:
        return Check("broker", False, str(exc), f"is the broker running and {PREFIX}BROKER_URL right?")
    finally:
        app.close()
    if settings.redis_url:  # the fleet's shared state, apart from the broker
        where = describe_url(settings.redis_url)
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.ping()
        except redis.RedisError as exc:
            return Check(
                "broker",
                False,
                f"cannot reach the fleet's Redis {where} ({type(exc).__name__}: {exc})",
                f"is that Redis running and {PREFIX}REDIS_URL right?",
            )
        finally:
            client.close()
        depths.append(f"shared state in {where}")
    return Check("broker", True, f"reachable: {', '.join(depths)}")


def _upstream(settings: Settings) -> Check:

    base = settings.base_url
    client = GatewayClient(
        base,
        token_provider(settings, _keyring_or_none(settings)),
        timeout=(settings.connect_timeout, settings.read_timeout),
        pool_size=1,
    )
    try:
        exchange = client.send(PROBE_BODY)
    finally:
        client.close()
    error, status = exchange.error, exchange.status
    if status in _PROBE_REFUSED and error is not None and not error.reasons:
        return Check(
            "upstream",
            False,
            f'{base} answered HTTP {status} to the probe, but not as the gateway does (no {{"errors": [...]}}): '
            "something else answers there",
            f"check {PREFIX}BASE_URL: the QuickBlox API's base (requests go to {{base}}/ai/ai_extensions/ai_gateway)",
        )
    if error is None or status in _PROBE_REFUSED:
        return Check(
            "upstream",
            True,
            f"{base} reachable, credentials accepted, gateway feature on "
            f"(HTTP {status} to the probe, {exchange.latency_ms} ms)",
        )
    if status == 405:
        return Check(
            "upstream",
            False,
            f"{base} answered HTTP 405: the AI gateway feature is off for this application (a plan change?)",
            "turn the HIPAA AI Gateway on for the application (QuickBlox dashboard or support); "
            "then `qbgw failed` and `qbgw replay` the jobs that failed with FeatureDisabled",
        )
    if status in (401, 403) or (status is None and isinstance(error, errors.PermanentGatewayError)):
        return Check(
            "upstream",
            False,
            f"{base} refused the credentials: {error}",
            f"a {PREFIX}TOKEN expires 2 hours after its last use: set a fresh one, or use "
            f"{PREFIX}AUTH=application or user; `qbgw auth check` says more",
        )
    return Check(
        "upstream",
        False,
        f"{base} is unreachable or failing: {error}",
        f"check {PREFIX}BASE_URL and the network; jobs meanwhile are retried with backoff",
    )


def _keyring_or_none(settings: Settings) -> Callable[[], Any] | None:
    """The shared session cache needs the keyring; without one the probe makes its own session."""

    try:
        keyring = open_keyring(spec=settings.encryption_keys.reveal(), path=settings.keyring_path, create=False)
    except errors.QbgwError:
        return None
    return lambda: keyring


def _audit(settings: Settings, max_age: float | None) -> Check:

    limit = max_age if max_age is not None else 3 * settings.audit_anchor_seconds + settings.sweep_interval
    anchor = last_anchor(settings.anchor_path)
    writes = (
        f"a worker's sweeper signs one every {PREFIX}AUDIT_ANCHOR_SECONDS ({settings.audit_anchor_seconds:g}s) "
        f"when {PREFIX}SWEEP_INTERVAL > 0; is a worker running, and can it write the file? "
        "(`qbgw audit anchor` signs one now)"
    )
    if anchor is None:
        return Check("audit", False, f"no audit checkpoint (anchor) in {settings.anchor_path}", writes)
    age = time.time() - anchor.timestamp()
    if age > limit:
        return Check("audit", False, f"the last audit checkpoint is {age:.0f}s old (limit {limit:.0f}s)", writes)
    return Check("audit", True, f"last checkpoint {age:.0f}s ago, at event seq {anchor.seq}")


def _keys(settings: Settings, timeout: float, *, skip_database: bool) -> Check:

    where = f"{PREFIX}ENCRYPTION_KEYS" if settings.encryption_keys else str(settings.keyring_path)
    restore = f"restore {where} from its backup (or the secrets manager); stored payloads cannot be read without it"
    if not settings.encryption_keys and not settings.database_url and not settings.keyring_path.exists():
        if not (settings.data_dir / "qbgw.db").exists():
            return Check("keys", True, f"no key yet: the embedded default makes {settings.keyring_path} on first use")
    try:
        keyring = open_keyring(spec=settings.encryption_keys.reveal(), path=settings.keyring_path, create=False)
    except errors.ConfigError as exc:
        wrong = bool(settings.encryption_keys)  # the value given, not a file that went missing
        return Check("keys", False, f"no encryption key: {exc}", restore, settings_wrong=wrong)
    except errors.QbgwError as exc:
        return Check("keys", False, f"no encryption key: {exc}", restore)
    found = f"{len(keyring.key_ids)} key(s) in {where}, primary {keyring.primary}"
    if skip_database:
        return Check("keys", True, found)
    try:
        needed = key_ids_in_use(settings.effective_database_url, timeout=timeout)
    except errors.QbgwError:
        return Check("keys", True, f"{found} (not compared with the database: it cannot be read)")
    missing = sorted(needed - set(keyring.key_ids))
    if missing:
        return Check("keys", False, f"{found}, but stored jobs are encrypted with key(s) {', '.join(missing)}", restore)
    return Check("keys", True, f"{found}; the stored jobs' keys are present")

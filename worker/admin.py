"""Admin: the operator's calls (part of the facade): key rotation and retention, the sweep, the audit chain's
anchors and verification, and a check of the QuickBlox credentials. Each resolves ``settings`` (the
environment when None) into this process's runtime and drives the core.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError as RowCollision

from .audit import events as audit
from .audit.anchors import Anchor, anchor_key, read_anchors, write_anchor
from .audit.crypto import FOLLOW_SECONDS, Keyring
from .audit.verify import VerifyReport
from .errors import ConfigError, JobStateConflict
from .execution.sweeper import SweepReport
from .execution.sweeper import sweep as sweep_once
from .lifecycle import utcnow
from .messages import resolve_actor
from .runtime.locator import runtime
from .settings import Settings
from .store import chain, maintenance, roles
from .store import files as file_store
from .upstream import auth

__all__ = [
    "Rotation",
    "Dropped",
    "rotate_keys",
    "purge_phi",
    "count_by_key",
    "drop_audit_before",
    "sweep",
    "anchor_now",
    "verify_log",
    "head_hash",
    "check_auth",
]

log = logging.getLogger("qbgw.integrity")


@dataclass(frozen=True)
class Rotation:
    old_primary: str
    new_primary: str
    values_reencrypted: int


#: How long after every process has switched keys a rotation still looks for values under the old one: a
#: transaction that encrypted before its process switched may commit this much later (a chunk of 500 jobs
#: of a batch on a loaded database took over the half second the rotation waited before).
LINGER_SECONDS = 5.0


def rotate_keys(*, actor: str = "operator", settings: Settings | None = None, max_passes: int = 20) -> Rotation:
    """Add a new primary key to the keyring file and re-encrypt every stored value to it.

    Every running process that encrypts (producers, workers) switches to the new key within
    ``crypto.FOLLOW_SECONDS``; passes repeat until no value under an older key is left and that
    time and :data:`LINGER_SECONDS` more have passed, so a value another process encrypted just before it
    switched, in a transaction that committed meanwhile (a chunk of a large batch), is re-encrypted too.

    Raises:
        ConfigError: the keys come from QBGW_ENCRYPTION_KEYS (rotate them there), or the
            keyring file cannot be written.
    """
    rt = runtime(settings)
    if rt.settings.encryption_keys:
        raise ConfigError(
            "keys come from QBGW_ENCRYPTION_KEYS: add the new key first in that list and restart; "
            "`qbgw keys rotate` rotates a keyring file"
        )
    current = Keyring.load(rt.settings.keyring_path)
    rotated, new_id = current.with_new_primary()
    rotated.save(rt.settings.keyring_path)
    saved = time.monotonic()
    rt.keyring.reload()
    total = 0
    for _ in range(max_passes):
        done = _reencrypt_pass(settings=rt.settings, key_id=new_id)
        total += done
        settling = FOLLOW_SECONDS + LINGER_SECONDS - (time.monotonic() - saved)
        if done == 0 and settling <= 0:
            break
        if done == 0:  # processes may still encrypt with the old key, or commit what they did, until then
            time.sleep(settling)
    with rt.transaction() as session:
        audit.record(
            session=session,
            action=audit.Action.KEY_ROTATED,
            job_id=None,
            actor=actor,
            detail={"old_primary": current.primary, "new_primary": new_id, "values": total},
        )
    return Rotation(current.primary, new_id, total)


def _reencrypt_pass(*, settings: Settings, key_id: str) -> int:
    rt, changed, after = runtime(settings), 0, ""
    while True:
        with rt.transaction() as session:
            chunk = maintenance.reencrypt_chunk(session, key_id=key_id, after_id=after)
        changed, after = changed + chunk.changed, chunk.last_id
        if chunk.rows < maintenance.CHUNK:
            break
    while True:  # webhook URLs and signing secrets
        with rt.transaction() as session:
            done = maintenance.reencrypt_others(session, key_id=key_id)
        changed += done
        if done == 0:
            return changed


def purge_phi(*, older_than: timedelta, actor: str = "operator", settings: Settings | None = None) -> int:
    """Erase the PHI of finished jobs older than ``older_than`` (finished before now - that), and the content and
    name of files uploaded before then (OpenAI-compatible ``/v1/files``); returns how many jobs and files.

    Status, timestamps and the whole audit trail stay: the chain still verifies, and each
    purge is audited per job (``job.purged``) and per file (``file.purged``).
    """
    rt = runtime(settings)
    cutoff, purged = utcnow() - older_than, 0
    while True:
        with rt.transaction() as session:
            done = maintenance.purge_chunk(session, cutoff=cutoff, actor=actor)
        if not done:
            break
        purged += done
    while True:
        with rt.transaction() as session:
            done = file_store.purge_chunk(session, cutoff=cutoff, actor=actor, now=utcnow())
        if not done:
            return purged
        purged += done


def count_by_key(*, settings: Settings | None = None) -> dict[str, int]:
    """How many stored values each key id encrypts (rotation progress)."""
    with runtime(settings).transaction() as session:
        return maintenance.count_by_key(session)


@dataclass(frozen=True)
class Dropped:
    through_seq: int
    events: int


def drop_audit_before(*, before: datetime, actor: str = "operator", settings: Settings | None = None) -> Dropped:
    """Drop the audit events that occurred before ``before``, which must be older than the
    retention period. The chain stays verifiable: the last dropped event's hash is signed into
    the anchor file as the chain's new base before anything is deleted. Needs the database
    owner (the append-only triggers are lifted for this one transaction).

    Raises:
        JobStateConflict: ``before`` is within the retention period (QBGW_AUDIT_RETENTION_DAYS).
        ConfigError: on PostgreSQL, the connected role does not own ``audit_events`` (an application role).
    """
    rt = runtime(settings)
    limit = utcnow() - timedelta(days=rt.settings.audit_retention_days)
    if before > limit:
        raise JobStateConflict(
            f"refused: audit events younger than {rt.settings.audit_retention_days} days "
            f"(after {limit.date()}) are kept; QBGW_AUDIT_RETENTION_DAYS sets the period"
        )
    with rt.transaction() as session:
        roles.require_owner(session, table="audit_events", command="qbgw audit drop")  # before the base anchor
        last = maintenance.last_before(session, before)
        if last is None:
            return Dropped(0, 0)
        write_anchor(rt.settings, *last, kind="base")
        count = maintenance.delete_through(session, last[0])
        audit.record(
            session=session,
            action=audit.Action.AUDIT_DROPPED,
            job_id=None,
            actor=actor,
            detail={"through_seq": last[0], "events": count, "before": before.isoformat()},
        )
    return Dropped(last[0], count)


def sweep(*, settings: Settings | None = None, grace: float | None = None) -> SweepReport:
    """One sweep, as every worker runs in the background: recover interrupted attempts, publish what needs
    publishing (``grace``: how late a message may be before it counts as lost; QBGW_SWEEP_GRACE when None),
    expire batches past their window.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    return sweep_once(runtime(settings), grace=grace)


def head_hash(settings: Settings | None = None) -> str:
    """The chain's last hash (tests and tools)."""
    rt = runtime(settings)
    rt.chain_staged()
    with rt.transaction() as session:
        return chain.head(session)[1]


def verify_log(
    *,
    reader: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    settings: Settings | None = None,
) -> VerifyReport:
    """Verify the whole audit log against the anchor file; the verification is audited. ``progress(checked,
    total)`` is called as events are read (every few thousand, and at the end).

    Raises:
        StoreUnavailable: the database cannot be reached.
        ConfigError: the anchor key cannot be read or made.
    """
    rt = runtime(settings)
    anchors = read_anchors(rt.settings.anchor_path)
    key = anchor_key(rt.settings)
    rt.chain_staged()  # events staged for the block sealer are chained first: the walk holds no lock
    with rt.transaction() as session:
        report = chain.verify(session, anchors, key, progress)
    outcome = "intact" if report.ok else "tampered"
    detail: dict[str, int | None] = {"events": report.events, "anchors": report.anchors}
    if report.problem is not None:
        detail["first_bad_seq"] = report.problem.seq
    try:
        with rt.transaction() as session:
            audit.record(
                session=session,
                action=audit.Action.AUDIT_VERIFIED,
                job_id=None,
                actor=resolve_actor(reader, rt.settings.actor, "auditor", "reader"),
                outcome=outcome,
                detail=detail,
            )
    except RowCollision:
        if report.ok:
            raise
        # A row inserted past the head holds the seq the next seal takes: the finding stands, unrecorded.
        log.error("audit verification (%s) could not be recorded: %s", outcome, report.problem)
    return report


def anchor_now(*, settings: Settings | None = None) -> Anchor:
    """Sign the chain's current head and append it to the anchor file.

    Raises:
        StoreUnavailable: the database cannot be reached.
        OSError: the anchor file cannot be written.
    """
    rt = runtime(settings)
    rt.chain_staged()  # the anchor covers every event committed before the call
    with rt.transaction() as session:
        return write_anchor(rt.settings, *chain.head(session))


def check_auth(settings: Settings | None = None) -> auth.AuthReport:
    """Create a session with the configured credentials (a static token: look its session up) and say who
    it is. Nothing is cached or printed of the token but its fingerprint.

    Raises:
        ConfigError: credentials that ``QBGW_AUTH`` needs are missing.
        GatewayError: the session was refused (422 bad signature, 401) or QuickBlox cannot be reached.
    """
    return auth.check_auth(settings or runtime(settings).settings)

"""Integrity: the audit chain's anchors outside the database, and its verification.

A hash chain inside the database proves nothing against someone who can rewrite the whole
database; so the chain head is signed (HMAC-SHA256, a key the database never sees) and appended
to a file outside it, at least every N events and every T seconds. ``verify`` recomputes the
chain, checks every anchor, and names the first event that breaks either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from worker import audit
from worker.errors import ConfigError
from worker.models import GENESIS, AuditChainHead, AuditEvent, utcnow
from worker.settings import Settings

__all__ = [
    "Anchor",
    "Problem",
    "VerifyReport",
    "install_hooks",
    "write_anchor",
    "read_anchors",
    "last_anchor",
    "verify",
    "verify_log",
    "anchor_now",
    "Anchorer",
]

log = logging.getLogger("qbgw.integrity")

_SEALED = "qbgw_sealed"
_file_lock = threading.Lock()


@dataclass(frozen=True)
class Anchor:
    """A signed statement: at ``at``, event ``seq`` of the chain had hash ``row_hash``."""

    seq: int
    row_hash: str
    at: str
    mac: str
    line: int = 0
    #: "head": the chain had this head; "base": events up to ``seq`` were dropped on purpose
    #: (``qbgw audit drop``), and the chain continues from ``row_hash``.
    kind: str = "head"

    def timestamp(self) -> float:
        """``at`` as Unix seconds (0.0 if unreadable)."""
        try:
            return datetime.fromisoformat(self.at).timestamp()
        except ValueError:
            return 0.0

    def message(self) -> bytes:
        tag = "qbgw-anchor-v1" if self.kind == "head" else f"qbgw-anchor-v1|{self.kind}"
        return f"{tag}|{self.seq}|{self.row_hash}|{self.at}".encode()


def install_hooks(factory: sessionmaker[Session], settings: Settings) -> None:
    """Seal audit events just before every commit; anchor the head every N events after it."""

    bind = factory.kw.get("bind")
    if bind is not None:
        audit.install_commit_seal(bind)

    def before_commit(session: Session) -> None:
        session.info[_SEALED] = audit.seal_at_commit(session)

    def after_commit(session: Session) -> None:
        sealed = session.info.pop(_SEALED, None)
        after_seal(settings, sealed.sealed if isinstance(sealed, audit.Staged) else sealed)

    def after_rollback(session: Session) -> None:
        session.info.pop(_SEALED, None)
        audit.discard(session)

    event.listen(factory, "before_commit", before_commit)
    event.listen(factory, "after_commit", after_commit)
    event.listen(factory, "after_rollback", after_rollback)


def after_seal(settings: Settings, sealed: audit.Sealed | None) -> None:
    """A commit added ``sealed`` to the chain: anchor the head if it crossed a multiple of N events."""
    every = settings.audit_anchor_events
    if sealed is not None and sealed.last // every > (sealed.first - 1) // every:
        _anchor_quietly(settings, sealed.last, sealed.row_hash)


def _anchor_quietly(settings: Settings, seq: int, row_hash: str) -> None:
    try:
        write_anchor(settings, seq, row_hash)
    except (OSError, ConfigError) as exc:  # the commit stands; the next anchor covers this one
        log.warning("could not write an audit anchor to %s: %s", settings.anchor_path, exc)


def anchor_key(settings: Settings) -> bytes:
    """The anchor signing key: QBGW_ANCHOR_KEY, or one generated next to the anchor file."""
    if settings.anchor_key:
        return settings.anchor_key.reveal().encode()
    path = settings.anchor_path.with_suffix(".key")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
        log.warning("generated an audit anchor key in %s; production should set QBGW_ANCHOR_KEY", path)
    return path.read_text().strip().encode()


def write_anchor(settings: Settings, seq: int, row_hash: str, *, kind: str = "head") -> Anchor:
    """Append a signed anchor for (seq, row_hash) to the anchor file."""
    at = utcnow().isoformat(timespec="microseconds")
    unsigned = Anchor(seq, row_hash, at, "", kind=kind)
    mac = hmac.new(anchor_key(settings), unsigned.message(), hashlib.sha256).hexdigest()
    fields: dict[str, Any] = {"seq": seq, "row_hash": row_hash, "at": at, "mac": mac}
    if kind != "head":
        fields["kind"] = kind
    line = json.dumps(fields) + "\n"
    path = settings.anchor_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())  # one write of one short line: appends do not interleave
            os.fsync(fd)
        finally:
            os.close(fd)
    return Anchor(seq, row_hash, at, mac, kind=kind)


def read_anchors(path: Path) -> list[Anchor]:
    """Every anchor in the file (none if it does not exist), in file order."""
    if not path.exists():
        return []
    anchors = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        try:
            data = json.loads(text)
            anchors.append(Anchor(int(data["seq"]), str(data["row_hash"]), str(data["at"]), str(data["mac"]), number,
                                  str(data.get("kind", "head"))))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            anchors.append(Anchor(-1, "", "", "", number))  # unreadable: fails its signature check
    return anchors


def last_anchor(path: Path, *, tail: int = 4096) -> Anchor | None:
    """The last anchor in the file, reading only its end (the file grows by a line a minute per worker);
    None if there is none or the last line cannot be read. Its signature is not checked (``verify`` does)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            lines = f.read().splitlines()
    except OSError:
        return None
    for text in reversed(lines):
        if text.strip():
            try:
                data = json.loads(text)
                return Anchor(int(data["seq"]), str(data["row_hash"]), str(data["at"]), str(data["mac"]),
                              kind=str(data.get("kind", "head")))  # fmt: skip
            except (ValueError, KeyError, TypeError):
                return None
    return None


def head(session: Session) -> tuple[int, str]:
    """The chain's last (seq, hash) as the events say (not the head row, which is a cache)."""
    row = session.execute(select(AuditEvent.seq, AuditEvent.row_hash).order_by(AuditEvent.seq.desc()).limit(1)).first()
    return (row.seq, row.row_hash) if row else (0, GENESIS)


def head_hash(settings: Settings) -> str:
    """The chain's last hash (tests and tools; see :func:`head`)."""
    from worker.runtime import runtime

    with runtime(settings).transaction() as session:
        return head(session)[1]


class Anchorer:
    """Writes an anchor every ``audit_anchor_seconds`` even when nothing happens, so that a
    truncated tail cannot hide behind silence (CloudTrail's hourly digests do the same)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._last = 0.0

    def tick(self, session: Session) -> Anchor | None:
        if time.monotonic() - self._last < self.settings.audit_anchor_seconds:
            return None
        self._last = time.monotonic()
        return write_anchor(self.settings, *head(session))


@dataclass(frozen=True)
class Problem:
    """The first thing wrong: ``seq`` is the first bad event (None: the anchor file itself)."""

    seq: int | None
    message: str


@dataclass(frozen=True)
class VerifyReport:
    events: int
    anchors: int
    problem: Problem | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(session: Session, anchors: list[Anchor], key: bytes) -> VerifyReport:
    """Recompute the whole chain in order and check it against ``anchors``."""
    started = time.perf_counter()
    problem = _bad_signature(anchors, key)
    bases = [a for a in anchors if a.kind == "base"]
    base = max(bases, key=lambda a: a.seq) if bases else Anchor(0, GENESIS, "", "")
    by_seq = {a.seq: a for a in anchors if a.kind == "head" and a.seq > base.seq}
    count = 0
    if problem is None:
        starts = session.execute(select(AuditChainHead.v2_from, AuditChainHead.v3_from).where(AuditChainHead.id == 1))
        formats = starts.first() or (1, 1)
        rows = _rows(session, after=base.seq)
        try:
            last_good, problem = _walk(rows, by_seq, base, formats[0], formats[1])
            count = last_good - base.seq
        finally:
            rows.close()  # closes the server-side cursor when the walk stops early
    return VerifyReport(count, len(anchors), problem, time.perf_counter() - started)


def _bad_signature(anchors: list[Anchor], key: bytes) -> Problem | None:
    for anchor in anchors:
        expected = hmac.new(key, anchor.message(), hashlib.sha256).hexdigest()
        if anchor.seq < 0 or not hmac.compare_digest(expected, anchor.mac):
            return Problem(None, f"anchor line {anchor.line} has a bad signature: the anchor file was altered")
    return None


def _rows(session: Session, after: int = 0) -> Generator[Any]:
    columns = [getattr(AuditEvent, name) for name in (*audit.CHAINED, "prev_hash", "row_hash")]
    query = select(*columns).where(AuditEvent.seq > after).order_by(AuditEvent.seq)
    result = session.execute(query.execution_options(yield_per=20_000))
    try:
        yield from result.mappings()
    finally:
        result.close()


def _broken_link(seq: int, skips_one: bool) -> Problem:
    if skips_one:  # seq follows seq - 2 directly: the event between was not in the original chain
        return Problem(seq - 1, f"event seq {seq - 1} was inserted: event seq {seq} follows event seq {seq - 2}")
    return Problem(seq, f"event seq {seq} does not follow event seq {seq - 1}: events were reordered, or one "
                        f"was deleted before it")  # fmt: skip


def _walk(
    rows: Iterator[Any], anchors: dict[int, Anchor], base: Anchor, v2_from: int = 1, v3_from: int = 1
) -> tuple[int, Problem | None]:
    """Walk the chain from ``base`` (the genesis, or the signed end of a deliberate drop); events
    from seq ``v3_from`` on are in format v3, those from ``v2_from`` in v2, those before in v1."""
    prev, before, expected, matched = base.row_hash, "", base.seq + 1, base.seq
    for row in rows:
        seq = row["seq"]
        if seq != expected:
            gap = f"event seq {expected} is missing: the log jumps from seq {expected - 1} to seq {seq}"
            return expected - 1, Problem(expected, f"{gap} (events were deleted)")
        if row["prev_hash"] != prev:
            return seq - 1, _broken_link(seq, row["prev_hash"] == before)
        before, prev = prev, _hash(prev, row, seq, v2_from, v3_from)
        if prev != row["row_hash"]:
            return seq - 1, Problem(seq, f"event seq {seq} was altered: its contents do not match its hash")
        anchor = anchors.get(seq)
        if anchor is not None and anchor.row_hash != prev:
            return seq, Problem(seq, f"the log does not match the signed anchor at seq {seq} (signed {anchor.at}): "
                                     f"the events after seq {matched} up to seq {seq} were rewritten")  # fmt: skip
        if anchor is not None:
            matched = seq
        expected += 1
    last = expected - 1
    beyond = [a for a in anchors.values() if a.seq > last]
    if beyond:
        top = max(beyond, key=lambda a: a.seq)
        ends = f"the log ends at seq {last}, but an anchor signed {top.at} covers seq {top.seq}"
        return last, Problem(last + 1, f"{ends}: events after seq {last} were removed (a truncated tail)")
    return last, None


def _hash(prev: str, row: Any, seq: int, v2_from: int, v3_from: int) -> str:
    if seq >= v3_from:
        return audit.chain_hash(prev, row)
    return audit.chain_hash_v2(prev, row) if seq >= v2_from else audit.chain_hash_v1(prev, row)


def verify_log(*, reader: str | None = None, settings: Settings | None = None) -> VerifyReport:
    """Verify the whole audit log against the anchor file; the verification is audited."""
    from worker.runtime import runtime

    rt = runtime(settings)
    anchors = read_anchors(rt.settings.anchor_path)
    key = anchor_key(rt.settings)
    with rt.transaction() as session:
        report = verify(session, anchors, key)
    with rt.transaction() as session:
        outcome = "intact" if report.ok else "tampered"
        detail: dict[str, int | None] = {"events": report.events, "anchors": report.anchors}
        if report.problem is not None:
            detail["first_bad_seq"] = report.problem.seq
        audit.record(session=session, action=audit.Action.AUDIT_VERIFIED, job_id=None,
                     actor=reader or rt.settings.actor or "auditor", outcome=outcome, detail=detail)  # fmt: skip
    return report


def anchor_now(*, settings: Settings | None = None) -> Anchor:
    """Sign the chain's current head and append it to the anchor file."""
    from worker.runtime import runtime

    rt = runtime(settings)
    with rt.transaction() as session:
        return write_anchor(rt.settings, *head(session))

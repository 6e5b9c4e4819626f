"""Anchors: the audit chain's head, signed and kept outside the database.

A hash chain inside the database proves nothing against someone who can rewrite the whole
database; so the chain head is signed (HMAC-SHA256, a key the database never sees) and appended
to a file outside it, at least every N events and every T seconds (``audit.verify`` checks them).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..lifecycle import utcnow
from ..settings import Settings
from .events import Sealed

__all__ = ["Anchor", "after_seal", "anchor_key", "write_anchor", "read_anchors", "last_anchor"]

log = logging.getLogger("qbgw.integrity")

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
    #: The signature of the line before it in the file ("" for the first line), signed with it, so that a line
    #: removed from the file, or moved, is seen; None: a line of the first format (v1), linked to nothing.
    prev: str | None = None

    def timestamp(self) -> float:
        """``at`` as Unix seconds (0.0 if unreadable)."""
        try:
            return datetime.fromisoformat(self.at).timestamp()
        except ValueError:
            return 0.0

    def message(self) -> bytes:
        if self.prev is not None:
            return f"qbgw-anchor-v2|{self.kind}|{self.prev}|{self.seq}|{self.row_hash}|{self.at}".encode()
        tag = "qbgw-anchor-v1" if self.kind == "head" else f"qbgw-anchor-v1|{self.kind}"
        return f"{tag}|{self.seq}|{self.row_hash}|{self.at}".encode()


def after_seal(settings: Settings, sealed: Sealed | None) -> None:
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
        if last_anchor(settings.anchor_path) is not None:  # a new key would make every anchor look forged
            raise ConfigError(
                f"the audit anchor key {path} is missing, but {settings.anchor_path} holds anchors signed with it: "
                "restore the key file from its backup (or set QBGW_ANCHOR_KEY to its content)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
        log.warning("generated an audit anchor key in %s; production should set QBGW_ANCHOR_KEY", path)
    return path.read_text().strip().encode()


def write_anchor(settings: Settings, seq: int, row_hash: str, *, kind: str = "head") -> Anchor:
    """Append a signed anchor for (seq, row_hash) to the anchor file, linked to the line before it (whose
    signature it signs too): the file is locked from reading that line to the write, against other processes."""
    key = anchor_key(settings)
    path = settings.anchor_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            before = last_anchor(path)
            at = utcnow().isoformat(timespec="microseconds")
            unsigned = Anchor(seq, row_hash, at, "", kind=kind, prev="" if before is None else before.mac)
            mac = hmac.new(key, unsigned.message(), hashlib.sha256).hexdigest()
            fields: dict[str, Any] = {"seq": seq, "row_hash": row_hash, "at": at, "mac": mac, "prev": unsigned.prev}
            if kind != "head":
                fields["kind"] = kind
            os.write(fd, (json.dumps(fields) + "\n").encode())  # one write of one short line
            os.fsync(fd)
        finally:
            os.close(fd)  # and the lock with it
    return replace(unsigned, mac=mac)


def read_anchors(path: Path) -> list[Anchor]:
    """Every anchor in the file (none if it does not exist), in file order."""
    if not path.exists():
        return []
    anchors = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        try:
            data = json.loads(text)
            anchors.append(
                Anchor(
                    int(data["seq"]),
                    str(data["row_hash"]),
                    str(data["at"]),
                    str(data["mac"]),
                    number,
                    str(data.get("kind", "head")),
                    None if data.get("prev") is None else str(data["prev"]),
                )
            )
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
                return Anchor(
                    int(data["seq"]),
                    str(data["row_hash"]),
                    str(data["at"]),
                    str(data["mac"]),
                    kind=str(data.get("kind", "head")),
                    prev=None if data.get("prev") is None else str(data["prev"]),
                )
            except (ValueError, KeyError, TypeError):
                return None
    return None

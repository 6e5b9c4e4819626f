"""Subjects: the keyed blind index of a job's subject (whom a job is about), and the key it is made with.

A subject is stored encrypted, like a payload, and beside it as ``HMAC-SHA256(QBGW_SUBJECT_KEY, subject)``: equal
subjects give equal indexes, so a subject's jobs and events can be found by equality, but the index cannot be
read back, and, the key being its own (never the PHI keys), it cannot be recomputed by whoever only holds those.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from pathlib import Path

from ..errors import ConfigError, SubjectKeyMissing
from ..settings import MIN_SUBJECT_KEY_CHARS, Settings

__all__ = ["MIN_KEY_CHARS", "SubjectKey", "subject_key", "subject_key_path"]

log = logging.getLogger("qbgw.audit")

#: The shortest QBGW_SUBJECT_KEY accepted (a generated one is 64 hex digits: 256 bits).
MIN_KEY_CHARS = MIN_SUBJECT_KEY_CHARS
_TAG = b"qbgw-subject-v1\x00"
_lock = threading.Lock()


class SubjectKey:
    """The blind index's key; never printed, never pickled (it must not travel in a task message)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def index(self, subject: str) -> str:
        """The blind index (64 hex digits) of a subject already normalised (``messages.validate_subject``)."""
        return hmac.new(self._key, _TAG + subject.encode("utf-8"), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "SubjectKey('********')"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a SubjectKey cannot be pickled")


def subject_key_path(settings: Settings) -> Path:
    """Where the embedded default keeps its generated key: ``subject.key`` in the data directory."""
    return settings.data_dir / "subject.key"


def subject_key(settings: Settings, *, create: bool) -> SubjectKey:
    """QBGW_SUBJECT_KEY, else the key file in the data directory, else (if ``create``: the embedded default) a
    new one generated there with a warning.

    Raises:
        SubjectKeyMissing: no key is configured and ``create`` is false (PostgreSQL: the key must be given, as
            every host must compute the same index).
        ConfigError: QBGW_SUBJECT_KEY is shorter than MIN_KEY_CHARS, or the key file cannot be read.
    """
    if settings.subject_key:
        text = settings.subject_key.reveal().strip()
        if len(text) < MIN_KEY_CHARS:
            raise ConfigError(
                f"QBGW_SUBJECT_KEY: must be at least {MIN_KEY_CHARS} characters (e.g. openssl rand -hex 32)"
            )
        return SubjectKey(text.encode("utf-8"))
    path = subject_key_path(settings)
    if not path.exists():
        if not create:
            raise SubjectKeyMissing(
                "a job's subject needs QBGW_SUBJECT_KEY (the blind index key, at least "
                f"{MIN_KEY_CHARS} characters, e.g. $(openssl rand -hex 32), not the PHI key) or a key file at {path}"
            )
        _generate(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"subject key file {path} cannot be read: {exc}") from None
    if len(text) < MIN_KEY_CHARS:
        raise ConfigError(f"subject key file {path}: must hold at least {MIN_KEY_CHARS} characters")
    return SubjectKey(text.encode("ascii"))


def _generate(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return  # another process made it first: use theirs
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
    log.warning(
        "generated a subject index key into %s; losing it makes subjects unsearchable. In production set "
        "QBGW_SUBJECT_KEY",
        path,
    )

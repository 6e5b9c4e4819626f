"""Request bodies with images inlined, built in the worker with bounded memory.

A local image is never loaded whole: the body is a list of segments (JSON text, and files
streamed as base64), read by ``requests`` a block at a time with an exact Content-Length, so a
50 MB image costs about a block of memory instead of several copies of its base64.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import ResolutionFailed
from .refs import Fingerprint, fingerprint

__all__ = ["FileImage", "StreamingBody", "replaced"]

#: Bytes read from a file per base64 block (a multiple of 3, so blocks need no padding).
BLOCK = 3 * 64 * 1024


def replaced(path: Path, submitted: Fingerprint, now: Fingerprint) -> str:
    """Why a local file is refused: it is not the file its job was submitted with (``refs.fingerprint``s)."""
    return (
        f"{path} was replaced or rewritten after the job was submitted ({submitted[0]} bytes modified "
        f"{_when(submitted[1])} then, {now[0]} bytes modified {_when(now[1])} now): qbgw sends a file only as it "
        "was at submit; submit it again to send it as it is"
    )


def _when(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9, UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class FileImage:
    """A local image to stream as ``data:image/<kind>;base64,...``: its size checked when read, and its
    fingerprint (``stamp``, when the job has one) when it is opened and after it was read."""

    path: Path
    kind: str
    size: int
    stamp: Fingerprint | None = None

    def encoded_length(self) -> int:
        return len(self.prefix()) + 4 * ((self.size + 2) // 3)

    def prefix(self) -> bytes:
        return f"data:image/{self.kind};base64,".encode()

    def chunks(self) -> Iterator[bytes]:
        yield self.prefix()
        sent = 0
        try:
            with self.path.open("rb") as handle:
                self._check(fingerprint(os.fstat(handle.fileno())))
                while block := handle.read(BLOCK):
                    sent += len(block)
                    yield base64.b64encode(block)
                after = fingerprint(os.fstat(handle.fileno()))
        except OSError as exc:
            raise ResolutionFailed(f"{self.path} could not be read: {exc.strerror}") from None
        if sent != self.size or (self.stamp is not None and after != self.stamp):
            raise ResolutionFailed(f"{self.path} changed while it was being sent")

    def _check(self, now: Fingerprint) -> None:
        if self.stamp is not None and now != self.stamp:
            raise ResolutionFailed(replaced(self.path, self.stamp, now))


Segment = bytes | FileImage


class StreamingBody:
    """A file-like request body: ``requests`` takes its ``len()`` as Content-Length and calls
    ``read(n)`` until it returns nothing. Each instance is read once."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self._length = sum(len(s) if isinstance(s, bytes) else s.encoded_length() for s in segments)
        self._chunks: Iterator[bytes] | None = None
        self._buffer, self._position = b"", 0

    def __len__(self) -> int:
        return self._length

    def iter_chunks(self) -> Iterator[bytes]:
        for segment in self.segments:
            if isinstance(segment, bytes):
                yield segment
            else:
                yield from segment.chunks()

    def digest(self) -> str:
        """sha256 of the whole body, computed by streaming it once (for the audit log)."""
        hasher = hashlib.sha256()
        for chunk in self.iter_chunks():
            hasher.update(chunk)
        return hasher.hexdigest()

    def read(self, size: int = -1) -> bytes:
        if self._chunks is None:
            self._chunks = self.iter_chunks()
        if size < 0:
            size = self._length
        parts = []
        while size > 0:
            if self._position >= len(self._buffer):
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._buffer, self._position = chunk, 0
            part = self._buffer[self._position : self._position + size]
            self._position += len(part)
            size -= len(part)
            parts.append(part)
        return b"".join(parts)

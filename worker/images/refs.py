"""References: what an ``image_url`` may name, and the checks at submit time. Pure but for
reading file headers; nothing is fetched from the network here.

    data:image/png;base64,...   inline bytes, checked now, sent as they are
    https://host/scan.jpg       sent as a URL (or fetched by the worker, SSRF-guarded)
    /srv/scans/a.png            a local file under a configured root (also file:///srv/...)
    /srv/scans/report.pdf       a local PDF, rendered to PNG pages in the worker
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from worker.errors import InvalidImage
from worker.imageinfo import MAX_IMAGE_BYTES, parse_data_uri, sniff

__all__ = ["Policy", "Kind", "LocalFile", "kind_of", "check", "inspect_local", "local_path", "HEADER_BYTES"]

#: Enough of a file to find a jpeg's frame header behind large EXIF blocks.
HEADER_BYTES = 512 * 1024
PDF_MAGIC = b"%PDF-"


@dataclass(frozen=True)
class Policy:
    """What references are allowed: local roots, and the pixel limit against bombs."""

    roots: tuple[Path, ...] = ()
    max_pixels: int = 100_000_000
    max_bytes: int = MAX_IMAGE_BYTES


class Kind:
    DATA = "data"
    HTTPS = "https"
    LOCAL = "local"


def kind_of(url: str) -> str:
    """Which kind of reference ``url`` is. Raises InvalidImage for anything else."""
    if url.startswith("data:"):
        return Kind.DATA
    if url.startswith("https://"):
        return Kind.HTTPS
    if url.startswith(("file://", "/")) or (len(url) > 1 and url[0] in ".~"):
        return Kind.LOCAL
    raise InvalidImage(
        "must be an https:// URL, a data:image/...;base64, URI, or a local file path (absolute or file://)"
    )


def check(url: str, policy: Policy) -> None:
    """Everything that can be checked at submit time. Raises InvalidImage with the reason."""
    kind = kind_of(url)
    if kind == Kind.DATA:
        data = parse_data_uri(url)[1]
        info = sniff(data, max_pixels=policy.max_pixels, max_bytes=policy.max_bytes)
        check_complete(info.kind, data[-TAIL_BYTES:])
    elif kind == Kind.HTTPS:
        _check_https(url)
    else:
        inspect_local(url, policy)


@dataclass(frozen=True)
class LocalFile:
    """A local reference that passed every check: its real path, what it is, its size."""

    path: Path
    kind: str  # "png", "jpeg" or "pdf"
    size: int


def inspect_local(url: str, policy: Policy) -> LocalFile:
    """Check a local reference (place, type, completeness, size, pixels) and say what it is.

    Raises InvalidImage with the reason.
    """
    path = local_path(url, policy)
    header, size = _header(path)
    if size > policy.max_bytes:
        raise InvalidImage(f"{size} bytes exceeds the 50 MB limit ({policy.max_bytes} bytes)")
    if header.startswith(PDF_MAGIC):
        return LocalFile(path, "pdf", size)
    kind = _sniff_header(path, header, size, policy)
    check_complete(kind, header[-TAIL_BYTES:] if size <= len(header) else _tail(path, size))
    return LocalFile(path, kind, size)


def _check_https(url: str) -> None:
    parts = urlsplit(url)
    if not parts.hostname:
        raise InvalidImage("an https URL needs a host")
    if parts.username or parts.password:
        raise InvalidImage("an https URL must not carry credentials")


def local_path(url: str, policy: Policy) -> Path:
    """The real path a local reference names, if it is safely inside a configured root.

    Rejects NUL bytes, ``..`` (also percent-encoded), and symlinks that lead out of the roots.
    """
    raw = url
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidImage("a file:// URL must name a local path (file:///...)")
        raw = unquote(parts.path)
    if "\x00" in raw or "%00" in url:
        raise InvalidImage("a path must not contain NUL bytes")
    if ".." in Path(raw).parts or ".." in unquote(raw).split("/"):
        raise InvalidImage("a path must not contain '..'")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise InvalidImage("a local path must be absolute")
    if not policy.roots:
        raise InvalidImage("local files are not allowed: no image roots are configured (QBGW_IMAGE_ROOTS)")
    real = Path(os.path.realpath(path))
    if not any(real == root or root in real.parents for root in _real_roots(policy)):
        raise InvalidImage(f"{path} is not under an allowed root ({os.pathsep.join(map(str, policy.roots))})")
    return real


def _real_roots(policy: Policy) -> list[Path]:
    return [Path(os.path.realpath(root)) for root in policy.roots]


def _header(path: Path) -> tuple[bytes, int]:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InvalidImage(f"{path} is not a regular file")
        with path.open("rb") as handle:
            return handle.read(HEADER_BYTES), info.st_size
    except FileNotFoundError:
        raise InvalidImage(f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidImage(f"{path} cannot be read: {exc.strerror}") from None


def _sniff_header(path: Path, header: bytes, size: int, policy: Policy) -> str:
    try:
        return sniff(header, max_pixels=policy.max_pixels, max_bytes=policy.max_bytes).kind
    except InvalidImage as exc:
        if size <= len(header) or "jpeg or png" in str(exc) or "pixels" in str(exc):
            raise
        # The header did not reach the frame size (a large EXIF block): read the whole file.
        return sniff(path.read_bytes(), max_pixels=policy.max_pixels, max_bytes=policy.max_bytes).kind


#: How much of an image's end shows whether it is complete.
TAIL_BYTES = 4096
_PNG_END = b"IEND\xaeB`\x82"


def check_complete(kind: str, tail: bytes) -> None:
    """Raises InvalidImage if an image was cut short: a png must end with its IEND chunk, a
    jpeg with its end-of-image marker (a few trailing pad bytes are tolerated)."""
    if kind == "png" and not tail.endswith(_PNG_END):
        raise InvalidImage("truncated png: it does not end with an IEND chunk")
    if kind == "jpeg" and b"\xff\xd9" not in tail[-64:]:
        raise InvalidImage("truncated jpeg: it does not end with an end-of-image marker")


def _tail(path: Path, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(max(0, size - TAIL_BYTES))
        return handle.read()

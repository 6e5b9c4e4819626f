"""References: what an ``image_url`` may name, and the checks at submit time. Pure but for
reading file headers; nothing is fetched from the network here.

    data:image/png;base64,...   inline bytes, checked now, sent as they are
    https://host/scan.jpg       sent as a URL (or fetched by the worker, SSRF-guarded)
    /srv/scans/a.png            a local file under a configured root (also file:///srv/...)
    /srv/scans/report.pdf       a local PDF, rendered to PNG pages in the worker
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import InvalidImage
from .info import MAX_IMAGE_BYTES, MAX_REQUEST_BYTES, check_declared, parse_data_uri, sniff

__all__ = [
    "image_urls",
    "Policy",
    "Kind",
    "LocalFile",
    "kind_of",
    "scheme_of",
    "check",
    "https_target",
    "inspect_local",
    "local_path",
    "Fingerprint",
    "fingerprint",
    "fingerprints",
    "HEADER_BYTES",
]

#: Enough of a file to find a jpeg's frame header behind large EXIF blocks.
HEADER_BYTES = 512 * 1024
PDF_MAGIC = b"%PDF-"
ACCEPTED = "must be an https:// URL, a data:image/...;base64, URI, or a local file path (absolute or file://)"
# RFC 3986's scheme: a letter, then letters, digits, + - . (a longer one is not a scheme anyone uses).
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}):")
# A host name: dot-separated labels of letters, digits, - and _ (legal in DNS, though not in RFC 1123 names).
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_AUTHORITY_END = re.compile(r"[/?#]")


@dataclass(frozen=True)
class Policy:
    """What references are allowed: local roots, the pixel limit against bombs, and the request size."""

    roots: tuple[Path, ...] = ()
    max_pixels: int = 100_000_000
    max_bytes: int = MAX_IMAGE_BYTES
    #: The most text (data URIs included) one request may carry, in UTF-8 bytes.
    max_request_bytes: int = MAX_REQUEST_BYTES


class Kind:
    DATA = "data"
    HTTPS = "https"
    LOCAL = "local"


def scheme_of(ref: str) -> str | None:
    """The URL scheme ``ref`` starts with (``https``, ``data``, ``http`` ...), or None for a path."""
    found = _SCHEME.match(ref)
    return found[1] if found else None


def kind_of(url: str) -> str:
    """Which kind of reference ``url`` is. Raises InvalidImage for anything else, naming a refused scheme."""
    if url.startswith("data:"):
        return Kind.DATA
    if url.startswith("https://"):
        return Kind.HTTPS
    if url.startswith(("file://", "/")) or (len(url) > 1 and url[0] in ".~"):
        return Kind.LOCAL
    scheme = scheme_of(url)
    if scheme is not None and scheme.lower() not in ("https", "data", "file"):
        raise InvalidImage(f"the scheme {scheme!r} is not accepted: an image reference {ACCEPTED}")
    if scheme is not None and scheme.lower() != scheme:
        raise InvalidImage(f"the scheme {scheme!r} must be written in lower case: an image reference {ACCEPTED}")
    raise InvalidImage(f"an image reference {ACCEPTED}")


def check(url: str, policy: Policy) -> None:
    """Everything that can be checked at submit time. Raises InvalidImage with the reason."""
    kind = kind_of(url)
    if kind == Kind.DATA:
        media_type, data = parse_data_uri(url)
        check_declared(media_type)
        info = sniff(data, max_pixels=policy.max_pixels, max_bytes=policy.max_bytes)
        check_declared(media_type, info.kind)
        check_complete(info.kind, data[-TAIL_BYTES:])
    elif kind == Kind.HTTPS:
        https_target(url)
    else:
        inspect_local(url, policy)


#: What tells one version of a file from another: its size and modification time in nanoseconds, as rsync's
#: quick check (not its inode: a worker on another host may see the same shared file under another one).
Fingerprint = tuple[int, int]


@dataclass(frozen=True)
class LocalFile:
    """A local reference that passed every check: its real path, what it is, its size, its fingerprint."""

    path: Path
    kind: str  # "png", "jpeg" or "pdf"
    size: int
    stamp: Fingerprint


def inspect_local(url: str, policy: Policy) -> LocalFile:
    """Check a local reference (place, type, completeness, size, pixels) and say what it is.

    Raises InvalidImage with the reason.
    """
    path = local_path(url, policy)
    header, info = _header(path)
    size = info.st_size
    if size > policy.max_bytes:
        raise InvalidImage(f"{size} bytes exceeds the 50 MB limit ({policy.max_bytes} bytes)")
    if header.startswith(PDF_MAGIC):
        return LocalFile(path, "pdf", size, fingerprint(info))
    kind = _sniff_header(path, header, size, policy)
    check_complete(kind, header[-TAIL_BYTES:] if size <= len(header) else _tail(path, size))
    return LocalFile(path, kind, size, fingerprint(info))


def https_target(url: str) -> tuple[str, int]:
    """The host (lower case, an IPv6 address without brackets) and port an https URL connects to.

    Read from the URL as it is stored and sent (``urlsplit`` drops tabs and newlines; this does not).
    Raises InvalidImage unless the host is a DNS name (IDNA allowed), an IPv4 or a bracketed IPv6
    address, the port (if any) is a number from 1 to 65535, and there are no credentials.
    """
    if url[:8].lower() != "https://":
        raise InvalidImage("not an https URL")
    end = _AUTHORITY_END.search(url, 8)
    authority = url[8 : end.start() if end else len(url)]
    if "@" in authority:
        raise InvalidImage("an https URL must not carry credentials")
    if authority.startswith("["):
        host, bracket, after = authority[1:].partition("]")
        _check_ipv6(host, closed=bool(bracket))
    else:
        host, colon, port = authority.partition(":")
        after = colon + port
        host = _check_host(host.lower())
    if after and not after.startswith(":"):
        raise InvalidImage("an https URL's host must be followed by ':port' or '/', nothing else")
    return host.lower(), _port(after[1:])


def _check_ipv6(host: str, *, closed: bool) -> None:
    if not closed:
        raise InvalidImage("an https URL's IPv6 address lacks its closing ']'")
    try:
        if "%" in host:
            raise ValueError(host)  # a zone id names a local interface: nothing to fetch from
        ipaddress.IPv6Address(host)
    except ValueError:
        raise InvalidImage(f"[{host[:45]!r}] in an https URL is not an IPv6 address") from None


def _check_host(host: str) -> str:
    if not host:
        raise InvalidImage("an https URL needs a host")
    name = host
    if not host.isascii():
        try:  # an international name, written as it is resolved (no character IDNA maps to another)
            name = host.encode("idna").decode("ascii")
            name = name if name.encode("ascii").decode("idna") == host else ""
        except UnicodeError:
            name = ""
    if len(name) > 254 or not _HOST.fullmatch(name):
        raise InvalidImage(
            f"the host {host[:64]!r} of an https URL is not a host name (letters, digits, - and _ in "
            "dot-separated labels), an IPv4 address or an [IPv6] address"
        )
    last = name.rstrip(".").rsplit(".", 1)[-1]
    if last.isdigit() or _HEX_NUMBER.fullmatch(last):  # no top-level domain is a number: it is an address
        try:
            ipaddress.IPv4Address(name.rstrip("."))
        except ValueError:
            raise InvalidImage(
                f"the host {host[:64]!r} of an https URL is a number but not an IPv4 address (four numbers from 0 "
                "to 255 joined by dots, as 192.0.2.7)"
            ) from None
    return host


_HEX_NUMBER = re.compile(r"0x[0-9a-f]*")


def _port(text: str) -> int:
    if not text:
        return 443
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535):
        raise InvalidImage(f"the port {text[:12]!r} of an https URL is not a number from 1 to 65535")
    return int(text)


def local_path(url: str, policy: Policy) -> Path:
    """The real path a local reference names, if it is safely inside a configured root.

    Rejects NUL bytes, ``..`` (also percent-encoded), and symlinks that lead out of the roots.
    """
    path = _named_path(url)
    if not policy.roots:
        raise InvalidImage("local files are not allowed: no image roots are configured (QBGW_IMAGE_ROOTS)")
    real = Path(os.path.realpath(path))
    if not any(real == root or root in real.parents for root in _real_roots(policy)):
        raise InvalidImage(f"{path} is not under an allowed root ({os.pathsep.join(map(str, policy.roots))})")
    return real


def _named_path(url: str) -> Path:
    """The absolute path a local reference names (not resolved, not checked against any root)."""
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
    return path


def fingerprint(info: os.stat_result) -> Fingerprint:
    """The fingerprint of a file from its ``stat``."""
    return info.st_size, info.st_mtime_ns


def fingerprints(messages: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The fingerprint of every local file ``messages`` name (already checked), by reference: stored with the
    job, so that a worker sends a file only as it was when the job was submitted.

    Raises InvalidImage if a file vanished since it was checked.
    """
    found: dict[str, list[int]] = {}
    for url in image_urls(messages):
        if kind_of(url) != Kind.LOCAL or url in found:
            continue
        path = _named_path(url)
        try:
            found[url] = list(fingerprint(os.stat(path)))
        except OSError as exc:
            raise InvalidImage(f"{path} cannot be read: {exc.strerror}") from None
    return found


def _real_roots(policy: Policy) -> list[Path]:
    return [Path(os.path.realpath(root)) for root in policy.roots]


def _header(path: Path) -> tuple[bytes, os.stat_result]:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InvalidImage(f"{path} is not a regular file")
        with path.open("rb") as handle:
            return handle.read(HEADER_BYTES), info
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
        end = tail.rfind(_PNG_END)
        if end >= 0:  # complete, then something else: not a png as the gateway takes it
            extra = len(tail) - end - len(_PNG_END)
            raise InvalidImage(f"png with {extra} byte(s) after its IEND chunk: the file goes on after the image ends")
        raise InvalidImage("truncated png: it does not end with an IEND chunk")
    if kind == "jpeg" and b"\xff\xd9" not in tail[-64:]:
        raise InvalidImage("truncated jpeg: it does not end with an end-of-image marker")


def _tail(path: Path, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(max(0, size - TAIL_BYTES))
        return handle.read()


def image_urls(messages: list[dict[str, Any]]) -> list[str]:
    """Every image URL of validated messages, in order."""
    return [
        part["image_url"]["url"]
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]

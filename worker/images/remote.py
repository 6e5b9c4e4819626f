"""Remote images: fetch an https:// image in the worker without letting the URL reach inside.

Server-side request forgery guard: every address the host resolves to must be public (no
private, loopback, link-local, metadata, multicast or reserved ranges, whatever spelling the
URL used: decimal, octal, hex, IPv4-mapped IPv6), the connection goes to the checked address
(so DNS cannot change its answer in between), every redirect is checked the same way, and the
body is cut off at a size and a time limit. The second HTTP boundary after ``gateway``.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from worker.errors import ResolutionFailed

__all__ = ["Limits", "Response", "check_address", "resolve", "fetch"]

MAX_REDIRECTS = 3
Resolver = Callable[..., list[Any]]


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    timeout: float


@dataclass
class Response:
    status: int
    location: str | None
    chunks: Iterator[bytes]


Opener = Callable[[str, str, str, float], Response]


def check_address(address: str) -> None:
    """Raises ResolutionFailed unless ``address`` is a public unicast address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback:
        raise ResolutionFailed(f"refused to fetch from a non-public address ({ip})")


def resolve(host: str, port: int, resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """Every address ``host`` resolves to, each checked. Raises ResolutionFailed."""
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolutionFailed(f"cannot resolve {host}: {exc}") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        raise ResolutionFailed(f"{host} resolves to no address")
    for address in addresses:
        check_address(address)
    return addresses


def fetch(url: str, limits: Limits, *, resolver: Resolver = socket.getaddrinfo, opener: Opener | None = None) -> bytes:
    """The body at ``url`` (https only), following at most 3 checked redirects.

    Raises:
        ResolutionFailed: a refused address or scheme, too many redirects, a non-200 answer,
            a body over ``limits.max_bytes``, or no complete answer within ``limits.timeout``.
    """
    open_ = opener or _open
    deadline = time.monotonic() + limits.timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ResolutionFailed(f"refused to fetch {parts.scheme or 'a relative'} URL; only https is fetched")
        address = resolve(parts.hostname, parts.port or 443, resolver)[0]
        response = open_(url, address, parts.hostname, max(0.1, deadline - time.monotonic()))
        if response.status in (301, 302, 303, 307, 308) and response.location:
            url = urljoin(url, response.location)
            continue
        if response.status != 200:
            raise ResolutionFailed(f"fetching the image got HTTP {response.status}")
        return _read(response.chunks, limits, deadline)
    raise ResolutionFailed(f"more than {MAX_REDIRECTS} redirects")


def _read(chunks: Iterator[bytes], limits: Limits, deadline: float) -> bytes:
    received = bytearray()
    for chunk in chunks:
        received += chunk
        if len(received) > limits.max_bytes:
            raise ResolutionFailed(f"the image is larger than {limits.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise ResolutionFailed(f"fetching the image took longer than {limits.timeout:g}s")
    return bytes(received)


class _PinnedAdapter(HTTPAdapter):
    """Connects to a checked address while TLS still verifies the URL's host name."""

    def __init__(self, host: str) -> None:
        self._host = host
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self._host
        kwargs["assert_hostname"] = self._host
        super().init_poolmanager(*args, **kwargs)


def _open(url: str, address: str, host: str, timeout: float) -> Response:
    parts = urlsplit(url)
    netloc = f"[{address}]" if ":" in address else address
    if parts.port:
        netloc += f":{parts.port}"
    session = requests.Session()
    session.trust_env = False  # a proxy would undo the address check
    session.mount("https://", _PinnedAdapter(host))
    try:
        response = session.get(urlunsplit(parts._replace(netloc=netloc)), headers={"Host": parts.netloc},
                               timeout=(min(5.0, timeout), timeout), allow_redirects=False, stream=True)  # fmt: skip
    except requests.RequestException as exc:
        session.close()
        raise ResolutionFailed(f"fetching the image failed ({type(exc).__name__})") from None
    return Response(response.status_code, response.headers.get("Location"), _chunks(response, session))


def _chunks(response: requests.Response, session: requests.Session) -> Iterator[bytes]:
    try:
        yield from response.iter_content(64 * 1024)
    except requests.RequestException as exc:
        raise ResolutionFailed(f"fetching the image failed ({type(exc).__name__})") from None
    finally:
        response.close()
        session.close()

"""Remote images: fetch an https:// image in the worker without letting the URL reach inside.

Server-side request forgery guard: every address the host resolves to must be public (in no
block of IANA's IPv4 and IPv6 special-purpose registries, nor multicast, written out below rather
than left to ``ipaddress.is_global``, which calls 192.0.0.8 and 6to4 addresses global), whatever
spelling the URL used: decimal, octal, hex, IPv4-mapped IPv6. The connection goes to the checked
address (so DNS cannot change its answer in between), every redirect is checked the same way, and
the body is cut off at a size and a time limit. The second HTTP boundary after ``gateway``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from ..errors import InvalidImage, ResolutionFailed
from .refs import https_target, scheme_of

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


# The IANA IPv4 Special-Purpose Address Registry (RFC 6890, with the blocks added since), and multicast.
_SPECIAL_V4 = tuple(
    (ipaddress.IPv4Network(block), name)
    for block, name in (
        ("0.0.0.0/8", "this network (RFC 791)"),
        ("10.0.0.0/8", "private use (RFC 1918)"),
        ("100.64.0.0/10", "shared address space (RFC 6598)"),
        ("127.0.0.0/8", "loopback (RFC 1122)"),
        ("169.254.0.0/16", "link local, cloud metadata (RFC 3927)"),
        ("172.16.0.0/12", "private use (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
        ("192.0.2.0/24", "documentation (RFC 5737)"),
        ("192.31.196.0/24", "AS112-v4 (RFC 7535)"),
        ("192.52.193.0/24", "AMT (RFC 7450)"),
        ("192.88.99.0/24", "6to4 relay anycast, deprecated (RFC 7526)"),
        ("192.168.0.0/16", "private use (RFC 1918)"),
        ("192.175.48.0/24", "AS112 direct delegation (RFC 7534)"),
        ("198.18.0.0/15", "benchmarking (RFC 2544)"),
        ("198.51.100.0/24", "documentation (RFC 5737)"),
        ("203.0.113.0/24", "documentation (RFC 5737)"),
        ("224.0.0.0/4", "multicast (RFC 5771)"),
        ("255.255.255.255/32", "limited broadcast (RFC 919)"),
        ("240.0.0.0/4", "reserved (RFC 1112)"),
    )
)
# The IANA IPv6 Special-Purpose Address Registry (RFC 6890, as of its 2025 update), the deprecated blocks of
# the addressing architecture, and multicast; the first match names the reason. 6to4, Teredo and
# IPv4-compatible addresses are refused outright, whatever IPv4 address they carry.
_SPECIAL_V6 = tuple(
    (ipaddress.IPv6Network(block), name)
    for block, name in (
        ("::/128", "unspecified (RFC 4291)"),
        ("::1/128", "loopback (RFC 4291)"),
        ("::/96", "IPv4-compatible, deprecated (RFC 4291)"),
        ("::ffff:0:0:0/96", "IPv4-translated (RFC 2765)"),
        ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation (RFC 8215)"),
        ("100::/64", "discard only (RFC 6666)"),
        ("100:0:0:1::/64", "dummy prefix (IANA registry, 2025)"),
        ("2001::/32", "Teredo (RFC 4380)"),
        ("2001::/23", "IETF protocol assignments (RFC 2928)"),
        ("2001:db8::/32", "documentation (RFC 3849)"),
        ("2002::/16", "6to4 (RFC 3056)"),
        ("2620:4f:8000::/48", "AS112 direct delegation (RFC 7534)"),
        ("3fff::/20", "documentation (RFC 9637)"),
        ("5f00::/16", "SRv6 segment identifiers (RFC 9602)"),
        ("fc00::/7", "unique local (RFC 4193)"),
        ("fe80::/10", "link local (RFC 4291)"),
        ("fec0::/10", "site local, deprecated (RFC 3879)"),
        ("ff00::/8", "multicast (RFC 4291)"),
    )
)
# IPv6 forms that carry an IPv4 address to connect to: judged by that address.
_EMBEDS_V4 = (
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped (RFC 4291)"),
    (ipaddress.IPv6Network("64:ff9b::/96"), "NAT64 (RFC 6052)"),
)
# Everything else outside it is unassigned or reserved.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def check_address(address: str) -> None:
    """Raises ResolutionFailed unless ``address`` is a public unicast address: in none of the blocks
    above (an IPv6 one also in 2000::/3); an IPv4-mapped or NAT64 address is judged by its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        raise ResolutionFailed(f"refused to fetch from an unreadable address ({address[:60]!r})") from None
    reason = _special(ip)
    if reason is not None:
        raise ResolutionFailed(f"refused to fetch from a non-public address ({ip}): {reason}")


def _special(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not public, or None if it is."""
    if isinstance(ip, ipaddress.IPv4Address):
        return next((name for block, name in _SPECIAL_V4 if ip in block), None)
    for block, name in _EMBEDS_V4:
        if ip in block:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
            reason = _special(inner)
            return None if reason is None else f"{name} of {inner}, {reason}"
    reason = next((name for block, name in _SPECIAL_V6 if ip in block), None)
    if reason is None and ip not in _GLOBAL_UNICAST:
        return "outside 2000::/3, the global unicast block (RFC 4291)"
    return reason


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
        host, port = _target(url)
        address = resolve(host, port, resolver)[0]
        response = open_(url, address, host, max(0.1, deadline - time.monotonic()))
        if response.status in (301, 302, 303, 307, 308) and response.location:
            url = _redirect(url, response.location)
            continue
        if response.status != 200:
            raise ResolutionFailed(f"fetching the image got HTTP {response.status}")
        return _read(response.chunks, limits, deadline)
    raise ResolutionFailed(f"more than {MAX_REDIRECTS} redirects")


def _target(url: str) -> tuple[str, int]:
    # Submit checked the URL (refs.https_target), but a redirect's was not, nor a job's stored before
    # the check was strict: a bad host or port is a refusal here, never a ValueError.
    scheme = scheme_of(url)
    if scheme is None or scheme.lower() != "https":
        raise ResolutionFailed(f"refused to fetch {scheme or 'a relative'} URL; only https is fetched")
    try:
        return https_target(url)
    except InvalidImage as exc:
        raise ResolutionFailed(f"refused to fetch the image: {exc}") from None


def _redirect(url: str, location: str) -> str:
    try:
        return urljoin(url, location)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise ResolutionFailed("refused to follow a redirect whose Location is not a URL") from None


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
        response = session.get(
            urlunsplit(parts._replace(netloc=netloc)),
            headers={"Host": parts.netloc},
            timeout=(min(5.0, timeout), timeout),
            allow_redirects=False,
            stream=True,
        )
    except requests.RequestException as exc:
        session.close()
        raise ResolutionFailed(f"fetching the image failed ({type(exc).__name__})") from None
    except ValueError:  # requests reads a redirect's Location even when it does not follow it
        session.close()
        raise ResolutionFailed("refused to follow a redirect whose Location is not a URL") from None
    return Response(response.status_code, response.headers.get("Location"), _chunks(response, session, timeout))


def _chunks(response: requests.Response, session: requests.Session, timeout: float) -> Iterator[bytes]:
    """The body, cut off ``timeout`` seconds from now however it trickles in: a read timeout is per read, so a
    host sending a byte now and then would hold the worker for ever; a timer shuts the socket at the deadline."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read, unlike close()

    timer = threading.Timer(timeout, cut)
    timer.daemon = True
    timer.start()
    try:
        yield from response.iter_content(64 * 1024)
    except Exception as exc:
        if expired.is_set():
            raise ResolutionFailed(f"fetching the image took longer than {timeout:g}s") from None
        if isinstance(exc, requests.RequestException):
            raise ResolutionFailed(f"fetching the image failed ({type(exc).__name__})") from None
        raise
    finally:
        timer.cancel()
        response.close()
        session.close()
    if expired.is_set():  # the shut socket may read as a clean end: a cut body is no image
        raise ResolutionFailed(f"fetching the image took longer than {timeout:g}s")

"""Image and document references: the bad ones are refused with the right reason, at submit or
before any fetch; the good ones resolve into the exact bytes, with bounded memory."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from qbgw.errors import InvalidImage, ResolutionFailed
from qbgw.images import remote
from qbgw.images.body import StreamingBody
from qbgw.images.remote import Limits, Response, check_address, fetch
from qbgw.images.resolve import build_body, refs
from qbgw.settings import Settings
from qbgw.upstream.gateway import encode_request
from tests.images import data_uri, jpeg_bytes, png_bytes, png_header

MB50 = 50 * 1024 * 1024


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png_bytes(64, 48))
    (folder / "ok.jpg").write_bytes(jpeg_bytes(320, 240))
    (tmp_path / "secret.png").write_bytes(png_bytes(2, 2))
    return folder


def policy(root: Path) -> refs.Policy:
    return refs.Policy(roots=(root,))


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("{root}/../secret.png", "must not contain '..'"),
        ("file://{root}/%2e%2e/secret.png", "must not contain '..'"),
        ("file://{root}/..%2Fsecret.png", "must not contain '..'"),
        ("{root}/ok.png\x00.txt", "NUL"),
        ("file://{root}/ok.png%00", "NUL"),
        ("file://evil.example{root}/ok.png", "must name a local path"),
        ("{root}/escape.png", "is not under an allowed root"),
        ("{root}/missing.png", "does not exist"),
        ("{root}", "is not a regular file"),
        ("/etc/hostname", "is not under an allowed root"),
        ("ftp://example.org/a.png", "must be an https:// URL"),
        ("https://user:pw@example.org/a.png", "must not carry credentials"),
        ("data:image/png;base64,!!!", "not valid base64"),
    ],
)
def test_bad_references_are_refused_at_submit(root: Path, ref: str, reason: str) -> None:
    (root / "escape.png").symlink_to(root.parent / "secret.png")
    with pytest.raises(InvalidImage, match=reason):
        refs.check(ref.format(root=root), policy(root))


def _write(root: Path, name: str, data: bytes) -> str:
    (root / name).write_bytes(data)
    return str(root / name)


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("gif.png", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "not a jpeg or png"),
        ("truncated.png", png_bytes(64, 48)[:-20], "truncated png"),
        ("trailing.png", png_bytes(64, 48) + b"x" * 10, r"png with 10 byte\(s\) after its IEND chunk"),
        ("truncated.jpg", jpeg_bytes(64, 48)[:-2], "truncated jpeg"),
        ("header-only.png", png_header(10, 10)[:20], "truncated png header"),
        ("bomb.png", png_header(100_000, 100_000, idat=b"x"), "pixels exceeds the limit"),
    ],
)
def test_bad_bytes_are_refused_by_their_magic_and_header(root: Path, name: str, data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImage, match=reason):
        refs.check(_write(root, name, data), policy(root))


def test_a_file_one_byte_over_50_mb_is_refused_without_reading_it(root: Path) -> None:
    path = root / "huge.png"
    with path.open("wb") as handle:
        handle.write(png_bytes(8, 8))
        handle.truncate(MB50 + 1)  # sparse: no 50 MB written
    with pytest.raises(InvalidImage, match=f"{MB50 + 1} bytes exceeds the 50 MB limit"):
        refs.check(str(path), policy(root))
    assert png_bytes(8, 8)  # and a data URI over the limit is refused the same way
    with pytest.raises(InvalidImage, match="exceeds"):
        refs.check(data_uri("png", png_bytes(8, 8) + bytes(MB50)), policy(root))


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",  # noqa: S104 - an address to refuse, not one to bind
        "100.64.0.1",
        "::1",
        "fd00:ec2::254",
        "fe80::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "224.0.0.1",
        "240.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(ResolutionFailed, match="non-public address"):
        check_address(address)


@pytest.mark.parametrize(
    "url",
    [
        "https://2130706433/x.png",  # 127.0.0.1 in decimal
        "https://0177.0.0.1/x.png",  # octal
        "https://0x7f.0.0.1/x.png",  # hex
        "https://[::ffff:127.0.0.1]/x.png",  # IPv4-mapped IPv6
        "https://localhost/x.png",
        "https://169.254.169.254/latest/meta-data/",  # cloud metadata
        "https://[::1]:8443/x.png",
    ],
)
def test_a_fetch_of_a_private_address_in_any_spelling_is_refused_before_connecting(url: str) -> None:
    def never(*_: object) -> Response:
        raise AssertionError("no connection may be made")

    # (a host that is a number but no dotted quad is refused for that, before it is even resolved)
    with pytest.raises(ResolutionFailed, match="non-public address|is a number but not an IPv4 address"):
        fetch(url, Limits(1000, 5), opener=never)


# Every special-purpose block of IANA's IPv4 and IPv6 registries (and multicast), at its edges, in the
# spellings an attacker has: 6to4, Teredo, NAT64, IPv4-mapped, -compatible and -translated forms.
SPECIAL = [
    "0.0.0.0",  # noqa: S104 - an address to refuse, not one to bind
    "0.255.255.255",
    "10.0.0.1",
    "100.64.0.1",
    "100.127.255.254",
    "100.100.100.200",
    "127.0.0.1",
    "127.255.255.254",
    "169.254.169.254",
    "172.16.0.1",
    "172.31.255.255",
    "192.0.0.1",
    "192.0.0.8",
    "192.0.0.9",
    "192.0.0.170",
    "192.0.0.255",
    "192.0.2.1",
    "192.31.196.1",
    "192.52.193.1",
    "192.88.99.1",
    "192.168.0.1",
    "192.175.48.1",
    "198.18.0.1",
    "198.19.255.255",
    "198.51.100.1",
    "203.0.113.1",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "::127.0.0.1",
    "::a9fe:a9fe",
    "::8.8.8.8",
    "::ffff:127.0.0.1",
    "::ffff:7f00:1",
    "::ffff:10.0.0.1",
    "0:0:0:0:0:ffff:169.254.169.254",
    "::ffff:0:7f00:1",
    "::ffff:0:808:808",
    "64:ff9b::127.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::c000:8",
    "64:ff9b:1::808:808",
    "100::1",
    "100:0:0:1::1",
    "2001::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "2001:2::1",
    "2001:10::1",
    "2001:20::1",
    "2001:1ff::1",
    "2001:db8::1",
    "2002:7f00:1::",
    "2002:808:808::1",
    "2620:4f:8000::1",
    "3fff::1",
    "3fff:fff::1",
    "5f00::1",
    "fc00::1",
    "fd00:ec2::254",
    "fe80::1",
    "fe80::1%eth0",
    "febf::1",
    "fec0::1",
    "ff02::1",
    "4000::1",
    "::2",
]


@pytest.mark.parametrize("address", SPECIAL)
def test_every_special_purpose_address_is_refused_whatever_its_spelling(address: str) -> None:
    with pytest.raises(ResolutionFailed, match="refused to fetch from a non-public address"):
        check_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "93.184.216.34",
        "1.1.1.1",
        "192.0.1.1",
        "100.128.0.1",
        "198.20.0.1",
        "223.255.255.254",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "2001:200::1",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
    ],
)
def test_public_addresses_and_ipv4_forms_of_public_ones_may_be_fetched(address: str) -> None:
    check_address(address)


def test_a_refusal_says_which_block_and_which_embedded_address() -> None:
    with pytest.raises(ResolutionFailed) as caught:
        check_address("::ffff:127.0.0.1")
    assert str(caught.value) == (
        "refused to fetch from a non-public address (::ffff:7f00:1): IPv4-mapped (RFC 4291) of 127.0.0.1, "
        "loopback (RFC 1122)"
    )
    with pytest.raises(ResolutionFailed, match=r"\(2002:7f00:1::\): 6to4 \(RFC 3056\)$"):
        check_address("2002:7f00:1::")


@pytest.mark.parametrize(
    "url",
    [
        "https://192.0.0.8/x.png",
        "https://[2002:7f00:1::]/x.png",  # 6to4 of 127.0.0.1
        "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/x.png",  # Teredo
        "https://[64:ff9b::7f00:1]/x.png",  # NAT64 of 127.0.0.1
        "https://[64:ff9b::169.254.169.254]/latest/meta-data/",
        "https://[::127.0.0.1]/x.png",  # IPv4-compatible
        "https://[::ffff:0:7f00:1]/x.png",  # IPv4-translated
        "https://[0:0:0:0:0:ffff:7f00:1]/x.png",
        "https://[fd00:ec2::254]/latest/meta-data/",  # the EC2 metadata service over IPv6
        "https://100.100.100.200/latest/meta-data/",  # Alibaba's, in the shared address space
        "https://127.1/x.png",
        "https://0/x.png",
        "https://0x7f000001/x.png",
        "https://017700000001/x.png",
        "https://198.18.0.1:8443/x.png",
        "https://[5f00::1]/x.png",
        "https://[3fff::1]/x.png",
    ],
)
def test_a_fetch_of_a_special_purpose_address_never_reaches_connect(url: str) -> None:
    def never(*_: object) -> Response:
        raise AssertionError("no connection may be made")

    # (a host that is a number but no dotted quad is refused for that, before it is even resolved)
    with pytest.raises(ResolutionFailed, match="non-public address|is a number but not an IPv4 address"):
        fetch(url, Limits(1000, 5), opener=never)


@pytest.mark.parametrize(
    "url",
    [
        "https://h.example:abc/x.png",
        "https://h.example:65536/x.png",
        "https://h.example:0/x.png",
        "https://[::1/x.png",
        "https://a b.example/x.png",
        "https://h\\x.example/x.png",
        "http://h.example/x.png",
        "ftp://h.example/x.png",
        "https://u:p@h.example/x.png",
    ],
)
def test_a_url_that_cannot_be_parsed_fails_the_resolution_in_the_worker(url: str) -> None:
    def never(*_: object) -> Response:
        raise AssertionError("no connection may be made")

    with pytest.raises(ResolutionFailed, match="refused to fetch"):
        fetch(url, Limits(1000, 5), resolver=public_resolver, opener=never)


@pytest.mark.parametrize("location", ["https://[::1/x.png", "https://cdn.example:99999/b.png", "//a b/c.png"])
def test_a_redirect_to_a_url_that_cannot_be_parsed_is_refused(location: str) -> None:
    hops: list[str] = []

    def opener(url: str, address: str, host: str, timeout: float) -> Response:
        hops.append(host)
        return Response(302, location, iter(()))

    with pytest.raises(ResolutionFailed, match="refused to f"):
        fetch("https://images.example/a.png", Limits(1000, 5), resolver=public_resolver, opener=opener)
    assert hops == ["images.example"]


def test_a_job_stored_with_an_unparsable_url_fails_resolution_not_the_worker(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, fetch_remote_images=True)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://h:abc/x.png"}}]}]
    with pytest.raises(ResolutionFailed, match="the port 'abc' of an https URL is not a number from 1 to 65535"):
        build_body("a1", messages, settings)


def public_resolver(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
    table = {"images.example": "93.184.216.34", "cdn.example": "151.101.1.1"}
    if host in table:
        return [(2, 1, 6, "", (table[host], port))]
    import socket

    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def test_a_redirect_to_loopback_is_refused() -> None:
    hops: list[str] = []

    def opener(url: str, address: str, host: str, timeout: float) -> Response:
        hops.append(address)
        return Response(302, "https://127.0.0.1/internal.png", iter(()))

    with pytest.raises(ResolutionFailed, match=r"non-public address \(127.0.0.1\)"):
        fetch("https://images.example/a.png", Limits(1000, 5), resolver=public_resolver, opener=opener)
    assert hops == ["93.184.216.34"]  # the first hop went to the checked address, the second never left


def test_redirects_are_followed_checked_and_limited_in_size() -> None:
    def opener(url: str, address: str, host: str, timeout: float) -> Response:
        if host == "images.example":
            return Response(301, "https://cdn.example/b.png", iter(()))
        return Response(200, None, iter([b"x" * 600, b"y" * 600]))

    with pytest.raises(ResolutionFailed, match="larger than 1000 bytes"):
        fetch("https://images.example/a.png", Limits(1000, 5), resolver=public_resolver, opener=opener)
    assert fetch("https://images.example/a.png", Limits(2000, 5), resolver=public_resolver, opener=opener) == (
        b"x" * 600 + b"y" * 600
    )


def test_a_streamed_body_is_byte_for_byte_the_plain_encoding(root: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, image_roots=str(root))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare \u00e9"},
                {"type": "image_url", "image_url": {"url": str(root / "ok.png"), "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://x.example/a.jpg"}},
                {"type": "image_url", "image_url": {"url": str(root / "ok.jpg")}},
            ],
        }
    ]
    body = build_body("a1", messages, settings)
    assert isinstance(body, StreamingBody)
    streamed = b"".join(iter(lambda: body.read(8192), b""))
    expected_messages = json.loads(json.dumps(messages))
    parts = expected_messages[0]["content"]
    parts[1]["image_url"]["url"] = data_uri("png", png_bytes(64, 48))
    parts[3]["image_url"]["url"] = data_uri("jpeg", jpeg_bytes(320, 240))
    assert streamed == encode_request("a1", expected_messages)
    assert len(body) == len(streamed)
    assert base64.b64decode(json.loads(streamed)["messages"][0]["content"][1]["image_url"]["url"].split(",")[1]) == (
        png_bytes(64, 48)
    )


def test_a_file_that_vanished_before_the_attempt_fails_the_resolution(root: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, image_roots=str(root))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(root / "ok.png")}}]}]
    os.remove(root / "ok.png")
    with pytest.raises(ResolutionFailed, match="ok.png does not exist"):
        build_body("a1", messages, settings)


def _replace(path: Path, data: bytes) -> None:
    """Put another file at ``path``, as an editor or a scanner's software does (a new file moved over it), with a
    modification time that differs from the old one's even on a file system with a coarse clock."""
    before = path.stat().st_mtime_ns
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    os.utime(fresh, ns=(before + 10**9, before + 10**9))
    os.replace(fresh, path)


def _one_image(url: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.parametrize("name", ["ok.png", "doc.pdf"])
def test_a_file_replaced_after_submit_is_refused_not_sent(root: Path, tmp_path: Path, name: str) -> None:
    from tests.images import pdf_bytes

    if name == "doc.pdf":
        (root / name).write_bytes(pdf_bytes((144, 72)))
    settings = Settings(data_dir=tmp_path, image_roots=str(root), pdf_dpi=72.0)
    messages = _one_image(str(root / name))
    files = refs.fingerprints(messages)
    assert list(files) == [str(root / name)]
    streamed = build_body("a1", messages, settings, files)  # the file as submitted: sent
    assert isinstance(streamed, StreamingBody)
    assert len(b"".join(iter(lambda: streamed.read(65536), b""))) == len(streamed)
    _replace(root / name, png_bytes(64, 48) if name == "ok.png" else pdf_bytes((144, 72)))
    with pytest.raises(ResolutionFailed, match=f"{name} was replaced or rewritten after the job was submitted"):
        build_body("a1", messages, settings, files)
    assert isinstance(build_body("a1", messages, settings), StreamingBody)  # a job stored without fingerprints


def test_a_file_rewritten_in_place_after_submit_is_refused(root: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, image_roots=str(root))
    messages = _one_image(f"file://{root}/ok.png")
    files = refs.fingerprints(messages)
    before = (root / "ok.png").stat().st_mtime_ns
    (root / "ok.png").write_bytes(png_bytes(48, 64))  # the same size, other pixels, the same inode
    os.utime(root / "ok.png", ns=(before + 1, before + 1))  # one nanosecond later
    with pytest.raises(ResolutionFailed) as caught:
        build_body("a1", messages, settings, files)
    message = str(caught.value)
    assert f"image reference file://{root}/ok.png:" in message
    assert "submit it again to send it as it is" in message


def test_a_file_replaced_between_the_check_and_the_send_is_not_streamed(root: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, image_roots=str(root))
    messages = _one_image(str(root / "ok.png"))
    files = refs.fingerprints(messages)
    body = build_body("a1", messages, settings, files)
    assert isinstance(body, StreamingBody)
    _replace(root / "ok.png", png_bytes(64, 48))
    with pytest.raises(ResolutionFailed, match="ok.png was replaced or rewritten"):
        body.digest()


def test_fingerprints_name_each_local_file_once_and_nothing_else(root: Path) -> None:
    url = str(root / "ok.png")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}},
                {"type": "image_url", "image_url": {"url": data_uri("png", png_bytes(2, 2))}},
            ],
        }
    ]
    info = (root / "ok.png").stat()
    assert refs.fingerprints(messages) == {url: [info.st_size, info.st_mtime_ns]}
    assert refs.fingerprints([{"role": "user", "content": "no images"}]) == {}


def test_a_pdf_is_cut_at_the_page_limit_each_page_a_png(root: Path, tmp_path: Path) -> None:
    from tests.images import pdf_bytes

    (root / "long.pdf").write_bytes(pdf_bytes(*[(144, 72)] * 5))
    settings = Settings(data_dir=tmp_path, image_roots=str(root), pdf_max_pages=3, pdf_dpi=72.0)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(root / "long.pdf")}}]}]
    body = build_body("a1", messages, settings)
    assert isinstance(body, StreamingBody)
    parts = json.loads(b"".join(iter(lambda: body.read(65536), b"")))["messages"][0]["content"]
    assert len(parts) == 3
    for part in parts:
        data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
        assert data.startswith(b"\x89PNG")
        assert data[16:24] == (144).to_bytes(4, "big") + (72).to_bytes(4, "big")


def _drip_server(body: bytes, every: float) -> tuple[str, Callable[[], None]]:
    """A plain HTTP server on a free port that sends ``body`` one byte per ``every`` seconds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for byte in body:
                if stop.wait(every):
                    return
                with contextlib.suppress(OSError):
                    connection.sendall(bytes([byte]))

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/", lambda: (stop.set(), listener.close())


def test_a_body_that_trickles_in_is_cut_off_at_the_fetch_deadline() -> None:
    """A read timeout is per read: a host sending a byte every half second must not hold a worker past its time."""
    url, stop = _drip_server(png_bytes(4, 4), every=0.5)
    session = requests.Session()
    started = time.monotonic()
    try:
        with pytest.raises(ResolutionFailed, match="took longer than 1.5s"):
            b"".join(remote._chunks(session.get(url, stream=True, timeout=5), session, 1.5))
    finally:
        stop()
    assert time.monotonic() - started < 4  # not the body's length x 0.5 s


def test_a_body_within_the_deadline_is_whole() -> None:
    body = png_bytes(4, 4)
    url, stop = _drip_server(body[:3], every=0.01)
    session = requests.Session()
    try:
        assert b"".join(remote._chunks(session.get(url, stream=True, timeout=5), session, 5.0)) == body[:3]
    finally:
        stop()

"""Image references judged at submit without reading files: https URLs (host and port), schemes, and
data URIs (the declared type against the bytes)."""

from __future__ import annotations

import pytest

from qbgw.errors import InvalidImage
from qbgw.images.resolve import refs
from tests.images import data_uri, jpeg_bytes, png_bytes

POLICY = refs.Policy()
PNG, JPEG = png_bytes(4, 3), jpeg_bytes(5, 4)


@pytest.mark.parametrize(
    "url",
    [
        "https://images.example.org/derm/0042.jpg",
        "https://h.example:8443/x.png",
        "https://h.example:/x.png",  # an empty port is the default one (RFC 3986)
        "https://h.example:00443/x.png",
        "https://h.example:65535/x.png",
        "https://93.184.216.34/x.png",
        "https://[2606:4700:4700::1111]:443/x.png",
        "https://bücher.example/x.png",
        "https://xn--bcher-kva.example/x.png",
        "https://legacy_bucket.s3.example.com/x.png",
        "https://h.example./x.png",
        "https://H.EXAMPLE/x.png?size=2#top",
    ],
)
def test_an_https_url_with_a_host_and_port_that_can_be_connected_to_passes(url: str) -> None:
    refs.check(url, POLICY)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://h:abc/x.png", "the port 'abc' of an https URL is not a number from 1 to 65535"),
        ("https://h:65536/x.png", "the port '65536' of an https URL is not a number from 1 to 65535"),
        ("https://h:0/x.png", "the port '0' of an https URL is not a number"),
        ("https://h:-1/x.png", "the port '-1' of an https URL is not a number"),
        ("https://h:+80/x.png", "the port '+80' of an https URL is not a number"),
        ("https://h:٨٠/x.png", "is not a number from 1 to 65535"),  # Arabic-Indic digits
        ("https://h:99999999999999999999/x.png", "is not a number from 1 to 65535"),
        ("https://h:80:81/x.png", "the port '80:81' of an https URL is not a number"),
        ("https://[::1/x.png", "an https URL's IPv6 address lacks its closing ']'"),
        ("https://[::1]x/x.png", "must be followed by ':port' or '/'"),
        ("https://[not:an:address]/x.png", "is not an IPv6 address"),
        ("https://[1.2.3.4]/x.png", "is not an IPv6 address"),
        ("https://[fe80::1%25eth0]/x.png", "is not an IPv6 address"),
        ("https://exa mple.org/x.png", "the host 'exa mple.org' of an https URL is not a host name"),
        ("https://exa\tmple.org/x.png", "is not a host name"),  # urlsplit would drop the tab
        ("https://exa\nmple.org/x.png", "is not a host name"),
        ("https://h<script>/x.png", "is not a host name"),
        ("https://h\\evil.example/x.png", "is not a host name"),
        ("https://%68.example/x.png", "is not a host name"),
        ("https://bad..dots/x.png", "is not a host name"),
        ("https://-dash.example/x.png", "is not a host name"),
        ("https://" + "a" * 64 + ".example/x.png", "is not a host name"),
        ("https://a\u200b.example/x.png", "is not a host name"),  # IDNA would map the zero-width space away
        ("https://\uff45xample.org/x.png", "is not a host name"),  # and the fullwidth e to an "e"
        ("https://h.example\uff0fx.png", "is not a host name"),  # a fullwidth solidus, not a "/"
        ("https:///x.png", "an https URL needs a host"),
        ("https://:443/x.png", "an https URL needs a host"),
        ("https://user:pw@h.example/x.png", "must not carry credentials"),
        ("https://@h.example/x.png", "must not carry credentials"),
        # A number for a host is an address, written as one: browsers read these as 127.0.0.1 and the like.
        ("https://999.999.999.999/x.png", "is a number but not an IPv4 address"),
        ("https://1.2.3.4.5/x.png", "is a number but not an IPv4 address"),
        ("https://0x7f000001/x.png", "is a number but not an IPv4 address"),
        ("https://2130706433/x.png", "is a number but not an IPv4 address"),
        ("https://127.1/x.png", "is a number but not an IPv4 address"),
        ("https://010.0.0.1/x.png", "is a number but not an IPv4 address"),
    ],
)
def test_an_https_url_whose_host_or_port_cannot_be_parsed_is_refused_at_submit(url: str, reason: str) -> None:
    with pytest.raises(InvalidImage) as caught:
        refs.check(url, POLICY)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("http://127.0.0.1/x.png", "http"),
        ("ftp://host/x.png", "ftp"),
        ("s3://bucket/x.png", "s3"),
        ("javascript:alert(1)", "javascript"),
        ("gopher://h:70/_x", "gopher"),
        ("HTTP://h/x.png", "HTTP"),
    ],
)
def test_a_refused_scheme_is_named_with_the_accepted_ones(url: str, scheme: str) -> None:
    with pytest.raises(InvalidImage) as caught:
        refs.check(url, POLICY)
    assert str(caught.value) == (
        f"the scheme {scheme!r} is not accepted: an image reference must be an https:// URL, a "
        "data:image/...;base64, URI, or a local file path (absolute or file://)"
    )


def test_an_accepted_scheme_in_capitals_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidImage, match="the scheme 'HTTPS' must be written in lower case: an image reference"):
        refs.check("HTTPS://h.example/x.png", POLICY)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        (data_uri("gif", PNG), "data uri declares 'image/gif'; accepted: image/jpeg, image/png"),
        (data_uri("webp", JPEG), "data uri declares 'image/webp'; accepted: image/jpeg, image/png"),
        (data_uri("svg+xml", PNG), "data uri declares 'image/svg+xml'; accepted: image/jpeg, image/png"),
        (data_uri("jpg", JPEG), "data uri declares 'image/jpg' (write image/jpeg); accepted: image/jpeg, image/png"),
        (data_uri("png", JPEG), "data uri declares image/png but its bytes are a jpeg"),
        (data_uri("jpeg", PNG), "data uri declares image/jpeg but its bytes are a png"),
    ],
)
def test_a_data_uri_must_declare_jpeg_or_png_and_hold_what_it_declares(uri: str, reason: str) -> None:
    with pytest.raises(InvalidImage) as caught:
        refs.check(uri, POLICY)
    assert str(caught.value) == reason


@pytest.mark.parametrize(
    "uri",
    [
        data_uri("png", PNG),
        data_uri("jpeg", JPEG),
        data_uri("PNG", PNG),
        "data:image/png;name=a.png;base64," + data_uri("png", PNG).partition(",")[2],
    ],
)
def test_a_data_uri_that_declares_what_it_holds_passes(uri: str) -> None:
    refs.check(uri, POLICY)


@pytest.mark.parametrize("url", ["https://192.0.2.7/x.png", "https://192.0.2.7./x.png", "https://1e100.net/x.png"])
def test_a_dotted_quad_and_a_name_with_digits_are_hosts(url: str) -> None:
    refs.https_target(url)

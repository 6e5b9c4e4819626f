"""The gateway's response mapping, and the client over a fake transport (no sockets)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import requests
from requests.adapters import BaseAdapter

from qbgw import errors
from qbgw.settings import Secret
from qbgw.upstream.gateway import GatewayClient, error_reasons, interpret, parse_retry_after


def body(data: object) -> bytes:
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("status", "content", "kind", "reasons"),
    [
        (400, body({"errors": ["messages is invalid"]}), errors.UpstreamRejected, ("messages is invalid",)),
        (
            401,
            body({"errors": {"base": ["Required session does not exist"]}}),
            errors.AuthenticationFailed,
            ("Required session does not exist",),
        ),
        (403, body({"errors": ["Forbidden"]}), errors.UpstreamRejected, ("Forbidden",)),
        (404, body({"errors": ["Not found"]}), errors.UpstreamRejected, ("Not found",)),
        (405, body({"errors": ["feature off"]}), errors.FeatureDisabled, ("feature off",)),
        (408, b"", errors.UpstreamServerError, ()),
        (413, b"too big", errors.UpstreamRejected, ()),
        (422, body({"errors": {"image": ["is too large"]}}), errors.UpstreamRejected, ("image: is too large",)),
        (429, body({"errors": ["Rate limit"]}), errors.RateLimited, ("Rate limit",)),
        (500, body({"errors": "boom"}), errors.UpstreamServerError, ("boom",)),
        (502, b"<html>Bad Gateway</html>", errors.UpstreamServerError, ()),
        (503, body({"errors": ["Service Unavailable"]}), errors.UpstreamServerError, ("Service Unavailable",)),
        (200, body({"result": "x"}), errors.MalformedResponse, ()),
        (200, body({"answer": 42}), errors.MalformedResponse, ()),
        (200, b"not json", errors.MalformedResponse, ()),
        (302, b"", errors.UpstreamRejected, ()),
    ],
)
def test_each_status_maps_to_one_error_class(
    status: int, content: bytes, kind: type[errors.GatewayError], reasons: tuple[str, ...]
) -> None:
    answer, error = interpret(status, content, {})
    assert answer is None
    assert type(error) is kind
    assert error.status == status
    assert error.reasons == reasons
    assert f"HTTP {status}" in str(error)


def test_a_success_body_gives_the_answer() -> None:
    assert interpret(200, body({"answer": "Hello!"}), {}) == ("Hello!", None)


def test_error_reasons_reads_both_documented_shapes_and_garbage() -> None:
    assert error_reasons({"errors": ["a", "b"]}) == ("a", "b")
    assert error_reasons({"errors": {"base": ["Required session does not exist"]}}) == (
        "Required session does not exist",
    )
    assert error_reasons(None) == ()
    assert error_reasons([1]) == ()
    assert error_reasons({"x": 1}) == ()


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        (" 0 ", 0.0),
        ("Wed, 25 Nov 2026 12:00:30 GMT", 30.0),
        ("Wed, 25 Nov 2026 11:00:00 GMT", 0.0),
        ("soon", None),
        ("86400", 3600.0),  # a day would hold the fleet: an hour is the most honoured
        ("9" * 400, 3600.0),  # float() of this is inf
        ("Wed, 25 Nov 2099 12:00:00 GMT", 3600.0),
        ("Wed, 25 Nov 9999 23:59:59 +1400", 3600.0),
        ("²", None),  # a Unicode digit: str.isdigit() says yes, float() would raise
        ("١٢", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_takes_seconds_or_an_http_date(header: str | None, seconds: float | None) -> None:
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == seconds


def test_a_429_carries_its_retry_after() -> None:
    _, error = interpret(429, b"{}", {"Retry-After": "3"})
    assert isinstance(error, errors.RateLimited)
    assert error.retry_after == 3.0


class RaisingAdapter(BaseAdapter):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:
        raise self.exc

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (requests.ConnectTimeout("x"), errors.UpstreamUnavailable),
        (requests.ReadTimeout("x"), errors.UpstreamTimeout),
        (requests.ConnectionError("reset"), errors.UpstreamUnavailable),
        (requests.exceptions.ChunkedEncodingError("x"), errors.UpstreamUnavailable),
    ],
)
def test_transport_errors_are_translated_once(exc: Exception, kind: type[errors.GatewayError]) -> None:
    session = requests.Session()
    session.mount("https://", RaisingAdapter(exc))
    client = GatewayClient("https://gw.example", Secret("t"), timeout=(1, 1), session=session)
    exchange = client.send(b"{}")
    assert type(exchange.error) is kind
    assert exchange.status is None
    assert exchange.answer is None


def test_the_client_repr_hides_the_token() -> None:
    client = GatewayClient("https://gw.example", Secret("very-secret"), timeout=(1, 2))
    assert "very-secret" not in repr(client)


def _as_sent(prepared: requests.PreparedRequest) -> tuple[object, ...]:
    return (prepared.method, prepared.url, dict(prepared.headers), prepared.body, prepared.hooks)


@pytest.mark.parametrize("kind", ["bytes", "stream", "empty"])
def test_a_call_is_prepared_as_session_request_prepares_it(kind: str) -> None:
    # GatewayClient copies a request prepared once instead of preparing each one (Session.request): the copy must
    # be the request Session.request would send, headers (the session's own merged in), body and length included.
    from qbgw.images.body import StreamingBody

    session = requests.Session()
    session.trust_env = False  # as the client's own session (settings read from the environment once)
    session.headers["X-Session-Wide"] = "kept"
    client = GatewayClient("https://gw.example/", Secret("tok"), timeout=(1, 1), session=session)
    credentials = {"QB-Token": "tok-123"}

    def make() -> bytes | StreamingBody:
        if kind == "stream":
            return StreamingBody([b'{"a":"', b"x" * 70_000, b'"}'])
        return b"" if kind == "empty" else b'{"smart_chat_assistant_id":"a","messages":[]}'

    headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "qbgw/0.1"}
    expected = session.prepare_request(
        requests.Request("POST", client.url, data=make(), headers={**headers, **credentials})
    )
    made = client._prepared(make(), credentials)
    assert made is not None
    sent, wanted = _as_sent(made), _as_sent(expected)
    if kind == "stream":  # each body is its own object: compare what they hold
        assert isinstance(made.body, StreamingBody)
        assert isinstance(expected.body, StreamingBody)
        assert made.body.read() == expected.body.read()
        sent, wanted = sent[:3] + sent[4:], wanted[:3] + wanted[4:]
    assert sent == wanted
    assert made.headers["QB-Token"] == "tok-123"
    assert "QB-Token" not in client._template.headers  # the template is never changed
    session.cookies.set("sid", "1")  # a gateway that set a cookie: Session.request prepares the call (and sends it)
    assert client._prepared(make(), credentials) is None
    session.cookies.clear()
    session.trust_env = True  # a session that reads the environment per call: Session.request does that
    assert client._prepared(make(), credentials) is None

"""The gateway client against the emulator over a real socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbgw import errors
from qbgw.emulator.server import Emulator
from qbgw.settings import Secret
from qbgw.upstream.gateway import GatewayClient, encode_request
from tests.conftest import ASSISTANT, TOKEN
from tests.images import data_uri, png_bytes


def client(emu: Emulator, token: str = TOKEN, read: float = 5.0) -> GatewayClient:
    return GatewayClient(emu.url, Secret(token), timeout=(2.0, read))


def ask(gateway: GatewayClient, text: str, assistant: str = ASSISTANT) -> object:
    return gateway.send(encode_request(assistant, [{"role": "user", "content": text}]))


def test_an_answer_comes_back_with_its_audit_facts(emu: Emulator) -> None:
    png = data_uri("png", png_bytes(64, 48))
    body = encode_request(
        ASSISTANT,
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png}},
                ],
            }
        ],
    )
    exchange = client(emu).send(body)
    assert exchange.error is None
    assert exchange.status == 200
    assert exchange.answer is not None
    assert "What is this?" in exchange.answer
    assert "png 64x48" in exchange.answer
    assert exchange.response_bytes
    assert exchange.response_digest
    assert exchange.latency_ms >= 0


@pytest.mark.parametrize(
    ("text", "kind", "status", "reason"),
    [
        ("x [[emulator:fail=503]]", errors.UpstreamServerError, 503, "Service Unavailable"),
        ("x [[emulator:fail=500]]", errors.UpstreamServerError, 500, None),
        ("x [[emulator:fail=405]]", errors.FeatureDisabled, 405, None),
        ("x [[emulator:fail=400]]", errors.UpstreamRejected, 400, None),
        ("x [[emulator:fail=429]]", errors.RateLimited, 429, None),
        ("x [[emulator:html=502]]", errors.UpstreamServerError, 502, None),
        ("x [[emulator:malformed]]", errors.MalformedResponse, 200, None),
    ],
)
def test_upstream_failures_map_onto_the_exception_tree(
    emu: Emulator, text: str, kind: type[errors.GatewayError], status: int, reason: str | None
) -> None:
    exchange = ask(client(emu), text)
    assert type(exchange.error) is kind
    assert exchange.status == status
    if reason:
        assert reason in exchange.error.reasons  # type: ignore[attr-defined]


def test_a_wrong_token_is_authentication_failed_with_the_documented_reason(emu: Emulator) -> None:
    exchange = ask(client(emu, token="expired"), "Hi")
    assert isinstance(exchange.error, errors.AuthenticationFailed)  # type: ignore[attr-defined]
    assert exchange.error.reasons == ("Required session does not exist",)  # type: ignore[attr-defined]


def test_the_feature_switched_off_is_feature_disabled(emu: Emulator) -> None:
    emu.reconfigure(feature_enabled=False)
    assert isinstance(ask(client(emu), "Hi").error, errors.FeatureDisabled)  # type: ignore[attr-defined]


def test_an_unknown_assistant_is_rejected_as_permanent(emu: Emulator) -> None:
    exchange = ask(client(emu), "Hi", assistant="000000000000000000000000")
    assert isinstance(exchange.error, errors.UpstreamRejected)
    assert exchange.status == 404


def test_a_429_with_retry_after_carries_the_wait(emu: Emulator) -> None:
    exchange = ask(client(emu), "x [[emulator:fail=429]] [[emulator:retry-after=3]]")
    assert isinstance(exchange.error, errors.RateLimited)
    assert exchange.error.retry_after == 3.0


def test_a_hang_past_the_read_timeout_is_a_timeout(emu: Emulator) -> None:
    exchange = ask(client(emu, read=0.3), "x [[emulator:sleep=1x1]]")
    assert isinstance(exchange.error, errors.UpstreamTimeout)  # type: ignore[attr-defined]


def test_a_reset_connection_is_unavailable(emu: Emulator) -> None:
    assert isinstance(ask(client(emu), "x [[emulator:reset]]").error, errors.UpstreamUnavailable)  # type: ignore[attr-defined]


def test_nothing_listening_is_unavailable() -> None:
    gateway = GatewayClient("http://127.0.0.1:9", Secret(TOKEN), timeout=(1.0, 1.0))
    assert isinstance(ask(gateway, "Hi").error, errors.UpstreamUnavailable)  # type: ignore[attr-defined]


def test_one_kept_alive_connection_serves_many_requests(emu: Emulator) -> None:
    gateway = client(emu)
    for n in range(20):
        assert ask(gateway, f"request {n}").answer  # type: ignore[attr-defined]
    assert emu.stats()["requests"] == 20


def test_the_proxy_and_ca_settings_are_read_from_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/bundle.pem")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = GatewayClient("https://api.example", Secret("t"), timeout=(1.0, 1.0))
    session = client._session
    assert session.proxies.get("https") == "http://proxy.example:3128"
    assert session.verify == "/etc/ssl/bundle.pem"
    assert not session.trust_env  # not scanned again on every request
    monkeypatch.setenv("NO_PROXY", "api.example")
    bypassing = GatewayClient("https://api.example", Secret("t"), timeout=(1.0, 1.0))
    assert "https" not in bypassing._session.proxies


def test_an_image_that_changes_while_it_is_streamed_is_the_attempt_s_error_not_an_exception(
    emu: Emulator, tmp_path: Path
) -> None:
    from qbgw.images.body import FileImage, StreamingBody

    path = tmp_path / "scan.png"
    path.write_bytes(png_bytes(8, 8))
    size = path.stat().st_size
    body = StreamingBody(
        [
            b'{"smart_chat_assistant_id":"' + ASSISTANT.encode() + b'","messages":[{"role":"user",'
            b'"content":[{"type":"image_url","image_url":{"url":"',
            FileImage(path, "png", size + 3),
            b'"}}]}]}',
        ]
    )
    exchange = client(emu).send(body)  # it announced 3 bytes more than the file now holds
    assert isinstance(exchange.error, errors.ResolutionFailed)
    assert "changed while it was being sent" in str(exchange.error)
    assert exchange.status is None
    assert exchange.answer is None

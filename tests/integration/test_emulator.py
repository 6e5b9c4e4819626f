"""The gateway emulator over a real socket: the contract, the scripted and random faults, the accounting
and the control endpoints."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from qbgw.emulator import server as emulator_module
from qbgw.emulator.server import FAULT_KINDS, GATEWAY_PATH, Emulator, EmulatorConfig
from tests.images import data_uri, jpeg_bytes, png_bytes

TOKEN = "emulator-token"
ASSISTANT = "65d5f3473d5d68095462165d"


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment between us and 127.0.0.1
        yield session


def body(*texts: str, images: tuple[str, ...] = (), assistant: str = ASSISTANT) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": t} for t in texts]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {
        "smart_chat_assistant_id": assistant,
        "messages": [{"role": "developer", "content": "You are helpful"}, {"role": "user", "content": parts}],
    }


def post(
    http: requests.Session,
    em: Emulator,
    payload: object,
    token: str | None = TOKEN,
    timeout: float | tuple[float, float] = 5,
) -> requests.Response:
    headers = {"QB-Token": token} if token is not None else {}
    return http.post(em.url + GATEWAY_PATH, json=payload, headers=headers, timeout=timeout)


def test_missing_token_gets_401_with_the_session_error_shape(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("hi"), token=None)
    assert r.status_code == 401
    assert r.json() == {"errors": {"base": ["Required session does not exist"]}}


def test_wrong_token_gets_401_with_the_session_error_shape(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("hi"), token="expired")
    assert (r.status_code, r.json()) == (401, {"errors": {"base": ["Required session does not exist"]}})


def test_feature_switched_off_gets_405(em: Emulator, http: requests.Session) -> None:
    em.reconfigure(feature_enabled=False)
    r = post(http, em, body("hi"))
    assert r.status_code == 405
    assert r.json() == {"errors": ["HIPAA AI Gateway feature is not enabled for this application"]}


def test_unknown_assistant_gets_404(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("hi", assistant="000000000000000000000000"))
    assert (r.status_code, r.json()) == (404, {"errors": ["Smart chat assistant not found"]})


def test_unknown_role_gets_400_naming_the_message_index(em: Emulator, http: requests.Session) -> None:
    payload = body("hi")
    payload["messages"].append({"role": "tool", "content": "x"})
    r = post(http, em, payload)
    assert r.status_code == 400
    assert r.json()["errors"][0].startswith("messages[2].role must be one of")


def test_bad_part_gets_400_naming_message_and_part(em: Emulator, http: requests.Session) -> None:
    payload = body("hi")
    payload["messages"][1]["content"].append({"type": "audio", "audio": "..."})
    r = post(http, em, payload)
    assert (r.status_code, r.json()) == (400, {"errors": ['messages[1].content[1].type must be "text" or "image_url"']})


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"messages": []}'])
def test_a_body_that_is_not_a_request_object_gets_400(em: Emulator, http: requests.Session, raw: bytes) -> None:
    r = http.post(em.url + GATEWAY_PATH, data=raw, headers={"QB-Token": TOKEN}, timeout=5)
    assert r.status_code == 400
    assert isinstance(r.json()["errors"][0], str)


def test_answer_quotes_the_last_user_text_and_names_every_image(em: Emulator, http: requests.Session) -> None:
    payload = body("first", images=(data_uri("png", png_bytes(64, 48)),))
    payload["messages"].append({"role": "assistant", "content": "ok"})
    images = (data_uri("jpeg", jpeg_bytes(320, 200)), "https://example.com/a.jpg")
    payload["messages"].append(body("What is", "in these?", images=images)["messages"][1])
    r = post(http, em, payload)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.json() == {
        "answer": f'Assistant {ASSISTANT}: you said "What is in these?". Image 1: png 64x48. '
        "Image 2: jpeg 320x200. Image 3: url image, not fetched."
    }


def test_string_content_is_quoted_as_is(em: Emulator, http: requests.Session) -> None:
    payload = {"smart_chat_assistant_id": ASSISTANT, "messages": [{"role": "user", "content": "Hi"}]}
    assert post(http, em, payload).json() == {"answer": f'Assistant {ASSISTANT}: you said "Hi".'}


def test_gif_data_uri_gets_422_accepted_types(em: Emulator, http: requests.Session) -> None:
    gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + bytes(20)
    r = post(http, em, body("look", images=(data_uri("gif", gif),)))
    assert (r.status_code, r.json()) == (422, {"errors": ["Accepted image types: jpeg, png"]})


def test_png_over_the_size_limit_gets_422_max_size(em: Emulator, http: requests.Session) -> None:
    em.reconfigure(max_image_bytes=1024 * 1024)
    big = png_bytes(8, 8) + bytes(1024 * 1024)
    r = post(http, em, body("look", images=(data_uri("png", big),)))
    assert (r.status_code, r.json()) == (422, {"errors": ["Max image size: 1MB"]})


def test_invalid_base64_gets_400(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("look", images=("data:image/png;base64,iVBOR*w0KGgo=",)))
    assert r.status_code == 400
    assert r.json() == {"errors": ["messages[1].content[1].image_url.url: data uri payload is not valid base64"]}


def test_image_url_of_another_scheme_gets_400(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("look", images=("file:///etc/passwd",)))
    assert r.status_code == 400


def test_fail_x2_answers_503_twice_then_200_for_the_same_body(em: Emulator, http: requests.Session) -> None:
    job = body("job A [[emulator:fail=503x2]]")
    other = body("job B")
    statuses = [post(http, em, job).status_code for _ in range(2)]
    assert post(http, em, other).status_code == 200
    last = post(http, em, job)
    assert statuses + [last.status_code] == [503, 503, 200]
    assert last.json()["answer"].endswith('you said "job A".')


def test_fail_body_carries_the_reason_phrase(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("[[emulator:fail=503]]"))
    assert (r.status_code, r.json()) == (503, {"errors": ["Service Unavailable"]})


def test_fail_401_uses_the_session_error_shape(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("[[emulator:fail=401]]"))
    assert (r.status_code, r.json()) == (401, {"errors": {"base": ["Required session does not exist"]}})


def test_429_fault_with_retry_after_sends_the_header(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("[[emulator:fail=429]] [[emulator:retry-after=2]]"))
    assert (r.status_code, r.headers["Retry-After"]) == (429, "2")
    assert r.json() == {"errors": ["Too Many Requests"]}


def test_malformed_gives_200_without_an_answer(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("[[emulator:malformedx1]]"))
    assert r.status_code == 200
    assert "answer" not in r.json()


def test_html_fault_is_a_non_json_502(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("[[emulator:html=502x1]]"))
    assert r.status_code == 502
    assert r.headers["Content-Type"].startswith("text/html")
    assert r.text == "<html><body>Bad Gateway</body></html>"
    with pytest.raises(requests.JSONDecodeError):
        r.json()


def test_reset_makes_the_request_raise_connection_error(em: Emulator, http: requests.Session) -> None:
    with pytest.raises(requests.ConnectionError):
        post(http, em, body("[[emulator:reset]]"))


def test_reset_x1_fails_once_then_the_retry_succeeds(em: Emulator, http: requests.Session) -> None:
    job = body("retry me [[emulator:resetx1]]")
    with pytest.raises(requests.ConnectionError):
        post(http, em, job)
    assert post(http, em, job).status_code == 200
    assert em.stats()["by_status"] == {"reset-after": 1, "200": 1}
    assert em.stats()["faults"] == {"reset-after": 1}


def test_sleep_x1_exceeds_the_read_timeout_once(http: requests.Session) -> None:
    # An emulator of its own: the abandoned request still counts in its stats a second later.
    job = body("slow [[emulator:sleep=5x1]]")
    with Emulator() as own:
        with pytest.raises(requests.ReadTimeout):
            post(http, own, job, timeout=(1, 2.0))
        assert post(http, own, job, timeout=(1, 2.0)).status_code == 200  # answered within 2 s, even when slow


def test_an_unknown_directive_is_a_400(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("[[emulator:explode]]"))
    assert (r.status_code, r.json()) == (400, {"errors": ["Invalid emulator directive [[emulator:explode]]"]})


def test_a_fail_status_outside_400_599_is_a_400(em: Emulator, http: requests.Session) -> None:
    r = post(http, em, body("[[emulator:fail=200]]"))
    assert r.status_code == 400


def test_faults_apply_only_after_the_contract_checks(em: Emulator, http: requests.Session) -> None:
    job = body("[[emulator:fail=503x1]]")
    assert post(http, em, job, token="expired").status_code == 401
    assert post(http, em, job).status_code == 503  # the 401 did not use up the fault


def test_stats_and_arrivals_count_every_gateway_request(em: Emulator, http: requests.Session) -> None:
    before = time.time()
    post(http, em, body("hi"))
    post(http, em, body("hi"), token=None)
    post(http, em, body("[[emulator:fail=503]]"))
    http.get(em.url + "/_emulator/stats", timeout=5)  # control calls are not gateway requests
    stats = em.stats()
    assert (stats["requests"], stats["by_status"]) == (3, {"200": 1, "401": 1, "503": 1})
    arrivals = em.arrivals()
    assert len(arrivals) == 3
    assert arrivals == sorted(arrivals)
    assert arrivals[0] >= before


def test_control_endpoints_read_stats_reset_and_reconfigure(em: Emulator, http: requests.Session) -> None:
    post(http, em, body("hi"))
    stats = http.get(em.url + "/_emulator/stats", timeout=5).json()
    assert (stats["requests"], stats["by_status"]) == (1, {"200": 1})
    assert len(http.get(em.url + "/_emulator/arrivals", timeout=5).json()["arrivals"]) == 1
    r = http.post(em.url + "/_emulator/config", json={"feature_enabled": False, "latency": 0}, timeout=5)
    assert r.status_code == 200
    assert r.json()["feature_enabled"] is False
    assert r.json()["assistants"] == [ASSISTANT]
    assert post(http, em, body("hi")).status_code == 405
    assert http.post(em.url + "/_emulator/reset", timeout=5).json()["requests"] == 0
    assert em.stats()["requests"] == 0


def test_control_config_rejects_unknown_fields_and_bad_types(em: Emulator, http: requests.Session) -> None:
    for change in ({"colour": "red"}, {"latency": "fast"}, {"feature_enabled": 1}, {"tokens": "abc"}):
        r = http.post(em.url + "/_emulator/config", json=change, timeout=5)
        assert r.status_code == 400, change
    assert em.config == EmulatorConfig()


def test_unknown_paths_and_get_on_the_gateway_path_get_404(em: Emulator, http: requests.Session) -> None:
    for r in (http.get(em.url + GATEWAY_PATH, timeout=5), http.post(em.url + "/users.json", timeout=5)):
        assert (r.status_code, r.json()) == (404, {"errors": ["Not found"]})


def test_a_body_over_the_cap_gets_413_and_the_connection_closed(
    em: Emulator, http: requests.Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulator_module, "MAX_BODY_BYTES", 1000)
    r = post(http, em, body("x" * 5000))
    assert (r.status_code, r.json()) == (413, {"errors": ["Request body too large"]})
    assert r.headers["Connection"] == "close"


def test_twenty_sequential_requests_share_one_keep_alive_connection(em: Emulator, http: requests.Session) -> None:
    for i in range(20):
        assert post(http, em, body(f"request {i}")).status_code == 200
    assert em.stats()["connections"] == 1


def test_accepted_sockets_have_tcp_nodelay(em: Emulator) -> None:
    seen: list[int] = []
    original = emulator_module._Handler.setup

    def setup(handler: Any) -> None:
        original(handler)
        seen.append(handler.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(emulator_module._Handler, "setup", setup)
        with requests.Session() as s:
            s.trust_env = False
            s.get(em.url + "/_emulator/stats", timeout=5)
    assert seen
    assert all(seen)


def test_requests_are_served_concurrently(em: Emulator) -> None:
    # Each answer takes 2 s; a server taking one request at a time could not have all eight
    # arrived (been read) before the first is answered. No timing threshold is asserted.
    em.reconfigure(latency=2.0)
    statuses: list[int] = []

    def one() -> None:
        with requests.Session() as s:
            s.trust_env = False
            statuses.append(post(s, em, body("hi")).status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(em.arrivals()) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    all_in_before_any_answer = len(em.arrivals()) == 8 and not statuses
    for t in threads:
        t.join()
    assert all_in_before_any_answer
    assert statuses == [200] * 8


def test_a_stopped_emulator_refuses_connections() -> None:
    em = Emulator().start()
    url = em.url
    em.stop()
    with requests.Session() as s:
        s.trust_env = False
        with pytest.raises(requests.ConnectionError):
            s.get(url + "/_emulator/stats", timeout=2)


# Random faults and the accounting. Each test that needs a config of its own gets an emulator of its own.


PHRASES = {"429": "Too Many Requests", "500": "Internal Server Error", "503": "Service Unavailable"}


def faulty(**config: Any) -> Emulator:
    return Emulator(EmulatorConfig(**config)).start()


def outcome(http: requests.Session, em: Emulator, payload: object, timeout: float = 5) -> str:
    """What a client saw: "reset", "timeout", "malformed" (a 200 without an answer) or the status."""
    try:
        r = post(http, em, payload, timeout=timeout)
    except requests.ReadTimeout:
        return "timeout"
    except requests.ConnectionError:
        return "reset"
    if r.status_code == 200 and "answer" not in r.json():
        return "malformed"
    return str(r.status_code)


@pytest.mark.parametrize(
    ("kind", "seen"),
    [
        ("429", "429"),
        ("429-retry-after", "429"),
        ("500", "500"),
        ("502", "502"),
        ("503", "503"),
        ("hang", "timeout"),
        ("reset-before", "reset"),
        ("reset-after", "reset"),
        ("malformed", "malformed"),
    ],
)
def test_fault_rate_1_with_one_kind_gives_that_fault_every_time(http: requests.Session, kind: str, seen: str) -> None:
    with faulty(fault_rate=1, fault_kinds=(kind,), hang_seconds=0.5, retry_after=3) as own:
        for i in range(3):
            assert outcome(http, own, body(f"job {i}"), timeout=0.2 if kind == "hang" else 5) == seen
        stats = own.stats()
        assert (stats["faults"], stats["requests"]) == ({kind: 3}, 3)
        assert isinstance(stats["last_fault_at"], float)


@pytest.mark.parametrize("kind", ["429", "429-retry-after", "500", "502", "503", "malformed"])
def test_random_fault_replies_carry_their_documented_shape(http: requests.Session, kind: str) -> None:
    with faulty(fault_rate=1, fault_kinds=(kind,), retry_after=3) as own:
        r = post(http, own, body("hi"))
    assert r.headers.get("Retry-After") == ("3" if kind == "429-retry-after" else None)
    if kind == "502":
        assert (r.headers["Content-Type"].startswith("text/html"), r.text) == (
            True,
            "<html><body>Bad Gateway</body></html>",
        )
    elif kind == "malformed":
        assert (r.status_code, r.json()) == (200, {"result": 1})
    else:
        assert (r.status_code, r.json()) == (int(kind[:3]), {"errors": [PHRASES[kind[:3]]]})


def test_resets_and_hangs_count_as_requests_under_their_outcome(http: requests.Session) -> None:
    with faulty(fault_rate=1, fault_kinds=("reset-before",)) as own:
        outcome(http, own, body("a"))
        own.reconfigure(fault_kinds=["reset-after"])
        outcome(http, own, body("b"))
        own.reconfigure(fault_kinds=["hang"], hang_seconds=0.3)
        assert outcome(http, own, body("c"), timeout=0.1) == "timeout"
        deadline = time.monotonic() + 5
        while own.stats()["by_status"].get("200") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = own.stats()
        assert stats["by_status"] == {"reset-before": 1, "reset-after": 1, "200": 1}
        assert (stats["requests"], len(own.arrivals()), stats["bodies"]) == (3, 3, 2)  # no body read before a reset
        assert stats["faults"] == {"reset-before": 1, "reset-after": 1, "hang": 1}


def test_fault_rate_0_gives_no_faults(http: requests.Session) -> None:
    with faulty(fault_rate=0, fault_seed=1) as own:
        assert {outcome(http, own, body(f"job {i}")) for i in range(50)} == {"200"}
        stats = own.stats()
        assert (stats["faults"], stats["last_fault_at"], stats["by_status"]) == ({}, None, {"200": 50})


def test_a_seeded_run_repeats_its_faults_at_about_the_rate(http: requests.Session) -> None:
    def run(em: Emulator) -> list[str]:
        return [outcome(http, em, body(f"job {i}")) for i in range(200)]

    with faulty(fault_rate=0.3, fault_seed=42, hang_seconds=0.01) as own:
        first, first_faults = run(own), own.stats()["faults"]
        own.reset()  # re-seeds
        second, second_faults = run(own), own.stats()["faults"]
    assert first == second
    assert first_faults == second_faults
    injected = sum(first_faults.values())
    assert 0.15 * 200 <= injected <= 0.45 * 200
    visible = sum(o != "200" for o in first) + first_faults.get("hang", 0)
    assert visible == injected
    assert len(set(first_faults)) >= 5


def test_reconfiguring_the_seed_restarts_the_sequence(http: requests.Session) -> None:
    with faulty(fault_rate=0.5, fault_seed=7, fault_kinds=("500",)) as own:
        first = [outcome(http, own, body(f"job {i}")) for i in range(30)]
        own.reconfigure(fault_seed=7)
        assert [outcome(http, own, body(f"job {i}")) for i in range(30)] == first
        assert {"200", "500"} == set(first)


def test_a_retry_before_retry_after_elapses_counts_as_early(http: requests.Session) -> None:
    with faulty(fault_rate=1, fault_kinds=("429-retry-after",), retry_after=2) as own:
        job = body("impatient")
        assert post(http, own, job).headers["Retry-After"] == "2"
        assert post(http, own, job).status_code == 429  # at once: 2 s too early
        assert post(http, own, body("another job")).status_code == 429  # a first try is never early
        stats = own.stats()
        assert (stats["early_retries"], stats["retry_after_sent"], stats["bodies"]) == (1, 3, 2)


def test_a_retry_after_retry_after_elapses_is_not_early(http: requests.Session) -> None:
    with faulty(fault_rate=1, fault_kinds=("429-retry-after",), retry_after=1) as own:
        job = body("patient")
        assert post(http, own, job).status_code == 429
        time.sleep(1.1)
        assert post(http, own, job).status_code == 429
        assert (own.stats()["early_retries"], own.stats()["retry_after_sent"]) == (0, 2)


def test_scripted_429_with_retry_after_is_accounted_too(em: Emulator, http: requests.Session) -> None:
    job = body("[[emulator:fail=429x1]] [[emulator:retry-after=2]]")
    assert post(http, em, job).status_code == 429
    assert post(http, em, job).status_code == 200  # the script is done, but the retry came 2 s early
    assert post(http, em, body("[[emulator:fail=429x1]]")).status_code == 429  # no Retry-After: not tracked
    stats = em.stats()
    assert (stats["early_retries"], stats["retry_after_sent"]) == (1, 1)
    assert stats["faults"] == {"429-retry-after": 1, "429": 1}


def test_a_scripted_fault_is_not_given_a_random_one_too(http: requests.Session) -> None:
    with faulty(fault_rate=1, fault_kinds=("500",)) as own:
        assert post(http, own, body("[[emulator:fail=503]]")).status_code == 503
        assert post(http, own, body("[[emulator:sleep=0.01]]")).status_code == 200
        assert own.stats()["faults"] == {"503": 1, "hang": 1}


def test_random_faults_come_only_after_the_contract_checks(http: requests.Session) -> None:
    with faulty(fault_rate=1, fault_kinds=("503",)) as own:
        assert post(http, own, body("hi"), token="expired").status_code == 401
        assert post(http, own, body("hi", assistant="000000000000000000000000")).status_code == 404
        assert post(http, own, body("hi")).status_code == 503
        assert own.stats()["faults"] == {"503": 1}


def test_stats_have_the_accounting_keys_and_reset_clears_them(em: Emulator, http: requests.Session) -> None:
    post(http, em, body("[[emulator:fail=429]] [[emulator:retry-after=5]]"))
    post(http, em, body("[[emulator:fail=429]] [[emulator:retry-after=5]]"))
    stats = http.get(em.url + "/_emulator/stats", timeout=5).json()
    assert set(stats) == {
        "requests",
        "by_status",
        "connections",
        "faults",
        "last_fault_at",
        "early_retries",
        "retry_after_sent",
        "bodies",
        "sessions_created",
        "sessions_refused",
    }
    assert (stats["faults"], stats["early_retries"], stats["retry_after_sent"], stats["bodies"]) == (
        {"429-retry-after": 2},
        1,
        2,
        1,
    )
    assert time.time() - 5 < stats["last_fault_at"] <= time.time()
    cleared = http.post(em.url + "/_emulator/reset", timeout=5).json()
    assert {k: cleared[k] for k in ("faults", "last_fault_at", "early_retries", "retry_after_sent", "bodies")} == {
        "faults": {},
        "last_fault_at": None,
        "early_retries": 0,
        "retry_after_sent": 0,
        "bodies": 0,
    }
    assert post(http, em, body("[[emulator:fail=429]] [[emulator:retry-after=5]]")).status_code == 429
    assert em.stats()["early_retries"] == 0  # reset() forgot the Retry-After too


def test_control_config_sets_the_fault_fields(em: Emulator, http: requests.Session) -> None:
    change = {"fault_rate": 1, "fault_seed": 3, "fault_kinds": ["500"], "hang_seconds": 0.5, "retry_after": 4}
    r = http.post(em.url + "/_emulator/config", json=change, timeout=5)
    assert r.status_code == 200
    assert {k: r.json()[k] for k in change} == {**change, "fault_rate": 1.0}
    assert em.config.fault_kinds == ("500",)
    assert em.config.fault_rate == 1.0
    assert post(http, em, body("hi")).status_code == 500
    assert http.get(em.url + "/_emulator/config", timeout=5).json()["fault_kinds"] == ["500"]


@pytest.mark.parametrize(
    "change",
    [
        {"fault_rate": 1.5},
        {"fault_rate": -0.1},
        {"fault_rate": True},
        {"fault_kinds": ["boom"]},
        {"fault_kinds": []},
        {"fault_kinds": ["500", "500"]},
        {"fault_kinds": "500"},
        {"fault_seed": "x"},
        {"hang_seconds": -1},
        {"retry_after": 1.5},
        {"retry_after": -1},
        {"fault_rate": 0.5, "fault_kinds": ["boom"]},  # all or nothing
    ],
)
def test_control_config_rejects_bad_fault_fields(em: Emulator, http: requests.Session, change: dict[str, Any]) -> None:
    r = http.post(em.url + "/_emulator/config", json=change, timeout=5)
    assert r.status_code == 400
    assert r.json()["errors"][0].startswith(next(iter(change)) if len(change) == 1 else "fault_kinds")
    assert em.config == EmulatorConfig()


def test_a_config_with_bad_fault_fields_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="fault_kinds"):
        Emulator(EmulatorConfig(fault_kinds=("boom",)))
    with pytest.raises(ValueError, match="fault_rate"):
        Emulator(EmulatorConfig(fault_rate=2))


def test_fault_kinds_default_to_every_kind() -> None:
    assert EmulatorConfig().fault_kinds == FAULT_KINDS
    assert set(FAULT_KINDS) == {
        "429",
        "429-retry-after",
        "500",
        "502",
        "503",
        "hang",
        "reset-before",
        "reset-after",
        "malformed",
    }

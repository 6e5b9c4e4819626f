"""QuickBlox sessions over a real socket: the emulator's ``POST /session.json``, token expiry and renewal,
one session shared by racing workers (a file on the embedded default, Redis in production), the API key,
and ``qbgw auth check``."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

from qbgw.audit.crypto import Keyring
from qbgw.cli.main import EXIT, cli
from qbgw.emulator.server import Emulator, EmulatorConfig
from qbgw.errors import AuthenticationFailed, UpstreamRejected
from qbgw.settings import Secret, Settings
from qbgw.upstream import auth
from qbgw.upstream.gateway import GatewayClient, encode_request
from qbgw.upstream.sessions import FileCache, MemoryCache, RedisCache, SessionCache
from tests.conftest import ASSISTANT, TEST_KEYS

APP = EmulatorConfig()
KEYRING = Keyring.from_spec(TEST_KEYS)


def app_settings(em: Emulator, tmp_path: Path, **changes: Any) -> Settings:
    base = Settings(
        data_dir=tmp_path / "data",
        base_url=em.url,
        connect_timeout=2.0,
        read_timeout=5.0,
        auth="application",
        application_id=APP.application_id,
        auth_key=APP.auth_key,
        auth_secret=Secret(APP.auth_secret),
        encryption_keys=Secret(TEST_KEYS),
    )
    return base.with_(**changes)


def provider(settings: Settings, cache: SessionCache | None = None, margin: float = 0.0) -> auth.SessionToken:
    return auth.SessionToken(
        auth.credentials_of(settings),
        settings.base_url,
        timeout=(2.0, 5.0),
        cache=cache or MemoryCache(),
        margin=margin,
    )


def ask(gateway: GatewayClient, text: str = "Hi") -> Any:
    return gateway.send(encode_request(ASSISTANT, [{"role": "user", "content": text}]))


def created(em: Emulator) -> object:
    return em.stats()["sessions_created"]


def test_an_application_session_is_created_and_accepted_by_the_gateway(em: Emulator, tmp_path: Path) -> None:
    tokens = provider(app_settings(em, tmp_path))
    exchange = ask(GatewayClient(em.url, tokens, timeout=(2.0, 5.0)))
    assert exchange.status == 200
    assert exchange.answer
    assert tokens.session is not None
    assert tokens.session.user_id == 0
    assert tokens.session.application_id == "22"
    assert created(em) == 1


def test_an_expired_session_gets_a_401_then_renew_makes_a_new_one_and_the_next_call_succeeds(
    em: Emulator, tmp_path: Path
) -> None:
    em.reconfigure(session_idle_seconds=1.0)
    tokens = provider(app_settings(em, tmp_path), margin=300.0)
    gateway = GatewayClient(em.url, tokens, timeout=(2.0, 5.0))
    first = tokens.current()  # created now: no expiry announced, so 2 hours are assumed
    em.advance(1.3)  # the emulator forgets a session idle for 1 s: its clock moves on, no sleep
    expired = ask(gateway)
    assert expired.status == 401
    assert expired.error.reasons == ("Required session does not exist",)
    tokens.renew()
    assert tokens.current() != first
    assert created(em) == 2
    assert ask(gateway).status == 200


def test_a_session_is_replaced_before_the_expiry_the_gateway_announces(em: Emulator, tmp_path: Path) -> None:
    em.reconfigure(session_idle_seconds=1.0)
    tokens = provider(app_settings(em, tmp_path), margin=300.0)
    gateway = GatewayClient(em.url, tokens, timeout=(2.0, 5.0))
    assert ask(gateway).status == 200  # its QB-Token-ExpirationDate says: 1 s from now
    time.sleep(1.3)
    assert ask(gateway).status == 200  # renewed ahead of time: no 401
    assert created(em) == 2
    assert em.stats()["by_status"] == {"200": 2}


def test_each_call_slides_the_expiry_so_a_busy_session_lives_on(em: Emulator, tmp_path: Path) -> None:
    em.reconfigure(session_idle_seconds=2.0)
    gateway = GatewayClient(em.url, provider(app_settings(em, tmp_path)), timeout=(2.0, 5.0))
    for _ in range(4):
        assert ask(gateway).status == 200
        em.advance(1.5)  # idle 1.5 s of 2 between calls: each call slides the window
    assert created(em) == 1


def test_a_user_session_is_the_users_and_a_wrong_password_is_a_401(em: Emulator, tmp_path: Path) -> None:
    user = app_settings(em, tmp_path, auth="user", user_login="amigo30", user_password=Secret("amigo30pass"))
    info = auth.create_session(em.url, auth.credentials_of(user), timeout=(2.0, 5.0))
    assert info.user_id > 0
    with pytest.raises(AuthenticationFailed, match="check QBGW_USER_LOGIN and QBGW_USER_PASSWORD") as refused:
        auth.create_session(em.url, auth.credentials_of(user.with_(user_password=Secret("nope"))), timeout=(2, 5))
    assert refused.value.status == 401
    assert refused.value.reasons == ("Unauthorized",)


def test_a_wrong_secret_is_a_422_unexpected_signature(em: Emulator, tmp_path: Path) -> None:
    wrong = app_settings(em, tmp_path, auth_secret=Secret("not-the-secret"))
    with pytest.raises(UpstreamRejected, match="QBGW_AUTH_SECRET") as refused:
        auth.create_session(em.url, auth.credentials_of(wrong), timeout=(2.0, 5.0))
    assert refused.value.status == 422
    assert refused.value.reasons == ("Unexpected signature",)
    assert created(em) == 0


def post_session(em: Emulator, body: dict[str, object]) -> requests.Response:
    return requests.post(em.url + auth.SESSION_PATH, json=body, timeout=5)


def test_a_reused_timestamp_and_nonce_is_refused(em: Emulator, tmp_path: Path) -> None:
    body = auth.session_request(auth.credentials_of(app_settings(em, tmp_path)))
    first, again = post_session(em, body), post_session(em, body)
    assert first.status_code == 201
    assert set(first.json()["session"]) == {
        "application_id",
        "token",
        "ts",
        "nonce",
        "user_id",
        "created_at",
        "updated_at",
        "id",
        "_id",
    }
    assert again.status_code == 422
    assert again.json() == {"errors": {"base": ["Timestamp and nonce already used"]}}


@pytest.mark.parametrize("offset", [-3700, 3700])
def test_a_timestamp_more_than_an_hour_off_is_refused(em: Emulator, tmp_path: Path, offset: int) -> None:
    creds = auth.credentials_of(app_settings(em, tmp_path))
    stale = post_session(em, auth.session_request(creds, timestamp=int(time.time()) + offset))
    assert stale.status_code == 422
    assert stale.json() == {"errors": {"base": ["Unexpected signature"]}}
    em.reconfigure(session_clock_skew=600.0)  # the legacy docs' 10 minutes
    assert post_session(em, auth.session_request(creds, timestamp=int(time.time()) - 900)).status_code == 422
    assert post_session(em, auth.session_request(creds, timestamp=int(time.time()) - 300)).status_code == 201


def test_an_api_key_is_sent_as_authorization_and_accepted(em: Emulator, tmp_path: Path) -> None:
    settings = app_settings(em, tmp_path, auth="apikey", api_key=Secret("emulator-api-key"))
    assert ask(GatewayClient(em.url, auth.token_provider(settings), timeout=(2.0, 5.0))).status == 200
    wrong = auth.token_provider(settings.with_(api_key=Secret("other")))
    assert ask(GatewayClient(em.url, wrong, timeout=(2.0, 5.0))).status == 401


def race(count: int, make: Any) -> list[Secret]:
    """``count`` threads, each with a provider of its own (as separate workers have), call current() at once."""
    providers = [make() for _ in range(count)]
    barrier, found = threading.Barrier(count), [Secret("")] * count

    def run(i: int) -> None:
        barrier.wait()
        found[i] = providers[i].current()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return found


def test_workers_racing_on_the_embedded_default_create_one_session(em: Emulator, tmp_path: Path) -> None:
    em.reconfigure(latency=0.0)
    settings = app_settings(em, tmp_path)
    tokens = race(12, lambda: provider(settings, FileCache(tmp_path / "sessions", KEYRING)))
    assert len(set(tokens)) == 1
    assert created(em) == 1
    stored = b"".join(p.read_bytes() for p in (tmp_path / "sessions").iterdir())
    assert tokens[0].reveal().encode() not in stored  # the token rests encrypted


def test_workers_racing_on_redis_create_one_session(em: Emulator, tmp_path: Path, redis_url: str) -> None:
    import redis

    settings = app_settings(em, tmp_path, application_id="22", broker_url=redis_url)
    key = f"qbgw:session:{auth.credentials_of(settings).cache_key(settings.base_url)}"
    client = redis.Redis.from_url(redis_url)
    client.delete(key)
    try:
        tokens = race(12, lambda: provider(settings, RedisCache(redis_url, KEYRING, hold_seconds=10)))
        assert len(set(tokens)) == 1
        assert created(em) == 1
        stored = client.get(key)
        assert stored
        assert tokens[0].reveal().encode() not in stored
        assert 0 < client.pttl(key) <= 7200_000
    finally:
        client.delete(key)
        client.close()


def test_threads_renewing_one_rejected_session_create_one_new_session(em: Emulator, tmp_path: Path) -> None:
    tokens = provider(app_settings(em, tmp_path))
    tokens.current()
    barrier = threading.Barrier(8)

    def renew() -> None:
        tokens.current()  # each thread used the session that is then rejected
        barrier.wait()
        tokens.renew()

    threads = [threading.Thread(target=renew) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert created(em) == 2


def test_a_renewal_logs_the_fingerprint_never_the_token(
    em: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = provider(app_settings(em, tmp_path))
    tokens.current()
    tokens.renew()
    token = tokens.current().reveal()
    assert "renewed the QuickBlox application session" in caplog.text
    assert token not in caplog.text
    assert APP.auth_secret not in caplog.text


def qbgw(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_auth_check_reports_who_and_until_when_without_the_token(em: Emulator, tmp_path: Path) -> None:
    settings = app_settings(em, tmp_path, auth="user", user_login="amigo30", user_password=Secret("amigo30pass"))
    result = qbgw(settings.to_env(), "auth", "check")
    assert result.exit_code == 0, result.output
    assert "provider: user" in result.stdout
    assert "application: 22" in result.stdout
    assert "as: user " in result.stdout
    assert "token fingerprint: " in result.stdout
    assert "expires: " in result.stdout
    assert created(em) == 1
    assert "amigo30pass" not in result.output


@pytest.mark.parametrize(
    ("changes", "code", "words"),
    [
        ({"auth_secret": Secret("")}, EXIT["config"], "QBGW_AUTH=application needs QBGW_AUTH_SECRET"),
        ({"auth_secret": Secret("wrong")}, EXIT["config"], "HTTP 422 Unprocessable Entity: Unexpected signature"),
        ({"auth": "user", "user_login": "amigo30", "user_password": Secret("x")}, EXIT["config"], "HTTP 401"),
        ({"base_url": "http://127.0.0.1:9"}, EXIT["unavailable"], "connection failed"),
    ],
)
def test_auth_check_fails_in_one_line_with_its_exit_code(
    em: Emulator, tmp_path: Path, changes: dict[str, Any], code: int, words: str
) -> None:
    result = qbgw(app_settings(em, tmp_path, **changes).to_env(), "auth", "check")
    assert result.exit_code == code, result.output
    assert words in result.stderr, result.output
    assert result.stderr.count("\n") == 1, result.output


def test_auth_check_of_a_static_token_looks_its_session_up(em: Emulator, tmp_path: Path) -> None:
    settings = app_settings(em, tmp_path, auth="static", token=Secret("emulator-token"))
    result = qbgw(settings.to_env(), "auth", "check")
    assert result.exit_code == 0, result.output
    assert "as: an application session" in result.stdout, result.output
    expired = qbgw(settings.with_(token=Secret("gone")).to_env(), "auth", "check")
    assert expired.exit_code == EXIT["config"]
    assert "Required session does not exist" in expired.stderr


def test_after_a_refused_creation_a_process_waits_before_asking_again(em: Emulator, tmp_path: Path) -> None:
    tokens = provider(app_settings(em, tmp_path, auth_secret=Secret("wrong")))
    for _ in range(3):
        with pytest.raises(UpstreamRejected, match="Unexpected signature"):
            tokens.current()
    assert em.stats()["sessions_refused"] == 1  # the other two got the same error without a request


def test_a_gateway_call_without_a_session_is_an_exchange_with_the_reason_not_an_exception(
    em: Emulator, tmp_path: Path
) -> None:
    tokens = provider(app_settings(em, tmp_path, base_url="http://127.0.0.1:9"))
    exchange = GatewayClient(em.url, tokens, timeout=(2.0, 5.0)).send(b"{}")
    assert exchange.status is None
    assert "session endpoint" in str(exchange.error)
    assert em.stats()["requests"] == 0


def shared_caches(where: str, settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A maker of caches that are separate objects (as in separate worker processes) over one empty store."""
    if where == "file":
        return lambda: FileCache(tmp_path / "sessions", KEYRING)
    import redis

    redis_url = request.getfixturevalue("redis_url")
    with redis.Redis.from_url(redis_url) as client:
        client.delete(f"qbgw:session:{auth.credentials_of(settings).cache_key(settings.base_url)}")
    return lambda: RedisCache(redis_url, KEYRING, hold_seconds=10)


@pytest.mark.parametrize("where", ["file", "redis"])
def test_a_renewal_by_one_process_reaches_the_others_before_their_next_send(
    em: Emulator, tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    from qbgw.upstream.sessions import REDIS_CHECK_SECONDS

    settings = app_settings(em, tmp_path)
    cache = shared_caches(where, settings, tmp_path, request)
    a, b = provider(settings, cache()), provider(settings, cache())
    old = a.current()
    assert b.current() == old
    assert created(em) == 1
    em.expire_sessions()
    a.renew()  # a met the 401 first
    new = a.current()
    assert new != old
    assert created(em) == 2
    time.sleep(REDIS_CHECK_SECONDS * 1.5)  # how stale a process's view of Redis may be; a file is seen at once
    assert b.current() == new  # b never sends the token the fleet knows is dead
    assert created(em) == 2


@pytest.mark.parametrize("where", ["file", "redis"])
def test_a_401_on_a_token_another_process_replaced_takes_the_shared_one_without_a_new_session(
    em: Emulator, tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    settings = app_settings(em, tmp_path)
    cache = shared_caches(where, settings, tmp_path, request)
    a, b = provider(settings, cache()), provider(settings, cache())
    old = b.current()  # b sends the old token ...
    em.expire_sessions()
    a.current()
    a.renew()  # ... while a renews
    assert b.superseded()
    assert b.current() == a.current() != old
    assert not a.superseded()  # a's own token is the shared one: a 401 on it is a verdict, not news
    assert created(em) == 2


def test_a_static_token_or_an_api_key_is_never_superseded() -> None:
    from qbgw.upstream.gateway import StaticToken

    assert not StaticToken(Secret("t")).superseded()
    assert not auth.ApiKeyToken(Secret("k")).superseded()

"""The session signature against the docs' examples, the expiry header, and how the token providers are
chosen, with no socket. The vectors are the literal strings from the QuickBlox docs, signed independently
here (and pinned to hex digests computed with ``openssl dgst -sha1 -hmac``)."""

from __future__ import annotations

import calendar
import hashlib
import hmac
from pathlib import Path

import pytest

from qbgw.errors import AuthenticationFailed, ConfigError
from qbgw.settings import Secret, Settings
from qbgw.upstream import auth
from qbgw.upstream.gateway import StaticToken
from qbgw.upstream.sessions import FileCache, MemoryCache, RedisCache, SessionInfo

SECRET = "AuthSecretK3y"
APP = {"application_id": 22, "auth_key": "wJHd4cQSxpQGWx5", "nonce": 33432, "timestamp": 1326966962}
APP_STRING = "application_id=22&auth_key=wJHd4cQSxpQGWx5&nonce=33432&timestamp=1326966962"
USER_STRING = APP_STRING + "&user[login]=amigo30&user[password]=amigo30pass"


def hmac_sha1(message: str, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha1).hexdigest()


def test_an_application_session_signs_the_documented_string() -> None:
    assert auth.signing_string(APP) == APP_STRING
    assert auth.sign(APP, SECRET) == hmac_sha1(APP_STRING) == "cd2374423020d4cf7c5f7849eea3cab88ebf503b"


def test_a_user_session_signs_nested_keys_as_user_brackets_sorted_with_the_rest() -> None:
    params = {"user": {"password": "amigo30pass", "login": "amigo30"}, **APP}
    assert auth.signing_string(params) == USER_STRING
    assert auth.sign(params, SECRET) == hmac_sha1(USER_STRING) == "9bc78e203c38fff8605d48d54c811a4b654eeca4"


def test_the_current_docs_example_and_the_signature_field_is_left_out() -> None:
    params = {
        "timestamp": 1572434294,
        "signature": "ignored",
        "nonce": 33432,
        "auth_key": "bbfeCwWtz8dqF4F",
        "application_id": 716730,
    }
    expected = "application_id=716730&auth_key=bbfeCwWtz8dqF4F&nonce=33432&timestamp=1572434294"
    assert auth.signing_string(params) == expected
    assert auth.sign(params, "another secret") == hmac_sha1(expected, "another secret")


def test_values_are_signed_raw_not_url_encoded() -> None:
    params = {"application_id": 22, "auth_key": "k+y/=", "user": {"login": "a b&c", "password": "p@ss"}}
    assert auth.signing_string(params) == "application_id=22&auth_key=k+y/=&user[login]=a b&c&user[password]=p@ss"


def credentials(login: str = "") -> auth.Credentials:
    password = Secret("amigo30pass" if login else "")
    return auth.Credentials("22", "wJHd4cQSxpQGWx5", Secret(SECRET), login, password)


def test_a_session_request_is_signed_with_a_fresh_nonce_and_timestamp_each_time() -> None:
    first, second = auth.session_request(credentials()), auth.session_request(credentials())
    assert first["nonce"] != second["nonce"]
    assert isinstance(first["timestamp"], int)
    assert first["application_id"] == 22
    assert "user" not in first
    for body in (first, second):
        unsigned = {k: v for k, v in body.items() if k != "signature"}
        assert body["signature"] == hmac_sha1(auth.signing_string(unsigned))


def test_a_user_session_request_with_the_docs_nonce_and_timestamp_is_the_docs_vector() -> None:
    body = auth.session_request(credentials("amigo30"), nonce=33432, timestamp=1326966962)
    assert body["user"] == {"login": "amigo30", "password": "amigo30pass"}
    assert body["signature"] == "9bc78e203c38fff8605d48d54c811a4b654eeca4"


def test_the_expiration_header_is_read_as_utc() -> None:
    assert auth.parse_expiration("2017-11-29 07:11:18 UTC") == calendar.timegm((2017, 11, 29, 7, 11, 18))
    assert auth.parse_expiration("tomorrow") is None
    assert auth.parse_expiration(None) is None


@pytest.mark.parametrize(
    ("left", "margin", "renew_after"),
    [(7200, 300, 6900), (7200, 0, 7200), (1, 300, 0.5), (600, 300, 300)],
)
def test_a_session_is_renewed_margin_seconds_early_but_never_before_half_its_time(
    left: float, margin: float, renew_after: float
) -> None:
    info = SessionInfo(Secret("t"), "22", 0, expires_at=1000 + left, noted_at=1000)
    assert info.renew_at(margin) == 1000 + renew_after


def settings(**changes: object) -> Settings:
    return Settings(data_dir=Path("/nonexistent/qbgw"), **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"auth": "application"}, "QBGW_APPLICATION_ID, QBGW_AUTH_KEY, QBGW_AUTH_SECRET"),
        ({"auth": "application", "application_id": "22", "auth_key": "k"}, "QBGW_AUTH_SECRET"),
        (
            {"auth": "user", "application_id": "22", "auth_key": "k", "auth_secret": Secret("s")},
            "QBGW_USER_LOGIN, QBGW_USER_PASSWORD",
        ),
        ({"auth": "apikey"}, "QBGW_API_KEY"),
    ],
)
def test_missing_credentials_are_a_config_error_naming_the_variables(changes: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=f"needs {named} "):
        auth.token_provider(settings(**changes))


def test_a_static_token_stays_the_default_provider() -> None:
    provider = auth.token_provider(settings(token=Secret("tok")))
    assert isinstance(provider, StaticToken)
    assert provider.headers() == {"QB-Token": "tok"}


def test_an_api_key_goes_in_the_authorization_header_and_is_what_the_audit_fingerprints() -> None:
    provider = auth.token_provider(settings(auth="apikey", api_key=Secret("key-123")))
    assert provider.headers() == {"Authorization": "ApiKey key-123"}
    assert provider.current() == Secret("key-123")
    assert not provider.can_renew
    with pytest.raises(AuthenticationFailed, match="QBGW_API_KEY"):
        provider.renew()


@pytest.mark.parametrize(
    ("broker_url", "kind"),
    [("redis://127.0.0.1:6379/0", RedisCache), ("", FileCache), ("amqp://guest@localhost//", MemoryCache)],
)
def test_the_shared_session_lives_where_every_worker_of_the_broker_sees_it(broker_url: str, kind: type) -> None:
    from qbgw.audit.crypto import Keyring

    keyring = Keyring({"k1": b"\x01" * 32}, "k1")
    assert isinstance(auth.shared_cache(settings(broker_url=broker_url), keyring), kind)  # nothing connects yet


def test_no_secret_shows_in_a_repr() -> None:
    secrets = ("AuthSecretK3y", "amigo30pass", "key-123")
    app = settings(
        auth="user",
        application_id="22",
        auth_key="k",
        auth_secret=Secret(SECRET),
        user_login="amigo30",
        user_password=Secret("amigo30pass"),
        api_key=Secret("key-123"),
    )
    shown = [
        repr(app),
        repr(auth.credentials_of(app)),
        repr(auth.token_provider(app)),
        repr(auth.token_provider(app.with_(auth="apikey"))),
        repr(SessionInfo(Secret("tok-abc"), "22", 7, 1.0, 0.0)),
    ]
    assert not [text for text in shown for secret in (*secrets, "tok-abc") if secret in text]

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from qbgw.errors import ConfigError
from qbgw.settings import Secret, Settings


def test_the_defaults_are_the_embedded_default(tmp_path: Path) -> None:
    settings = Settings.from_env({"QBGW_DATA_DIR": str(tmp_path)})
    assert settings.effective_database_url == f"sqlite:///{tmp_path}/qbgw.db"
    assert settings.is_embedded_broker
    assert settings.broker_dir == tmp_path / "broker"
    assert settings.base_url == "https://api.quickblox.com"


def test_values_are_parsed_from_prefixed_variables() -> None:
    settings = Settings.from_env(
        {
            "QBGW_DATABASE_URL": "postgresql+psycopg://u:p@db/qbgw",
            "QBGW_BROKER_URL": "redis://redis:6379/0",
            "QBGW_READ_TIMEOUT": "90",
            "QBGW_MAX_ATTEMPTS": "7",
            "QBGW_TOKEN": "abc123",
            "UNRELATED": "x",
        }
    )
    assert settings.read_timeout == 90.0
    assert settings.max_attempts == 7
    assert settings.token.reveal() == "abc123"
    assert not settings.is_embedded_broker


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QBGW_READ_TIMEOUT": "soon"}, "QBGW_READ_TIMEOUT must be a float; got 'soon'"),
        ({"QBGW_MAX_ATTEMPTS": "0"}, "QBGW_MAX_ATTEMPTS must be at least 1"),
        ({"QBGW_CONNECT_TIMEOUT": "-1"}, "QBGW_CONNECT_TIMEOUT must be a positive number"),
        ({"QBGW_POOL": "fibres"}, "QBGW_POOL must be one of"),
        ({"QBGW_BASE_URL": "api.quickblox.com"}, "QBGW_BASE_URL must start with http"),
        ({"QBGW_TOKEN": "@/nonexistent/token"}, "cannot read secret file /nonexistent/token"),
    ],
)
def test_a_bad_setting_is_named_in_a_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


def test_the_token_never_shows_in_repr_str_or_pickle() -> None:
    settings = Settings.from_env({"QBGW_TOKEN": "s3cr3t-token-value"})
    assert "s3cr3t" not in repr(settings)
    assert "s3cr3t" not in str(settings.token)
    assert "s3cr3t" not in f"{settings.token}"
    with pytest.raises(TypeError):
        pickle.dumps(settings)


def test_a_secret_can_be_read_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    assert Settings.from_env({"QBGW_TOKEN": f"@{tmp_path / 'token'}"}).token.reveal() == "from-file"


def test_to_env_rebuilds_the_same_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, token=Secret("t"), read_timeout=9.5, queue="q1")
    assert Settings.from_env(settings.to_env()) == settings


def test_a_visibility_timeout_shorter_than_a_lease_is_refused() -> None:
    with pytest.raises(ConfigError, match="VISIBILITY_TIMEOUT .* must exceed an attempt's lease"):
        Settings.from_env({"QBGW_READ_TIMEOUT": "120", "QBGW_VISIBILITY_TIMEOUT": "100"})


def test_a_rate_limit_sleep_longer_than_half_the_lease_margin_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"RATE_MAX_SLEEP \(5s\) must be at most half of QBGW_LEASE_MARGIN \(6s\)"):
        Settings.from_env({"QBGW_RATE_MAX_SLEEP": "5", "QBGW_LEASE_MARGIN": "6"})
    assert Settings.from_env({"QBGW_RATE_MAX_SLEEP": "3", "QBGW_LEASE_MARGIN": "6"}).rate_max_sleep == 3.0


def test_a_gevent_pool_is_refused_with_the_reason_and_what_to_use(tmp_path: Path) -> None:
    # Refused where the settings are read, so no qbgw process starts one (nor monkey-patches for one).
    with pytest.raises(ConfigError, match=r"not supported.*every 2 s.*QBGW_POOL=threads"):
        Settings(data_dir=tmp_path).with_(pool="gevent")
    with pytest.raises(ConfigError, match=r"QBGW_POOL=gevent is not supported"):
        Settings.from_env({"QBGW_POOL": "gevent"})


def test_long_waits_are_not_handed_to_the_broker() -> None:
    assert Settings().countdown_limit == 300.0
    assert Settings(visibility_timeout=200, read_timeout=10).countdown_limit == 50.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QBGW_METRICS_PORT": "70000"}, "QBGW_METRICS_PORT must be a TCP port"),
        ({"QBGW_LOG_FORMAT": "xml"}, "QBGW_LOG_FORMAT must be one of auto, json, text"),
    ],
)
def test_operations_settings_are_checked(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_metrics_are_off_and_logs_follow_the_terminal_by_default() -> None:
    settings = Settings.from_env({})
    assert settings.metrics_port == 0
    assert settings.metrics_host == "127.0.0.1"
    assert settings.log_format == "auto"


def test_the_request_limit_is_one_documented_setting_that_every_path_is_given() -> None:
    from qbgw.images import resolve as images

    settings = Settings.from_env({"QBGW_MAX_REQUEST_BYTES": "1000"})
    assert settings.max_request_bytes == 1000
    assert images.policy(settings).max_request_bytes == 1000
    assert Settings().max_request_bytes == 72 * 1024 * 1024
    with pytest.raises(ConfigError, match="QBGW_MAX_REQUEST_BYTES must be at least 1"):
        Settings.from_env({"QBGW_MAX_REQUEST_BYTES": "0"})
    page = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    tables = page[page.index("<!-- settings reference: generated") : page.index("<!-- end of the generated")]
    assert "| `QBGW_MAX_REQUEST_BYTES` |" in tables


def test_settings_made_by_the_constructor_are_validated_too() -> None:
    # Not only from_env and with_: a caller's own Settings(...) cannot carry a refused or contradictory value.
    with pytest.raises(ConfigError, match="gevent is not supported"):
        Settings(pool="gevent")
    with pytest.raises(ConfigError, match="VISIBILITY_TIMEOUT"):
        Settings(visibility_timeout=10.0)


def test_the_configuration_page_is_the_settings_reference_and_every_setting_has_a_meaning() -> None:
    from qbgw.settings import reference, reference_markdown
    from tests.conftest import ROOT

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    start, end = "<!-- settings reference: generated, do not edit by hand -->\n", "<!-- end of the generated"
    table = page[page.index(start) + len(start) : page.index(end)].strip()
    assert table == reference_markdown().strip(), (
        "docs/configuration.md drifted from qbgw.settings.Settings: regenerate its table with "
        "qbgw.settings.reference_markdown()"
    )
    documented = reference()
    assert [d.variable for d in documented] == [f"QBGW_{f.upper()}" for f in Settings.__dataclass_fields__]
    assert all(len(d.meaning) > 15 for d in documented), [d.variable for d in documented if len(d.meaning) <= 15]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_attempts": "3"}, "QBGW_MAX_ATTEMPTS (Settings.max_attempts) must be int, got str"),
        ({"concurrency": True}, "QBGW_CONCURRENCY (Settings.concurrency) must be int, got bool"),
        ({"read_timeout": "30"}, "QBGW_READ_TIMEOUT (Settings.read_timeout) must be int or float, got str"),
        ({"actor": 5}, "QBGW_ACTOR (Settings.actor) must be str, got int"),
        ({"actor": "a\nb"}, "QBGW_ACTOR must be at most 128 characters"),
        ({"subject_key": Secret("short")}, "QBGW_SUBJECT_KEY: must be at least 32 characters"),
        ({"audit_anchor_seconds": 0}, "QBGW_AUDIT_ANCHOR_SECONDS must be a positive number of seconds"),
        ({"fetch_timeout": -1}, "QBGW_FETCH_TIMEOUT must be a positive number of seconds"),
        ({"max_image_pixels": 0}, "QBGW_MAX_IMAGE_PIXELS must be at least 1"),
        ({"fetch_max_bytes": -1}, "QBGW_FETCH_MAX_BYTES must be at least 1"),
        ({"pdf_max_pages": 0}, "QBGW_PDF_MAX_PAGES must be at least 1"),
        ({"pdf_dpi": 0}, "QBGW_PDF_DPI must be a positive number of dots per inch"),
        ({"session_renew_margin": -1}, "QBGW_SESSION_RENEW_MARGIN must be 0 or more"),
    ],
)
def test_a_setting_of_the_wrong_type_or_shape_is_a_config_error_naming_it(
    changes: dict[str, object], message: str
) -> None:
    """Made in code as well as from the environment: refused at once, by name, not met later as a TypeError."""
    with pytest.raises(ConfigError) as refused:
        Settings(**changes)  # type: ignore[arg-type]
    assert message in str(refused.value)


def test_a_path_or_a_secret_may_be_given_as_text(tmp_path: Path) -> None:
    made = Settings(data_dir=str(tmp_path), subject_key="k" * 40)  # type: ignore[arg-type]
    assert made.data_dir == tmp_path
    assert isinstance(made.subject_key, Secret)
    assert made.subject_key.reveal() == "k" * 40


def test_trusted_proxies_are_addresses_or_networks() -> None:
    assert Settings(trusted_proxies="").trusted_proxy_list == []
    assert Settings(trusted_proxies=" 127.0.0.1, 10.0.0.0/8,::1 ,").trusted_proxy_list == [
        "127.0.0.1",
        "10.0.0.0/8",
        "::1",
    ]
    for bad, named in (("proxy.local", "proxy.local"), ("10.0.0.1/8", "10.0.0.1/8"), ("*", "'*'")):
        with pytest.raises(ConfigError, match="QBGW_TRUSTED_PROXIES") as refused:
            Settings(trusted_proxies=f"127.0.0.1,{bad}")
        assert named in str(refused.value)
        assert "10.0.0.0/8" in str(refused.value)


def test_a_url_with_a_password_may_come_from_a_file(tmp_path: Path) -> None:
    """Docker secrets: QBGW_DATABASE_URL=@/run/secrets/database_url; the password stays out of repr and logs."""
    url = "postgresql+psycopg://qbgw:s3cret-pass-word@db.internal:5432/qbgw"
    (tmp_path / "database_url").write_text(url + "\n")
    (tmp_path / "broker_url").write_text("redis://:broker-pass-word@cache:6379/0")
    settings = Settings.from_env(
        {"QBGW_DATABASE_URL": f"@{tmp_path / 'database_url'}", "QBGW_BROKER_URL": f"@{tmp_path / 'broker_url'}"}
    )
    assert settings.database_url == url
    assert settings.broker_url == "redis://:broker-pass-word@cache:6379/0"
    assert "s3cret-pass-word" in settings.secret_values
    assert "broker-pass-word" in settings.secret_values
    # an empty or missing file is an error, never the embedded default by accident
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "latin1").write_bytes(b"postgresql://q:\xe9@h/d")
    for raw, says in (
        (f"@{tmp_path / 'empty'}", "is empty"),
        (f"@{tmp_path / 'missing'}", "cannot read secret file"),
        (f"@{tmp_path / 'latin1'}", "is not UTF-8 text"),
    ):
        with pytest.raises(ConfigError, match="QBGW_DATABASE_URL") as refused:
            Settings.from_env({"QBGW_DATABASE_URL": raw})
        assert says in str(refused.value)
    # other text settings are taken as written
    assert Settings.from_env({"QBGW_ACTOR": "@ops"}).actor == "@ops"


def test_the_repr_blots_out_every_password() -> None:
    shown = repr(
        Settings(
            database_url="postgresql+psycopg://qbgw:pg-pass-word@db:5432/qbgw",
            broker_url="redis://:broker-pass-word@cache:6379/0",
            token=Secret("token-secret-value"),
        )
    )
    assert "pg-pass-word" not in shown
    assert "broker-pass-word" not in shown
    assert "token-secret-value" not in shown
    assert "postgresql+psycopg://qbgw:***@db:5432/qbgw" in shown
    assert shown.startswith("Settings(")
    assert "max_attempts=" in shown


KEY = "k1:" + "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QBGW_MAX_ATTEMPTS": "3000000000"}, "QBGW_MAX_ATTEMPTS must be at most 999,999,999"),
        ({"QBGW_SWEEP_GRACE": "1e300"}, "QBGW_SWEEP_GRACE must be at most 999,999,999"),
        ({"QBGW_AUDIT_RETENTION_DAYS": "9999999999"}, "QBGW_AUDIT_RETENTION_DAYS must be at most"),
        ({"QBGW_MAX_ATTEMPTS": "5_0"}, "QBGW_MAX_ATTEMPTS must be an int"),
        ({"QBGW_MAX_ATTEMPTS": "\uff10\uff15"}, "QBGW_MAX_ATTEMPTS must be an int"),
        ({"QBGW_READ_TIMEOUT": "1_0"}, "QBGW_READ_TIMEOUT must be a float"),
        ({"QBGW_READ_TIMEOUT": "1e999"}, "QBGW_READ_TIMEOUT must be a float"),
        ({"QBGW_ACTOR": "   "}, "QBGW_ACTOR must not be only whitespace"),
        ({"QBGW_ANCHOR_KEY": "x"}, "QBGW_ANCHOR_KEY: must be at least 32 characters"),
        ({"QBGW_ENCRYPTION_KEYS": KEY, "QBGW_SUBJECT_KEY": KEY}, "QBGW_SUBJECT_KEY must not be the PHI key"),
        ({"QBGW_ENCRYPTION_KEYS": KEY, "QBGW_SUBJECT_KEY": KEY[3:]}, "QBGW_SUBJECT_KEY must not be the PHI key"),
        ({"QBGW_ENCRYPTION_KEYS": KEY, "QBGW_SUBJECT_KEY": "01" * 32}, "QBGW_SUBJECT_KEY must not be the PHI key"),
        ({"QBGW_QUEUE": "q", "QBGW_BATCH_QUEUE": "q"}, "QBGW_BATCH_QUEUE must differ from QBGW_QUEUE"),
        ({"QBGW_RATE_COOLDOWN": "90", "QBGW_RATE_COOLDOWN_MAX": "60"}, "QBGW_RATE_COOLDOWN (90s) must be at most"),
        ({"QBGW_BROKER_URL": "foo://bar"}, "QBGW_BROKER_URL must be a Redis or RabbitMQ URL"),
        ({"QBGW_BROKER_URL": "localhost:6379"}, "QBGW_BROKER_URL must be a Redis or RabbitMQ URL"),
        ({"QBGW_RATE_LIMIT_ASSISTANTS": "abc=1,abc=2"}, "'abc' is given twice"),
        ({"QBGW_RATE_LIMIT_ASSISTANTS": "bad id!=5"}, "is not an assistant id"),
    ],
)
def test_values_a_process_would_meet_later_as_a_crash_are_refused_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert message in str(caught.value)


def test_numbers_in_code_must_be_finite_and_the_data_dir_a_directory(tmp_path: Path) -> None:
    import math

    for value in (math.nan, math.inf):
        with pytest.raises(ConfigError, match="QBGW_READ_TIMEOUT must be a finite number"):
            Settings(read_timeout=value)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="QBGW_DATA_DIR .* is a file"):
        Settings(data_dir=tmp_path / "afile")
    assert Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//", redis_url="redis://x/0").broker_url
    assert Settings(rate_limit_assistants="a.1:x-y=2, b=0").assistant_rates == {"a.1:x-y": 2.0, "b": 0.0}

"""Where the fleet keeps its shared state (rate limit, 429 cooldown, QuickBlox session): QBGW_REDIS_URL, the
broker's Redis, the embedded default's files; and the refusal where there is none (a RabbitMQ broker alone)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbgw.audit.crypto import Keyring
from qbgw.errors import ConfigError
from qbgw.settings import Secret, Settings
from qbgw.upstream.auth import shared_cache
from qbgw.upstream.ratelimit import FileLimiter, MemoryLimiter, RedisLimiter, limiter_for
from qbgw.upstream.sessions import FileCache, MemoryCache, RedisCache
from tests.conftest import TEST_KEYS

AMQP = "amqp://guest:hunter2secret@rabbit:5672//"
REDIS = "redis://:redispass99@coord:6379/3"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"QBGW_RATE_LIMIT": "160"}, "QBGW_RATE_LIMIT"),
        ({"QBGW_RATE_LIMIT_PER_ASSISTANT": "5"}, "QBGW_RATE_LIMIT_PER_ASSISTANT"),
        ({"QBGW_RATE_LIMIT_ASSISTANTS": "a1=3"}, "QBGW_RATE_LIMIT_ASSISTANTS"),
        (
            {"QBGW_AUTH": "application", "QBGW_APPLICATION_ID": "1", "QBGW_AUTH_KEY": "k", "QBGW_AUTH_SECRET": "s"},
            "QBGW_AUTH=application",
        ),
        ({"QBGW_AUTH": "user"}, "QBGW_AUTH=user"),
    ],
)
def test_a_fleet_wide_limit_or_session_on_rabbitmq_without_redis_is_refused_with_the_fix(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"QBGW_BROKER_URL": AMQP, **env})
    message = str(refused.value)
    assert named in message
    assert "neither Redis nor the filesystem" in message  # the reason
    assert "Set QBGW_REDIS_URL" in message  # the fix
    assert "amqp://rabbit:5672" in message
    assert "hunter2secret" not in message
    # The same settings with a Redis for the shared state are accepted, the broker unchanged.
    settings = Settings.from_env({"QBGW_BROKER_URL": AMQP, "QBGW_REDIS_URL": REDIS, **env})
    assert settings.coordination_url == REDIS
    assert settings.effective_broker_url == AMQP


def test_rabbitmq_without_a_limit_or_a_session_needs_no_redis() -> None:
    settings = Settings.from_env({"QBGW_BROKER_URL": AMQP, "QBGW_TOKEN": "t"})
    assert settings.coordination_url == ""
    assert isinstance(limiter_for(settings), MemoryLimiter)  # only the 429 cooldown, per process
    assert isinstance(shared_cache(settings, Keyring.from_spec(TEST_KEYS)), MemoryCache)


def test_redis_url_must_be_a_redis_url() -> None:
    with pytest.raises(ConfigError, match="QBGW_REDIS_URL must be a Redis URL"):
        Settings(redis_url="amqp://rabbit//")


def test_the_shared_state_goes_to_redis_url_over_the_broker(tmp_path: Path) -> None:
    keyring = Keyring.from_spec(TEST_KEYS)
    for broker in (AMQP, "redis://broker:6379/0", ""):
        settings = Settings(data_dir=tmp_path, broker_url=broker, redis_url=REDIS, rate_limit=10.0)
        assert settings.coordination_url == REDIS
        limiter, cache = limiter_for(settings), shared_cache(settings, keyring)
        assert isinstance(limiter, RedisLimiter)
        assert isinstance(cache, RedisCache)
        assert limiter._client.connection_pool.connection_kwargs["host"] == "coord"
        assert cache._client.connection_pool.connection_kwargs["db"] == 3
    # Without it: the broker's Redis, else the embedded default's files.
    on_redis = Settings(broker_url="redis://broker:6379/0", rate_limit=10.0)
    assert on_redis.coordination_url == "redis://broker:6379/0"
    assert isinstance(limiter_for(on_redis), RedisLimiter)
    embedded = Settings(data_dir=tmp_path, rate_limit=10.0)
    assert embedded.coordination_url == ""
    assert isinstance(limiter_for(embedded), FileLimiter)
    assert isinstance(shared_cache(embedded, keyring), FileCache)


def test_the_redis_password_is_a_secret_the_logs_blot_out() -> None:
    settings = Settings(broker_url=AMQP, redis_url=REDIS, token=Secret("t"))
    assert "redispass99" in settings.secret_values
    assert "hunter2secret" in settings.secret_values


def test_behind_pgbouncer_the_listener_has_its_own_url_and_its_password_is_a_secret() -> None:
    direct = "postgresql+psycopg://app:listenpass77@db:5432/qbgw"
    settings = Settings.from_env(
        {
            "QBGW_DATABASE_URL": "postgresql+psycopg://app:listenpass77@pgbouncer:6432/qbgw",
            "QBGW_LISTEN_DATABASE_URL": direct,
            "QBGW_DB_TRANSACTION_POOLING": "true",
        }
    )
    assert settings.effective_listen_url == direct
    assert settings.db_transaction_pooling is True
    assert "listenpass77" in settings.secret_values
    assert Settings(database_url="postgresql+psycopg://a@db/x").effective_listen_url == "postgresql+psycopg://a@db/x"

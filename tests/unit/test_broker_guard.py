"""The guard on kombu's Redis channels (``worker.broker_guard``): a channel whose connection Celery closed
under it says so with a connection error, which kombu's and Celery's callers handle, not an AttributeError,
which stopped the worker. The real sequence is in ``tests/e2e/test_restarts.py``."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from qbgw.runtime.broker_guard import guard_redis_channels


def channel_of(connection: Connection) -> kombu_redis.Channel:
    """A Redis channel of ``connection``'s transport, as far as building a pool goes (no socket is opened)."""
    channel = kombu_redis.Channel.__new__(kombu_redis.Channel)
    channel.connection = connection.transport
    return channel


def test_a_channel_whose_connection_was_closed_raises_a_connection_error() -> None:
    guard_redis_channels()
    guard_redis_channels()  # once is enough, twice changes nothing
    connection = Connection("redis://127.0.0.1:1/0")
    channel = channel_of(connection)
    assert channel._connparams()["port"] == 1
    connection.release()  # what Celery's reconnect does: the transport forgets the connection it served
    with pytest.raises(redis.ConnectionError, match="is closed"):
        channel._connparams()
    assert issubclass(redis.ConnectionError, tuple(connection.connection_errors))


def test_celerys_own_worker_command_gets_the_guard_too() -> None:
    """`celery -A qbgw.celery_entry worker` imports that module, not `qbgw worker`: the guard must come with it."""
    import subprocess
    import sys

    code = (
        "import kombu.transport.redis as r; import qbgw.celery_entry; "
        "print(getattr(r.Channel._connparams, '_qbgw_guarded', False))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "True"

"""Broker guard: one patch on kombu's Redis transport, put in place by ``qbgw worker`` at start, so that a
worker rides out a Redis restart instead of dying of an ``AttributeError``. Touches kombu, nothing else.

What goes wrong (Celery 5.7.0 with kombu 5.7.0), when Redis goes away while the worker holds
unacknowledged messages and has a BRPOP pending (jobs running, threads free), and Celery notices the loss on
its remote-control (pub/sub) socket before the BRPOP one:

1. Celery's ``Consumer.on_connection_error_after_connected`` calls ``connection.collect()``, whose
   ``_do_close_self`` closes the task channel first. ``redis.Channel.close`` begins by reading the pending
   BRPOP's reply (``if self._in_poll: self._brpop_read()``, from celery/kombu#1733); on a closed socket that
   raises ``ConnectionError`` and the close is abandoned: not marked closed, nothing restored.
   ``maybe_close_channel`` swallows the error.
2. ``Transport.close_connection`` then closes every channel, newest first; the remote-control channel's
   ``UNSUBSCRIBE`` fails too, which ends that loop before it reaches the task channel again.
   ``_do_close_self`` swallows that as well, and ``_do_close_transport`` sets ``transport.client = None``.
3. Celery 5.7 then closes the connection once more (``ignore_errors(connection, connection.close)``; 5.6
   did not). This time the task channel's close goes through: it drops its pools and restores its
   unacknowledged messages, which needs a new pool, which ``Channel._connparams`` builds from
   ``self.connection.client.hostname``: ``AttributeError: 'NoneType' object has no attribute 'hostname'``.
   Neither ``maybe_close_channel`` nor ``ignore_errors`` catches it (they catch connection errors), so it
   leaves Celery's reconnect handler; the worker logs "Unrecoverable error" and stops. A running task's
   late ack on that channel then fails the same way.

The guard makes ``_connparams`` say what is true: the connection this channel belonged to is closed, a
``redis.ConnectionError``. Every caller on those paths handles connection errors: the close is given up
quietly, Celery reconnects, and a late ack is logged ("Couldn't ack") and dropped. That loses nothing: the
message stays in Redis's unacked index and comes back after the visibility timeout if Redis kept its data,
qbgw's sweeper publishes again the jobs of a Redis that lost them, and the claim makes a redelivery a no-op.
No released kombu or Celery avoids this (5.7.0 is the newest); remove the guard once one does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

__all__ = ["guard_redis_channels"]

_MARK = "_qbgw_guarded"


def guard_redis_channels() -> None:
    """Make a kombu Redis channel whose connection was closed raise ``redis.ConnectionError`` when it needs a
    new connection pool, instead of ``AttributeError`` (see the module docstring). Idempotent."""
    original: Callable[..., Any] = kombu_redis.Channel._connparams
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.ConnectionError("the broker connection this channel belonged to is closed")
        return original(self, asynchronous=asynchronous)

    setattr(_connparams, _MARK, True)
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]

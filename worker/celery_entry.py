"""Celery's own tools on a qbgw fleet: ``celery -A qbgw.celery_entry inspect ping`` (or ``status``,
``inspect active``, ``flower``). Not imported by qbgw itself: Celery's command line needs a module
with an app in it, so this one builds the app from the ``QBGW_*`` environment when it is imported.
A task's name is ``qbgw.run_job`` and its only argument the job id: nothing these tools show is PHI.
"""

from __future__ import annotations

from .execution.tasks import register
from .runtime.app import create_celery_app
from .runtime.broker_guard import guard_redis_channels
from .settings import Settings

__all__ = ["app"]

app = create_celery_app(Settings.from_env())
register(app)  # `celery -A qbgw.celery_entry worker` runs it too
guard_redis_channels()  # and rides out a Redis restart as `qbgw worker` does (see qbgw.runtime.broker_guard)

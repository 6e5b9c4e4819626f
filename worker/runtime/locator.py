"""Locator: this process's runtime for some settings. Only the facade (``producer``, ``queries``, ``control``,
``admin``) and a process's entry points (the Celery task, the sweeper thread, ``qbgw`` commands) call it; the
core is handed a ``Runtime`` (an import-linter contract keeps it so).
"""

from __future__ import annotations

import os
import threading

from ..settings import Settings
from .context import Runtime

__all__ = ["runtime", "reset"]


_runtimes: dict[Settings, Runtime] = {}
_guard = threading.Lock()


def runtime(settings: Settings | None = None) -> Runtime:
    """This process's runtime for ``settings`` (from the environment when None)."""
    with _guard:
        if settings is None:
            settings = _env_settings()
        found = _runtimes.get(settings)
        if found is None or found.pid != os.getpid():
            if found is not None:
                found.abandon()
            found = _runtimes[settings] = Runtime(settings)
        return found


_env: Settings | None = None


def _env_settings() -> Settings:
    global _env
    if _env is None:
        _env = Settings.from_env()
    return _env


def reset() -> None:
    """Drop every runtime of this process (tests and ``qbgw`` commands that change settings)."""
    global _env
    with _guard:
        for rt in _runtimes.values():
            if rt.pid == os.getpid():
                rt.close()
        _runtimes.clear()
        _env = None

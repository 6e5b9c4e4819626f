"""Runs first, before any other qbgw import: gevent's monkey-patching for a gevent worker.

``celery worker -P gevent`` patches at the very start of the ``celery`` program. ``qbgw worker
--pool gevent`` (or ``QBGW_POOL=gevent``) must do the same before its own imports load socket,
ssl, threading, redis and psycopg: psycopg picks its wait function when it is imported, and the
unpatched one (epoll, in C) would block every greenlet of the process on each query. Only the
standard library may be imported here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

__all__ = ["PATCHED", "wants_gevent", "patch_for_gevent_worker"]


def wants_gevent(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether ``argv`` starts a qbgw worker with the gevent pool (``--pool``, else ``QBGW_POOL``)."""
    program = os.path.basename(argv[0]) if argv else ""
    # "qbgw worker ...", or "python -m worker worker ..." (argv[0] is "-m" while the package imports)
    if program not in ("qbgw", "-m", "__main__.py") or len(argv) < 2 or argv[1] != "worker":
        return False
    rest = list(argv[2:])
    for n, arg in enumerate(rest):
        if arg == "--pool" and n + 1 < len(rest):
            return rest[n + 1] == "gevent"
        if arg.startswith("--pool="):
            return arg.partition("=")[2] == "gevent"
    return environ.get("QBGW_POOL") == "gevent"


def patch_for_gevent_worker() -> bool:
    """Monkey-patch the standard library if this process is a gevent worker; returns whether it did."""
    if not wants_gevent(sys.argv, os.environ):
        return False
    try:
        from gevent import monkey  # type: ignore[import-untyped]  # the "gevent" extra: pip install "qbgw[gevent]"
    except ImportError:  # the worker then refuses the pool with a ConfigError that says why
        return False

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
    return True


#: Imported first by the package (worker/__init__.py): patch now, if this is a gevent worker.
PATCHED = patch_for_gevent_worker()

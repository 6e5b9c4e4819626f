"""The block sealer (``QBGW_AUDIT_SEAL=block``): chains the audit events staged by the fleet's commits, every
``QBGW_AUDIT_SEAL_INTERVAL``, in blocks of many transactions under one lock of the chain head and one flush.

Every worker runs one; they take turns on the head's lock, so two never chain the same rows. A staged event
is durable from its transaction's commit (it is in ``audit_pending``, written with the change it records);
it joins the chain, and so the anchors, at the next run.
"""

from __future__ import annotations

import logging
import threading

from ..errors import QbgwError
from ..runtime.locator import runtime
from ..settings import Settings
from ..store import chain

__all__ = ["Sealer"]

log = logging.getLogger("qbgw.sealer")


class Sealer:
    """Runs :func:`qbgw.store.chain.chain_staged` every ``settings.audit_seal_interval`` seconds in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qbgw-sealer", daemon=True)

    def start(self) -> Sealer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after a last run, so what this worker staged before it stopped is chained."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.settings.audit_seal_interval)
            try:
                with runtime(self.settings).transaction() as session:
                    chain.chain_staged(session)
            except QbgwError as exc:  # the database is away; staged events wait for the next run
                log.warning("sealing staged audit events failed: %s", exc, extra={"error_class": type(exc).__name__})
            except Exception as exc:  # a bug in one run must not end the sealing
                log.error("sealing staged audit events failed unexpectedly: %s", type(exc).__name__)
            if stopping:
                return

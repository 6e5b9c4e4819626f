"""The block sealer (``QBGW_AUDIT_SEAL=block``): chains the audit events staged by the fleet's commits, every
``QBGW_AUDIT_SEAL_INTERVAL``, in blocks of many transactions under one lock of the chain head and one flush.

Every worker runs one; they take turns on the head's lock, so two never chain the same rows. A staged event
is durable from its transaction's commit (it is in ``audit_pending``, written with the change it records);
it joins the chain, and so the anchors, at the next run.
"""

from __future__ import annotations

import logging

from ..errors import QbgwError
from ..runtime.locator import runtime
from ..settings import Settings
from .periodic import Periodic

__all__ = ["Sealer"]

log = logging.getLogger("qbgw.sealer")


class Sealer(Periodic):
    """Runs :meth:`qbgw.runtime.context.Runtime.chain_staged` every ``settings.audit_seal_interval`` seconds in a
    daemon thread, and once more when stopped, so what this worker staged before it stopped is chained."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.audit_seal_interval, name="qbgw-sealer", last_run=True)
        self.settings = settings

    def step(self) -> None:
        try:
            runtime(self.settings).chain_staged()
        except QbgwError as exc:  # the database is away; staged events wait for the next run
            log.warning("sealing staged audit events failed: %s", exc, extra={"error_class": type(exc).__name__})

    def failed_unexpectedly(self, exc: Exception) -> None:
        log.error("sealing staged audit events failed unexpectedly: %s", type(exc).__name__)

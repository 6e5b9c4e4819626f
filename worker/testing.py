"""Testing: run qbgw inside a web app's own test suite, without a worker process or any server.

``harness()`` gives a private embedded database (SQLite in a folder), an in-memory broker, and the gateway
emulator on a free port in a thread; jobs submitted through it wait until :meth:`Harness.drain` runs them
in the calling process, as a worker would (claim, call, record, retries), so a test can submit, drain and
read the result in a few milliseconds. The idea of dramatiq's stub broker, with the real store and audit
trail under it::

    import qbgw
    from qbgw.testing import harness

    def test_a_note_is_summarised(tmp_path):
        with harness(tmp_path) as h:                 # also sets QBGW_* for code that reads the environment
            job_id = qbgw.submit(h.assistant_id, [{"role": "user", "content": "Summarise ..."}])
            h.drain()
            assert qbgw.get_job(job_id).status == "succeeded"

The emulator answers as the real gateway is documented to (see ``qbgw.emulator``); directives in a
message's text script faults, e.g. ``[[emulator:fail=503x2]]`` (two 503s, then an answer).
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .emulator.server import Emulator, EmulatorConfig
from .execution.tasks import run_attempt
from .lifecycle import utcnow
from .runtime import locator as runtimes
from .runtime.locator import runtime
from .settings import PREFIX, Secret, Settings
from .store import jobs as store

__all__ = ["Harness", "harness", "ASSISTANT_ID"]

#: An assistant id the harness's emulator knows.
ASSISTANT_ID = sorted(EmulatorConfig().assistants)[0]


@dataclass
class Harness:
    """What :func:`harness` set up: the settings every call should use (or the environment, if it was set),
    the emulator (``emulator.stats()``, ``emulator.reconfigure(...)``), and :meth:`drain`."""

    settings: Settings
    emulator: Emulator
    assistant_id: str = ASSISTANT_ID

    def drain(self, *, timeout: float = 30.0) -> int:
        """Run every job that waits (queued, or retrying) in this process until none is left: each retry as
        soon as it is due. Returns how many deliveries made an attempt or met a fault (those that found nothing to
        do, or were held back by the rate limit or a 429 pause, are not counted).

        Raises:
            TimeoutError: jobs still wait after ``timeout`` seconds (a retry scheduled further away).
        """
        rt = runtime(self.settings)
        deadline, ran = time.monotonic() + timeout, 0
        while True:
            with rt.transaction() as session:
                waiting = store.waiting_jobs(session=session)
            now = utcnow()
            due = [job_id for job_id, at in waiting if at is None or at <= now]
            for job_id in due:
                ran += run_attempt(rt, job_id) not in ("skipped", "throttled")
            if not waiting:
                self._forget_messages()
                return ran
            if not due:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(waiting)} job(s) still wait after {timeout:g}s: {waiting[0][0]}, ...")
                soonest = min(at for _, at in waiting if at is not None)
                time.sleep(min(0.5, max(0.001, (soonest - now).total_seconds())))

    def _forget_messages(self) -> None:
        """The broker's messages were doorbells for jobs the drain ran from the database: drop them."""
        app = runtime(self.settings).celery
        with app.connection_for_write() as connection:
            for queue in self.settings.queues:
                connection.default_channel.queue_purge(queue)


@contextmanager
def harness(
    data_dir: str | os.PathLike[str], *, environ: bool = True, emulator: EmulatorConfig | None = None, **settings: Any
) -> Iterator[Harness]:
    """A private qbgw for a test: SQLite in ``data_dir``, an in-memory broker, the emulator in a thread, a
    random encryption key; ``settings`` override any ``qbgw.Settings`` field (short backoffs
    by default, so retries drain fast). With ``environ`` (the default) the ``QBGW_*`` variables are set to
    match for the duration (and restored after), so code that calls ``qbgw.submit(...)`` without
    ``settings=`` uses the harness too."""
    with Emulator(emulator or EmulatorConfig()) as emu:
        chosen = Settings(
            data_dir=Path(data_dir),
            broker_url="memory://localhost/",
            base_url=emu.url,
            token=Secret(next(iter(emu.config.tokens))),
            sweep_interval=0.0,
            backoff_base=0.01,
            backoff_max=0.05,
            connect_timeout=2.0,
            read_timeout=10.0,
            concurrency=1,
            encryption_keys=Secret("test:" + base64.b64encode(secrets.token_bytes(32)).decode()),
        ).with_(**settings)
        saved = {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
        if environ:
            for key in saved:
                del os.environ[key]
            os.environ.update(chosen.to_env())
        runtimes.reset()
        try:
            yield Harness(chosen, emu)
        finally:
            runtimes.reset()
            if environ:
                for key in [k for k in os.environ if k.startswith(PREFIX)]:
                    del os.environ[key]
                os.environ.update(saved)

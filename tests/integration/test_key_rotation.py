"""A key rotation reaches processes that were already running: a long-lived producer process switches to the
new primary key within ``crypto.FOLLOW_SECONDS`` of ``qbgw keys rotate``, without a restart, and nothing is
left under the old key. Real processes (the producer and the CLI) on both databases."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from sqlalchemy import text

from qbgw.admin import count_by_key
from qbgw.audit.crypto import FOLLOW_SECONDS, Keyring
from qbgw.runtime.locator import runtime
from qbgw.settings import Secret, Settings
from tests.conftest import ASSISTANT, ROOT

PRODUCER = f"""
import os, sys, time
import qbgw
settings = qbgw.Settings.from_env()
end = time.monotonic() + 120  # a bound, should the test not say stop
while not os.path.exists(sys.argv[1]) and time.monotonic() < end:
    job_id = qbgw.submit({ASSISTANT!r}, [{{"role": "user", "content": "a note"}}], settings=settings)
    print(job_id, flush=True)
    time.sleep(0.05)
"""


class _Lines:
    """A process's stdout lines, read by a thread as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        stream = process.stdout
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True)
        self.reader.start()

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.lines) >= count, f"only {len(self.lines)} job(s) submitted in {timeout} s"


def test_a_running_producer_encrypts_with_the_rotated_key_within_the_documented_time(settings: Settings) -> None:
    on_file = settings.with_(encryption_keys=Secret(""))
    Keyring({"k0": b"\x01" * 32}, "k0").save(on_file.keyring_path)  # as an operator provides one
    env = {**os.environ, **on_file.to_env()}
    stop = on_file.data_dir / "stop-producing"
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(stop)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Counted in jobs, not seconds: a slow machine starts the producer, and the rotating CLI, later.
    out = _Lines(producer)
    try:
        out.wait_for(5)  # it is up and encrypting with k0
        rotate = subprocess.run(
            [sys.executable, "-m", "qbgw", "keys", "rotate"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        rotated_at = time.time()
        assert rotate.returncode == 0, rotate.stderr
        out.wait_for(len(out.lines) + 25)
        stop.touch()
        producer.wait(60)
        out.reader.join(10)
        assert producer.stderr is not None
        err = producer.stderr.read()
    finally:
        producer.kill()
        producer.wait(10)
        out.reader.join(10)
        for stream in (producer.stdout, producer.stderr):
            if stream is not None:
                stream.close()
    assert producer.returncode == 0, err
    new = Keyring.load(on_file.keyring_path).primary
    assert new != "k0"
    with runtime(on_file).transaction() as session:
        rows = session.execute(text("SELECT id, created_at, payload FROM jobs")).all()
    assert len(rows) == len(out.lines) >= 30
    # Every job stored after the rotation command returned is under the new key, however long the producer ran.
    later = [row for row in rows if _epoch(row.created_at) > rotated_at]
    assert len(later) >= 20
    assert {Keyring.key_id_of(row.payload) for row in later} == {new}
    # And the rotation left nothing under the old key (it waited out FOLLOW_SECONDS before its last pass).
    assert set(count_by_key(settings=on_file)) == {new}
    assert FOLLOW_SECONDS <= 1.0  # what docs/audit.md promises


def _epoch(value: object) -> float:
    from datetime import UTC, datetime

    assert isinstance(value, datetime | str)
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()

"""Demo: the whole pipeline once, on whatever database and broker the settings name.

Starts the emulator in a thread and a worker in a separate process, submits text and image
jobs (one that the emulator fails twice with 503, one it answers 405), waits for them, and
prints each answer or reason with the job's audit events.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from ..emulator.server import Emulator, EmulatorConfig
from ..images import samples
from ..producer import submit
from ..queries import JobView, job_events, wait_for_job
from ..runtime.locator import runtime
from ..settings import Secret, Settings

__all__ = ["run_demo", "demo_jobs"]

ASSISTANT = "65d5f3473d5d68095462165d"
TOKEN = "demo-token"  # noqa: S105 - the demo emulator's own token


def demo_jobs() -> list[tuple[str, list[dict[str, Any]]]]:
    """(title, messages) for each demo job."""
    png = samples.data_uri("png", samples.png_bytes(64, 48))
    jpeg = samples.data_uri("jpeg", samples.jpeg_bytes(320, 240))

    def image(uri: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": uri}}

    return [
        (
            "text",
            [
                {"role": "developer", "content": "You are a concise clinical assistant."},
                {"role": "user", "content": "Summarise: mild headache since Monday, no fever."},
            ],
        ),
        ("png image", [{"role": "user", "content": [{"type": "text", "text": "What is in this scan?"}, image(png)]}]),
        ("jpeg image", [{"role": "user", "content": [{"type": "text", "text": "Describe this photo."}, image(jpeg)]}]),
        ("two 503s, then an answer", [{"role": "user", "content": "Is this retried? [[emulator:fail=503x2]]"}]),
        ("405: gateway feature off", [{"role": "user", "content": "Hello [[emulator:fail=405]]"}]),
        ("two images", [{"role": "user", "content": [{"type": "text", "text": "Compare."}, image(png), image(jpeg)]}]),
    ]


def run_demo(settings: Settings, *, jobs: int = 6, out: Callable[[str], None] = print) -> list[JobView]:
    """Run ``jobs`` demo jobs through a real worker process; returns their final states."""
    with Emulator(EmulatorConfig(tokens=frozenset({TOKEN}), assistants=frozenset({ASSISTANT}))) as emu:
        settings = settings.with_(base_url=emu.url, token=Secret(TOKEN), backoff_base=0.2, backoff_max=2.0)
        runtime(settings).session_factory  # noqa: B018 - migrate the embedded database before the worker starts
        out(f"emulator: {emu.url}   data: {settings.data_dir}")
        worker = _start_worker(settings)
        try:
            catalogue = demo_jobs()
            submitted = []
            for n in range(jobs):
                title, messages = catalogue[n % len(catalogue)]
                submitted.append((title, submit(ASSISTANT, messages, custom_id=f"demo-{n + 1}", settings=settings)))
            out(
                f"submitted {len(submitted)} jobs; worker process {worker.pid} is running them "
                f"(its log: {settings.data_dir / 'demo-worker.log'})\n"
            )
            return [_report(title, job_id, settings, out) for title, job_id in submitted]
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.with_(concurrency=8).to_env()}
    command = [sys.executable, "-m", "qbgw", "worker", "--loglevel", "INFO"]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.data_dir / "demo-worker.log", "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603 - our own -m qbgw


def _report(title: str, job_id: str, settings: Settings, out: Callable[[str], None]) -> JobView:
    view = wait_for_job(job_id, timeout=60, settings=settings)
    out(f"job {job_id} ({title}): {view.status} after {view.attempts} attempt(s)")
    out(f"  answer: {view.answer}" if view.answer is not None else f"  reason: {view.error}")
    for event in job_events(job_id, settings=settings):
        status = f" HTTP {event.http_status}" if event.http_status else ""
        latency = f" {event.latency_ms} ms" if event.latency_ms is not None else ""
        attempt = f" #{event.attempt}" if event.attempt else ""
        out(f"  audit {event.occurred_at:%H:%M:%S.%f}"[:-3] + f" {event.action}{attempt}{status}{latency}")
    out("")
    return view

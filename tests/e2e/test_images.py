"""Images and documents by reference through a real worker: local jpeg, png and PDF files,
an https URL, and a file that vanished or was replaced between submit and the attempt."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qbgw import producer
from qbgw.lifecycle import JobStatus
from qbgw.queries import wait_for_job
from qbgw.settings import Settings
from tests.conftest import ASSISTANT
from tests.images import jpeg_bytes, pdf_bytes, png_bytes


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_local_files_a_pdf_and_a_url_arrive_intact(
    stack: Settings, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    root = tmp_path / "scans"
    root.mkdir()
    (root / "chest.png").write_bytes(png_bytes(640, 480))
    (root / "hand.jpg").write_bytes(jpeg_bytes(300, 200))
    (root / "report.pdf").write_bytes(pdf_bytes((612, 792), (300, 150)))
    settings = stack.with_(image_roots=str(root), pdf_dpi=72.0)
    worker_process(settings)
    content = [
        {"type": "text", "text": "Read these."},
        image(str(root / "chest.png")),
        image(f"file://{root}/hand.jpg"),
        image(str(root / "report.pdf")),
        image("https://images.example/xray.jpg"),
    ]
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": content}], settings=settings)
    view = wait_for_job(job_id, timeout=60, settings=settings)
    assert view.status is JobStatus.SUCCEEDED, view.error
    answer = view.answer or ""
    # The emulator names what it received, decoded from the bytes: each image intact, the PDF's
    # two pages rendered at 72 dpi, and the URL passed through as a URL.
    assert "Image 1: png 640x480. Image 2: jpeg 300x200. Image 3: png 612x792. Image 4: png 300x150." in answer
    assert "Image 5: url image, not fetched." in answer


def _vanish(path: Path) -> None:
    path.unlink()


def _replace(path: Path) -> None:
    """Another patient's scan saved under the same name before a worker took the job."""
    path.with_name("new.png").write_bytes(png_bytes(16, 16))
    os.replace(path.with_name("new.png"), path)


@pytest.mark.parametrize(
    ("change", "reason"),
    [(_vanish, "x.png does not exist"), (_replace, "x.png was replaced or rewritten after the job was submitted")],
)
def test_a_file_gone_or_replaced_before_the_attempt_fails_the_job_with_that_reason_and_is_never_sent(
    stack: Settings,
    worker_process: Callable[..., Any],
    tmp_path: Path,
    change: Callable[[Path], None],
    reason: str,
) -> None:
    root = tmp_path / "scans"
    root.mkdir()
    (root / "x.png").write_bytes(png_bytes(8, 8))
    settings = stack.with_(image_roots=str(root))
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": [image(str(root / "x.png"))]}], settings=settings)
    change(root / "x.png")
    worker_process(settings)
    view = wait_for_job(job_id, timeout=60, settings=settings)
    assert view.status is JobStatus.FAILED
    assert view.error_class == "ResolutionFailed"
    assert view.error is not None
    assert reason in view.error
    assert view.attempts == 1
    assert view.http_status is None  # nothing reached the gateway

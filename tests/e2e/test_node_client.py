"""A Node.js client (tests/e2e/node/client.mjs, Node's built-ins only) against a real ``qbgw serve`` and a real
worker, on both stacks: an image job submitted, long-polled, its result read, and a bad request's problem
detail, and the audit trail names the key's principal as the actor."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qbgw import access, queries
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, ROOT
from tests.e2e.api_server import Server, start_server
from tests.images import png_bytes

CLIENT = ROOT / "tests" / "e2e" / "node" / "client.mjs"
WIDTH, HEIGHT = 64, 48


@pytest.fixture
def server(stack: Settings, tmp_path: Path, worker_process: Callable[..., Any]) -> Iterator[Server]:
    hooked = stack.with_(webhooks_development=True)  # the client's receiver listens on 127.0.0.1
    worker_process(hooked)
    running = start_server(hooked, tmp_path)
    yield running
    running.close()


def run_client(
    node: str, server: Server, image: Path, key: str, webhook_secret: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QBGW_URL": server.url, "QBGW_KEY": key, "QBGW_ASSISTANT_ID": ASSISTANT}
    if webhook_secret is not None:
        env["QBGW_WEBHOOK_SECRET"] = webhook_secret
    return subprocess.run(
        [node, str(CLIENT), str(image)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )


def test_a_node_client_submits_an_image_waits_reads_the_result_and_a_problem(
    node: str, server: Server, tmp_path: Path
) -> None:
    image = tmp_path / "scan.png"
    image.write_bytes(png_bytes(WIDTH, HEIGHT))
    secret = access.webhook_secret("sub", settings=server.settings)
    done = run_client(node, server, image, server.keys["sub"], webhook_secret=secret)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}\nserver:\n{server.log.read_text()}"
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    seen = json.loads(lines[0])
    assert seen["status"] == "succeeded", seen
    assert seen["error"] is None
    assert seen["submitted_by"] == "key:sub"
    # The emulator describes each image by its type and size, as the gateway's model would see it.
    assert f"Image 1: png {WIDTH}x{HEIGHT}." in seen["answer"], seen["answer"]
    assert 'you said "Describe this image."' in seen["answer"]
    assert seen["problem_status"] == 422
    assert seen["problem_type"].startswith("urn:qbgw:problem:")
    assert seen["problem_field"] == "messages"
    # The webhook, verified by the client's own code (HMAC-SHA256 per Standard Webhooks), and refused when the
    # body is altered or the secret is another.
    assert seen["webhook_verified"] is True
    assert seen["webhook_tampered_verified"] is False
    assert seen["webhook_wrong_secret_verified"] is False
    assert (seen["webhook_type"], seen["webhook_job_id"]) == ("job.succeeded", seen["job_id"])
    assert seen["webhook_custom_id"] == seen["custom_id"]
    trail = queries.job_events(seen["job_id"], include_reads=True, settings=server.settings)
    actors = {(e.action, e.actor) for e in trail}
    assert ("job.submitted", "key:sub") in actors, actors
    assert ("result.read", "key:sub") in actors, actors


def test_the_node_client_exits_non_zero_on_an_unexpected_response(node: str, server: Server, tmp_path: Path) -> None:
    image = tmp_path / "scan.png"
    image.write_bytes(png_bytes(8, 8))
    refused = run_client(node, server, image, server.keys["reader"])  # a reader may not submit: 403
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout == ""
    assert "POST /v1/jobs: expected HTTP 202 (HTTP 403)" in refused.stderr
    unknown = run_client(node, server, image, "qbgw_0123456789ab_" + "x" * 43)
    assert unknown.returncode == 1
    assert "(HTTP 401)" in unknown.stderr

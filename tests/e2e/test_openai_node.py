"""The official ``openai`` npm package (tests/e2e/node_openai, installed by ``npm ci`` from its lock file) against
a real ``qbgw serve`` and a real worker, on both stacks: a 200-line batch from upload to output and error files
matched by custom_id, another key's view of the file, a batch cancelled midway, a chat completion with an image,
and refused parameters. Skips without node or npm on a developer's machine; fails under CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qbgw import queries
from qbgw.settings import Settings
from tests.conftest import ASSISTANT, ROOT, require_service
from tests.e2e.api_server import Server, start_server
from tests.e2e.test_openai_compat import HEIGHT, WIDTH, chat_line, jsonl, two_hundred
from tests.images import png_bytes

FOLDER = ROOT / "tests" / "e2e" / "node_openai"


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    """``node client.mjs``, with the ``openai`` package installed by ``npm ci`` (kept in the folder's node_modules
    while its lock file does not change)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    require_service("the node and npm programs", node is not None and npm is not None)
    assert node is not None
    assert npm is not None
    installed = FOLDER / "node_modules" / ".package-lock.json"
    lock = FOLDER / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=FOLDER, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return [node, str(FOLDER / "client.mjs")]


@pytest.fixture
def server(stack: Settings, tmp_path: Path, worker_process: Callable[..., Any]) -> Iterator[Server]:
    worker_process(stack)
    running = start_server(stack, tmp_path)
    yield running
    running.close()


def test_the_openai_npm_package_runs_a_batch_cancels_one_and_chats(
    node_client: list[str], server: Server, tmp_path: Path
) -> None:
    content, failing, images = two_hundred()
    (tmp_path / "notes.jsonl").write_bytes(content)
    slow = [chat_line(f"slow-{i:02d}", f"[[emulator:sleep=0.5]] note {i}") for i in range(60)]
    (tmp_path / "slow.jsonl").write_bytes(jsonl(slow))
    (tmp_path / "scan.png").write_bytes(png_bytes(WIDTH, HEIGHT))
    env = {
        **os.environ,
        "QBGW_URL": server.url,
        "QBGW_KEY": server.keys["sub"],
        "QBGW_OTHER_KEY": server.keys["sub2"],
        "QBGW_ASSISTANT_ID": ASSISTANT,
    }
    paths = [str(tmp_path / name) for name in ("notes.jsonl", "slow.jsonl", "scan.png")]
    done = subprocess.run(
        [*node_client, *paths], env=env, cwd=FOLDER, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}\nserver:\n{server.log.read_text()}"
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    assert seen["file"]["bytes"] == len(content)
    assert (seen["file"]["purpose"], seen["file"]["filename"]) == ("batch", "notes.jsonl")
    batch = seen["batch"]
    assert batch["status"] == "completed"
    assert batch["counts"] == {"total": 200, "completed": 200 - len(failing), "failed": len(failing)}
    assert batch["metadata"] == {"from": "node"}
    output, errors = seen["output"], seen["errors"]
    assert {line["custom_id"] for line in output} | {line["custom_id"] for line in errors} == {
        f"req-{i:03d}" for i in range(200)
    }
    assert len(output) + len(errors) == 200
    assert {line["custom_id"] for line in errors} == failing
    for line in output:
        answer = line["response"]["body"]["choices"][0]["message"]["content"]
        assert f"Summarise note {int(line['custom_id'][4:])}." in answer
        assert (f"Image 1: png {WIDTH}x{HEIGHT}." in answer) == (line["custom_id"] in images)
    assert {line["response"]["status_code"] for line in errors} == {400}

    assert seen["other_retrieve"]["status"] == 404
    assert seen["other_retrieve"]["code"] == "not_found"
    assert seen["other_content"]["status"] == 404
    assert seen["other_list"] == []

    cancel = seen["cancel"]
    assert cancel["first_status"] in ("cancelling", "cancelled")
    assert cancel["status"] == "cancelled"
    assert cancel["counts"]["total"] == 60
    assert cancel["counts"]["failed"] > 0
    assert len(cancel["errors"]) == cancel["counts"]["failed"]
    assert {line["error"]["code"] for line in cancel["errors"]} == {"batch_cancelled"}
    assert len(cancel["output"]) == cancel["counts"]["completed"]
    assert {line["custom_id"] for line in cancel["errors"] + cancel["output"]} == {f"slow-{i:02d}" for i in range(60)}

    chat = seen["chat"]
    assert (chat["object"], chat["model"]) == ("chat.completion", ASSISTANT)
    assert f"Image 1: png {WIDTH}x{HEIGHT}." in chat["answer"]
    trail = {
        (e.action, e.actor) for e in queries.job_events(chat["job_id"], include_reads=True, settings=server.settings)
    }
    assert ("job.submitted", "key:sub") in trail
    assert seen["refused_temperature"] == {
        "status": 400,
        "param": "temperature",
        "code": "unsupported_parameter",
        "type": "invalid_request_error",
    }
    assert seen["refused_stream"]["param"] == "stream"
    assert seen["refused_stream"]["status"] == 400

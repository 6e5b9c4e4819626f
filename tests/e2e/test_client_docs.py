"""The client pages (docs/clients/curl.md, node.md, python.md) run as written against a real ``qbgw serve`` with a
real worker and the gateway emulator.

Every ```sh, ```js and ```python block of those pages carries a marker on the line before it (an HTML comment: the
rendered page does not show it): ``<!-- test: NAME -->``, a block run here, or ``<!-- not run: WHY -->``. A block
marked ``<!-- output: NAME -->`` is what the page says NAME prints, and the test compares it with what the code
printed (job ids aside). The shell blocks run under ``bash -eu -o pipefail`` with ``API``, ``KEY`` and ``JOB`` in
the environment, as the curl page sets them; the JavaScript under ``node``; the Python under this venv's
interpreter. Without bash, curl, jq or node a developer's machine skips; under CI it fails.

The tests run on the ``stack`` fixture's two stacks, the embedded default (SQLite and the filesystem broker) and
PostgreSQL + Redis (where a long-poll is woken by NOTIFY, and ``qbgw.aio.wait`` LISTENs), not on RabbitMQ's too
(``@all_stacks``): the pages' code speaks HTTP, or uses the database, and no broker of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qbgw.settings import Settings
from tests.conftest import ASSISTANT, ROOT, require_service
from tests.e2e.api_server import Server, start_server
from tests.images import png_bytes

CLIENTS = ROOT / "docs" / "clients"
CURL, NODE, PYTHON = CLIENTS / "curl.md", CLIENTS / "node.md", CLIENTS / "python.md"
#: The languages whose blocks are code to run (the others are output, JSON, text).
RUNNABLE = {"sh", "bash", "js", "javascript", "python"}
#: The blocks each page marks ``test: NAME``, and ``output: NAME``: every one of them is run (compared) below.
RUN = {
    CURL: {
        "curl-submit",
        "curl-result-wait",
        "curl-status-wait",
        "curl-image",
        "curl-refused",
        "curl-status-case",
        "curl-batch",
        "curl-audit",
    },
    NODE: {"node-client", "node-run", "node-status-wait"},
    PYTHON: {"python-helpers", "python-blocking", "python-status-wait", "python-async", "python-aio"},
}
SHOWN = {
    CURL: {"curl-result-wait", "curl-image", "curl-refused", "curl-batch"},
    NODE: {"node-run", "node-refused-text", "node-refused-key"},
    PYTHON: {"python-blocking", "python-async", "python-aio"},
}

FENCE = re.compile(r"^( *)```(\S*)\s*$")
MARK = re.compile(r"^\s*<!-- (test|output|not run): (.+?) -->\s*$")
UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
#: The job's text the curl and Python pages submit, and the answer the emulator gives it.
VISIT = "Summarise: mild headache since Monday, no fever."
#: A job that takes 2 s (the emulator's directive is not part of the text it answers to).
SLOW = "take your time"
WIDTH, HEIGHT = 64, 48


@dataclass(frozen=True)
class Block:
    """A fenced block of a page: its language, the marker before it (kind and name, or None) and its text."""

    line: int
    lang: str
    kind: str | None
    name: str | None
    text: str


def blocks(page: Path) -> list[Block]:
    """The page's fenced blocks, top level or indented in a list item (then dedented)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, lang = opening.groups()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].rstrip() == indent + "```")
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(before)
        text = "".join(line[len(indent) :] + "\n" for line in lines[i + 1 : end])
        found.append(Block(i + 1, lang, mark[1] if mark else None, mark[2] if mark else None, text))
        i = end + 1
    return found


def marked(page: Path, kind: str, name: str) -> str:
    chosen = [b.text for b in blocks(page) if (b.kind, b.name) == (kind, name)]
    assert len(chosen) == 1, f"{page.name}: {len(chosen)} blocks marked '{kind}: {name}'"
    return chosen[0]


def code(page: Path, name: str) -> str:
    return marked(page, "test", name)


def shown(page: Path, name: str) -> str:
    return marked(page, "output", name)


def ids_hidden(text: str) -> str:
    return UUID.sub("<job id>", text)


def answer_to(text: str) -> str:
    """The emulator's answer to a message of ``text``."""
    return f'Assistant {ASSISTANT}: you said "{text}".'


def run(
    argv: list[str], cwd: Path, env: dict[str, str], *, code: int = 0, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == code, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def bash(script: str, cwd: Path, env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run(["bash", "-eu", "-o", "pipefail", "-c", script], cwd, env, **kwargs)


def replaced(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` (which must be in it) replaced: a test's own value for a page's placeholder."""
    assert old in text, f"{old!r} is no longer in the block"
    return text.replace(old, new)


def submit(server: Server, content: str, who: str = "sub") -> str:
    answer = server.client(who).post(
        "/v1/jobs", json={"assistant_id": ASSISTANT, "messages": [{"role": "user", "content": content}]}
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def ended(server: Server, job_id: str, who: str = "sub") -> str:
    answer = server.client(who).get(f"/v1/jobs/{job_id}", params={"wait": 30})
    assert answer.status_code == 200, answer.text
    assert answer.json()["done"], answer.text
    return str(answer.json()["status"])


@pytest.fixture
def server(stack: Settings, tmp_path: Path, worker_process: Callable[..., Any]) -> Iterator[Server]:
    worker_process(stack, concurrency=4)
    running = start_server(stack, tmp_path)
    yield running
    running.close()


@pytest.fixture
def shell() -> None:
    require_service("the bash, curl and jq programs", all(shutil.which(p) for p in ("bash", "curl", "jq")))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Where the pages' code runs (it writes result.json, visits.jsonl, qbgw-client.mjs, ...)."""
    folder = tmp_path / "client"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("page", [CURL, NODE, PYTHON], ids=lambda p: p.name)
def test_every_code_block_of_a_client_page_is_run_here_or_says_why_not(page: Path) -> None:
    found = blocks(page)
    assert found, page
    unmarked = [(b.line, b.lang) for b in found if b.lang in RUNNABLE and b.kind not in ("test", "not run")]
    assert unmarked == [], (
        f"{page.name}: code blocks (line, language) without <!-- test: NAME --> or <!-- not run: WHY -->"
    )
    assert [b.lang for b in found if b.kind == "test" and b.lang not in RUNNABLE] == []
    tests = [b.name for b in found if b.kind == "test"]
    outputs = [b.name for b in found if b.kind == "output"]
    assert len(tests) == len(set(tests)), tests
    assert len(outputs) == len(set(outputs)), outputs
    assert set(tests) == RUN[page], "a block marked for a test that does not run it, or the reverse"
    assert set(outputs) == SHOWN[page]
    if shutil.which("bash"):  # the shell blocks not run here parse, at least
        for block in found:
            if block.lang in ("sh", "bash"):
                run(["bash", "-n", "-c", block.text], ROOT, {})


def test_the_curl_page_runs_as_written(shell: None, server: Server, workdir: Path) -> None:
    env = {"API": server.url, "KEY": server.keys["sub"], "AUDITOR_KEY": server.keys["auditor"]}
    submitted = code(CURL, "curl-submit") + 'echo "job $JOB"\n'

    # Submit, then wait for the result itself: the answer, as the page shows it; the same POST again, the same job.
    first = bash(submitted + code(CURL, "curl-result-wait"), workdir, env)
    job_line, *printed = first.stdout.splitlines(keepends=True)
    assert "".join(printed) == shown(CURL, "curl-result-wait") == answer_to(VISIT) + "\n"
    job_id = job_line.split()[1]
    again = bash(submitted + code(CURL, "curl-result-wait"), workdir, env)
    assert again.stdout == first.stdout

    # The alternative, the status long-poll, on another principal's job (its own: the key is idempotent per key).
    other = bash(submitted + code(CURL, "curl-status-wait"), workdir, {**env, "KEY": server.keys["sub2"]})
    other_job, *printed = other.stdout.splitlines(keepends=True)
    assert "".join(printed) == shown(CURL, "curl-result-wait")
    assert other_job.split()[1] != job_id

    # A job that ended without an answer, and one that does not exist: what the prose under the output says.
    failed = submit(server, "no [[emulator:fail=400]]")
    cancelled = submit(server, "too late [[emulator:sleep=3x1]]")
    cancel = server.client("sub").post(f"/v1/jobs/{cancelled}/cancel")
    assert cancel.status_code == 200, cancel.text
    unknown = str(uuid.uuid4())
    expected = {
        failed: "failed: gateway answered HTTP 400 Bad Request: Bad Request\n",
        cancelled: "cancelled: no answer\n",
        unknown: f"404: no such job: {unknown}\n",
    }
    for name in ("curl-result-wait", "curl-status-wait"):
        ended_as = {job: bash(code(CURL, name), workdir, {**env, "JOB": job}).stdout for job in expected}
        assert ended_as == expected, name

    # The result loop asks again on a 409: with a wait shorter than the job, it loops until the job has ended.
    slow = submit(server, SLOW + " [[emulator:sleep=2x1]]")
    looping = replaced(code(CURL, "curl-result-wait"), "wait=30", "wait=0.2")
    assert bash(looping, workdir, {**env, "JOB": slow}).stdout == answer_to(SLOW) + "\n"

    # An image, by a body built in a file.
    (workdir / "scan.png").write_bytes(png_bytes(WIDTH, HEIGHT))
    image = bash(code(CURL, "curl-image"), workdir, env)
    assert image.stdout == shown(CURL, "curl-image")
    assert f"Image 1: png {WIDTH}x{HEIGHT}." in image.stdout

    # A refusal's problem detail.
    refused = bash(code(CURL, "curl-refused"), workdir, env)
    assert json.loads(refused.stdout) == json.loads(shown(CURL, "curl-refused"))

    # The status kept apart from the body: 200, 409 and any other status.
    case = code(CURL, "curl-status-case")
    assert bash(case, workdir, {**env, "JOB": job_id}).stdout == answer_to(VISIT) + "\n"
    for job in (failed, cancelled):
        assert bash(case, workdir, {**env, "JOB": job}).stdout == expected[job]
    running = submit(server, "still going [[emulator:sleep=3x1]]")
    early = bash(case, workdir, {**env, "JOB": running})
    assert re.fullmatch(r"not finished yet: it is (queued|running)\n", early.stdout), early.stdout
    missing = bash(case, workdir, {**env, "JOB": unknown})
    assert (missing.stdout, missing.stderr) == ("", f"HTTP 404 urn:qbgw:problem:not-found: no such job: {unknown}\n")

    # A batch, to its results.
    assert bash(code(CURL, "curl-batch"), workdir, env).stdout == shown(CURL, "curl-batch")

    # The audit trail: every result read above, page after page (here also 2 events a page).
    audit = code(CURL, "curl-audit")
    trail = bash(audit, workdir, env).stdout.splitlines()
    assert trail[-1] == "true"  # the chain verifies
    events = [json.loads(line) for line in trail[:-1]]
    assert len(events) > 2
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    reads = {(e["actor"], e["job_id"]) for e in events}
    assert {("key:sub", job_id), ("key:sub2", other_job.split()[1]), ("key:sub", failed)} <= reads, reads
    paged = bash(replaced(audit, "limit=500", "limit=2"), workdir, env).stdout.splitlines()
    assert paged == trail


def test_the_node_page_runs_as_written(node: str, shell: None, server: Server, workdir: Path) -> None:
    (workdir / "qbgw-client.mjs").write_text(code(NODE, "node-client"), encoding="utf-8")
    (workdir / "scan.png").write_bytes(png_bytes(WIDTH, HEIGHT))
    key = server.keys["sub"]
    command = replaced(code(NODE, "node-run"), "http://127.0.0.1:8000", server.url)
    command = replaced(command, "qbgw_...", key)

    # The script: submitted, then its answer, as the page shows it.
    first = bash(command, workdir, {})
    assert ids_hidden(first.stdout) == ids_hidden(shown(NODE, "node-run")), first.stdout
    assert first.stderr == ""
    # Again: the Idempotency-Key gives back the same job, already answered.
    again = bash(command, workdir, {}).stdout.splitlines()
    submitted, answer = first.stdout.splitlines()
    assert again == [submitted.replace(" queued", " succeeded"), answer]

    # Refused: a text file instead of an image, and a wrong key; exit 1 and the page's message.
    env = {"QBGW_URL": server.url, "QBGW_KEY": key, "QBGW_ASSISTANT_ID": ASSISTANT}
    (workdir / "note.txt").write_text("hello\n", encoding="utf-8")  # the page shows its first bytes
    text = run([node, "qbgw-client.mjs", "note.txt"], workdir, env, code=1)
    assert (text.stdout, text.stderr) == ("", shown(NODE, "node-refused-text"))
    unknown_key = "qbgw_0123456789ab_" + "x" * 43
    wrong = run([node, "qbgw-client.mjs", "scan.png"], workdir, {**env, "QBGW_KEY": unknown_key}, code=1)
    assert (wrong.stdout, wrong.stderr) == ("", shown(NODE, "node-refused-key"))

    # The status long-poll, with the page's client imported (importing it runs nothing).
    prelude = (
        'import { QbgwClient } from "./qbgw-client.mjs";\n'
        "const client = new QbgwClient(process.env.QBGW_URL, process.env.QBGW_KEY);\n"
        "const submitted = await client.submit({\n"
        "  assistant_id: process.env.QBGW_ASSISTANT_ID,\n"
        '  messages: [{ role: "user", content: process.env.TEXT }],\n'
        "});\n"
    )
    (workdir / "status-wait.mjs").write_text(prelude + code(NODE, "node-status-wait"), encoding="utf-8")
    polled = run([node, "status-wait.mjs"], workdir, {**env, "TEXT": "Summarise: a cough."})
    assert polled.stdout == f"succeeded after 1 attempt(s): {answer_to('Summarise: a cough.')}\n"

    # waitForResult asks again on each 409 until the job has ended, and gives up at its deadline.
    slow = submit(server, SLOW + " [[emulator:sleep=5x1]]")  # still running when a fresh node process first asks
    (workdir / "result-wait.mjs").write_text(
        'import { QbgwClient } from "./qbgw-client.mjs";\n'
        "const client = new QbgwClient(process.env.QBGW_URL, process.env.QBGW_KEY);\n"
        "let late = null;\n"
        "try {\n"
        "  await client.waitForResult(process.env.JOB, { deadlineSeconds: 0, waitSeconds: 0.2 });\n"
        "} catch (error) {\n"
        "  late = error.message;\n"
        "}\n"
        "const result = await client.waitForResult(process.env.JOB, { waitSeconds: 0.2 });\n"
        "console.log(JSON.stringify({ late, status: result.status, answer: result.answer }));\n",
        encoding="utf-8",
    )
    waited = json.loads(run([node, "result-wait.mjs"], workdir, {**env, "JOB": slow}).stdout)
    assert re.fullmatch(rf"job {slow} has not ended after 0 s: it is (queued|running)", waited["late"]), waited
    assert (waited["status"], waited["answer"]) == ("succeeded", answer_to(SLOW))


def test_the_python_page_runs_as_written(server: Server, workdir: Path) -> None:
    python = [sys.executable, "-"]
    env = {"QBGW_URL": server.url, "QBGW_KEY": server.keys["sub"]}
    helpers = code(PYTHON, "python-helpers")

    def python_run(script: str, extra: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            python,
            input=script,
            cwd=workdir,
            env={**os.environ, **env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        assert done.stderr == ""
        return done.stdout

    # Blocking: the result waited for, and a refusal.
    blocking = code(PYTHON, "python-blocking")
    assert python_run(helpers + blocking) == shown(PYTHON, "python-blocking")
    assert answer_to(VISIT) in shown(PYTHON, "python-blocking")
    # The status long-poll as a drop-in wait_for_result, for another principal (so another job).
    alternative = helpers + code(PYTHON, "python-status-wait") + blocking
    assert python_run(alternative, {"QBGW_KEY": server.keys["sub2"]}) == shown(PYTHON, "python-blocking")

    # wait_for_result asks again on a 409 (here with a wait shorter than the job), and past its deadline raises it.
    slow = submit(server, SLOW + " [[emulator:sleep=5x1]]")  # still running when a fresh python process first asks
    loop = replaced(helpers, 'params={"wait": 30}', 'params={"wait": 0.2}') + (
        "with httpx.Client(base_url=API, headers={'Authorization': f'Bearer {KEY}'}, timeout=45) as qbgw:\n"
        "    try:\n"
        "        wait_for_result(qbgw, os.environ['JOB'], deadline=0)\n"
        "    except QbgwProblem as exc:\n"
        "        print(exc)\n"
        "    print(wait_for_result(qbgw, os.environ['JOB'])['answer'])\n"
    )
    late, answer = python_run(loop, {"JOB": slow}).splitlines()
    assert re.fullmatch(r"409 urn:qbgw:problem:not-finished: it is (queued|running)", late), late
    assert answer == answer_to(SLOW)

    # Async: two jobs at once.
    assert python_run(code(PYTHON, "python-async")) == shown(PYTHON, "python-async")

    # qbgw.aio, in process: the server's own settings instead of its address and a key.
    aio = python_run(code(PYTHON, "python-aio"), server.settings.to_env()).splitlines(keepends=True)
    page = shown(PYTHON, "python-aio").splitlines(keepends=True)
    assert aio[0] in ("queued\n", "running\n", "succeeded\n")  # whatever it is at that moment, the page says
    assert aio[1:] == page[1:]

"""The browser console (``/console`` on ``qbgw serve``) in a real headless Chromium (Debian's, driven by
Playwright; no browser is downloaded), against a real server and worker on both stacks. The screenshots of
docs/console.md are taken here (on the embedded stack)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qbgw import queries, users
from qbgw.settings import Secret, Settings
from qbgw.store.reads import AuditFilter
from tests.conftest import ASSISTANT, ROOT, require_service
from tests.e2e.api_server import Server, start_server

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "docs" / "console"
PASSWORD = "correct horse battery staple"
#: The console's people: one per role.
PEOPLE = {"alice": "auditor", "rita": "reader", "adam": "admin"}
SUBJECT_KEY = Secret("console-subject-key-" + "k" * 32)
TEXT = "What is a normal resting heart rate?"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    require_service("Debian's chromium (apt-get install chromium)", Path(CHROMIUM).exists())
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # a dev dependency: missing only outside `pip install -e '.[dev]'`
        require_service("the playwright package", False)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def _server(stack: Settings, tmp_path: Path, worker_process: Callable[..., Any] | None, **changes: Any) -> Server:
    settings = stack.with_(**{"subject_key": SUBJECT_KEY, **changes})
    if worker_process is not None:
        worker_process(settings)
    for name, role in PEOPLE.items():
        users.create_user(name, role, PASSWORD, actor="test-setup", settings=settings)
    return start_server(settings, tmp_path)


@pytest.fixture
def server(stack: Settings, tmp_path: Path, worker_process: Callable[..., Any]) -> Iterator[Server]:
    running = _server(stack, tmp_path, worker_process)
    yield running
    running.close()


@pytest.fixture
def page(chromium: Any, server: Server) -> Iterator[Any]:
    context = chromium.new_context(base_url=server.url, viewport={"width": 1360, "height": 900}, accept_downloads=True)
    yield context.new_page()
    context.close()


def shoot(page: Any, stack: Settings, name: str) -> None:
    """A screenshot for docs/console.md (once: on the embedded stack)."""
    if not stack.database_url:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Any, name: str, password: str = PASSWORD) -> None:
    page.goto("/console/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


#: The patient two of the jobs are about (the access report's subject); a third is about another.
PATIENT = "MRN-0042"


def jobs(server: Server) -> list[str]:
    """Three jobs that succeed, one after a 503, one the gateway refuses; all finished. The first two are about
    PATIENT, the third about someone else."""
    client = server.client("sub")
    bodies = [TEXT, TEXT, TEXT, "[[emulator:fail=503x1]] " + TEXT, "[[emulator:fail=400]] " + TEXT]
    about = [PATIENT, PATIENT, "MRN-9999", None, None]
    ids = []
    for text, subject in zip(bodies, about, strict=True):
        body: dict[str, Any] = {"assistant_id": ASSISTANT, "messages": [{"role": "user", "content": text}]}
        if subject is not None:
            body["subject"] = subject
        answer = client.post("/v1/jobs", json=body)
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["id"])
    for job_id in ids:
        assert client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["done"]
    return ids


def viewed(server: Server, actor: str) -> set[str]:
    found = queries.audit_query(AuditFilter(action="console.viewed", actor=actor), settings=server.settings)
    return {e.detail["page"] for e in found}


def test_an_auditor_signs_in_searches_opens_a_timeline_exports_and_verifies(
    server: Server, page: Any, stack: Settings
) -> None:
    ids = jobs(server)
    page.goto("/console/")
    assert page.url.endswith("/console/login")  # no session: sign in first
    shoot(page, stack, "sign-in")
    sign_in(page, "alice")
    assert page.url.endswith("/console/")
    assert page.inner_text("#jobs-succeeded") == "4"
    assert page.inner_text("#jobs-failed") == "1"
    assert page.locator("svg.chart").count() == 3
    shoot(page, stack, "dashboard")

    # search: every job.submitted, then one job's events
    page.click("text=Audit events")
    page.fill("input[name=action]", "job.submitted")
    page.click("button:has-text('Search')")
    rows = page.locator("#events tbody tr")
    assert rows.count() == 5
    assert "job.submitted" in rows.first.inner_text()
    page.fill("input[name=action]", "")
    page.fill("input[name=job_id]", ids[3])
    page.click("button:has-text('Search')")
    found = page.inner_text("#events")
    assert "job.retry_scheduled" in found
    assert "503" in found
    assert "job.succeeded" in found
    assert TEXT not in page.content()  # digests and sizes only
    shoot(page, stack, "events")

    # the job's timeline, from a link of the search
    page.locator("#events tbody tr a").first.click()
    assert page.url.endswith(f"/console/jobs/{ids[3]}")
    timeline = page.inner_text("#timeline")
    for action in ("job.submitted", "attempt.request", "attempt.response", "job.retry_scheduled", "job.succeeded"):
        assert action in timeline
    assert page.locator("#reveal").count() == 0  # an auditor is never offered the answer
    shoot(page, stack, "timeline")

    # export the search as CSV: one row per event of that job
    page.goto(f"/console/events?job_id={ids[3]}")
    with page.expect_download() as download:
        page.click("#export-csv")
    rows_csv = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert rows_csv
    assert {r["job_id"] for r in rows_csv} == {ids[3]}
    assert "job.succeeded" in {r["action"] for r in rows_csv}
    jsonl = page.request.get(page.get_attribute("#export-jsonl", "href"))
    assert jsonl.headers["content-type"].startswith("application/jsonl")
    lines = [json.loads(line) for line in jsonl.text().splitlines()]
    assert [e["seq"] for e in lines] == [int(r["seq"]) for r in rows_csv]
    exported = queries.audit_query(AuditFilter(action="audit.exported", actor="user:alice"), settings=server.settings)
    assert len(exported) == 2

    # an auditor asking for the answer anyway (a forged form, with the right CSRF token) is refused, and audited
    csrf = page.get_attribute("form[action='/console/logout'] input[name=csrf]", "value")
    refused = page.request.post(f"/console/jobs/{ids[0]}/reveal", form={"csrf": csrf})
    assert refused.status == 403
    assert "An auditor never sees message text or answers" in refused.text()
    reads = queries.audit_query(AuditFilter(action="result.read", actor="user:alice"), settings=server.settings)
    assert reads == []

    # a form posted without its CSRF token: refused, nothing done
    forged = page.request.post("/console/chain/verify", form={})
    assert forged.status == 403
    assert "security token (CSRF)" in forged.text()
    refusals = queries.audit_query(AuditFilter(action="console.refused", actor="user:alice"), settings=server.settings)
    assert any("CSRF" in e.detail["reason"] for e in refusals)

    # the chain: verify now, in the background, its progress polled by the page
    page.goto("/console/chain")
    page.click("#verify")
    page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('Intact')")
    progress = page.request.get("/console/chain/progress.json").json()
    assert progress["state"] == "done"
    assert progress["ok"] is True
    assert progress["checked"] == progress["total"] > 0
    assert progress["by"] == "user:alice"
    page.reload()
    assert page.inner_text("#last-outcome") == "intact"
    shoot(page, stack, "chain")

    # the access report for a subject, from the menu: its two jobs, who submitted them, each disclosure
    page.click("a[href='/console/access-report']")
    page.fill("input[name=subject]", PATIENT)
    page.click("button:has-text('Run the report')")
    report = page.inner_text("#report")
    assert ids[0] in report
    assert ids[1] in report
    assert ids[2] not in report  # about another patient
    assert ids[3] not in report  # about nobody
    assert "key:sub" in report  # who submitted them
    assert report.count("attempt.request") >= 2  # each disclosure to the gateway
    assert "intact" in page.inner_text("main")
    assert PATIENT not in page.url
    shoot(page, stack, "access-report")
    ran = queries.audit_query(AuditFilter(action="audit.access_report", actor="user:alice"), settings=server.settings)
    assert len(ran) == 1
    logged = queries.audit_query(AuditFilter(actor="user:alice"), settings=server.settings)
    assert PATIENT not in json.dumps([e.as_dict() for e in logged])  # the subject is never logged
    assert PATIENT not in server.log.read_text(errors="replace")  # nor in the server's log

    assert {"dashboard", "events", "job", "export", "chain", "access-report"} <= viewed(server, "user:alice")


def test_a_reader_reveals_an_answer_by_an_audited_action(server: Server, page: Any, stack: Settings) -> None:
    job_id = jobs(server)[0]
    sign_in(page, "rita")
    page.goto("/console/jobs")
    page.fill("input[name=id]", job_id)
    page.click("button:has-text('Open')")
    assert page.inner_text("#status") == "succeeded"
    assert TEXT not in page.content()  # not until the reader asks
    assert not queries.audit_query(AuditFilter(action="result.read", actor="user:rita"), settings=server.settings)
    shoot(page, stack, "job")
    page.click("#reveal")
    assert "normal resting heart rate" in page.inner_text("#answer")
    shoot(page, stack, "answer")
    reads = queries.audit_query(AuditFilter(action="result.read", actor="user:rita"), settings=server.settings)
    assert [e.job_id for e in reads] == [job_id]
    # a reader does not search the audit trail
    assert page.goto("/console/events").status == 403
    assert "may not open" in page.inner_text("#refusal")
    shoot(page, stack, "refused")
    assert viewed(server, "user:rita") == {"dashboard", "job"}  # a refused page is a refusal, not a view
    refusals = queries.audit_query(AuditFilter(action="console.refused", actor="user:rita"), settings=server.settings)
    assert [e.detail["reason"] for e in refusals] == ["role reader may not open events"]


def test_an_api_key_is_refused_by_the_console(server: Server) -> None:
    for who, path in (
        ("sub", "/console/"),
        ("sub", "/console/login"),
        ("sub", "/console/events"),
        ("auditor", "/console/"),
    ):
        answer = httpx.get(server.url + path, headers={"Authorization": f"Bearer {server.keys[who]}"})
        assert answer.status_code == 403
        assert "does not accept API keys" in answer.text
        assert "default-src 'self'" in answer.headers["content-security-policy"]
    refused = queries.audit_query(AuditFilter(action="console.refused"), settings=server.settings)
    assert len(refused) == 4
    assert all("API keys" in e.detail["reason"] for e in refused)
    assert all(server.keys["sub"] not in json.dumps(e.as_dict()) for e in refused)


def test_the_cookie_is_secure_behind_tls(stack: Settings, tmp_path: Path) -> None:
    """With QBGW_CONSOLE_BEHIND_TLS (a TLS proxy in front), the cookies are Secure even over plain HTTP."""
    server = _server(stack, tmp_path, None, console_behind_tls=True)
    try:
        with httpx.Client(base_url=server.url, follow_redirects=False) as client:
            form = client.get("/console/login")
            assert "; secure" in form.headers["set-cookie"].lower()
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert csrf is not None
            # a client sends a Secure cookie over TLS only: here it is sent by hand, as the proxy's client would
            pre = form.headers["set-cookie"].split(";")[0]
            signed = client.post(
                "/console/login",
                data={"csrf": csrf.group(1), "name": "adam", "password": PASSWORD},
                headers={"Cookie": pre},
            )
            assert signed.status_code == 303
            cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("qbgw_console="))
            assert "secure" in cookie.lower()
            assert "httponly" in cookie.lower()
            assert "samesite=strict" in cookie.lower()
    finally:
        server.close()


def test_idle_sign_out_lockout_and_headers(
    stack: Settings, tmp_path: Path, worker_process: Callable[..., Any], chromium: Any
) -> None:
    server = _server(stack, tmp_path, worker_process, console_idle_timeout=3.0, console_max_failures=3)
    job_id = jobs(server)[0]
    context = chromium.new_context(base_url=server.url, viewport={"width": 1360, "height": 900})
    try:
        page = context.new_page()
        answer = page.goto("/console/login")
        headers = answer.all_headers()
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-store"
        sign_in(page, "rita")
        assert page.url.endswith("/console/")
        cookie = next(c for c in context.cookies() if c["name"] == "qbgw_console")
        assert cookie["httpOnly"]
        assert cookie["sameSite"] == "Strict"
        # idle, on the page of an answer (a POST's): the page leaves itself after the limit, and the server has
        # ended the session; the answer is no longer on the screen
        page.goto("/console/jobs")
        page.fill("input[name=id]", job_id)
        page.click("button:has-text('Open')")
        page.click("#reveal")
        assert "normal resting heart rate" in page.inner_text("#answer")
        page.wait_for_url(re.compile(r"/console/login\?ended=idle"), timeout=15_000)
        assert "normal resting heart rate" not in page.content()
        assert "without activity" in page.inner_text("#notice")
        shoot(page, stack, "signed-out")
        ended = queries.audit_query(
            AuditFilter(action="console.signed_out", actor="user:rita"), settings=server.settings
        )
        assert [e.detail["reason"] for e in ended] == ["idle"]

        # lockout: three wrong passwords lock the user; the right one is then refused too
        for _ in range(3):
            sign_in(page, "alice", "not the password at all")
            assert "not right" in page.inner_text("#error") or "locked" in page.inner_text("#error")
        sign_in(page, "alice")
        assert "locked" in page.inner_text("#error")
        assert page.url.endswith("/console/login")
        shoot(page, stack, "locked")
        failures = queries.audit_query(AuditFilter(action="console.signin_failed"), settings=server.settings)
        assert [e.detail["reason"] for e in failures][-1] == "locked user"
        assert all(PASSWORD not in str(e.detail) and "not the password" not in str(e.detail) for e in failures)
    finally:
        context.close()
        server.close()


def test_a_source_is_locked_out_after_repeated_failures(server: Server) -> None:
    """Past QBGW_CONSOLE_MAX_FAILURES x 4 failures from one address, even a right password from it is refused."""
    transport = httpx.HTTPTransport(local_address="127.0.0.9")
    with httpx.Client(base_url=server.url, transport=transport, follow_redirects=False) as client:

        def attempt(name: str, password: str) -> httpx.Response:
            form = client.get("/console/login").text
            csrf = re.search(r'name="csrf" value="([^"]+)"', form)
            assert csrf is not None
            return client.post("/console/login", data={"csrf": csrf.group(1), "name": name, "password": password})

        for n in range(20):
            assert attempt(f"nobody{n}", "wrong password here").status_code == 401
        refused = attempt("rita", PASSWORD)
        assert refused.status_code == 401
        assert "Too many failed sign-ins from this computer" in refused.text
        # without its CSRF token, a sign-in is refused before any password is checked
        assert client.post("/console/login", data={"name": "rita", "password": PASSWORD}).status_code == 403
    # another address is not locked
    with httpx.Client(base_url=server.url, follow_redirects=False) as other:
        csrf = re.search(r'name="csrf" value="([^"]+)"', other.get("/console/login").text)
        assert csrf is not None
        ok = other.post("/console/login", data={"csrf": csrf.group(1), "name": "rita", "password": PASSWORD})
        assert ok.status_code == 303


def test_a_refused_sign_in_does_not_tell_which_names_exist(server: Server) -> None:
    """A locked user, a disabled user and a name no user has get the same answer; only the audit trail says why."""
    users.disable_user("adam", actor="test-setup", settings=server.settings)

    def attempt(client: httpx.Client, name: str, password: str) -> httpx.Response:
        form = client.get("/console/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        return client.post("/console/login", data={"csrf": csrf.group(1), "name": name, "password": password})

    def error(answer: httpx.Response) -> str:
        found = re.search(r'id="error"[^>]*>(.*?)<', answer.text, re.S)
        assert answer.status_code == 401, answer.text
        assert found is not None, answer.text
        return found.group(1).strip()

    # each from its own address, so the per-address limit is not what answers
    answers = {}
    for n, (name, password) in enumerate(
        [("alice", "wrong"), ("alice", "wrong"), ("alice", "wrong"), ("alice", "wrong"), ("alice", "wrong")]
        + [("alice", PASSWORD), ("adam", PASSWORD), ("nobody-here", PASSWORD), ("rita", "wrong")]
    ):
        transport = httpx.HTTPTransport(local_address=f"127.0.1.{n + 1}")
        with httpx.Client(base_url=server.url, transport=transport, follow_redirects=False) as client:
            answers[(n, name)] = error(attempt(client, name, password))
    assert len(set(answers.values())) == 1, answers
    assert "locked" in next(iter(answers.values()))
    reasons = [
        e.detail["reason"]
        for e in queries.audit_query(AuditFilter(action="console.signin_failed"), settings=server.settings)
    ]
    assert reasons[-4:] == ["locked user", "disabled user", "unknown user", "wrong password"]

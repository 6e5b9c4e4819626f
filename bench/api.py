"""``qbgw serve`` (the HTTP front door), each figure beside its in-process baseline measured in the same run.

On PostgreSQL (a scratch database, dropped afterwards) and a private ``redis-server`` on a free port
(``--stack embedded``: SQLite + filesystem broker in a temporary folder instead), against the gateway
emulator (``qbgw.emulator``, answering at once) in this process. The stack, the emulator, the worker
processes and the minimal hand-written task are ``bench.throughput``'s.

1. **acceptance**: ``--jobs`` (2000) ``POST /v1/jobs`` from ``--clients`` (16) threads, one keep-alive
   ``httpx.Client`` each, against ``qbgw serve --workers`` (2), with no worker running (only acceptance is
   measured: authenticate, validate, encrypt, INSERT with audit events, publish, answer); beside it
   ``qbgw.submit()`` of the same jobs from as many threads in this process. Each thread first makes a few
   untimed calls (connections, pools). CPU: user + system seconds from ``/proc/PID/stat`` of the serve
   supervisor and its children (the server processes), and ``resource.getrusage(RUSAGE_SELF)`` of this process
   (all its threads: the httpx clients in the HTTP run, the submit() calls in the baseline). The goal (the
   issue): HTTP acceptance per server CPU second >= 0.7 of submit()'s per CPU second of its process.
2. **submit -> result**, one job at a time, ``--sequential`` (200) jobs per rep, with one real ``qbgw worker``
   process: (a) HTTP: ``POST /v1/jobs``, ``GET /v1/jobs/{id}?wait=30``, ``GET /v1/jobs/{id}/result``;
   (a') HTTP in two requests: ``POST /v1/jobs``, ``GET /v1/jobs/{id}/result?wait=30``; (a'') HTTP in one
   request: ``POST /v1/chat/completions``; each of the three through httpx and through a bare keep-alive
   ``http.client`` connection (``BareClient``: what the server costs, without httpx's own share);
   (b) ``qbgw.submit`` + ``qbgw.wait_for_job``; (c) ``qbgw.aio.submit`` + ``qbgw.aio.wait``; and, for
   reference, ``bench.throughput``'s own way (``submit`` then ``job_status`` every 2 ms). Interleaved with
   them job by job, with their own worker running throughout beside qbgw's:
   ``bench.throughput``'s minimal task (POST + INSERT, publish-to-row-visible, polled every 2 ms) with its
   INSERT-only and no-op variants, and the audited minimal task (the same with a hash-chained audit event
   committed at each of a job's four steps, submit to answer read: the floor of the design, without qbgw).
   Goal: at most 1.2x the minimal task. (On ``--stack embedded`` the minimal tasks still run on PostgreSQL +
   Redis.)

3. **a lone POST** (``--parts lone``, not in the default run): ``--sequential`` jobs, one at a time, with no
   worker running: ``POST /v1/jobs`` through ``httpx`` and through a bare ``http.client`` connection (what the
   client library costs), and ``qbgw.submit()`` in this process, interleaved; and ``GET /healthz`` through
   both clients (the HTTP round trip alone).

Part 2 runs first: part 1 leaves its jobs queued, for no worker to take.
Each part is repeated ``--reps`` (3) times; the table shows medians over reps (a latency figure: the
median over reps of each rep's median or p99). The machine is small and noisy: read medians and ratios.

    .venv/bin/python -m bench.api                      # 3 reps, ~5 min
    .venv/bin/python -m bench.api --quick              # a smoke run, < 1 min
    .venv/bin/python -m bench.api --stack embedded --reps 1
    .venv/bin/python -m bench.api --audit-seal block   # the audit events staged, chained by the sealer
    .venv/bin/python -m bench.api --parts lone --server-workers 1   # what one POST costs, by its parts
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import os
import resource
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from sqlalchemy import func, select

import qbgw
import qbgw.aio
from bench.chaos import _free_port
from bench.throughput import (
    ASSISTANT,
    BASELINES,
    Bench,
    Config,
    Workers,
    _quantile,
    _warm_pipeline,
    baseline_steps,
    bench_environment,
    bench_settings,
    cpu_seconds,
    machine_cpu,
    minimal_workers,
    process_tree,
    qbgw_workers,
    wait_until,
)
from qbgw import access, producer
from qbgw.lifecycle import TERMINAL, JobStatus
from qbgw.queries import job_status
from qbgw.runtime.locator import runtime
from qbgw.settings import Settings
from qbgw.store.models import AuditEvent, Job

PARTS = ("latency", "accept")
#: Parts run only when asked for.
EXTRA_PARTS = ("lone",)
#: Untimed calls each driving thread makes first (its connection, the server's and the producer's pools).
WARM_CALLS = 5
#: Goals of the issue.
PER_CPU_GOAL, LATENCY_GOAL = 0.7, 1.2
Say = Callable[[str], None]


@dataclass
class ApiConfig:
    jobs: int = 2000
    clients: int = 16
    server_workers: int = 2
    sequential: int = 200
    reps: int = 3
    stack: str = "postgres"
    #: QBGW_AUDIT_SEAL of every qbgw process (PostgreSQL): "commit" (the default) or "block".
    audit_seal: str = "commit"
    serve_log_level: str = "info"
    parts: tuple[str, ...] = PARTS
    timeout: float = 600.0

    def throughput_config(self) -> Config:
        """bench.throughput's configuration for what is shared: the emulator answers at once."""
        return Config(jobs=self.jobs, latency=0.0, reps=self.reps, sequential=self.sequential, timeout=self.timeout)


def _message(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- the server ------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    fleet: Workers
    key: str
    log: Path
    workers: int
    pids: list[int] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)

    def client(self) -> httpx.Client:
        """A keep-alive client with the submitter's key."""
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def bare_client(self) -> BareClient:
        """A keep-alive ``http.client`` connection with the submitter's key."""
        return BareClient(self.url, self.key)

    @property
    def supervisor(self) -> int:
        return self.fleet.procs[0].pid

    def cpu(self) -> float:
        """CPU seconds of the supervisor and its children (the server processes)."""
        return cpu_seconds(self.supervisor)

    def cpu_by_process(self) -> dict[int, float]:
        """CPU seconds of each server process (the supervisor's own under its pid)."""
        children = {pid: cpu_seconds(pid) for pid in process_tree(self.supervisor)[1:]}
        return {self.supervisor: self.cpu() - sum(children.values()), **children}

    def ready(self, count_startups: bool) -> bool:
        self.fleet.check_alive()
        try:
            if httpx.get(self.url + "/healthz", timeout=1).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
        # At info level every server process says so; a client connecting before all of them listen would be
        # accepted by the first, and a keep-alive connection stays with the process that accepted it.
        started = self.log.read_text(errors="replace").count("Application startup complete")
        return started >= self.workers or not count_startups


@contextmanager
def api_server(bench: Bench, settings: Settings, workers: int, log_level: str) -> Iterator[Server]:
    """``qbgw serve --workers N`` on a free port with a new submitter key; stopped (all its processes) on exit."""
    _, key = access.create_key(f"bench-{uuid.uuid4().hex[:8]}", "submitter", settings=settings)
    port = _free_port()
    argv = [sys.executable, "-m", "qbgw", "serve", "--port", str(port), "--workers", str(workers)]
    argv += ["--log-level", log_level]
    log = bench.folder / f"serve-{port}.log"
    server: Server | None = None
    try:
        with Workers(argv, settings.to_env(), log) as fleet:
            server = Server(f"http://127.0.0.1:{port}", fleet, key, log, workers)
            count_startups = log_level in ("info", "debug")
            wait_until(lambda: server.ready(count_startups), 60, "qbgw serve start", poll=0.1)
            if not count_startups:  # no startup lines to count: the first answer, then time for the others
                time.sleep(3)
            server.pids = process_tree(server.supervisor)
            server.names = _names(server.pids)
            yield server
    finally:
        _kill_leftovers(server)


def _names(pids: list[int]) -> dict[int, str]:
    """The supervisor (first), uvicorn's server processes and multiprocessing's resource tracker."""
    names, servers = {pids[0]: "supervisor"}, 0
    for pid in pids[1:]:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            tracker = b"resource_tracker" in cmdline.read()
        servers += not tracker
        names[pid] = "tracker" if tracker else f"server {servers}"
    return names


def _kill_leftovers(server: Server | None) -> None:
    """Server processes that outlived their supervisor (killed after its 30 s of grace)."""
    for pid in server.pids[1:] if server is not None else ():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"python" not in cmdline.read():
                    continue  # the pid was reused
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


# --- part 1: acceptance ----------------------------------------------------------------------------


@dataclass
class Acceptance:
    """One timed burst of ``jobs`` acceptances in ``seconds``; CPU seconds of the server, of this process, and
    of the whole machine (busy) over it."""

    jobs: int
    seconds: float
    server_cpu: float
    own_cpu: float
    machine_cpu: float
    split: str = ""

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def ms(self, cpu: float) -> float:
        return 1000 * cpu / self.jobs


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Action = Callable[[str], None]
#: Made in each driving thread: its action (given a custom_id) and what closes it.
Maker = Callable[[], tuple[Action, Callable[[], None]]]


def drive(threads: int, jobs: int, tag: str, make: Maker, server: Server, timeout: float) -> Acceptance:
    """``jobs`` calls of the action from ``threads`` threads (custom_ids ``tag:n``), after WARM_CALLS
    untimed ones each; timed from the moment all are warm to the last call's return."""
    ready, go = threading.Barrier(threads + 1, timeout=120), threading.Event()
    numbers, failures = itertools.count(), []

    def run(t: int) -> None:
        close: Callable[[], None] | None = None
        try:
            action, close = make()
            for w in range(WARM_CALLS):
                action(f"{tag}-warm:{t}:{w}")
            ready.wait()
            go.wait()
            while (n := next(numbers)) < jobs:
                action(f"{tag}:{n}")
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:  # reported (and the run failed) by the main thread
            failures.append(f"{type(exc).__name__}: {exc}")
            ready.abort()
        finally:
            if close is not None:
                close()

    pool = [threading.Thread(target=run, args=(t,), name=f"driver-{t}", daemon=True) for t in range(threads)]
    for thread in pool:
        thread.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        _join(pool, 30)
        raise RuntimeError(f"a driving thread failed while warming up: {failures[:3]}") from None
    before = server.cpu_by_process(), _own_cpu(), machine_cpu()[0]
    started = time.perf_counter()
    go.set()
    _join(pool, timeout)
    seconds = time.perf_counter() - started
    after = server.cpu_by_process(), _own_cpu(), machine_cpu()[0]
    if failures:
        raise RuntimeError(f"{len(failures)} driving threads failed: {failures[:3]}")
    used = {pid: cpu - before[0].get(pid, 0.0) for pid, cpu in after[0].items()}
    burst = Acceptance(jobs, seconds, sum(used.values()), after[1] - before[1], after[2] - before[2])
    burst.split = _split(server, used)
    return burst


def _split(server: Server, used: dict[int, float]) -> str:
    """Each server process's share of the server CPU."""
    total = sum(used.values()) or 1.0
    return ", ".join(f"{server.names.get(pid, pid)} {max(0.0, 100 * cpu / total):.0f}%" for pid, cpu in used.items())


def _join(threads: Sequence[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise TimeoutError(f"{thread.name} still running after {timeout:g}s")


def _http_maker(server: Server) -> Maker:
    def make() -> tuple[Action, Callable[[], None]]:
        client = server.client()

        def post(custom_id: str) -> None:
            body = {"assistant_id": ASSISTANT, "messages": _message(f"acceptance {custom_id}"), "custom_id": custom_id}
            answer = client.post("/v1/jobs", json=body)
            if answer.status_code != 202:
                raise RuntimeError(f"POST /v1/jobs answered {answer.status_code}: {answer.text[:300]}")

        return post, client.close

    return make


def _submit_maker(settings: Settings) -> Maker:
    def make() -> tuple[Action, Callable[[], None]]:
        def submit(custom_id: str) -> None:
            producer.submit(ASSISTANT, _message(f"acceptance {custom_id}"), custom_id=custom_id, settings=settings)

        return submit, lambda: None

    return make


def _stored(settings: Settings, tag: str) -> int:
    with runtime(settings).transaction() as session:
        return int(session.scalar(select(func.count()).where(Job.custom_id.like(f"{tag}:%"))) or 0)


def accept_burst(config: ApiConfig, settings: Settings, server: Server, way: str) -> Acceptance:
    tag = f"acc-{uuid.uuid4().hex[:8]}"
    make = _http_maker(server) if way == "http" else _submit_maker(settings)
    burst = drive(config.clients, config.jobs, tag, make, server, config.timeout)
    stored = _stored(settings, tag)
    if stored != config.jobs:
        raise RuntimeError(f"{way}: {config.jobs} accepted but {stored} stored")
    return burst


def part_accept(config: ApiConfig, settings: Settings, server: Server, say: Say) -> dict[str, list[Acceptance]]:
    runs: dict[str, list[Acceptance]] = {"http": [], "submit": []}
    for rep in range(1, config.reps + 1):
        for way in ("http", "submit"):
            burst = accept_burst(config, settings, server, way)
            runs[way].append(burst)
            own = "client" if way == "http" else "submit()"
            say(
                f"  rep {rep} {way:6} {burst.jobs} in {burst.seconds:.2f}s = {burst.rate:.0f}/s; CPU ms/job: "
                f"server {burst.ms(burst.server_cpu):.2f} ({burst.split}), "
                f"this process ({own}) {burst.ms(burst.own_cpu):.2f}, machine {burst.ms(burst.machine_cpu):.2f}"
            )
    return runs


# --- part 2: submit -> result ----------------------------------------------------------------------

#: How each way reports one job: (submit -> result seconds, of which the submit call).
Timing = tuple[float, float]
WAYS = (
    "http",
    "http result-wait",
    "http chat",
    "http.client",
    "http.client result-wait",
    "http.client chat",
    "python",
    "aio",
    "poll 2 ms",
)
#: The ways without a submit call of their own (the job is queued and answered in one request).
ONE_REQUEST = frozenset({"http chat", "http.client chat"})


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(what)


@dataclass
class BareAnswer:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class BareClient:
    """A keep-alive ``http.client`` connection with the submitter's key: the HTTP ways of part 2 through a lean
    client, beside httpx (which adds about 0.4-0.7 ms of its own per request: part 3). What a client costs is
    the client's, not the server's; a Node or Go client pays its own library's share."""

    def __init__(self, url: str, key: str) -> None:
        address = urlsplit(url)
        self._connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=60)
        self._headers = {"Authorization": f"Bearer {key}"}

    def _call(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> BareAnswer:
        self._connection.request(method, path, body=body, headers=headers)
        answer = self._connection.getresponse()
        return BareAnswer(answer.status, answer.read())

    def get(self, path: str, params: dict[str, Any] | None = None) -> BareAnswer:
        return self._call("GET", f"{path}?{urlencode(params)}" if params else path, None, self._headers)

    def post(self, path: str, json: Any) -> BareAnswer:
        body = _dumps(json).encode()
        return self._call("POST", path, body, {**self._headers, "Content-Type": "application/json"})

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> BareClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_dumps = json.dumps  # (BareClient.post's argument is named json, as httpx's)

#: Either client of the HTTP ways: the same calls, ``get(path, params=)`` and ``post(path, json=)``.
HttpClient = httpx.Client | BareClient


def via_http(client: HttpClient, custom_id: str) -> Timing:
    """The answer in three requests: the POST, the status long-polled until the job ends, the result."""
    started, job_id, submitted = _post(client, custom_id)
    status = client.get(f"/v1/jobs/{job_id}", params={"wait": 30})
    _check(status.status_code == 200 and status.json()["status"] == "succeeded", f"job {job_id}: {status.text[:300]}")
    _result(client.get(f"/v1/jobs/{job_id}/result"), job_id)
    return time.perf_counter() - started, submitted - started


def via_http_result_wait(client: HttpClient, custom_id: str) -> Timing:
    """The answer in two requests: the POST, and the result read long-polled until the job ends."""
    started, job_id, submitted = _post(client, custom_id)
    _result(client.get(f"/v1/jobs/{job_id}/result", params={"wait": 30}), job_id)
    return time.perf_counter() - started, submitted - started


def via_http_chat(client: HttpClient, custom_id: str) -> Timing:
    """The answer in one request: ``POST /v1/chat/completions`` queues the job and answers when it has ended
    (no submit call of its own: see ONE_REQUEST)."""
    started = time.perf_counter()
    body = {"model": ASSISTANT, "messages": _message(f"latency {custom_id}")}
    answer = client.post("/v1/chat/completions", json=body)
    ended = time.perf_counter()
    _check(answer.status_code == 200, f"POST /v1/chat/completions answered {answer.status_code}: {answer.text[:300]}")
    _check(bool(answer.json()["choices"][0]["message"]["content"]), f"chat completion without an answer: {answer.text}")
    return ended - started, ended - started


def _post(client: HttpClient, custom_id: str) -> tuple[float, str, float]:
    """POST a job: (when the POST began, the job's id, when its answer came)."""
    started = time.perf_counter()
    body = {"assistant_id": ASSISTANT, "messages": _message(f"latency {custom_id}"), "custom_id": custom_id}
    posted = client.post("/v1/jobs", json=body)
    submitted = time.perf_counter()
    _check(posted.status_code == 202, f"POST /v1/jobs answered {posted.status_code}: {posted.text[:300]}")
    return started, str(posted.json()["id"]), submitted


def _result(result: httpx.Response | BareAnswer, job_id: str) -> None:
    _check(result.status_code == 200 and bool(result.json()["answer"]), f"result of {job_id}: {result.text[:300]}")


def via_python(settings: Settings, custom_id: str, stamps: list[Stamp]) -> Timing:
    started, wall = time.perf_counter(), time.time()
    job_id = qbgw.submit(ASSISTANT, _message(f"latency {custom_id}"), custom_id=custom_id, settings=settings)
    submitted = time.perf_counter()
    view = qbgw.wait_for_job(job_id, timeout=30, settings=settings)
    ended = time.perf_counter()
    _check(view.status == JobStatus.SUCCEEDED and bool(view.answer), f"job {job_id} is {view.status}")
    stamps.append(Stamp(job_id, wall, wall + (submitted - started), wall + (ended - started)))
    return ended - started, submitted - started


@dataclass(frozen=True)
class Stamp:
    """A job of the Python way: when its submit began and returned, and when its wait returned (Unix seconds)."""

    job_id: str
    started: float
    submitted: float
    ended: float


#: The stages of the Python way, between the client's clock and the audit events' seal times (PostgreSQL's
#: clock_timestamp() when each commit sealed them: the same machine's clock).
STAGES = (
    "submit() call",
    "to the claim's commit (broker, Celery, claim)",
    "to the outcome's commit (gateway call, record)",
    "to the answer in hand (NOTIFY, audited read)",
)


def stages(settings: Settings, stamps: list[Stamp]) -> dict[str, list[float]]:
    """Each stage's seconds per job (see STAGES), from the jobs' attempt.request and job.succeeded events."""
    ids = [stamp.job_id for stamp in stamps]
    seals: dict[tuple[str, str], float] = {}
    with runtime(settings).transaction() as session:
        wanted = AuditEvent.action.in_(("attempt.request", "job.succeeded"))
        for job_id, action, at in session.execute(
            select(AuditEvent.job_id, AuditEvent.action, AuditEvent.occurred_at).where(
                AuditEvent.job_id.in_(ids), wanted
            )
        ):
            seals[(str(job_id), action)] = at.timestamp()
    found: dict[str, list[float]] = {name: [] for name in STAGES}
    for stamp in stamps:
        claimed, succeeded = seals[(stamp.job_id, "attempt.request")], seals[(stamp.job_id, "job.succeeded")]
        points = (stamp.started, stamp.submitted, claimed, succeeded, stamp.ended)
        for name, (a, b) in zip(STAGES, itertools.pairwise(points), strict=True):
            found[name].append(b - a)
    return found


async def _via_aio(settings: Settings, custom_id: str) -> Timing:
    started = time.perf_counter()
    job_id = await qbgw.aio.submit(ASSISTANT, _message(f"latency {custom_id}"), custom_id=custom_id, settings=settings)
    submitted = time.perf_counter()
    view = await qbgw.aio.wait(job_id, timeout=30, settings=settings)
    _check(view.status == JobStatus.SUCCEEDED and bool(view.answer), f"job {job_id} is {view.status}")
    return time.perf_counter() - started, submitted - started


def via_polling(settings: Settings, custom_id: str) -> Timing:
    """bench.throughput's way: submit, then job_status every 2 ms until the job has ended."""
    started = time.perf_counter()
    job_id = qbgw.submit(ASSISTANT, _message(f"latency {custom_id}"), custom_id=custom_id, settings=settings)
    submitted = time.perf_counter()
    deadline = started + 30
    while (status := job_status(job_id, settings=settings)) not in TERMINAL:
        _check(time.perf_counter() < deadline, f"job {job_id} still {status} after 30 s")
        time.sleep(0.002)
    _check(status == JobStatus.SUCCEEDED, f"job {job_id} is {status}")
    return time.perf_counter() - started, submitted - started


def qbgw_latencies(
    bench: Bench, settings: Settings, server: Server, loop: asyncio.Runner
) -> tuple[dict[str, list[Timing]], dict[str, list[float]], list[Stamp]]:
    """``--sequential`` jobs each way, and of each of ``bench.throughput``'s baselines, one at a time, interleaved
    job by job (their order rotating), with one ``qbgw worker`` process and the minimal task's worker running
    throughout, so that both meet the same machine; ``loop`` runs the qbgw.aio calls. With the Python way's
    stamps."""
    tag = f"seq-{uuid.uuid4().hex[:8]}"
    times: dict[str, list[Timing]] = {way: [] for way in WAYS}
    baselines: dict[str, list[float]] = {name: [] for name in BASELINES}
    stamps: list[Stamp] = []
    with (
        qbgw_workers(bench, settings) as fleet,
        minimal_workers(bench) as minimal_fleet,
        baseline_steps(bench, minimal_fleet) as steps,
        server.client() as client,
        server.bare_client() as bare,
    ):
        _warm_pipeline(settings, fleet, 120)
        ways: dict[str, Callable[[str], Timing]] = {
            "http": lambda cid: via_http(client, cid),
            "http result-wait": lambda cid: via_http_result_wait(client, cid),
            "http chat": lambda cid: via_http_chat(client, cid),
            "http.client": lambda cid: via_http(bare, cid),
            "http.client result-wait": lambda cid: via_http_result_wait(bare, cid),
            "http.client chat": lambda cid: via_http_chat(bare, cid),
            "python": lambda cid: via_python(settings, cid, stamps),
            "aio": lambda cid: loop.run(_via_aio(settings, cid)),
            "poll 2 ms": lambda cid: via_polling(settings, cid),
        }
        for way, measure in ways.items():  # untimed: connections, the aio waiter's listener
            measure(f"{tag}-warm-{way}")
        stamps.clear()
        order = [*ways, *steps]
        for n in range(bench.config.sequential):
            for name in order[n % len(order) :] + order[: n % len(order)]:
                if name in ways:
                    times[name].append(ways[name](f"{tag}:{name}:{n}"))
                else:
                    baselines[name].append(steps[name](f"sequential {n}"))
            fleet.check_alive()
            minimal_fleet.check_alive()
    return times, baselines, stamps


@dataclass
class Latencies:
    """Per way, per rep: the rep's samples (seconds)."""

    reps: dict[str, list[list[float]]] = field(default_factory=dict)

    def add(self, name: str, samples: list[float]) -> None:
        self.reps.setdefault(name, []).append(samples)

    def ms(self, name: str, q: float) -> float | None:
        """The median over reps of each rep's quantile ``q``, in ms."""
        runs = self.reps.get(name)
        return 1000 * statistics.median(_quantile(run, q) for run in runs) if runs else None


@contextmanager
def aio_loop() -> Iterator[asyncio.Runner]:
    """One event loop for every qbgw.aio call of the part (its waiter, a LISTEN connection, is per loop)."""
    with asyncio.Runner() as loop:
        try:
            yield loop
        finally:
            # qbgw.aio has no way to stop a loop's waiter: its listener thread would hold its connection (and
            # reconnect to the dropped database) for the rest of the process.
            for waiter in qbgw.aio._waiters.pop(loop.get_loop(), {}).values():
                waiter.stop()


def part_latency(bench: Bench, settings: Settings, server: Server, say: Say) -> Latencies:
    found = Latencies()
    with aio_loop() as loop:
        for rep in range(1, bench.config.reps + 1):
            _latency_rep(bench, settings, server, loop, found)
            line = ", ".join(
                f"{name} {1000 * _quantile(found.reps[name][-1], 0.5):.1f}/"
                f"{1000 * _quantile(found.reps[name][-1], 0.99):.1f}"
                for name in (*WAYS, "minimal", "audited", "insert-only", "no-op")
            )
            say(f"  rep {rep} median/p99 ms: {line}")
    return found


def _latency_rep(bench: Bench, settings: Settings, server: Server, loop: asyncio.Runner, found: Latencies) -> None:
    times, baselines, stamps = qbgw_latencies(bench, settings, server, loop)
    for way, timings in times.items():
        found.add(way, [total for total, _ in timings])
        found.add(f"{way} submit", [submit for _, submit in timings])
    if settings.audit_seal == "commit":  # block sealing chains the events later: their times are not the commits'
        for name, seconds in stages(settings, stamps).items():
            found.add(f"stage {name}", seconds)
    for name, seconds in baselines.items():
        found.add(name, seconds)


# --- report ----------------------------------------------------------------------------------------

Row = tuple[str, str, str, str]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _goal(value: float, goal: float, at_least: bool) -> str:
    met = value >= goal if at_least else value <= goal
    return f"goal {'>=' if at_least else '<='} {goal:g}: {'met' if met else 'MISSED'}"


def accept_rows(config: ApiConfig, runs: dict[str, list[Acceptance]]) -> list[Row]:
    http, sub = runs["http"], runs["submit"]
    rate_h, rate_s = _median([b.rate for b in http]), _median([b.rate for b in sub])
    server_ms = _median([b.ms(b.server_cpu) for b in http])
    submit_ms = _median([b.ms(b.own_cpu) for b in sub])
    client_ms = _median([b.ms(b.own_cpu) for b in http])
    machine_h, machine_s = _median([b.ms(b.machine_cpu) for b in http]), _median([b.ms(b.machine_cpu) for b in sub])
    per_cpu = submit_ms / server_ms  # (jobs per server CPU s) / (jobs per submit() process CPU s)
    per_rep = ", ".join(f"{s.ms(s.own_cpu) / h.ms(h.server_cpu):.2f}" for h, s in zip(http, sub, strict=True))
    return [
        (
            f"POST /v1/jobs per s, serve --workers {config.server_workers}, {config.clients} client threads",
            f"{rate_h:.0f}",
            f"qbgw.submit()/s, {config.clients} threads in one process: {rate_s:.0f}",
            f"{rate_h / rate_s:.2f} of submit()",
        ),
        (
            "CPU ms per accepted job: server processes vs the submit() process",
            f"{server_ms:.2f}",
            f"submit() process {submit_ms:.2f}",
            f"per CPU {per_cpu:.2f} of submit() (per rep {per_rep}); {_goal(per_cpu, PER_CPU_GOAL, True)}",
        ),
        ("  CPU ms per job of the httpx clients (this process)", f"{client_ms:.2f}", "", ""),
        (
            "  machine CPU ms per job (clients, server, database, broker...)",
            f"{machine_h:.2f}",
            f"submit() run {machine_s:.2f}",
            f"{machine_h / machine_s:.2f}x",
        ),
    ]


def latency_rows(found: Latencies, stack: str) -> list[Row]:
    labels = {
        "http": "HTTP through httpx: POST, GET ?wait=30, GET /result",
        "http result-wait": "HTTP through httpx: POST, GET /result?wait=30",
        "http chat": "HTTP through httpx: POST /v1/chat/completions (one request)",
        "http.client": "HTTP through http.client: POST, GET ?wait=30, GET /result",
        "http.client result-wait": "HTTP through http.client: POST, GET /result?wait=30",
        "http.client chat": "HTTP through http.client: POST /v1/chat/completions",
        "python": "qbgw.submit + qbgw.wait_for_job",
        "aio": "qbgw.aio.submit + qbgw.aio.wait",
        "poll 2 ms": "qbgw.submit + job_status every 2 ms (bench.throughput's way)",
    }
    rows: list[Row] = []
    for label, q in (("median", 0.5), ("p99", 0.99)):
        minimal, audited = found.ms("minimal", q), found.ms("audited", q)
        insert_only, noop = found.ms("insert-only", q), found.ms("no-op", q)
        anchors = (
            f"minimal task {minimal:.1f}; audited minimal {audited:.1f}; insert-only {insert_only:.1f}; "
            f"no-op {noop:.1f}"
        )
        if stack != "postgres":
            anchors += " (on PostgreSQL + Redis)"
        for way in WAYS:
            value = found.ms(way, q)
            if value is None or minimal is None:
                continue
            ratio = value / minimal
            goal = f"; {_goal(ratio, LATENCY_GOAL, False)}" if way != "poll 2 ms" else ""
            floor = f"; {value / audited:.2f}x audited" if audited else ""
            rows.append(
                (
                    f"submit -> result ms, {label}: {labels[way]}",
                    f"{value:.1f}",
                    anchors,
                    f"{ratio:.2f}x{goal}{floor}",
                )
            )
            anchors = ""
        for way in WAYS:
            value = found.ms(f"{way} submit", q)
            if value is not None and way not in ONE_REQUEST:
                rows.append((f"  of which the submit call, {label}: {way}", f"{value:.1f}", "", ""))
    for name in STAGES:  # medians of each stage; they need not add up to the median total
        value = found.ms(f"stage {name}", 0.5)
        if value is not None:
            rows.append((f"  python way, stage median: {name}", f"{value:.2f}", "", ""))
    return rows


def table(rows: list[Row]) -> list[str]:
    rows = [("figure", "qbgw", "baseline(s), same run", "ratio"), *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [" | ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in [*widths, 30]))
    return lines


# --- part 3: a lone POST ---------------------------------------------------------------------------

LONE_WAYS = ("httpx POST", "http.client POST", "submit()", "httpx GET /healthz", "http.client GET /healthz")


def _lone_calls(server: Server, settings: Settings, client: httpx.Client, bare: BareClient) -> dict[str, Action]:
    """Each way of part 3, given a tag: the same calls through httpx and through ``BareClient``."""

    def job(tag: str) -> dict[str, Any]:
        return {"assistant_id": ASSISTANT, "messages": _message(f"lone {tag}")}

    def checked(way: str, answer: httpx.Response | BareAnswer, expected: int) -> None:
        if answer.status_code != expected:
            raise RuntimeError(f"{way} answered {answer.status_code}: {answer.text[:300]}")

    def submit(tag: str) -> None:
        producer.submit(ASSISTANT, _message(f"lone {tag}"), settings=settings)

    return {
        "httpx POST": lambda tag: checked("POST /v1/jobs", client.post("/v1/jobs", json=job(tag)), 202),
        "http.client POST": lambda tag: checked("POST /v1/jobs", bare.post("/v1/jobs", json=job(tag)), 202),
        "submit()": submit,
        "httpx GET /healthz": lambda _: checked("GET /healthz", client.get("/healthz"), 200),
        "http.client GET /healthz": lambda _: checked("GET /healthz", bare.get("/healthz"), 200),
    }


def part_lone(config: ApiConfig, settings: Settings, server: Server, say: Say) -> dict[str, list[float]]:
    """Each rep's median seconds of ``config.sequential`` calls per way, the ways interleaved call by call."""
    bare = server.bare_client()
    client = server.client()
    found: dict[str, list[float]] = {way: [] for way in LONE_WAYS}
    try:
        calls = _lone_calls(server, settings, client, bare)
        for n in range(WARM_CALLS * 4):
            for call in calls.values():
                call(f"warm {n}")
        for rep in range(1, config.reps + 1):
            times: dict[str, list[float]] = {way: [] for way in LONE_WAYS}
            for n in range(config.sequential):
                for way, call in calls.items():
                    started = time.perf_counter()
                    call(f"{rep}:{n}")
                    times[way].append(time.perf_counter() - started)
            for way in LONE_WAYS:
                found[way].append(_quantile(times[way], 0.5))
            say("  rep " + str(rep) + " median ms: " + ", ".join(f"{w} {1000 * found[w][-1]:.2f}" for w in LONE_WAYS))
    finally:
        bare.close()
        client.close()
    return found


def lone_rows(found: dict[str, list[float]]) -> list[Row]:
    ms = {way: 1000 * _median(values) for way, values in found.items()}
    submit = ms["submit()"]
    return [
        (f"a lone job, ms, median of reps' medians: {way}", f"{ms[way]:.2f}", f"qbgw.submit() {submit:.2f}", ratio)
        for way, ratio in (
            ("httpx POST", f"{ms['httpx POST'] / submit:.2f}x submit()"),
            ("http.client POST", f"{ms['http.client POST'] / submit:.2f}x submit()"),
            ("httpx GET /healthz", "the HTTP round trip alone, through httpx"),
            ("http.client GET /healthz", "the HTTP round trip alone, through http.client"),
        )
    ]


# --- run -------------------------------------------------------------------------------------------


def stack_settings(config: ApiConfig, bench: Bench) -> Settings:
    if config.stack == "embedded":
        return bench_settings(bench.config, bench.emu.url, bench.folder / "embedded")
    return bench.settings.with_(audit_seal=config.audit_seal)


def run(config: ApiConfig, say: Say = print) -> list[Row]:
    rows: list[Row] = []
    rows_latency: list[Row] = []
    with bench_environment(config.throughput_config(), say, "qbgw-api-bench-") as bench:
        settings = stack_settings(config, bench)
        with api_server(bench, settings, config.server_workers, config.serve_log_level) as server:
            say(f"qbgw serve --workers {config.server_workers} up: processes {server.pids}; stack {config.stack}")
            if "latency" in config.parts:
                say(f"2. submit -> result, {config.sequential} sequential jobs x {config.reps} reps, upstream at once")
                started = time.monotonic()
                rows_latency = latency_rows(part_latency(bench, settings, server, say), config.stack)
                say(f"  ({time.monotonic() - started:.0f}s)")
            if "accept" in config.parts:
                say(f"1. acceptance, {config.jobs} jobs x {config.reps} reps, {config.clients} threads, no worker")
                started = time.monotonic()
                rows += accept_rows(config, part_accept(config, settings, server, say))
                say(f"  ({time.monotonic() - started:.0f}s)")
            if "latency" in config.parts:
                rows += rows_latency
            if "lone" in config.parts:
                say(f"3. a lone POST, {config.sequential} per way x {config.reps} reps, no worker")
                rows += lone_rows(part_lone(config, settings, server, say))
            errors = [line for line in server.log.read_text(errors="replace").splitlines() if "Traceback" in line]
            if errors:
                raise RuntimeError(f"the server logged {len(errors)} tracebacks; see {server.log}")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> ApiConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, help="repetitions of each part; medians are printed (default 3)")
    parser.add_argument("--jobs", type=int, help="acceptances per burst, each way (default 2000)")
    parser.add_argument("--clients", type=int, default=16, help="client threads, and submit() threads (default 16)")
    parser.add_argument("--server-workers", type=int, default=2, help="qbgw serve --workers (default 2)")
    parser.add_argument("--sequential", type=int, help="one-at-a-time jobs per way and rep in part 2 (default 200)")
    parser.add_argument("--stack", choices=("postgres", "embedded"), default="postgres")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated, of latency,accept (the default) and lone"
    )
    parser.add_argument(
        "--audit-seal",
        choices=("commit", "block"),
        default="commit",
        help="QBGW_AUDIT_SEAL of the qbgw processes (PostgreSQL only; default commit)",
    )
    parser.add_argument(
        "--serve-log-level",
        choices=("debug", "info", "warning"),
        default="info",
        help="qbgw serve --log-level (default info, qbgw serve's own: an access log line per request)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 rep, 300 jobs, 30 sequential")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for one burst (s)")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if set(parts) - set(PARTS) - set(EXTRA_PARTS) or not parts:
        parser.error(f"--parts: of {','.join(PARTS + EXTRA_PARTS)}")
    if args.audit_seal == "block" and args.stack == "embedded":
        parser.error("--audit-seal block: PostgreSQL only (the embedded stack seals at commit)")
    quick = args.quick
    return ApiConfig(
        jobs=args.jobs or (300 if quick else 2000),
        clients=args.clients,
        server_workers=args.server_workers,
        sequential=args.sequential or (30 if quick else 200),
        reps=args.reps or (1 if quick else 3),
        stack=args.stack,
        audit_seal=args.audit_seal,
        serve_log_level=args.serve_log_level,
        parts=parts,
        timeout=args.timeout,
    )


def _stop(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the contexts: processes stopped, database dropped


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    started = time.monotonic()
    say: Say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        rows = run(config, say)
    except Exception as exc:
        print(f"bench.api FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    print()
    print("\n".join(table(rows)))
    print(
        "\nCPU: /proc/PID/stat user+system of the qbgw serve supervisor and its children; this process: "
        "getrusage(RUSAGE_SELF), all threads. Medians over reps; latency: median over reps of each rep's median/p99."
    )
    print(f"whole run {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real ``qbgw serve`` process on a socket, with a key per role, for the HTTP tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from qbgw import access
from qbgw.settings import Settings
from tests.conftest import ROOT

#: The principals every server test has: one key per role, and a second submitter.
PRINCIPALS = {"sub": "submitter", "sub2": "submitter", "reader": "reader", "auditor": "auditor", "admin": "admin"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    keys: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path
    settings: Settings
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def client(self, who: str | None, *, source: str = "127.0.0.1") -> httpx.Client:
        """A client with ``who``'s key (None: no key), connecting from ``source`` (any 127.x.y.z: the server
        slows down an address after 10 failed authentications, so tests that fail on purpose use their own)."""
        key = f"{who}@{source}"
        if key not in self.clients:
            headers = {"Authorization": f"Bearer {self.keys[who]}"} if who is not None else {}
            transport = httpx.HTTPTransport(local_address=source)
            self.clients[key] = httpx.Client(base_url=self.url, headers=headers, timeout=90, transport=transport)
        return self.clients[key]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(settings: Settings, tmp_path: Path, *, workers: int = 1) -> Server:
    keys = {}
    for name, role in PRINCIPALS.items():
        _, secret = access.create_key(name, role, actor="test-setup", settings=settings)
        keys[name] = secret
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, **settings.to_env()}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qbgw", "serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"qbgw serve did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return Server(url, keys, process, log, settings)

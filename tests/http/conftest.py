"""Servers for the connection tests: outbox's own uvicorn server (process.uvicorn_server)
in a thread on uvloop, as `serve` runs it, and `outbox serve` as a process."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop

from outbox.api import create_app
from outbox.process import uvicorn_server
from outbox.settings import Settings
from tests.conftest import JWT_SECRET
from tests.e2e.conftest import clean_env, free_port
from tests.support import ServerThread, wait_for


class OutboxServer(ServerThread):
    """The server `outbox serve` builds (its protocol, its settings) on a free port."""

    def __init__(self, settings: Settings, app: Any = None) -> None:
        self.server = uvicorn_server(app or create_app(settings), settings)
        self.thread = threading.Thread(target=lambda: uvloop.run(self.server.serve()), daemon=True)

    @property
    def open_connections(self) -> int:
        return len(self.server.server_state.connections)


ServeWith = Callable[..., OutboxServer]


@pytest.fixture
def serve_with(settings: Settings) -> Iterator[ServeWith]:
    """`serve_with(http_header_timeout=0.5)`: a running OutboxServer on altered settings
    (`app=` another ASGI app behind the same server)."""
    with ExitStack() as stack:

        def make(app: Any = None, **overrides: Any) -> OutboxServer:
            changed = Settings(
                **{**settings.model_dump(), "host": "127.0.0.1", "port": 0, **overrides}
            )
            return stack.enter_context(OutboxServer(changed, app))

        yield make


# `python -m outbox serve` after lowering the soft limit (no preexec_fn: the test process
# runs threads).
_UNDER_LIMIT = """
import resource, runpy, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, hard))
sys.argv = ["outbox", "serve"]
runpy.run_module("outbox", run_name="__main__", alter_sys=True)
"""


class ServeProcess:
    """`outbox serve` under a soft descriptor limit of its own; its output goes to a file."""

    def __init__(self, env: dict[str, str], nofile: int, log: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _UNDER_LIMIT.format(nofile=nofile)],
                env={**env, "OUTBOX_PORT": str(port)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_up(self) -> None:
        def up() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError("serve exited:\n" + self.log.read_text())
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=30, what="outbox serve to answer")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)


@pytest.fixture
def serve_process(database_url: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """`serve_process(nofile=1024, OUTBOX_HTTP_HEADER_TIMEOUT="1s")`, killed at the end."""
    started: list[ServeProcess] = []

    def make(nofile: int, **env: str) -> ServeProcess:
        base = clean_env(
            OUTBOX_DATABASE_URL=database_url, OUTBOX_JWT_SECRET=JWT_SECRET, OUTBOX_LOG_FORMAT="json"
        )
        process = ServeProcess({**base, **env}, nofile, tmp_path / f"serve-{len(started)}.log")
        started.append(process)
        process.wait_up()
        return process

    yield make
    for process in started:
        process.stop()

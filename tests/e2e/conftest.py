"""Helpers for tests that run `outbox` as a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import IO

import httpx
import pytest

from tests.conftest import JWT_SECRET
from tests.leaks import leaks
from tests.support import wait_for

OUTBOX = [sys.executable, "-m", "outbox"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**overrides: str) -> dict[str, str]:
    """The test's environment without any OUTBOX_* variable, plus `overrides`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OUTBOX_")}
    env.update(overrides)
    return env


class Process:
    """A running `outbox …` whose stdout and stderr are collected line by line."""

    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        self.popen = subprocess.Popen(
            [*OUTBOX, *args],
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in (
                (self.popen.stdout, self.stdout),
                (self.popen.stderr, self.stderr),
            )
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str] | None, lines: list[str]) -> None:
        assert stream is not None
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for_output(self, text: str, *, timeout: float = 60.0, stream: str = "stdout") -> None:
        lines = self.stdout if stream == "stdout" else self.stderr

        def seen() -> bool:
            if any(text in line for line in lines):
                return True
            if self.popen.poll() is not None:
                self.finish(timeout=5)
                raise AssertionError(
                    f"exited {self.popen.returncode} before printing {text!r}:\n"
                    + "\n".join(self.stdout + self.stderr)
                )
            return False

        wait_for(seen, timeout=timeout, what=f"{text!r} on {stream}")

    def interrupt(self, *, timeout: float = 60.0) -> int:
        """SIGINT (Ctrl-C), then wait for the exit status."""
        self.popen.send_signal(signal.SIGINT)
        return self.finish(timeout=timeout)

    def finish(self, *, timeout: float = 60.0) -> int:
        code = self.popen.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.finish(timeout=10)


@pytest.fixture
def start() -> Iterator[type[Process]]:
    """`start(args, env)`; every process still running at the end is killed."""
    started: list[Process] = []

    class Tracked(Process):
        def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
            super().__init__(args, env)
            started.append(self)

    yield Tracked
    for process in started:
        process.kill()
    # Logs go to stderr (stdout has what a command prints for its user, e.g. dev's token).
    leaked = [line for process in started for line in leaks(process.stderr)]
    assert leaked == [], f"log lines that leak a phone, a token or a secret: {leaked[:5]}"


@pytest.fixture
def serve(start: type[Process], database_url: str) -> Iterator[tuple[Process, str]]:
    """A real `outbox serve` on a free port and a database of its own; (process, url)."""
    port = free_port()
    env = clean_env(
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_JWT_SECRET=JWT_SECRET,
        OUTBOX_PORT=str(port),
        OUTBOX_LOG_FORMAT="json",
    )
    process = start(["serve"], env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.popen.poll() is not None:
            raise AssertionError("serve exited:\n" + "\n".join(process.stderr))
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout=30, what="outbox serve to answer")
    yield process, url

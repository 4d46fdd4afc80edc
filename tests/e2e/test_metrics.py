"""`outbox dev` runs a dispatcher inside serve: its metrics are on serve's /metrics."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from outbox.auth import mint_token
from tests.conftest import JWT_SECRET
from tests.e2e.conftest import OUTBOX, Process, clean_env, free_port
from tests.scrape import listening_ports, scrape, value
from tests.support import wait_for

SENT = {"outcome": "sent", "error_class": "none", "sender": "default"}


def test_dev_shows_the_dispatcher_metrics_on_serve_and_opens_no_other_port(
    start: type[Process], database_url: str
) -> None:
    port, metrics_port = free_port(), free_port()
    env = clean_env(
        OUTBOX_DATABASE_URL=database_url,  # no embedded PostgreSQL: only serve's port
        OUTBOX_JWT_SECRET=JWT_SECRET,
        OUTBOX_PORT=str(port),
        OUTBOX_METRICS_PORT=str(metrics_port),  # a standalone dispatcher would open this
        OUTBOX_LOG_FORMAT="json",
    )
    process = start(["dev"], env)
    process.wait_for_output("curl ", timeout=60)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {mint_token(JWT_SECRET, 'user-1')}"}
    body = {"to": "5511999999999", "type": "text", "text": "hi"}
    assert httpx.post(f"{url}/api/v1/whatsapp/send/", json=body, headers=headers).status_code == 202

    def sent() -> bool:
        got = scrape(f"{url}/metrics")
        return value(got, "outbox_attempts_total", 0, **SENT) == 1

    wait_for(sent, timeout=30, what="the in-process dispatcher's attempt on serve's /metrics")
    samples = scrape(f"{url}/metrics")
    assert (
        value(samples, "outbox_messages_accepted_total", endpoint="single", sender="default") == 1
    )
    assert value(samples, "outbox_provider_request_duration_seconds_count") == 1
    assert value(samples, "outbox_provider_calls_in_flight") == 0
    # The sender gauges once, from serve's cached read (the fake default is unlimited).
    assert value(samples, "outbox_sender_paused", sender="default") == 0
    assert ("outbox_sender_effective_rate", frozenset({("sender", "default")})) not in samples
    assert listening_ports(process.popen.pid) == {port}
    assert process.interrupt() == 0


@pytest.mark.parametrize(
    ("variable", "bad"),
    [
        ("OUTBOX_METRICS_PORT", "70000"),
        ("OUTBOX_METRICS_PORT", "x"),
        ("OUTBOX_METRICS_CACHE", "5y"),
    ],
)
def test_a_bad_metrics_setting_stops_dispatch_with_one_line_naming_it(
    variable: str, bad: str
) -> None:
    env = clean_env(OUTBOX_DATABASE_URL="postgresql://postgres@127.0.0.1:1/x", **{variable: bad})
    result = subprocess.run(
        [*OUTBOX, "dispatch"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr

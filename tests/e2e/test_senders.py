"""Senders and OUTBOX_SECRET_KEY with the real processes: credentials never reach serve's
log, and a missing, wrong or malformed key stops `outbox serve` and `outbox dispatch`
at start with one line once a sender is stored; `outbox status` lists the senders."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import psycopg
import pytest
from cryptography.fernet import Fernet

from outbox.auth import mint_token
from tests.conftest import JWT_SECRET
from tests.e2e.conftest import OUTBOX, Process, clean_env, free_port
from tests.integration.test_senders import (
    APP_SECRET,
    HTTP_SECRET,
    SENDERS,
    TOKEN,
    cloud,
    http_sender,
    never_shown,
)
from tests.purge.conftest import add_message
from tests.support import wait_for

KEY = Fernet.generate_key().decode()


def env_for(database_url: str, **overrides: str) -> dict[str, str]:
    return clean_env(
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_JWT_SECRET=JWT_SECRET,
        OUTBOX_LOG_FORMAT="json",
        OUTBOX_METRICS_PORT="0",
        **overrides,
    )


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OUTBOX, *args], env=env, capture_output=True, text=True, timeout=60)


def store_sender(conn: psycopg.Connection, key: str) -> None:
    """A stored sender whose credentials `key` encrypted, as PUT writes one."""
    token = Fernet(key.encode()).encrypt(b'{"secret": "' + HTTP_SECRET.encode() + b'"}')
    conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, secrets, secret_fields, users)
           VALUES ('gw', 'http', '{"url": "https://gw.example.com"}', %s, '{secret}', '{*}')""",
        [token],
    )


def test_credentials_never_reach_the_log(start: type[Process], database_url: str) -> None:
    port = free_port()
    serve = start(["serve"], env_for(database_url, OUTBOX_SECRET_KEY=KEY, OUTBOX_PORT=str(port)))
    url = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: _answers(f"{url}/healthz") or serve.popen.poll() is not None,
        timeout=30,
        what="serve to answer",
    )
    headers = {"Authorization": f"Bearer {mint_token(JWT_SECRET, 'root', admin=True)}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        assert http.put(f"{SENDERS}/cloud-1", json=cloud()).status_code == 201
        assert http.put(f"{SENDERS}/http-1", json=http_sender()).status_code == 201
        bad = cloud(base_url="http://graph.example.com")  # refused, its secrets with it
        assert http.put(f"{SENDERS}/cloud-2", json=bad).status_code == 422
        assert http.put(f"{SENDERS}/cloud-1", json=cloud()).status_code == 200
        assert http.post(f"{SENDERS}/cloud-1/pause").status_code == 200
        listing = http.get(SENDERS)
        assert listing.status_code == 200
        never_shown(listing.content, TOKEN, APP_SECRET, HTTP_SECRET)
    assert serve.interrupt() == 0
    log = "\n".join(serve.stdout + serve.stderr)
    assert '"sender stored"' in log  # the log speaks of senders, by id
    never_shown(log, TOKEN, APP_SECRET, HTTP_SECRET, KEY)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("command", ["serve", "dispatch"])
@pytest.mark.parametrize("key", ["missing", "wrong"])
def test_a_missing_or_wrong_key_stops_the_process_with_one_line(
    command: str, key: str, database_url: str, sql_conn: psycopg.Connection
) -> None:
    store_sender(sql_conn, KEY)
    other = Fernet.generate_key().decode()
    overrides = {"OUTBOX_SECRET_KEY": other} if key == "wrong" else {}
    result = run(command, env=env_for(database_url, OUTBOX_PORT=str(free_port()), **overrides))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox: OUTBOX_SECRET_KEY"), lines[0]
    expected = "'gw'" if key == "wrong" else "sender(s) are stored"
    assert expected in lines[0], lines[0]
    never_shown(result.stderr, other, HTTP_SECRET)


@pytest.mark.parametrize("command", ["serve", "dispatch"])
def test_a_malformed_key_is_an_invalid_setting_and_not_repeated(
    command: str, database_url: str
) -> None:
    malformed = "not-a-fernet-key-but-a-secret-all-the-same"
    env = env_for(database_url, OUTBOX_SECRET_KEY=f"{KEY},{malformed}")
    result = run(command, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "OUTBOX_SECRET_KEY" in lines[0]
    assert malformed not in result.stderr and KEY not in result.stderr


def test_the_old_key_second_in_the_list_still_lets_both_start(
    start: type[Process], database_url: str, sql_conn: psycopg.Connection
) -> None:
    store_sender(sql_conn, KEY)
    rotated = f"{Fernet.generate_key().decode()},{KEY}"
    dispatcher = start(["dispatch"], env_for(database_url, OUTBOX_SECRET_KEY=rotated))
    dispatcher.wait_for_output('"ready"', stream="stderr")
    port = free_port()
    serve = start(
        ["serve"], env_for(database_url, OUTBOX_SECRET_KEY=rotated, OUTBOX_PORT=str(port))
    )
    wait_for(lambda: _answers(f"http://127.0.0.1:{port}/readyz"), timeout=30, what="serve ready")
    assert serve.interrupt() == 0
    assert dispatcher.interrupt() == 0


def test_status_shows_each_sender_default_first_with_its_state_and_live_messages(
    database_url: str, sql_conn: psycopg.Connection
) -> None:
    store_sender(sql_conn, KEY)  # gw, an http sender with a credential
    sql_conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, rate_limit, users)
           VALUES ('bulk', 'fake', '{"latency_ms": 0, "failure_rate": 0}', 50, '{*}')"""
    )
    # A reason with a terminal escape in it: printed without it.
    reason = "token expired \x1b[2J(190)"
    sql_conn.execute(
        "SELECT outbox.pause_sender('gw', %s, 'E190', now() + interval '1 hour', false)",
        [reason],
    )
    # bulk was throttled to 30/s and gw, unlimited, learned 30/s and was throttled to 20/s;
    # each climbs back from its decrease's time, set ahead so that the rates shown do
    # not depend on how long the CLI takes to start.
    sql_conn.execute(
        """UPDATE outbox.sender_state
           SET decreased_rate = 30, decreased_at = now() + interval '1 hour' WHERE id = 'bulk'"""
    )
    sql_conn.execute(
        """UPDATE outbox.sender_state
           SET learned_limit = 30, decreased_rate = 20, decreased_at = now() + interval '1 hour'
           WHERE id = 'gw'"""
    )
    add_message(sql_conn, "pending")
    add_message(sql_conn, "sent", finished_ago="1 minute")
    gw = [
        add_message(sql_conn, "pending"),
        add_message(sql_conn, "pending"),
        add_message(sql_conn, "in_flight", locked_until_in="1 minute", attempts=1),
    ]
    sql_conn.execute("UPDATE outbox.messages SET sender = 'gw' WHERE id = ANY(%s)", [gw])
    env = env_for(database_url)

    result = run("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    senders = json.loads(result.stdout)["senders"]
    paused = senders[2].pop("paused")
    bulk_rate, gw_rate = senders[1].pop("effective_rate"), senders[2].pop("effective_rate")
    assert senders == [
        {"id": "default", "provider": "fake", "source": "environment", "state": "active",
         "paused": None, "rate_limit": None, "effective_rate": None, "pending": 1,
         "in_flight": 0},
        {"id": "bulk", "provider": "fake", "source": "api", "state": "active",
         "paused": None, "rate_limit": 50.0, "pending": 0, "in_flight": 0},
        {"id": "gw", "provider": "http", "source": "api", "state": "paused",
         "rate_limit": None, "pending": 2, "in_flight": 1},
    ]  # fmt: skip
    assert (bulk_rate, gw_rate) == (30, 20)
    assert paused["reason"] == reason and paused["code"] == "E190"
    assert paused["manual"] is False and paused["until"] and paused["since"]
    never_shown(result.stdout, HTTP_SECRET, KEY)

    result = run("status", env=env)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    never_shown(result.stdout, HTTP_SECRET, KEY)
    queue, table = result.stdout.split("\n\n")
    assert queue.splitlines()[1].split()[0] == "STATUS"
    lines = table.splitlines()
    header = [
        "SENDER", "PROVIDER", "STATE", "RATE LIMIT", "EFFECTIVE RATE", "PENDING", "IN FLIGHT"
    ]  # fmt: skip
    assert re.split(r" {2,}", lines[0].strip()) == header
    assert lines[1].split() == ["default", "fake", "active", "unlimited", "unlimited", "1", "0"]
    bulk = lines[2].split()
    assert bulk[:4] + bulk[-2:] == ["bulk", "fake", "active", "50/s", "0", "0"]
    assert float(bulk[4].removesuffix("/s")) == 30
    gw_line = lines[3].split()
    assert lines[3].startswith("gw ") and gw_line[-5] == "unlimited"
    assert gw_line[-3:] == ["learned", "2", "1"] and float(gw_line[-4][:-2]) == 20
    assert "paused until " in lines[3] and ": token expired  [2J(190) [E190]" in lines[3]

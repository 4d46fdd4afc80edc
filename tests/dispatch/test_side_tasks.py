"""A side task that dies stops its dispatcher, which exits non-zero and says which one:
it does not run on without it (here the lease reaper, whose statement fails for good)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import psycopg

from tests.dispatch.conftest import DispatcherProcess, Reply, ScriptedProvider, insert_messages
from tests.support import wait_for

Start = Callable[..., DispatcherProcess]


def lines(process: DispatcherProcess) -> list[dict[str, Any]]:
    parsed = []
    for line in process.log().splitlines():
        if line.startswith("{"):
            parsed.append(orjson.loads(line))
    return parsed


def test_a_dead_reaper_stops_the_dispatcher_with_a_failure(
    sql_conn: psycopg.Connection,
    provider: tuple[ScriptedProvider, str],
    start_dispatcher: Start,
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(body={"id": f"prov-{call.task_id}"}, delay=1.0)
    # A lease of 4 s: the reaper looks about every second.
    dispatcher = start_dispatcher(lease_seconds="4s")
    [task_id] = insert_messages(sql_conn, 1)
    wait_for(lambda: scripted.calls_for(task_id), timeout=10, what="the call")
    # Not the database being away (the reaper retries that): its statement now fails for
    # good, as with a privilege revoked or a migration gone wrong.
    sql_conn.execute("DROP FUNCTION outbox.reap_expired_leases(int, uuid[])")

    assert dispatcher.wait(timeout=30) == 1
    died = [line for line in lines(dispatcher) if line["event"].startswith("side task died")]
    assert [line["task"] for line in died] == ["reaper"], dispatcher.log()
    assert "reap_expired_leases" in died[0]["exception"]  # the error it died of
    assert "outbox: the dispatcher's reaper died (see the log above)" in dispatcher.log()
    # A clean stop all the same: the call in flight ended and its outcome was written.
    assert any(line["event"] == "stopped" for line in lines(dispatcher))
    status = sql_conn.execute("SELECT status FROM outbox.messages").fetchone()
    assert status == ("sent",)

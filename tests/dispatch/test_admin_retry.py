"""An admin's retry through the API reaches a real dispatcher, which delivers the message."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psycopg

from tests.dispatch.conftest import DispatcherProcess, Reply, ScriptedProvider, wait_all

Provider = tuple[ScriptedProvider, str]
Auth = Callable[..., dict[str, str]]


def test_a_retried_message_is_delivered_and_its_attempts_continue(
    client: httpx.Client,
    auth: Auth,
    sql_conn: psycopg.Connection,
    provider: Provider,
    start_dispatcher: Callable[..., DispatcherProcess],
) -> None:
    scripted, _ = provider
    # The first call is refused for good (a permanent error: no retry of its own).
    scripted.script = lambda call, n: (
        Reply(status=400, body={"error": "invalid recipient"})
        if n == 0
        else Reply(body={"id": f"prov-{call.task_id}"})
    )
    # A long poll interval: only the retry's NOTIFY can wake the dispatcher in time.
    start_dispatcher(poll_interval="30s")
    body = {"to": "5511999999999", "type": "text", "text": "hi"}
    task_id = client.post("/api/v1/whatsapp/send/", json=body, headers=auth()).json()["task_id"]
    wait_all(sql_conn, "error", 1)

    response = client.post(
        f"/api/v1/whatsapp/messages/{task_id}/retry", headers=auth("ops", admin=True)
    )
    assert response.status_code == 200, response.text
    wait_all(sql_conn, "sent", 1, timeout=15)

    view = client.get(f"/api/v1/whatsapp/messages/{task_id}", headers=auth()).json()
    assert view["status"] == "sent" and view["provider_message_id"] == f"prov-{task_id}"
    assert (view["attempts"], view["max_attempts"]) == (2, 5)  # 1 spent + a budget of 4
    assert [(a["attempt"], a["outcome"]) for a in view["history"]] == [
        (1, "permanent"),
        (2, "sent"),
    ]
    assert [call.attempt for call in scripted.calls_for(task_id)] == [1, 2]
    events = sql_conn.execute(
        "SELECT event, data->>'status' FROM outbox.events WHERE message_id = %s ORDER BY id",
        [task_id],
    ).fetchall()
    assert events == [
        ("message_sent", "failed"),
        ("message_retrying", "retrying"),
        ("message_sent", "queued"),
    ]


def test_a_retry_gives_a_message_throttled_too_often_a_fresh_throttle_budget(
    client: httpx.Client,
    auth: Auth,
    sql_conn: psycopg.Connection,
    provider: Provider,
    start_dispatcher: Callable[..., DispatcherProcess],
) -> None:
    scripted, _ = provider
    healed = False
    throttled = Reply(status=429, headers={"Retry-After": "0"})
    scripted.script = lambda call, n: (
        Reply(body={"id": f"prov-{call.task_id}"}) if healed else throttled
    )
    # Two throttles taken, the third ends the message: no attempt spent by any of them.
    start_dispatcher(max_throttles="2")
    body = {"to": "5511999999999", "type": "text", "text": "hi"}
    task_id = client.post("/api/v1/whatsapp/send/", json=body, headers=auth()).json()["task_id"]
    wait_all(sql_conn, "error", 1)
    row = sql_conn.execute(
        "SELECT attempts, throttles, last_error FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchone()
    assert row == (0, 3, "throttled")
    assert len(scripted.calls_for(task_id)) == 3

    healed = True
    response = client.post(
        f"/api/v1/whatsapp/messages/{task_id}/retry", headers=auth("ops", admin=True)
    )
    assert response.status_code == 200, response.text
    wait_all(sql_conn, "sent", 1, timeout=15)
    row = sql_conn.execute(
        "SELECT attempts, throttles FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchone()
    assert row == (1, 0)
    outcomes = sql_conn.execute(
        "SELECT attempt, outcome FROM outbox.attempts WHERE message_id = %s ORDER BY id",
        [task_id],
    ).fetchall()
    assert [outcome for _, outcome in outcomes] == ["throttled"] * 3 + ["sent"]
    assert outcomes[-1][0] == 1  # the first attempt spent: the throttles spent none

"""A receipt that arrives while its call is still in flight: a real `outbox serve` and a
real `outbox dispatch` with the `cloud` provider, against a local Cloud API that, for each
call, posts Meta's signed `sent` and `delivered` statuses of that message back to serve's
/webhooks/whatsapp, waits for their 200, and then never answers the call. The call's
outcome is unknown (no answer after the request was written), but the receipt proves the
provider accepted the message: with either OUTBOX_UNKNOWN_OUTCOME it ends `sent`, sent
once, with `message_sent` queued then `message_status` delivered, and no retry nor
failure in between."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from outbox.auth import mint_token
from tests.conftest import JWT_SECRET
from tests.e2e.conftest import Process, free_port
from tests.e2e.test_receipts import (
    ACCESS_TOKEN,
    API,
    API_VERSION,
    APP_SECRET,
    PHONE_NUMBER_ID,
    USER,
    _ready,
    cloud_env,
    send_batch,
    sign,
    status,
    status_notification,
    stored_events,
)
from tests.support import ServerThread, wait_for

PROVIDER_TIMEOUT = 1.5  # seconds: each call is cut short by the dispatcher after this
MESSAGES = 3


class SilentCloudApi:
    """Meta's Cloud API, as far as outbox sees it, when its answer is lost: for each call,
    posts the signed `sent` then `delivered` status of that message (the task id as
    biz_opaque_callback_data, a wamid of its own) to serve's webhook, waits for each 200,
    and then never answers the call (it waits until the test releases it, long after the
    dispatcher gave up)."""

    def __init__(self) -> None:
        self.webhook_url = ""  # serve's /webhooks/whatsapp, known once serve runs
        self.calls: list[dict[str, Any]] = []  # the bodies outbox sent, with their wamid
        self.answers: list[dict[str, Any]] = []  # the webhook's answers (JSON bodies)
        self.receipted_after: dict[str, float] = {}  # task id → s from call to 2nd 200
        self.errors: list[str] = []
        self.released = threading.Event()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        path = f"/{API_VERSION}/{PHONE_NUMBER_ID}/messages"
        self.app = Starlette(routes=[Route(path, self._messages, methods=["POST"])])

    async def _messages(self, request: Request) -> Response:
        arrived = time.monotonic()
        if request.headers.get("authorization") != f"Bearer {ACCESS_TOKEN}":
            return JSONResponse({"error": {"code": 190, "message": "bad token"}}, 401)
        body = orjson.loads(await request.body())  # the whole request was written
        task_id = body["biz_opaque_callback_data"]
        wamid = f"wamid.{next(self._ids)}"
        with self._lock:
            self.calls.append({**body, "wamid": wamid})
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                for state in ("sent", "delivered"):
                    entry = status(wamid, state, int(time.time()), body["to"], task_id)
                    payload = status_notification([entry])
                    response = await client.post(
                        self.webhook_url,
                        content=payload,
                        headers={
                            "Content-Type": "application/json",
                            "X-Hub-Signature-256": sign(payload),
                        },
                    )
                    if response.status_code != 200:
                        raise AssertionError(f"webhook answered {response.status_code}")
                    with self._lock:
                        self.answers.append(response.json())
            with self._lock:
                self.receipted_after[task_id] = time.monotonic() - arrived
        except Exception as exc:  # reported by the test
            with self._lock:
                self.errors.append(f"{task_id}: {type(exc).__name__}: {exc}")
        # The answer is lost: the call hangs past the dispatcher's deadline.
        await asyncio.to_thread(self.released.wait, 120)
        return JSONResponse({"error": {"code": 2, "message": "too late"}}, 503)

    def calls_for(self, task_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [c for c in self.calls if c["biz_opaque_callback_data"] == task_id]


@pytest.fixture
def silent_api() -> Iterator[tuple[SilentCloudApi, str]]:
    api = SilentCloudApi()
    with ServerThread(api.app) as server:
        try:
            yield api, server.url
        finally:
            api.released.set()  # the hanging handlers end; uvicorn then stops at once


def attempts(conn: psycopg.Connection, tasks: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    rows = conn.execute(
        """SELECT message_id::text, attempt, outcome FROM outbox.attempts
           WHERE message_id = ANY(%s::uuid[]) ORDER BY id""",
        [tasks],
    ).fetchall()
    found: dict[str, list[tuple[Any, ...]]] = {task: [] for task in tasks}
    for message_id, attempt, outcome in rows:
        found[message_id].append((attempt, outcome))
    return found


@pytest.mark.parametrize("unknown_outcome", ["retry", "fail"])
def test_a_receipt_during_a_call_that_times_out_makes_the_message_sent_once(
    start: type[Process],
    database_url: str,
    sql_conn: psycopg.Connection,
    silent_api: tuple[SilentCloudApi, str],
    unknown_outcome: str,
) -> None:
    api, base_url = silent_api
    port = free_port()
    serve = start(["serve"], cloud_env(database_url, base_url, OUTBOX_PORT=str(port)))
    url = f"http://127.0.0.1:{port}"
    api.webhook_url = f"{url}/webhooks/whatsapp"
    env = cloud_env(database_url, base_url)
    env.update(
        OUTBOX_PROVIDER_TIMEOUT=f"{PROVIDER_TIMEOUT}s",
        OUTBOX_LEASE_SECONDS="5s",
        OUTBOX_RETRY_BASE_DELAY="100ms",
        OUTBOX_RETRY_MAX_DELAY="500ms",
        OUTBOX_RETRY_JITTER="0",
        OUTBOX_POLL_INTERVAL="200ms",
    )
    if unknown_outcome == "fail":
        env["OUTBOX_UNKNOWN_OUTCOME"] = "fail"  # "retry" is the default: left unset
    dispatcher = start(["dispatch"], env)
    dispatcher.wait_for_output('"ready"', stream="stderr")
    wait_for(lambda: _ready(url, serve), timeout=30, what="serve ready")

    token = mint_token(JWT_SECRET, USER)
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        tasks = send_batch(http, 0, MESSAGES)
        # Each attempt's row is written with its completion, in one transaction: once
        # every message has one, the calls' outcomes are recorded.
        wait_for(
            lambda: all(attempts(sql_conn, tasks).values()),
            timeout=30,
            what=f"each call's outcome recorded; the Cloud API's errors: {api.errors}",
        )
        views = {task: http.get(f"{API}/messages/{task}") for task in tasks}

    assert api.errors == []
    # The premise: each receipt was recorded while its call was still in flight.
    assert sorted(api.receipted_after) == sorted(tasks)
    late = {t: s for t, s in api.receipted_after.items() if s >= PROVIDER_TIMEOUT}
    assert late == {}, f"receipts recorded after the call's deadline: {late}"
    assert all(a == {"recorded": 1, "unknown": 0, "ignored": 0} for a in api.answers), api.answers
    assert len(api.answers) == 2 * MESSAGES

    rows = sql_conn.execute(
        """SELECT id::text, status, attempts, last_error, provider_message_id, delivery_state,
                  provider_sent_at IS NOT NULL, delivered_at IS NOT NULL, finished_at IS NOT NULL
           FROM outbox.messages WHERE id = ANY(%s::uuid[])""",
        [tasks],
    ).fetchall()
    assert len(rows) == MESSAGES
    for task_id, state, tries, last_error, wamid, delivery_state, *stamps in rows:
        [call] = api.calls_for(task_id)  # one call: not sent a second time
        assert (state, tries, last_error) == ("sent", 1, None), task_id
        assert wamid == call["wamid"]  # known from the receipt: the call never answered
        assert delivery_state == 2 and stamps == [True, True, True], (task_id, stamps)
    # What the dispatcher knew of the call: no answer, after the request was written.
    assert attempts(sql_conn, tasks) == {task: [(1, "unknown")] for task in tasks}

    events = stored_events(sql_conn)
    for task in tasks:
        mine = [(event, state) for _, event, message_id, state in events if message_id == task]
        assert mine == [("message_sent", "queued"), ("message_status", "delivered")], mine
    data = sql_conn.execute(
        """SELECT message_id::text, data FROM outbox.events
           WHERE user_id = %s AND event = 'message_status'""",
        [USER],
    ).fetchall()
    wamids = {c["biz_opaque_callback_data"]: c["wamid"] for c in api.calls}
    for task, event in data:
        assert event["provider_message_id"] == wamids[task]
        assert event["error"] is None and event["sender"] == "default"

    for task, view in views.items():
        assert view.status_code == 200, (task, view.text)
        shown = view.json()
        assert shown["status"] == "sent" and shown["last_error"] is None, shown
        delivery = shown["delivery"]
        assert delivery["state"] == "delivered", delivery
        assert delivery["provider_sent_at"] and delivery["delivered_at"], delivery
        assert delivery["read_at"] is None and delivery["error"] is None, delivery

    assert serve.interrupt() == 0
    assert dispatcher.interrupt() == 0
    # Sent: never claimed again, up to the dispatcher's exit.
    assert sorted(c["biz_opaque_callback_data"] for c in api.calls) == sorted(tasks)
    for process in (serve, dispatcher):
        log = "\n".join(process.stdout + process.stderr)
        assert APP_SECRET not in log and ACCESS_TOKEN not in log

"""Delivery receipts end to end: a real `outbox serve` and a real `outbox dispatch` with the
`cloud` provider pointed at a local server playing Meta's Cloud API, which accepts each
message and, a moment later, posts Meta's signed status webhooks (`delivered`, then `read`)
back to serve's /webhooks/whatsapp; a WebSocket client hears, for each message,
`message_sent` (queued), then `message_status` delivered, then read, in order, across a
disconnect and a resume with `?since=`."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import random
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.sync.client import ClientConnection, connect

from outbox.auth import mint_token
from tests.conftest import JWT_SECRET
from tests.e2e.conftest import Process, clean_env, free_port
from tests.gateway.conftest import write_events
from tests.support import ServerThread, wait_for

APP_SECRET = "e2e-app-secret-0123456789abcdef"
ACCESS_TOKEN = "EAAG-e2e-access-token-not-a-real-one"
PHONE_NUMBER_ID = "106540352242922"
API_VERSION = "v21.0"
USER = "receipts-user"
API = "/api/v1/whatsapp"


def sign(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def status_notification(statuses: list[dict[str, Any]]) -> bytes:
    """Meta's status webhook body (../shared/whatsapp-cloud-api.md §6)."""
    return orjson.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": "102290129340398",
                    "changes": [
                        {
                            "field": "messages",
                            "value": {
                                "messaging_product": "whatsapp",
                                "metadata": {
                                    "display_phone_number": "15550783881",
                                    "phone_number_id": PHONE_NUMBER_ID,
                                },
                                "statuses": statuses,
                            },
                        }
                    ],
                }
            ],
        }
    )


def status(wamid: str, state: str, at: int, to: str, task_id: str) -> dict[str, Any]:
    """One entry of `statuses`, as Meta sends it for a business-initiated message."""
    entry: dict[str, Any] = {
        "id": wamid,
        "status": state,
        "timestamp": str(at),
        "recipient_id": to,
        "biz_opaque_callback_data": task_id,
    }
    if state != "read":  # Meta leaves conversation and pricing out of `read`
        entry["conversation"] = {"id": "0d6e1ab5a4b1a4bba1b5c0c3e0b8f0f1",
                                 "origin": {"type": "utility"}}  # fmt: skip
        entry["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "utility"}
    return entry


class CloudApi:
    """Meta's Cloud API, as far as outbox sees it: answers each message call with a wamid
    and, a moment later (50–200 ms, in a thread of its own), posts the signed `delivered`
    status of that message to outbox's webhook, then its `read` status."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.webhook_url = ""  # serve's /webhooks/whatsapp, known once serve runs
        self.calls: list[dict[str, Any]] = []  # the bodies outbox sent, in arrival order
        self.answers: list[dict[str, Any]] = []  # the webhook's answers (JSON bodies)
        self.errors: list[str] = []  # whatever went wrong in a receipt thread
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        path = f"/{API_VERSION}/{PHONE_NUMBER_ID}/messages"
        self.app = Starlette(routes=[Route(path, self._messages, methods=["POST"])])

    async def _messages(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {ACCESS_TOKEN}":
            return JSONResponse({"error": {"code": 190, "message": "bad token"}}, 401)
        body = orjson.loads(await request.body())
        wamid = f"wamid.{next(self._ids)}"
        thread = threading.Thread(target=self._receipts, args=(body, wamid), daemon=True)
        with self._lock:
            self.calls.append({**body, "wamid": wamid})
            self._threads.append(thread)
        thread.start()
        return JSONResponse(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                "messages": [{"id": wamid}],
            }
        )

    def _receipts(self, call: dict[str, Any], wamid: str) -> None:
        task_id = call["biz_opaque_callback_data"]
        try:
            time.sleep(random.uniform(0.05, 0.2))  # the phone receives it a moment later
            self._post(status(wamid, "delivered", int(time.time()), call["to"], task_id))
            # Meta reports `read` on its own only when the two did not happen together;
            # a `read` recorded while the call's completion is still being written would
            # reach the client in one `message_status` (read) with no `delivered` before
            # it (write_events sends the latest state). The reader opens it once the
            # message is `sent`, and a moment later.
            wait_for(lambda: self._sent(task_id), timeout=30, what=f"{task_id} sent")
            time.sleep(random.uniform(0.05, 0.2))
            self._post(status(wamid, "read", int(time.time()), call["to"], task_id))
        except Exception as exc:  # reported by the test, not lost in a thread
            with self._lock:
                self.errors.append(f"{task_id}: {type(exc).__name__}: {exc}")

    def _sent(self, task_id: str) -> bool:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT status FROM outbox.messages WHERE id = %s", [task_id]
            ).fetchone()
        return row is not None and row[0] == "sent"

    def _post(self, entry: dict[str, Any]) -> None:
        body = status_notification([entry])
        response = httpx.post(
            self.webhook_url,
            content=body,
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(body)},
            timeout=10,
        )
        if response.status_code != 200:
            raise AssertionError(f"webhook answered {response.status_code}: {response.text}")
        with self._lock:
            self.answers.append(response.json())

    def join(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "receipt threads still running"


@pytest.fixture
def cloud_api(database_url: str) -> Iterator[tuple[CloudApi, str]]:
    api = CloudApi(database_url)
    with ServerThread(api.app) as server:
        yield api, server.url


def cloud_env(database_url: str, base_url: str, **overrides: str) -> dict[str, str]:
    """Both processes: the default sender is a `cloud` one calling the local Cloud API."""
    return clean_env(
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_JWT_SECRET=JWT_SECRET,
        OUTBOX_LOG_FORMAT="json",
        OUTBOX_METRICS_PORT="0",
        OUTBOX_PROVIDER="cloud",
        OUTBOX_CLOUD_BASE_URL=base_url,  # loopback: allowed over plain http
        OUTBOX_CLOUD_API_VERSION=API_VERSION,
        OUTBOX_CLOUD_PHONE_NUMBER_ID=PHONE_NUMBER_ID,
        OUTBOX_CLOUD_TOKEN=ACCESS_TOKEN,
        OUTBOX_CLOUD_APP_SECRET=APP_SECRET,
        OUTBOX_PROVIDER_TIMEOUT="5s",
        **overrides,
    )


class Feed:
    """A WebSocket client of the status feed that keeps every event it read."""

    def __init__(self, port: int, token: str, errors: list[str]) -> None:
        self.port = port
        self.token = token
        self.errors = errors  # the provider server's, shown when an event is missing
        self.events: list[dict[str, Any]] = []
        self.ws: ClientConnection | None = None

    def open(self, since: int | None = None) -> None:
        query = {"token": self.token, **({"since": since} if since is not None else {})}
        url = f"ws://127.0.0.1:{self.port}/ws/whatsapp/?{urlencode(query)}"
        self.ws = connect(url, open_timeout=10, max_queue=None)

    def close(self) -> None:
        assert self.ws is not None
        self.ws.close()
        self.ws = None

    def read(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        assert self.ws is not None
        got = []
        deadline = time.monotonic() + timeout
        for n in range(count):
            try:
                message = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(
                    f"{n} of {count} events in {timeout} s; the receipts' errors: {self.errors}"
                ) from None
            assert isinstance(message, str), "events are text frames"
            got.append(orjson.loads(message))
        self.events += got
        return got

    @property
    def last_id(self) -> int:
        event_id: int = self.events[-1]["data"]["event_id"]
        return event_id


def stored_events(conn: psycopg.Connection) -> list[tuple[int, str, str, str]]:
    """(id, event, message id, data.status) of the user's events, in id order."""
    rows = conn.execute(
        """SELECT id, event, message_id::text, data ->> 'status' FROM outbox.events
           WHERE user_id = %s ORDER BY id""",
        [USER],
    ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def all_read(conn: psycopg.Connection, count: int) -> bool:
    [(n,)] = conn.execute(
        "SELECT count(*) FROM outbox.messages WHERE user_id = %s AND read_at IS NOT NULL",
        [USER],
    ).fetchall()
    return n == count


def send_batch(http: httpx.Client, first: int, count: int) -> list[str]:
    body = {
        "messages": [
            {"to": f"551190000{n:04d}", "type": "text", "text": f"receipt {n}"}
            for n in range(first, first + count)
        ]
    }
    response = http.post(f"{API}/send/batch", json=body)
    assert response.status_code == 202, response.text
    return [item["task_id"] for item in response.json()["messages"]]


def test_receipts_reach_the_feed_in_order_across_a_resume(
    start: type[Process],
    database_url: str,
    sql_conn: psycopg.Connection,
    cloud_api: tuple[CloudApi, str],
) -> None:
    api, base_url = cloud_api
    port = free_port()
    serve = start(["serve"], cloud_env(database_url, base_url, OUTBOX_PORT=str(port)))
    url = f"http://127.0.0.1:{port}"
    api.webhook_url = f"{url}/webhooks/whatsapp"
    dispatcher = start(["dispatch"], cloud_env(database_url, base_url))
    dispatcher.wait_for_output('"ready"', stream="stderr")
    wait_for(lambda: _ready(url, serve), timeout=30, what="serve ready")

    token = mint_token(JWT_SECRET, USER)
    feed = Feed(port, token, api.errors)
    per_wave = 4
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        # Wave 1; the client leaves after 5 of its 12 events.
        feed.open()
        tasks = send_batch(http, 0, per_wave)
        feed.read(5)
        feed.close()
        left_at = feed.last_id
        # Events it missed wait in the table when it comes back.
        wait_for(
            lambda: any(e[0] > left_at for e in stored_events(sql_conn)),
            timeout=30,
            what="an event after the client left",
        )
        # It resumes from the last event it saw: the missed ones, then wave 2 live.
        feed.open(since=left_at)
        tasks += send_batch(http, per_wave, per_wave)
        wait_for(lambda: all_read(sql_conn, 2 * per_wave), timeout=60, what="every read")
        api.join()
        assert api.errors == []
        expected = stored_events(sql_conn)
        assert len(expected) == 3 * 2 * per_wave, expected
        feed.read(len(expected) - len(feed.events))
        # Nothing more was on its way: the next event is one written now.
        [sentinel] = write_events(sql_conn, 1, user_id=USER)
        assert feed.read(1)[0]["data"]["message_id"] == sentinel
        feed.close()
        views = {task: http.get(f"{API}/messages/{task}") for task in tasks}

    events = feed.events[:-1]
    ids = [e["data"]["event_id"] for e in events]
    assert ids == [e[0] for e in expected], "each event exactly once, in id order"
    for task in tasks:
        mine = [e for e in events if e["data"]["message_id"] == task]
        assert [(e["event"], e["data"]["status"]) for e in mine] == [
            ("message_sent", "queued"),
            ("message_status", "delivered"),
            ("message_status", "read"),
        ], mine
        sent, delivered, read = (e["data"] for e in mine)
        wamid = sent["provider_message_id"]
        assert wamid.startswith("wamid.")
        assert delivered["provider_message_id"] == read["provider_message_id"] == wamid
        assert delivered["sender"] == read["sender"] == "default"
        assert delivered["error"] is None and read["error"] is None
        assert delivered["timestamp"] <= read["timestamp"]  # the provider's times

    # What the provider server got: one call per message, the task id as Meta's callback
    # data; every receipt matched, by that task id.
    assert sorted(c["biz_opaque_callback_data"] for c in api.calls) == sorted(tasks)
    assert len(api.answers) == 2 * len(tasks)
    assert all(a == {"recorded": 1, "unknown": 0, "ignored": 0} for a in api.answers), api.answers

    rows = sql_conn.execute(
        """SELECT id::text, status, delivery_state, delivered_at, read_at, failed_at,
                  provider_message_id
           FROM outbox.messages WHERE id = ANY(%s::uuid[])""",
        [tasks],
    ).fetchall()
    wamids = {c["biz_opaque_callback_data"]: c["wamid"] for c in api.calls}
    for task_id, state, delivery_state, delivered_at, read_at, failed_at, wamid in rows:
        assert (state, delivery_state, failed_at) == ("sent", 3, None), task_id
        assert delivered_at is not None and read_at is not None and delivered_at <= read_at
        assert wamid == wamids[task_id]
    for task, view in views.items():
        assert view.status_code == 200, (task, view.text)
        delivery = view.json()["delivery"]
        assert delivery["state"] == "read", delivery
        assert delivery["delivered_at"] and delivery["read_at"] and delivery["error"] is None

    assert serve.interrupt() == 0
    assert dispatcher.interrupt() == 0
    for process in (serve, dispatcher):
        log = "\n".join(process.stdout + process.stderr)
        assert APP_SECRET not in log and ACCESS_TOKEN not in log


def _ready(url: str, serve: Process) -> bool:
    if serve.popen.poll() is not None:
        raise AssertionError("serve exited:\n" + "\n".join(serve.stderr))
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False

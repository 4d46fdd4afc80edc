"""`serve`'s /metrics after a small real run: the API, the status feed and a real dispatcher."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import orjson
import psycopg
import pytest
from websockets.sync.client import connect

from outbox.api import create_app
from outbox.metrics import UNMATCHED
from outbox.settings import Settings
from tests.dispatch.conftest import (
    DispatcherProcess,
    Reply,
    ScriptedProvider,
    statuses,
    wait_all,
)
from tests.e2e.conftest import free_port
from tests.scrape import scrape, total, value
from tests.support import ServerThread, wait_for

Provider = tuple[ScriptedProvider, str]
Start = Callable[..., DispatcherProcess]
Auth = Callable[..., dict[str, str]]
SEND = "/api/v1/whatsapp/send/"
BATCH = "/api/v1/whatsapp/send/batch"
MESSAGE = "/api/v1/whatsapp/messages/{task_id}"
ACCEPTED = "outbox_messages_accepted_total"
SENT = {"outcome": "sent", "error_class": "none", "sender": "default"}
REFUSED = {"outcome": "failed", "error_class": "permanent", "sender": "default"}


def _text(to: str, client_message_id: str | None = None) -> dict[str, str]:
    body = {"to": to, "type": "text", "text": "hello"}
    if client_message_id:
        body["client_message_id"] = client_message_id
    return body


@pytest.fixture
def api(settings: Settings) -> Iterator[ServerThread]:
    """The API with uncached queue gauges: each scrape reads the database."""
    changed = Settings(**{**settings.model_dump(), "metrics_cache": 0})
    with ServerThread(create_app(changed)) as server:
        yield server


def test_serve_metrics_match_what_happened(
    api: ServerThread,
    client: httpx.Client,
    auth: Auth,
    token: Callable[..., str],
    provider: Provider,
    start_dispatcher: Start,
    sql_conn: psycopg.Connection,
) -> None:
    scripted, _ = provider
    refused = "5511000000000"  # the provider refuses this number for good
    scripted.script = lambda call, n: (
        Reply(status=400, body={"error": "bad number"})
        if orjson.loads(call.body)["to"] == refused
        else Reply(body={"id": f"prov-{call.task_id}"})
    )
    url = f"{api.url}/metrics"
    feed = connect(f"ws://127.0.0.1:{api.port}/ws/whatsapp/?token={token()}", open_timeout=10)
    with feed:
        wait_for(lambda: value(scrape(url), "outbox_websocket_clients") == 1, what="1 client")
        singles = [
            client.post(SEND, json=_text("5511999999991", "once"), headers=auth()),
            client.post(SEND, json=_text("5511999999991", "once"), headers=auth()),  # replay
            client.post(SEND, json=_text(refused, "a"), headers=auth()),
            client.post(SEND, json=_text(refused, "b"), headers=auth()),
        ]
        assert [r.status_code for r in singles] == [202, 202, 202, 202]
        batch = client.post(
            BATCH,
            json={"messages": [_text("5511999999992"), _text("5511999999993")]},
            headers=auth(),
        )
        assert batch.status_code == 202
        assert client.post(SEND, json={"to": "x"}, headers=auth()).status_code == 422
        task_id = singles[0].json()["task_id"]
        assert client.get(f"/api/v1/whatsapp/messages/{task_id}", headers=auth()).status_code == 200
        assert client.get("/no/such/path").status_code == 404

        dispatch_port = free_port()
        start_dispatcher(metrics_port=str(dispatch_port))
        wait_all(sql_conn, "sent", 3)
        wait_all(sql_conn, "error", 2)
        events = sql_conn.execute("SELECT count(*) FROM outbox.events").fetchone()
        assert events is not None and events[0] > 0
        received = [feed.recv(timeout=10) for _ in range(events[0])]
        assert len(received) == events[0]

        sql_conn.execute("ANALYZE outbox.messages")  # the estimates of sent/error/cancelled
        samples = scrape(url)
        assert value(samples, "outbox_websocket_clients") == 1
        assert value(samples, "outbox_websocket_events_fanned_out_total") == len(received)
    wait_for(lambda: value(scrape(url), "outbox_websocket_clients") == 0, what="0 clients")

    # Accepted: 4 single (a replay included), 2 in the batch.
    assert value(samples, ACCEPTED, endpoint="single", sender="default") == 4
    assert value(samples, ACCEPTED, endpoint="batch", sender="default") == 2

    # Requests by route template, method and status; the raw path never appears.
    def requests(route: str, method: str, status: str) -> float:
        name = "outbox_http_request_duration_seconds_count"
        return value(samples, name, route=route, method=method, status=status)

    assert requests(SEND, "POST", "202") == 4
    assert requests(SEND, "POST", "422") == 1
    assert requests(BATCH, "POST", "202") == 1
    assert requests(MESSAGE, "GET", "200") == 1
    assert requests(UNMATCHED, "GET", "404") == 1
    routes = {
        dict(labels)["route"]
        for (name, labels) in samples
        if name == "outbox_http_request_duration_seconds_count"
    }
    assert task_id not in "".join(routes) and "/no/such/path" not in routes
    sum_ = total(samples, "outbox_http_request_duration_seconds_sum", route=SEND)
    assert sum_ > 0

    # Queue gauges: the database's counts (sent and error estimated, as of the ANALYZE:
    # exact on a table this small, where every status is in the most-common-values list).
    counts = statuses(sql_conn)
    assert counts == {"sent": 3, "error": 2}
    for status in ("pending", "in_flight", "sent", "error", "cancelled"):
        assert value(samples, "outbox_queue_messages", status=status) == counts.get(status, 0)
    assert value(samples, "outbox_queue_due_messages") == 0

    # The dispatcher of the same run, in another process: its figures are on its own
    # port (not here), and they are what it did: 3 sent, 2 refused for good.
    assert total(samples, "outbox_attempts_total") == 0
    dispatch_url = f"http://127.0.0.1:{dispatch_port}/metrics"
    wait_for(
        lambda: total(scrape(dispatch_url), "outbox_attempts_total") == 5,
        what="the dispatcher's five outcomes counted",
    )
    dispatched = scrape(dispatch_url)
    assert value(dispatched, "outbox_attempts_total", **SENT) == 3
    assert value(dispatched, "outbox_attempts_total", **REFUSED) == 2
    assert value(dispatched, "outbox_provider_request_duration_seconds_count") == len(
        scripted.calls
    )
    assert value(dispatched, "outbox_provider_calls_in_flight") == 0


def test_metrics_answer_while_the_database_is_away(settings: Settings) -> None:
    away = Settings(**{**settings.model_dump(), "database_url": "postgresql://x@127.0.0.1:1/x"})
    with ServerThread(create_app(away)) as server:
        samples = scrape(f"{server.url}/metrics")
    # No queue figure rather than a made-up one; the request metrics are still there.
    assert total(samples, "outbox_queue_messages") == 0
    assert ("outbox_queue_messages", frozenset({("status", "pending")})) not in samples
    assert value(samples, ACCEPTED, endpoint="single", sender="default") == 0
    assert total(samples, "outbox_sender_paused") == 0
    assert total(samples, "outbox_sender_effective_rate") == 0


def _sender_gauges(url: str) -> dict[str, dict[str, float]]:
    """{gauge: {sender: value}} of the two sender gauges in one scrape."""
    samples = scrape(url)
    return {
        name: {
            dict(labels)["sender"]: got
            for (sample, labels), got in samples.items()
            if sample == f"outbox_sender_{name}"
        }
        for name in ("effective_rate", "paused")
    }


def test_sender_gauges_show_each_senders_effective_rate_and_pause(
    api: ServerThread, sql_conn: psycopg.Connection
) -> None:
    url = f"{api.url}/metrics"
    # The fake default is unlimited: a pause gauge, no rate series.
    assert _sender_gauges(url) == {"effective_rate": {}, "paused": {"default": 0}}

    sql_conn.execute(
        """INSERT INTO outbox.senders (id, provider, users, rate_limit)
           VALUES ('limited', 'fake', '{*}', 40), ('open', 'fake', '{*}', NULL)"""
    )
    assert _sender_gauges(url) == {
        "effective_rate": {"limited": 40},
        "paused": {"default": 0, "limited": 0, "open": 0},
    }

    # A throttle halved the limited one (climbing back from 20/s); the unlimited one
    # learned 30/s and keeps to half of it; default is paused by hand.
    sql_conn.execute(
        """UPDATE outbox.sender_state SET decreased_rate = 20, decreased_at = now()
           WHERE id = 'limited'"""
    )
    sql_conn.execute(
        """UPDATE outbox.sender_state
           SET learned_limit = 30, decreased_rate = 15, decreased_at = now()
           WHERE id = 'open'"""
    )
    sql_conn.execute("SELECT outbox.pause_sender('default', 'maintenance', NULL, NULL, true)")
    gauges = _sender_gauges(url)
    assert gauges["paused"] == {"default": 1, "limited": 0, "open": 0}
    assert gauges["effective_rate"].keys() == {"limited", "open"}
    assert 20 <= gauges["effective_rate"]["limited"] < 40
    assert 15 <= gauges["effective_rate"]["open"] < 30

    # Resumed, and a sender deleted: its series go with it.
    sql_conn.execute("SELECT outbox.resume_sender('default')")
    sql_conn.execute("DELETE FROM outbox.senders WHERE id = 'open'")
    gauges = _sender_gauges(url)
    assert gauges["paused"] == {"default": 0, "limited": 0}
    assert gauges["effective_rate"].keys() == {"limited"}

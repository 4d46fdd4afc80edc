"""Messages that name their sender, on a real server and database: stored, shown and
listed by sender; an unknown sender refused (422 on `sender`), one the user may not send
from refused (403 `sender_forbidden`); a sender just created usable at once; idempotent
replays with their sender; an admin's retry of a message whose sender was deleted; the
accepted counter by sender. A sender's view from its state: the effective rate (halved by
a throttle, climbing back, learned by an unlimited sender), `default`'s pause by hand."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.fernet import Fernet
from psycopg.conninfo import conninfo_to_dict

from outbox.api import create_app
from outbox.sender_directory import MISS_INTERVAL, SenderDirectory
from outbox.services import lifespan_services
from outbox.settings import Settings
from tests.scrape import scrape, value
from tests.support import ServerThread, wait_for
from tests.tcp_proxy import TcpProxy

SEND = "/api/v1/whatsapp/send"
BATCH = "/api/v1/whatsapp/send/batch"
MESSAGES = "/api/v1/whatsapp/messages"
SENDERS = "/api/v1/whatsapp/senders"
KEY = Fernet.generate_key().decode()

Auth = Callable[..., dict[str, str]]


def text(**fields: Any) -> dict[str, Any]:
    return {"type": "text", "to": "5511999999999", "text": "hi", **fields}


@pytest.fixture
def server(settings: Settings) -> Iterator[ServerThread]:
    with ServerThread(create_app(settings.model_copy(update={"secret_key": KEY}))) as server:
        yield server


@pytest.fixture
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def directory_of(server: ServerThread) -> SenderDirectory:
    services = lifespan_services(server.server.lifespan.state)
    assert services is not None
    return services.senders


def put_sender(http: httpx.Client, auth: Auth, sender_id: str, users: list[str]) -> None:
    response = http.put(
        f"{SENDERS}/{sender_id}",
        json={"provider": "fake", "users": users},
        headers=auth("root", admin=True),
    )
    assert response.status_code == 201, response.text


def stored(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """(id, user_id, sender) of every message, oldest first."""
    return [
        (str(row[0]), row[1], row[2])
        for row in conn.execute(
            "SELECT id, user_id, sender FROM outbox.messages ORDER BY id"
        ).fetchall()
    ]


def test_a_sender_put_a_moment_ago_is_stored_shown_listed_and_counted(
    server: ServerThread, http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    put_sender(http, auth, "acme", ["user-1"])
    # No wait for the sender's notification: the send that follows reads again if needed.
    single = http.post(SEND, json=text(sender="acme"), headers=auth())
    assert single.status_code == 202, single.text
    batch = http.post(
        BATCH,
        json={"messages": [text(sender="acme"), text(), text(sender="acme")]},
        headers=auth(),
    )
    assert batch.status_code == 202, batch.text
    ids = [single.json()["task_id"], *(item["task_id"] for item in batch.json()["messages"])]
    assert stored(sql_conn) == [
        (ids[0], "user-1", "acme"),
        (ids[1], "user-1", "acme"),
        (ids[2], "user-1", "default"),
        (ids[3], "user-1", "acme"),
    ]

    view = http.get(f"{MESSAGES}/{ids[0]}", headers=auth()).json()
    assert view["sender"] == "acme"

    def listed(headers: dict[str, str], **params: str) -> list[tuple[str, str]]:
        response = http.get(MESSAGES, params=params, headers=headers)
        assert response.status_code == 200, response.text
        return [(m["task_id"], m["sender"]) for m in response.json()["messages"]]

    newest_first = [(ids[3], "acme"), (ids[1], "acme"), (ids[0], "acme")]
    assert listed(auth(), sender="acme") == newest_first
    assert listed(auth(), sender="default") == [(ids[2], "default")]
    assert listed(auth(), sender="acme", limit="2") == newest_first[:2]
    assert listed(auth("root", admin=True), sender="acme") == newest_first
    assert listed(auth("user-2"), sender="acme") == []
    assert listed(auth(), sender="nobody") == []  # a filter, not a check
    for bad in ("", "Acme", "a" * 65, "a b"):
        response = http.get(MESSAGES, params={"sender": bad}, headers=auth())
        assert response.status_code == 422, bad
        assert response.json()["error"]["fields"][0]["path"] == "sender"

    samples = scrape(f"{server.url}/metrics")
    accepted = "outbox_messages_accepted_total"
    assert value(samples, accepted, endpoint="single", sender="acme") == 1
    assert value(samples, accepted, endpoint="batch", sender="acme") == 2
    assert value(samples, accepted, endpoint="batch", sender="default") == 1
    assert value(samples, accepted, endpoint="single", sender="default") == 0


def test_an_unknown_sender_is_a_422_on_sender_and_nothing_is_stored(
    http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    single = http.post(SEND, json=text(sender="nobody"), headers=auth())
    assert single.status_code == 422, single.text
    error = single.json()["error"]
    assert error["code"] == "validation_error"
    assert error["fields"] == [{"path": "sender", "message": "there is no sender 'nobody'"}]

    items = [text(), text(sender="nobody"), text(), text(sender="nobody-else")]
    batch = http.post(BATCH, json={"messages": items}, headers=auth("root", admin=True))
    assert batch.status_code == 422, batch.text
    fields = batch.json()["error"]["fields"]
    assert [(f["index"], f["path"]) for f in fields] == [(1, "sender"), (3, "sender")]

    # Not a sender's id at all: refused by the body's rule, on the same path.
    malformed = http.post(SEND, json=text(sender="Not An Id"), headers=auth())
    assert malformed.status_code == 422
    assert [f["path"] for f in malformed.json()["error"]["fields"]] == ["sender"]
    assert stored(sql_conn) == []


def test_a_sender_not_listing_the_user_is_a_403_sender_forbidden(
    http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    put_sender(http, auth, "acme", ["user-2"])
    put_sender(http, auth, "open", ["*"])

    refused = http.post(SEND, json=text(sender="acme"), headers=auth("user-1"))
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "sender_forbidden"
    assert "acme" in refused.json()["error"]["message"]
    items = [text(sender="open"), text(sender="acme"), text()]
    batch = http.post(BATCH, json={"messages": items}, headers=auth("user-1"))
    assert batch.status_code == 403, batch.text
    assert batch.json()["error"]["code"] == "sender_forbidden"
    assert batch.json()["error"]["index"] == 1
    # Unknown beats forbidden: the 422 names every message that cannot be sent at all.
    items = [text(sender="acme"), text(sender="nobody")]
    both = http.post(BATCH, json={"messages": items}, headers=auth("user-1"))
    assert both.status_code == 422
    assert stored(sql_conn) == []

    allowed = [
        http.post(SEND, json=text(sender="acme"), headers=auth("user-2")),
        http.post(SEND, json=text(sender="open"), headers=auth("user-9")),  # "*": everyone
        http.post(SEND, json=text(sender="acme"), headers=auth("root", admin=True)),
        http.post(BATCH, json={"messages": items[:1]}, headers=auth("root", admin=True)),
    ]
    assert [response.status_code for response in allowed] == [202] * 4
    assert [(user, sender) for _, user, sender in stored(sql_conn)] == [
        ("user-2", "acme"),
        ("user-9", "open"),
        ("root", "acme"),
        ("root", "acme"),
    ]


def test_a_sender_stored_without_its_notification_is_found_by_the_next_send(
    server: ServerThread, http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    directory = directory_of(server)
    wait_for(directory.loaded.is_set, what="the senders' first read")
    # Its trigger off: no NOTIFY, so only the send's own read can find it.
    with sql_conn.transaction():
        sql_conn.execute("SET LOCAL session_replication_role = replica")
        sql_conn.execute(
            "INSERT INTO outbox.senders (id, provider, users) VALUES ('quiet', 'fake', '{*}')"
        )
    response = http.post(SEND, json=text(sender="quiet"), headers=auth())
    assert response.status_code == 202, response.text
    assert [sender for _, _, sender in stored(sql_conn)] == ["quiet"]


def test_a_user_added_without_its_notification_may_send_at_once(
    server: ServerThread, http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    put_sender(http, auth, "acme", ["user-2"])
    directory = directory_of(server)
    wait_for(lambda: directory.get("acme") is not None, what="acme in the directory")
    # user-1 added with the trigger off: only the refused send's own read can see it.
    with sql_conn.transaction():
        sql_conn.execute("SET LOCAL session_replication_role = replica")
        sql_conn.execute("UPDATE outbox.senders SET users = '{user-2,user-1}' WHERE id = 'acme'")
    response = http.post(SEND, json=text(sender="acme"), headers=auth("user-1"))
    assert response.status_code == 202, response.text
    assert [(user, sender) for _, user, sender in stored(sql_conn)] == [("user-1", "acme")]


def test_a_flood_of_unknown_senders_reads_the_senders_about_once_a_second(
    server: ServerThread, http: httpx.Client, auth: Auth
) -> None:
    directory = directory_of(server)
    wait_for(directory.loaded.is_set, what="the senders' first read")
    headers = auth()

    def send(n: int) -> int:
        return http.post(SEND, json=text(sender=f"unknown-{n}"), headers=headers).status_code

    reads_before = directory.reads
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(send, range(32)))
    elapsed = time.monotonic() - started
    reads = directory.reads - reads_before
    assert statuses == [422] * 32
    # One read at once, begun MISS_INTERVAL apart at least (one more for a 30 s reread).
    assert 1 <= reads <= elapsed / MISS_INTERVAL + 2, (reads, elapsed)


def test_idempotent_replays_keep_their_sender(
    http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    put_sender(http, auth, "acme", ["*"])
    put_sender(http, auth, "other", ["*"])
    first = http.post(SEND, json=text(client_message_id="c-1", sender="acme"), headers=auth())
    assert first.status_code == 202, first.text
    replay = http.post(SEND, json=text(client_message_id="c-1", sender="acme"), headers=auth())
    assert replay.status_code == 202
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["task_id"] == first.json()["task_id"]
    for sender in ("other", "default"):
        conflict = http.post(
            SEND, json=text(client_message_id="c-1", sender=sender), headers=auth()
        )
        assert conflict.status_code == 409, (sender, conflict.text)
    no_sender = http.post(SEND, json=text(client_message_id="c-1"), headers=auth())
    assert no_sender.status_code == 409
    in_batch = http.post(
        BATCH,
        json={"messages": [text(), text(client_message_id="c-1", sender="other")]},
        headers=auth(),
    )
    assert in_batch.status_code == 409 and in_batch.json()["error"]["index"] == 1

    # Naming the default, or no sender at all, is the same request: a replay either way
    # (so a request stored before messages named senders still replays).
    plain = http.post(SEND, json=text(client_message_id="c-2"), headers=auth())
    named = http.post(SEND, json=text(client_message_id="c-2", sender="default"), headers=auth())
    assert (plain.status_code, named.status_code) == (202, 202)
    assert named.headers["Idempotent-Replayed"] == "true"
    assert [sender for _, _, sender in stored(sql_conn)] == ["acme", "default"]


def test_an_admin_retry_of_a_message_whose_sender_was_deleted_is_a_409(
    http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    admin = auth("root", admin=True)
    put_sender(http, auth, "acme", ["*"])
    sent = http.post(SEND, json=text(sender="acme"), headers=auth())
    assert sent.status_code == 202, sent.text
    task_id = sent.json()["task_id"]
    sql_conn.execute(
        "UPDATE outbox.messages SET status = 'error', last_error = 'refused',"
        " finished_at = now() WHERE id = %s",
        [uuid.UUID(task_id)],
    )
    assert http.delete(f"{SENDERS}/acme", headers=admin).status_code == 204

    retry = http.post(f"{MESSAGES}/{task_id}/retry", headers=admin)
    assert retry.status_code == 409, retry.text
    assert retry.json()["error"]["code"] == "conflict"
    assert "sender 'acme' no longer exists" in retry.json()["error"]["message"]
    assert http.get(f"{MESSAGES}/{task_id}", headers=admin).json()["status"] == "error"

    # Created again, the sender takes its message back.
    put_sender(http, auth, "acme", ["*"])
    again = http.post(f"{MESSAGES}/{task_id}/retry", headers=admin)
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "pending" and again.json()["sender"] == "acme"


def test_a_named_sender_is_a_503_until_the_senders_were_read_once(
    settings: Settings, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    port = int(conninfo_to_dict(settings.database_url).get("port") or 5432)
    with TcpProxy(port) as proxy:
        proxy.cut()  # the database away from the start
        url = proxy.url(settings.database_url)
        away = Settings(
            **{
                **settings.model_dump(),
                "database_url": url,
                "listen_database_url": url,
                "db_pool_timeout": 1.0,
                "secret_key": KEY,
            }
        )
        with (
            ServerThread(create_app(away)) as server,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            assert not directory_of(server).loaded.is_set()
            unknown = http.post(SEND, json=text(sender="acme"), headers=auth())
            assert unknown.status_code == 503, unknown.text
            assert unknown.json()["error"]["code"] == "unavailable"

            sql_conn.execute(
                "INSERT INTO outbox.senders (id, provider, users) VALUES ('acme', 'fake', '{*}')"
            )
            proxy.restore()

            def answered() -> httpx.Response | None:
                response = http.post(SEND, json=text(sender="acme"), headers=auth())
                return None if response.status_code == 503 else response

            response = wait_for(answered, timeout=20, what="the database back")
            assert response.status_code == 202, response.text
    assert [sender for _, _, sender in stored(sql_conn)] == ["acme"]


# A sender's limit and pause as its state holds them ---------------------------------


def _admin_get(http: httpx.Client, auth: Auth, sender_id: str) -> dict[str, Any]:
    response = http.get(f"{SENDERS}/{sender_id}", headers=auth("root", admin=True))
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def _listed_view(http: httpx.Client, auth: Auth, sender_id: str) -> dict[str, Any]:
    response = http.get(SENDERS, headers=auth("root", admin=True))
    assert response.status_code == 200, response.text
    [view] = [s for s in response.json()["senders"] if s["id"] == sender_id]
    return view  # type: ignore[no-any-return]


def test_effective_rate_is_the_states_halved_by_a_throttle_and_climbing_back(
    http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    admin = auth("root", admin=True)
    put = http.put(f"{SENDERS}/limited", json={"provider": "fake", "rate_limit": 40}, headers=admin)
    assert put.status_code == 201, put.text
    assert (put.json()["rate_limit"], put.json()["effective_rate"]) == (40, 40)

    # A throttle as apply_sender_outcomes records one: halved now, +4/s (10 % of 40) back.
    sql_conn.execute(
        "UPDATE outbox.sender_state SET decreased_rate = 20, decreased_at = now()"
        " WHERE id = 'limited'"
    )
    view = _admin_get(http, auth, "limited")
    assert view["rate_limit"] == 40
    assert 20 <= view["effective_rate"] < 40
    assert 20 <= _listed_view(http, auth, "limited")["effective_rate"] < 40
    first = view["effective_rate"]
    wait_for(
        lambda: _admin_get(http, auth, "limited")["effective_rate"] > first,
        what="the rate climbing back",
    )
    # Five seconds without a throttle: back at the limit, never past it.
    sql_conn.execute(
        "UPDATE outbox.sender_state SET decreased_at = now() - interval '6 seconds'"
        " WHERE id = 'limited'"
    )
    assert _admin_get(http, auth, "limited")["effective_rate"] == 40

    # A sender without a state row is shown at its configured limit.
    sql_conn.execute("DELETE FROM outbox.sender_state WHERE id = 'limited'")
    assert _admin_get(http, auth, "limited")["effective_rate"] == 40


def test_an_unlimited_senders_learned_limit_shows_as_its_effective_rate(
    http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    admin = auth("root", admin=True)
    put = http.put(f"{SENDERS}/open", json={"provider": "fake", "rate_limit": None}, headers=admin)
    assert put.status_code == 201, put.text
    assert (put.json()["rate_limit"], put.json()["effective_rate"]) == (None, None)
    # Throttled at a measured 30/s: it learned 30/s and keeps to half of it, growing back.
    sql_conn.execute(
        "UPDATE outbox.sender_state SET learned_limit = 30, decreased_rate = 15,"
        " decreased_at = now() WHERE id = 'open'"
    )
    view = _admin_get(http, auth, "open")
    assert view["rate_limit"] is None
    assert 15 <= view["effective_rate"] < 30


def test_default_is_paused_and_resumed_by_hand_with_its_events(
    http: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    admin = auth("root", admin=True)
    paused = http.post(f"{SENDERS}/default/pause", json={"reason": "maintenance"}, headers=admin)
    assert paused.status_code == 200, paused.text
    view = paused.json()
    assert (view["id"], view["source"], view["state"]) == ("default", "environment", "paused")
    assert view["paused"]["reason"] == "maintenance"
    assert view["paused"]["manual"] is True and view["paused"]["until"] is None
    assert _admin_get(http, auth, "default")["state"] == "paused"
    assert _listed_view(http, auth, "default")["paused"]["reason"] == "maintenance"
    # Paused again for the same reason: the same pause, no second event.
    again = http.post(f"{SENDERS}/default/pause", json={"reason": "maintenance"}, headers=admin)
    assert again.status_code == 200 and again.json()["paused"] == view["paused"]

    resumed = http.post(f"{SENDERS}/default/resume", headers=admin)
    assert resumed.status_code == 200, resumed.text
    assert (resumed.json()["state"], resumed.json()["paused"]) == ("active", None)
    assert _admin_get(http, auth, "default")["state"] == "active"
    # Resumed again: nothing to resume, no event.
    assert http.post(f"{SENDERS}/default/resume", headers=admin).status_code == 200

    events = sql_conn.execute(
        "SELECT event, data FROM outbox.events WHERE sender = 'default' ORDER BY id"
    ).fetchall()
    assert [event for event, _ in events] == ["sender_paused", "sender_resumed"]
    assert events[0][1]["reason"] == "maintenance" and events[0][1]["manual"] is True

    # Its configuration stays the environment's; a user may not pause it.
    for method in ("PUT", "DELETE"):
        body = {"provider": "fake"} if method == "PUT" else None
        answer = http.request(method, f"{SENDERS}/default", json=body, headers=admin)
        assert answer.status_code == 409, (method, answer.text)
    assert http.post(f"{SENDERS}/default/pause", headers=auth()).status_code == 403


def test_defaults_effective_rate_comes_from_its_state(
    settings: Settings, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    limited = settings.model_copy(update={"secret_key": KEY, "sender_rate": 30.0})
    with (
        ServerThread(create_app(limited)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        # The processes write the environment's limit into default's state.
        wait_for(
            lambda: (
                sql_conn.execute(
                    "SELECT rate_limit = 30 FROM outbox.sender_state WHERE id = 'default'"
                ).fetchone()
                == (True,)
            ),
            what="default's limit in its state",
        )
        view = _admin_get(http, auth, "default")
        assert (view["rate_limit"], view["effective_rate"]) == (30, 30)
        sql_conn.execute(
            "UPDATE outbox.sender_state SET decreased_rate = 15, decreased_at = now()"
            " WHERE id = 'default'"
        )
        view = _admin_get(http, auth, "default")
        assert view["rate_limit"] == 30 and 15 <= view["effective_rate"] < 30

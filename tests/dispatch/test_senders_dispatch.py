"""Senders as real `outbox dispatch` processes use them: each message goes through its own
sender's provider, URL and credentials; a paused sender's messages wait, pending and
unattempted, until it resumes; senders created or changed while a dispatcher runs are
used within a moment, without a restart; a message whose sender is unknown ends in error,
never called with another sender's credentials."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from cryptography.fernet import Fernet

from outbox.api import create_app
from outbox.auth import mint_token
from outbox.settings import Settings
from outbox.store import QUERIES
from tests.conftest import JWT_SECRET
from tests.dispatch.conftest import (
    CLAIM_PARAMS,
    PROVIDER_SECRET,
    Call,
    DispatcherProcess,
    Reply,
    ScriptedProvider,
    insert_messages,
    statuses,
)
from tests.e2e.conftest import free_port
from tests.integration.test_senders import never_shown
from tests.scrape import scrape, value
from tests.support import ServerThread, wait_for

Provider = tuple[ScriptedProvider, str]
Start = Callable[..., DispatcherProcess]

SENDERS = "/api/v1/whatsapp/senders"
KEY = Fernet.generate_key().decode()
SECRETS = {"gw-a": "secret-of-gateway-a-7c1e", "gw-b": "secret-of-gateway-b-93fd"}
# Within this of its commit, a change made through the API is what a running dispatcher
# calls with: its NOTIFY is heard in milliseconds (the backstop read is every 30 s).
PICKED_UP_WITHIN = 1.0


@pytest.fixture
def admin(settings: Settings) -> Iterator[httpx.Client]:
    """A real API server with the secret key, and an admin's token on every request."""
    keyed = settings.model_copy(update={"secret_key": KEY})
    with ServerThread(create_app(keyed)) as server:
        token = mint_token(JWT_SECRET, "root", admin=True)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            yield http


def put_http_sender(admin: httpx.Client, sender_id: str, url: str, secret: str) -> None:
    body = {"provider": "http", "settings": {"url": url, "secret": secret}, "users": ["*"]}
    answer = admin.put(f"{SENDERS}/{sender_id}", json=body)
    assert answer.status_code in (200, 201), answer.text


def put_both_senders(admin: httpx.Client, provider: Provider) -> None:
    """The `http` senders of SECRETS, each at its own path of the scripted provider."""
    base = base_of(provider)
    for sender_id, secret in SECRETS.items():
        put_http_sender(admin, sender_id, f"{base}/{sender_id}", secret)


def send(http: httpx.Client, sender_id: str) -> str:
    """A text message sent through the API from `sender_id` (`default`: none named)."""
    body = {"to": "5511999999999", "type": "text", "text": "hi"}
    if sender_id != "default":
        body["sender"] = sender_id
    answer = http.post("/api/v1/whatsapp/send/", json=body)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


def base_of(provider: Provider) -> str:
    """The scripted provider's address; its paths tell the senders' calls apart."""
    return provider[1].rsplit("/", 1)[0]


def signed_with(call: Call, secret: str) -> bool:
    """Both signature headers of the call are the HMACs of its body under `secret`."""
    body_only = "sha256=" + hmac.new(secret.encode(), call.body, hashlib.sha256).hexdigest()
    stamp, _, v1 = call.signature_256.partition(",")
    signed = stamp.removeprefix("t=").encode() + b"." + call.body
    timestamped = "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return call.signature == body_only and v1 == timestamped


def message(conn: psycopg.Connection, task_id: str) -> tuple[str, int, str | None]:
    row = conn.execute(
        "SELECT status, attempts, last_error FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def wait_status(conn: psycopg.Connection, task_id: str, *wanted: str) -> str:
    status: str = wait_for(
        lambda: (got := message(conn, task_id)[0]) in wanted and got,
        what=f"message {task_id} {' or '.join(wanted)} (now {message(conn, task_id)})",
    )
    return status


def log_events(process: DispatcherProcess, event: str) -> list[dict[str, Any]]:
    lines = [line for line in process.log().splitlines() if line.startswith("{")]
    return [entry for line in lines if (entry := orjson.loads(line))["event"] == event]


def test_each_sender_calls_its_own_url_signed_with_its_own_secret(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start, admin: httpx.Client
) -> None:
    scripted, _ = provider
    put_both_senders(admin, provider)
    port = free_port()
    dispatcher = start_dispatcher(secret_key=KEY, metrics_port=str(port))
    # One message of each through the API ("sender" named, or not: the environment's),
    # one inserted directly.
    by_sender = {
        sender_id: [send(admin, sender_id), *insert_messages(sql_conn, 1, sender=sender_id)]
        for sender_id in ("gw-a", "gw-b", "default")
    }
    wait_for(lambda: statuses(sql_conn) == {"sent": 6}, what=f"6 sent ({statuses(sql_conn)})")

    secrets = {**SECRETS, "default": PROVIDER_SECRET}
    paths = {"gw-a": "/gw-a", "gw-b": "/gw-b", "default": "/send"}  # no sender: the env's
    for sender_id, task_ids in by_sender.items():
        for task_id in task_ids:
            [call] = scripted.calls_for(task_id)
            assert call.path == paths[sender_id], (sender_id, call.path)
            assert signed_with(call, secrets[sender_id]), sender_id
            assert not any(
                signed_with(call, other) for name, other in secrets.items() if name != sender_id
            )
    # The attempt lines and the attempts counter say which sender each attempt was for.
    expected = {t: s for s, task_ids in by_sender.items() for t in task_ids}

    def sent_lines() -> dict[str, str]:
        return {line["message_id"]: line["sender"] for line in log_events(dispatcher, "sent")}

    wait_for(lambda: len(sent_lines()) == 6, what="the 6 sent lines in the dispatcher's log")
    assert sent_lines() == expected
    url = f"http://127.0.0.1:{port}/metrics"
    for sender_id in by_sender:
        labels = {"outcome": "sent", "error_class": "none", "sender": sender_id}
        wait_for(
            lambda labels=labels: value(scrape(url), "outbox_attempts_total", **labels) == 2,
            what=f"2 attempts of {sender_id} counted",
        )
    never_shown(dispatcher.log(), *SECRETS.values(), KEY)


def test_a_paused_sender_holds_its_messages_until_it_resumes(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start, admin: httpx.Client
) -> None:
    scripted, _ = provider
    put_both_senders(admin, provider)
    start_dispatcher(secret_key=KEY)
    assert admin.post(f"{SENDERS}/gw-a/pause").status_code == 200

    [held] = insert_messages(sql_conn, 1, sender="gw-a")
    expiring_at = sql_conn.execute("SELECT now() + interval '1 second'").fetchone()
    assert expiring_at is not None
    [expiring] = insert_messages(sql_conn, 1, sender="gw-a", expires_at=str(expiring_at[0]))
    # Due after the held one: the claim that takes it passed over the held one.
    [other] = insert_messages(sql_conn, 1, sender="gw-b")
    wait_status(sql_conn, other, "sent")
    assert message(sql_conn, held) == ("pending", 0, None)
    assert [call.path for call in scripted.calls] == ["/gw-b"]

    # Still paused when it expires: it ends as an expired message does, uncalled.
    assert wait_status(sql_conn, expiring, "error", "sent") == "error"
    assert message(sql_conn, expiring) == ("error", 0, "expired")

    deleted = admin.delete(f"{SENDERS}/gw-a")
    assert deleted.status_code == 409, deleted.text
    assert message(sql_conn, held) == ("pending", 0, None)
    assert scripted.calls_for(held) == []

    assert admin.post(f"{SENDERS}/gw-a/resume").status_code == 200
    wait_status(sql_conn, held, "sent")
    [call] = scripted.calls_for(held)
    assert call.path == "/gw-a" and call.attempt == 1 and signed_with(call, SECRETS["gw-a"])
    assert message(sql_conn, held)[1] == 1


def test_a_pause_holds_the_rows_a_dispatcher_already_claimed(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start, admin: httpx.Client
) -> None:
    scripted, _ = provider
    put_http_sender(admin, "gw-a", f"{base_of(provider)}/gw-a", SECRETS["gw-a"])
    slow = Reply(body={"id": "prov-slow"}, delay=3.0)
    scripted.script = lambda call, n: slow if len(scripted.calls) == 1 else Reply(body={})
    first, *waiting = insert_messages(sql_conn, 4, sender="gw-a")
    # One call at a time: the first claim takes all four, the other three wait in the
    # prefetch buffer while the first call lasts.
    start_dispatcher(
        secret_key=KEY, dispatch_concurrency="1", dispatch_prefetch="3", provider_timeout="5s"
    )
    wait_for(lambda: len(scripted.calls) == 1, what="the first call")
    assert scripted.calls[0].task_id == first

    sql_conn.execute("SELECT outbox.pause_sender('gw-a', 'why', NULL, NULL, true)")
    for task_id in waiting:
        wait_for(
            lambda task_id=task_id: message(sql_conn, task_id) == ("pending", 0, "sender paused"),
            what=f"{task_id} handed back (now {message(sql_conn, task_id)})",
        )
    wait_status(sql_conn, first, "sent")  # the call in flight ends as it would have
    assert [call.task_id for call in scripted.calls] == [first]
    assert all(message(sql_conn, task_id)[:2] == ("pending", 0) for task_id in waiting)

    sql_conn.execute("SELECT outbox.resume_sender('gw-a')")
    for task_id in waiting:
        wait_status(sql_conn, task_id, "sent")
        [call] = scripted.calls_for(task_id)
        assert call.attempt == 1
    assert len(scripted.calls) == 4


def changed_at(conn: psycopg.Connection, sender_id: str) -> float:
    """When the sender last changed, as time.time() counts: now() of the transaction that
    changed it (a moment before its commit), by the database's clock on this host."""
    row = conn.execute(
        "SELECT extract(epoch FROM updated_at) FROM outbox.senders WHERE id = %s", [sender_id]
    ).fetchone()
    assert row is not None
    return float(row[0])


def first_call_at(
    conn: psycopg.Connection, scripted: ScriptedProvider, sender_id: str, path: str
) -> float:
    """When (time.time()) a message of `sender_id` was first called at `path`: a message at
    a time, each inserted once the one before was called, until one is called there."""
    deadline = time.monotonic() + 10
    while True:
        [task_id] = insert_messages(conn, 1, sender=sender_id)
        assert wait_status(conn, task_id, "sent", "error") == "sent", message(conn, task_id)
        [call] = scripted.calls_for(task_id)
        if call.path == path:
            return call.at
        assert time.monotonic() < deadline, f"still {call.path}"


def test_senders_created_or_changed_while_running_are_used_without_a_restart(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start, admin: httpx.Client
) -> None:
    scripted, _ = provider
    base = base_of(provider)
    dispatcher = start_dispatcher(secret_key=KEY)  # no sender stored yet

    put_http_sender(admin, "gw-a", f"{base}/first", SECRETS["gw-a"])
    created = first_call_at(sql_conn, scripted, "gw-a", "/first") - changed_at(sql_conn, "gw-a")
    assert created < PICKED_UP_WITHIN, f"created: used {created:.3f}s after its commit"

    # A new URL and secret: the calls move, signed with the new secret.
    put_http_sender(admin, "gw-a", f"{base}/second", SECRETS["gw-b"])
    replaced = first_call_at(sql_conn, scripted, "gw-a", "/second") - changed_at(sql_conn, "gw-a")
    assert replaced < PICKED_UP_WITHIN, f"replaced: used {replaced:.3f}s after its commit"
    moved = [call for call in scripted.calls if call.path == "/second"]
    assert moved and all(signed_with(call, SECRETS["gw-b"]) for call in moved)
    assert all(signed_with(c, SECRETS["gw-a"]) for c in scripted.calls if c.path == "/first")
    assert dispatcher.proc.poll() is None  # the same process throughout


def test_a_message_whose_sender_is_unknown_ends_in_error_uncalled(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    start_dispatcher(secret_key=KEY)
    # Stored after the start, its credentials encrypted with another key: this
    # dispatcher cannot decrypt them, so it never calls with them.
    foreign = Fernet(Fernet.generate_key()).encrypt(b'{"secret": "not-ours"}')
    sql_conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, secrets, secret_fields, users)
           VALUES ('foreign', 'http', %s, %s, '{secret}', '{*}')""",
        [orjson.dumps({"url": f"{base_of(provider)}/foreign"}).decode(), foreign],
    )
    [ghost] = insert_messages(sql_conn, 1, sender="ghost")
    [undecryptable] = insert_messages(sql_conn, 1, sender="foreign")
    [fine] = insert_messages(sql_conn, 1)
    for task_id in (ghost, undecryptable, fine):
        wait_status(sql_conn, task_id, "sent", "error")

    assert message(sql_conn, ghost) == ("error", 0, "sender 'ghost' does not exist")
    assert message(sql_conn, undecryptable) == (
        "error",
        0,
        "sender 'foreign' cannot be used: its credentials do not decrypt with this"
        " dispatcher's OUTBOX_SECRET_KEY",
    )
    assert message(sql_conn, fine)[0] == "sent"
    assert [call.path for call in scripted.calls] == ["/send"]
    outcomes = sql_conn.execute(
        "SELECT message_id::text, outcome FROM outbox.attempts WHERE message_id = ANY(%s)",
        [[ghost, undecryptable]],
    ).fetchall()
    assert sorted(outcome for _, outcome in outcomes) == ["permanent", "permanent"]


# The claim statement itself -----------------------------------------------------------


CLAIM = CLAIM_PARAMS


def claim(conn: psycopg.Connection, limit: int = 10) -> tuple[list[str], Any, bool]:
    """One claim, rolled back: the ids it took, its next_due_at and its `more`."""
    with conn.transaction(force_rollback=True):
        rows = conn.execute(QUERIES["claim_messages"], {**CLAIM, "limit": limit}).fetchall()
    end = rows[-1]
    assert end[0] is None  # the claim's last row says what comes next
    return [str(row[0]) for row in rows if row[0] is not None], end[-3], end[-2]


def pause(conn: psycopg.Connection, sender_id: str) -> None:
    conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, users)
           VALUES (%s, 'fake', '{}', '{*}') ON CONFLICT DO NOTHING""",
        [sender_id],
    )
    conn.execute("SELECT outbox.pause_sender(%s, 'by hand', NULL, NULL, true)", [sender_id])


def test_a_claim_leaves_a_paused_senders_messages_and_does_not_wake_for_them(
    sql_conn: psycopg.Connection,
) -> None:
    pause(sql_conn, "gw-p")
    insert_messages(sql_conn, 3, sender="gw-p")
    later = sql_conn.execute("SELECT now() + interval '1 hour'").fetchone()
    assert later is not None
    insert_messages(sql_conn, 1, sender="gw-p", send_at=str(later[0]))
    # Nothing to claim, and no time to wake up at: a dispatcher waits for a NOTIFY (a
    # pause by hand is never probed; its resume notifies).
    assert claim(sql_conn) == ([], None, False)

    [active] = insert_messages(sql_conn, 1)
    [expired] = insert_messages(sql_conn, 1, sender="gw-p", expires_at="2000-01-01T00:00:00Z")
    taken, next_due_at, _ = claim(sql_conn)
    assert taken == [active]  # the expired one is the reaper's to end, not a claim's
    assert next_due_at is None

    # The reaper's round ends it, uncalled, its attempts unchanged.
    ended = sql_conn.execute("SELECT outbox.expire_pending(1000)").fetchall()
    assert [str(row[0]) for row in ended] == [expired]
    assert message(sql_conn, expired) == ("error", 0, "expired")
    history = sql_conn.execute(
        "SELECT attempt, dispatcher, outcome, error FROM outbox.attempts WHERE message_id = %s",
        [expired],
    ).fetchall()
    assert history == [(1, "reaper", "expired", "expired")]

    # The plan: the paused sender's backlog is not read past its first row, however long.
    insert_messages(sql_conn, 2_000, sender="gw-p")
    sql_conn.execute("ANALYZE outbox.messages")
    with sql_conn.transaction(force_rollback=True):
        row = sql_conn.execute(
            b"EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["claim_messages"].encode(),
            {**CLAIM, "limit": 10},
        ).fetchone()
    assert row is not None
    plan = row[0][0]["Plan"]
    read = [
        (node["Node Type"], node.get("Index Name"), node["Actual Rows"] * node["Actual Loops"])
        for node in plan_nodes(plan)
        if node.get("Relation Name") == "messages"
    ]
    assert all(kind != "Seq Scan" for kind, _, _ in read), read
    assert sum(rows for _, _, rows in read) < 50, read


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)

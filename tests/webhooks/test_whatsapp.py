"""Meta's status webhooks on a real server and database: the verification handshake, the
signature under the known app secrets (and whose messages each secret may name), the body
limit, and what each status does to the message's delivery and to the event feed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import psycopg
import pytest

from outbox import webhooks
from tests.support import wait_for
from tests.webhooks.conftest import HooksFactory
from tests.webhooks.support import (
    ENV_APP_SECRET,
    META_FAILURE,
    VERIFY_TOKEN,
    WHATSAPP,
    Hooks,
    change,
    hub_signature,
    messages_value,
    notification,
    status,
    statuses,
    wamid,
)

APP_A = "app-secret-of-meta-app-a"
APP_B = "app-secret-of-meta-app-b"
NOW = int(time.time())


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def wire(seconds: int) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def untouched(hooks: Hooks, task_id: str) -> bool:
    row = hooks.row(task_id)
    columns = ("delivery_state", "provider_sent_at", "delivered_at", "read_at", "failed_at")
    return all(row[c] is None for c in columns) and not hooks.status_events(task_id)


# The handshake ------------------------------------------------------------------------


def test_the_handshake_answers_the_challenge_for_the_verify_token_only(hooks: Hooks) -> None:
    ok = hooks.client.get(
        WHATSAPP,
        params={
            "hub.mode": "subscribe",
            "hub.verify_token": VERIFY_TOKEN,
            "hub.challenge": "1158201444",
        },
    )
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("text/plain")
    assert ok.text == "1158201444"
    refused = [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {"hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN + "x", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": "ünïcødé", "hub.challenge": "1"},
        {},
    ]
    for params in refused:
        response = hooks.client.get(WHATSAPP, params=params)
        assert response.status_code == 403, params
        assert response.json()["error"]["code"] == "forbidden"


def test_without_a_verify_token_configured_every_handshake_is_refused(
    hooks_with: HooksFactory,
) -> None:
    with hooks_with(cloud_verify_token="") as hooks:
        for token in ("", VERIFY_TOKEN):
            params = {"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": "7"}
            assert hooks.client.get(WHATSAPP, params=params).status_code == 403


# Signatures ---------------------------------------------------------------------------


def test_a_missing_forged_or_foreign_signature_is_401_and_records_nothing(hooks: Hooks) -> None:
    task_id, provider_id = hooks.sent_message()
    document = statuses(status("delivered", NOW, provider_id=provider_id, task_id=task_id))
    body = httpx.Request("POST", "http://x", json=document).content
    attempts: dict[str, dict[str, str | bytes]] = {
        "missing": {},
        "forged": {"X-Hub-Signature-256": "sha256=" + "0" * 64},
        "another app's secret": {"X-Hub-Signature-256": hub_signature(body, "not-ours")},
        "another body's": {"X-Hub-Signature-256": hub_signature(body + b" ", ENV_APP_SECRET)},
        "sha1": {"X-Hub-Signature-256": "sha1=" + hub_signature(body, ENV_APP_SECRET)[7:47]},
        "not hex": {"X-Hub-Signature-256": "sha256=" + "z" * 64},
        "bare digest": {"X-Hub-Signature-256": hub_signature(body, ENV_APP_SECRET)[7:]},
        "latin-1": {"X-Hub-Signature-256": b"sha256=" + b"\xe9" * 64},
    }
    for name, headers in attempts.items():
        response = hooks.client.post(
            WHATSAPP, content=body, headers={"Content-Type": "application/json", **headers}
        )
        assert response.status_code == 401, name
        assert response.json()["error"]["code"] == "unauthorized", name
    # Not parsed before it is checked: an unsigned body that is not JSON is 401, not 400.
    assert hooks.post_meta(b"{not json", secret=None).status_code == 401
    assert hooks.post_meta(b"{not json", secret="forged").status_code == 401
    assert untouched(hooks, task_id)
    # Uppercase hex is the same digest.
    upper = "sha256=" + hub_signature(body, ENV_APP_SECRET)[7:].upper()
    response = hooks.client.post(
        WHATSAPP,
        content=body,
        headers={"Content-Type": "application/json", "X-Hub-Signature-256": upper},
    )
    assert response.status_code == 200, response.text
    assert hooks.row(task_id)["delivery_state"] == 2


def test_a_cloud_senders_app_secret_names_that_senders_messages_only(hooks: Hooks) -> None:
    hooks.cloud_sender("cloud_a", APP_A)
    hooks.cloud_sender("cloud_b", APP_B)
    a_task, a_wamid = hooks.sent_message("cloud_a")
    b_task, b_wamid = hooks.sent_message("cloud_b")
    d_task, d_wamid = hooks.sent_message("default")
    document = statuses(
        status("delivered", NOW, provider_id=a_wamid, task_id=a_task),
        status("delivered", NOW, provider_id=b_wamid, task_id=b_task),  # by task id
        status("delivered", NOW, provider_id=b_wamid),  # by wamid
        status("delivered", NOW, provider_id=d_wamid, task_id=d_task),
    )
    response = hooks.post_meta(document, secret=APP_A)
    assert response.status_code == 200, response.text
    assert response.json() == {"recorded": 1, "unknown": 3, "ignored": 0}
    assert hooks.row(a_task)["delivery_state"] == 2
    assert [e["status"] for e in hooks.status_events(a_task)] == ["delivered"]
    assert untouched(hooks, b_task) and untouched(hooks, d_task)
    # B's own secret reaches B's message; A's secret, B's message still not.
    response = hooks.post_meta(statuses(status("read", NOW + 5, provider_id=b_wamid)), APP_B)
    assert response.json() == {"recorded": 1, "unknown": 0, "ignored": 0}
    assert hooks.row(b_task)["delivery_state"] == 3
    # OUTBOX_CLOUD_APP_SECRET names any sender's messages.
    document = statuses(status("delivered", NOW, provider_id=d_wamid, task_id=d_task))
    assert hooks.post_meta(document, ENV_APP_SECRET).json()["recorded"] == 1
    assert hooks.row(d_task)["delivery_state"] == 2


def test_senders_of_one_meta_app_share_its_secret(hooks: Hooks) -> None:
    hooks.cloud_sender("number_1", APP_A)
    hooks.cloud_sender("number_2", APP_A)
    hooks.cloud_sender("other_app", APP_B)
    one, one_wamid = hooks.sent_message("number_1")
    two, two_wamid = hooks.sent_message("number_2")
    other, other_wamid = hooks.sent_message("other_app")
    document = statuses(
        status("delivered", NOW, provider_id=one_wamid),
        status("delivered", NOW, provider_id=two_wamid),
        status("delivered", NOW, provider_id=other_wamid),
    )
    assert hooks.post_meta(document, APP_A).json() == {"recorded": 2, "unknown": 1, "ignored": 0}
    assert hooks.row(one)["delivery_state"] == hooks.row(two)["delivery_state"] == 2
    assert untouched(hooks, other)


def test_without_any_app_secret_every_notification_is_401(hooks_with: HooksFactory) -> None:
    with hooks_with(cloud_app_secret="") as hooks:
        task_id, provider_id = hooks.sent_message()
        document = statuses(status("delivered", NOW, provider_id=provider_id))
        for secret in ("", ENV_APP_SECRET, None):
            response = hooks.post_meta(document, secret=secret)
            assert response.status_code == 401
        assert untouched(hooks, task_id)


# The body's size ----------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_while_it_is_read(hooks: Hooks) -> None:
    task_id, provider_id = hooks.sent_message()
    padding = "x" * (2 * 1024 * 1024)
    document = statuses(status("delivered", NOW, provider_id=provider_id)) | {"pad": padding}
    big = httpx.Request("POST", "http://x", json=document).content
    assert len(big) > 2 * 1024 * 1024
    signature = hub_signature(big, ENV_APP_SECRET)
    declared = hooks.client.post(
        WHATSAPP,
        content=big,
        headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature},
    )
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    streamed = hooks.client.post(
        WHATSAPP,
        content=chunks(),
        headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature},
    )
    assert streamed.status_code == 413
    assert untouched(hooks, task_id)
    # Under the limit the same receipt is recorded.
    small = statuses(status("delivered", NOW, provider_id=provider_id))
    assert hooks.post_meta(small).json()["recorded"] == 1


# What each status does ----------------------------------------------------------------


def test_unknown_ids_are_acknowledged_and_counted(hooks: Hooks) -> None:
    document = statuses(
        status("delivered", NOW),
        status("read", NOW, task_id="0190f3c5-7d3e-7cc1-8f57-3c2b1a0d9e8f"),
        status("failed", NOW, task_id="not-a-uuid", errors=[META_FAILURE]),
    )
    response = hooks.post_meta(document)
    assert response.status_code == 200
    assert response.json() == {"recorded": 0, "unknown": 3, "ignored": 0}
    assert hooks.post_meta(document).json()["unknown"] == 3
    assert hooks.receipts_counted("whatsapp", "unknown") == 6
    assert hooks.receipts_counted("whatsapp", "recorded") == 0
    assert hooks.conn.execute("SELECT count(*) FROM outbox.events").fetchone() == (0,)


def test_inbound_messages_other_fields_and_other_statuses_are_acknowledged(
    hooks: Hooks,
) -> None:
    task_id, provider_id = hooks.sent_message()
    inbound = {
        "from": "5511988887777",
        "id": wamid(),
        "timestamp": str(NOW),
        "type": "text",
        "text": {"body": "hello"},
    }
    document = notification(
        change(
            messages_value(
                contacts=[{"profile": {"name": "Ana"}, "wa_id": "5511988887777"}],
                messages=[inbound, inbound],
            )
        ),
        change({"event": "APPROVED", "message_template_id": 1}, "message_template_status_update"),
        change(
            messages_value(
                statuses=[
                    status("played", NOW, provider_id=provider_id),
                    status("delivered", NOW, provider_id=provider_id),
                ]
            )
        ),
    )
    response = hooks.post_meta(document)
    assert response.status_code == 200, response.text
    assert response.json() == {"recorded": 1, "unknown": 0, "ignored": 4}
    assert hooks.receipts_counted("whatsapp", "ignored") == 4
    assert hooks.receipts_counted("whatsapp", "recorded") == 1
    assert [e["status"] for e in hooks.status_events(task_id)] == ["delivered"]


def test_duplicates_change_nothing_and_make_one_event(hooks: Hooks) -> None:
    task_id, provider_id = hooks.sent_message()
    delivered = status("delivered", NOW, provider_id=provider_id, task_id=task_id)
    later = status("delivered", NOW + 30, provider_id=provider_id, task_id=task_id)
    assert hooks.post_meta(statuses(delivered, delivered)).json()["recorded"] == 2
    first = hooks.row(task_id)
    for document in (statuses(delivered), statuses(later), statuses(delivered, later)):
        assert hooks.post_meta(document).status_code == 200
    row = hooks.row(task_id)
    assert row["delivery_state"] == 2
    assert row["delivered_at"] == at(NOW)  # the first time reported
    assert row["updated_at"] == first["updated_at"]
    events = hooks.status_events(task_id)
    assert [e["status"] for e in events] == ["delivered"]
    assert events[0]["timestamp"] == wire(NOW)


def test_read_before_delivered_stays_read(hooks: Hooks) -> None:
    task_id, provider_id = hooks.sent_message()
    read = statuses(status("read", NOW + 10, provider_id=provider_id))
    assert hooks.post_meta(read).json()["recorded"] == 1
    delivered = statuses(status("delivered", NOW, provider_id=provider_id))
    assert hooks.post_meta(delivered).json()["recorded"] == 1
    row = hooks.row(task_id)
    assert row["delivery_state"] == 3
    assert row["read_at"] == at(NOW + 10)
    assert row["delivered_at"] == at(NOW + 10)  # read implies delivered: filled by it
    assert [e["status"] for e in hooks.status_events(task_id)] == ["read"]


def test_failed_then_delivered_is_delivered_and_keeps_the_failure(hooks: Hooks) -> None:
    task_id, provider_id = hooks.sent_message()
    failed = status("failed", NOW, provider_id=provider_id, task_id=task_id, errors=[META_FAILURE])
    assert hooks.post_meta(statuses(failed)).json()["recorded"] == 1
    assert hooks.row(task_id)["delivery_state"] == 1
    delivered = statuses(status("delivered", NOW + 3, task_id=task_id))
    assert hooks.post_meta(delivered).status_code == 200
    row = hooks.row(task_id)
    assert row["status"] == "sent"  # the call succeeded: a receipt never changes that
    assert row["delivery_state"] == 2
    assert row["failed_at"] == at(NOW) and row["delivered_at"] == at(NOW + 3)
    assert row["delivery_error"]["code"] == 131026
    assert [e["status"] for e in hooks.status_events(task_id)] == ["failed", "delivered"]


def test_metas_failure_reaches_the_message_and_the_event(hooks: Hooks) -> None:
    hooks.cloud_sender("cloud_a", APP_A)
    task_id, provider_id = hooks.sent_message("cloud_a")
    failed = status("failed", NOW, provider_id=provider_id, task_id=task_id, errors=[META_FAILURE])
    assert hooks.post_meta(statuses(failed), APP_A).json()["recorded"] == 1
    expected = {
        "code": 131026,
        "title": "Message undeliverable",
        "details": "Message Undeliverable.",
    }
    row = hooks.row(task_id)
    assert (row["status"], row["delivery_state"], row["failed_at"]) == ("sent", 1, at(NOW))
    assert row["delivery_error"] == expected
    assert row["last_error"] is None
    (event,) = hooks.status_events(task_id)
    assert event["message_id"] == task_id
    assert event["status"] == "failed"
    assert event["error"] == expected
    assert event["timestamp"] == wire(NOW)
    assert event["sender"] == "cloud_a"
    assert event["provider_message_id"] == provider_id
    # No automatic retry: the message stays sent, nothing pending.
    assert hooks.row(task_id)["attempts"] == 1


def test_a_sent_status_records_the_providers_time_only(hooks: Hooks) -> None:
    task_id, provider_id = hooks.sent_message()
    response = hooks.post_meta(statuses(status("sent", NOW - 2, provider_id=provider_id)))
    assert response.json() == {"recorded": 1, "unknown": 0, "ignored": 0}
    row = hooks.row(task_id)
    assert row["provider_sent_at"] == at(NOW - 2)
    assert row["delivery_state"] is None and row["delivered_at"] is None
    assert hooks.status_events(task_id) == []


def test_a_receipt_proves_a_message_with_an_unknown_outcome_sent(hooks: Hooks) -> None:
    task_id = hooks.send()
    hooks.finish(task_id, "error", last_error="unknown outcome: read timeout after 10s")
    before = [event for event, _ in hooks.events(task_id)]
    assert before == ["message_sent"]  # failed
    provider_id = wamid()
    document = statuses(status("delivered", NOW, provider_id=provider_id, task_id=task_id))
    assert hooks.post_meta(document).json()["recorded"] == 1
    row = hooks.row(task_id)
    assert row["status"] == "sent"
    assert row["last_error"] is None
    assert row["provider_message_id"] == provider_id
    assert row["delivery_state"] == 2
    events = hooks.events(task_id)[1:]
    assert [(event, data["status"]) for event, data in events] == [
        ("message_sent", "queued"),
        ("message_status", "delivered"),
    ]


def test_many_statuses_in_one_post_are_all_or_nothing(hooks_with: HooksFactory) -> None:
    with hooks_with(api_statement_timeout=0.5) as hooks:
        sent = [hooks.sent_message() for _ in range(30)]
        document = notification(
            *(
                change(messages_value(statuses=[status("delivered", NOW, provider_id=wamid_)]))
                for _, wamid_ in sent[:15]
            ),
            change(
                messages_value(
                    statuses=[
                        status("read", NOW + 1, provider_id=wamid_, task_id=task_id)
                        for task_id, wamid_ in sent[15:]
                    ]
                )
            ),
        )
        # Another transaction holds the last message: the POST's transaction waits for it
        # until the statement timeout ends it (503), and none of the others are recorded.
        with psycopg.connect(hooks.conn.info.dsn) as holder:
            holder.execute("SELECT 1 FROM outbox.messages WHERE id = %s FOR UPDATE", [sent[-1][0]])
            refused = hooks.post_meta(document)
            assert refused.status_code == 503, refused.text
            holder.rollback()
        assert all(untouched(hooks, task_id) for task_id, _ in sent)
        # Once free: all of them, each with its event, announced by one notification.
        with psycopg.connect(hooks.conn.info.dsn, autocommit=True) as listener:
            listener.execute("LISTEN outbox_events")
            response = hooks.post_meta(document)
            assert response.json() == {"recorded": 30, "unknown": 0, "ignored": 0}
            notes = []
            for note in listener.notifies(timeout=1.0):
                notes.append(note.payload)
        states = [hooks.row(task_id)["delivery_state"] for task_id, _ in sent]
        assert states == [2] * 15 + [3] * 15
        last = hooks.conn.execute("SELECT max(id) FROM outbox.events").fetchone()
        assert last is not None
        assert notes == [str(last[0])]
        counts = hooks.conn.execute(
            "SELECT count(*) FROM outbox.events WHERE event = 'message_status'"
        ).fetchone()
        assert counts == (30,)


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"null",
        b'"text"',
        b"{}",
        b'{"entry": {}}',
        b'{"entry": [1, {"changes": 2}, {"changes": [3, {"field": "messages"}]}]}',
        b'{"entry": [{"changes": [{"field": "messages", "value": {"statuses": {}}}]}]}',
        b'{"entry": [{"changes": [{"field": "messages", "value": {"errors": [{}]}}]}]}',
        b'{"entry": [{"changes": [{"field": "messages", "value": {"statuses": [1, {},'
        b' {"status": 5}, {"status": "read"}, {"status": "read", "id": "w", "timestamp": "x"},'
        b' {"status": "read", "id": "w", "timestamp": "1e400"},'
        b' {"status": "read", "id": "w", "timestamp": "-1"},'
        b' {"status": "read", "id": "w", "timestamp": true},'
        b' {"status": "read", "id": "a\\u0000b", "timestamp": "1"},'
        b' {"status": "read", "id": 7, "timestamp": "1"},'
        b' {"status": "failed", "id": "w", "timestamp": 1.5, "errors": [{"code": 1e30,'
        b' "title": "t\\u0000", "error_data": {"details": ["x"]}}]},'
        b' {"status": "failed", "id": "w", "timestamp": "2", "errors": "x"},'
        b' {"status": "failed", "id": "w", "timestamp": "3", "errors": [{"code":'
        b" 123456789012345678901234567890}]}]}}]}]}",
    ],
)
def test_odd_shapes_are_acknowledged_never_a_server_error(hooks: Hooks, body: bytes) -> None:
    response = hooks.post_meta(body)
    assert response.status_code == 200, response.text
    counts = response.json()
    assert counts["recorded"] == 0 and counts["ignored"] + counts["unknown"] >= 1


def test_a_signed_body_that_is_not_json_is_400(hooks: Hooks) -> None:
    for body in (b"", b"{", b"\xff\xfe", b'{"a": "\\ud800"}'):
        response = hooks.post_meta(body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == "malformed_json"


def test_each_kind_is_logged_once(hooks: Hooks, capfd: pytest.CaptureFixture[str]) -> None:
    webhooks._logged.clear()
    document = notification(
        change(messages_value(statuses=[status("delivered", NOW)])),
        change(messages_value(messages=[{"from": "5511988887777", "id": "x"}])),
    )
    for _ in range(3):
        assert hooks.post_meta(document).status_code == 200
    wait_for(lambda: hooks.receipts_counted("whatsapp", "unknown") == 3)
    logged = capfd.readouterr()
    text = logged.out + logged.err
    assert text.count("receipts for messages unknown here acknowledged") == 1
    assert text.count("inbound messages are acknowledged") == 1
    assert "5511988887777" not in text  # phones masked, never logged in clear
    assert ENV_APP_SECRET not in text

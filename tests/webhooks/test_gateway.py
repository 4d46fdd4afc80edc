"""A self-hosted gateway's receipts (POST /webhooks/http) on a real server and database:
signed with its http sender's secret in the timestamped scheme, stale or forged refused,
the body validated strictly, matched among that sender's messages only."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from tests.webhooks.conftest import HooksFactory
from tests.webhooks.support import (
    DEFAULT_SECRET,
    HTTP,
    Hooks,
    gateway_signature,
    status,
    statuses,
)

GATEWAY_SECRET = "secret-of-gateway-gw"
NOW = int(time.time())


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def body(sender: str, *statuses: dict[str, Any]) -> dict[str, Any]:
    return {"sender": sender, "statuses": list(statuses)}


def untouched(hooks: Hooks, task_id: str) -> bool:
    row = hooks.row(task_id)
    return row["delivery_state"] is None and not hooks.status_events(task_id)


def test_signed_receipts_are_recorded_with_one_error_shape(hooks: Hooks) -> None:
    delivered, delivered_id = hooks.sent_message()
    failed, _ = hooks.sent_message()
    document = body(
        "default",
        {"task_id": delivered, "status": "delivered", "timestamp": NOW, "error": None},
        {"id": delivered_id, "status": "read", "timestamp": NOW + 2.5},
        {
            "task_id": failed,
            "status": "failed",
            "timestamp": NOW,
            "error": {"code": "blocked", "message": "the recipient blocked this number"},
        },
        {"id": "gw-unknown-id", "status": "delivered", "timestamp": NOW},
    )
    response = hooks.post_gateway(document)
    assert response.status_code == 200, response.text
    assert response.json() == {"recorded": 3, "unknown": 1, "ignored": 0}
    row = hooks.row(delivered)
    assert (row["delivery_state"], row["delivered_at"], row["read_at"]) == (
        3,
        at(NOW),
        at(NOW + 2.5),
    )
    error = {"code": "blocked", "title": "the recipient blocked this number", "details": None}
    assert hooks.row(failed)["delivery_error"] == error
    (event,) = hooks.status_events(failed)
    assert (event["status"], event["error"], event["sender"]) == ("failed", error, "default")
    assert hooks.receipts_counted("http", "recorded") == 3
    assert hooks.receipts_counted("http", "unknown") == 1


def test_a_stored_http_senders_secret_names_its_own_messages_only(hooks: Hooks) -> None:
    hooks.http_sender("gw", GATEWAY_SECRET)
    mine, _ = hooks.sent_message("gw")
    others, others_id = hooks.sent_message("default")
    document = body(
        "gw",
        {"task_id": mine, "status": "delivered", "timestamp": NOW},
        {"task_id": others, "status": "delivered", "timestamp": NOW},
        {"id": others_id, "status": "read", "timestamp": NOW},
    )
    response = hooks.post_gateway(document, GATEWAY_SECRET)
    assert response.json() == {"recorded": 1, "unknown": 2, "ignored": 0}
    assert hooks.row(mine)["delivery_state"] == 2
    assert untouched(hooks, others)
    # The body names a sender whose secret did not sign it: 401.
    claimed = body("default", {"id": others_id, "status": "read", "timestamp": NOW})
    assert hooks.post_gateway(claimed, GATEWAY_SECRET).status_code == 401
    assert untouched(hooks, others)
    assert hooks.post_gateway(claimed, DEFAULT_SECRET).json()["recorded"] == 1
    assert hooks.row(others)["delivery_state"] == 3


def test_forged_stale_and_unsigned_receipts_are_401(hooks: Hooks) -> None:
    task_id, _ = hooks.sent_message()
    document = body("default", {"task_id": task_id, "status": "read", "timestamp": NOW})
    for secret, t in (
        ("not-the-secret", None),
        (DEFAULT_SECRET, int(time.time()) - 301),  # older than 5 minutes
        (DEFAULT_SECRET, int(time.time()) + 301),  # too far ahead
    ):
        response = hooks.post_gateway(document, secret, t)
        assert response.status_code == 401, (secret, t)
        assert response.json()["error"]["code"] == "unauthorized"
    raw = b'{"sender": "default", "statuses": []}'
    for header in (
        None,
        "",
        "v1=" + "0" * 64,  # no t
        f"t={int(time.time())}",  # no v1
        f"t={int(time.time())},v1=nothex",
        "sha256=" + "0" * 64,  # the older body-only scheme is not accepted here
        gateway_signature(raw + b" ", DEFAULT_SECRET),  # another body's
    ):
        headers = {"Content-Type": "application/json"}
        if header is not None:
            headers["X-Outbox-Signature-256"] = header
        assert hooks.client.post(HTTP, content=raw, headers=headers).status_code == 401, header
    # Not parsed before it is checked: an unsigned body that is not JSON is 401.
    headers = {"X-Outbox-Signature-256": f"t={int(time.time())},v1={'0' * 64}"}
    assert hooks.client.post(HTTP, content=b"{no", headers=headers).status_code == 401
    assert untouched(hooks, task_id)
    # Within the window, a signature a little old is fine; a second v1 (a rotation) too.
    signed = gateway_signature(raw, DEFAULT_SECRET, int(time.time()) - 200)
    rotated = signed + ",v1=" + "f" * 64
    for header in (signed, rotated):
        headers = {"Content-Type": "application/json", "X-Outbox-Signature-256": header}
        assert hooks.client.post(HTTP, content=raw, headers=headers).status_code == 200


def test_a_bad_body_is_422_naming_the_field_and_records_nothing(hooks: Hooks) -> None:
    task_id, _ = hooks.sent_message()
    good = {"task_id": task_id, "status": "delivered", "timestamp": NOW}
    cases: list[tuple[dict[str, Any], str]] = [
        (body("default", good, {**good, "status": "played"}), "statuses.1.status"),
        (body("default", good, {**good, "extra": 1}), "statuses.1.extra"),
        (body("default", good, {"status": "read", "timestamp": NOW}), "statuses.1"),
        (body("default", good, {**good, "timestamp": "1700000000"}), "statuses.1.timestamp"),
        (body("default", good, {**good, "timestamp": -1}), "statuses.1.timestamp"),
        (body("default", good, {**good, "timestamp": 1e300}), "statuses.1.timestamp"),
        (body("default", good, {**good, "task_id": "a\x00b"}), "statuses.1.task_id"),
        (body("default", good, {**good, "id": "x" * 300}), "statuses.1.id"),
        (
            body("default", good, {**good, "status": "failed", "error": {"code": 1, "x": 2}}),
            "statuses.1.error.x",
        ),
        (
            body("default", good, {**good, "status": "failed", "error": {"message": "m"}}),
            "statuses.1.error.code",
        ),
        ({"sender": "default", "statuses": [good], "more": True}, "more"),
        ({"statuses": [good]}, "sender"),
        ({"sender": "default", "statuses": {"0": good}}, "statuses"),
    ]
    for document, path in cases:
        response = hooks.post_gateway(document)
        assert response.status_code == 422, (document, response.text)
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert path in [field["path"] for field in error["fields"]], (path, error)
    assert untouched(hooks, task_id)
    assert hooks.post_gateway(b"[not json").status_code == 400
    assert hooks.post_gateway(body("default", good)).json()["recorded"] == 1


def test_a_gateways_duplicates_and_late_statuses_change_nothing(hooks: Hooks) -> None:
    task_id, provider_id = hooks.sent_message()
    read = {"id": provider_id, "status": "read", "timestamp": NOW + 5}
    delivered = {"task_id": task_id, "status": "delivered", "timestamp": NOW}
    again = body("default", read)
    for document in (body("default", read, read), body("default", delivered), again):
        assert hooks.post_gateway(document).status_code == 200
    row = hooks.row(task_id)
    assert (row["delivery_state"], row["read_at"], row["delivered_at"]) == (
        3,
        at(NOW + 5),
        at(NOW + 5),
    )
    assert [e["status"] for e in hooks.status_events(task_id)] == ["read"]


def test_both_webhooks_answer_503_while_the_database_is_away(hooks_with: HooksFactory) -> None:
    away = {"database_url": "postgresql://postgres@127.0.0.1:1/x", "db_pool_timeout": 1}
    with hooks_with(**away) as hooks:
        receipt = {"id": "gw-1", "status": "delivered", "timestamp": NOW}
        for response in (
            hooks.post_gateway(body("default", receipt)),
            hooks.post_meta(statuses(status("delivered", NOW))),
        ):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "unavailable"
            assert int(response.headers["retry-after"]) > 0

"""POST /api/v1/whatsapp/send/batch: order, all-or-nothing validation, replays, 409, NOTIFY."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

BATCH = "/api/v1/whatsapp/send/batch"
SEND = "/api/v1/whatsapp/send/"
Auth = Callable[..., dict[str, str]]


def item(n: int, **extra: Any) -> dict[str, Any]:
    return {"to": f"55119{n:08d}", "type": "text", "text": f"message {n}", **extra}


def count_rows(sql_conn: psycopg.Connection) -> int:
    row = sql_conn.execute("SELECT count(*) FROM outbox.messages").fetchone()
    assert row is not None
    return int(row[0])


def test_items_answer_in_the_order_given(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    items = [item(n, client_message_id=f"c-{n}") for n in range(20)]
    items[7].pop("client_message_id")
    response = client.post(BATCH, json={"messages": items}, headers=auth())
    assert response.status_code == 202, response.text
    answers = response.json()["messages"]
    assert [a["to"] for a in answers] == [i["to"] for i in items]
    assert [a["client_message_id"] for a in answers] == [i.get("client_message_id") for i in items]
    for answer in answers:
        assert answer.keys() == {"message", "task_id", "to", "client_message_id", "status"}
        assert answer["status"] == "queued"
        assert answer["message"] == "Mensagem enfileirada para envio"
    rows = dict(
        sql_conn.execute(
            "SELECT id::text, payload->>'body' FROM outbox.messages WHERE user_id = 'user-1'"
        ).fetchall()
    )
    assert len(rows) == 20
    assert [rows[a["task_id"]] for a in answers] == [i["text"] for i in items]


def test_422_lists_every_bad_item_and_inserts_nothing(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    items = [item(n) for n in range(6)]
    items[1]["to"] = "abc"
    items[3] = {
        "to": "5511999999999",
        "type": "audio",
        "audio": {"link": "https://x/a", "caption": "no"},
    }
    items[4]["colour"] = "red"
    response = client.post(BATCH, json={"messages": items}, headers=auth())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert {(f["index"], f["path"]) for f in error["fields"]} == {
        (1, "to"),
        (3, "audio.caption"),
        (4, "colour"),
    }
    assert all(f["message"] for f in error["fields"])
    assert count_rows(sql_conn) == 0


def test_a_repeated_client_message_id_makes_the_later_item_bad(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    items = [item(0, client_message_id="dup"), item(1), item(2, client_message_id="dup")]
    response = client.post(BATCH, json={"messages": items}, headers=auth())
    assert response.status_code == 422, response.text
    fields = response.json()["error"]["fields"]
    assert [(f["index"], f["path"]) for f in fields] == [(2, "client_message_id")]
    assert count_rows(sql_conn) == 0


def test_replayed_items_carry_replayed_true(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    earlier = client.post(SEND, json=item(1, client_message_id="one"), headers=auth())
    assert earlier.status_code == 202, earlier.text
    items = [item(0, client_message_id="zero"), item(1, client_message_id="one"), item(2)]
    response = client.post(BATCH, json={"messages": items}, headers=auth())
    assert response.status_code == 202, response.text
    answers = response.json()["messages"]
    assert [a.get("replayed") for a in answers] == [None, True, None]
    assert answers[1]["task_id"] == earlier.json()["task_id"]
    assert count_rows(sql_conn) == 3
    # The whole batch again: every item replays, same ids, no new rows.
    again = client.post(BATCH, json={"messages": items[:2]}, headers=auth())
    assert again.status_code == 202, again.text
    assert [a["task_id"] for a in again.json()["messages"]] == [a["task_id"] for a in answers[:2]]
    assert [a.get("replayed") for a in again.json()["messages"]] == [True, True]
    assert count_rows(sql_conn) == 3


def test_a_clash_with_an_earlier_message_is_409_naming_the_index_and_inserts_nothing(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    earlier = client.post(SEND, json=item(1, client_message_id="taken"), headers=auth())
    assert earlier.status_code == 202, earlier.text
    items = [item(n) for n in range(5)]
    items[3] = item(99, client_message_id="taken")  # same id, another body
    response = client.post(BATCH, json={"messages": items}, headers=auth())
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "conflict"
    assert error["index"] == 3
    assert "3" in error["message"]
    assert count_rows(sql_conn) == 1  # only the earlier message


def test_more_than_1000_items_is_422(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    response = client.post(BATCH, json={"messages": [item(n) for n in range(1001)]}, headers=auth())
    assert response.status_code == 422, response.text
    assert "messages" in [f["path"] for f in response.json()["error"]["fields"]]
    assert count_rows(sql_conn) == 0


def test_1000_items_are_accepted(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    response = client.post(BATCH, json={"messages": [item(n) for n in range(1000)]}, headers=auth())
    assert response.status_code == 202, response.text
    assert len(response.json()["messages"]) == 1000
    assert count_rows(sql_conn) == 1000


@pytest.mark.parametrize(
    "body", [{"messages": []}, {}, {"messages": "x"}, [], {"messages": [], "x": 1}]
)
def test_empty_or_misshapen_batch_is_422(client: httpx.Client, auth: Auth, body: Any) -> None:
    response = client.post(BATCH, json=body, headers=auth())
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


def test_a_batch_of_100_notifies_outbox_new_once(
    client: httpx.Client, auth: Auth, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_new")
        response = client.post(
            BATCH, json={"messages": [item(n) for n in range(100)]}, headers=auth()
        )
        assert response.status_code == 202, response.text
        # Everything the commit notified is queued on the connection by now; collect
        # what arrives within the window.
        received = [n.channel for n in listener.notifies(timeout=2.0)]
        assert received == ["outbox_new"]
    # Postgres folds identical notifications of one transaction, so check the trigger
    # too: statement-level (bit 0 of tgtype clear), never once per row.
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT tgtype & 1 FROM pg_trigger WHERE tgname = 'messages_notify_new'"
        ).fetchone()
    assert row == (0,)


# A batch goes to PostgreSQL in several statements (BATCH_STATEMENT_ROWS rows each,
# outbox/store/messages.py) of one transaction: what a client sees must not show the seams.


# 300: in the second statement, sent before the first has ended; 900: in the last.
@pytest.mark.parametrize("clash", [300, 900])
def test_a_clash_in_a_later_statement_of_1000_rolls_back_every_row(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection, clash: int
) -> None:
    earlier = client.post(SEND, json=item(1, client_message_id="taken"), headers=auth())
    assert earlier.status_code == 202, earlier.text
    items = [item(n, client_message_id=f"c-{n}") for n in range(1000)]
    items[clash] = item(99, client_message_id="taken")  # same id, another body
    response = client.post(BATCH, json={"messages": items}, headers=auth())
    assert response.status_code == 409, response.text
    assert response.json()["error"]["index"] == clash
    assert count_rows(sql_conn) == 1  # the rows of the statements before it: rolled back
    again = client.post(BATCH, json={"messages": items[:10]}, headers=auth())
    assert again.status_code == 202, again.text  # the connection is usable again


def post_1000_keyed_items(
    client: httpx.Client, auth: Auth, database_url: str
) -> list[dict[str, Any]]:
    """Items c-0 … c-999 in one batch: 202, one NOTIFY, answers in the order given."""
    items = [item(n, client_message_id=f"c-{n}") for n in range(1000)]
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_new")
        response = client.post(BATCH, json={"messages": items}, headers=auth())
        assert response.status_code == 202, response.text
        assert [n.channel for n in listener.notifies(timeout=2.0)] == ["outbox_new"]
    answers: list[dict[str, Any]] = response.json()["messages"]
    assert [a["client_message_id"] for a in answers] == [f"c-{n}" for n in range(1000)]
    return answers


def assert_stored_as_answered(sql_conn: psycopg.Connection, answers: list[dict[str, Any]]) -> None:
    stored = dict(
        sql_conn.execute("SELECT client_message_id, id::text FROM outbox.messages").fetchall()
    )
    assert len(stored) == 1000
    assert all(stored[a["client_message_id"]] == a["task_id"] for a in answers)


def test_1000_items_keep_their_order_ids_and_replays_across_statements(
    client: httpx.Client, auth: Auth, database_url: str, sql_conn: psycopg.Connection
) -> None:
    first = client.post(SEND, json=item(10, client_message_id="c-10"), headers=auth())
    last = client.post(SEND, json=item(760, client_message_id="c-760"), headers=auth())
    answers = post_1000_keyed_items(client, auth, database_url)
    assert [i for i, a in enumerate(answers) if a.get("replayed")] == [10, 760]
    assert answers[10]["task_id"] == first.json()["task_id"]
    assert answers[760]["task_id"] == last.json()["task_id"]
    assert_stored_as_answered(sql_conn, answers)


def test_a_replay_met_in_the_last_statement_answers_each_item_once(
    client: httpx.Client, auth: Auth, database_url: str, sql_conn: psycopg.Connection
) -> None:
    # The statements assume no replay; the one at row 900 is met after three statements
    # have been answered, and the batch runs again looking for replays.
    earlier = client.post(SEND, json=item(900, client_message_id="c-900"), headers=auth())
    answers = post_1000_keyed_items(client, auth, database_url)
    assert [i for i, a in enumerate(answers) if a.get("replayed")] == [900]
    assert answers[900]["task_id"] == earlier.json()["task_id"]
    assert len({a["task_id"] for a in answers}) == 1000
    assert_stored_as_answered(sql_conn, answers)


def test_a_bad_item_after_a_clash_answers_422_first(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    """Items are validated chunk by chunk while earlier chunks are inserted: a clash
    found before the bad item is seen must still yield to the 422."""
    earlier = client.post(SEND, json=item(1, client_message_id="taken"), headers=auth())
    assert earlier.status_code == 202, earlier.text
    items = [item(n, client_message_id=f"c-{n}") for n in range(1000)]
    items[5] = item(99, client_message_id="taken")  # a clash in the first statement
    items[900] = {"to": "12", "type": "text", "text": "x"}  # bad, in the last chunk
    response = client.post(BATCH, json={"messages": items}, headers=auth())
    assert response.status_code == 422, response.text
    assert response.json()["error"]["fields"] == [
        {
            "index": 900,
            "path": "to",
            "message": "must be 8 to 15 digits, optionally after a leading '+'",
        }
    ]
    assert count_rows(sql_conn) == 1

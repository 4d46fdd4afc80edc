from __future__ import annotations

from collections.abc import Callable

import httpx
import psycopg


def test_send_commits_a_row(
    client: httpx.Client, auth: Callable[..., dict[str, str]], sql_conn: psycopg.Connection
) -> None:
    response = client.post(
        "/api/v1/whatsapp/send/",
        json={"to": "+5511999999999", "type": "text", "text": "hi", "client_message_id": "c-1"},
        headers=auth(),
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["to"] == "5511999999999"
    row = sql_conn.execute(
        "SELECT status, user_id, payload FROM outbox.messages WHERE id = %s", [body["task_id"]]
    ).fetchone()
    assert row == ("pending", "user-1", {"body": "hi", "preview_url": False})

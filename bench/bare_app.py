"""M1's stack floor: the send endpoint's INSERT behind a bare ASGI app.

Same server (uvicorn with uvloop and httptools), same driver and pool (psycopg),
same statement (`insert_new_messages`, one row as one JSON document), same answer
shape; no routing, authentication, validation, idempotency check, log line or
metrics. What `outbox serve` spends beyond this is its own.

Run: OUTBOX_DATABASE_URL=... python -m uvicorn bench.bare_app:app --loop uvloop
     --http httptools --no-access-log --log-level warning --port PORT
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import orjson
import uuid_utils
from psycopg_pool import AsyncConnectionPool

from outbox.store import QUERIES

_INSERT = QUERIES["insert_new_messages"]
_pool: AsyncConnectionPool | None = None


async def _lifespan(receive: Any, send: Any) -> None:
    global _pool
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            _pool = AsyncConnectionPool(
                os.environ["OUTBOX_DATABASE_URL"], kwargs={"autocommit": True}, open=False
            )
            await _pool.open(wait=True)
            await send({"type": "lifespan.startup.complete"})
        else:
            if _pool is not None:
                await _pool.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    assert _pool is not None
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = orjson.loads(body)
    task_id = str(uuid_utils.uuid7())
    document = orjson.dumps(
        [
            {
                "id": task_id,
                "user_id": "bench",
                "client_message_id": request.get("client_message_id"),
                "to": request["to"],
                "type": request["type"],
                "payload": {"body": request["text"], "preview_url": False},
                "request_hash": hashlib.sha256(body).hexdigest(),
                "max_attempts": 4,
                "send_at": None,
                "expires_at": None,
                "sender": "default",
                # The insert's columns since order and priority (ignored before them).
                "priority": 1,
                "ordered": True,
            }
        ]
    ).decode()
    conn = await _pool.getconn()
    try:
        await conn.execute(_INSERT, {"messages": document})
    finally:
        await _pool.putconn(conn)
    answer = orjson.dumps(
        {
            "message": "queued",
            "task_id": task_id,
            "to": request["to"],
            "client_message_id": request.get("client_message_id"),
            "status": "queued",
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": 202,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(answer)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer})

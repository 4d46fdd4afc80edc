"""A dispatcher's providers by sender, against a real PostgreSQL: built from the stored
senders, rebuilt when one changes, and a replaced (or deleted) sender's HTTP client closed
only once the calls holding it have ended."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import psycopg
import pytest
from cryptography.fernet import Fernet
from structlog.testing import capture_logs

from outbox import db
from outbox.providers import FakeProvider, HttpProvider
from outbox.sender_providers import SenderProviders, UnknownSender
from outbox.settings import Settings
from outbox.store import Store
from tests.support import wait_for

KEY = Fernet.generate_key().decode()


def store_http_sender(conn: psycopg.Connection, sender_id: str, url: str, secret: str) -> None:
    token = Fernet(KEY.encode()).encrypt(orjson.dumps({"secret": secret}))
    conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, secrets, secret_fields, users)
           VALUES (%s, 'http', %s, %s, '{secret}', '{*}')
           ON CONFLICT (id) DO UPDATE
           SET settings = EXCLUDED.settings, secrets = EXCLUDED.secrets""",
        [sender_id, orjson.dumps({"url": url}).decode(), token],
    )


async def closed(client: httpx.AsyncClient) -> None:
    """Until `client` is closed (polled from a thread while the loop closes it)."""
    await asyncio.to_thread(wait_for, lambda: client.is_closed, what="the client closed")


def test_a_replaced_or_deleted_senders_client_closes_when_its_last_call_ends(
    sql_conn: psycopg.Connection, settings: Settings
) -> None:
    store_http_sender(sql_conn, "gw", "http://127.0.0.1:9/one", "secret-one")
    sql_conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, users)
           VALUES ('sim', 'fake', '{"latency_ms": 5}', '{*}')"""
    )
    keyed = settings.model_copy(update={"secret_key": KEY, "provider": "fake"})

    async def scenario() -> None:
        pool = db.create_pool(keyed)
        await pool.open(wait=True)
        providers = SenderProviders(keyed, Store(pool))
        try:
            await providers.load()
            first = providers.acquire("gw")  # a call in flight holds it
            assert isinstance(first.provider, HttpProvider) and first.client is not None
            client = first.client
            again = providers.acquire("gw")  # read again, unchanged: the same provider
            assert again is first
            providers.release(again)

            sim = providers.acquire("sim")
            assert isinstance(sim.provider, FakeProvider) and sim.client is None
            providers.release(sim)

            # A new URL: the next call gets a new provider; the call in flight keeps its
            # client until it ends.
            await asyncio.to_thread(
                store_http_sender, sql_conn, "gw", "http://127.0.0.1:9/two", "secret-two"
            )
            await providers.load()
            second = providers.acquire("gw")
            assert second is not first and second.client is not client
            await providers.load()  # a round trip: time for a close, were one scheduled
            assert not client.is_closed
            providers.release(first)
            await closed(client)

            # Deleted: unknown at once; its client closes when the call holding it ends.
            await asyncio.to_thread(sql_conn.execute, "DELETE FROM outbox.senders WHERE id = 'gw'")
            await providers.load()
            with pytest.raises(UnknownSender, match="sender 'gw' does not exist"):
                providers.acquire("gw")
            assert second.client is not None and not second.client.is_closed
            last = second.client
            providers.release(second)
            await closed(last)
        finally:
            await providers.aclose()
            await pool.close()

    asyncio.run(scenario())


def store_foreign_sender(conn: psycopg.Connection, sender_id: str) -> None:
    """A sender whose credentials another key encrypted: this process cannot use it."""
    token = Fernet(Fernet.generate_key()).encrypt(b'{"secret": "not-ours"}')
    conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, secrets, secret_fields, users)
           VALUES (%s, 'http', '{"url": "http://127.0.0.1:9/x"}', %s, '{secret}', '{*}')""",
        [sender_id, token],
    )


def test_a_sender_left_out_is_logged_once_not_at_every_read(
    sql_conn: psycopg.Connection, settings: Settings
) -> None:
    store_foreign_sender(sql_conn, "foreign")
    keyed = settings.model_copy(update={"secret_key": KEY, "provider": "fake"})

    async def scenario() -> list[str]:
        pool = db.create_pool(keyed)
        await pool.open(wait=True)
        directory = SenderProviders(keyed, Store(pool)).directory
        try:
            with capture_logs() as lines:
                for _ in range(3):
                    await directory.load()
                await asyncio.to_thread(store_foreign_sender, sql_conn, "other")
                await directory.load()
                await directory.load()
                # Gone, then back: left out anew, logged again.
                await asyncio.to_thread(
                    sql_conn.execute, "DELETE FROM outbox.senders WHERE id = 'foreign'"
                )
                await directory.load()
                await asyncio.to_thread(store_foreign_sender, sql_conn, "foreign")
                await directory.load()
            assert directory.left_out == {"foreign", "other"}
        finally:
            await pool.close()
        return [line["sender"] for line in lines if line["event"].startswith("sender left out")]

    assert asyncio.run(scenario()) == ["foreign", "other", "foreign"]

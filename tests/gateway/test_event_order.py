"""Event ids become visible in id order with several concurrent writers: a reader that
polls `id > last` never skips one (the event lock of outbox.write_events)."""

from __future__ import annotations

import threading
import uuid

import psycopg

WRITERS = 6
ROUNDS = 60


def _writer(url: str, errors: list[BaseException]) -> None:
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for round_ in range(ROUNDS):
                ids = [uuid.uuid4() for _ in range(1 + round_ % 5)]
                with conn.transaction():
                    conn.execute(
                        """INSERT INTO outbox.messages
                           (id, user_id, "to", type, payload, request_hash, max_attempts, status)
                           SELECT id, 'u', '5511999999999', 'text', '{}', '\\x00', 4, 'sent'
                           FROM unnest(%s::uuid[]) AS id""",
                        [ids],
                    )
                    conn.execute("SELECT outbox.write_events(%s::uuid[])", [ids])
                    # Hold the transaction open a little after taking ids, so that
                    # without the lock commits would land out of id order.
                    conn.execute("SELECT pg_sleep(random() * 0.004)")
    except BaseException as exc:
        errors.append(exc)


def test_concurrent_writers_never_make_a_polling_reader_skip_an_id(database_url: str) -> None:
    errors: list[BaseException] = []
    writers = [
        threading.Thread(target=_writer, args=(database_url, errors)) for _ in range(WRITERS)
    ]
    seen: list[int] = []
    with psycopg.connect(database_url, autocommit=True) as reader:
        for writer in writers:
            writer.start()

        def poll() -> None:
            last = seen[-1] if seen else 0
            rows = reader.execute(
                "SELECT id FROM outbox.events WHERE id > %s ORDER BY id", [last]
            ).fetchall()
            seen.extend(row[0] for row in rows)

        while any(writer.is_alive() for writer in writers):
            poll()
        for writer in writers:
            writer.join()
        poll()
        stored = [row[0] for row in reader.execute("SELECT id FROM outbox.events ORDER BY id")]
    assert not errors, errors
    assert len(stored) == sum(1 + r % 5 for r in range(ROUNDS)) * WRITERS
    assert seen == stored, f"skipped: {sorted(set(stored) - set(seen))[:10]}"

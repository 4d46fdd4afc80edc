"""M4's floor: the path M4 times, with the thinnest client this machine offers.

A worker process (synchronous psycopg, whose waits are in C, and a raw socket)
LISTENs; on each notification it claims one row of `bench.floor_messages` with one
durable autocommit UPDATE … FOR UPDATE SKIP LOCKED, stamps that moment, sends a
minimal HTTP request to the bench's provider server over a kept-alive socket, reads
the answer and records the outcome. The bench inserts one row per call at M4's rate
(INSERT and NOTIFY in one autocommitted statement) and times each from its commit's
return, as PROTOCOL.md times the peers: no HTTP API in front, no JWT, no logs, no
events, no attempts history, no retries. What outbox spends beyond this is its own.

Run: python -m bench.m4_floor --db URL --port PROVIDER_PORT --out STARTS_FILE
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time

import psycopg

CHANNEL = "bench_floor"

TABLE = """
DROP TABLE IF EXISTS bench.floor_messages;
CREATE TABLE bench.floor_messages (LIKE outbox.messages INCLUDING ALL);
"""

# The bench's producer: one row and its notification, committed together.
ENQUEUE = f"""
WITH row AS (
    INSERT INTO bench.floor_messages (id, user_id, "to", type, payload, request_hash,
                                      max_attempts, next_attempt_at)
    VALUES (gen_random_uuid(), 'bench', %(to)s, 'text', %(payload)s, '\\x00', 4, now())
    RETURNING id
)
SELECT id::text, pg_notify('{CHANNEL}', '') FROM row
"""

CLAIM = """
UPDATE bench.floor_messages m
SET status = 'in_flight', attempts = m.attempts + 1, locked_until = now() + interval '30 s'
WHERE m.id = (SELECT id FROM bench.floor_messages
              WHERE status = 'pending' AND next_attempt_at <= now()
              ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING m.id::text
"""

COMPLETE = "UPDATE bench.floor_messages SET status = 'sent', finished_at = now() WHERE id = %s"


def _call(sock: socket.socket, key: str, buf: bytearray) -> None:
    """One POST with its Idempotency-Key; reads the whole answer (Content-Length)."""
    sock.sendall(
        (
            "POST /send HTTP/1.1\r\nHost: provider\r\nContent-Type: application/json\r\n"
            f"Idempotency-Key: {key}\r\nContent-Length: 2\r\n\r\n{{}}"
        ).encode()
    )
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = bytes(buf[:head_end]).lower()
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            if len(buf) >= head_end + 4 + length:
                del buf[: head_end + 4 + length]
                return
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("provider server closed the connection")
        buf += chunk


def work(db_url: str, port: int, out_path: str) -> None:
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    listener = psycopg.connect(db_url, autocommit=True)
    worker = psycopg.connect(db_url, autocommit=True)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    listener.execute(f"LISTEN {CHANNEL}")
    for _ in range(6):  # psycopg prepares a statement on its 5th run: before timing
        worker.execute(CLAIM)
    starts: list[str] = []
    print("ready", flush=True)
    while not stop:
        for _notify in listener.notifies(timeout=0.2, stop_after=1):
            while (row := worker.execute(CLAIM).fetchone()) is not None:
                starts.append(f"{row[0]} {time.time():.6f}")
                _call(sock, row[0], buf)
                worker.execute(COMPLETE, [row[0]])
    with open(out_path, "w", encoding="utf-8") as out:
        out.write("\n".join(starts) + ("\n" if starts else ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work(args.db, args.port, args.out)
    sys.exit(0)


if __name__ == "__main__":
    main()

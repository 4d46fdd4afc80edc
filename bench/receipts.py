"""The `receipts` step: Meta's status webhooks into one `serve` (outbox/webhooks.py).

`receipts_n` (150,000) messages made `sent` in SQL, each with a provider id
(`wamid.bench-<i>`); one `serve` whose OUTBOX_CLOUD_APP_SECRET signs the bench's POSTs
(no dispatcher runs). Then:

- ingestion: `receipts_clients` (4) clients, each on one kept-alive connection, POST
  signed notifications of `receipts_batch` (100) statuses each, back to back, for
  `receipts_seconds` (10 s): `delivered` for each message in a first pass, `read` in a
  second (each status a real climb, never a duplicate; the run ends early when both
  passes are spent). Statuses/s and POSTs/s over the window, the POST latency p50/p99.
  The bodies (Meta's shape, `biz_opaque_callback_data` the task id, as outbox's calls
  set it) and their signatures are built before the window.
- latency: one status feed (the messages' user), POSTs of one `read` status each, at
  `receipts_rate` (50/s) for `receipts_latency_seconds` (5 s), on messages of their own;
  p50/p99 from the POST's first byte sent to the `message_status` event's arrival on the
  feed.

Skipped on a schema without outbox.record_receipts, and on a `serve` without
`POST /webhooks/whatsapp` (bench/README.md: the bench also runs against old commits).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.sync.client import connect

from bench.common import CpuMeter, Proc, pct
from bench.harness import Harness, Skipped
from bench.httpclient import RawClient
from bench.sql import _PAYLOAD, RECIPIENT

WEBHOOK = "/webhooks/whatsapp"
PHONE_NUMBER_ID = "106540352242922"
WARM = 10  # latency POSTs before timing

# `sent` messages as the dispatcher leaves them: one attempt, the provider's id, finished
# now; from the `default` sender and the bench's user (its token's `sub`), each to its own
# number. Their ids, provider ids and numbers in row order.
PREFILL_SENT = f"""
INSERT INTO outbox.messages (id, user_id, client_message_id, "to", type, payload, request_hash,
                             status, attempts, max_attempts, next_attempt_at,
                             provider_message_id, created_at, updated_at, finished_at)
SELECT bench.uuid7(), 'bench', 'r-' || lpad(i::text, 10, '0'), {RECIPIENT}, 'text',
       {_PAYLOAD}, sha256(convert_to('r-' || i, 'UTF8')), 'sent', 1, 4, now(),
       'wamid.bench-' || i, now(), now(), now()
FROM generate_series(1, %(n)s) AS i
ORDER BY i
"""
SENT_ROWS = """
SELECT id::text, provider_message_id, "to" FROM outbox.messages
WHERE starts_with(client_message_id, 'r-') ORDER BY client_message_id
"""
HAS_RECEIPTS = """
SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
               WHERE n.nspname = 'outbox' AND p.proname = 'record_receipts')
"""
RECORDED = """
SELECT count(*) FILTER (WHERE delivery_state = 2), count(*) FILTER (WHERE delivery_state = 3)
FROM outbox.messages
"""

Row = tuple[str, str, str]  # task id, provider id, number


def statuses_entry(row: Row, state: str, at: int) -> dict[str, Any]:
    task_id, wamid, to = row
    entry: dict[str, Any] = {
        "id": wamid,
        "status": state,
        "timestamp": str(at),
        "recipient_id": to,
        "biz_opaque_callback_data": task_id,
    }
    if state == "delivered":  # as Meta adds them to `sent` and `delivered`
        entry["conversation"] = {"id": "c0ffee" + wamid[-8:], "origin": {"type": "utility"}}
        entry["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "utility"}
    return entry


def notification(statuses: list[dict[str, Any]]) -> bytes:
    """Meta's status notification (../shared/whatsapp-cloud-api.md §6)."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
        "statuses": statuses,
    }
    change = {"field": "messages", "value": value}
    entry = {"id": "102290129340398", "changes": [change]}
    return orjson.dumps({"object": "whatsapp_business_account", "entry": [entry]})


def signed_post(host: str, secret: str, body: bytes) -> bytes:
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    head = (
        f"POST {WEBHOOK} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Content-Type: application/json\r\n"
        f"X-Hub-Signature-256: sha256={signature}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def serve_env(h: Harness) -> dict[str, str]:
    """The app secret that signs the bench's notifications (OUTBOX_CLOUD_APP_SECRET: they
    may concern any sender's messages)."""
    return {"OUTBOX_CLOUD_APP_SECRET": h.secret}


@dataclass
class Answered:
    """The answers of one client's POSTs: (sent, answered) perf_counter stamps, statuses
    carried, and the webhook's counts."""

    stamps: list[tuple[float, float]] = field(default_factory=list)
    statuses: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    error: str = ""


def _answer(status: int, body: bytes) -> dict[str, int]:
    if status != 200:
        raise RuntimeError(f"{WEBHOOK} answered {status}: {body[:300]!r}")
    answer = json.loads(body)
    return {k: v for k, v in answer.items() if isinstance(v, int)}


def ingest(
    h: Harness, port: int, rows: list[Row], meter_pids: dict[str, list[int]]
) -> dict[str, Any]:
    """Part (a): the sustained POSTs of `receipts_batch` statuses from several clients."""
    cfg = h.cfg
    host = f"127.0.0.1:{port}"
    at = int(time.time())
    posts: list[tuple[int, bytes]] = []
    for state in ("delivered", "read"):
        for k in range(0, len(rows), cfg.receipts_batch):
            chunk = rows[k : k + cfg.receipts_batch]
            body = notification([statuses_entry(row, state, at) for row in chunk])
            posts.append((len(chunk), signed_post(host, h.secret, body)))
    queue: Iterator[tuple[int, bytes]] = iter(posts)
    lock = threading.Lock()
    stop_at = 0.0
    results = [Answered() for _ in range(cfg.receipts_clients)]

    def client(mine: Answered) -> None:
        try:
            with RawClient("127.0.0.1", port) as http:
                while time.perf_counter() < stop_at:
                    with lock:
                        item = next(queue, None)
                    if item is None:
                        return
                    count, request = item
                    sent = time.perf_counter()
                    counts = _answer(*http.request(request))
                    mine.stamps.append((sent, time.perf_counter()))
                    mine.statuses += count
                    for key, value in counts.items():
                        mine.counts[key] = mine.counts.get(key, 0) + value
        except Exception as exc:
            mine.error = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=client, args=(r,)) for r in results]
    meter = CpuMeter(meter_pids, self_cpu=True)
    t0 = time.perf_counter()
    stop_at = t0 + cfg.receipts_seconds
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    cpu["loadgen"] = cpu.pop("bench")
    if errors := [r.error for r in results if r.error]:
        raise RuntimeError(f"receipts: a client failed: {errors[0]}")
    latencies = [1000 * (b - a) for r in results for a, b in r.stamps]
    statuses = sum(r.statuses for r in results)
    counts: dict[str, int] = {}
    for r in results:
        for key, value in r.counts.items():
            counts[key] = counts.get(key, 0) + value
    return {
        "wall_s": round(wall, 3),
        "posts": len(latencies),
        "statuses": statuses,
        "exhausted": len(latencies) == len(posts),
        "counts": counts,
        "latencies": latencies,
        "cpu": cpu,
    }


def feed_latency(h: Harness, port: int, rows: list[Row]) -> tuple[list[float], list[float], int]:
    """Part (b): POST of one `read` → its `message_status` on a feed; (POST → event ms,
    POST answered ms, how many POSTs were late)."""
    cfg = h.cfg
    host = f"127.0.0.1:{port}"
    arrived: dict[str, float] = {}
    wanted = {row[0] for row in rows}
    done = threading.Event()
    url = f"ws://127.0.0.1:{port}/ws/whatsapp/?token={h.token}"
    with connect(url, open_timeout=10, max_queue=None) as feed:

        def listen() -> None:
            for message in feed:
                event = orjson.loads(message)
                data = event.get("data") or {}
                if event.get("event") == "message_status" and data.get("message_id") in wanted:
                    arrived.setdefault(data["message_id"], time.perf_counter())
                    if len(arrived) == len(wanted):
                        done.set()
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        at = int(time.time())
        requests = [
            signed_post(host, h.secret, notification([statuses_entry(row, "read", at)]))
            for row in rows
        ]
        sent: dict[str, tuple[float, float]] = {}
        late = 0
        with RawClient("127.0.0.1", port) as http:
            for row, request in zip(rows[:WARM], requests[:WARM], strict=True):
                _answer(*http.request(request))
                sent[row[0]] = (0.0, 0.0)  # not timed
            t0 = time.perf_counter() + 0.5
            timed = list(zip(rows[WARM:], requests[WARM:], strict=True))
            for i, (row, request) in enumerate(timed):
                delay = t0 + i / cfg.receipts_rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.005:
                    late += 1
                started = time.perf_counter()
                _answer(*http.request(request))
                sent[row[0]] = (started, time.perf_counter())
        if not done.wait(15):
            missing = len(wanted) - len(arrived)
            raise RuntimeError(f"receipts: {missing} message_status events never arrived")
    timed_ids = [row[0] for row in rows[WARM:]]
    to_event = [1000 * (arrived[t] - sent[t][0]) for t in timed_ids]
    answered = [1000 * (sent[t][1] - sent[t][0]) for t in timed_ids]
    return to_event, answered, late


def receipts(h: Harness, rep: int) -> None:
    if not h.db.scalar(HAS_RECEIPTS):
        raise Skipped("no outbox.record_receipts (a schema before delivery receipts)")
    cfg = h.cfg
    tag = f"receipts-{rep}"
    paced_n = WARM + int(cfg.receipts_rate * cfg.receipts_latency_seconds)
    h.db.reset()
    h.db.q(PREFILL_SENT, {"n": cfg.receipts_n + paced_n})
    h.db.vacuum()
    h.db.checkpoint()
    rows: list[Row] = [(r[0], r[1], r[2]) for r in h.db.q(SENT_ROWS).fetchall()]
    bulk, single = rows[: cfg.receipts_n], rows[cfg.receipts_n :]
    serve: Proc | None = None
    try:
        serve, port = h.start_serve(tag, **serve_env(h))
        with RawClient("127.0.0.1", port) as probe:  # a serve from before the webhooks?
            status, body = probe.request(
                signed_post(f"127.0.0.1:{port}", h.secret, notification([]))
            )
        if status in (404, 405):
            raise Skipped(f"serve has no POST {WEBHOOK} ({status})")
        _answer(status, body)
        pids = {"serve": [serve.pid]}
        a = ingest(h, port, bulk, pids)
        h.db.checkpoint()  # the ingestion's dirty pages written before the timed POSTs
        to_event, answered, late = feed_latency(h, port, single)
    finally:
        if serve is not None:
            h.stop(serve, "serve")
    delivered, read = h.db.q(RECORDED).fetchone()
    h.db.reset()
    unknown = a["counts"].get("unknown", 0)
    if unknown:
        raise RuntimeError(f"receipts: {unknown} statuses of known messages counted unknown")
    latencies = a["latencies"]
    detail = {
        "clients": cfg.receipts_clients,
        "batch": cfg.receipts_batch,
        "messages": cfg.receipts_n,
        "wall_s": a["wall_s"],
        "posts": a["posts"],
        "statuses": a["statuses"],
        "exhausted": a["exhausted"],
        "answers": a["counts"],
        "post_p50_ms": round(pct(latencies, 50), 3),
        "post_p99_ms": round(pct(latencies, 99), 3),
    }
    h.record("receipts_ingest", "statuses/s", a["statuses"] / a["wall_s"], **detail, cpu=a["cpu"])
    h.record("receipts_posts", "POSTs/s", a["posts"] / a["wall_s"], **detail)
    h.record("receipts_post_p50", "ms", pct(latencies, 50), **detail)
    h.record("receipts_post_p99", "ms", pct(latencies, 99), **detail)
    detail = {
        "n": len(to_event),
        "rate": cfg.receipts_rate,
        "late_posts": late,
        "post_p50_ms": round(pct(answered, 50), 3),
        "post_p99_ms": round(pct(answered, 99), 3),
        "max_ms": round(max(to_event), 3),
    }
    h.record("receipts_event_p50", "ms", pct(to_event, 50), **detail)
    h.record("receipts_event_p99", "ms", pct(to_event, 99), **detail)
    h.log(
        f"receipts: {a['posts']:,} POSTs of {cfg.receipts_batch} in {a['wall_s']:.1f} s "
        f"from {cfg.receipts_clients} clients{' (both passes spent)' if a['exhausted'] else ''}; "
        f"answers {a['counts']}; delivered {delivered:,}, read {read:,} after the run"
    )

"""Prometheus metrics: `serve`'s and `dispatch`'s figures, and queue gauges from the database.

Each app and each dispatcher owns a `CollectorRegistry` (never the global default one:
tests run several apps in one process). Hot paths touch only cached label children,
and the dispatcher counts outcomes per written batch, not per message.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from outbox.log import get_logger
from outbox.models import DEFAULT_SENDER
from outbox.states import AttemptOutcome, MessageStatus

if TYPE_CHECKING:
    from outbox.store import Completion, QueueFigures, SenderState, Store

log = get_logger("outbox.metrics")

UNMATCHED = "unmatched"  # the route label of a path no route matches
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PROVIDER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CLAIM_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
REFRESH_TIMEOUT = 2.0  # a scrape gets the last figures rather than wait on a slow database
QUEUE_STATUSES = tuple(MessageStatus)
RECEIPT_SOURCES = ("whatsapp", "http")
RECEIPT_OUTCOMES = ("recorded", "unknown", "ignored")


class ApiMetrics:
    """`outbox serve`: requests, accepted messages, the WebSocket feed."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.request_duration = Histogram(
            "outbox_http_request_duration_seconds",
            "HTTP requests by route template, method and status: time from the request to "
            "the end of the response (the _count is the request count).",
            ["route", "method", "status"],
            registry=registry,
        )
        self._accepted = Counter(
            "outbox_messages_accepted_total",
            "Messages answered 202 (idempotent replays included), by endpoint: single "
            "(POST /send/) or batch (each item of POST /send/batch counts), and by the "
            "sender they name.",
            ["endpoint", "sender"],
            registry=registry,
        )
        # Series by (endpoint, sender): only senders that exist get one (a message naming
        # any other is refused first); the default's start at zero.
        self._accepted_series: dict[tuple[str, str], Any] = {}
        for endpoint in ("single", "batch"):
            self._accepted_child(endpoint, DEFAULT_SENDER)
        self.websocket_clients = Gauge(
            "outbox_websocket_clients",
            "WebSocket status-feed clients connected and authenticated now.",
            registry=registry,
        )
        self.events_fanned_out = Counter(
            "outbox_websocket_events_fanned_out_total",
            "Live status events handed to WebSocket clients (one per event per client).",
            registry=registry,
        )
        self.slow_clients_dropped = Counter(
            "outbox_websocket_slow_clients_dropped_total",
            "WebSocket clients closed with 1013 because their queue of events was full.",
            registry=registry,
        )
        receipts = Counter(
            "outbox_receipts_total",
            "Delivery receipts posted to the webhooks (outbox/webhooks.py), by source "
            "(whatsapp: Meta's, http: a gateway's) and outcome: recorded (matched a message "
            "here; duplicates too), unknown (no message here has that id), ignored (a Meta "
            "status of another kind, an inbound message, another field, a part of no known "
            "shape).",
            ["source", "outcome"],
            registry=registry,
        )
        self._receipts = {
            (source, outcome): receipts.labels(source, outcome)
            for source in RECEIPT_SOURCES
            for outcome in RECEIPT_OUTCOMES
        }
        self._requests: dict[tuple[str, str, int], Any] = {}

    def _accepted_child(self, endpoint: str, sender: str) -> Any:
        key = (endpoint, sender)
        child = self._accepted_series.get(key)
        if child is None:
            child = self._accepted_series[key] = self._accepted.labels(endpoint, sender)
        return child

    def accepted(self, endpoint: str, sender: str, count: int = 1) -> None:
        """`count` messages of `sender` answered 202 by `endpoint` (single or batch)."""
        self._accepted_child(endpoint, sender).inc(count)

    def receipts(self, source: str, *, recorded: int, unknown: int, ignored: int) -> None:
        """One webhook POST's receipts (source: whatsapp or http)."""
        for outcome, count in (("recorded", recorded), ("unknown", unknown), ("ignored", ignored)):
            if count:
                self._receipts[(source, outcome)].inc(count)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "other"  # any verb a client invents must not become a new series
        key = (route, method, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.request_duration.labels(route, method, str(status))
        child.observe(seconds)


def _attempt_labels(outcome: str, status: str, throttle: str | None = None) -> tuple[str, str]:
    """(outcome, error_class) of an attempt from the completion's outcome, new status and
    throttle: a throttle that leaves the message pending is `throttled` with its kind as
    the class (rate: the sender's rate halves; pair: that recipient waits); one throttle
    too many ends it `failed` `throttled`."""
    if outcome in (AttemptOutcome.SENT, AttemptOutcome.EXPIRED):
        return str(outcome), "none"
    if outcome == AttemptOutcome.INTERRUPTED:
        return "handed_back", "none"
    if outcome == AttemptOutcome.SENDER:
        return "paused", "sender"
    if outcome == AttemptOutcome.THROTTLED and status == MessageStatus.PENDING:
        return "throttled", throttle or "rate"
    return ("retry" if status == MessageStatus.PENDING else "failed"), str(outcome)


# The (outcome, error_class) pairs `_attempt_labels` can give.
ATTEMPT_LABELS = (
    ("sent", "none"),
    ("expired", "none"),
    ("handed_back", "none"),
    ("paused", "sender"),
    ("throttled", "rate"),
    ("throttled", "pair"),
    ("retry", "transient"),
    ("failed", "transient"),
    ("failed", "permanent"),
    ("failed", "throttled"),
    ("retry", "unknown"),  # no answer: it may have been sent (OUTBOX_UNKNOWN_OUTCOME)
    ("failed", "unknown"),
)


class DispatchMetrics:
    """`outbox dispatch`: attempts, provider calls, claims, leases, the scheduled purge."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.attempts = Counter(
            "outbox_attempts_total",
            "Attempts recorded, by outcome (sent, retry, failed, paused, throttled, expired, "
            "handed_back), error class (none, transient, unknown, permanent, sender, "
            "throttled; for throttled: rate or pair) and sender. Paused and throttled "
            "attempts spend none of the message's attempts.",
            ["outcome", "error_class", "sender"],
            registry=registry,
        )
        self.provider_duration = Histogram(
            "outbox_provider_request_duration_seconds",
            "Provider calls: time from the request to the answer, the error or the timeout.",
            buckets=PROVIDER_BUCKETS,
            registry=registry,
        )
        self.calls_in_flight = Gauge(
            "outbox_provider_calls_in_flight",
            "Provider calls in progress now.",
            registry=registry,
        )
        self.claim_size = Histogram(
            "outbox_claim_batch_messages",
            "Messages per claim statement (empty claims included).",
            buckets=CLAIM_BUCKETS,
            registry=registry,
        )
        self.leases_recovered = Counter(
            "outbox_lease_expiries_recovered_total",
            "In-flight messages whose lease expired, returned by this process's reaper.",
            registry=registry,
        )
        self.outcomes_lost = Counter(
            "outbox_outcomes_lost_total",
            "Outcomes not recorded because the lease had expired and the row was reclaimed "
            "(a success: only once a later attempt had started).",
            registry=registry,
        )
        self.late_successes = Counter(
            "outbox_late_successes_recorded_total",
            "Successes recorded after the lease had expired and the row was reaped, no "
            "later attempt having started: the message became sent after all.",
            registry=registry,
        )
        self.purge_runs = Counter(
            "outbox_purge_runs_total",
            "Scheduled purge runs this process carried out.",
            registry=registry,
        )
        purge_rows = Counter(
            "outbox_purge_rows_total",
            "Rows deleted by the scheduled purge, by kind (errored, sent: sent and "
            "cancelled messages, events).",
            ["kind"],
            registry=registry,
        )
        self.purge_rows = {kind: purge_rows.labels(kind) for kind in ("errored", "sent", "events")}
        self._attempts: dict[tuple[str, str, str, str | None], Any] = {}
        self._senders: set[str] = set()
        self.keep_senders(["default"])

    def keep_senders(self, senders: Iterable[str]) -> None:
        """The senders known now. Each has every series from the start at 0, so that
        rate() and increase() see its first attempt of each kind (a series born at 1
        looks like no change); a sender deleted takes its series with it, and so does
        one counted though unknown here (its messages refused), so that ids never known
        do not pile up series."""
        known = set(senders)
        for sender in known - self._senders:
            for labels in ATTEMPT_LABELS:
                self.attempts.labels(*labels, sender)
        for sender in self._senders - known:
            for labels in ATTEMPT_LABELS:
                self.attempts.remove(*labels, sender)
        for key in [key for key in self._attempts if key[2] not in known]:
            outcome, status, sender, throttle = key
            labels = _attempt_labels(outcome, status, throttle)
            self.attempts.remove(*labels, sender)  # if still there
            del self._attempts[key]
        self._senders = known

    def count_outcomes(self, completions: Iterable[Completion]) -> None:
        """One increment per (outcome, status, sender, throttle) of a written batch."""
        tally = Tally((c.outcome, c.status, c.sender, c.throttle) for c in completions)
        for key, count in tally.items():
            child = self._attempts.get(key)
            if child is None:
                outcome, status, sender, throttle = key
                labels = _attempt_labels(outcome, status, throttle)
                child = self.attempts.labels(*labels, sender)
                self._attempts[key] = child
            child.inc(count)

    def track_in_flight(self, count: Callable[[], float]) -> None:
        """The in-flight gauge reads the dispatcher's own count when scraped: no hot-path cost."""
        self.calls_in_flight.set_function(count)


class QueueGauges:
    """Queue and sender figures from the database, read at most once per `ttl` and only
    when scraped.

    Exact: pending, in flight, due now, oldest due age and expired leases (small partial
    indexes). Estimated from the planner's statistics (`store.estimate_count`): sent,
    error and cancelled, whose exact count would scan most of a large table. See
    `queue_gauges` in sql/queries.sql. Each sender's effective rate and pause come from
    its state (`sender_states`: one short row per sender).
    """

    def __init__(self, store: Store, ttl: float) -> None:
        self._store = store
        self._ttl = ttl
        self._figures: QueueFigures | None = None
        self._senders: dict[str, SenderState] | None = None
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        if time.monotonic() - self._read_at < self._ttl:
            return
        async with self._lock:  # concurrent scrapes share one read
            if time.monotonic() - self._read_at < self._ttl:
                return
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT):
                    self._figures = await self._store.figures.queue_gauges()
                    self._senders = await self._store.senders.states()
            except Exception as exc:  # database away: the last figures stay
                log.warning("could not read queue gauges", error=str(exc).strip() or repr(exc))
            finally:
                self._read_at = time.monotonic()

    def describe(self) -> Iterable[Metric]:
        return [*self._families(None), *self._sender_families(None)]

    def collect(self) -> Iterable[Metric]:
        return [*self._families(self._figures), *self._sender_families(self._senders)]

    @staticmethod
    def _sender_families(states: dict[str, SenderState] | None) -> list[Metric]:
        rate = GaugeMetricFamily(
            "outbox_sender_effective_rate",
            "Messages per second the dispatchers keep a sender to now: its rate_limit, "
            "halved by a provider's throttle and climbing back by 10 % of it per second; "
            "for a sender without a rate_limit, a limit learned from a throttle. No series "
            "while the sender is unlimited.",
            labels=["sender"],
        )
        paused = GaugeMetricFamily(
            "outbox_sender_paused",
            "1 while a sender is paused (by hand, or by its breaker after a sender-level "
            "error), else 0.",
            labels=["sender"],
        )
        for sender_id, state in sorted((states or {}).items()):
            if state.effective_rate is not None:
                rate.add_metric([sender_id], state.effective_rate)
            paused.add_metric([sender_id], 1 if state.paused else 0)
        return [rate, paused]

    @staticmethod
    def _families(figures: QueueFigures | None) -> list[Metric]:
        messages = GaugeMetricFamily(
            "outbox_queue_messages",
            "Messages by status: pending and in_flight exact; sent, error and cancelled "
            "estimated from the planner's statistics (as of the last ANALYZE).",
            labels=["status"],
        )
        due = GaugeMetricFamily(
            "outbox_queue_due_messages", "Pending messages due now (waiting for a slot)."
        )
        oldest = GaugeMetricFamily(
            "outbox_queue_oldest_due_age_seconds",
            "How long the longest-waiting due message has been due (0 when none is due).",
        )
        expired = GaugeMetricFamily(
            "outbox_queue_lease_expired_messages",
            "In-flight messages whose lease has expired (the reaper returns them).",
        )
        if figures is not None:
            for status in QUEUE_STATUSES:
                count = figures.counts.get(status)
                if count is not None:
                    messages.add_metric([status], count)
            due.add_metric([], figures.due)
            oldest.add_metric([], figures.oldest_due_age)
            expired.add_metric([], figures.lease_expired)
        return [messages, due, oldest, expired]


class _RefreshOnLoop:
    """QueueGauges for a threaded server: the refresh runs on the dispatcher's loop."""

    def __init__(self, gauges: QueueGauges, loop: asyncio.AbstractEventLoop) -> None:
        self._gauges = gauges
        self._loop = loop

    def describe(self) -> Iterable[Metric]:
        return self._gauges.describe()

    def collect(self) -> Iterable[Metric]:
        future = asyncio.run_coroutine_threadsafe(self._gauges.refresh(), self._loop)
        try:
            future.result(REFRESH_TIMEOUT + 1)
        except Exception:  # the loop is busy or stopping: the last figures will do
            future.cancel()
        return self._gauges.collect()


def render(registries: Iterable[CollectorRegistry]) -> bytes:
    """Several registries as one text exposition (their metric names never overlap)."""
    return b"".join(generate_latest(registry) for registry in registries)


class MetricsServer:
    """The dispatcher's `/metrics`: prometheus_client's HTTP server on a thread of its own."""

    def __init__(
        self,
        server: WSGIServer,
        thread: threading.Thread,
        registry: CollectorRegistry,
        collector: _RefreshOnLoop | None,
    ) -> None:
        self._server = server
        self._thread = thread
        self._registry = registry
        self._collector = collector

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    @classmethod
    def start(
        cls, host: str, port: int, metrics: DispatchMetrics, gauges: QueueGauges | None = None
    ) -> MetricsServer | None:
        """Listen on host:port; None (after one warning) when the port cannot be bound,
        so that a second dispatcher on the same host still delivers."""
        registry = metrics.registry
        collector = _RefreshOnLoop(gauges, asyncio.get_running_loop()) if gauges else None
        if collector is not None:
            registry.register(collector)
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            if collector is not None:
                registry.unregister(collector)
            log.warning(
                "metrics port unavailable: running without /metrics",
                host=host,
                port=port,
                error=exc.strerror or str(exc),
            )
            return None
        started = cls(server, thread, registry, collector)
        log.info("metrics listening", host=host, port=started.port, path="/metrics")
        return started

    async def stop(self) -> None:
        # shutdown() waits for serve_forever's poll (up to 0.5 s): not on the loop.
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        await asyncio.to_thread(self._thread.join, 5)
        if self._collector is not None:
            self._registry.unregister(self._collector)

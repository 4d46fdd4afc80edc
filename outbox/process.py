"""Running the roles as a process: signals, the uvicorn server, the dispatcher, together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import signal
import socket
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import uvicorn
import uvloop

from outbox import db
from outbox.api import create_app
from outbox.cancellation import cancel_and_wait
from outbox.connections import http_protocol
from outbox.dispatcher import run_dispatcher
from outbox.feed.protocol import FeedWebSocketProtocol
from outbox.metrics import DispatchMetrics, MetricsServer, QueueGauges
from outbox.services import lifespan_services
from outbox.settings import Settings
from outbox.store import Store


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived role on uvloop: its transports and timers are C, not Python."""
    # Everything imported so far lives as long as the process: out of the cyclic
    # collector's sight, a full collection scans only what came after, instead of
    # stopping the process for 30-45 ms here (68k objects) in the middle of a request.
    gc.freeze()
    uvloop.run(main)


# Of the shutdown grace: the feed's 1001 closes get at most a quarter, the app's own
# shutdown (the feed's tasks, the pool) keeps min(APP_SHUTDOWN, a quarter), requests
# still running get the rest.
APP_SHUTDOWN = 2.0
# A pool worker that has not stopped by then (connecting to a database that does not
# answer) is cancelled with the process's other leftovers.
POOL_CLOSE_TIMEOUT = 0.2


class StartupFailed(Exception):
    """The API did not start (uvicorn logged why)."""


class Server(uvicorn.Server):
    """uvicorn, minus its own signal handling (the process installs one set for all
    roles), its shutdown within OUTBOX_SHUTDOWN_GRACE, `on_started` once it serves."""

    def __init__(
        self, config: uvicorn.Config, grace: float, on_started: Callable[[], None] | None
    ) -> None:
        super().__init__(config)
        self.grace = grace
        self.on_started = on_started
        self.failed = False

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:
            # uvicorn's way out of a failed start-up (it logged why): this server ends,
            # and the process stops its other roles rather than run on without it.
            self.failed = self.should_exit = True
            return
        if self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        # uvicorn closes open WebSockets with 1012; the status feed says 1001 first.
        services = lifespan_services(self.lifespan.state)
        if services is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.grace / 4):
                    await services.feed.going_away()
        app_shutdown = min(APP_SHUTDOWN, self.grace / 4)
        left = max(0.0, deadline - loop.time() - app_shutdown)
        # Typed int by uvicorn, which hands it to asyncio.timeout: a float does.
        self.config.timeout_graceful_shutdown = left  # type: ignore[assignment]
        await super().shutdown(sockets)


def uvicorn_server(
    app: Any, settings: Settings, on_started: Callable[[], None] | None = None
) -> Server:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # RequestLog writes one structured line per request
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),  # shutdown() resets it
        # Pinned (never uvicorn's h11 fallback): httptools' protocol with a deadline for the
        # request head and a cap on open connections.
        http=http_protocol(settings),
        **websocket_options(settings),
    )
    return Server(config, settings.shutdown_grace, on_started)


def websocket_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's WebSocket settings for the status feed (whose clients only ping and close)."""
    return {
        "ws": FeedWebSocketProtocol,
        # A client frame beyond this closes the socket with 1009 (uvicorn's default: 16 MiB).
        "ws_max_size": settings.ws_max_frame,
        # Off: see README "Live status feed" for the measured cost.
        "ws_per_message_deflate": False,
        # Pings keep idle feeds open through proxies and drop peers that stopped answering.
        "ws_ping_interval": settings.ws_ping_interval or None,
        "ws_ping_timeout": settings.ws_ping_interval or None,
    }


def _on_stop_signals(callback: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, callback)


async def _dispatch_until(
    settings: Settings, stop: asyncio.Event, metrics: DispatchMetrics | None = None
) -> None:
    """`metrics` given: the serve app of this process shows them, no port of its own."""
    pool = db.create_pool(settings)
    await pool.open(wait=False)
    store = Store(pool, session_conninfo=settings.listen_database_url)
    exporter = None
    if metrics is None:
        metrics = DispatchMetrics()
        if settings.metrics_port:
            exporter = MetricsServer.start(
                settings.metrics_host or settings.host,
                settings.metrics_port,
                metrics,
                QueueGauges(store, settings.metrics_cache),
            )
    try:
        await run_dispatcher(settings, store, stop, metrics)
    finally:
        if exporter is not None:
            await exporter.stop()
        await pool.close(timeout=POOL_CLOSE_TIMEOUT)


async def serve(
    settings: Settings,
    sockets: list[socket.socket],
    *,
    with_dispatcher: bool = False,
    on_started: Callable[[], None] | None = None,
) -> None:
    """The HTTP API on `sockets` (outbox/bind.py) and, for `outbox dev`, a dispatcher,
    until SIGINT or SIGTERM, or until either ends (a failed start-up): the other stops too.
    `on_started` runs once the API accepts connections on them."""
    # With a dispatcher in this process, its metrics join serve's /metrics (no extra port).
    dispatch_metrics = DispatchMetrics() if with_dispatcher else None
    extra = (dispatch_metrics.registry,) if dispatch_metrics else ()
    app = create_app(settings, extra_registries=extra)
    server = uvicorn_server(app, settings, on_started)
    stop = asyncio.Event()

    def stop_all() -> None:
        stop.set()
        server.should_exit = True

    def request_stop() -> None:
        if stop.is_set():
            server.force_exit = True  # a second Ctrl-C: do not wait for open connections
        stop_all()

    _on_stop_signals(request_stop)
    tasks = [asyncio.create_task(server.serve(sockets), name="server")]
    if with_dispatcher:
        dispatching = _dispatch_until(settings, stop, dispatch_metrics)
        tasks.append(asyncio.create_task(dispatching, name="dispatch"))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_all()
        await asyncio.wait(tasks)
        await _end_remaining_tasks()
    for task in tasks:
        task.result()
    if server.failed:
        raise StartupFailed("the API did not start")


async def dispatch(settings: Settings) -> None:
    """A dispatcher until SIGINT or SIGTERM, then a graceful drain."""
    stop = asyncio.Event()
    _on_stop_signals(stop.set)
    try:
        await _dispatch_until(settings, stop)
    finally:
        await _end_remaining_tasks()


async def _end_remaining_tasks() -> None:
    """Whatever still runs as the process ends (a request cut short in a query, a pool
    worker still connecting) ends now: asyncio's runner would cancel each once and wait,
    and psycopg waits up to 10 s for the server to confirm a cancelled query."""
    current = asyncio.current_task()
    await cancel_and_wait(task for task in asyncio.all_tasks() if task is not current)

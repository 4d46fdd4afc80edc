"""Running the roles as a process: signals, the uvicorn server, the dispatcher, together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import uvicorn
import uvloop

from outbox import db
from outbox.api import create_app
from outbox.connections import http_protocol
from outbox.dispatcher import run_dispatcher
from outbox.gateway import going_away
from outbox.metrics import DispatchMetrics, MetricsServer, QueueGauges
from outbox.schedule import Scheduler
from outbox.settings import Settings
from outbox.store import Store
from outbox.wsprotocol import FeedWebSocketProtocol


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived role on uvloop: its transports and timers are C, not Python."""
    # Everything imported so far lives as long as the process: out of the cyclic
    # collector's sight, a full collection scans only what came after, instead of
    # stopping the process for 30-45 ms here (68k objects) in the middle of a request.
    gc.freeze()
    uvloop.run(main)


class Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: the process installs one set for all roles."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn closes open WebSockets with 1012; the status feed says 1001 first.
        await going_away(self.config.app)
        await super().shutdown(sockets)


def uvicorn_server(app: Any, settings: Settings) -> Server:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # RequestLog writes one structured line per request
        lifespan="on",
        timeout_graceful_shutdown=10,
        # Pinned (never uvicorn's h11 fallback): httptools' protocol with a deadline for the
        # request head and a cap on open connections.
        http=http_protocol(settings),
        **websocket_options(settings),
    )
    return Server(config)


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
    # The scheduled purge runs beside the dispatcher (once per tick across the cluster).
    scheduler = asyncio.create_task(
        Scheduler(settings, store, metrics=metrics).run(stop), name="scheduler"
    )
    try:
        await run_dispatcher(settings, store, stop, metrics)
    finally:
        if not scheduler.done():
            scheduler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scheduler
        if exporter is not None:
            await exporter.stop()
        await pool.close()


async def serve(settings: Settings, *, with_dispatcher: bool = False) -> None:
    """The HTTP API (and, for `outbox dev`, a dispatcher) until SIGINT or SIGTERM."""
    # With a dispatcher in this process, its metrics join serve's /metrics (no extra port).
    dispatch_metrics = DispatchMetrics() if with_dispatcher else None
    extra = (dispatch_metrics.registry,) if dispatch_metrics else ()
    server = uvicorn_server(create_app(settings, extra_registries=extra), settings)
    stop = asyncio.Event()

    def request_stop() -> None:
        if stop.is_set():
            server.force_exit = True  # a second Ctrl-C: do not wait for open connections
        stop.set()
        server.should_exit = True

    _on_stop_signals(request_stop)
    tasks = [asyncio.create_task(server.serve())]
    if with_dispatcher:
        tasks.append(asyncio.create_task(_dispatch_until(settings, stop, dispatch_metrics)))
    await asyncio.gather(*tasks)


async def dispatch(settings: Settings) -> None:
    """A dispatcher until SIGINT or SIGTERM, then a graceful drain."""
    stop = asyncio.Event()
    _on_stop_signals(stop.set)
    await _dispatch_until(settings, stop)

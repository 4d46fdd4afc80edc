"""uvicorn's sans-I/O WebSocket protocol, trimmed for thousands of idle status feeds.

Measured with 10,000 idle feeds on one `serve` (bench `ws` step): the stock protocol keeps
the opening handshake for the socket's life (request and response headers, ~4 KB a
socket, more with a browser's cookies), and each closed socket leaves a reference cycle
(websockets' parser generator refers to its protocol, ~7 KB) that only a full collection
frees, rare under gc.freeze: 10,000 clients that left still held ~40 MB.
"""

from __future__ import annotations

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request


class FeedWebSocketProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The ASGI scope has its own copy; the parser's frame holds `event` until the end.
        event.headers.clear()

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            self.response.headers.clear()  # sent; nothing reads it again

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Ends the generator (GeneratorExit at its `yield`): no cycle left to collect.
        self.conn.parser.close()

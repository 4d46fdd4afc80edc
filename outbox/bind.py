"""The API's listening sockets, bound before anything else starts.

`outbox serve` and `outbox dev` bind first: an address in use stops the process at once
with one line, before a database, a feed or a dispatcher has started (uvicorn binding
it after the app's start-up left a `dev` running on as a dispatcher), and `dev` prints
its banner for its own socket, never because another process answered on the port.
"""

from __future__ import annotations

import socket

BACKLOG = 2048  # uvicorn's default


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CannotListen(Exception):
    """The address cannot be bound; the message names it and says why."""


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (as asyncio's create_server
    binds them), non-blocking, for uvicorn to serve on."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise CannotListen(f"cannot listen on {address(host, port)}: {exc}") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)  # held from now on: a second process cannot bind it
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = (exc.strerror or str(exc)).lower()
        raise CannotListen(f"cannot listen on {address(host, port)}: {reason}") from exc
    return sockets

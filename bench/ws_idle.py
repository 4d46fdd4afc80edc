"""Many idle clients of the live status feed, for the bench's `ws` step.

Raw asyncio protocols (a few hundred bytes each, no library objects or tasks per socket),
in a process of their own, so that what the step measures is `serve`'s memory. Each
client answers pings (the server drops silent peers) and nothing else. It logs
`open <n>` once every socket is open, holds them until SIGTERM, then closes them all
with 1000 and logs `closed <n>`.

    python -m bench.ws_idle --port 8001 --count 10000   # OUTBOX_JWT_SECRET in the environment
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import signal
import struct
import sys
import time
from typing import cast

from outbox.auth import mint_token

PER_USER = 10  # below OUTBOX_WS_MAX_PER_USER (20): every socket is accepted
CONNECTING = 200  # handshakes in flight at once (the listen backlog is finite)
CLOSE_WAIT = 30.0


def raise_fd_limit(need: int) -> None:
    """Raise this process's soft descriptor limit towards the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask); payloads here are control frames (< 126 bytes)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + body


class IdleClient(asyncio.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.frames = 0
        self.received = 0  # bytes after the handshake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self._fail(ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace")))
                return
            self.upgraded, self.buffer = True, rest
            self.opened.set_result(None)
            self.received -= len(head) + 4
        self.received += len(data)
        self._frames()

    def _frames(self) -> None:
        buffer, at = self.buffer, 0
        while len(buffer) - at >= 2:
            opcode, length = buffer[at] & 0x0F, buffer[at + 1] & 0x7F
            start = at + 2
            if length == 126:
                if len(buffer) < at + 4:
                    break
                length, start = struct.unpack_from("!H", buffer, at + 2)[0], at + 4
            elif length == 127:
                if len(buffer) < at + 10:
                    break
                length, start = struct.unpack_from("!Q", buffer, at + 2)[0], at + 10
            if len(buffer) < start + length:
                break
            at = start + length
            self.frames += 1
            assert self.transport is not None
            if opcode == 0x9:  # ping → pong with its payload
                self.transport.write(_masked(0xA, buffer[start:at]))
            elif opcode == 0x8:  # the server closes: echo, and let it close the TCP side
                self.transport.write(_masked(0x8, buffer[start : start + 2]))
        self.buffer = buffer[at:]  # one copy per read, not one per frame

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_masked(0x8, struct.pack("!H", 1000)))

    def _fail(self, exc: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("closed during the handshake"))
        if not self.lost.done():
            self.lost.set_result(None)


def handshake(port: int, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws/whatsapp/?token={token} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        # What browsers offer: the server's answer decides whether compression is on.
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
    ).encode()


async def hold(port: int, count: int, secret: str, admin: bool = False) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    users = max(1, count // PER_USER)
    tokens = [mint_token(secret, f"idle-{u}", ttl=7200, admin=admin) for u in range(users)]
    gate = asyncio.Semaphore(CONNECTING)
    clients: list[IdleClient] = []

    async def one(i: int) -> None:
        async with gate:
            request = handshake(port, tokens[i % users])
            _, client = await loop.create_connection(lambda: IdleClient(request), "127.0.0.1", port)
            await asyncio.wait_for(client.opened, 60)
            clients.append(client)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    print(f"open {len(clients)} {time.monotonic() - started:.1f}s", flush=True)
    await stop.wait()
    for client in clients:
        client.close()
    done, _ = await asyncio.wait([c.lost for c in clients], timeout=CLOSE_WAIT)
    for client in clients:  # whoever did not answer the close in time
        if client.transport is not None:
            client.transport.abort()
    frames, received = sum(c.frames for c in clients), sum(c.received for c in clients)
    print(f"closed {len(done)} of {len(clients)}; {frames} frames, {received} bytes", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--admin", action="store_true", help="admin tokens: every event")
    args = parser.parse_args()
    secret = os.environ.get("OUTBOX_JWT_SECRET", "")
    if not secret:
        sys.exit("OUTBOX_JWT_SECRET is required (the serve's HS256 secret)")
    raise_fd_limit(args.count + 100)
    try:
        import uvloop

        uvloop.run(hold(args.port, args.count, secret, args.admin))
    except ImportError:
        asyncio.run(hold(args.port, args.count, secret, args.admin))


if __name__ == "__main__":
    main()

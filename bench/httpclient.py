"""A minimal keep-alive HTTP/1.1 client over one socket, so that the single-client figure
measures the server and not the client library (a few tens of µs per request here)."""

from __future__ import annotations

import socket


def build_post(path: str, host: str, token: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


class RawClient:
    """Sends pre-built requests one at a time and reads each response completely."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def request(self, data: bytes) -> tuple[int, bytes]:
        """(status, body) of one request; the connection stays open."""
        self.sock.sendall(data)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = self.buf[:end]
        status = int(head[9:12])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ValueError("chunked responses are not supported by this client")
        if length is None:
            raise ValueError("response without Content-Length")
        need = end + 4 + length
        while len(self.buf) < need:
            self._fill()
        body = self.buf[end + 4 : need]
        self.buf = self.buf[need:]
        return status, body

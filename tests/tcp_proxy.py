"""A TCP proxy a test can cut: a database outage without touching the shared server.

with TcpProxy(5432) as proxy:       # 127.0.0.1:<proxy.port> → 127.0.0.1:5432
    url = proxy.url(database_url)   # the same conninfo, through the proxy
    proxy.cut()                     # open connections reset, new ones refused
    proxy.stall()                   # or: nothing answers any more, nothing is refused
    proxy.restore()                 # forwards again, on the same port
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stalled = False
        self.dropped = 0  # bytes sent to the database during a stall (nothing answered)
        self.port = 0
        self._listen()

    def url(self, conninfo: str) -> str:
        """`conninfo` with its host and port replaced by the proxy's."""
        params = conninfo_to_dict(conninfo)
        params.update(host="127.0.0.1", port=str(self.port))
        params.pop("hostaddr", None)
        return make_conninfo(**params)

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut: the listener is closed
            if self._stalled:  # accepted, never answered
                with self._lock:
                    self._open.add(client)
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self._stalled:
                    self.dropped += len(data)
                else:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _swallow(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                self.dropped += len(data)

    def cut(self) -> None:
        """The database goes away: the proxy stops listening and resets every connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is not None:
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: a reset, as when the server's host goes down.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def stall(self) -> None:
        """The database's host stops answering (no reset, no refusal): what is sent on
        an open connection goes nowhere, a new connection is accepted and left hanging."""
        self._stalled = True

    def restore(self) -> None:
        if self._stalled:
            self.cut()  # what hung during the stall is broken, as after a partition
            self._stalled = False
        with self._lock:
            if self._listener is not None:
                return
        self._listen()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cut()

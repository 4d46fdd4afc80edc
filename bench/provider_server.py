"""M4's provider: a small HTTP server (own process) that plays the `http` provider and
appends `<Idempotency-Key> <time.time()>` for every call, stamped as its request line
is read (before this server parses the headers).

Run: python -m bench.provider_server --port PORT --out FILE
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the dispatcher's httpx client expects
    disable_nagle_algorithm = True
    out: Any = None

    arrived = 0.0

    def parse_request(self) -> bool:
        # The request line has just been read: the call has arrived (the headers'
        # parsing that follows is this server's own time, not the dispatcher's).
        self.arrived = time.time()
        return super().parse_request()

    def do_POST(self) -> None:
        arrived = self.arrived
        key = self.headers.get("Idempotency-Key", "-")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        with _lock:
            self.out.write(f"{key} {arrived:.6f}\n")
            self.out.flush()
        body = json.dumps({"id": f"bench-{key}"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # A limited sender's first claims open dozens of connections at once: socketserver's
    # backlog of 5 dropped their SYNs (retried a second later, or a ReadError).
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up is fine
            super().handle_error(request, client_address)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.out, "a", encoding="utf-8") as out:
        Handler.out = out
        server = Server(("127.0.0.1", args.port), Handler)
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        print("listening", args.port, file=sys.stderr, flush=True)
        server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()

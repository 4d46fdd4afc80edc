"""The live status feed (`/ws/whatsapp/`): one LISTEN per process, each event read once
and fanned out to the sockets allowed to see it, resumes replayed from the table.

- `follower.py`: `Feed`, the process-wide part: follows `outbox.events`, reads each new
  page once and hands every event to its sessions; lives in the app's lifespan state.
- `subscribers.py`: the registered sessions by user and admin, the sockets per user,
  the heap given back once most of a crowd has left.
- `session.py`: one socket: its handshake, its replay, its live backlog and sender, its
  close.
- `handshake.py`: what an opening carries: the token (query, subprotocol or header) and
  `?since=`.
- `wire.py`: what goes on the socket: the v1 event message and the close codes.
- `protocol.py`: uvicorn's WebSocket protocol, trimmed for thousands of idle feeds.

An idle socket costs what is needed to notice its end and nothing more (thousands are
normal): no task, queue or parsed handshake of ours, only the ASGI handler awaiting
`receive()` and a small `Session`.
"""

from outbox.feed.follower import APPLICATION_NAME, Feed

__all__ = ["APPLICATION_NAME", "Feed"]

"""What a feed socket's opening carries: who it is (a JWT in `?token=`, among the offered
subprotocols, or in `Authorization`) and where it resumes (`?since=<event_id>`)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from outbox.auth import AuthError, Principal, TokenVerifier, bearer_token
from outbox.feed.wire import BAD_REQUEST, UNAUTHORIZED, Scope, Send

MAX_EVENT_ID = 2**63 - 1

# The token may travel as a subprotocol, out of the URL that proxies log: the client
# offers `outbox, bearer.<JWT>` in Sec-WebSocket-Protocol and the server selects `outbox`.
SUBPROTOCOL = "outbox"
TOKEN_SUBPROTOCOL_PREFIX = "bearer."


class Refused(Exception):
    """The socket is closed with `code` and `reason` instead of joining the feed."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Opening:
    principal: Principal
    since: int | None  # None: live events only, from now on


async def accept(scope: Scope, send: Send) -> None:
    """Accept first, then close when refused: browsers see the close code and reason,
    not a bare 403. A client that offered the `outbox` subprotocol (its token beside it)
    gets it."""
    if SUBPROTOCOL in scope.get("subprotocols", ()):
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
    else:
        await send({"type": "websocket.accept"})


def read_opening(scope: Scope, verifier: TokenVerifier) -> Opening:
    """Who the socket is and where it resumes; `Refused` with 4401 or 4400."""
    try:
        principal = authenticate(scope, verifier)
    except AuthError as exc:
        raise Refused(UNAUTHORIZED, str(exc)) from exc
    try:
        since = parse_since(query_param(scope, "since"))
    except ValueError as exc:
        raise Refused(BAD_REQUEST, str(exc)) from exc
    return Opening(principal, since)


def forget(scope: Scope) -> None:
    """uvicorn keeps the scope for the socket's life: its headers (a browser's, with
    cookies, run to kilobytes), the token and the copy of the lifespan state are not
    needed any more."""
    scope["headers"], scope["query_string"], scope["subprotocols"] = [], b"", []
    scope["state"] = {}


def authenticate(scope: Scope, verifier: TokenVerifier) -> Principal:
    token = query_param(scope, "token") or subprotocol_token(scope)
    if not token:
        token = bearer_token(header(scope, b"authorization"))
    return verifier.authenticate(token)


def parse_since(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_EVENT_ID:
        raise ValueError("since must be an event id (a non-negative integer)")
    return int(raw)


def subprotocol_token(scope: Scope) -> str | None:
    for offered in scope.get("subprotocols", ()):
        if offered.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return str(offered[len(TOKEN_SUBPROTOCOL_PREFIX) :]) or None
    return None


def query_param(scope: Scope, name: str) -> str | None:
    """The last value of `name` in the query string (as starlette's QueryParams.get)."""
    found = None
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), True):
        if key == name:
            found = value
    return found


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None

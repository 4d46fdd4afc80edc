"""The admin dashboard: one static page (HTML, CSS, JS shipped in outbox/static/).

The page holds no data: it asks for an admin token, then reads
`GET /api/v1/admin/summary` (with the delivery funnel), `GET /api/v1/whatsapp/senders`,
the newest messages with their delivery (`GET /api/v1/whatsapp/messages`, `?delivery=`)
and the WebSocket feed with it, like any other client, and pauses or resumes senders
through the admin routes.
"""

from __future__ import annotations

import functools
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from outbox.errors import ApiError

_FILES = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# Only our own script and style, no inline code, no framing: a server-provided string
# that slipped into markup could still not run.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return (resources.files("outbox") / "static" / name).read_bytes()


async def _asset(request: Request) -> Response:
    name = request.path_params.get("name", "dashboard.html")
    if name not in _FILES:
        raise ApiError(404, "no such route")
    return Response(_read(name), media_type=_FILES[name], headers=_HEADERS)


async def _slash(request: Request) -> Response:
    return RedirectResponse("/dashboard", status_code=308)


ROUTES = [
    Route("/dashboard", _asset, methods=["GET"]),
    Route("/dashboard/", _slash, methods=["GET"]),
    Route("/dashboard/{name}", _asset, methods=["GET"]),
]

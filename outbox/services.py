"""What a request handler needs from the app: its services (in the lifespan state, copied
into each request's), and who is asking (authenticated from the bearer token)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.requests import Request

from outbox.auth import AuthError, Principal, TokenVerifier, bearer_token
from outbox.body import BodyReader
from outbox.errors import forbidden, unauthorized
from outbox.feed import Feed
from outbox.ingest import InsertCoalescer
from outbox.metrics import ApiMetrics, QueueGauges
from outbox.sender_directory import SenderDirectory
from outbox.settings import Settings
from outbox.store import Store


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: Store
    verifier: TokenVerifier
    ingest: InsertCoalescer
    bodies: BodyReader
    metrics: ApiMetrics
    queue_gauges: QueueGauges
    metrics_registries: tuple[CollectorRegistry, ...]  # rendered together on /metrics
    feed: Feed  # the live status feed (outbox/feed/)
    senders: SenderDirectory  # the known senders, kept in memory


# The key of the app's services in its lifespan state (each request's `state` copies it).
SERVICES = "services"


def lifespan_services(state: Mapping[str, Any]) -> Services | None:
    """The app's services in a server's lifespan state (None before start-up, or for
    another app)."""
    services = state.get(SERVICES)
    return services if isinstance(services, Services) else None


def services_of(request: Request) -> Services:
    services: Services = request.state.services
    return services


def authenticate(request: Request) -> Principal:
    try:
        principal = services_of(request).verifier.authenticate(
            bearer_token(request.headers.get("authorization"))
        )
    except AuthError as exc:
        raise unauthorized(str(exc)) from exc
    request.state.user_id = principal.user_id
    return principal


def require_admin(request: Request) -> Principal:
    principal = authenticate(request)
    if not principal.is_admin:
        raise forbidden("this route needs an admin token")
    return principal

"""Each sender's provider, for a dispatcher: built from the SenderDirectory (the
environment's `default` and the stored senders with their credentials), each calling
through an HTTP client of its own, so that one sender's keep-alive pool and settings never
serve another's calls.

A sender's provider is built when first needed, and again when its provider, settings or
credentials change; the client of the one replaced (or of a deleted sender) is closed once
the calls that hold it have ended, never under a call in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from outbox.log import get_logger
from outbox.providers import build_provider
from outbox.providers.base import Provider, SettingError
from outbox.sender_directory import KnownSender, SenderDirectory
from outbox.senders import DEFAULT_SENDER
from outbox.settings import Settings
from outbox.store import Store

log = get_logger("outbox.senders")

# A sender held after a sender-level error, at most this long: its pause, written with the
# outcome a moment later, reaches the directory within it (its NOTIFY, or the next read).
HOLD_SECONDS = 5.0


class UnknownSender(Exception):
    """The sender cannot be called: no such sender here (deleted, or its credentials do
    not decrypt with this process's key), or its settings make no provider."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SenderLeftOut(UnknownSender):
    """The sender is stored, but its credentials do not decrypt with this process's key:
    reading the senders again cannot change that."""


def provider_client(settings: Settings) -> httpx.AsyncClient:
    """A sender's client, its keep-alive pool sized to the concurrency."""
    return httpx.AsyncClient(
        timeout=settings.provider_timeout,
        limits=httpx.Limits(
            max_connections=settings.dispatch_concurrency,
            max_keepalive_connections=settings.dispatch_concurrency,
        ),
    )


# What a sender's provider is built from: a change in any of them builds it again.
_Source = tuple[str, Mapping[str, Any], Mapping[str, str]]

# The variables that set the sender `default`'s settings (senders.environment_sender): a
# setting that cannot work stops the start naming the variable to fix.
ENVIRONMENT_NAMES = {
    "url": "OUTBOX_PROVIDER_URL",
    "secret": "OUTBOX_PROVIDER_SECRET",
    "base_url": "OUTBOX_CLOUD_BASE_URL",
    "api_version": "OUTBOX_CLOUD_API_VERSION",
    "phone_number_id": "OUTBOX_CLOUD_PHONE_NUMBER_ID",
    "access_token": "OUTBOX_CLOUD_TOKEN",
    "latency_ms": "OUTBOX_FAKE_LATENCY_MS",
    "failure_rate": "OUTBOX_FAKE_FAILURE_RATE",
}


def _source(known: KnownSender) -> _Source:
    return (known.config.provider, known.config.settings, known.secrets)


@dataclass(eq=False, slots=True)
class SenderProvider:
    """One sender's provider, built from one version of its settings. Held by each call
    that uses it (`calls`), from `acquire` to `release`."""

    sender: str
    provider: Provider
    client: httpx.AsyncClient | None  # None: a fake sender, or a provider given by a test
    known: KnownSender | None  # what it was built from (None: given, never rebuilt)
    calls: int = 0
    retired: bool = False  # replaced or deleted: closed when its last call ends


class SenderProviders:
    """The providers of the known senders, by id. `default`: the provider of the sender
    `default` (tests give theirs; otherwise built from the environment at once, so that a
    setting that cannot work stops the start). `on_senders(ids)` runs with the known ids
    at start and after each change."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        default: Provider | None = None,
        on_senders: Callable[[Collection[str]], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_senders = on_senders
        self.directory = SenderDirectory(
            settings, store, decrypt=True, on_change=self._directory_changed
        )
        self._providers: dict[str, SenderProvider] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._watchers: list[Callable[[], None]] = []
        # Senders whose settings make no provider: the version that failed, and why.
        self._unusable: dict[str, tuple[_Source, str]] = {}
        # Senders held here after a sender-level error, until (monotonic time).
        self._holds: dict[str, float] = {}
        if default is not None:
            self._providers[DEFAULT_SENDER] = SenderProvider(DEFAULT_SENDER, default, None, None)
        else:
            known = self.directory.get(DEFAULT_SENDER)
            assert known is not None  # the directory always has the environment's
            self._providers[DEFAULT_SENDER] = self._build(known)
        if on_senders is not None:
            on_senders(self.directory.senders.keys())

    @property
    def default(self) -> Provider:
        return self._providers[DEFAULT_SENDER].provider

    async def load(self) -> None:
        """Read the stored senders now (before the first claim)."""
        await self.directory.load()

    async def follow(self) -> None:
        """Follow the senders' changes until cancelled (a side task of the dispatcher)."""
        await self.directory.run()

    def watch(self, callback: Callable[[], None]) -> None:
        """Run `callback` after each read of the senders that changed something."""
        self._watchers.append(callback)

    def paused(self, sender_id: str) -> bool:
        """Whether the sender is paused as the directory knows it now (the claim leaves
        its rows alone until it resumes, but for its breaker's probe, which the claim
        marks and which is called all the same), or held here (see `hold`)."""
        hold = self._holds.get(sender_id)
        if hold is not None:
            if time.monotonic() < hold:
                return True
            del self._holds[sender_id]
        known = self.directory.get(sender_id)
        return known is not None and known.config.paused is not None

    def hold(self, sender_id: str) -> bool:
        """A call of this sender hit a sender-level error: none of its rows starts here
        until the pause that the outcome writes reaches the directory (for at most
        HOLD_SECONDS). True when it was not held yet: the first error of a pause."""
        first = not self.paused(sender_id)
        self._holds[sender_id] = time.monotonic() + HOLD_SECONDS
        return first

    def acquire(self, sender_id: str) -> SenderProvider:
        """The sender's provider as the directory knows it now, held until `release`.
        Raises UnknownSender (SenderLeftOut for credentials that do not decrypt)."""
        known = self.directory.get(sender_id)
        if known is None:
            if sender_id in self.directory.left_out:
                raise SenderLeftOut(
                    f"sender {sender_id!r} cannot be used: its credentials do not decrypt"
                    " with this dispatcher's OUTBOX_SECRET_KEY"
                )
            raise UnknownSender(f"sender {sender_id!r} does not exist")
        held = self._providers.get(sender_id)
        if held is not None and held.known is not None and held.known is not known:
            if _source(held.known) == _source(known):
                held.known = known  # read again, unchanged: the next look is by identity
            else:
                self._retire(held)
                held = None
        if held is None:
            held = self._providers[sender_id] = self._build(known)
        held.calls += 1
        return held

    def release(self, held: SenderProvider) -> None:
        held.calls -= 1
        if held.retired and held.calls == 0:
            self._close(held)

    async def reread(self) -> None:
        """Read the senders again, by a read that begins after this call (shared with the
        other lookups that missed; see SenderDirectory.reread)."""
        await self.directory.reread()

    async def aclose(self) -> None:
        """Close every client (the dispatcher has stopped: no call is left)."""
        for held in list(self._providers.values()):
            self._retire(held)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _build(self, known: KnownSender) -> SenderProvider:
        config = known.config
        source = _source(known)
        unusable = self._unusable.get(config.id)
        if unusable is not None and unusable[0] == source:
            raise UnknownSender(unusable[1])  # built once already, in vain
        client = provider_client(self._settings) if config.provider != "fake" else None
        try:
            provider = build_provider(
                config.provider,
                config.settings,
                known.secrets,
                client,
                max_response_bytes=self._settings.provider_max_response_bytes,
            )
        except ValueError as exc:
            if client is not None:
                self._close_client(client)
            if config.id == DEFAULT_SENDER:
                # The environment's settings: the start fails, naming the variable.
                if isinstance(exc, SettingError):
                    raise ValueError(exc.named(ENVIRONMENT_NAMES)) from exc
                raise
            reason = f"sender {config.id!r} cannot be used: {exc}"
            log.error(
                "sender cannot be used: its messages end in error", sender=config.id, error=str(exc)
            )
            self._unusable[config.id] = (source, reason)
            raise UnknownSender(reason) from exc
        self._unusable.pop(config.id, None)
        return SenderProvider(config.id, provider, client, known)

    def _directory_changed(self) -> None:
        """Providers of senders deleted or changed are retired at once (their clients
        close when their calls end); the others are built when next needed."""
        for sender_id, held in list(self._providers.items()):
            if held.known is None:
                continue
            known = self.directory.get(sender_id)
            if known is None or _source(known) != _source(held.known):
                self._retire(held)
        for sender_id in [s for s in self._unusable if s not in self.directory.senders]:
            del self._unusable[sender_id]
        for sender_id in list(self._holds):
            known = self.directory.get(sender_id)
            if known is None or known.config.paused is not None:
                del self._holds[sender_id]  # the directory knows the pause now
        if self._on_senders is not None:
            self._on_senders(self.directory.senders.keys())
        for callback in self._watchers:
            callback()

    def _retire(self, held: SenderProvider) -> None:
        if self._providers.get(held.sender) is held:
            del self._providers[held.sender]
        if not held.retired:
            held.retired = True
            if held.calls == 0:
                self._close(held)

    def _close(self, held: SenderProvider) -> None:
        if held.client is not None:
            self._close_client(held.client)
            held.client = None

    def _close_client(self, client: httpx.AsyncClient) -> None:
        task = asyncio.get_running_loop().create_task(client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

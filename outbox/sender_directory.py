"""The senders a process knows, kept in memory: the environment's `default` and the stored
ones, read again whenever one changes (NOTIFY outbox_senders, sent by a trigger on every
change) and every REREAD_INTERVAL as a backstop for a notification lost while the LISTEN
connection was down. `serve` checks a message's sender here, so that the send path stays
one round trip; `dispatch` builds each sender's provider from it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from outbox import notifier
from outbox.log import get_logger
from outbox.retry import Backoff
from outbox.senders import (
    DEFAULT_SENDER,
    Keyring,
    SecretKeyError,
    SenderConfig,
    environment_secrets,
    environment_sender,
)
from outbox.settings import Settings
from outbox.store import Store

log = get_logger("outbox.senders")

CHANNEL = "outbox_senders"
REREAD_INTERVAL = 30.0  # seconds between reads when no notification came
MISS_INTERVAL = 1.0  # at least this long between reads asked for by lookups that missed
RETRY_MIN, RETRY_MAX = 0.1, 5.0


@dataclass(frozen=True, slots=True)
class KnownSender:
    """A sender as this process uses it: its configuration and, where the process calls
    providers, its decrypted credentials (never logged: repr leaves them out)."""

    config: SenderConfig
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def id(self) -> str:
        return self.config.id

    def allows(self, user_id: str) -> bool:
        """Whether this JWT sub may send from it."""
        users = self.config.users
        return "*" in users or user_id in users


class SenderDirectory:
    """The known senders by id. `decrypt`: keep their credentials (dispatchers do; serve
    needs only who may send from which). `on_change` runs after each read that changed
    something."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        decrypt: bool = False,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._keyring = Keyring(settings.secret_key) if decrypt else None
        self._on_change = on_change
        default = KnownSender(environment_sender(settings), environment_secrets(settings))
        self._default = default
        self.senders: dict[str, KnownSender] = {DEFAULT_SENDER: default}
        self.left_out: frozenset[str] = frozenset()  # stored, but their credentials do not decrypt
        self.loaded = asyncio.Event()  # set after the first read
        self._wake = asyncio.Event()
        # Reads of the stored senders begun, numbered: one that began earlier never
        # replaces the senders of one that began later (tests count them, too).
        self.reads = 0
        self._read_shown = 0
        # The read that lookups which missed wait for (reread), not begun yet.
        self._next_miss_read: asyncio.Task[None] | None = None
        self._miss_reads: set[asyncio.Task[None]] = set()
        self._miss_lock = asyncio.Lock()
        self._miss_read_at = -MISS_INTERVAL
        self._default_limit_written = False

    def get(self, sender_id: str) -> KnownSender | None:
        return self.senders.get(sender_id)

    def allowed_ids(self, user_id: str) -> frozenset[str]:
        """The senders this JWT sub may send from."""
        return frozenset(s.id for s in self.senders.values() if s.allows(user_id))

    def wake(self) -> None:
        """Read the senders again soon (a change was announced)."""
        self._wake.set()

    async def load(self) -> bool:
        """Read the stored senders now; True when anything changed. A sender whose
        credentials do not decrypt is left out (logged when it becomes so): never called
        with them."""
        self.reads += 1
        read = self.reads
        if not self._default_limit_written:
            # The environment sets `default`'s limit: its state (which the claim reads)
            # gets it from the processes, at their first read (016_sender_limits.sql).
            await self._store.senders.set_limit(DEFAULT_SENDER, self._default.config.rate_limit)
            self._default_limit_written = True
        rows = await self._store.senders.all()
        # `default` is paused in its state only (it has no stored row).
        default_state = (await self._store.senders.states(DEFAULT_SENDER)).get(DEFAULT_SENDER)
        default = self._default
        if default_state is not None and default_state.paused is not None:
            default = KnownSender(
                dataclasses.replace(default.config, paused=default_state.paused), default.secrets
            )
        senders = {DEFAULT_SENDER: default}
        left_out: dict[str, str] = {}  # id → why
        for row in rows:
            secrets: dict[str, str] = {}
            if self._keyring is not None and row.secrets is not None:
                try:
                    secrets = self._keyring.decrypt(row.secrets, row.id)
                except SecretKeyError as exc:
                    left_out[row.id] = str(exc)
                    continue
            senders[row.id] = KnownSender(SenderConfig.stored(row), secrets)
        if read < self._read_shown:  # a later read finished first: it is newer
            return False
        self._read_shown = read
        for sender_id, error in left_out.items():
            if sender_id not in self.left_out:  # once, not at every read
                log.error(
                    "sender left out: its credentials do not decrypt",
                    sender=sender_id,
                    error=error,
                )
        changed = senders != self.senders
        self.senders = senders
        self.left_out = frozenset(left_out)
        self.loaded.set()
        if changed and self._on_change is not None:
            self._on_change()
        return changed

    async def reread(self) -> None:
        """Read the stored senders again for a lookup that missed (a sender created a
        moment ago, whose notification has not come yet): returns once a read that began
        after this call has ended, and raises what it raised (the database away).

        Callers share the next read, and such reads begin MISS_INTERVAL apart at least,
        one at a time: a flood of requests naming unknown senders costs the database one
        read a second, each request waiting for the next one."""
        task = self._next_miss_read
        if task is None:
            task = asyncio.create_task(self._miss_read(), name="senders-reread")
            self._next_miss_read = task
            self._miss_reads.add(task)
            task.add_done_callback(self._miss_read_done)
        # Shielded: a caller that leaves (its client went away) leaves it to the others.
        await asyncio.shield(task)

    async def _miss_read(self) -> None:
        async with self._miss_lock:  # after the read before, if it has not ended
            delay = self._miss_read_at + MISS_INTERVAL - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._next_miss_read = None  # callers from now on need a read begun later
            self._miss_read_at = time.monotonic()
            await self.load()

    def _miss_read_done(self, task: asyncio.Task[None]) -> None:
        self._miss_reads.discard(task)
        if self._next_miss_read is task:
            self._next_miss_read = None
        if not task.cancelled():
            task.exception()  # retrieved: its callers, if any are left, have it too

    async def run(self) -> None:
        """Follow changes until cancelled: LISTEN, and a read at each notification, at
        each (re)connection and every REREAD_INTERVAL."""
        listener = asyncio.create_task(
            notifier.listen(
                self._settings.listen_database_url,
                CHANNEL,
                lambda _payload: self.wake(),
                on_connect=self.wake,  # changes missed while away: read now
            ),
            name="senders-listen",
        )
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        try:
            while True:
                try:
                    async with asyncio.timeout(REREAD_INTERVAL):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                try:
                    await self.load()
                    backoff.reset()
                except Exception as exc:  # the database away: keep what is known, retry
                    delay = backoff.next_delay()
                    log.warning("reading senders failed", error=str(exc).strip(), retry_in=delay)
                    await asyncio.sleep(delay)
                    self._wake.set()
        finally:
            tasks = [listener, *self._miss_reads]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

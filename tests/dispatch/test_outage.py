"""PostgreSQL away for longer than the lease while the provider keeps answering 200: once
it is back, no message that got a success is called again (on a cluster of its own)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import psycopg

from outbox import db
from tests.dispatch.conftest import (
    DispatcherProcess,
    Reply,
    ScriptedProvider,
    insert_messages,
    wait_all,
)
from tests.private_pg import PrivateCluster
from tests.private_pg import private_cluster as private_cluster  # the fixture
from tests.support import wait_for

LEASE = 3.0
REPLY_DELAY = 0.3


def test_an_outage_longer_than_the_lease_sends_no_message_twice(
    private_cluster: PrivateCluster,
    provider: tuple[ScriptedProvider, str],
    start_dispatcher: Callable[..., DispatcherProcess],
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(body={"id": f"prov-{call.task_id}"}, delay=REPLY_DELAY)
    url = private_cluster.create_database("outbox")
    db.migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        ids = insert_messages(conn, 200)
    dispatcher = start_dispatcher(
        database_url=url,
        lease_seconds=f"{LEASE}s",
        provider_timeout=f"{LEASE - 1}s",
        dispatch_concurrency="16",
        # A waiting query gives up within a second, as a longer outage than the pool's
        # timeout does: each part of the dispatcher then comes back on its own schedule.
        db_pool_timeout="1s",
    )
    wait_for(lambda: len(scripted.calls) >= 32, timeout=20, what="some calls")

    private_cluster.stop()  # immediate, as a crash: calls in flight go on and succeed
    stopped_at = time.time()
    # Longer than the lease, and until every call started before or during it answered.
    wait_for(
        lambda: time.time() > stopped_at + LEASE + 1 and scripted.in_flight == 0,
        timeout=LEASE + 10,
        what="the outage to outlast the lease",
    )
    private_cluster.start()
    restarted_at = time.time()

    with psycopg.connect(url, autocommit=True) as conn:
        wait_all(conn, "sent", len(ids), timeout=60)
    answered_in_outage = [
        c for c in scripted.calls if stopped_at < c.at + REPLY_DELAY < restarted_at
    ]
    assert answered_in_outage, "the provider should have answered while PostgreSQL was away"
    assert "could not record outcomes, retrying" in dispatcher.log()
    calls = Counter(scripted.keys())
    assert set(calls) == set(ids)
    twice = sorted(task_id for task_id, count in calls.items() if count > 1)
    assert twice == [], f"{len(twice)} messages that got a 200 were called again"

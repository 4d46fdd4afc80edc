"""The attempts counter has every (outcome, error_class) series of each known sender from
the start; a sender deleted takes its series with it, and so does a sender counted though
unknown (its messages refused)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from prometheus_client import generate_latest

from outbox.metrics import ATTEMPT_LABELS, DispatchMetrics
from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import Completion


def series(metrics: DispatchMetrics, sender: str) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    return [
        line
        for outcome, error_class in ATTEMPT_LABELS
        if (
            line := f'outbox_attempts_total{{error_class="{error_class}",outcome="{outcome}",'
            f'sender="{sender}"}} 0.0'
        )
        in text
    ]


def test_every_attempt_series_starts_at_zero() -> None:
    assert len(series(DispatchMetrics(), "default")) == len(ATTEMPT_LABELS)


def test_each_known_sender_has_its_series_until_it_is_deleted() -> None:
    metrics = DispatchMetrics()
    metrics.keep_senders(["default", "gw"])
    assert len(series(metrics, "gw")) == len(ATTEMPT_LABELS)
    metrics.keep_senders(["default"])
    assert series(metrics, "gw") == []
    assert len(series(metrics, "default")) == len(ATTEMPT_LABELS)


def refused(sender: str) -> Completion:
    """A message of an unknown sender, ended in error uncalled."""
    now = datetime.now(UTC)
    return Completion(
        id=uuid.uuid4(),
        attempt=1,
        status=MessageStatus.ERROR,
        outcome=AttemptOutcome.PERMANENT,
        started_at=now,
        finished_at=now,
        error=f"sender {sender!r} does not exist",
        refund=1,
        sender=sender,
    )


def test_an_unknown_senders_series_goes_at_the_next_change_of_the_senders() -> None:
    metrics = DispatchMetrics()
    metrics.count_outcomes([refused("ghost"), refused("ghost")])
    line = 'outbox_attempts_total{error_class="permanent",outcome="failed",sender="ghost"} 2.0'
    assert line in generate_latest(metrics.registry).decode()

    metrics.keep_senders(["default", "gw"])
    assert 'sender="ghost"' not in generate_latest(metrics.registry).decode()
    assert len(series(metrics, "gw")) == len(ATTEMPT_LABELS)
    metrics.count_outcomes([refused("ghost")])  # counted again from 1, and gone again
    assert line.replace("2.0", "1.0") in generate_latest(metrics.registry).decode()
    metrics.keep_senders(["default", "gw"])
    assert 'sender="ghost"' not in generate_latest(metrics.registry).decode()

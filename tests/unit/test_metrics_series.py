"""The attempts counter has every (outcome, error_class) series of each known sender from
the start; a sender deleted takes its series with it."""

from __future__ import annotations

from prometheus_client import generate_latest

from outbox.metrics import ATTEMPT_LABELS, DispatchMetrics


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

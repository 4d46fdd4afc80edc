"""The attempts counter has every (outcome, error_class) series from the start."""

from __future__ import annotations

from prometheus_client import generate_latest

from outbox.metrics import ATTEMPT_LABELS, DispatchMetrics


def test_every_attempt_series_starts_at_zero() -> None:
    text = generate_latest(DispatchMetrics().registry).decode()
    for outcome, error_class in ATTEMPT_LABELS:
        line = f'outbox_attempts_total{{error_class="{error_class}",outcome="{outcome}"}} 0.0'
        assert line in text, line

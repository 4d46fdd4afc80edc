"""A short schemathesis run against a real server on a fresh database (`make fuzz` is the
long one): every check, as a user and as an admin, from the published /openapi.json."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuzz.runner import run
from tests.support import ServerThread

# Cases per operation: with the stateful phase, a few hundred cases in all (~25 s).
EXAMPLES = 10
SEED = 17


@pytest.mark.timeout(180)
def test_generated_requests_meet_every_check_and_sends_are_accepted(
    api: ServerThread, token: Callable[..., str], tmp_path: Path
) -> None:
    totals = run(
        api.url,
        {"user": token("fuzz-user"), "admin": token("fuzz-admin", admin=True)},
        max_examples=EXAMPLES,
        seed=SEED,
        # The coverage phase alone is ~3,000 cases: `make fuzz` runs it.
        phases="examples,fuzzing,stateful",
        workdir=tmp_path,
        timeout=75,  # per identity
    )
    report = totals.summary()
    assert totals.total >= 200, report
    assert not totals.failures, report
    assert not [status for status in totals.statuses() if status is None or status >= 500], report
    accepted, sends = totals.sends()
    assert sends >= 50 and accepted >= 0.2 * sends, report
    # Both identities reached the admin routes: one refused, the other served.
    admin_only = totals.statuses(("GET /api/v1/admin/summary",))
    assert admin_only[403] and admin_only[200], report

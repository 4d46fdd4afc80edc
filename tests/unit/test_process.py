"""process.run: what a long-lived role does before its event loop starts."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import gc
from outbox import process

async def main() -> None:
    print(gc.get_freeze_count())

process.run(main())
"""


def test_run_puts_the_start_up_objects_out_of_the_collectors_sight() -> None:
    # A full collection over every object a role imported stopped `serve` for 30-45 ms
    # in the middle of a batch request; frozen, they are never scanned again.
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True, timeout=60
    )
    assert int(out.stdout) > 10_000

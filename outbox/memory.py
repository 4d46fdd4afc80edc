"""Giving the heap back to the system once many connections have closed.

glibc keeps what the process frees for reuse, in the middle of its heap as well as at the
end: after 10,000 WebSocket clients left, `serve` still held ~210 MB of its ~270 MB
(75 MB before they came). `malloc_trim(0)` returns the free pages wherever they are
(~55 MB there, in ~15 ms); what remains is Python's own arenas, kept while any object in
them lives.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """Return the C heap's free pages to the system; False where there is no malloc_trim."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def rss_mb() -> float | None:
    """This process's resident set size, from /proc (None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE / 2**20
    except (OSError, IndexError, ValueError):
        return None

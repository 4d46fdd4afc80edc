"""structlog set-up: JSON lines in production, readable in a terminal; phones masked."""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from outbox.settings import Settings

# A phone number as people write it: 8 to 15 digits, perhaps split by spaces, dashes or
# parentheses (`+55 (11) 99999-9999`, `55-11999999999`), not inside a longer word (a
# UUID's hex, an ISO timestamp's date). A leading `+` stays where it is.
_CANDIDATE = r"[0-9](?<![\w\-][0-9])[0-9 \-()]{6,}[0-9](?![\w\-])"
_CANDIDATE_STR = re.compile(_CANDIDATE)
_CANDIDATE_BYTES = re.compile(_CANDIDATE.encode())
_DATE_STR = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?![0-9])")
_DATE_BYTES = re.compile(rb"[0-9]{4}-[0-9]{2}-[0-9]{2}(?![0-9])")
_ANSI = re.compile(r"(\x1b\[[0-9;]*m)")
# The fast path's look: digits and separators as one symbol, then a run of eight.
_FOLD = bytes.maketrans(b"0123456789 -()", b"0" * 14)
# JSON lines end with our timestamp (`"timestamp":"2026-12-04T15:31:15.743950Z"}`),
# whose date the fast path would always see: it looks before it.
_TIMESTAMP_TAIL = len(b'"timestamp":"2026-12-04T15:31:15.743950Z"}')


def _masked_digits(digits: Any) -> Any:
    keep = 4 if len(digits) >= 12 else 2  # never show more than half of a short number
    stars = ("*" if isinstance(digits, str) else b"*") * (len(digits) - 2 * keep)
    return digits[:keep] + stars + digits[-keep:]


def _mask_match(match: re.Match[Any]) -> Any:
    text = match.group()
    if isinstance(text, bytes):
        if _DATE_BYTES.match(text):
            return text  # `2026-12-05 03…`: a date and what follows it
        digits: Any = bytes(c for c in text if 48 <= c <= 57)
    else:
        if _DATE_STR.match(text):
            return text
        digits = "".join(c for c in text if "0" <= c <= "9")
    if len(digits) > 15 and len(digits) == len(text):
        return text  # one long number: an id, not a phone
    # A phone, or several written side by side (`55 11 99999-9999 55 11 88888-8888`).
    return _masked_digits(digits)


def mask_phone(text: str) -> str:
    """`5511999999999` → `5511*****9999`, `+55 11 99999-9999` → `+5511*****9999`,
    `12345678` → `12****78`: only the ends stay, whatever the spelling."""
    if "\x1b" in text:  # console colours: `\x1b[35m` must not hide the number after it
        parts = _ANSI.split(text)
        return "".join(
            part if i % 2 else _CANDIDATE_STR.sub(_mask_match, part) for i, part in enumerate(parts)
        )
    return _CANDIDATE_STR.sub(_mask_match, text)


def _mask_rendered(_: Any, __: str, line: Any) -> Any:
    """The last processor: one pass over the whole rendered line, whatever field or
    traceback a number hides in (cheaper than visiting every value)."""
    if isinstance(line, bytes):
        # Fast path: most lines hold no run of 8 digits and separators at all (callers
        # mask the numbers they know of when binding them): look before the regex.
        end = len(line) - _TIMESTAMP_TAIL if line.endswith(b'Z"}') else len(line)
        if line.translate(_FOLD).find(b"00000000", 0, end) < 0:
            return line
        return _CANDIDATE_BYTES.sub(_mask_match, line)
    return mask_phone(line)


class _UtcTimestamp:
    """`2026-11-25T15:40:18.743950Z`, as structlog's TimeStamper(fmt="iso", utc=True)
    writes it, with the date and time of day formatted once per second (two lines per
    attempt put this on the hot path)."""

    def __init__(self) -> None:
        self._cache = (-1, "")  # (second, its text): replaced as one value, thread-safe

    def __call__(self, _: Any, __: str, event_dict: Any) -> Any:
        now = time.time()
        second = int(now)
        cached_second, text = self._cache
        if second != cached_second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cache = (second, text)
        event_dict["timestamp"] = f"{text}.{int((now - second) * 1_000_000):06d}Z"
        return event_dict


def _orjson_dumps(value: Any, **_: Any) -> bytes:
    return orjson.dumps(value, default=str)


class _BufferedLines:
    """JSON lines to stderr through a buffer flushed every FLUSH_SECONDS, when full, and
    at exit: two log lines per attempt would otherwise cost two write() calls, a large
    share of the hot path. A process killed with SIGKILL loses at most that interval."""

    FLUSH_SECONDS = 0.1
    _shared: io.BufferedWriter[io.FileIO] | None = None

    def __init__(self, stream: io.BufferedWriter[io.FileIO]) -> None:
        self._write = stream.write

    def msg(self, message: bytes) -> None:
        self._write(message + b"\n")

    log = debug = info = warn = warning = error = critical = exception = fatal = msg

    @classmethod
    def factory(cls) -> Callable[..., _BufferedLines]:
        if cls._shared is None:
            stream = io.BufferedWriter(
                io.FileIO(sys.stderr.fileno(), "wb", closefd=False), buffer_size=1 << 16
            )
            cls._shared = stream
            atexit.register(stream.flush)
            threading.Thread(target=cls._flush_forever, name="log-flush", daemon=True).start()
        stream = cls._shared
        return lambda *_: cls(stream)

    @classmethod
    def _flush_forever(cls) -> None:
        while cls._shared is not None:
            time.sleep(cls.FLUSH_SECONDS)
            with contextlib.suppress(OSError, ValueError):
                cls._shared.flush()


def flush_logs() -> None:
    """Write out buffered log lines now (before printing to stderr directly)."""
    if _BufferedLines._shared is not None:
        _BufferedLines._shared.flush()


def configure_logging(settings: Settings) -> None:
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    as_json = settings.log_format == "json" or (
        settings.log_format == "" and not sys.stderr.isatty()
    )
    exc: list[Any] = [structlog.processors.format_exc_info]
    stamps: list[Any] = [structlog.processors.add_log_level, _UtcTimestamp()]
    if as_json:
        # Logs are on the hot path (two lines per attempt): orjson straight to bytes.
        renderer: Any = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        factory: Any = _BufferedLines.factory()
        text_renderer: Any = structlog.processors.JSONRenderer()
    else:
        renderer = text_renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[
            *stamps,
            *exc,
            renderer,
            _mask_rendered,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (uvicorn, psycopg) go to the same
    # stream in the same format, masked like ours.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamps],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exc,
                text_renderer,
                _mask_rendered,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(level, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

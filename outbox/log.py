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

# A run of 8 to 15 digits (optionally after '+') that is not part of a longer word
# (a UUID, a hex id, a longer number).
_PHONE = re.compile(r"(?<![0-9A-Za-z-])(\+?)(\d{8,15})(?![0-9A-Za-z-])")
_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_PHONE_BYTES = re.compile(rb"(?<![0-9A-Za-z-])(\+?)(\d{8,15})(?![0-9A-Za-z-])")


def _mask_match(match: re.Match[Any]) -> Any:
    sign, digits = match.group(1), match.group(2)
    keep = 4 if len(digits) >= 12 else 2  # never show more than half of a short number
    stars = ("*" if isinstance(digits, str) else b"*") * (len(digits) - 2 * keep)
    return sign + digits[:keep] + stars + digits[-keep:]


def mask_phone(text: str) -> str:
    """`5511999999999` → `5511*****9999`, `12345678` → `12****78`: only the ends stay."""
    return _PHONE.sub(_mask_match, text)


def _mask_rendered(_: Any, __: str, line: Any) -> Any:
    """The last processor: one pass over the whole rendered line, whatever field or
    traceback a number hides in (cheaper than visiting every value)."""
    if isinstance(line, bytes):
        # Fast path: most lines hold no run of 8 digits at all (callers mask the
        # numbers they know of when binding them), so look before running the regex.
        if line.translate(_DIGITS_TO_ZERO).find(b"00000000") < 0:
            return line
        return _PHONE_BYTES.sub(_mask_match, line)
    return _PHONE.sub(_mask_match, line)


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

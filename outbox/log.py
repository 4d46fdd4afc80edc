"""structlog set-up: JSON lines in production, readable in a terminal; phones masked."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import orjson
import structlog

from outbox.settings import Settings

# A run of 8 to 15 digits (optionally after '+') that is not part of a longer word
# (a UUID, a hex id, a longer number).
_PHONE = re.compile(r"(?<![0-9A-Za-z-])(\+?)(\d{8,15})(?![0-9A-Za-z-])")
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
        return _PHONE_BYTES.sub(_mask_match, line)
    return _PHONE.sub(_mask_match, line)


def _orjson_dumps(value: Any, **_: Any) -> bytes:
    return orjson.dumps(value, default=str)


def configure_logging(settings: Settings) -> None:
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    as_json = settings.log_format == "json" or (
        settings.log_format == "" and not sys.stderr.isatty()
    )
    exc: list[Any] = [structlog.processors.format_exc_info]
    stamps: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        # Logs are on the hot path (two lines per attempt): orjson straight to bytes.
        renderer: Any = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
        text_renderer: Any = structlog.processors.JSONRenderer()
    else:
        renderer = text_renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
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

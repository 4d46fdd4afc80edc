"""structlog set-up: JSON lines in production, readable in a terminal; phones masked."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from outbox.settings import Settings

# A run of 8 to 15 digits (optionally after '+') that is not part of a longer word
# (a UUID, a hex id, a longer number).
_PHONE = re.compile(r"(?<![0-9A-Za-z-])(\+?)(\d{8,15})(?![0-9A-Za-z-])")


def _mask_digits(match: re.Match[str]) -> str:
    digits = match.group(2)
    keep = 4 if len(digits) >= 12 else 2  # never show more than half of a short number
    return match.group(1) + digits[:keep] + "*" * (len(digits) - 2 * keep) + digits[-keep:]


def mask_phone(text: str) -> str:
    """`5511999999999` → `5511*****9999`, `12345678` → `12****78`: only the ends stay."""
    return _PHONE.sub(_mask_digits, text)


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_phone(value)
    if isinstance(value, dict):
        return {key: _mask_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_mask_value(item) for item in value)
    return value


def _mask_phones(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _mask_value(value)
    return event


def configure_logging(settings: Settings) -> None:
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    as_json = settings.log_format == "json" or (
        settings.log_format == "" and not sys.stderr.isatty()
    )
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    # Tracebacks are rendered to text before masking, so that they are masked too.
    tail: list[Any] = [structlog.processors.format_exc_info, _mask_phones, renderer]
    stamps: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamps, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (uvicorn, psycopg) go to the same
    # stream in the same format, masked like ours.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamps],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(level, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

"""Structured logging: JSON lines on stdout, with personal data kept out.

What identifies an event in the logs is its message_id, correlation_id and a prefix of its
conversation key (itself a SHA-256, so the phone number cannot be read back). Bodies are never
logged; error texts from Connect pass through `scrub` because they may echo input.
"""

import logging
import re
import sys
from typing import Any

import structlog

_PHONE_LIKE = re.compile(r"\+?\d[\d\s().-]{5,}\d")


def scrub(text: str, limit: int = 300) -> str:
    """Mask phone-number-like digit runs in free text and cut it to `limit` characters."""
    return _PHONE_LIKE.sub("<redacted>", text)[:limit]


def short_key(conversation: str | None) -> str | None:
    """Return the first 12 hex digits of a conversation key: enough to correlate, no more."""
    return conversation[:12] if conversation else None


def configure_logging(level: str = "INFO") -> None:
    """Render structlog events as one JSON object per line on stdout."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(**context: Any) -> Any:
    """Return a bound structlog logger."""
    return structlog.get_logger("connect-chat-worker").bind(**context)

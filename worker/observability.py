"""Structured logging: JSON lines on stdout, with personal data kept out.

What identifies an event in the logs is its message_id, correlation_id and a prefix of its
conversation key (itself a SHA-256, so the phone number cannot be read back). Bodies are never
logged; error texts from Connect pass through `scrub` because they may echo input. Secrets
are masked in every line by `worker.masking`.
"""

import logging
import re
import sys
from typing import Any

import structlog

from worker.masking import install_log_masking, mask_event

_PHONE_LIKE = re.compile(r"\+?\d[\d\s().-]{5,}\d")


def scrub(text: str, limit: int = 300) -> str:
    """Mask phone-number-like digit runs in free text and cut it to `limit` characters."""
    return _PHONE_LIKE.sub("<redacted>", text)[:limit]


def short_key(conversation: str | None) -> str | None:
    """Return the first 12 hex digits of a conversation key: enough to correlate, no more."""
    return conversation[:12] if conversation else None


def configure_logging(level: str = "INFO", console: bool | None = None) -> None:
    """Render every log line, ours and the libraries', as one JSON object on stdout.

    On a terminal (or with `console=True`) lines are rendered for people instead. Libraries
    (aio-pika, aiormq, botocore, asyncio) log through the standard library: their records go
    through the same renderer, at WARNING and above, so stdout stays one JSON object per line.
    Every line, ours and theirs, is masked (`worker.masking`): no password or AWS secret.
    """
    install_log_masking()
    if console is None:
        console = sys.stdout.isatty()
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            mask_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                mask_event,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelName(level)))


def get_logger(**context: Any) -> Any:
    """Return a bound structlog logger."""
    return structlog.get_logger("connect-chat-worker").bind(**context)

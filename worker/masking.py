"""Keep secrets out of every line: the one place that masks broker URLs and credentials.

Two rules, applied to whatever the worker prints or logs:

- every configured secret (the AMQP and Redis passwords, as written and URL-decoded, and the
  AWS secret key and session token when set in the environment) is replaced by `***`;
- the password of any `user:password@` in any text is replaced too, so that a URL is masked
  even when it is not ours, or does not parse (`amqp//guest:pw@host/`: a missing colon).

They hold by construction, not by care at each call site: `install_log_masking` installs a
log record factory, so every record of every library (aio-pika, aiormq, botocore, asyncio) is
masked as it is made, whichever handler later writes it; `mask_event` is a structlog processor
for the worker's own events; and the command line masks the one line it prints on failure.
Settings register their secrets when they are created (`WorkerSettings`).
"""

import logging
import re
import traceback
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import unquote

MASK = "***"
# A shorter secret is masked where it sits in a URL but not searched for in free text, where
# replacing it would mangle every line while hiding little.
MIN_FREE_TEXT_SECRET = 4

# `//user:password@`: the password runs to the last `@` of the word, since an unencoded `@`
# may sit in it. Then the same without `//` (`amqp:user:pw@host`), where the password may not
# start with `/` (that is the first form) and the pair must start a word.
_AFTER_SLASHES = re.compile(r"(?<=//)(?P<user>[^\s/:@'\"]*):(?P<password>[^\s'\"]+)@")
_BARE = re.compile(r"(?:^|(?<=[\s'\"(<\[=,]))(?P<user>[^\s/:@'\"]+):(?P<password>(?!/)[^\s'\"]+)@")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _password_span(url: str) -> tuple[int, int] | None:
    """Return where the password of a URL-like text is, whether or not the URL parses.

    The user information ends at the last `@` (a password may hold a raw `@`) and starts after
    `//`, else after a scheme, else at the start; the password follows its first `:`. A text
    with an `@` in its path or query and no password loses a little more than its password.
    """
    at = url.rfind("@")
    if at < 0:
        return None
    slashes = url.find("//", 0, at)
    if slashes >= 0:
        start = slashes + 2
    else:
        scheme = _SCHEME.match(url)
        start = scheme.end() if scheme and ":" in url[scheme.end() : at] else 0
    colon = url.find(":", start, at)
    if colon < 0 or colon + 1 == at:
        return None
    return colon + 1, at


def mask_url_password(url: str) -> str:
    """Replace the password of a URL with `***`, also in a URL that does not parse."""
    span = _password_span(url)
    return url if span is None else f"{url[: span[0]]}{MASK}{url[span[1] :]}"


def url_passwords(url: str) -> list[str]:
    """Return the password of a URL as written and as URL-decoded (none when it has none)."""
    span = _password_span(url)
    if span is None:
        return []
    written = url[span[0] : span[1]]
    return [written, unquote(written)]


def url_user(url: str) -> str | None:
    """Return the user name of a URL-like text, as `_password_span` finds it."""
    span = _password_span(url)
    if span is None:
        return None
    head = url[: span[0] - 1]
    slashes = head.find("//")
    if slashes >= 0:
        return head[slashes + 2 :]
    scheme = _SCHEME.match(head)
    return head[scheme.end() :] if scheme and ":" not in head[scheme.end() :] else head


def _keep_user(match: re.Match[str]) -> str:
    """Rebuild `user:***@` from a match of a userinfo pattern."""
    return f"{match['user']}:{MASK}@"


class SecretMasker:
    """Mask known secrets and any `user:password@` in a text."""

    def __init__(self) -> None:
        self._secrets: list[str] = []

    def remember(self, *secrets: str | None) -> None:
        """Add secrets to mask from now on (each also URL-decoded); empty ones are ignored."""
        known = set(self._secrets)
        for secret in secrets:
            for text in (secret, unquote(secret or "")):
                if text and len(text) >= MIN_FREE_TEXT_SECRET:
                    known.add(text)
        # Longest first, so that a secret holding another one is masked whole.
        self._secrets = sorted(known, key=len, reverse=True)

    def remember_url(self, url: str | None) -> None:
        """Add the password of a URL, unless it is the user name, which URLs show anyway."""
        if url:
            user = url_user(url)
            self.remember(*(p for p in url_passwords(url) if p != user and unquote(p) != user))

    def mask(self, text: str) -> str:
        """Return the text with every known secret and every URL password replaced."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if "@" in text:
            text = _BARE.sub(_keep_user, _AFTER_SLASHES.sub(_keep_user, text))
        return text

    def mask_value(self, value: Any) -> Any:
        """Mask a log value: a text, or the texts inside a list, tuple or dict."""
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, list | tuple):
            return type(value)(self.mask_value(item) for item in value)
        if isinstance(value, dict):
            return {key: self.mask_value(item) for key, item in value.items()}
        return value


MASKER = SecretMasker()


def mask(text: str) -> str:
    """Mask a text with the process's known secrets."""
    return MASKER.mask(text)


def remember_secrets(urls: Iterable[str | None], secrets: Iterable[str | None]) -> None:
    """Register the passwords of URLs and plain secrets with the process's masker."""
    for url in urls:
        MASKER.remember_url(url)
    MASKER.remember(*secrets)


def mask_event(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """Mask every text of a structlog event, exception text included (a processor)."""
    return {key: MASKER.mask_value(value) for key, value in event.items()}


def _mask_record(record: logging.LogRecord) -> None:
    """Replace a record's message (and exception text) by its masked rendering."""
    try:
        message = record.getMessage()
    except Exception:  # a library's bad format string: logging reports it when it is emitted
        return
    record.msg, record.args = mask(message), ()
    if record.exc_info and not record.exc_text:
        # Standard formatters use exc_text when set; structlog's formatter re-renders exc_info
        # and masks the result with `mask_event`.
        record.exc_text = mask("".join(traceback.format_exception(*record.exc_info)).rstrip())


_installed = False


def install_log_masking() -> None:
    """Mask every log record as it is made, whichever logger makes it (idempotent)."""
    global _installed
    if _installed:
        return
    make_record = logging.getLogRecordFactory()

    def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        _mask_record(record)
        return record

    logging.setLogRecordFactory(masked_record)
    _installed = True

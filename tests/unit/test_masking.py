"""The one place that masks secrets: URLs that parse or not, known secrets, every log line."""

import json
import logging
from collections.abc import Iterator

import pytest

from worker import masking
from worker.masking import SecretMasker, mask_url_password, url_passwords


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("amqps://u:p%40ss@host/vhost?heartbeat=30", "amqps://u:***@host/vhost?heartbeat=30"),
        ("amqp://u:p@ss@host/", "amqp://u:***@host/"),
        ("amqp://:only-password@host/", "amqp://:***@host/"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("amqp://host:5672/", "amqp://host:5672/"),
        ("amqp//guest:S3cretPW@127.0.0.1:5672/", "amqp//guest:***@127.0.0.1:5672/"),
        ("amqp:/guest:S3cretPW@host/", "amqp:/guest:***@host/"),
        ("amqp:guest:S3cretPW@host/", "amqp:guest:***@host/"),
        ("guest:S3cretPW@host:5672", "guest:***@host:5672"),
        ("amqp://guest:S3c/ret#P?W@host:5672/", "amqp://guest:***@host:5672/"),
        ("amqp://guest:S3cretPW@host:56x72/", "amqp://guest:***@host:56x72/"),
        ("redis://:S3cretPW@redis:6379/0", "redis://:***@redis:6379/0"),
    ],
    ids=[
        "default",
        "escaped-at",
        "raw-at",
        "no-user",
        "user-only",
        "no-userinfo",
        "missing-colon",
        "one-slash",
        "no-slashes",
        "no-scheme",
        "raw-reserved-characters",
        "bad-port",
        "redis",
    ],
)
def test_mask_url_password(url: str, masked: str) -> None:
    assert mask_url_password(url) == masked


def test_url_passwords_are_given_as_written_and_decoded() -> None:
    assert url_passwords("amqp://guest:p%40ss@host:5672/") == ["p%40ss", "p@ss"]
    assert url_passwords("amqp//guest:S3cretPW@host/") == ["S3cretPW", "S3cretPW"]
    assert url_passwords("amqp://host:5672/") == []


def test_known_secrets_are_masked_anywhere_raw_and_decoded() -> None:
    masker = SecretMasker()
    masker.remember_url("amqp://guest:p%40ssw0rd@host:5672/")
    masker.remember("wJalrXUtnFEMI/K7MDENG")

    text = masker.mask("login p%40ssw0rd failed, p@ssw0rd refused, key=wJalrXUtnFEMI/K7MDENG")

    assert text == "login *** failed, *** refused, key=***"


def test_any_userinfo_in_free_text_is_masked() -> None:
    masker = SecretMasker()

    assert masker.mask('Reconnect attempt failed "amqp//bob:hunter22@h:5672/"') == (
        'Reconnect attempt failed "amqp//bob:***@h:5672/"'
    )
    assert masker.mask("<URL 'amqps://bob:x@y@h/v'>") == "<URL 'amqps://bob:***@h/v'>"
    assert masker.mask("url=amqp:bob:hunter22@h") == "url=amqp:***@h"


def test_text_without_userinfo_is_unchanged() -> None:
    masker = SecretMasker()
    text = "message_id=abc@example.com at 12:30, amqp://guest:***@127.0.0.1:5672/"

    assert masker.mask(text) == text


def test_a_password_equal_to_the_user_name_leaves_the_user_name_readable() -> None:
    masker = SecretMasker()
    masker.remember_url("amqp://guest:guest@localhost:5672/")

    assert masker.mask("user guest, amqp://guest:guest@h/") == "user guest, amqp://guest:***@h/"


def test_short_secrets_are_not_searched_for_in_free_text() -> None:
    masker = SecretMasker()
    masker.remember_url("amqp://u:ab1@h/")

    assert masker.mask("tab1 amqp://u:ab1@h/") == "tab1 amqp://u:***@h/"


def test_log_values_inside_lists_and_dicts_are_masked() -> None:
    masker = SecretMasker()
    masker.remember("S3cretPW")

    value = masker.mask_value({"urls": ["S3cretPW", 5], "n": 1})

    assert value == {"urls": ["***", 5], "n": 1}


@pytest.fixture
def captured_log() -> Iterator[list[str]]:
    """Capture what a plain stdlib handler writes for the `test.masking` logger."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    logger = logging.getLogger("test.masking")
    handler = Collect()
    logger.addHandler(handler)
    logger.propagate = False
    yield lines
    logger.removeHandler(handler)


def test_every_library_log_record_is_masked_as_it_is_made(captured_log: list[str]) -> None:
    # Given the record factory, and a secret the settings registered
    masking.install_log_masking()
    masking.remember_secrets([], ["Kx9-secret-key"])
    logger = logging.getLogger("test.masking")

    # When a library logs the way aio-pika's reconnect loop does, and with an exception
    logger.error("Reconnect attempt failed %s: %s", "amqp//guest:S3cretPW@h:5672/", "boom")
    try:
        raise ValueError("key Kx9-secret-key rejected")
    except ValueError:
        logger.exception("failed")

    # Then neither the URL's password nor the known secret is written
    output = "\n".join(captured_log)
    assert "Reconnect attempt failed amqp//guest:***@h:5672/: boom" in output
    assert "S3cretPW" not in output and "Kx9-secret-key" not in output
    assert "ValueError: key *** rejected" in output


def test_structlog_events_are_masked() -> None:
    masking.remember_secrets(["amqp://guest:Ev3ntSecret@h/"], [])

    event = masking.mask_event(None, "info", {"event": "x", "error": "bad Ev3ntSecret"})

    assert json.dumps(event) == '{"event": "x", "error": "bad ***"}'

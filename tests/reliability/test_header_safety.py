"""Odd text in errors and fields must not break dead-letter headers or the JSON logs.

Connect's error messages may echo input: newlines, 10 KB of text, any script. The dead letter's
`x-error-message` keeps at most 1 KiB of valid UTF-8, and every log line stays one JSON object.
"""

import json
import signal
from typing import Any

import pytest

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, control, wait_until
from tests.reliability.ledger import Ledger, dead_letter_total, token_event
from worker.pipeline.envelope import REPLACED_HEADERS
from worker.testing.simulator import ConnectSimulator

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PHONE = "+15557654321"
ODD_MESSAGES = {
    "newlines": "first line\nsecond line\r\nthird\u2028fourth\u2029\x00\x1b[31mred\t" * 3,
    "long-ascii": "x" * 10_000,
    "long-snowmen": "\u2603" * 4000,  # 3 bytes each: 1 KiB falls inside a character
    "long-emoji": "\U0001f4a9" * 3000,  # 4 bytes each
    "mixed": f"Ungültige Anfrage für {PHONE}: «значение» \u202eevil\u202c 漢字\n" * 200,
}
ODD_CODES = {
    # Unmodelled codes dead-letter as UnknownError; HTTP headers carry no newline.
    "code-latin": ("Ungültig\u00e9Exception", 400),
    "code-symbols": ('Weird <Code> "quoted" ;,/\\', 418),
}


async def test_odd_error_text_keeps_headers_bounded_and_logs_json(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given Connect answering odd error texts and codes for some destinations
    for name, message in ODD_MESSAGES.items():
        rule: dict[str, Any] = {"match": {"DestinationId": name}, "code": "InvalidRequestException"}
        await control(simulator, "rules", rule | {"message": message})
    for name, (code, status) in ODD_CODES.items():
        rule = {"match": {"DestinationId": name}, "code": code, "status": status}
        await control(simulator, "rules", rule | {"message": ODD_MESSAGES["mixed"]})
    ledger = Ledger()
    for index, destination in enumerate([*ODD_MESSAGES, *ODD_CODES]):
        await ledger.publish(broker, token_event(destination, index, destination), destination)
    # and malformed bodies with odd field names and values (none may be echoed in headers)
    odd_fields: list[dict[str, Any]] = [
        {"SourceId": PHONE + "\n" * 300, "DestinationId": "d", "Event": {"Type": "DISCONNECT"}},
        {"Ключ\n\u2603": PHONE, "SourceId": "s", "DestinationId": "d"},
        {"SourceId": "s", "DestinationId": "d", "Event": {"Type": "\u2603\n" * 2000}},
    ]
    for index, body in enumerate(odd_fields):
        message_id = f"odd-field-{index}"
        raw = json.dumps(body, ensure_ascii=False).encode()
        await ledger.publish(broker, raw, message_id, routing_key=f"odd-{index}")

    # When the worker has dead-lettered all of them
    worker = await start_worker()
    total = len(ledger.published)
    await wait_until(lambda: _at_least(broker, total), timeout=30, every=0.25)
    await ledger.collect_dead_letters(broker)
    tally = ledger.tally(simulator)
    print(f"\nodd texts: {tally.summary()}")
    assert tally.lost == []

    # Then each dead letter's headers are strings, valid UTF-8, the message cut to 1 KiB
    letters = {
        letter.message_id: letter for group in ledger.dead_letters.values() for letter in group
    }
    assert set(letters) == set(ledger.published)
    for name, message in ODD_MESSAGES.items():
        error_message = header_text(letters[name].headers, "x-error-message")
        size = len(error_message.encode())
        assert message.startswith(error_message), name
        assert size == len(message.encode()) if len(message.encode()) <= 1024 else size >= 1021
        assert size <= 1024, name
        assert letters[name].headers["x-error-variant"] == "InvalidRequestException"
    for name, (code, _) in ODD_CODES.items():
        headers = letters[name].headers
        assert headers["x-error-variant"] == "UnknownError", name
        assert header_text(headers, "x-error-code") == code, name
        assert len(header_text(headers, "x-error-message").encode()) <= 1024
    for index in range(len(odd_fields)):
        headers = letters[f"odd-field-{index}"].headers
        assert headers["x-error-variant"] == "MalformedEvent"
        validation_errors = header_text(headers, "x-validation-errors")
        json.loads(validation_errors)
        assert PHONE not in validation_errors and "Ключ" not in validation_errors
    # (x-delivery-count is the dead-letter queue's own, added as it hands the letter to us)
    worker_headers = REPLACED_HEADERS - {"x-delivery-count"}
    for letter in letters.values():
        for name in worker_headers & set(letter.headers):
            value = letter.headers[name]
            assert isinstance(value, str), (letter.message_id, name, type(value))

    # And the worker's output is one JSON object per line, without the phone number
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0
    output = worker.log_path.read_bytes().decode("utf-8")  # strict: valid UTF-8
    lines = output.rstrip("\n").split("\n")  # newline-delimited, whatever else the text holds
    events = [json.loads(line) for line in lines]
    assert all(isinstance(event, dict) for event in events)
    dead_lettered = [event for event in events if event.get("event") == "event.dead_lettered"]
    assert len(dead_lettered) == total
    assert PHONE not in output


def header_text(headers: Any, name: str) -> str:
    """Return a header that must be a string (AMQP decodes non-UTF-8 long strings as bytes)."""
    value = headers[name]
    assert isinstance(value, str), f"{name} is {type(value).__name__}, not valid UTF-8 text"
    return value


async def _at_least(broker: Broker, total: int) -> bool:
    return await dead_letter_total(broker) >= total

"""Hostile producers: a property or header that is not UTF-8 never stalls a conversation.

Any client library that takes bytes can put them in a short string (content_type, message_id,
...), a header name or a header value. pamqp alone cannot decode such a property: the
connection closed on it, the broker redelivered it first, and everything behind it waited
forever. The test process publishes such bytes through the same lenient codec as the worker
(a string decoded with surrogateescape goes out as the original bytes).
"""

import signal

import pytest

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, metric, readiness, run_dlq, wait_until
from tests.reliability.ledger import Ledger, quiescent, token_event
from worker.amqp_compat import text_from_wire, text_to_wire
from worker.models import conversation_key
from worker.testing.simulator import ConnectSimulator

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

NOT_UTF8 = b"\xff\xfe bad \xc3"
ODD_TEXT = text_from_wire(NOT_UTF8)
TEXT_PROPERTIES = [
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "type",
    "app_id",
]
CONVERSATION = 7
KEY = conversation_key({"SourceId": f"+1555{CONVERSATION:07d}", "DestinationId": "agent"})


def odd_cases() -> list[tuple[str, dict[str, object]]]:
    """Return (token, properties, message_id) for each place a producer can put odd bytes."""
    cases: list[tuple[str, dict[str, object]]] = [
        (f"odd-{name}", {name: ODD_TEXT}) for name in TEXT_PROPERTIES
    ]
    cases.append(("odd-header-name", {"headers": {ODD_TEXT: "v"}}))
    cases.append(("odd-header-value", {"headers": {"trace": ODD_TEXT}}))
    cases.append(("odd-message-id", {"message_id": f"odd-message-id-{ODD_TEXT}"}))
    return cases


async def redriven_dead_letter(broker: Broker) -> bool:
    """Return True once the redriven event is back in its dead-letter queue, and nothing waits."""
    return await broker.dead_letter_count("MalformedEvent") == 1 and not await broker.work_count()


async def test_odd_bytes_in_every_property_leave_the_conversation_in_order(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given one conversation: valid events, each odd-property event (valid itself) between two
    # of them, and a malformed body with odd bytes in every text property
    ledger = Ledger()
    order: list[str] = []
    for index, (odd, props) in enumerate(odd_cases()):
        for token, extra in ((f"before-{index}", {}), (odd, props)):
            order.append(token)
            message_id = str(extra.pop("message_id", token))
            await ledger.publish(broker, token_event(token, CONVERSATION), message_id, KEY, **extra)
    everything = {name: ODD_TEXT for name in TEXT_PROPERTIES}
    await ledger.publish(broker, b"\xffnot json", "odd-malformed", KEY, **everything)
    order.append("last")
    await ledger.publish(broker, token_event("last", CONVERSATION), "last", KEY)

    # When one worker consumes them
    worker = await start_worker()
    port = worker.port
    await wait_until(lambda: quiescent(broker, port), timeout=30, every=0.25)

    # Then every valid event reached Connect once, in publish order, and nothing is left
    arrived = [call["body"]["Event"]["Content"] for call in simulator.received]
    assert arrived == order
    assert await broker.work_count() == 0
    # And the malformed one is a dead letter that an operator can read and redrive, whose
    # properties are still the producer's bytes when it is dead-lettered again
    code, shown, _ = await run_dlq(broker.base, "show")
    assert code == 0 and "odd-malformed" in shown
    assert (await run_dlq(broker.base, "redrive", "--variant", "MalformedEvent"))[0] == 0
    await wait_until(lambda: redriven_dead_letter(broker), timeout=15, every=0.25)
    [letter] = await broker.take_dead_letters("MalformedEvent")
    assert letter.body == b"\xffnot json"
    assert (letter.headers or {})["x-redrive-count"] == "1"
    for name in TEXT_PROPERTIES:
        assert text_to_wire(getattr(letter, name)) == NOT_UTF8, name
    # And the worker never lost its connection, and stops cleanly
    assert await readiness(port) == 200
    assert await metric(port, "chat_worker_delivered_total") == len(order)
    assert not [line for line in worker.log_lines() if "unmarshal" in line or "Unexpected" in line]
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0

"""Drive the Connect simulator with the real aiobotocore client over HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError, ReadTimeoutError

from tests.integration.support import wait_until
from worker.testing.simulator import ConnectSimulator, SimulatorConfig, parse_error_rates, serve

Client = Any  # aiobotocore clients are generated at runtime and carry no static type

# One session for the module: it caches the large connect service model between clients.
_SESSION = get_session()


async def _make_client(url: str, **config: Any) -> Any:
    """Open a connect client with one attempt, so every simulated error reaches the test."""
    return _SESSION.create_client(
        "connect",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=AioConfig(retries={"total_max_attempts": 1, "mode": "standard"}, **config),
    )


@pytest.fixture
async def client(simulator: ConnectSimulator) -> AsyncIterator[Client]:
    async with await _make_client(simulator.url) as connect:
        yield connect


async def _send(
    client: Client, destination: str = "dest-1", event_type: str = "MESSAGE", text: str = "hi"
) -> dict[str, Any]:
    event = {"Type": event_type, "ContentType": "text/plain", "Content": text}
    if event_type == "DISCONNECT":
        event = {"Type": "DISCONNECT"}
    result: dict[str, Any] = await client.send_chat_integration_event(
        SourceId="+15550001", DestinationId=destination, Subtype="connect:SMS", Event=event
    )
    return result


async def _control(simulator: ConnectSimulator, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, simulator.url + path, json=body) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


async def _outcomes(client: Client, count: int) -> list[str]:
    """Send `count` concurrent calls and return each outcome: "ok" or the error code."""

    async def one(index: int) -> str:
        try:
            await _send(client, text=f"m{index}")
        except ClientError as exc:
            return str(exc.response["Error"]["Code"])
        return "ok"

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_new_chat_created_until_disconnect(
    simulator: ConnectSimulator, client: Client
) -> None:
    first = await _send(client)
    second = await _send(client)
    goodbye = await _send(client, event_type="DISCONNECT")
    again = await _send(client)

    assert first["NewChatCreated"] is True
    assert second["NewChatCreated"] is False
    assert second["InitialContactId"] == first["InitialContactId"]
    assert goodbye["InitialContactId"] == first["InitialContactId"]
    assert again["NewChatCreated"] is True
    assert again["InitialContactId"] != first["InitialContactId"]
    assert first["ResponseMetadata"]["RequestId"] == simulator.received[0]["request_id"]


async def test_received_records_calls_in_arrival_order(
    simulator: ConnectSimulator, client: Client
) -> None:
    for text in ("one", "two", "three"):
        await _send(client, text=text)

    received = (await _control(simulator, "GET", "/_sim/received"))["received"]

    assert [r["body"]["Event"]["Content"] for r in received] == ["one", "two", "three"]
    assert [r["seq"] for r in received] == [1, 2, 3]
    assert received[0]["conversation"] == ["+15550001", "dest-1", "connect:SMS"]
    assert received[0]["status"] == 200 and received[0]["code"] is None


@pytest.mark.parametrize(
    ("destination", "code", "status"),
    [
        ("simulate:InvalidRequestException", "InvalidRequestException", 400),
        ("simulate:AccessDeniedException", "AccessDeniedException", 403),
        ("simulate:ResourceNotFoundException", "ResourceNotFoundException", 404),
        ("simulate:ThrottlingException", "ThrottlingException", 429),
        ("simulate:InternalServiceException", "InternalServiceException", 500),
        ("simulate:SomethingWeirdException", "SomethingWeirdException", 400),
        ("simulate:SomethingWeirdException:418", "SomethingWeirdException", 418),
    ],
)
async def test_in_band_trigger_yields_client_error(
    simulator: ConnectSimulator, client: Client, destination: str, code: str, status: int
) -> None:
    with pytest.raises(ClientError) as caught:
        await _send(client, destination=destination)

    response = caught.value.response
    assert response["Error"]["Code"] == code
    assert response["Error"]["Message"] == f"Simulated {code}"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert response["ResponseMetadata"]["RequestId"] == simulator.calls[-1]["request_id"]
    assert simulator.calls[-1]["code"] == code and simulator.received == []


async def test_invalid_request_reason_is_a_structure(client: Client) -> None:
    with pytest.raises(ClientError) as caught:
        await _send(client, destination="simulate:InvalidRequestException")

    # botocore merges the modelled error members into the top level of the response dict.
    assert caught.value.response["Reason"] == {
        "AttachedFileInvalidRequestExceptionReason": "INVALID_FILE_SIZE"
    }


async def test_missing_required_field_is_invalid_request(simulator: ConnectSimulator) -> None:
    async with await _make_client(simulator.url, parameter_validation=False) as connect:
        with pytest.raises(ClientError) as caught:
            await connect.send_chat_integration_event(SourceId="+15550001", Event={})

    assert caught.value.response["Error"]["Code"] == "InvalidRequestException"
    assert "DestinationId, Event.Type" in caught.value.response["Error"]["Message"]


@pytest.mark.parametrize(
    "attributes",
    [{"bad key": "v"}, {"tier.1": "v"}, {"kk": "a" * 32767}, {"a": "é" * 16384}],
)
async def test_attributes_against_the_documented_rules_are_invalid_request(
    client: Client, attributes: dict[str, str]
) -> None:
    with pytest.raises(ClientError) as caught:
        await client.send_chat_integration_event(
            SourceId="+15550001",
            DestinationId="dest-1",
            Event={"Type": "DISCONNECT"},
            NewSessionDetails={"Attributes": attributes},
        )

    assert caught.value.response["Error"]["Code"] == "InvalidRequestException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


async def test_attributes_of_exactly_32768_bytes_with_dash_and_underscore_keys_pass(
    client: Client,
) -> None:
    attributes = {"tier_1-x": "a" * (32768 - 8)}

    result = await client.send_chat_integration_event(
        SourceId="+15550001",
        DestinationId="dest-1",
        Event={"Type": "DISCONNECT"},
        NewSessionDetails={"Attributes": attributes},
    )

    assert result["ResponseMetadata"]["HTTPStatusCode"] == 200


# What the simulator checks of a signature: its form only.
_SIGNED = {
    "Authorization": "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/connect/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
    "X-Amz-Date": "20260101T000000Z",
}


async def test_odd_answers_replace_the_200_body_and_can_drop_the_request_id(
    simulator: ConnectSimulator,
) -> None:
    await _control(simulator, "POST", "/_sim/answers", {"body": "[1,2,3]", "times": 1})
    await _control(simulator, "POST", "/_sim/answers", {"request_id": False, "times": 1})
    event = {"SourceId": "s", "DestinationId": "d", "Event": {"Type": "DISCONNECT"}}
    answers = []
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            url = simulator.url + "/chat-integration-event"
            async with http.post(url, json=event, headers=_SIGNED) as response:
                answers.append((response.status, await response.text(), response.headers))

    assert [(status, text) for status, text, _ in answers[:1]] == [(200, "[1,2,3]")]
    assert "x-amzn-RequestId" in answers[0][2]
    assert answers[1][0] == 200
    assert "x-amzn-RequestId" not in answers[1][2]
    assert "x-amzn-RequestId" in answers[2][2]  # used up: the usual answer again
    assert '"NewChatCreated"' in answers[2][1]
    assert len(simulator.received) == 3  # all three were accepted


async def test_unsigned_request_is_refused(simulator: ConnectSimulator) -> None:
    body = {"SourceId": "s", "DestinationId": "d", "Event": {"Type": "EVENT"}}
    async with (
        aiohttp.ClientSession() as http,
        http.post(simulator.url + "/chat-integration-event", json=body) as response,
    ):
        payload = await response.json()

    assert response.status == 403
    assert response.headers["x-amzn-ErrorType"].startswith("MissingAuthenticationTokenException:")
    assert payload["message"]
    assert simulator.calls[0]["status"] == 403 and simulator.received == []


async def test_token_bucket_throttles_a_burst(simulator: ConnectSimulator, client: Client) -> None:
    # Given a quota of 5/s with a burst of 2
    await _control(simulator, "POST", "/_sim/config", {"rate": 5, "burst": 2})

    # When 10 calls arrive at once
    started = time.monotonic()
    outcomes = await _outcomes(client, 10)
    elapsed = time.monotonic() - started

    # Then the burst gets through (plus what refilled meanwhile), the rest is throttled
    ok = outcomes.count("ok")
    assert 2 <= ok <= 2 + int(5 * elapsed)
    assert outcomes.count("ThrottlingException") == 10 - ok
    stats = await _control(simulator, "GET", "/_sim/stats")
    assert stats == {
        "arrived": 10,
        "calls": 10,
        "received": ok,
        "by_outcome": {"ok": ok, "ThrottlingException": 10 - ok},
    }

    # And the bucket refills at the configured rate
    await asyncio.sleep(0.25)
    assert (await _send(client))["NewChatCreated"] in (True, False)


async def test_rule_fails_matching_calls_the_given_number_of_times(
    simulator: ConnectSimulator, client: Client
) -> None:
    rule = {"match": {"DestinationId": "flaky"}, "code": "InternalServiceException", "times": 2}
    await _control(simulator, "POST", "/_sim/rules", rule)

    for _ in range(2):
        with pytest.raises(ClientError) as caught:
            await _send(client, destination="flaky")
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    await _send(client, destination="other")
    await _send(client, destination="flaky")

    assert [c["code"] for c in simulator.calls] == [
        "InternalServiceException",
        "InternalServiceException",
        None,
        None,
    ]


async def test_rule_without_times_fires_until_cleared(
    simulator: ConnectSimulator, client: Client
) -> None:
    await _control(
        simulator,
        "POST",
        "/_sim/rules",
        {"match": {}, "code": "AccessDeniedException", "status": 403},
    )
    for _ in range(3):
        with pytest.raises(ClientError):
            await _send(client)

    await _control(simulator, "DELETE", "/_sim/rules")

    assert (await _send(client))["NewChatCreated"] is True


async def test_outage_fails_every_call_then_recovers(
    simulator: ConnectSimulator, client: Client
) -> None:
    await _control(simulator, "POST", "/_sim/outage", {"seconds": 0.2})

    with pytest.raises(ClientError) as caught:
        await _send(client)
    assert caught.value.response["Error"]["Code"] == "InternalServiceException"

    await asyncio.sleep(0.25)
    assert (await _send(client))["NewChatCreated"] is True


async def test_an_outage_after_accepted_calls_starts_mid_stream_with_its_code(
    simulator: ConnectSimulator, client: Client
) -> None:
    # Given an outage of credentials that starts once two calls have been accepted
    spec = {"seconds": 0.3, "code": "ExpiredTokenException", "status": 400, "after_accepted": 2}
    await _control(simulator, "POST", "/_sim/outage", spec)

    # When calls are made, then the first two are accepted, the next refused with the code
    for _ in range(2):
        assert (await _send(client))["NewChatCreated"] in (True, False)
    with pytest.raises(ClientError) as caught:
        await _send(client)
    error = caught.value.response
    assert (error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]) == (
        "ExpiredTokenException",
        400,
    )

    # And once its seconds have passed, calls are accepted again
    await asyncio.sleep(0.35)
    await _send(client)
    assert len(simulator.received) == 3


async def test_stall_outage_times_out_the_client_but_still_delivers(
    simulator: ConnectSimulator,
) -> None:
    # Given calls that stall longer than the client's read timeout
    await _control(simulator, "POST", "/_sim/outage", {"seconds": 1, "stall": 0.3})

    # When the client gives up waiting
    async with await _make_client(simulator.url, read_timeout=0.1) as connect:
        with pytest.raises(ReadTimeoutError):
            await _send(connect)

    # Then Connect still processed the event: a retry would deliver it twice
    await wait_until(lambda: len(simulator.received) == 1, timeout=1)


async def test_a_call_counts_as_arrived_before_it_is_answered(
    simulator: ConnectSimulator, client: Client
) -> None:
    # Given a Connect that stalls its answers for half a second
    await _control(simulator, "POST", "/_sim/outage", {"seconds": 30, "stall": 0.5})

    # When a call is on its way
    call = asyncio.create_task(_send(client))

    # Then it counts as arrived at once, while it has no answer yet
    await wait_until(lambda: simulator.arrived == 1, timeout=5)
    stats = await _control(simulator, "GET", "/_sim/stats")
    assert (stats["arrived"], stats["calls"]) == (1, 0)

    # And once answered it counts as a call too; a reset starts both counts again
    await call
    assert (simulator.arrived, len(simulator.calls)) == (1, 1)
    await _control(simulator, "POST", "/_sim/reset")
    assert (simulator.arrived, simulator.calls) == (0, [])


async def test_latency_delays_answers(simulator: ConnectSimulator, client: Client) -> None:
    await _control(simulator, "POST", "/_sim/config", {"latency_ms": 60, "latency_jitter_ms": 10})
    loop = asyncio.get_running_loop()

    started = loop.time()
    await _send(client)

    assert loop.time() - started >= 0.06


async def test_random_error_rates_are_seeded(simulator: ConnectSimulator, client: Client) -> None:
    await _control(simulator, "POST", "/_sim/config", {"error_rates": {"ThrottlingException": 0.5}})

    outcomes = await _outcomes(client, 20)

    assert set(outcomes) == {"ok", "ThrottlingException"}
    stats = await _control(simulator, "GET", "/_sim/stats")
    assert stats["received"] == outcomes.count("ok")


async def test_reset_forgets_everything(simulator: ConnectSimulator, client: Client) -> None:
    await _send(client)
    await _control(simulator, "POST", "/_sim/outage", {"seconds": 30})

    await _control(simulator, "POST", "/_sim/reset")

    assert await _control(simulator, "GET", "/_sim/calls") == {"calls": []}
    assert (await _send(client))["NewChatCreated"] is True


async def test_bad_control_input_is_a_400(simulator: ConnectSimulator) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(simulator.url + "/_sim/config", json={"error_rates": {"X": 2}}) as response,
    ):
        assert response.status == 400
        assert "must be in [0, 1]" in (await response.json())["message"]


def test_parse_error_rates() -> None:
    assert parse_error_rates(["ThrottlingException=0.1", "InternalServiceException=0.05"]) == {
        "ThrottlingException": 0.1,
        "InternalServiceException": 0.05,
    }
    for bad in (["Throttling"], ["=0.1"], ["X=lots"], ["X=1.5"], ["X=0.6", "Y=0.6"]):
        with pytest.raises(ValueError):
            parse_error_rates(bad)


async def test_serve_runs_until_cancelled() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task = asyncio.create_task(serve(SimulatorConfig(), "127.0.0.1", port))
    await wait_until(lambda: _listening(port), timeout=5)

    async with await _make_client(f"http://127.0.0.1:{port}") as connect:
        assert (await _send(connect))["NewChatCreated"] is True

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _listening(port: int) -> bool:
    """Return True once something accepts TCP connections on the port."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True

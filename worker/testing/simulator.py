"""Simulate Amazon Connect's SendChatIntegrationEvent over real HTTP.

The server speaks the rest-json wire protocol that botocore's connect model expects, so aiobotocore
talks to it unchanged through ``endpoint_url`` or ``AWS_ENDPOINT_URL_CONNECT``. Quota, latency,
errors and outages are injected on the server side: the client under test runs its real code path.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import json
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

Json = dict[str, Any]

ERROR_STATUS: dict[str, int] = {
    "InvalidRequestException": 400,
    "AccessDeniedException": 403,
    "ResourceNotFoundException": 404,
    "ThrottlingException": 429,
    "InternalServiceException": 500,
}
"""HTTP status of each error the connect model declares; any other code defaults to 400."""

_ERROR_TYPE_SUFFIX = ":http://internal.amazon.com/coral/com.amazonaws.connect/"
_INVALID = "InvalidRequestException"
# The model declares Reason as a union structure; a plain string makes botocore's parser crash.
_INVALID_REASON = {"AttachedFileInvalidRequestExceptionReason": "INVALID_FILE_SIZE"}
_EVENT_TYPES = frozenset({"DISCONNECT", "MESSAGE", "EVENT"})
_SIGV4 = re.compile(
    r"AWS4-HMAC-SHA256 Credential=[^/\s]+/\d{8}/[a-z0-9-]+/connect/aws4_request, "
    r"SignedHeaders=[a-z0-9;-]+, Signature=[0-9a-f]{64}"
)
# Connect's documented Attributes rules (NewSessionDetails.Attributes in the model's docs).
_ATTRIBUTE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ATTRIBUTES_MAX_BYTES = 32768
_TUNABLE = frozenset({"rate", "burst", "latency_ms", "latency_jitter_ms", "error_rates"})


CONTROL_API_HELP = """\
Point the worker at it with AWS_ENDPOINT_URL_CONNECT=http://HOST:PORT (any AWS credentials and
Region: calls must be SigV4-signed, the signature is not checked).

Faults on demand:
  DestinationId "simulate:CODE" or "simulate:CODE:STATUS" in an event makes that call fail
  with CODE (e.g. simulate:ThrottlingException, simulate:SomeNewError:400).

Control API (JSON over HTTP, under /_sim/):
  GET    /_sim/stats     {"arrived", "calls", "received", "by_outcome": {"ok": n, CODE: n}}:
                         calls that arrived (counted before any latency or stall),
                         were answered, were accepted
  GET    /_sim/received  the accepted calls, in arrival order, with their bodies
  GET    /_sim/calls     every call, accepted or not, with its status and code
  POST   /_sim/config    change rate, burst, latency_ms, latency_jitter_ms or error_rates
                         live, e.g. {"rate": 5, "burst": 2}; {"rate": null} lifts the quota
  POST   /_sim/outage    fail every call for a while: {"seconds": 10, "code":
                         "InternalServiceException", "status": 500}; or delay each answer
                         (a hung Connect): {"seconds": 60, "stall": 30} answers calls that
                         arrive in the next 60 s after 30 s. With "after_accepted": N, the
                         outage starts mid-stream, once N calls in all have been accepted
                         (since the start or the last reset), e.g. credentials revoked:
                         {"seconds": 15, "code": "ExpiredTokenException", "status": 400,
                         "after_accepted": 200}
  POST   /_sim/rules     fail matching calls: {"match": {"SourceId": "+1555..."}, "code":
                         "ThrottlingException", "times": 2} (omit times: always)
  DELETE /_sim/rules     remove every rule
  POST   /_sim/answers   accept matching calls with an odd 200 answer (a proxy or a wrong
                         endpoint): {"match": {...}, "body": "[1,2,3]", "times": 2}; the
                         body is sent as raw text ("null", "\"ok\"", "<html>"...; omit it
                         for the usual one); "request_id": false leaves out x-amzn-RequestId
  DELETE /_sim/answers   remove every odd answer
  POST   /_sim/reset     forget calls, rules, outage and open chats; refill the quota

Example: curl -X POST localhost:4566/_sim/outage -d '{"seconds": 10}'
"""
"""What `chat-worker simulate --help` prints after the flags; the routes are in `make_app`."""


@dataclass
class SimulatorConfig:
    """Hold the simulated quota, latency and random error rates; validate them on creation."""

    rate: float | None = None
    burst: int = 10
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rates: dict[str, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        """Reject values that would make the simulator misbehave silently."""
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive or None, got {self.rate}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ValueError("latency_ms and latency_jitter_ms must not be negative")
        _check_error_rates(self.error_rates)


@dataclass
class _Fault:
    """Say how one call fails: the error code, its HTTP status and message."""

    code: str
    status: int
    message: str


def _fault(code: str, status: int | None = None, message: str | None = None) -> _Fault:
    """Build a fault, taking the status from the model unless one is given."""
    return _Fault(code, status or ERROR_STATUS.get(code, 400), message or f"Simulated {code}")


@dataclass
class _Rule:
    """Fail calls whose top-level fields equal `match`, `times` times (None: forever)."""

    match: Json
    fault: _Fault
    times: int | None


@dataclass
class _OddAnswer:
    """Accept calls whose top-level fields equal `match` with this 200 answer, `times` times."""

    match: Json
    body: str | None
    request_id: bool
    times: int | None


@dataclass
class _Outage:
    """Fail (or stall) every call for `seconds`, from once `after_accepted` were accepted."""

    seconds: float
    fault: _Fault | None
    stall: float
    after_accepted: int = 0
    until: float | None = None


class _TokenBucket:
    """Refill continuously at config.rate up to config.burst, reading the config live."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        self.refill()

    def refill(self) -> None:
        """Fill the bucket to capacity."""
        self._tokens = float(self._config.burst)
        self._stamp = time.monotonic()

    def take(self) -> bool:
        """Take one token if there is one; always succeed when no rate is set."""
        rate = self._config.rate
        if rate is None:
            return True
        now = time.monotonic()
        capacity = float(self._config.burst)
        self._tokens = min(capacity, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class ConnectSimulator:
    """Serve SendChatIntegrationEvent plus a JSON control API under /_sim/."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.received: list[Json] = []
        self.calls: list[Json] = []
        self._rng = random.Random(self.config.seed)
        self._bucket = _TokenBucket(self.config)
        self._rules: list[_Rule] = []
        self._odd_answers: list[_OddAnswer] = []
        self._outage: _Outage | None = None
        self._open_chats: dict[tuple[Any, ...], str] = {}
        self._seq = 0
        self._arrived = 0
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Return the base URL to pass as endpoint_url."""
        if self._url is None:
            raise RuntimeError("simulator is not started")
        return self._url

    @property
    def arrived(self) -> int:
        """Return how many calls have arrived since the start or the last reset.

        A call counts the moment it arrives, before its latency, stall or outage: a test can
        wait for a call to be on its way instead of sleeping, and `arrived - len(calls)` is the
        number of calls still waiting for their answer.
        """
        return self._arrived

    def make_app(self) -> web.Application:
        """Build the aiohttp application with the Connect route and the control API.

        Keep `CONTROL_API_HELP` in step with the routes.
        """
        app = web.Application(middlewares=[_control_errors_as_400])
        app.router.add_post("/chat-integration-event", self._handle_event)
        app.router.add_get("/_sim/received", self._get_received)
        app.router.add_get("/_sim/calls", self._get_calls)
        app.router.add_get("/_sim/stats", self._get_stats)
        app.router.add_post("/_sim/reset", self._reset)
        app.router.add_post("/_sim/config", self._update_config)
        app.router.add_post("/_sim/rules", self._add_rule)
        app.router.add_delete("/_sim/rules", self._clear_rules)
        app.router.add_post("/_sim/answers", self._add_odd_answer)
        app.router.add_delete("/_sim/answers", self._clear_odd_answers)
        app.router.add_post("/_sim/outage", self._start_outage)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("simulator is already started")
        # A short shutdown timeout: a stalled handler must not hold up stop() for a minute.
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_port = self._runner.addresses[0][1]
        self._url = f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        """Stop listening; safe to call twice."""
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._url = None

    # --- SendChatIntegrationEvent -------------------------------------------------------------

    async def _handle_event(self, request: web.Request) -> web.Response:
        """Answer one call: admit it, inject faults, wait, reply and record the outcome."""
        self._seq += 1
        self._arrived += 1
        call: Json = {"seq": self._seq, "at": time.time(), "request_id": str(uuid.uuid4())}
        parsed = _parse_object(await request.read())
        body = parsed or {}
        call.update(body=parsed, conversation=list(_conversation(body)))
        # Auth and quota are decided on arrival, before any latency, as the real front door does.
        fault = self._refuse_on_arrival(request)
        if fault is None:
            fault = _validate(parsed) or self._injected_fault(body)
            await asyncio.sleep(self._delay())
        if fault is None:
            response = _json(200, self._open_or_close_chat(body), call["request_id"])
            self._make_odd(response, body)
        else:
            response = _error_response(fault, call["request_id"])
        call.update(status=response.status, code=fault.code if fault else None)
        self._record(call)
        return response

    def _refuse_on_arrival(self, request: web.Request) -> _Fault | None:
        """Reject unsigned calls with 403 and calls that find the token bucket empty with 429."""
        authorization = request.headers.get("Authorization", "")
        if not _SIGV4.fullmatch(authorization) or "X-Amz-Date" not in request.headers:
            return _fault(
                "MissingAuthenticationTokenException", 403, "Missing authentication token"
            )
        if not self._bucket.take():
            return _fault("ThrottlingException", message="Rate exceeded")
        return None

    def _injected_fault(self, body: Json) -> _Fault | None:
        """Pick the fault for a valid call: in-band trigger, outage, rule, then random error."""
        return (
            _in_band_fault(body.get("DestinationId"))
            or (outage.fault if (outage := self._active_outage()) else None)
            or self._rule_fault(body)
            or self._random_fault()
        )

    def _active_outage(self) -> _Outage | None:
        """Return the running outage, starting it when its time comes, ending it after."""
        outage = self._outage
        if outage is None or len(self.received) < outage.after_accepted:
            return None
        now = time.monotonic()
        if outage.until is None:
            outage.until = now + outage.seconds
        if now >= outage.until:
            self._outage = None
        return self._outage

    def _rule_fault(self, body: Json) -> _Fault | None:
        """Fire the first rule matching the call, dropping it once its count is used up."""
        rule = _take_match(self._rules, body)
        return rule.fault if rule else None

    def _make_odd(self, response: web.Response, body: Json) -> None:
        """Turn an accepted call's answer into the first matching odd answer, if any."""
        odd = _take_match(self._odd_answers, body)
        if odd is None:
            return
        if odd.body is not None:
            response.text = odd.body
        if not odd.request_id:
            del response.headers["x-amzn-RequestId"]

    def _random_fault(self) -> _Fault | None:
        """Draw once so each code fires with exactly its configured probability."""
        if not self.config.error_rates:
            return None
        draw = self._rng.random()
        for code, probability in self.config.error_rates.items():
            if draw < probability:
                return _fault(code)
            draw -= probability
        return None

    def _delay(self) -> float:
        """Return seconds to wait before answering: latency, jitter and any outage stall."""
        jitter_ms = self.config.latency_jitter_ms
        jitter = self._rng.uniform(0, jitter_ms) if jitter_ms else 0.0
        outage = self._active_outage()
        return (self.config.latency_ms + jitter) / 1000 + (outage.stall if outage else 0.0)

    def _open_or_close_chat(self, body: Json) -> Json:
        """Track open chats per conversation and build the success body."""
        key = _conversation(body)
        contact_id = self._open_chats.get(key)
        is_disconnect = body["Event"]["Type"] == "DISCONNECT"
        created = contact_id is None and not is_disconnect
        if created:
            contact_id = self._open_chats[key] = str(uuid.uuid4())
        if is_disconnect:
            self._open_chats.pop(key, None)
        result: Json = {"NewChatCreated": created}
        # A DISCONNECT with no open chat has no contact: the model allows the id to be absent.
        if contact_id is not None:
            result["InitialContactId"] = contact_id
        return result

    def _record(self, call: Json) -> None:
        """Store the call in arrival order, even when latency jitter reorders completions."""
        bisect.insort(self.calls, call, key=lambda c: c["seq"])
        if call["code"] is None:
            bisect.insort(self.received, call, key=lambda c: c["seq"])

    # --- control API --------------------------------------------------------------------------

    async def _get_received(self, _: web.Request) -> web.Response:
        return web.json_response({"received": self.received})

    async def _get_calls(self, _: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls})

    async def _get_stats(self, _: web.Request) -> web.Response:
        by_outcome = Counter(call["code"] or "ok" for call in self.calls)
        stats = {"arrived": self._arrived, "calls": len(self.calls), "received": len(self.received)}
        return web.json_response({**stats, "by_outcome": dict(by_outcome)})

    async def _reset(self, _: web.Request) -> web.Response:
        """Forget records, rules, outage and chats; refill the bucket and reseed the dice."""
        self.received.clear()
        self.calls.clear()
        self._arrived = 0
        self._rules.clear()
        self._odd_answers.clear()
        self._outage = None
        self._open_chats.clear()
        self._bucket.refill()
        self._rng.seed(self.config.seed)
        return web.json_response({"ok": True})

    async def _update_config(self, request: web.Request) -> web.Response:
        """Apply a subset of the tunable settings, validated as a whole before any change."""
        changes = await request.json()
        unknown = set(changes) - _TUNABLE
        if unknown:
            raise ValueError(f"unknown setting(s): {sorted(unknown)}")
        candidate = dataclasses.replace(self.config, **changes)
        # Mutate in place: the token bucket holds a reference to this object.
        for name in changes:
            setattr(self.config, name, getattr(candidate, name))
        return web.json_response(dataclasses.asdict(self.config))

    async def _add_rule(self, request: web.Request) -> web.Response:
        """Append a rule: answer `code` to matching calls `times` times, or always."""
        spec = await request.json()
        times = _times(spec)
        fault = _fault(str(spec["code"]), spec.get("status"), spec.get("message"))
        self._rules.append(_Rule(dict(spec.get("match", {})), fault, times))
        return web.json_response({"rules": len(self._rules)})

    async def _clear_rules(self, _: web.Request) -> web.Response:
        self._rules.clear()
        return web.json_response({"rules": 0})

    async def _add_odd_answer(self, request: web.Request) -> web.Response:
        """Append an odd 200 answer for matching calls, `times` times or always."""
        spec = await request.json()
        times = _times(spec)
        body = spec.get("body")
        if body is not None and not isinstance(body, str):
            raise ValueError("body is the raw answer text: a string")
        odd = _OddAnswer(
            dict(spec.get("match", {})), body, bool(spec.get("request_id", True)), times
        )
        self._odd_answers.append(odd)
        return web.json_response({"answers": len(self._odd_answers)})

    async def _clear_odd_answers(self, _: web.Request) -> web.Response:
        self._odd_answers.clear()
        return web.json_response({"answers": 0})

    async def _start_outage(self, request: web.Request) -> web.Response:
        """Fail every call with a code, or stall it, for the next `seconds`."""
        spec = await request.json()
        stall = float(spec.get("stall", 0.0))
        code = spec.get("code") or (None if stall else "InternalServiceException")
        fault = _fault(str(code), spec.get("status")) if code else None
        after = int(spec.get("after_accepted", 0))
        self._outage = _Outage(float(spec["seconds"]), fault, stall, after)
        self._active_outage()  # one not waiting for accepted calls starts now
        return web.json_response({"ok": True})


@web.middleware
async def _control_errors_as_400(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn bad control-API input into a 400 with a JSON message instead of a 500."""
    try:
        return await handler(request)
    except (ValueError, TypeError, KeyError) as exc:
        return web.json_response({"message": f"bad request: {exc!r}"}, status=400)


def _times(spec: Json) -> int | None:
    """Read how many calls a control rule applies to: a positive count, or None for always."""
    times = None if spec.get("times") is None else int(spec["times"])
    if times is not None and times < 1:
        raise ValueError("times must be at least 1 (omit it for always)")
    return times


def _parse_object(raw: bytes) -> Json | None:
    """Decode a JSON object body; return None for anything else."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


Matcher = TypeVar("Matcher", _Rule, _OddAnswer)


def _take_match(matchers: list[Matcher], body: Json) -> Matcher | None:
    """Return the first matcher whose `match` the call's fields equal; use up one of its times."""
    for matcher in matchers:
        if all(body.get(key) == value for key, value in matcher.match.items()):
            if matcher.times is not None:
                matcher.times -= 1
                if matcher.times <= 0:
                    matchers.remove(matcher)
            return matcher
    return None


def _conversation(body: Json) -> tuple[Any, ...]:
    """Return the key that identifies a chat: (SourceId, DestinationId, Subtype)."""
    return body.get("SourceId"), body.get("DestinationId"), body.get("Subtype")


def _validate(body: Json | None) -> _Fault | None:
    """Check the fields Connect requires, as botocore does when its validation is off."""
    if body is None:
        return _fault(_INVALID, message="Request body must be a JSON object")
    event = body.get("Event")
    event_type = event.get("Type") if isinstance(event, dict) else None
    missing = [name for name in ("SourceId", "DestinationId") if not body.get(name)]
    if not event_type:
        missing.append("Event.Type")
    if missing:
        return _fault(_INVALID, message=f"Missing required field(s): {', '.join(missing)}")
    if event_type not in _EVENT_TYPES:
        return _fault(_INVALID, message=f"Unknown Event.Type {event_type!r}")
    return _validate_attributes(body.get("NewSessionDetails"))


def _validate_attributes(details: Any) -> _Fault | None:
    """Apply the two Attributes rules Connect documents: key characters, total UTF-8 bytes."""
    attributes = details.get("Attributes") if isinstance(details, dict) else None
    if not isinstance(attributes, dict):
        return None
    if not all(_ATTRIBUTE_KEY.fullmatch(str(key)) for key in attributes):
        return _fault(
            _INVALID,
            message="Attribute keys can include only alphanumeric, dash, and underscore characters",
        )
    size = sum(len(str(k).encode()) + len(str(v).encode()) for k, v in attributes.items())
    if size > _ATTRIBUTES_MAX_BYTES:
        return _fault(_INVALID, message=f"Attributes exceed {_ATTRIBUTES_MAX_BYTES} UTF-8 bytes")
    return None


def _in_band_fault(destination: Any) -> _Fault | None:
    """Read `simulate:<Code>` or `simulate:<Code>:<status>` from a DestinationId."""
    if not isinstance(destination, str) or not destination.startswith("simulate:"):
        return None
    code, _, status = destination.removeprefix("simulate:").partition(":")
    return _fault(code, int(status) if status.isdigit() else None) if code else None


def _json(status: int, payload: Json, request_id: str) -> web.Response:
    """Build a JSON response carrying the request id, as every Connect answer does."""
    return web.json_response(payload, status=status, headers={"x-amzn-RequestId": request_id})


def _error_response(fault: _Fault, request_id: str) -> web.Response:
    """Build an error the way Connect sends it: code in a header, always a JSON body."""
    payload: Json = {"message": fault.message}
    if fault.code == _INVALID:
        payload["Reason"] = _INVALID_REASON
    response = _json(fault.status, payload, request_id)
    response.headers["x-amzn-ErrorType"] = fault.code + _ERROR_TYPE_SUFFIX
    return response


def _check_error_rates(rates: dict[str, float]) -> dict[str, float]:
    """Require probabilities in [0, 1] that sum to at most 1, since one draw picks the code."""
    for code, probability in rates.items():
        if not code or not 0.0 <= probability <= 1.0:
            raise ValueError(f"error rate for {code!r} must be in [0, 1], got {probability}")
    if sum(rates.values()) > 1.0:
        raise ValueError(f"error rates sum to {sum(rates.values())}, more than 1")
    return rates


def parse_error_rates(items: list[str]) -> dict[str, float]:
    """Parse ["ThrottlingException=0.1", ...] into {code: probability}."""
    rates: dict[str, float] = {}
    for item in items:
        code, sep, value = item.partition("=")
        if not sep or not code.strip():
            raise ValueError(f"expected CODE=PROBABILITY, got {item!r}")
        try:
            rates[code.strip()] = float(value)
        except ValueError:
            raise ValueError(f"probability in {item!r} is not a number") from None
    return _check_error_rates(rates)


async def serve(config: SimulatorConfig, host: str, port: int) -> None:
    """Run the simulator until cancelled."""
    simulator = ConnectSimulator(config)
    url = await simulator.start(host, port)
    log.info("simulator_listening", url=url, rate=config.rate, burst=config.burst)
    try:
        await asyncio.Event().wait()
    finally:
        await simulator.stop()

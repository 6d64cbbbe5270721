"""The broker helper's pure parts: which URLs are refused before any attempt, and what each
failure is told as (the integration tests meet each failure on a real broker)."""

import errno
import socket

import pytest
from aiormq.exceptions import (
    AMQPConnectionError,
    ChannelPreconditionFailed,
    InvalidFrameError,
    ProbableAuthenticationError,
)

from worker.broker import broker_url, problem_for
from worker.problems import ExitCode, Problem
from worker.settings import WorkerSettings
from worker.topology import PluginMissingError

PASSWORD = "Unit5ecretPW"


def settings_for(url: str) -> WorkerSettings:
    """Return settings with only the broker URL given."""
    return WorkerSettings(amqp_url=url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"amqp//guest:{PASSWORD}@127.0.0.1:5672/", "(no scheme)"),
        (f"http://guest:{PASSWORD}@127.0.0.1:5672/", "(scheme 'http' is not amqp or amqps)"),
        (f"amqp://guest:{PASSWORD}@127.0.0.1:56x72/", "port"),
        ("amqp:///vhost", "(no host)"),
        ("amqp://guest:12/34@127.0.0.1:5672/", "(an '@' after the host)"),
    ],
    ids=["missing-colon", "other-scheme", "bad-port", "no-host", "unencoded-slash"],
)
def test_a_malformed_url_is_refused_before_any_attempt(url: str, reason: str) -> None:
    with pytest.raises(Problem) as raised:
        broker_url(settings_for(url))

    assert raised.value.exit_code == ExitCode.BROKER_UNAVAILABLE
    assert "is malformed" in raised.value.line and reason in raised.value.line
    assert PASSWORD not in raised.value.line and "34@" not in raised.value.line


@pytest.mark.parametrize(
    "url",
    ["amqp://guest:guest@localhost/", "amqps://u:p%40ss@host:5671/prod?heartbeat=30", "amqp://h"],
)
def test_a_wellformed_url_passes(url: str) -> None:
    assert broker_url(settings_for(url)).host


@pytest.mark.parametrize(
    ("error", "code", "says"),
    [
        (ProbableAuthenticationError("ACCESS_REFUSED - Login was refused"), 77, "login refused"),
        (
            InvalidFrameError("Expected Connection.OpenOk, got <Connection.Close object at 0x1>"),
            77,
            "virtual host 'prod' does not exist or user 'u' may not use it",
        ),
        (TimeoutError(), 69, "no answer within 10 s (amqp_connect_timeout_seconds)"),
        (AMQPConnectionError(errno.ECONNREFUSED, "Connect call failed"), 69, "refused"),
        (AMQPConnectionError(socket.EAI_NONAME, "Name or service not known"), 69, "not found"),
        (
            AMQPConnectionError("Server connection unexpectedly closed. Read 214 bytes"),
            69,
            "h:5672 does not answer as an AMQP 0-9-1 server",
        ),
        (
            ChannelPreconditionFailed("PRECONDITION_FAILED - inequivalent arg 'x' for queue 'q'"),
            78,
            "queue 'q' exists on the broker with other arguments",
        ),
        (PluginMissingError("the broker has no exchange type 'x'"), 78, "no exchange type"),
    ],
    ids=["login", "vhost", "timeout", "refused", "dns", "not-amqp", "conflict", "plugin"],
)
def test_each_failure_is_told_with_its_exit_code(error: Exception, code: int, says: str) -> None:
    problem = problem_for(error, settings_for(f"amqp://u:{PASSWORD}@h:5672/prod"))

    assert problem.exit_code == code
    assert says in problem.line
    assert PASSWORD not in problem.line

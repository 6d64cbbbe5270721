"""Reaching RabbitMQ: bounded connection attempts, and one line for whatever goes wrong.

Every command reaches the broker through here, so the reasons are written once:

- The URL is checked before any attempt. One that does not parse (a missing colon, a port that
  is not a number, another scheme, an unencoded `/` or `@` in the password) can never work, and
  aio-pika would retry it for ever, printing it whole.
- Every attempt, TCP connect and AMQP handshake together, lasts at most
  `amqp_connect_timeout_seconds`: a node that accepts TCP and never answers (a half-dead node,
  a stuck load balancer) would otherwise hold the command for ever.
- One-shot commands (`declare`, `publish`, `check`, `dlq`, `demo`) use a plain connection, not
  a robust one: a robust connection retries in the background instead of failing, and on a
  robust channel a passive declare is answered from a cache, so counts would never change.
  `run` wants the robust one's reconnects, but opens it with one bounded attempt here and
  retries by itself, so that it can log why each attempt failed and stop at SIGTERM.
- A failure becomes a `Problem`: one line, no password, and an exit code that says what to do
  (table `_EXPLANATIONS`, first match wins).
"""

import asyncio
import contextlib
import errno
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from enum import Enum

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractRobustConnection
from aiormq.exceptions import (
    AMQPError,
    AuthenticationError,
    ChannelAccessRefused,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    ConnectionClosed,
    IncompatibleProtocolError,
    InvalidFrameError,
    ProbableAuthenticationError,
)
from pamqp.common import FieldTable
from yarl import URL

from worker.problems import ExitCode, Problem
from worker.settings import WorkerSettings
from worker.topology import PluginMissingError

# As printed: the masker would mask a `user:password@` here too.
URL_FORM = "amqp[s]://user:***@host[:port]/[vhost], with / ? # @ : in the password percent-encoded"
_NAMED_IN_REPLY = re.compile(r"for (?P<kind>queue|exchange) '(?P<name>[^']*)'")
_DNS_ERRORS = {socket.EAI_NONAME, socket.EAI_AGAIN, getattr(socket, "EAI_NODATA", -5)}


def describe_error(error: BaseException) -> str:
    """Return an exception's message, or its class name when it has none."""
    texts = [str(arg) for arg in error.args if isinstance(arg, str) and arg]
    return "; ".join(texts) or str(error) or type(error).__name__


def quiet_amqp_logs() -> None:
    """Silence aiormq's own connection-error lines: one-shot commands say it in one line."""
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)


# --- The URL ---------------------------------------------------------------------------------


def broker_url(settings: WorkerSettings) -> URL:
    """Return the broker URL parsed, or raise the Problem of a malformed one."""
    raw = settings.amqp_url.get_secret_value()
    try:
        url = URL(raw)
        url.port  # noqa: B018 - parsing the port is what raises
    except ValueError as error:
        raise _malformed(settings, describe_error(error)) from error
    if url.scheme not in ("amqp", "amqps"):
        reason = f"scheme {url.scheme!r} is not amqp or amqps" if url.scheme else "no scheme"
        raise _malformed(settings, reason)
    if not url.host:
        raise _malformed(settings, "no host")
    if "@" in raw and url.user is None:
        # `amqp://u:12/3@host/` parses, as host `u`, port 12: the password held a raw `/`.
        raise _malformed(settings, "an '@' after the host")
    return url


def _malformed(settings: WorkerSettings, reason: str) -> Problem:
    """Phrase a URL that cannot work."""
    return Problem(
        f"cannot connect to the broker: its URL {settings.masked_amqp_url()} is malformed "
        f"({reason}); expected {URL_FORM}",
        ExitCode.BROKER_UNAVAILABLE,
    )


# --- Connecting ------------------------------------------------------------------------------


async def connect_plain(settings: WorkerSettings) -> AbstractConnection:
    """Open a plain connection for a one-shot command, in one bounded attempt."""
    url = broker_url(settings)
    quiet_amqp_logs()
    timeout = settings.amqp_connect_timeout_seconds
    try:
        # The library's timeout covers TCP and the handshake; ours also the wait for `ready`.
        async with asyncio.timeout(timeout):
            return await aio_pika.connect(url, timeout=timeout)
    except Exception as error:
        raise problem_for(error, settings) from error


async def connect_robust(settings: WorkerSettings, name: str) -> AbstractRobustConnection:
    """Open a robust connection (it reconnects by itself afterwards) in one bounded attempt."""
    url = broker_url(settings)
    timeout = settings.amqp_connect_timeout_seconds
    connection = aio_pika.RobustConnection(url, client_properties={"connection_name": name})
    try:
        async with asyncio.timeout(timeout):
            await connection.connect(timeout=timeout)
    except BaseException as error:
        # Closed, or its reconnect loop would go on in the background, printing as it goes.
        with contextlib.suppress(Exception):
            await connection.close()
        if isinstance(error, Exception):
            raise problem_for(error, settings) from error
        raise
    return connection


@contextlib.contextmanager
def explained(settings: WorkerSettings) -> Iterator[None]:
    """Turn a broker failure inside the block (a declare, a publish) into its Problem."""
    try:
        yield
    except (AMQPError, OSError, PluginMissingError) as error:
        raise problem_for(error, settings) from error


# --- What to tell ----------------------------------------------------------------------------


def problem_for(error: Exception, settings: WorkerSettings) -> Problem:
    """Return the one line and exit code that explain a broker failure."""
    if isinstance(error, Problem):
        return error
    for kind, explain in _EXPLANATIONS:
        if isinstance(error, kind):
            return explain(error, settings)
    return _cannot_connect(settings, describe_error(error))


def _cannot_connect(
    settings: WorkerSettings, reason: str, code: ExitCode = ExitCode.BROKER_UNAVAILABLE
) -> Problem:
    """Phrase a failed connection: unavailable (try later) or refused (fix a setting)."""
    return Problem(f"cannot connect to the broker at {settings.masked_amqp_url()}: {reason}", code)


def _login_refused(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain a refused login (403 while opening the connection)."""
    user = broker_url(settings).user or "guest"
    return _cannot_connect(
        settings,
        f"login refused for user {user!r} (ACCESS_REFUSED): check the user name and password",
        ExitCode.BROKER_REFUSED,
    )


def _vhost_refused(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain a Connection.Close in answer to Connection.Open: the vhost (530)."""
    if "Connection.Close" not in str(error):
        return _cannot_connect(settings, describe_error(error))
    url = broker_url(settings)
    vhost = url.path[1:] or "/"
    return _cannot_connect(
        settings,
        f"virtual host {vhost!r} does not exist or user {url.user or 'guest'!r} may not use it "
        "(see `rabbitmqctl list_vhosts` and `rabbitmqctl list_permissions -p VHOST`)",
        ExitCode.BROKER_REFUSED,
    )


def _no_answer(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain an attempt that outlived the connect timeout."""
    seconds = settings.amqp_connect_timeout_seconds
    return _cannot_connect(
        settings,
        f"no answer within {seconds:g} s (amqp_connect_timeout_seconds): "
        "is it RabbitMQ's AMQP port, and is the node up?",
    )


def _not_amqp(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain a server that does not answer the AMQP protocol header as RabbitMQ does."""
    url = broker_url(settings)
    return _cannot_connect(
        settings,
        f"{url.host}:{url.port} does not answer as an AMQP 0-9-1 server: "
        "is it RabbitMQ's AMQP port (5672, or 5671 with amqps)?",
    )


def _network(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain a TCP or DNS failure, naming the host and port."""
    url = broker_url(settings)
    code = error.args[0] if error.args and isinstance(error.args[0], int) else None
    if code == errno.ECONNREFUSED:
        reason = f"connection refused: nothing listens on {url.host}:{url.port}"
    elif code in _DNS_ERRORS:
        reason = f"host {url.host!r} not found (DNS): check the host name"
    elif "unexpectedly closed" in describe_error(error):
        # aiormq's words for a peer that hung up mid-handshake: an HTTP or a TLS port.
        return _not_amqp(error, settings)
    else:
        reason = describe_error(error)
    return _cannot_connect(settings, reason)


def _closed(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain any other close by the broker, in its own words."""
    return _cannot_connect(settings, f"the broker closed the connection: {describe_error(error)}")


def _no_permission(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain a refused declare or publish (403 on a channel): permissions."""
    user = broker_url(settings).user or "guest"
    return Problem(
        f"the broker refuses user {user!r} ({describe_error(error)}): grant it configure, "
        "write and read permissions on the worker's exchanges and queues",
        ExitCode.BROKER_REFUSED,
    )


def conflict_line(error: Exception) -> str:
    """Phrase an exchange or queue that exists with other arguments than ours (406)."""
    reply = describe_error(error)
    named = _NAMED_IN_REPLY.search(reply)
    what = f"{named['kind']} {named['name']!r}" if named else "an exchange or queue"
    return (
        f"{what} exists on the broker with other arguments than the worker declares ({reply}): "
        "delete it once its messages are moved, or set another queue name (WORKER_QUEUE)"
    )


def _conflict(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain PRECONDITION_FAILED: an exchange or queue with other arguments."""
    return Problem(conflict_line(error), ExitCode.TOPOLOGY_CONFLICT)


def _plugin_missing(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain an unknown exchange type: the consistent-hash plugin is off."""
    return Problem(str(error), ExitCode.TOPOLOGY_CONFLICT)


def _malformed_by_library(error: Exception, settings: WorkerSettings) -> Problem:
    """Explain a URL that passed our checks but not the library's."""
    return _malformed(settings, describe_error(error))


Explain = Callable[[Exception, WorkerSettings], Problem]
_EXPLANATIONS: tuple[tuple[type[Exception], Explain], ...] = (
    (PluginMissingError, _plugin_missing),
    (ChannelPreconditionFailed, _conflict),
    (ChannelAccessRefused, _no_permission),
    (ProbableAuthenticationError, _login_refused),
    (AuthenticationError, _login_refused),
    (IncompatibleProtocolError, _not_amqp),
    (InvalidFrameError, _vhost_refused),
    (ConnectionClosed, _closed),
    (TimeoutError, _no_answer),
    (OSError, _network),
    (ValueError, _malformed_by_library),
    (AMQPError, _closed),
)


# --- Looking at the topology -----------------------------------------------------------------


class Found(Enum):
    """What the broker holds under a name, compared with what we would declare."""

    SAME = "as declared"
    MISSING = "missing"
    OTHER = "with other arguments"


Declare = Callable[[AbstractChannel], Awaitable[object]]


async def compare(
    connection: AbstractConnection, passive: Declare, ours: Declare
) -> tuple[Found, str]:
    """Say whether an exchange or queue exists and has our arguments; explain a conflict.

    The passive declare comes first, so that nothing missing is created; then ours, which is a
    no-op on an equivalent one and fails with PRECONDITION_FAILED on another. Each runs on a
    throwaway channel, since a failure closes it.
    """
    try:
        async with connection.channel() as channel:
            await passive(channel)
        async with connection.channel() as channel:
            await ours(channel)
    except ChannelNotFoundEntity:
        return Found.MISSING, ""
    except ChannelPreconditionFailed as error:
        return Found.OTHER, conflict_line(error)
    return Found.SAME, ""


async def compare_exchange(
    connection: AbstractConnection, name: str, kind: str
) -> tuple[Found, str]:
    """Compare an exchange with ours: durable, of type `kind`."""

    async def passive(channel: AbstractChannel) -> object:
        return await channel.get_exchange(name, ensure=True)

    async def ours(channel: AbstractChannel) -> object:
        return await channel.declare_exchange(name, kind, durable=True)

    return await compare(connection, passive, ours)


async def compare_queue(
    connection: AbstractConnection, name: str, arguments: FieldTable
) -> tuple[Found, str]:
    """Compare a queue with ours: durable, with `arguments`."""

    async def passive(channel: AbstractChannel) -> object:
        return await channel.declare_queue(name, passive=True)

    async def ours(channel: AbstractChannel) -> object:
        return await channel.declare_queue(name, durable=True, arguments=arguments)

    return await compare(connection, passive, ours)

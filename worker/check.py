"""`chat-worker check`: validate the settings, reach the broker, find the topology, show AWS.

It prints the effective settings as `name = value` lines and one line per problem on stderr,
then exits 0 when there is none, 1 when there are problems, 2 when the settings are invalid.
The output never holds a secret: the AMQP password is masked in the URL and removed from
broker error texts, and AWS credentials are shown by source and masked access key id only.
"""

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity
from pydantic import SecretStr

from worker.settings import WorkerSettings, config_file_path
from worker.topology import (
    all_queue_names,
    dead_letter_exchange_name,
    input_exchange_name,
    partition_exchange_name,
)

EXIT_OK = 0
EXIT_PROBLEMS = 1
CONNECT_TIMEOUT_SECONDS = 5.0
AWS_TIMEOUT_SECONDS = 10.0

AddSettingsFlags = Callable[[argparse.ArgumentParser], None]


class BrokerUnreachable(Exception):
    """The broker could not be reached or refused us; the text holds no password."""


def quiet_amqp_logs() -> None:
    """Silence aiormq's own connection-error log lines; the commands report errors themselves."""
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each non-empty secret in a text with `***`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def url_passwords(url: str) -> list[str]:
    """Return the password of a URL as written and as decoded, for redaction."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password, unquote(password)] if password else []


def describe_error(error: BaseException) -> str:
    """Return an exception's message, or its class name when it has none."""
    texts = [str(arg) for arg in error.args if isinstance(arg, str) and arg]
    return "; ".join(texts) or str(error) or type(error).__name__


async def connect_plain(
    settings: WorkerSettings, timeout_seconds: float = CONNECT_TIMEOUT_SECONDS
) -> AbstractConnection:
    """Open a plain connection, for counting and reading queues.

    Not a robust one: on a robust channel a passive declare returns a cached DeclareOk, so
    message counts would never change.
    """
    url = settings.amqp_url.get_secret_value()
    try:
        return await aio_pika.connect(url, timeout=timeout_seconds)
    except TimeoutError as error:
        reason = f"no answer within {timeout_seconds:g} s"
        raise BrokerUnreachable(_unreachable(settings, reason)) from error
    except (OSError, aio_pika.exceptions.AMQPError, ValueError) as error:
        reason = redact(describe_error(error), url_passwords(url))
        raise BrokerUnreachable(_unreachable(settings, reason)) from error


def _unreachable(settings: WorkerSettings, reason: str) -> str:
    """Phrase a failed connection with the masked URL."""
    return f"cannot connect to the broker at {settings.masked_amqp_url()}: {reason}"


def mask_access_key(key: str | None) -> str:
    """Mask an AWS access key id to its first and last four characters, `AKID…XYZ1`."""
    if not key or len(key) < 12:
        return "****"
    return f"{key[:4]}…{key[-4:]}"


def settings_lines(settings: WorkerSettings) -> list[str]:
    """Return every effective setting as `name = value`, secrets masked."""
    lines = []
    for name in type(settings).model_fields:
        value: Any = getattr(settings, name)
        if name == "amqp_url":
            value = settings.masked_amqp_url()
        elif isinstance(value, SecretStr):
            value = "***"
        elif value is None:
            value = "(not set)"
        lines.append(f"{name} = {value}")
    return lines


async def missing_topology(connection: AbstractConnection, base: str, partitions: int) -> list[str]:
    """Return what producers, the partitions and dead-lettering need but the broker lacks."""
    missing = []
    exchanges = (input_exchange_name(base), partition_exchange_name(base))
    for name in (*exchanges, dead_letter_exchange_name(base)):
        if not await _exists(connection, name, exchange=True):
            missing.append(f"exchange {name}")
    for name in all_queue_names(base, partitions):
        if not await _exists(connection, name, exchange=False):
            missing.append(f"queue {name}")
    return missing


async def _exists(connection: AbstractConnection, name: str, exchange: bool) -> bool:
    """Declare an exchange or queue passively on its own channel, since a miss closes it."""
    try:
        async with connection.channel() as channel:
            if exchange:
                await channel.get_exchange(name, ensure=True)
            else:
                await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity:
        return False
    return True


async def check_broker(settings: WorkerSettings) -> list[str]:
    """Connect, look for the topology, print what was found; return the problems."""
    try:
        connection = await connect_plain(settings)
    except BrokerUnreachable as error:
        return [str(error)]
    async with connection:
        print(f"broker = reachable at {settings.masked_amqp_url()}")
        missing = await missing_topology(connection, settings.queue, settings.partitions)
    if not missing:
        print(f"topology = exchanges, partitions and dead-letter queues of {settings.queue!r}")
        return []
    return [f"missing {name}; run `chat-worker declare`" for name in missing]


async def check_aws(settings: WorkerSettings) -> list[str]:
    """Resolve AWS region, credentials and endpoint as the worker would; return the problems."""
    from aiobotocore.session import get_session

    from worker.connect_client import NO_REGION, connect_region

    session = get_session()
    problems = []
    region = connect_region(settings)
    if region:
        print(f"aws region = {region}")
    else:
        problems.append(NO_REGION)
    found, problem = await _aws_credentials(session)
    if found:
        print(f"aws credentials = {found}")
    if problem:
        problems.append(problem)
    if region:
        endpoint, problem = await _connect_endpoint(settings)
        if endpoint:
            print(f"aws endpoint = {endpoint}")
        if problem:
            problems.append(problem)
    return problems


async def _aws_credentials(session: Any) -> tuple[str | None, str | None]:
    """Return where botocore's chain found credentials (masked), or the problem."""
    try:
        credentials = await asyncio.wait_for(session.get_credentials(), AWS_TIMEOUT_SECONDS)
    except Exception as error:
        return None, f"cannot resolve AWS credentials: {describe_error(error)}"
    if credentials is None:
        return None, "no AWS credentials found (environment, profile, SSO, container, instance)"
    frozen = await credentials.get_frozen_credentials()
    found = f"found ({credentials.method}), access key id {mask_access_key(frozen.access_key)}"
    return (f"{found}, with session token" if frozen.token else found), None


async def _connect_endpoint(settings: WorkerSettings) -> tuple[str | None, str | None]:
    """Create the worker's own Connect client; return the endpoint URL it calls, or the problem."""
    from worker.connect_client import ConnectClient

    try:
        async with ConnectClient(settings) as client:
            # ConnectClient exposes no endpoint; its aiobotocore client knows the one resolved
            # from AWS_ENDPOINT_URL_CONNECT, the config file or the Region.
            return str(client._client.meta.endpoint_url), None
    except Exception as error:
        return None, f"cannot create the Connect client: {describe_error(error)}"


async def run_check(load: Callable[[], WorkerSettings], config_file: Path | None, aws: bool) -> int:
    """Run every check, print the report, and return the exit code."""
    quiet_amqp_logs()
    # Invalid settings raise a Problem: one line per setting, exit 2, as for every command.
    settings = load()
    print(f"config_file = {config_file_path(config_file) or '(none)'}")
    print("\n".join(settings_lines(settings)))
    problems = await check_broker(settings)
    if aws:
        problems += await check_aws(settings)
    _report(problems)
    return EXIT_PROBLEMS if problems else EXIT_OK


def _report(problems: list[str]) -> None:
    """Print one line per problem on stderr, or that all is well on stdout."""
    for problem in problems:
        print(f"chat-worker check: {problem}", file=sys.stderr)
    if not problems:
        print("check: ok")


def add_check_parser(commands: Any, add_settings_flags: AddSettingsFlags) -> None:
    """Add `check` to the command line."""
    check = commands.add_parser("check", help="validate settings, broker, topology (and AWS)")
    check.add_argument("--aws", action="store_true", help="also resolve AWS credentials")
    add_settings_flags(check)

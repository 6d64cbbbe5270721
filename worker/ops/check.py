"""`chat-worker check`: validate the settings, reach the broker, find the topology, show AWS.

It prints the effective settings as `name = value` lines and one line per problem on stderr,
then exits 0 when there is none, 1 when there are problems, 2 when the settings are invalid:
a report of every problem found, where the other commands stop at the first with its own exit
code. The output never holds a secret: URLs and broker errors pass through `worker.masking`,
and AWS credentials are shown by source and masked access key id only.
"""

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractConnection
from pamqp.common import FieldTable
from pydantic import SecretStr

from worker.broker import (
    Found,
    compare_exchange,
    compare_queue,
    connect_plain,
    describe_error,
    explained,
)
from worker.masking import mask
from worker.problems import Problem
from worker.settings import WorkerSettings, config_file_path
from worker.topology import (
    LEGACY_PARTITION,
    dead_letter_policy_command,
    exchange_types,
    queue_arguments,
    work_queue_names,
)

EXIT_OK = 0
EXIT_PROBLEMS = 1
AWS_TIMEOUT_SECONDS = 10.0

AddSettingsFlags = Callable[[argparse.ArgumentParser], None]


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


async def topology_problems(
    connection: AbstractConnection, base: str, partitions: int
) -> list[str]:
    """Return what producers, the partitions and dead-lettering need but the broker lacks.

    An exchange or queue that exists with other arguments than ours is found too: `declare`,
    `publish` and `run` would fail on it with PRECONDITION_FAILED.
    """
    found = [
        ("exchange", name, await compare_exchange(connection, name, kind))
        for name, kind in exchange_types(base).items()
    ]
    work = set(work_queue_names(base, partitions))
    found += [
        ("queue", name, await _compare_queue(connection, base, name, arguments, name in work))
        for name, arguments in queue_arguments(base, partitions).items()
    ]
    problems = []
    for kind, name, (state, conflict) in found:
        if state is Found.MISSING:
            problems.append(f"missing {kind} {name}; run `chat-worker declare`")
        elif state is Found.OTHER:
            problems.append(conflict)
    return problems


async def _compare_queue(
    connection: AbstractConnection, base: str, name: str, arguments: FieldTable, work: bool
) -> tuple[Found, str]:
    """Compare a queue with ours; accept a work queue as an older version declared it.

    The worker runs on such a queue too (`worker.topology`); the policy gives it the rest.
    """
    state, conflict = await compare_queue(connection, name, arguments)
    if state is not Found.OTHER or not work:
        return state, conflict
    if (await compare_queue(connection, name, LEGACY_PARTITION))[0] is not Found.SAME:
        return state, conflict
    print(
        f"note = {name} was declared by an older version; unless this policy is applied, "
        f"the broker may drop its events: {dead_letter_policy_command(base)}"
    )
    return Found.SAME, ""


async def check_broker(settings: WorkerSettings) -> list[str]:
    """Connect, compare the topology with ours, print what was found; return the problems."""
    try:
        connection = await connect_plain(settings)
        async with connection:
            print(f"broker = reachable at {settings.masked_amqp_url()}")
            with explained(settings):
                problems = await topology_problems(connection, settings.queue, settings.partitions)
    except Problem as problem:
        return [problem.line]
    if not problems:
        print(f"topology = exchanges, partitions and dead-letter queues of {settings.queue!r}")
    return problems


async def check_aws(settings: WorkerSettings) -> list[str]:
    """Resolve AWS region, credentials and endpoint as the worker would; return the problems."""
    from aiobotocore.session import get_session

    from worker.pipeline.connect_client import NO_REGION, connect_region

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
    from worker.pipeline.connect_client import ConnectClient

    try:
        async with ConnectClient(settings) as client:
            return client.endpoint_url, None
    except Exception as error:
        return None, f"cannot create the Connect client: {describe_error(error)}"


async def run_check(load: Callable[[], WorkerSettings], config_file: Path | None, aws: bool) -> int:
    """Run every check, print the report, and return the exit code."""
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
        print(f"chat-worker check: {mask(problem)}", file=sys.stderr)
    if not problems:
        print("check: ok")


def add_check_parser(commands: Any, add_settings_flags: AddSettingsFlags) -> None:
    """Add `check` to the command line."""
    check = commands.add_parser("check", help="validate settings, broker, topology (and AWS)")
    check.add_argument("--aws", action="store_true", help="also resolve AWS credentials")
    add_settings_flags(check)

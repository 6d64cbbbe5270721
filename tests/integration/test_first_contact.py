"""First contact and bad days with the broker: one line, a distinct exit code, no secret, no hang.

Every command (`run`, `declare`, `publish`, `check`, `dlq`) runs as a real process against the
real RabbitMQ, a closed port, an unknown host, or a listener of the test's own that accepts TCP
and never answers (a half-dead node). Passwords are distinct strings, so finding one in the
output means it leaked.
"""

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aio_pika
import pytest
from yarl import URL

from tests.integration.support import (
    AMQP_URL,
    REPO,
    Outcome,
    WorkerProcess,
    free_port,
    run_command,
)
from worker.broker import connect_plain, explained
from worker.problems import ExitCode, Problem
from worker.settings import WorkerSettings
from worker.testing.environment import clean_environment
from worker.testing.simulator import ConnectSimulator
from worker.topology import declare_topology, delete_topology, work_queue_name

pytestmark = pytest.mark.integration

PARTITIONS = 2
CONNECT_TIMEOUT = 2.0
# SIGTERM while connecting ends `run` at once (README); the margin is for a loaded machine.
SIGTERM_BOUND = 5.0
# A one-shot command fails within its connect timeout, plus the interpreter's start.
ONE_SHOT_BOUND = CONNECT_TIMEOUT + 10.0
PASSWORD = "S3cretPW4first"
AWS_SECRET = "aws-secret-first-contact-do-not-print"
EVENT_LINE = b'{"SourceId":"+15550100","DestinationId":"d","Event":{"Type":"DISCONNECT"}}\n'
ONE_SHOT_ARGS = {
    "declare": ["declare"],
    "publish": ["publish", "-"],
    "check": ["check"],
    "dlq": ["dlq", "list"],
    "run": ["run"],
}


def command_env() -> dict[str, str]:
    """Build a clean environment: only this test's settings reach the command."""
    return clean_environment(
        WORKER_CONFIG=str(REPO / "config" / "worker.toml"),
        WORKER_AMQP_CONNECT_TIMEOUT_SECONDS=str(CONNECT_TIMEOUT),
        WORKER_PARTITIONS=str(PARTITIONS),
        WORKER_HTTP_PORT="0",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="AKIDFIRSTCONTACT",
        AWS_SECRET_ACCESS_KEY=AWS_SECRET,
        AWS_ENDPOINT_URL_CONNECT="http://127.0.0.1:9",
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )


async def command(name: str, url: str, base: str) -> Outcome:
    """Run one command to its end; return what it did."""
    args = [*ONE_SHOT_ARGS[name], "--queue", base, "--amqp-url", url]
    return await run_command(*args, env=command_env(), stdin=EVENT_LINE, timeout=60)


async def commands(names: list[str], url: str, base: str) -> dict[str, Outcome]:
    """Run several commands at once against the same URL."""
    outcomes = await asyncio.gather(*(command(name, url, base) for name in names))
    return dict(zip(names, outcomes, strict=True))


def assert_told(name: str, outcome: Outcome, code: ExitCode, line: str) -> None:
    """Assert a failed command's exit code and its one line, and that it printed no traceback.

    `check` reports each problem in a line of its own among the settings it prints, and
    exits 1 for any problem.
    """
    assert not any("Traceback" in text for text in outcome.lines), outcome.output
    if name == "check":
        assert outcome.code == ExitCode.PROBLEMS, outcome.output
        told = [text for text in outcome.lines if text.startswith("chat-worker check: ")]
        told = [text for text in told if line in text]
    else:
        assert outcome.code == code, outcome.output
        told = outcome.lines
    assert len(told) == 1 and line in told[0], outcome.output


def assert_no_secret(outcome: Outcome, *secrets: str) -> None:
    """Assert that no secret appears in anything the command printed."""
    for secret in (*secrets, AWS_SECRET):
        assert secret not in outcome.output, outcome.output


async def start_run(url: str, base: str, log_path: Path) -> WorkerProcess:
    """Start `python -m worker run` on a URL and a topology, its output in a file."""
    return await WorkerProcess.start(command_env(), log_path, "--queue", base, "--amqp-url", url)


@pytest.fixture
async def base() -> AsyncIterator[str]:
    """A unique topology name, whatever commands declared of it deleted afterwards."""
    name = f"test-first-{uuid.uuid4().hex[:8]}"
    yield name
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await delete_topology(await connection.channel(), name, PARTITIONS)


@pytest.fixture
async def silent_broker() -> AsyncIterator[int]:
    """Listen on a port, accept every connection, and never answer: a half-dead node."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # kept open, never written to

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.transport.abort()
    server.close()
    await server.wait_closed()


def url_with_password(password: str, host: str = "127.0.0.1:5672", vhost: str = "") -> str:
    """Return a broker URL with the given password."""
    return f"amqp://guest:{password}@{host}/{vhost}"


# --- Malformed URLs ------------------------------------------------------------------------------

MALFORMED = {
    "missing-colon": f"amqp//guest:{PASSWORD}@127.0.0.1:5672/",
    "bad-port": f"amqp://guest:{PASSWORD}@127.0.0.1:56x72/",
    "unknown-scheme": f"http://guest:{PASSWORD}@127.0.0.1:5672/",
    "unencoded-slash": f"amqp://guest:{PASSWORD}/x@127.0.0.1:5672/",
    "unencoded-hash": f"amqp://guest:{PASSWORD}#x@127.0.0.1:5672/",
}


@pytest.mark.parametrize("url", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_url_is_one_line_without_the_password_for_every_command(
    url: str, base: str
) -> None:
    # When every command is given a URL that cannot work
    outcomes = await commands(list(ONE_SHOT_ARGS), url, base)

    # Then each says so in one line, at once, and never prints the password; `run` too:
    # waiting cannot mend a URL, so it exits with the line rather than retrying
    for name, outcome in outcomes.items():
        assert_told(name, outcome, ExitCode.BROKER_UNAVAILABLE, "is malformed")
        assert_no_secret(outcome, PASSWORD)
        assert outcome.seconds < ONE_SHOT_BOUND


async def test_a_percent_encoded_password_is_masked_as_written_and_decoded(base: str) -> None:
    written, decoded = "S3cr%40et%2FPW4", "S3cr@et/PW4"
    outcomes = await commands(list(ONE_SHOT_ARGS), url_with_password(written), base)

    for name, outcome in outcomes.items():
        assert_told(name, outcome, ExitCode.BROKER_REFUSED, "login refused for user 'guest'")
        assert_no_secret(outcome, written, decoded)


# --- A broker that accepts TCP and never answers ---------------------------------------------


async def test_run_says_why_it_waits_for_a_silent_broker_and_stops_at_sigterm(
    silent_broker: int, base: str, tmp_path: Path
) -> None:
    # Given the worker pointed at a node that accepts TCP and never answers
    url = url_with_password(PASSWORD, f"127.0.0.1:{silent_broker}")
    worker = await start_run(url, base, tmp_path / "run.log")

    # Then it says why it does not start, each time it tries
    await worker.wait_for(f"no answer within {CONNECT_TIMEOUT:g} s")

    # And SIGTERM, even in the middle of an attempt, ends it at once with exit code 0
    code, seconds = await worker.stop()
    assert code == 0, worker.text()
    assert seconds < SIGTERM_BOUND
    assert PASSWORD not in worker.text() and "Traceback" not in worker.text()


async def test_one_shot_commands_give_up_on_a_silent_broker_within_their_timeout(
    silent_broker: int, base: str
) -> None:
    url = url_with_password(PASSWORD, f"127.0.0.1:{silent_broker}")

    outcomes = await commands(["declare", "publish", "check", "dlq"], url, base)

    for name, outcome in outcomes.items():
        line = f"no answer within {CONNECT_TIMEOUT:g} s (amqp_connect_timeout_seconds)"
        assert_told(name, outcome, ExitCode.BROKER_UNAVAILABLE, line)
        assert outcome.seconds < ONE_SHOT_BOUND
        assert_no_secret(outcome, PASSWORD)


# --- Misconfigurations, for declare, publish and run ------------------------------------------

REFUSED = {
    "wrong-password": (url_with_password(PASSWORD), "login refused for user 'guest'"),
    "wrong-vhost": (
        url_with_password("guest", vhost="no-such-vhost"),
        "virtual host 'no-such-vhost' does not exist or user 'guest' may not use it",
    ),
}
UNREACHABLE = {
    "closed-port": (
        url_with_password(PASSWORD, f"127.0.0.1:{free_port()}"),
        "connection refused: nothing listens on 127.0.0.1:",
    ),
    "misspelt-host": (
        url_with_password(PASSWORD, "rabbitmq.invalid:5672"),
        "host 'rabbitmq.invalid' not found (DNS): check the host name",
    ),
}


@pytest.mark.parametrize(("url", "line"), REFUSED.values(), ids=REFUSED.keys())
async def test_a_refusal_is_one_line_and_exit_77_for_every_command(
    url: str, line: str, base: str
) -> None:
    outcomes = await commands(["declare", "publish", "run", "check"], url, base)

    # `run` too: a refused login or vhost is a setting to fix, not a broker to wait for
    for name, outcome in outcomes.items():
        assert_told(name, outcome, ExitCode.BROKER_REFUSED, line)
        assert_no_secret(outcome, PASSWORD)


@pytest.mark.parametrize(("url", "line"), UNREACHABLE.values(), ids=UNREACHABLE.keys())
async def test_an_unreachable_broker_fails_one_shot_commands_and_run_keeps_trying(
    url: str, line: str, base: str, tmp_path: Path
) -> None:
    # One-shot commands fail with the reason
    outcomes = await commands(["declare", "publish", "check"], url, base)
    for name, outcome in outcomes.items():
        assert_told(name, outcome, ExitCode.BROKER_UNAVAILABLE, line)
        assert_no_secret(outcome, PASSWORD)

    # `run` says the same and tries again, since the broker may come up later
    worker = await start_run(url, base, tmp_path / "run.log")
    await worker.wait_for(line)
    await worker.wait_for('"retry_in_seconds": 3.0')
    code, seconds = await worker.stop()
    assert code == 0 and seconds < SIGTERM_BOUND, worker.text()
    assert PASSWORD not in worker.text() and "Traceback" not in worker.text()


async def test_a_port_of_another_service_is_named_as_not_amqp(
    simulator: ConnectSimulator, base: str
) -> None:
    # Given the URL of an HTTP server's port (the Connect simulator's, as the management UI's)
    port = URL(simulator.url).port

    outcomes = await commands(
        ["declare", "check"], url_with_password(PASSWORD, f"127.0.0.1:{port}"), base
    )

    line = f"127.0.0.1:{port} does not answer as an AMQP 0-9-1 server"
    for name, outcome in outcomes.items():
        assert_told(name, outcome, ExitCode.BROKER_UNAVAILABLE, line)


# --- Topology conflicts ----------------------------------------------------------------------


@pytest.fixture
async def conflicting_queue(base: str) -> str:
    """Make the first work queue exist as a plain classic queue, as an older version might."""
    name = work_queue_name(base, 0)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True)
    return name


async def test_a_queue_with_other_arguments_is_one_line_naming_it(
    conflicting_queue: str, base: str
) -> None:
    outcomes = await commands(["declare", "publish", "run", "check"], AMQP_URL, base)

    line = f"queue '{conflicting_queue}' exists on the broker with other arguments"
    for name, outcome in outcomes.items():
        assert_told(name, outcome, ExitCode.TOPOLOGY_CONFLICT, line)
        assert "PRECONDITION_FAILED - inequivalent arg" in outcome.output
    assert "run `chat-worker declare`" not in "\n".join(
        text for text in outcomes["check"].lines if conflicting_queue in text
    )


async def test_a_missing_plugin_is_one_line_with_the_command_that_enables_it(base: str) -> None:
    # Given a broker without the exchange type of the partitions: plugins are node-wide, so
    # the test asks for a type no broker has, through the path `declare` and `publish` take
    settings = WorkerSettings(amqp_url=AMQP_URL, queue=base, partitions=PARTITIONS)
    connection = await connect_plain(settings)

    # When the topology is declared
    with pytest.raises(Problem) as raised:
        async with connection:
            with explained(settings):
                await declare_topology(
                    await connection.channel(),
                    base,
                    PARTITIONS,
                    partition_exchange_type="x-consistent-hash-missing",
                )

    # Then one line names the missing type and the fix
    assert raised.value.exit_code == ExitCode.TOPOLOGY_CONFLICT
    assert raised.value.line == (
        "the broker has no exchange type 'x-consistent-hash-missing': enable its plugin with "
        "`rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` on every node"
    )


# --- Library log lines ------------------------------------------------------------------------

RECONNECT_SCRIPT = """
import asyncio, sys
import aio_pika
from yarl import URL
from worker.observability import configure_logging
from worker.settings import WorkerSettings
from worker.testing.simulator import ConnectSimulator

async def main(raw: str) -> None:
    WorkerSettings(amqp_url=raw)  # registers the password, as every command does
    configure_logging("INFO", console=False)
    connection = aio_pika.RobustConnection(URL(raw), reconnect_interval=0.2)
    attempt = asyncio.ensure_future(connection.connect())  # held: a task may be collected
    await asyncio.Event().wait()  # until the test has read what it needs and ends us


asyncio.run(main(sys.argv[1]))
"""


async def test_aio_pika_reconnect_lines_never_show_the_password() -> None:
    # Given aio-pika's own reconnect loop on a URL it cannot use, which it prints whole
    url = f"amqp//guest:{PASSWORD}@127.0.0.1:5672/"
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", RECONNECT_SCRIPT, url],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
        env=command_env(),
    )
    reconnect_line = "Reconnect attempt failed amqp//guest:***@127.0.0.1:5672/"
    aiormq_line = '"logger": "aiormq.connection"'

    def enough(out: str) -> bool:
        """Say whether both lines are out, or the password is (the test then fails at once)."""
        return PASSWORD in out or (reconnect_line in out and aiormq_line in out)

    try:
        output = await asyncio.wait_for(_read_until(process, enough), 30)
    finally:
        process.kill()
        await process.wait()

    # Then its lines, and aiormq's, come through the worker's logging masked
    assert PASSWORD not in output
    assert reconnect_line in output, output
    assert aiormq_line in output


async def _read_until(process: asyncio.subprocess.Process, enough: Callable[[str], bool]) -> str:
    """Read a process's output until what it printed is `enough` (or it ends)."""
    assert process.stdout is not None
    output = ""
    while not enough(output) and (line := await process.stdout.readline()):
        output += line.decode(errors="replace")
    return output

"""First contact gone wrong: each misconfiguration is one line and a distinct exit code.

Every command runs as a user runs it (`python -m worker ...`, a clean environment); the tests
check the exit code, the line printed, and that no traceback reaches the user.
"""

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.conftest import PARTITIONS
from tests.integration.support import AMQP_URL, REPO, Broker, run_command
from worker import __version__
from worker.problems import ExitCode
from worker.testing.environment import clean_environment

pytestmark = pytest.mark.integration

# Every command that reads the settings, as a user would type it.
COMMANDS = [
    ("run",),
    ("declare",),
    ("publish", "-"),
    ("check",),
    ("dlq", "list"),
    ("demo",),
]


async def command(
    *args: str, env: dict[str, str] | None = None, region: bool = True
) -> tuple[int, list[str]]:
    """Run `python -m worker ARGS` in a clean environment; return its code and lines printed.

    Fails the test if any line belongs to a traceback.
    """
    settings = {
        "WORKER_AMQP_URL": AMQP_URL,
        "WORKER_CONFIG": str(REPO / "config" / "worker.toml"),
        "WORKER_PARTITIONS": str(PARTITIONS),
    }
    if region:
        settings["AWS_DEFAULT_REGION"] = "us-east-1"
    done = await run_command(*args, env=clean_environment(**{**settings, **(env or {})}))
    assert "Traceback" not in done.output, done.output
    return done.code, [line for line in done.lines if line.strip()]


@contextmanager
def taken_port(host: str) -> Iterator[int]:
    """Hold a port, as another process would; yield its number."""
    with socket.socket() as taken:
        taken.bind((host, 0))
        taken.listen()
        yield int(taken.getsockname()[1])


# --- run ---------------------------------------------------------------------------------------


async def test_run_without_any_region_says_so_in_the_line_check_prints(tmp_path: Path) -> None:
    # Given no Region anywhere: not in the environment, not in an AWS config file
    no_region = {
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }

    # When the worker and the check run
    code, printed = await command("run", env=no_region, region=False)
    _, check_printed = await command("check", "--aws", env=no_region, region=False)

    # Then run stops at once, with the line check prints, and a usage exit code
    assert code == ExitCode.USAGE
    assert printed == ["chat-worker: no AWS region: set AWS_REGION or AWS_DEFAULT_REGION"]
    assert "chat-worker check: no AWS region: set AWS_REGION or AWS_DEFAULT_REGION" in check_printed


async def test_run_with_its_http_port_taken_names_the_port_and_the_setting() -> None:
    # Given another process listening on the worker's health port
    with taken_port("0.0.0.0") as port:
        # When the worker starts
        code, printed = await command("run", env={"WORKER_HTTP_PORT": str(port)})

    # Then it says which port and which setting, with the OS error exit code
    assert code == ExitCode.OS_ERROR
    assert printed == [
        f"chat-worker: cannot listen on port {port} for health and metrics "
        "(Address already in use): set WORKER_HTTP_PORT to a free port"
    ]


# --- publish -----------------------------------------------------------------------------------


async def test_publish_of_a_directory_or_a_missing_file_is_no_input(tmp_path: Path) -> None:
    code, printed = await command("publish", str(tmp_path))
    missing_code, missing_printed = await command("publish", str(tmp_path / "absent.jsonl"))

    assert code == missing_code == ExitCode.NO_INPUT
    assert printed == [f"chat-worker: {tmp_path} is a directory, not a file of JSON lines"]
    assert missing_printed == [f"chat-worker: no such file: {tmp_path / 'absent.jsonl'}"]


async def test_publish_of_a_deeply_nested_line_names_the_line_and_publishes_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    # Given a file whose third line is JSON nested 100,000 deep
    event = '{"SourceId": "+15550001", "DestinationId": "d", "Event": {"Type": "DISCONNECT"}}'
    path = tmp_path / "events.jsonl"
    path.write_text(f"{event}\n{event}\n{'[' * 100_000}{']' * 100_000}\n")

    # When it is published
    code, printed = await command("publish", str(path), "--queue", broker.base)

    # Then the command names the line and why, and publishes none of the lines
    assert code == ExitCode.DATA
    [line] = printed
    assert line.startswith(
        f"chat-worker: {path} line 3: not valid JSON: recursion limit exceeded at column "
    )
    assert "nothing was published" in line
    assert await broker.work_count() == 0


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"not json at all\n", "line 1: not valid JSON: expected ident at column 2"),
        (b'\n\n{"SourceId": "+15557654321"}\n', "line 3: not a valid event: DestinationId"),
        (b'["an", "array"]\n', "line 1: JSON but not an object"),
        (b'{"a": "\xff"}\n', "line 1: not valid UTF-8 at byte 7"),
    ],
    ids=["not-json", "not-an-event", "array", "not-utf8"],
)
async def test_publish_of_any_bad_line_is_one_data_line(
    broker: Broker, tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(content)

    code, printed = await command("publish", str(path), "--queue", broker.base)

    assert code == ExitCode.DATA
    [line] = printed
    assert line.startswith(f"chat-worker: {path} {why}")
    assert "5557654321" not in line  # the line's values are not repeated
    assert await broker.work_count() == 0


async def test_publish_allow_malformed_sends_bad_lines_to_be_dead_lettered(
    broker: Broker, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"not json\n" + b"[" * 100_000 + b"]" * 100_000 + b"\n")

    code, out = await command("publish", str(path), "--queue", broker.base, "--allow-malformed")

    assert code == 0, out
    assert "published 2 event(s)" in out[-1]
    assert await broker.work_count() == 2


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: args[0])
async def test_an_unknown_config_key_is_named_by_every_command(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('queue = "q"\nprefetchh = 1\n')

    code, printed = await command(*args, env={"WORKER_CONFIG": str(config)})

    assert code == ExitCode.USAGE
    assert printed == [
        f"chat-worker: config file {config}: unknown setting 'prefetchh' (did you mean 'prefetch'?)"
    ]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: args[0])
async def test_invalid_settings_print_one_line_each_in_every_command(
    args: tuple[str, ...],
) -> None:
    code, printed = await command(
        *args, "--queue", "bad name", env={"WORKER_PREFETCH": "0", "WORKER_PARTITIONS": "x"}
    )

    assert code == ExitCode.USAGE
    assert printed == [
        "chat-worker: setting queue: must be 1-200 characters of letters, digits, '.', '_', "
        "':', '-' (from --queue)",
        "chat-worker: setting prefetch: Input should be greater than or equal to 1 "
        "(from WORKER_PREFETCH)",
        "chat-worker: setting partitions: Input should be a valid integer, unable to parse "
        "string as an integer (from WORKER_PARTITIONS)",
    ]


async def test_a_grace_period_beyond_the_shutdown_bound_is_refused() -> None:
    code, printed = await command("run", env={"WORKER_SHUTDOWN_GRACE_SECONDS": "28"})

    assert code == ExitCode.USAGE
    assert printed == [
        "chat-worker: setting shutdown_grace_seconds: must be at most 23: "
        "shutdown_timeout_seconds (25) less 2 s kept for closing "
        "(from WORKER_SHUTDOWN_GRACE_SECONDS)"
    ]


# --- help and version --------------------------------------------------------------------------


async def test_version_comes_from_the_package_metadata() -> None:
    code, out = await command("--version")

    assert code == 0
    assert out == [f"chat-worker {__version__}"]
    assert __version__ != "0+unknown"


async def test_simulate_help_explains_its_flags_and_control_api() -> None:
    code, lines = await command("simulate", "--help")
    out = "\n".join(lines)

    assert code == 0
    for text in ("--rate", "ThrottlingException", "--latency-ms", "--error-rate CODE=P"):
        assert text in out
    for route in ("/_sim/outage", "/_sim/rules", "/_sim/stats", "/_sim/config", "/_sim/reset"):
        assert route in out, f"{route} is not explained"
    assert "AWS_ENDPOINT_URL_CONNECT" in out


async def test_simulate_on_a_taken_port_is_one_line() -> None:
    with taken_port("127.0.0.1") as port:
        code, printed = await command("simulate", "--port", str(port))

    assert code == ExitCode.OS_ERROR
    assert printed[-1].startswith(f"chat-worker: simulate: cannot listen on 127.0.0.1:{port}")

"""`chat-worker check` against the real RabbitMQ: settings, broker, topology, AWS; no secrets."""

import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from tests.integration.support import AMQP_URL, run_command
from worker.testing.environment import clean_environment
from worker.topology import declare_topology, delete_topology

pytestmark = pytest.mark.integration

PARTITIONS = 8  # the default, which `check` looks for
AMQP_PASSWORD = "S3cretPw"
AWS_SECRET = "wJalrXUtnFEMI-do-not-print-me"
AWS_TOKEN = "session-token-do-not-print-me"


async def check(*args: str, **env: str) -> tuple[int, str]:
    """Run `python -m worker check ARGS` in a clean environment; return exit code and output."""
    # Keep the host's own AWS profile and instance role out of the test.
    no_host_aws = {
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    outcome = await run_command("check", *args, env=clean_environment(**no_host_aws, **env))
    return outcome.code, outcome.output


async def check_aws(base: str, **env: str) -> tuple[int, str]:
    """Run `check --aws` on a topology with an access key and its secret, and `env`."""
    keys = {"AWS_ACCESS_KEY_ID": "AKIDTESTCHECKXYZ1", "AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    return await check("--aws", "--queue", base, "--amqp-url", AMQP_URL, **keys, **env)


@pytest.fixture
async def base() -> AsyncIterator[str]:
    """Declare a unique topology, and delete it afterwards."""
    name = f"test-check-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await declare_topology(await connection.channel(), name, PARTITIONS)
        yield name
        await delete_topology(await connection.channel(), name, PARTITIONS)


async def test_reachable_broker_and_topology_pass(base: str) -> None:
    code, output = await check("--queue", base, "--amqp-url", AMQP_URL)

    assert code == 0, output
    assert "amqp_url = amqp://guest:***@127.0.0.1:5672/" in output
    assert f"queue = {base}" in output
    assert "prefetch = 64" in output
    assert f"topology = exchanges, partitions and dead-letter queues of {base!r}" in output
    assert "check: ok" in output


async def test_missing_topology_is_reported_with_the_fix() -> None:
    missing = f"test-check-{uuid.uuid4().hex[:10]}"

    code, output = await check("--queue", missing, "--amqp-url", AMQP_URL)

    assert code == 1
    assert f"missing exchange {missing}; run `chat-worker declare`" in output
    assert f"missing queue {missing}.dlq.MalformedEvent" in output
    assert f"missing queue {missing}.work.0" in output


async def test_unreachable_broker_fails_without_printing_the_password() -> None:
    url = f"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:1/"

    code, output = await check("--amqp-url", url)

    assert code == 1
    assert "cannot connect to the broker at amqp://guest:***@127.0.0.1:1/" in output
    assert AMQP_PASSWORD not in output


async def test_refused_login_fails_without_printing_the_password(base: str) -> None:
    code, output = await check(
        "--queue", base, WORKER_AMQP_URL=f"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:5672/"
    )

    assert code == 1
    assert "cannot connect to the broker" in output and "ACCESS_REFUSED" in output
    assert AMQP_PASSWORD not in output


async def test_invalid_settings_exit_2_with_one_line_each() -> None:
    code, output = await check("--prefetch", "0", "--queue", "bad name")

    assert code == 2
    assert "setting prefetch:" in output
    assert "setting queue:" in output


async def test_aws_shows_masked_credentials_and_the_endpoint_never_the_secret(base: str) -> None:
    code, output = await check_aws(
        base,
        AWS_SESSION_TOKEN=AWS_TOKEN,
        AWS_DEFAULT_REGION="eu-west-2",
        AWS_ENDPOINT_URL_CONNECT="http://127.0.0.1:4599",
    )

    assert code == 0, output
    assert "aws region = eu-west-2" in output
    assert "aws credentials = found (env), access key id AKID…XYZ1, with session token" in output
    assert "aws endpoint = http://127.0.0.1:4599" in output
    assert AWS_SECRET not in output and AWS_TOKEN not in output
    assert "AKIDTESTCHECKXYZ1" not in output


async def test_aws_without_region_or_credentials_says_so(base: str) -> None:
    code, output = await check("--aws", "--queue", base, "--amqp-url", AMQP_URL)

    assert code == 1
    assert "no AWS region: set AWS_REGION or AWS_DEFAULT_REGION" in output
    assert "no AWS credentials found" in output


async def test_aws_region_is_honoured_for_the_default_endpoint(base: str) -> None:
    code, output = await check_aws(base, AWS_REGION="ap-southeast-2")

    assert code == 0, output
    assert "aws endpoint = https://connect.ap-southeast-2.amazonaws.com" in output

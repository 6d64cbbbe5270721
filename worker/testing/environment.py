"""The environment of a worker process run against the simulator: the demo's, the benchmarks'.

A child process gets this process's environment without any WORKER_ or AWS_ variable, plus the
settings its caller chose: a developer's own queue name, AWS profile or credentials must never
steer a demo, a benchmark or a test.
"""

import os

SIMULATED_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIDSIMULATED",
    "AWS_SECRET_ACCESS_KEY": "simulated-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
"""Dummy credentials and a Region (botocore signs every call, the simulator checks only the
form), and no instance-metadata lookup, which would stall start-up off EC2."""


def clean_environment(**settings: str) -> dict[str, str]:
    """Return this process's environment without its WORKER_ and AWS_ variables, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "AWS_"))}
    env.update(settings)
    return env


def simulated_worker_environment(
    amqp_url: str, queue: str, endpoint: str, **settings: str
) -> dict[str, str]:
    """Return a clean environment for `chat-worker run` against the simulator at `endpoint`.

    Health and metrics listen on a free port, so that several workers share a machine;
    `settings` (WORKER_... or AWS_...) come last and win.
    """
    chosen = {
        "WORKER_AMQP_URL": amqp_url,
        "WORKER_QUEUE": queue,
        "WORKER_HTTP_PORT": "0",
        "AWS_ENDPOINT_URL_CONNECT": endpoint,
        **SIMULATED_AWS,
        **settings,
    }
    return clean_environment(**chosen)

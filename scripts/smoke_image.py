"""Helpers of scripts/build-image: a wheelhouse index, and a smoke run of the built image.

    python scripts/smoke_image.py index DIR   # DIR/wheels/*.whl -> DIR/simple/<project>/index.html
    python scripts/smoke_image.py run IMAGE   # run IMAGE's entrypoint as its user; check health

`podman run` cannot set rlimits on the machines this was written on, so `run` mounts the image
and starts its ENTRYPOINT and CMD with `chroot --userspec`, with the image's environment and
working directory: the same files and user as in a container, the host's network. It needs
RabbitMQ on 127.0.0.1:5672 and deletes the queues the worker declared.
"""

import asyncio
import html
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PARTITIONS = 2
DEADLINE_SECONDS = 60.0


def write_index(root: Path) -> None:
    """Write a PEP 503 index of `root/wheels` under `root/simple`, one page per project."""
    projects: dict[str, list[str]] = {}
    for wheel in sorted((root / "wheels").glob("*.whl")):
        name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        projects.setdefault(name, []).append(wheel.name)
    for name, files in projects.items():
        page = root / "simple" / name / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        links = "".join(
            f'<a href="../../wheels/{html.escape(f)}">{html.escape(f)}</a>\n' for f in files
        )
        page.write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    print(f"   wheelhouse: {sum(map(len, projects.values()))} wheels, {len(projects)} projects")


def inspect_image(image: str) -> dict[str, Any]:
    """Return the image's config: Env, Entrypoint, Cmd, WorkingDir, User, Healthcheck."""
    out = subprocess.run(
        ["podman", "image", "inspect", image], check=True, capture_output=True, text=True
    ).stdout
    image_data = json.loads(out)[0]
    config: dict[str, Any] = image_data["Config"]
    # podman reports the HEALTHCHECK beside the config, docker inside it.
    config.setdefault("Healthcheck", image_data.get("Healthcheck"))
    return config


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_status(url: str) -> int | None:
    """Return the HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def in_image(root: str, config: dict[str, Any], env: dict[str, str], argv: list[str]) -> list[str]:
    """Return a command that runs `argv` in the image's root as its user, env and directory."""
    user = str(config["User"])
    environment = [f"{key}={value}" for key, value in env.items()]
    workdir = config.get("WorkingDir") or "/"
    shell = 'cd "$0" && exec "$@"'
    return [
        "chroot",
        f"--userspec={user}:{user}",
        root,
        "/usr/bin/env",
        "-i",
        *environment,
        "/bin/sh",
        "-c",
        shell,
        workdir,
        *argv,
    ]


def image_environment(config: dict[str, Any], port: int, queue: str) -> dict[str, str]:
    """Return the image's own environment plus what a deployment would set."""
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    env.update(
        WORKER_AMQP_URL=AMQP_URL,
        WORKER_QUEUE=queue,
        WORKER_PARTITIONS=str(PARTITIONS),
        WORKER_HTTP_PORT=str(port),
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="AKIDIMAGESMOKERUN",
        AWS_SECRET_ACCESS_KEY="image-smoke-run-not-a-secret",
        AWS_EC2_METADATA_DISABLED="true",
        # Nothing is published, so nothing is sent; a closed port all the same.
        AWS_ENDPOINT_URL_CONNECT="http://127.0.0.1:9",
    )
    return env


def process_uid(pid: int) -> int:
    """Return the real uid of a running process."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Uid:\s+(\d+)", status, re.M)
    assert match is not None
    return int(match.group(1))


def wait_for(predicate: Callable[[], bool], what: str, worker: subprocess.Popen[bytes]) -> None:
    """Poll `predicate` until it holds; fail if the worker exits or the deadline passes."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not predicate():
        if worker.poll() is not None:
            raise SystemExit(f"the entrypoint exited with {worker.returncode} before {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"no {what} within {DEADLINE_SECONDS:.0f} s")
        time.sleep(0.5)


def smoke(root: str, config: dict[str, Any], log: Path) -> None:
    """Start the entrypoint, check uid, /healthz, /readyz and HEALTHCHECK, then SIGTERM it."""
    port = free_port()
    queue = f"image-smoke-{uuid.uuid4().hex[:8]}"
    env = image_environment(config, port, queue)
    command = [*config["Entrypoint"], *(config.get("Cmd") or [])]
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with log.open("wb") as output:
        worker = subprocess.Popen(
            in_image(root, config, env, command), stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: http_status(f"{base}/healthz") == 200, "200 on /healthz", worker)
        print(f"   {' '.join(command)}: /healthz 200 after {time.monotonic() - started:.1f} s")
        print(f"   uid of the process: {process_uid(worker.pid)}")
        wait_for(lambda: http_status(f"{base}/readyz") == 200, "200 on /readyz", worker)
        print("   /readyz 200: connected to RabbitMQ and consuming")
        if run_healthcheck(root, config, env) != 0:
            raise SystemExit("HEALTHCHECK failed against the running worker")
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
        print(f"   SIGTERM: exit code {code}")
        if code != 0:
            raise SystemExit("the entrypoint did not exit 0 on SIGTERM")
        # The check must also be able to fail: with the worker gone, it has to.
        if run_healthcheck(root, config, env) == 0:
            raise SystemExit("HEALTHCHECK passed with no worker running")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        asyncio.run(delete_queues(queue))


def run_healthcheck(root: str, config: dict[str, Any], env: dict[str, str]) -> int:
    """Run the image's HEALTHCHECK command in the image, as its user; return its exit code."""
    test = (config.get("Healthcheck") or {}).get("Test") or ["NONE"]
    if test[0] != "CMD":
        raise SystemExit(f"HEALTHCHECK is not in exec form: {test}")
    result = subprocess.run(in_image(root, config, env, test[1:]), capture_output=True, text=True)
    last_line = (result.stderr.strip().splitlines() or [""])[-1]
    print(f"   HEALTHCHECK command: exit code {result.returncode} {last_line}".rstrip())
    return result.returncode


async def delete_queues(queue: str) -> None:
    """Delete the topology the smoke run's worker declared."""
    import aio_pika

    from worker.topology import delete_topology

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await delete_topology(await connection.channel(), queue, PARTITIONS)


def run(image: str) -> None:
    """Mount `image`, smoke-run it, unmount it; print the worker's log on failure."""
    config = inspect_image(image)
    if str(config.get("User")) != "10001":
        raise SystemExit(f"the image runs as user {config.get('User')!r}, not 10001")
    root = subprocess.run(
        ["podman", "image", "mount", image], check=True, capture_output=True, text=True
    ).stdout.strip()
    # The image mount is read-only, as a readOnlyRootFilesystem is: the run proves it suffices.
    read_only = bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    print(f"   image root mounted read-only: {'yes' if read_only else 'no'}")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"image-smoke-{os.getpid()}.log"
    try:
        smoke(root, config, log)
    except BaseException:
        sys.stderr.write(log.read_text(errors="replace")[-4000:] if log.exists() else "")
        raise
    finally:
        subprocess.run(["podman", "image", "unmount", image], check=False, capture_output=True)
    log.unlink(missing_ok=True)


def main(argv: list[str]) -> None:
    """Dispatch `index DIR` or `run IMAGE`."""
    match argv:
        case ["index", directory]:
            write_index(Path(directory))
        case ["run", image]:
            run(image)
        case _:
            raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

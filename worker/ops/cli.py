"""The `chat-worker` command line: run, declare, publish, simulate, demo, check, dlq."""

import argparse
import asyncio
import io
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from worker import __version__, amqp_compat
from worker.broker import connect_plain, explained
from worker.masking import install_log_masking, mask
from worker.observability import configure_logging
from worker.ops.check import add_check_parser
from worker.ops.dead_letter_queues import add_dlq_parser
from worker.problems import ExitCode, Problem
from worker.settings import WorkerSettings, load_settings
from worker.testing.simulator import CONTROL_API_HELP
from worker.topology import LEGACY_PARTITION, dead_letter_policy_command, declare_topology

EXIT_USAGE = ExitCode.USAGE


SETTING_FLAGS: dict[str, tuple[type, str]] = {
    "amqp_url": (str, "broker URL (WORKER_AMQP_URL)"),
    "queue": (str, "base name of exchanges and queues (WORKER_QUEUE)"),
    "prefetch": (int, "unacked messages per replica"),
    "http_port": (int, "health/metrics port"),
    "log_level": (str, "DEBUG, INFO, WARNING, ERROR"),
}
"""The settings a flag overrides (`--amqp-url` for amqp_url...), with the flag's type and help."""


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags that override settings (None when not given, so lower sources apply)."""
    parser.add_argument("--config", type=Path, help="TOML config file (default: WORKER_CONFIG)")
    for name, (kind, explanation) in SETTING_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=kind, help=explanation)


def build_parser() -> argparse.ArgumentParser:
    """Describe every command and its flags."""
    parser = argparse.ArgumentParser(prog="chat-worker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_settings_flags(commands.add_parser("run", help="consume and send events to Connect"))
    _add_settings_flags(commands.add_parser("declare", help="declare exchanges and queues"))
    publish = commands.add_parser("publish", help="publish JSON lines from FILE ('-' = stdin)")
    _add_settings_flags(publish)
    publish.add_argument("file", help="file of one JSON event per line")
    publish.add_argument(
        "--allow-malformed",
        dest="allow_malformed",
        action="store_true",
        help="publish lines that are not valid events too (the worker dead-letters them as "
        "MalformedEvent); without it a bad line stops the command before anything is sent",
    )
    simulate = commands.add_parser(
        "simulate",
        help="run the local Connect simulator",
        description="Serve Amazon Connect's SendChatIntegrationEvent over HTTP, with a quota, "
        "latency and injected errors, for the worker to call unchanged.",
        epilog=CONTROL_API_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_simulator_flags(simulate)
    demo = commands.add_parser("demo", help="simulator + sample traffic + worker, then a report")
    _add_settings_flags(demo)
    add_dlq_parser(commands, _add_settings_flags)
    add_check_parser(commands, _add_settings_flags)
    return parser


def _add_simulator_flags(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=4566, help="port to listen on (%(default)s)")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="quota in requests/second, answered with ThrottlingException (429) beyond it "
        "(default: no quota)",
    )
    parser.add_argument(
        "--burst", type=int, default=10, help="calls the quota lets through at once (%(default)s)"
    )
    parser.add_argument(
        "--latency-ms",
        dest="latency_ms",
        type=float,
        default=0.0,
        help="time each answer takes, ms (%(default)s)",
    )
    parser.add_argument(
        "--jitter-ms",
        dest="jitter_ms",
        type=float,
        default=0.0,
        help="random extra latency, 0 to this many ms (%(default)s)",
    )
    parser.add_argument(
        "--error-rate",
        dest="error_rates",
        action="append",
        default=[],
        metavar="CODE=P",
        help="answer CODE with probability P, e.g. InternalServiceException=0.05 (repeatable; "
        "the probabilities add up to at most 1)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the random latency and errors"
    )


def _settings_from(args: argparse.Namespace) -> WorkerSettings:
    """Load settings with the flags given on the command line."""
    flags = {name: getattr(args, name) for name in SETTING_FLAGS}
    return load_settings(config_file=args.config, **flags)


async def run_worker(settings: WorkerSettings) -> int:
    """Run the worker; the first SIGTERM/SIGINT drains it, a second one stops it at once."""
    from worker.runner.lifecycle import Worker

    worker = Worker(settings)
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        worker.log.warning("worker.signal", signal=signal.Signals(signum).name)
        if worker.stopping and main_task is not None:
            main_task.cancel()
        worker.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.run()
    except asyncio.CancelledError:
        worker.log.warning("worker.aborted")
        return 128 + signal.SIGTERM
    return 0


async def declare(settings: WorkerSettings) -> int:
    """Declare the whole topology so producers can start before any worker."""
    connection = await connect_plain(settings)
    async with connection:
        with explained(settings):
            topology = await declare_topology(
                await connection.channel(), settings.queue, settings.partitions
            )
    print(f"declared topology of {settings.queue!r} on {settings.masked_amqp_url()}")
    legacy = [
        name for name, arguments in topology.work_arguments.items() if arguments == LEGACY_PARTITION
    ]
    if legacy:
        # Old queues keep their arguments (mixed-version replicas stay safe); a policy adds more.
        print(
            f"{len(legacy)} work queue(s) were declared by an older version and do not "
            "dead-letter what the broker removes; give them the same settings with:\n"
            f"  {dead_letter_policy_command(settings.queue)}"
        )
    return 0


async def publish(settings: WorkerSettings, file: str, allow_malformed: bool) -> int:
    """Publish a file of JSON lines to the input exchange, once every line is checked."""
    from worker.ops.publish import event_bodies, publish_file_lines, read_input

    lines = (await asyncio.to_thread(read_input, file)).splitlines()
    source = "standard input" if file == "-" else file
    bodies = event_bodies(
        lines, settings.max_body_bytes, allow_malformed=allow_malformed, source=source
    )
    count = await publish_file_lines(settings, bodies)
    print(f"published {count} event(s) to exchange {settings.queue!r}")
    return 0


async def simulate(args: argparse.Namespace) -> int:
    """Run the Connect simulator until interrupted."""
    from worker.testing.simulator import SimulatorConfig, parse_error_rates, serve

    try:
        config = SimulatorConfig(
            rate=args.rate,
            burst=args.burst,
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.jitter_ms,
            error_rates=parse_error_rates(args.error_rates),
            seed=args.seed,
        )
    except ValueError as error:
        raise Problem(f"simulate: {error}", ExitCode.USAGE) from None
    print(f"Connect simulator on http://{args.host}:{args.port}", flush=True)
    try:
        await serve(config, args.host, args.port)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        line = f"simulate: cannot listen on {args.host}:{args.port} ({reason}); choose --port"
        raise Problem(line, ExitCode.OS_ERROR) from None
    return 0


async def dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command."""
    if args.command == "simulate":
        return await simulate(args)
    if args.command == "check":
        from worker.ops.check import run_check

        return await run_check(lambda: _settings_from(args), args.config, args.aws)
    settings = _settings_from(args)
    configure_logging(settings.log_level)
    if args.command == "run":
        return await run_worker(settings)
    if args.command == "declare":
        return await declare(settings)
    if args.command == "publish":
        return await publish(settings, args.file, args.allow_malformed)
    if args.command == "dlq":
        from worker.ops.dead_letter_queues import run_dlq

        return await run_dlq(settings, args)
    from worker.ops.demo import run_demo

    return await run_demo(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `chat-worker` and `python -m worker`."""
    args = build_parser().parse_args(argv)
    amqp_compat.install()
    install_log_masking()
    # A producer's bytes that are not UTF-8 (a message_id in `dlq show`, say) are printed
    # escaped rather than raising halfway through the output.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        return asyncio.run(dispatch(args))
    except Problem as problem:
        for line in mask(problem.line).splitlines():
            print(f"chat-worker: {line}", file=sys.stderr)
        return int(problem.exit_code)
    except (ValidationError, ValueError, FileNotFoundError) as error:
        print(f"chat-worker: {mask(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130

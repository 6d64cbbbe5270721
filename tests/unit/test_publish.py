"""What `chat-worker publish` accepts: the checks on its input, before anything is sent."""

import json
from pathlib import Path

import pytest

from worker.ops.publish import event_bodies, malformed_reason, read_input, routing_key_for
from worker.problems import ExitCode, Problem

LIMIT = 256 * 1024
EVENT = {"SourceId": "+15550001", "DestinationId": "d", "Event": {"Type": "DISCONNECT"}}
GOOD = json.dumps(EVENT).encode()
NESTED = b"[" * 100_000 + b"]" * 100_000


def test_blank_lines_are_skipped_and_line_endings_cut() -> None:
    assert event_bodies(
        [GOOD + b"\r\n", b"", b"  ", GOOD], LIMIT, allow_malformed=False, source="f"
    ) == [GOOD, GOOD]


def test_a_bad_line_is_named_by_its_number_counting_blank_lines() -> None:
    with pytest.raises(Problem) as raised:
        event_bodies([GOOD, b"", b"not json"], LIMIT, allow_malformed=False, source="in.jsonl")

    assert raised.value.exit_code == ExitCode.DATA
    assert raised.value.line.startswith("in.jsonl line 3: not valid JSON: ")
    assert "nothing was published" in raised.value.line


def test_a_deeply_nested_line_is_a_data_problem_not_a_recursion_error() -> None:
    with pytest.raises(Problem) as raised:
        event_bodies([NESTED], LIMIT, allow_malformed=False, source="deep.jsonl")

    assert raised.value.line.startswith(
        "deep.jsonl line 1: not valid JSON: recursion limit exceeded at column "
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not valid UTF-8 at byte 0"),
        (b"[1, 2]", "JSON but not an object"),
        (
            b'{"SourceId": "+15550001"}',
            "not a valid event: DestinationId: Field required; Event: Field required",
        ),
        (b"x" * 11, "11 bytes, limit 10"),
        (GOOD, None),
    ],
)
def test_malformed_reason_says_what_the_worker_would_dead_letter(
    body: bytes, reason: str | None
) -> None:
    limit = 10 if reason == "11 bytes, limit 10" else LIMIT
    assert malformed_reason(body, limit) == reason


def test_malformed_reason_never_repeats_a_value() -> None:
    body = json.dumps({"SourceId": "+15557654321", "DestinationId": 5, "Event": {}}).encode()

    reason = malformed_reason(body, LIMIT)

    assert reason is not None and "5557654321" not in reason


def test_allow_malformed_publishes_bad_lines_as_they_are() -> None:
    lines = [b"not json", NESTED, GOOD]

    assert event_bodies(lines, LIMIT, allow_malformed=True, source="f") == lines
    assert routing_key_for(NESTED) == "unkeyed"


def test_reading_a_directory_or_a_missing_file_is_no_input(tmp_path: Path) -> None:
    with pytest.raises(Problem) as directory:
        read_input(str(tmp_path))
    with pytest.raises(Problem) as missing:
        read_input(str(tmp_path / "absent.jsonl"))

    assert directory.value.exit_code == missing.value.exit_code == ExitCode.NO_INPUT
    assert directory.value.line == f"{tmp_path} is a directory, not a file of JSON lines"
    assert missing.value.line == f"no such file: {tmp_path / 'absent.jsonl'}"

"""Exchange and queue names derived from the base name (SPEC §3, §4)."""

import re

import pytest

from worker.pipeline.errors import ErrorVariant
from worker.topology import (
    LEGACY_PARTITION,
    all_queue_names,
    dead_letter_exchange_name,
    dead_letter_policy,
    dead_letter_policy_command,
    dead_letter_queue_name,
    input_exchange_name,
    partition_exchange_name,
    queue_arguments,
    work_queue_arguments,
    work_queue_name,
    work_queue_names,
)

BASE = "chat-integration-events"
LONGEST_BASE = "q" * 200  # the longest base name the settings accept
AMQP_NAME_LIMIT = 255  # bytes, a shortstr


def test_input_exchange_is_the_base_name_itself() -> None:
    assert input_exchange_name(BASE) == "chat-integration-events"


def test_work_queue_name_is_numbered_by_partition() -> None:
    assert work_queue_name(BASE, 3) == "chat-integration-events.work.3"


def test_work_queue_names_cover_every_partition_in_order() -> None:
    assert work_queue_names(BASE, 3) == [f"{BASE}.work.0", f"{BASE}.work.1", f"{BASE}.work.2"]


def test_partition_exchange_name() -> None:
    assert partition_exchange_name(BASE) == "chat-integration-events.partitions"


def test_dead_letter_exchange_name() -> None:
    assert dead_letter_exchange_name(BASE) == "chat-integration-events.dlx"


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        (ErrorVariant.ACCESS_DENIED, "chat-integration-events.dlq.AccessDeniedException"),
        (ErrorVariant.INTERNAL_SERVICE, "chat-integration-events.dlq.InternalServiceException"),
        (ErrorVariant.INVALID_REQUEST, "chat-integration-events.dlq.InvalidRequestException"),
        (ErrorVariant.RESOURCE_NOT_FOUND, "chat-integration-events.dlq.ResourceNotFoundException"),
        (ErrorVariant.THROTTLING, "chat-integration-events.dlq.ThrottlingException"),
        (ErrorVariant.UNKNOWN, "chat-integration-events.dlq.UnknownError"),
        (ErrorVariant.MALFORMED, "chat-integration-events.dlq.MalformedEvent"),
        (ErrorVariant.BROKER_DEAD_LETTERED, "chat-integration-events.dlq.BrokerDeadLettered"),
    ],
)
def test_dead_letter_queue_name_per_variant(variant: ErrorVariant, expected: str) -> None:
    assert dead_letter_queue_name(BASE, variant) == expected


def test_dead_letter_queue_name_accepts_the_variant_as_a_string() -> None:
    assert (
        dead_letter_queue_name(BASE, "UnknownError") == "chat-integration-events.dlq.UnknownError"
    )


def test_dead_letter_queue_name_rejects_an_unknown_variant() -> None:
    with pytest.raises(ValueError):
        dead_letter_queue_name(BASE, "NoSuchVariant")


def test_all_queue_names_lists_the_work_queues_first_then_one_queue_per_variant() -> None:
    names = all_queue_names(BASE, 2)

    assert names[:2] == [f"{BASE}.work.0", f"{BASE}.work.1"]
    assert sorted(names[2:]) == sorted(
        f"chat-integration-events.dlq.{variant.value}" for variant in ErrorVariant
    )
    assert len(names) == len(set(names)) == 10


def test_names_of_different_bases_do_not_collide() -> None:
    assert not set(all_queue_names("a", 8)) & set(all_queue_names("b", 8))


def test_every_derived_name_of_the_longest_base_fits_amqp_limit() -> None:
    names = [
        input_exchange_name(LONGEST_BASE),
        dead_letter_exchange_name(LONGEST_BASE),
        partition_exchange_name(LONGEST_BASE),
        *all_queue_names(LONGEST_BASE, 64),
    ]

    assert max(len(name.encode("utf-8")) for name in names) <= AMQP_NAME_LIMIT


def test_work_queues_dead_letter_at_least_once_to_the_broker_variant() -> None:
    arguments = queue_arguments(BASE, 2)[work_queue_name(BASE, 1)]

    assert arguments == {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": "chat-integration-events.dlx",
        "x-dead-letter-routing-key": "BrokerDeadLettered",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def test_dead_letter_queues_keep_their_arguments() -> None:
    arguments = queue_arguments(BASE, 2)[dead_letter_queue_name(BASE, ErrorVariant.UNKNOWN)]

    assert arguments == {"x-queue-type": "quorum"}


def test_the_policy_gives_older_work_queues_the_same_dead_lettering() -> None:
    ours = work_queue_arguments(BASE)
    policy = dead_letter_policy(BASE)

    assert {f"x-{key}": value for key, value in policy.items()} == {
        key: value for key, value in ours.items() if key not in LEGACY_PARTITION
    }


def test_the_policy_command_matches_only_the_work_queues_of_its_base() -> None:
    command = dead_letter_policy_command("a.b")
    pattern = re.search(r"'([^']*)'", command)

    assert command.startswith("rabbitmqctl set_policy a.b.work-dead-lettering ")
    assert command.endswith(" --apply-to queues")
    assert pattern is not None
    assert re.match(pattern[1], "a.b.work.12")
    assert not re.match(pattern[1], "a.b.dlq.UnknownError")
    assert not re.match(pattern[1], "axb.work.1")
    assert not re.match(pattern[1], "a.b.work.1.x")

"""What a 2xx answer says: its body kinds, and the reading of a parsed answer."""

from typing import Any

import pytest

from worker.pipeline.accepted import Accepted, body_kind, read_accepted, tolerate_odd_bodies


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b'{"InitialContactId": "c-1", "NewChatCreated": true}', None),
        (b"{}", None),
        (b"[1,2,3]", "list"),
        (b"null", "null"),
        (b'"accepted"', "string"),
        (b"42", "number"),
        (b"true", "boolean"),
        (b"", "empty"),
        (b"<html>OK</html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_body_kind_names_what_is_not_a_json_object(body: bytes, kind: str | None) -> None:
    assert body_kind(body) == kind


def test_the_hook_hands_botocore_an_object_for_an_odd_2xx_body_and_notes_it() -> None:
    response: dict[str, Any] = {"status_code": 200, "body": b"[1,2,3]"}
    customized: dict[str, Any] = {}

    tolerate_odd_bodies(response_dict=response, customized_response_dict=customized)

    assert response["body"] == b"{}"
    assert read_accepted({**customized, "ResponseMetadata": {"RequestId": "r"}}) == Accepted(
        "r", odd_body="list"
    )


@pytest.mark.parametrize("status", [400, 429, 500])
def test_the_hook_leaves_error_answers_to_botocore(status: int) -> None:
    response: dict[str, Any] = {"status_code": status, "body": b"<html>"}
    customized: dict[str, Any] = {}

    tolerate_odd_bodies(response_dict=response, customized_response_dict=customized)

    assert response["body"] == b"<html>"
    assert customized == {}


def test_an_answer_in_the_output_shape_gives_contact_and_new_chat() -> None:
    parsed = {
        "InitialContactId": "c-1",
        "NewChatCreated": True,
        "ResponseMetadata": {"RequestId": "r-1"},
    }

    assert read_accepted(parsed) == Accepted("r-1", "c-1", new_chat=True)


def test_an_answer_without_request_id_reads_none() -> None:
    assert read_accepted({"ResponseMetadata": {}}).request_id is None


def test_fields_of_the_wrong_type_make_an_odd_body() -> None:
    parsed = {"InitialContactId": 5, "ResponseMetadata": {"RequestId": "r"}}

    assert read_accepted(parsed) == Accepted("r", odd_body="object of other fields")

"""The one translation from botocore's errors to failures the policy understands (SPEC §2, §5)."""

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from tests.unit.failures import client_error
from worker.pipeline.errors import (
    CallerRefusedError,
    ErrorVariant,
    EventFailure,
    MalformedEventError,
    PermanentApiError,
    ThrottledApiError,
    TransientApiError,
    translate_error,
    variant_for_code,
)

ENDPOINT = "https://connect.us-east-1.amazonaws.com/chat-integration-event"


@pytest.mark.parametrize(
    ("code", "status", "variant", "kind"),
    [
        ("InvalidRequestException", 400, ErrorVariant.INVALID_REQUEST, PermanentApiError),
        ("AccessDeniedException", 403, ErrorVariant.ACCESS_DENIED, CallerRefusedError),
        ("ResourceNotFoundException", 404, ErrorVariant.RESOURCE_NOT_FOUND, PermanentApiError),
        ("ThrottlingException", 429, ErrorVariant.THROTTLING, ThrottledApiError),
        ("InternalServiceException", 500, ErrorVariant.INTERNAL_SERVICE, TransientApiError),
    ],
)
def test_modelled_code_becomes_its_variant_and_class(
    code: str, status: int, variant: ErrorVariant, kind: type[EventFailure]
) -> None:
    failure = translate_error(client_error(code, status))

    assert type(failure) is kind
    assert failure.variant is variant
    assert failure.code == code
    assert failure.http_status == status


def test_client_error_keeps_message_and_request_id() -> None:
    failure = translate_error(
        client_error("AccessDeniedException", 403, message="not authorized", request_id="r-42")
    )

    assert failure.message == "not authorized"
    assert failure.request_id == "r-42"
    assert str(failure) == "AccessDeniedException: not authorized"


def test_unknown_code_with_400_is_a_permanent_unknown_error_keeping_the_raw_code() -> None:
    failure = translate_error(client_error("ServiceQuotaExceededException", 400))

    assert type(failure) is PermanentApiError
    assert failure.variant is ErrorVariant.UNKNOWN
    assert failure.code == "ServiceQuotaExceededException"


def test_unknown_code_with_503_is_a_transient_unknown_error() -> None:
    failure = translate_error(client_error("ServiceUnavailableException", 503))

    assert type(failure) is TransientApiError
    assert failure.variant is ErrorVariant.UNKNOWN
    assert failure.code == "ServiceUnavailableException"
    assert failure.http_status == 503


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_any_5xx_is_transient(status: int) -> None:
    assert type(translate_error(client_error("AccessDeniedException", status))) is (
        TransientApiError
    )


def test_any_429_is_a_throttle_whatever_the_code() -> None:
    failure = translate_error(client_error("TooManyRequestsException", 429))

    assert type(failure) is ThrottledApiError
    assert failure.variant is ErrorVariant.UNKNOWN


@pytest.mark.parametrize("code", ["ThrottlingException", "TooManyRequestsException", "Throttling"])
@pytest.mark.parametrize("status", [400, 403, 503])
def test_a_throttling_code_is_a_throttle_whatever_the_status(code: str, status: int) -> None:
    # botocore's standard mode retries these codes as throttles; a known code says more
    failure = translate_error(client_error(code, status))

    assert type(failure) is ThrottledApiError
    assert failure.http_status == status


def test_internal_service_exception_is_transient_whatever_the_status() -> None:
    failure = translate_error(client_error("InternalServiceException", 400))

    assert type(failure) is TransientApiError
    assert failure.variant is ErrorVariant.INTERNAL_SERVICE


def test_an_unmodelled_code_keeps_the_status_rule() -> None:
    assert type(translate_error(client_error("SomeNewError", 400))) is PermanentApiError
    assert type(translate_error(client_error("SomeNewError", 429))) is ThrottledApiError


def test_modelled_code_with_unexpected_status_keeps_its_variant() -> None:
    failure = translate_error(client_error("InvalidRequestException", 503))

    assert type(failure) is TransientApiError
    assert failure.variant is ErrorVariant.INVALID_REQUEST


def test_invalid_request_reason_structure_is_carried() -> None:
    reason = {"AttachedFileInvalidRequestExceptionReason": "INVALID_FILE_TYPE"}

    failure = translate_error(client_error("InvalidRequestException", 400, Reason=reason))

    assert failure.reason == reason


def test_reason_that_is_not_a_structure_is_dropped() -> None:
    failure = translate_error(client_error("InvalidRequestException", 400, Reason="oops"))

    assert failure.reason is None


def test_errors_without_reason_have_none() -> None:
    assert translate_error(client_error("AccessDeniedException", 403)).reason is None


def test_client_error_without_code_or_metadata_is_a_permanent_unknown_error() -> None:
    failure = translate_error(ClientError({}, "SendChatIntegrationEvent"))

    assert type(failure) is PermanentApiError
    assert failure.variant is ErrorVariant.UNKNOWN
    assert failure.code == "Unknown"
    assert failure.http_status is None
    assert failure.request_id is None


@pytest.mark.parametrize(
    ("error", "ambiguous"),
    [
        (EndpointConnectionError(endpoint_url=ENDPOINT), False),
        (ConnectTimeoutError(endpoint_url=ENDPOINT), False),
        (ReadTimeoutError(endpoint_url=ENDPOINT), True),
    ],
    ids=["EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"],
)
def test_transport_error_is_a_transient_unknown_error(error: Exception, ambiguous: bool) -> None:
    failure = translate_error(error)

    assert type(failure) is TransientApiError
    assert failure.variant is ErrorVariant.UNKNOWN
    assert failure.code == type(error).__name__
    assert failure.http_status is None
    assert isinstance(failure, TransientApiError)
    assert failure.ambiguous is ambiguous


def test_connection_closed_after_sending_is_ambiguous() -> None:
    error = ConnectionClosedError(endpoint_url=ENDPOINT, error=RuntimeError("disconnected"))

    failure = translate_error(error)

    assert isinstance(failure, TransientApiError)
    assert failure.ambiguous is True


def test_a_server_error_is_not_ambiguous() -> None:
    failure = translate_error(client_error("InternalServiceException", 500))

    assert isinstance(failure, TransientApiError)
    assert failure.ambiguous is False


def test_a_bug_is_a_permanent_unknown_error() -> None:
    failure = translate_error(RuntimeError("bug"))

    assert type(failure) is PermanentApiError
    assert failure.variant is ErrorVariant.UNKNOWN
    assert failure.code == "RuntimeError"


def test_missing_credentials_refuse_the_caller() -> None:
    failure = translate_error(NoCredentialsError())

    assert type(failure) is CallerRefusedError
    assert failure.variant is ErrorVariant.UNKNOWN
    assert failure.code == "NoCredentialsError"


def test_a_failed_container_credentials_refresh_refuses_the_caller() -> None:
    # botocore raises this, not a ClientError, when the credentials endpoint fails
    error = CredentialRetrievalError(provider="container-role", error_msg="non 200 response 500")

    failure = translate_error(error)

    assert type(failure) is CallerRefusedError
    assert failure.code == "CredentialRetrievalError"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("UnrecognizedClientException", 400),
        ("InvalidSignatureException", 403),
        ("ExpiredTokenException", 400),
        ("MissingAuthenticationTokenException", 403),
        ("IncompleteSignatureException", 400),  # rest-json spelling
        ("IncompleteSignature", 400),  # query-protocol spelling
        # STS, when a web-identity or assume-role refresh fails under the call
        ("AccessDenied", 403),
        ("ExpiredToken", 400),
        ("InvalidIdentityToken", 400),
        ("IDPRejectedClaim", 403),
        ("IDPCommunicationError", 400),
        ("RegionDisabledException", 403),
    ],
)
def test_codes_that_refuse_the_caller_are_caller_refusals_of_the_unknown_variant(
    code: str, status: int
) -> None:
    # Wrong credentials, role or Region: the code says the caller, not the event, is refused.
    failure = translate_error(client_error(code, status))

    assert type(failure) is CallerRefusedError
    assert failure.variant is ErrorVariant.UNKNOWN
    assert failure.code == code


@pytest.mark.parametrize(
    ("status", "kind"),
    [(429, ThrottledApiError), (500, TransientApiError), (503, TransientApiError)],
)
def test_the_status_decides_before_a_code_that_refuses_the_caller(
    status: int, kind: type[EventFailure]
) -> None:
    failure = translate_error(client_error("AccessDeniedException", status))

    assert type(failure) is kind
    assert failure.variant is ErrorVariant.ACCESS_DENIED


@pytest.mark.parametrize(
    "code", ["InvalidRequestException", "ResourceNotFoundException", "ValidationException"]
)
def test_an_event_refused_for_itself_is_not_a_caller_refusal(code: str) -> None:
    failure = translate_error(client_error(code, 400))

    assert type(failure) is PermanentApiError


@pytest.mark.parametrize(
    ("code", "variant"),
    [
        ("ThrottlingException", ErrorVariant.THROTTLING),
        ("UnknownError", ErrorVariant.UNKNOWN),
        ("MalformedEvent", ErrorVariant.UNKNOWN),
        ("BrokerDeadLettered", ErrorVariant.UNKNOWN),
        ("ValidationException", ErrorVariant.UNKNOWN),
        ("", ErrorVariant.UNKNOWN),
    ],
)
def test_variant_for_code_maps_only_the_modelled_exception_codes(
    code: str, variant: ErrorVariant
) -> None:
    # A service answering "MalformedEvent" must not land in the queue of bodies never sent.
    assert variant_for_code(code) is variant


def test_variants_are_the_eight_dead_letter_routing_keys() -> None:
    assert {variant.value for variant in ErrorVariant} == {
        "AccessDeniedException",
        "InternalServiceException",
        "InvalidRequestException",
        "ResourceNotFoundException",
        "ThrottlingException",
        "UnknownError",
        "MalformedEvent",
        "BrokerDeadLettered",
    }


def test_class_hierarchy_says_transient_or_permanent() -> None:
    assert issubclass(ThrottledApiError, TransientApiError)
    assert not issubclass(PermanentApiError, TransientApiError)
    assert not issubclass(MalformedEventError, TransientApiError)
    assert issubclass(CallerRefusedError, PermanentApiError)
    kinds = (ThrottledApiError, TransientApiError, PermanentApiError, MalformedEventError)
    for kind in (*kinds, CallerRefusedError):
        assert issubclass(kind, EventFailure)


def test_failure_without_message_prints_its_code() -> None:
    assert str(PermanentApiError(ErrorVariant.UNKNOWN, "RuntimeError")) == "RuntimeError"

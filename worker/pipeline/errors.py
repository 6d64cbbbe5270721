"""The error variants that key the dead-letter queues, and the one translation from botocore.

Each failure is an exception whose class says what kind of failure it is (throttled, transient,
permanent, or a refusal of the caller) and whose `variant` says which dead-letter queue it ends
in. botocore's errors are translated here and nowhere else: a code known to say how to retry
(a throttle, a transient failure) chooses the class, else the HTTP status does; the code
chooses the variant. What each class means for a retry is `policy`'s table.
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from botocore.retries.standard import ThrottledRetryableChecker, TransientRetryableChecker


class ErrorVariant(StrEnum):
    """Why an event was dead-lettered; the routing key of its dead-letter queue."""

    ACCESS_DENIED = "AccessDeniedException"
    """Connect refused the caller (IAM policy, or API access restricted)."""
    INTERNAL_SERVICE = "InternalServiceException"
    """Connect failed internally and kept failing within the retry budget."""
    INVALID_REQUEST = "InvalidRequestException"
    """Connect rejected the request itself."""
    RESOURCE_NOT_FOUND = "ResourceNotFoundException"
    """The destination (or another referenced resource) does not exist."""
    THROTTLING = "ThrottlingException"
    """Connect kept throttling the event beyond its retry budget."""
    UNKNOWN = "UnknownError"
    """Any other error code, or a transport failure that outlived its retries."""
    MALFORMED = "MalformedEvent"
    """The body is not UTF-8 JSON, is too large, or fails the request model; never sent."""
    BROKER_DEAD_LETTERED = "BrokerDeadLettered"
    """The broker dead-lettered it from a work queue (delivery limit, expiration): see x-death."""


_MODELLED_CODES = frozenset(
    variant.value for variant in ErrorVariant if variant.value.endswith("Exception")
)

# Codes that say the caller, not the event, is refused: wrong role, Region or credentials.
# STS's own codes come as ClientErrors from a web-identity or container credentials refresh.
CALLER_REFUSED_CODES = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "IncompleteSignatureException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "MissingAuthenticationTokenException",
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "RefreshWithMFAUnsupportedError",
        "TokenRetrievalError",
        "AccessDenied",
        "InvalidIdentityToken",
        "IDPRejectedClaim",
        "IDPCommunicationError",
        "RegionDisabledException",
    }
)

# Codes that say how to retry whatever the status they come with: botocore's standard retry
# mode reads them so (its own lists), and Connect's model gives InternalServiceException a 500.
THROTTLING_CODES = frozenset(ThrottledRetryableChecker._THROTTLED_ERROR_CODES)
TRANSIENT_CODES = frozenset(
    {*TransientRetryableChecker._TRANSIENT_ERROR_CODES, "InternalServiceException"}
)


@dataclass
class EventFailure(Exception):
    """An event that cannot be delivered (yet); carries what its dead letter will say."""

    variant: ErrorVariant
    code: str
    message: str = ""
    http_status: int | None = None
    request_id: str | None = None
    reason: dict[str, Any] | None = None
    validation_errors: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class MalformedEventError(EventFailure):
    """The body cannot become a request; no API call is made, it is never retried."""


class PermanentApiError(EventFailure):
    """Connect refused this event for a reason a retry will not change."""


class TransientApiError(EventFailure):
    """Connect or the network failed in a way a later attempt may not (5xx, transport)."""

    ambiguous: bool = False
    """True when the request may have reached Connect (a read timeout): a retry may duplicate."""


class ThrottledApiError(TransientApiError):
    """Connect answered 429 or a throttling code: the shared quota is exhausted for now."""


class CallerRefusedError(PermanentApiError):
    """Connect refused the caller (role, Region, credentials), not this event's content."""


def variant_for_code(code: str) -> ErrorVariant:
    """Return the dead-letter variant of a Connect error code."""
    return ErrorVariant(code) if code in _MODELLED_CODES else ErrorVariant.UNKNOWN


def translate_error(error: Exception) -> EventFailure:
    """Translate what the aiobotocore call raised into a failure the policy understands.

    A known code decides the class where it says more than the status (a throttling code is
    a throttle, a transient code transient, whatever the status); otherwise the status does
    (any 429 is a throttle, any 5xx or transport failure is transient; else a code that
    refuses the caller is a caller refusal, any other permanent). The code alone decides
    the dead-letter variant.
    """
    if isinstance(error, ClientError):
        return _translate_client_error(error)
    if isinstance(error, BotoConnectionError | HTTPClientError):
        failure = TransientApiError(ErrorVariant.UNKNOWN, type(error).__name__, str(error))
        # The request may have reached Connect before the answer was lost: a retry may duplicate.
        failure.ambiguous = isinstance(error, ReadTimeoutError | ConnectionClosedError)
        return failure
    # Missing credentials or region, a parser failure, a bug: nothing a retry would fix.
    code = type(error).__name__
    return _permanent_class(code)(ErrorVariant.UNKNOWN, code, str(error))


def _permanent_class(code: str) -> type[PermanentApiError]:
    """Return the class of a permanent failure: a refusal of the caller, or of the event."""
    return CallerRefusedError if code in CALLER_REFUSED_CODES else PermanentApiError


def _translate_client_error(error: ClientError) -> EventFailure:
    """Read code, status, message, request id and Reason out of a ClientError."""
    response: dict[str, Any] = error.response
    details = response.get("Error", {})
    metadata = response.get("ResponseMetadata", {})
    code = str(details.get("Code") or "Unknown")
    status = metadata.get("HTTPStatusCode")
    reason = response.get("Reason")
    return _failure_class(code, status)(
        variant=variant_for_code(code),
        code=code,
        message=str(details.get("Message") or ""),
        http_status=status if isinstance(status, int) else None,
        request_id=metadata.get("RequestId"),
        reason=reason if isinstance(reason, dict) else None,
    )


def _failure_class(code: str, status: object) -> type[EventFailure]:
    """Return the class of an error answer: a known code first, else its status."""
    if code in THROTTLING_CODES or status == 429:
        return ThrottledApiError
    if code in TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
        return TransientApiError
    return _permanent_class(code)

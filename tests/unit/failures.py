"""Connect's answers as botocore raises them, and as `errors.translate_error` makes them."""

from typing import Any

from botocore.exceptions import ClientError

from worker.pipeline.errors import (
    CallerRefusedError,
    ErrorVariant,
    PermanentApiError,
    ThrottledApiError,
    TransientApiError,
)


def client_error(
    code: str,
    status: int,
    message: str = "something went wrong",
    request_id: str = "req-1234",
    **modelled_fields: Any,
) -> ClientError:
    """Build a ClientError shaped like the one botocore's rest-json parser produces."""
    response: dict[str, Any] = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {
            "RequestId": request_id,
            "HTTPStatusCode": status,
            "HTTPHeaders": {"x-amzn-requestid": request_id, "x-amzn-errortype": code},
            "RetryAttempts": 0,
        },
        **modelled_fields,
    }
    return ClientError(response, "SendChatIntegrationEvent")


def throttled(variant: ErrorVariant = ErrorVariant.THROTTLING) -> ThrottledApiError:
    """Return what Connect's 429 becomes."""
    return ThrottledApiError(variant, variant.value, http_status=429)


def internal_error(variant: ErrorVariant = ErrorVariant.INTERNAL_SERVICE) -> TransientApiError:
    """Return what Connect's 500 becomes."""
    return TransientApiError(variant, variant.value, http_status=500)


def access_denied() -> CallerRefusedError:
    """Return what Connect's 403 AccessDeniedException becomes: a refusal of the caller."""
    return CallerRefusedError(
        ErrorVariant.ACCESS_DENIED,
        "AccessDeniedException",
        "not authorized",
        http_status=403,
        request_id="req-1",
    )


def invalid_request() -> PermanentApiError:
    """Return what Connect's 400 InvalidRequestException becomes."""
    return PermanentApiError(
        ErrorVariant.INVALID_REQUEST, "InvalidRequestException", "bad", http_status=400
    )

"""The one place where the emulator's error answers are made.

Every refusal the emulator gives goes through :func:`batch_error` so that the status code,
the Batch error code and the body shape (``odata.metadata``, ``code``, ``message.value``,
``values``) stay the same as the service's, whichever handler refused. The SDK reads
``code`` and ``values`` to decide what to raise and whether to retry, so a wrong shape here
would hide client bugs instead of exposing them.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping

__all__ = [
    "ERRORS",
    "BatchServiceError",
    "batch_error",
    "error_body",
]

#: Batch error code → (HTTP status, the service's message text).
ERRORS: dict[str, tuple[int, str]] = {
    "AuthenticationFailed": (
        403,
        "Server failed to authenticate the request. Make sure the value of Authorization "
        "header is formed correctly including the signature.",
    ),
    "MissingRequiredHeader": (400, "A required HTTP header was not specified."),
    "InvalidHeaderValue": (
        400,
        "The value for one of the HTTP headers is not in the correct format.",
    ),
    "MissingRequiredQueryParameter": (
        400,
        "A query parameter that's mandatory for this request is not specified.",
    ),
    "InvalidQueryParameterValue": (
        400,
        "Value for one of the query parameters specified in the request URI is invalid.",
    ),
    "UnsupportedApiVersion": (400, "The specified api-version is not supported."),
    "InvalidRequestBody": (400, "The specified Request Body is not syntactically valid."),
    "MissingRequiredProperty": (400, "A required property was not specified in the request body."),
    "InvalidPropertyValue": (
        400,
        "The value provided for one of the properties in the request body is invalid.",
    ),
    "PropertyNameUnknown": (
        400,
        "The request body contains a property name that is not recognized.",
    ),
    "RequestBodyTooLarge": (
        413,
        "The request body is too large and exceeds the maximum permissible limit.",
    ),
    "TooManyRequestsInBatch": (
        400,
        "The number of tasks in the request exceeds the maximum allowed (100).",
    ),
    "UnsupportedOperation": (400, "The emulator does not implement this operation."),
    "ResourceNotFound": (404, "The specified resource does not exist."),
    "PoolNotFound": (404, "The specified pool does not exist."),
    "JobNotFound": (404, "The specified job does not exist."),
    "TaskNotFound": (404, "The specified task does not exist."),
    "NodeNotFound": (404, "The specified node does not exist."),
    "FileNotFound": (404, "The specified file does not exist."),
    "PoolExists": (409, "The specified pool already exists."),
    "JobExists": (409, "The specified job already exists."),
    "TaskExists": (409, "The specified task already exists."),
    "PoolBeingDeleted": (
        409,
        "The specified pool has been marked for deletion and is being reclaimed.",
    ),
    "JobBeingDeleted": (
        409,
        "The specified job has been marked for deletion and is being reclaimed.",
    ),
    "JobCompleted": (409, "The specified job is already in a completed state."),
    "JobBeingTerminated": (409, "The specified job is being terminated."),
    "JobNotActive": (409, "The specified job is not active."),
    "TaskCompleted": (409, "The specified task is already completed."),
    "PoolNotSteady": (409, "The specified pool is not in steady allocation state."),
    # Node operations refused for the node's state (the codes of the .NET client's
    # BatchErrorCodeStrings).
    "NodeBeingCreated": (409, "The specified node is being created."),
    "NodeBeingStarted": (409, "The specified node is being started."),
    "NodeBeingRebooted": (409, "The specified node is being rebooted."),
    "NodeStateUnusable": (409, "The specified node is unusable."),
    "OperationInvalidForCurrentState": (
        409,
        "The specified operation is not valid for the current state of the resource.",
    ),
    "ConditionNotMet": (
        412,
        "The condition specified using HTTP conditional header(s) is not met.",
    ),
    "ServerBusy": (
        503,
        "The server is currently unable to receive requests. Please retry your request.",
    ),
    "TooManyRequests": (
        429,
        "The server is processing too many requests. Please retry your request.",
    ),
    "InternalError": (500, "The server encountered an internal error. Please retry the request."),
    "OperationTimedOut": (500, "The operation could not be completed within the permitted time."),
}


def _now_text() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def error_body(
    code: str,
    message: str,
    *,
    request_id: str,
    base_url: str,
    values: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """Build the JSON error body; the message carries RequestId and Time as the service's does."""
    body: dict[str, object] = {
        "odata.metadata": (
            f"{base_url}/$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element"
        ),
        "code": code,
        "message": {
            "lang": "en-US",
            "value": f"{message}\nRequestId:{request_id}\nTime:{_now_text()}",
        },
    }
    if values:
        body["values"] = [{"key": k, "value": v} for k, v in values.items()]
    return body


class BatchServiceError(Exception):
    """A refusal in the service's terms, raised by models and handlers, answered by the routes."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        status: int | None = None,
        values: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        known_status, known_message = ERRORS.get(code, (500, code))
        self.code = code
        self.status = status if status is not None else known_status
        self.message = message if message is not None else known_message
        self.values: dict[str, str] = dict(values or {})
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(f"{self.status} {code}: {self.message}")

    def body(self, *, request_id: str, base_url: str) -> dict[str, object]:
        """The JSON body the service would send for this error."""
        return error_body(
            self.code, self.message, request_id=request_id, base_url=base_url, values=self.values
        )


def batch_error(
    code: str,
    reason: str | None = None,
    *,
    status: int | None = None,
    message: str | None = None,
    **values: str,
) -> BatchServiceError:
    """Make the error for ``code``; ``reason`` and ``values`` become the body's ``values``."""
    vals: dict[str, str] = {}
    vals.update(values)
    if reason is not None:
        vals["Reason"] = reason
    return BatchServiceError(code, message, status, vals)

"""The exceptions joblib-azurebatch raises, in one small tree.

Callers catch :class:`AzureBatchError` for anything this library raises on its own behalf;
the subclasses tell apart what the user can fix before anything is created in Azure
(:class:`ConfigError`), what went wrong at the service boundary (:class:`ServiceError`),
and what went wrong on a node outside the user's code (:class:`TaskFailedError`)::

    AzureBatchError
    ├── ConfigError             bad or missing configuration; nothing was created
    │   └── CredentialError     a credential is missing or refused by the service
    ├── PayloadError            a call that cannot be shipped (unpicklable) or a payload that
    │   │                       does not verify (wrong signature, unknown envelope version)
    │   └── VersionMismatchError  the worker's Python/cloudpickle/joblib differ from the client's
    ├── ServiceError            an Azure Batch or Storage request failed after its retries
    │   ├── ThrottledError      still throttled (429) or unavailable (503) after the retries
    │   ├── QuotaError          an account quota is reached (jobs, pools, cores)
    │   └── RunLostError        the job, its pool or its nodes went away under a running call
    ├── TaskFailedError         a task failed outside the user's code: non-zero exit, killed,
    │                           result missing, retries exhausted (names job, task, stderr tail)
    └── RemoteError             stands in for a user exception that could not be unpickled

An exception raised by the user's own function is not wrapped: the caller gets its original
type, with the remote traceback attached as ``__cause__``.

:class:`ServiceError` and :class:`CredentialError` carry what the service said as fields,
``status_code``, ``error_code`` and ``operation``, so that a caller can decide what to do
(wait and retry, ask for a quota, fix a role assignment) without parsing the message. A
:class:`CredentialError` raised before any request (a missing key) has them empty.

Every class keeps a positional-only ``__init__`` signature compatible with ``Exception`` so that
instances pickle and unpickle (a keyword-only ``__init__`` does not unpickle).
"""

from __future__ import annotations

__all__ = [
    "AzureBatchError",
    "ConfigError",
    "CredentialError",
    "PayloadError",
    "QuotaError",
    "RemoteError",
    "RunLostError",
    "ServiceError",
    "TaskFailedError",
    "ThrottledError",
    "VersionMismatchError",
]

#: Error codes of the Batch service that mean an account quota is reached: on create
#: (jobs, pools) or in a pool's resize errors (cores). Any other code ending in
#: ``QuotaReached`` or ``QuotaExceeded`` counts too, so that a new quota is not missed.
_QUOTA_ERROR_CODES = frozenset(
    {
        "ActiveJobAndScheduleQuotaReached",
        "PoolQuotaReached",
        "AccountCoreQuotaReached",
        "AccountLowPriorityCoreQuotaReached",
        "AccountSpotCoreQuotaReached",
        "AccountVMSeriesCoreQuotaReached",
        "AutoPoolCreationFailedWithQuotaReached",
    }
)
#: HTTP statuses that mean "slow down" (429) or "try again later" (503).
_THROTTLED_STATUSES = frozenset({429, 503})


class AzureBatchError(Exception):
    """Base class of every error this library raises on its own behalf."""


class _ServiceFields(Exception):
    """The fields a refusal by a service carries, kept in ``args`` so that they pickle.

    ``args`` are ``(message, status_code, error_code, operation)``; ``str()`` is the message.
    """

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        error_code: str = "",
        operation: str = "",
        /,
    ) -> None:
        super().__init__(message, status_code, error_code, operation)
        self.status_code = status_code
        self.error_code = error_code
        self.operation = operation

    def __str__(self) -> str:
        return str(self.args[0])


class ConfigError(AzureBatchError, ValueError):
    """The configuration is invalid or incomplete; the message says what to set."""


class CredentialError(_ServiceFields, ConfigError):
    """A credential is missing, malformed or refused (for example a wrong account key).

    ``args`` are ``(message, status_code, error_code, operation)``, like
    :class:`ServiceError`'s: a refusal by the service fills them (403 ``AuthenticationFailed``
    while trying to "create the pool p"), a check of the config before any request leaves
    them at ``None``, ``""`` and ``""``.
    """


class PayloadError(AzureBatchError):
    """A batch of calls cannot be serialized, or a payload fails verification."""


class VersionMismatchError(PayloadError):
    """The worker's interpreter or libraries differ from the client's in a way that breaks
    unpickling (Python minor version, cloudpickle, joblib)."""


class ServiceError(_ServiceFields, AzureBatchError):
    """A request to Azure Batch or Azure Storage failed after the SDK's retries.

    ``args`` are ``(message, status_code, error_code, operation)`` so that the error pickles
    and the fields stay readable as attributes: the HTTP status (``None`` when no answer
    came, for example a connection error), the service's error code (``""`` when it sent
    none) and what was being attempted (``"create the job j on the pool p"``).
    """


class ThrottledError(ServiceError):
    """The service kept answering 429 (too many requests) or 503 (unavailable) after the
    retries, which honour ``Retry-After`` (the SDK's, or ``BatchConfig.retry_budget``
    seconds of them when adding tasks): waiting and trying again later can work."""


class QuotaError(ServiceError):
    """An account quota is reached (active jobs, pools, cores): retrying does not help
    until jobs or pools are deleted or the quota is raised (see ``error_code``)."""


class RunLostError(ServiceError):
    """The job or its pool was deleted or terminated from outside the run, or the pool had
    no usable node for longer than ``BatchConfig.capacity_timeout``: the pending calls fail
    with this instead of waiting forever. ``error_code`` says which (``JobDeleted``,
    ``JobTerminated``, ``PoolDeleted``, ``NoCapacity``)."""


def is_quota_code(error_code: str) -> bool:
    """Whether a service error code means that an account quota is reached."""
    return error_code in _QUOTA_ERROR_CODES or error_code.endswith(
        ("QuotaReached", "QuotaExceeded")
    )


def service_error(
    message: str, status_code: int | None = None, error_code: str = "", operation: str = ""
) -> ServiceError:
    """The :class:`ServiceError` subclass that fits the answer, built with its fields.

    Used by the two modules that speak to the services (batch.py, storage.py), so that both
    classify alike. A quota code wins over the status (a quota refusal is a 4xx whose code,
    not its status, says what it is); then 429 and 503 are throttling; anything else is a
    plain :class:`ServiceError`.
    """
    if is_quota_code(error_code):
        return QuotaError(message, status_code, error_code, operation)
    if status_code in _THROTTLED_STATUSES:
        return ThrottledError(message, status_code, error_code, operation)
    return ServiceError(message, status_code, error_code, operation)


class TaskFailedError(AzureBatchError):
    """A Batch task failed outside the user's code.

    ``args`` are ``(message, job_id, task_id, stderr_tail)`` so that the error pickles and
    the fields stay readable as attributes.
    """

    def __init__(
        self, message: str, job_id: str = "", task_id: str = "", stderr_tail: str = "", /
    ) -> None:
        super().__init__(message, job_id, task_id, stderr_tail)
        self.job_id = job_id
        self.task_id = task_id
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        text = str(self.args[0])
        if self.stderr_tail:
            text += "\n--- tail of the task's stderr.txt ---\n" + self.stderr_tail
        return text


class RemoteError(AzureBatchError):
    """Stands in for an exception raised in the user's function that could not be pickled
    or unpickled. ``args`` are ``(type_name, message, remote_traceback)``."""

    def __init__(self, type_name: str, message: str = "", remote_traceback: str = "", /) -> None:
        super().__init__(type_name, message, remote_traceback)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}\n\nRemote traceback:\n{self.remote_traceback}"

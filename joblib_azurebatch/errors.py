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
    ├── TaskFailedError         a task failed outside the user's code: non-zero exit, killed,
    │                           result missing, retries exhausted (names job, task, stderr tail)
    └── RemoteError             stands in for a user exception that could not be unpickled

An exception raised by the user's own function is not wrapped: the caller gets its original
type, with the remote traceback attached as ``__cause__``.

Every class keeps a positional-only ``__init__`` signature compatible with ``Exception`` so that
instances pickle and unpickle (a keyword-only ``__init__`` does not unpickle).
"""

from __future__ import annotations

__all__ = [
    "AzureBatchError",
    "ConfigError",
    "CredentialError",
    "PayloadError",
    "RemoteError",
    "ServiceError",
    "TaskFailedError",
    "VersionMismatchError",
]


class AzureBatchError(Exception):
    """Base class of every error this library raises on its own behalf."""


class ConfigError(AzureBatchError, ValueError):
    """The configuration is invalid or incomplete; the message says what to set."""


class CredentialError(ConfigError):
    """A credential is missing, malformed or refused (for example a wrong account key)."""


class PayloadError(AzureBatchError):
    """A batch of calls cannot be serialized, or a payload fails verification."""


class VersionMismatchError(PayloadError):
    """The worker's interpreter or libraries differ from the client's in a way that breaks
    unpickling (Python minor version, cloudpickle, joblib)."""


class ServiceError(AzureBatchError):
    """A request to Azure Batch or Azure Storage failed after the SDK's retries."""


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

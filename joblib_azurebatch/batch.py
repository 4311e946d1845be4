"""The one place that speaks to Azure Batch.

Everything the backend needs from the Batch service goes through :class:`BatchService`:
pools, jobs, task submission, task counts, the list of newly completed tasks and task files.
Azure SDK types stay inside this module; callers get the frozen dataclasses below and the
project's own errors (:mod:`joblib_azurebatch.errors`), always chained with ``raise ... from``.

Why it looks the way it does:

* Submission uses ``create_task_collection`` with chunks we build ourselves (≤100 tasks and
  well under the 1 MB body limit) and reads every per-task status case-insensitively: the SDK's
  own ``create_tasks`` compares statuses case-sensitively while the service has been seen to
  send ``ClientError``.
* Progress is read from the job's task counts and one filtered, ``$select``-ed listing of the
  tasks that completed since the last look; a per-task GET would cost one request per task
  per poll.
* Throttling (429), unavailability (503), other transient answers and connection errors
  are retried by azure-core's ``RetryPolicy`` for a time budget (``BatchConfig.retry_budget``)
  rather than a count, waiting as ``Retry-After`` asks (:mod:`joblib_azurebatch.retries`):
  a throttled request costs time, not the run. What is still refused when the budget is
  spent becomes a :class:`~joblib_azurebatch.errors.ThrottledError`, a reached account
  quota a :class:`~joblib_azurebatch.errors.QuotaError`, with the status, the service's
  error code and the operation as fields. Adding tasks is retried here instead, with the
  same budget and waits, because a resend carries only the tasks not added yet; the SDK's
  own retries are switched off for it so that the two do not stack. Creating a job waits
  out a reached job quota for the same budget.
* Every call goes through :meth:`BatchService._call`, which also swallows the answers that
  mean "already done" (a 404 on delete, ``PoolExists`` on create), so that each method says
  which those are in one line instead of its own ``try`` ladder.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import random
import shlex
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlparse

from azure.batch import BatchClient
from azure.batch import models as bm

# Not re-exported by azure.batch.models in 15.1, yet begin_terminate_job needs it: an empty
# body is refused by the service.
from azure.batch.models._models import BatchJobTerminateOptions
from azure.core.credentials import AzureNamedKeyCredential, TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.policies import RetryPolicy
from azure.core.polling import LROPoller

from . import retries, shutdown
from .config import _package_version
from .credentials import CredentialLease, lease_credential
from .errors import (
    AzureBatchError,
    ConfigError,
    CredentialError,
    QuotaError,
    ServiceError,
    is_quota_code,
    service_error,
)

if TYPE_CHECKING:
    from .config import BatchConfig

__all__ = [
    "JOB_ID_PREFIX",
    "BatchService",
    "JobInfo",
    "PoolInfo",
    "PoolSpec",
    "ResourceFile",
    "StartTaskSpec",
    "TaskCounts",
    "TaskOutcome",
    "TaskSpec",
    "pool_differences",
]

_log = logging.getLogger(__name__)

#: The service refuses more than 100 tasks per addtaskcollection call.
MAX_TASKS_PER_CALL = 100
#: The service refuses bodies over 1 MB; stay well under it (JSON overhead, headers).
MAX_BODY_BYTES = 900_000
#: How many addtaskcollection calls run at once.
SUBMIT_CONCURRENCY = 4
#: Without ``Retry-After``, the first wait before resending a chunk; it doubles each time.
SUBMIT_BACKOFF_FIRST = retries.BACKOFF_FIRST
#: The longest wait between two attempts without ``Retry-After``.
SUBMIT_BACKOFF_MAX = retries.BACKOFF_MAX
#: The longest wait a ``Retry-After`` is honoured for in one go: a longer one is waited out
#: in steps of this, each followed by an attempt.
RETRY_AFTER_MAX = retries.RETRY_AFTER_MAX
#: Seconds a chunk is retried by default (``BatchConfig.retry_budget``).
DEFAULT_RETRY_BUDGET = retries.DEFAULT_RETRY_BUDGET
#: The first wait before creating a job again when the account's job quota is reached; it
#: doubles up to ``QUOTA_WAIT_MAX``. A quota frees up as other runs end, in minutes.
QUOTA_WAIT_FIRST = 5.0
QUOTA_WAIT_MAX = 60.0
#: What each quota error code counts, for messages.
_QUOTA_NAMES = {
    "ActiveJobAndScheduleQuotaReached": "active jobs and job schedules",
    "PoolQuotaReached": "pools",
}

_READY_NODE_STATES = frozenset({"idle", "running"})

#: Sent before the SDK's own user agent, so that the account's logs tell our requests apart.
_USER_AGENT = f"joblib-azurebatch/{_package_version()}"

#: Jobs this library creates start with this (``BatchConfig.new_job_id`` without ``job_id``).
#: The CLI's cleanup does not rely on it: it matches the ``-{UTC time}-{hex}`` suffix that
#: every such id ends with, whatever its prefix.
JOB_ID_PREFIX = "joblib"


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, kw_only=True)
class ResourceFile:
    """A file Batch downloads into a task's working directory before it starts."""

    http_url: str = field(repr=False)  # a SAS URL: a capability, never logged
    file_path: str
    #: The ARM resource id of the pool's user-assigned identity that Batch downloads the
    #: file with (``identityReference``); ``http_url`` then carries no SAS.
    identity_reference: str | None = None


@dataclass(frozen=True, kw_only=True)
class StartTaskSpec:
    """The pool's start task: runs once per node, in ``image`` when given, as admin, and
    the node takes no task until it succeeded (``waitForSuccess``)."""

    command_line: str
    image: str | None = None
    resource_files: tuple[ResourceFile, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)
    max_retries: int = 1


@dataclass(frozen=True, kw_only=True)
class PoolSpec:
    """What the backend wants a pool to look like; built from a :class:`BatchConfig`."""

    pool_id: str
    vm_size: str
    dedicated_nodes: int
    spot_nodes: int
    task_slots_per_node: int
    image: str
    node_image_publisher: str
    node_image_offer: str
    node_image_sku: str
    node_agent_sku_id: str
    registry_server: str | None = None
    registry_username: str | None = None
    registry_password: str | None = field(default=None, repr=False)
    start_task_command: str | None = None
    #: The start task that installs the client's environment (the default, no-image path);
    #: ``start_task_command`` then runs before it, in the same shell.
    start_task: StartTaskSpec | None = None
    #: Name/value pairs stored on the pool when it is created: who created it, and whether
    #: the library may delete it once idle (see :mod:`joblib_azurebatch.pools`).
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: With a formula, the pool is created autoscaling (the formula sizes it, not the node
    #: counts): how a pool the library creates stops billing when it is left idle.
    autoscale_formula: str | None = None

    @classmethod
    def from_config(cls, cfg: BatchConfig, *, start_task: StartTaskSpec | None = None) -> PoolSpec:
        return cls(
            start_task=start_task,
            pool_id=cfg.pool_id,
            vm_size=cfg.vm_size,
            dedicated_nodes=cfg.dedicated_nodes,
            spot_nodes=cfg.spot_nodes,
            task_slots_per_node=cfg.task_slots_per_node,
            image=cfg.node_image,
            node_image_publisher=cfg.node_image_publisher,
            node_image_offer=cfg.node_image_offer,
            node_image_sku=cfg.node_image_sku,
            node_agent_sku_id=cfg.node_agent_sku_id,
            registry_server=cfg.registry_server,
            registry_username=cfg.registry_username,
            registry_password=cfg.registry_password,
            start_task_command=cfg.start_task_command,
        )

    @property
    def target_slots(self) -> int:
        """Task slots the pool has once every node it asks for is up."""
        return (self.dedicated_nodes + self.spot_nodes) * self.task_slots_per_node


@dataclass(frozen=True, kw_only=True)
class PoolInfo:
    """A pool as the service reports it (enum values lower-cased)."""

    pool_id: str
    state: str
    allocation_state: str
    vm_size: str
    target_dedicated_nodes: int
    target_spot_nodes: int
    current_dedicated_nodes: int
    current_spot_nodes: int
    task_slots_per_node: int
    image_names: tuple[str, ...] = ()
    resize_errors: tuple[str, ...] = ()
    #: Node state -> count; only filled by :meth:`BatchService.wait_for_capacity`.
    node_states: Mapping[str, int] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    auto_scale: bool = False
    #: ARM resource ids of the pool's user-assigned managed identities (set through the
    #: management plane; the data plane only reads them).
    identities: tuple[str, ...] = ()

    @property
    def ready_nodes(self) -> int:
        return sum(n for s, n in self.node_states.items() if s in _READY_NODE_STATES)

    @property
    def ready_slots(self) -> int:
        return self.ready_nodes * self.task_slots_per_node

    @property
    def target_slots(self) -> int:
        return (self.target_dedicated_nodes + self.target_spot_nodes) * self.task_slots_per_node


@dataclass(frozen=True, kw_only=True)
class JobInfo:
    """A job as the service lists it (enum values lower-cased)."""

    job_id: str
    pool_id: str | None
    state: str
    creation_time: _dt.datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: Why the job ended, when it was terminated (``executionInfo.terminateReason``).
    terminate_reason: str = ""


#: What a job listing or read asks for.
_JOB_FIELDS = ("id", "poolInfo", "state", "creationTime", "metadata", "executionInfo")


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One Batch task: the worker command in the worker image with its environment."""

    task_id: str
    command_line: str
    image: str
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)
    resource_files: tuple[ResourceFile, ...] = ()
    max_retries: int = 3
    #: Seconds; None leaves the service default (unlimited).
    max_wall_clock: float | None = None


@dataclass(frozen=True, kw_only=True)
class TaskCounts:
    active: int
    running: int
    completed: int
    succeeded: int
    failed: int


@dataclass(frozen=True, kw_only=True)
class TaskOutcome:
    """A completed task, from the filtered listing."""

    task_id: str
    state: str
    transition_time: _dt.datetime
    exit_code: int | None = None
    #: ``"code: message"`` of the task's failureInfo, if it has one.
    failure: str | None = None
    result: str | None = None
    retry_count: int = 0
    requeue_count: int = 0
    start_time: _dt.datetime | None = None
    end_time: _dt.datetime | None = None
    node_id: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.failure is None and self.exit_code == 0


def pool_differences(info: PoolInfo, spec: PoolSpec) -> list[str]:
    """Human-readable ways in which an existing pool differs from what the config asks for.

    An existing pool is never changed (it may be shared, or sized by hand on purpose); the
    backend only warns, so a user who expected eight spot nodes learns why they got two.
    """
    diffs: list[str] = []
    if info.vm_size.lower() != spec.vm_size.lower():
        diffs.append(f"vm_size is {info.vm_size!r}, the config asks for {spec.vm_size!r}")
    if info.target_dedicated_nodes != spec.dedicated_nodes:
        diffs.append(
            f"{info.target_dedicated_nodes} dedicated nodes, "
            f"the config asks for {spec.dedicated_nodes}"
        )
    if info.target_spot_nodes != spec.spot_nodes:
        diffs.append(f"{info.target_spot_nodes} spot nodes, the config asks for {spec.spot_nodes}")
    if info.task_slots_per_node != spec.task_slots_per_node:
        diffs.append(
            f"{info.task_slots_per_node} task slots per node, "
            f"the config asks for {spec.task_slots_per_node}"
        )
    if spec.image not in info.image_names:
        listed = ", ".join(info.image_names) or "none"
        diffs.append(
            f"the image {spec.image!r} is not among the pool's container images ({listed}); "
            "tasks will pull it on first use"
        )
    return diffs


# --------------------------------------------------------------------------- helpers


def _identities(identity: bm.BatchPoolIdentity | None) -> tuple[str, ...]:
    """The resource ids of a pool's user-assigned identities."""
    found = identity.user_assigned_identities if identity is not None else None
    return tuple(str(i.resource_id) for i in found or () if i is not None and i.resource_id)


def _resource_file(file: ResourceFile) -> bm.ResourceFile:
    identity = (
        bm.BatchNodeIdentityReference(resource_id=file.identity_reference)
        if file.identity_reference
        else None
    )
    return bm.ResourceFile(
        http_url=file.http_url, file_path=file.file_path, identity_reference=identity
    )


def _metadata(items: Sequence[Any] | None) -> dict[str, str]:
    """The service's name/value list as a dict."""
    return {str(m.name): str(m.value or "") for m in items or () if m is not None and m.name}


def _metadata_items(values: Mapping[str, str]) -> list[bm.BatchMetadataItem] | None:
    return [bm.BatchMetadataItem(name=k, value=v) for k, v in values.items()] or None


def _holds(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(have.get(k) == v for k, v in want.items())


def _sizing(spec: PoolSpec) -> dict[str, Any]:
    """Fixed node counts, or an autoscale formula (the service refuses both at once)."""
    if spec.autoscale_formula:
        return {
            "enable_auto_scale": True,
            "auto_scale_formula": spec.autoscale_formula,
            "auto_scale_evaluation_interval": _dt.timedelta(minutes=5),
        }
    return {
        "target_dedicated_nodes": spec.dedicated_nodes,
        "target_low_priority_nodes": spec.spot_nodes,
    }


def _enum_text(value: Any) -> str:
    """Lower-cased text of an SDK enum or of the raw string the service sent."""
    if value is None:
        return ""
    if isinstance(value, Enum):
        value = value.value
    return str(value).lower()


def _odata_datetime(moment: _dt.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    utc = moment.astimezone(_dt.timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _error_code(e: HttpResponseError) -> str:
    code = getattr(e, "error", None)
    text = getattr(code, "code", None)
    if text:
        return str(text)
    model = getattr(e, "model", None)
    return str(getattr(model, "code", "") or "")


def _default_credential() -> TokenCredential:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def _error_message(e: AzureError) -> str:
    if isinstance(e, HttpResponseError):
        model = getattr(e, "model", None)
        message = getattr(getattr(model, "message", None), "value", None)
        if message:
            return str(message).splitlines()[0]
        return str(e.reason or e.message or "").splitlines()[0]
    return str(e.message or e).splitlines()[0] if str(e) else type(e).__name__


def _retry_after(e: HttpResponseError) -> float | None:
    """Seconds the answer asks to wait, if it says (see :func:`.retries.retry_after`)."""
    response = getattr(e, "response", None)
    return retries.retry_after(getattr(response, "headers", None))


def _backoff(retry: int) -> float:
    """The wait before the ``retry``-th resend (from 1) when the service gave no
    ``Retry-After`` (see :func:`.retries.backoff`): jittered so that the four submission
    threads and other clients throttled at the same moment do not all come back at once."""
    return retries.backoff(
        retry, first=SUBMIT_BACKOFF_FIRST, ceiling=SUBMIT_BACKOFF_MAX, uniform=random.uniform
    )


#: Retries of one poll (task counts, the completed tasks listing): the tracker polls again
#: a moment later and keeps its own budget, so a poll must not block its thread (and the
#: watchdog it runs) for the whole retry budget.
POLL_RETRIES = 2


class _BudgetRetryPolicy(RetryPolicy):  # type: ignore[type-arg]
    """azure-core's ``RetryPolicy``, retrying for a time budget instead of a count.

    azure-core's loop sends the attempts and decides which answers are worth one (408,
    429, 500, 502, 503, 504, any answer with ``Retry-After``, and connection errors);
    :mod:`.retries` decides how long to wait and when to stop. POST and PATCH are resent
    too, which azure-core only does for 500/503/504: every POST this library sends is safe
    to repeat (a create treats ``PoolExists`` / ``JobExists`` as done, a terminate
    ``JobBeingTerminated`` / ``JobCompleted``, and adding tasks retries by itself with
    ``retry_total=0``). A per-call ``retry_total=0`` still turns every retry off.

    azure-core's own ``timeout`` is left alone: when it runs out it raises a bare
    ``ServiceResponseTimeoutError``, where the budget ends with the service's last answer
    (its status and error code reach the caller's error).
    """

    #: Counts that never run out before the budget does.
    _UNCOUNTED = 1 << 30

    def __init__(self, budget: retries.RetryBudget) -> None:
        super().__init__(
            retry_total=self._UNCOUNTED,
            retry_connect=self._UNCOUNTED,
            retry_read=self._UNCOUNTED,
            retry_status=self._UNCOUNTED,
        )
        self._budget = budget
        self._method_whitelist = self._method_whitelist | {"POST", "PATCH"}

    def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().configure_retries(options)
        settings["attempts"] = self._budget.start()
        settings["wait"] = 0.0
        return settings

    def increment(
        self, settings: dict[str, Any], response: Any = None, error: Exception | None = None
    ) -> bool:
        if not super().increment(settings, response=response, error=error):
            return False
        answer = getattr(response, "http_response", None)
        request = getattr(response, "http_request", None)
        # The path only: no query string reaches a log line.
        what = f"{getattr(request, 'method', '')} {urlparse(str(getattr(request, 'url', ''))).path}"
        if answer is not None:
            reason = f"{what} answered {answer.status_code}"
            asked = retries.retry_after(answer.headers)
        else:
            reason = f"{what} failed ({type(error).__name__})"
            asked = None
        wait = cast(retries.Attempts, settings["attempts"]).next_wait(asked, reason=reason)
        if wait is None:
            return False
        settings["wait"] = wait
        return True

    def sleep(self, settings: dict[str, Any], transport: Any, response: Any = None) -> None:
        if settings["wait"] > 0:
            transport.sleep(settings["wait"])


def _task_body_size(task: bm.BatchTaskCreateOptions) -> int:
    return len(json.dumps(task.as_dict(), default=str)) + 2


def _chunks(
    tasks: Sequence[bm.BatchTaskCreateOptions],
) -> Iterator[list[bm.BatchTaskCreateOptions]]:
    """Greedy chunks of at most 100 tasks and at most ~900 kB of JSON each."""
    chunk: list[bm.BatchTaskCreateOptions] = []
    size = 0
    for task in tasks:
        task_size = _task_body_size(task)
        if task_size > MAX_BODY_BYTES:
            raise ConfigError(
                f"task {task.id} is {task_size} bytes of JSON, over the Batch limit of 1 MB "
                "per request: pass large values through blobs, not environment settings"
            )
        if chunk and (len(chunk) >= MAX_TASKS_PER_CALL or size + task_size > MAX_BODY_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(task)
        size += task_size
    if chunk:
        yield chunk


def _account_name(cfg: BatchConfig) -> str:
    if cfg.batch_account:
        return str(cfg.batch_account)
    host = urlparse(str(cfg.batch_url or "")).hostname or ""
    return host.split(".")[0]


# --------------------------------------------------------------------------- the service


class BatchService:
    """A thin, typed facade over ``azure.batch.BatchClient`` for what the backend needs.

    Thread-safe: the SDK client is, and the only mutable state here is the executor that
    runs several addtaskcollection calls at once.
    """

    def __init__(
        self,
        client: BatchClient,
        *,
        account: str,
        uses_key: bool,
        poll_interval: float = 2.0,
        credential_lease: CredentialLease | None = None,
        retry_budget: float = DEFAULT_RETRY_BUDGET,
    ) -> None:
        self._client = client
        self._retry_budget = retry_budget
        # Released by close(): a credential this library created is closed by the last
        # client that holds it (see joblib_azurebatch.credentials).
        self._credential_lease = credential_lease
        self._account = account
        self._uses_key = uses_key
        self._poll_interval = poll_interval
        # The SDK's job pollers annotate their interval as int but sleep for whatever they get;
        # a whole second would add up to a second to the end of every Parallel call.
        self._lro_interval = cast(int, poll_interval)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        #: Number of create_task_collection calls made (for tests and benchmarks).
        self.submit_calls = 0

    # ---- construction

    @classmethod
    def from_config(cls, cfg: BatchConfig) -> BatchService:
        """Build the client from the config's endpoint and credential.

        A shared key signs requests itself (``AzureNamedKeyCredential``); without one, a
        ``TokenCredential`` is used: the config's as given, else a ``DefaultAzureCredential``
        shared with the config's :class:`~joblib_azurebatch.storage.BlobStore` and closed
        with the last of them. The SDK refuses to send a bearer token over plain http, so
        that combination is refused here with the fix instead of failing on the first
        request. Call :meth:`close` when done.
        """
        url = cfg.batch_url
        if not url:
            raise ConfigError(
                "no Batch account endpoint: set batch_url= or BATCH_ACCOUNT_URL "
                "(https://<account>.<region>.batch.azure.com)"
            )
        account = _account_name(cfg)
        credential: AzureNamedKeyCredential | TokenCredential
        lease: CredentialLease | None = None
        if cfg.batch_key:
            if not account:
                raise ConfigError(
                    "a Batch account key needs the account name: set batch_account= "
                    "or BATCH_ACCOUNT_NAME"
                )
            credential = AzureNamedKeyCredential(account, cfg.batch_key)
            uses_key = True
        else:
            if urlparse(url).scheme.lower() != "https":
                raise CredentialError(
                    f"the Batch endpoint {url} is plain http, and token credentials are only "
                    "sent over https: give the account key (batch_key= or BATCH_ACCOUNT_KEY) "
                    "or use an https endpoint"
                )
            lease = lease_credential(cfg, cfg.batch_credential, _default_credential)
            credential = cast(TokenCredential, lease.credential)
            uses_key = False
        try:
            client = BatchClient(
                endpoint=url,
                credential=credential,
                retry_policy=_BudgetRetryPolicy(retries.RetryBudget(seconds=cfg.retry_budget)),
                connection_timeout=30,
                read_timeout=120,
                user_agent=_USER_AGENT,
                # A corporate proxy that re-signs TLS needs its CA; None keeps the default store.
                **({"connection_verify": cfg.ca_bundle} if cfg.ca_bundle else {}),
            )
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        return cls(
            client,
            account=account,
            uses_key=uses_key,
            poll_interval=cfg.poll_interval,
            credential_lease=lease,
            retry_budget=cfg.retry_budget,
        )

    def close(self) -> None:
        """Stop the submission threads, release the HTTP connections and the credential.

        Safe to call more than once. A ``DefaultAzureCredential`` created for the config is
        closed once every client sharing it is closed; the user's own credential never is.
        """
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
        try:
            self._client.close()
        finally:
            if self._credential_lease is not None:
                self._credential_lease.release()

    # ---- error translation

    def _translate(self, e: AzureError, what: str) -> AzureBatchError:
        """The project's error for an SDK error raised while trying to ``what``.

        Fills ``status_code``, ``error_code`` and ``operation`` so that callers need not
        parse the message; the message itself names the account and the fix.
        """
        status = getattr(e, "status_code", None)
        status = status if isinstance(status, int) else None
        code = _error_code(e) if isinstance(e, HttpResponseError) else ""
        if isinstance(e, ClientAuthenticationError) or status in (401, 403):
            if self._uses_key:
                return CredentialError(
                    f"the Batch account key for {self._account} was refused while trying to "
                    f"{what}: check BATCH_ACCOUNT_KEY (or batch_key=) and BATCH_ACCOUNT_NAME",
                    status,
                    code,
                    what,
                )
            return CredentialError(
                f"the Azure credential was refused by the Batch account {self._account} while "
                f"trying to {what}: check that the identity has a Batch data-plane role on the "
                f"account ({_error_message(e)})",
                status,
                code,
                what,
            )
        if isinstance(e, HttpResponseError):
            return service_error(
                f"could not {what}: the Batch service answered {status} {code}: "
                f"{_error_message(e)}",
                status,
                code,
                what,
            )
        if isinstance(e, (ServiceRequestError, ServiceResponseError)):
            return ServiceError(
                f"could not {what}: the Batch account at {self._client._config.endpoint} "
                f"did not answer ({_error_message(e)})",
                None,
                "",
                what,
            )
        return ServiceError(f"could not {what}: {_error_message(e)}", None, "", what)

    @contextmanager
    def _call(
        self, what: str, *, ok_codes: Collection[str] = (), missing_ok: bool = False
    ) -> Iterator[None]:
        """Run one request; translate its SDK errors, or swallow those that mean "done".

        ``missing_ok`` swallows a 404 (the pool or job is already gone); ``ok_codes`` are
        the service's error codes that mean the same for this call (``PoolBeingDeleted`` on
        a delete, ``PoolExists`` on a create). A swallowed error ends the ``with`` block
        early, so callers that read a value inside it must check that it was set.
        """
        try:
            yield
        except HttpResponseError as e:
            if missing_ok and (isinstance(e, ResourceNotFoundError) or e.status_code == 404):
                return
            if ok_codes and _error_code(e) in ok_codes:
                return
            raise self._translate(e, what) from e
        except AzureError as e:
            raise self._translate(e, what) from e

    # ---- pools

    @staticmethod
    def _pool_info(pool: bm.BatchPool, node_states: Mapping[str, int] | None = None) -> PoolInfo:
        vmc = pool.virtual_machine_configuration
        cc = vmc.container_configuration if vmc is not None else None
        images = tuple(cc.container_image_names or ()) if cc is not None else ()
        errors = tuple(
            f"{err.code}: {err.message}" for err in (pool.resize_errors or ()) if err is not None
        )
        return PoolInfo(
            pool_id=pool.id,
            state=_enum_text(pool.state),
            allocation_state=_enum_text(pool.allocation_state),
            vm_size=pool.vm_size or "",
            target_dedicated_nodes=pool.target_dedicated_nodes or 0,
            target_spot_nodes=pool.target_low_priority_nodes or 0,
            current_dedicated_nodes=pool.current_dedicated_nodes or 0,
            current_spot_nodes=pool.current_low_priority_nodes or 0,
            task_slots_per_node=pool.task_slots_per_node or 1,
            image_names=images,
            resize_errors=errors,
            node_states=dict(node_states or {}),
            metadata=_metadata(pool.metadata),
            auto_scale=bool(pool.enable_auto_scale),
            identities=_identities(pool.identity),
        )

    def get_pool(self, pool_id: str) -> PoolInfo | None:
        """The pool, or None if there is none (``pool_exists`` raises instead of saying so)."""
        pool: bm.BatchPool | None = None
        with self._call(f"read the pool {pool_id}", missing_ok=True):
            pool = self._client.get_pool(pool_id)
        return None if pool is None else self._pool_info(pool)

    def list_pools(self) -> list[PoolInfo]:
        with self._call("list the pools"):
            return [self._pool_info(p) for p in self._client.list_pools()]

    def create_pool(self, spec: PoolSpec) -> bool:
        """Create the pool; True if this request made it.

        ``PoolExists`` is not an error (another client won the race, or this request's
        first attempt did and its reply was lost): it returns False, and :meth:`ensure_pool`
        tells the two apart by the pool's metadata.
        """
        registries = None
        if spec.registry_server:
            registries = [
                bm.ContainerRegistryReference(
                    registry_server=spec.registry_server,
                    username=spec.registry_username,
                    password=spec.registry_password,
                )
            ]
        start_task = self._start_task(spec)
        options = bm.BatchPoolCreateOptions(
            id=spec.pool_id,
            vm_size=spec.vm_size,
            virtual_machine_configuration=bm.VirtualMachineConfiguration(
                image_reference=bm.BatchVmImageReference(
                    publisher=spec.node_image_publisher,
                    offer=spec.node_image_offer,
                    sku=spec.node_image_sku,
                    version="latest",
                ),
                node_agent_sku_id=spec.node_agent_sku_id,
                container_configuration=bm.BatchContainerConfiguration(
                    type="dockerCompatible",
                    container_image_names=[spec.image],
                    container_registries=registries,
                ),
            ),
            task_slots_per_node=spec.task_slots_per_node,
            task_scheduling_policy=bm.BatchTaskSchedulingPolicy(node_fill_type="spread"),
            start_task=start_task,
            metadata=_metadata_items(spec.metadata),
            **_sizing(spec),
        )
        with self._call(f"create the pool {spec.pool_id}", ok_codes=("PoolExists",)):
            self._client.create_pool(options)
            return True

    @staticmethod
    def _start_task(spec: PoolSpec) -> bm.BatchStartTask | None:
        """The user's start task command, the environment's, or both in one shell."""
        admin = bm.UserIdentity(
            auto_user=bm.AutoUserSpecification(scope="pool", elevation_level="admin")
        )
        env = spec.start_task
        if env is None:
            if not spec.start_task_command:
                return None
            return bm.BatchStartTask(
                command_line=spec.start_task_command,
                wait_for_success=True,
                max_task_retry_count=1,
                user_identity=admin,
            )
        command = env.command_line
        if spec.start_task_command:
            command = f"/bin/sh -c {shlex.quote(spec.start_task_command + ' && ' + command)}"
        return bm.BatchStartTask(
            command_line=command,
            container_settings=(
                bm.BatchTaskContainerSettings(image_name=env.image) if env.image else None
            ),
            resource_files=[_resource_file(r) for r in env.resource_files],
            environment_settings=[
                bm.EnvironmentSetting(name=k, value=v) for k, v in env.environment.items()
            ],
            wait_for_success=True,
            max_task_retry_count=env.max_retries,
            user_identity=admin,
        )

    def ensure_pool(self, spec: PoolSpec, *, timeout: float = 600.0) -> tuple[PoolInfo, bool]:
        """Return the pool and whether this call created it.

        An existing pool is left exactly as it is. A pool that is being deleted (the end of
        a previous run) is waited out and then created afresh, since the service refuses to
        create a pool whose id is still in the deleting state.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.get_pool(spec.pool_id)
            if info is None:
                made = self.create_pool(spec)
                created = self.get_pool(spec.pool_id)
                if created is None:
                    raise ServiceError(f"the pool {spec.pool_id} vanished right after creation")
                # A lost reply resent gets PoolExists: the pool is still ours if it carries
                # this spec's metadata (which holds a token no other client has).
                ours = made or (bool(spec.metadata) and _holds(created.metadata, spec.metadata))
                return created, ours
            if info.state != "deleting":
                return info, False
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"the pool {spec.pool_id} has been deleting for over {timeout:.0f} s; "
                    "wait for it to go or choose another pool_id"
                )
            time.sleep(max(self._poll_interval, 0.1))

    def pool_status(self, pool_id: str) -> PoolInfo | None:
        """The pool with the count of its nodes in each state, or None if it is gone.

        For the run's watchdog: its requests retry only ``POLL_RETRIES`` times, since the
        watchdog looks again soon and must not hold the tracker's thread for long."""
        pool: bm.BatchPool | None = None
        with self._call(f"read the pool {pool_id}", missing_ok=True):
            pool = self._client.get_pool(pool_id, retry_total=POLL_RETRIES)
        if pool is None:
            return None
        info = self._pool_info(pool)
        try:
            states = self._node_states(pool_id, retry_total=POLL_RETRIES)
        except ServiceError as e:
            if e.status_code == 404:
                return None
            raise
        return replace(info, node_states=states)

    def _node_states(self, pool_id: str, **options: Any) -> dict[str, int]:
        states: dict[str, int] = {}
        with self._call(f"list the nodes of the pool {pool_id}"):
            for node in self._client.list_nodes(pool_id, select=["id", "state"], **options):
                key = _enum_text(node.state)
                states[key] = states.get(key, 0) + 1
        return states

    def wait_for_capacity(
        self,
        pool_id: str,
        *,
        min_slots: int,
        timeout: float,
        progress: Callable[[PoolInfo], None],
    ) -> PoolInfo:
        """Wait until the pool has ``min_slots`` usable task slots (idle or running nodes).

        Calls ``progress`` after every look so the caller can show a line. Gives up with a
        :class:`ServiceError` when the pool stops resizing with no usable node and reports
        resize errors (quota, unavailable VM size), or when ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while True:
            what = f"read the pool {pool_id}"
            try:
                pool = self._client.get_pool(pool_id)
            except ResourceNotFoundError as e:
                raise ServiceError(
                    f"the pool {pool_id} was deleted while waiting for its nodes",
                    e.status_code,
                    _error_code(e),
                    what,
                ) from e
            except AzureError as e:
                raise self._translate(e, what) from e
            info = self._pool_info(pool, self._node_states(pool_id))
            progress(info)
            if info.ready_slots >= min_slots:
                return info
            if info.allocation_state == "steady" and info.ready_nodes == 0:
                if info.resize_errors:
                    # A reached core quota is the usual cause: say so in the error's type.
                    codes = [r.code for r in pool.resize_errors or () if r is not None and r.code]
                    code = next((c for c in codes if is_quota_code(c)), codes[0] if codes else "")
                    raise service_error(
                        f"the pool {pool_id} could not get nodes: " + "; ".join(info.resize_errors),
                        None,
                        code,
                        f"wait for nodes in the pool {pool_id}",
                    )
                if info.target_dedicated_nodes + info.target_spot_nodes == 0:
                    raise ServiceError(
                        f"the pool {pool_id} is sized to zero nodes: resize it or set "
                        "dedicated_nodes= / spot_nodes="
                    )
                unusable = {
                    s: n
                    for s, n in info.node_states.items()
                    if s in ("unusable", "starttaskfailed", "offline")
                }
                if unusable and sum(unusable.values()) == sum(info.node_states.values()):
                    raise ServiceError(
                        f"every node of the pool {pool_id} is unusable ({unusable}); "
                        + self._node_failure(pool_id)
                    )
            if info.ready_nodes == 0 and info.node_states.get("starttaskfailed", 0) > 0:
                # Every node runs the same start task: one that failed (a package that does
                # not exist, no wheel for the node's platform) predicts the rest, and waiting
                # for the others only bills their boot time.
                raise ServiceError(
                    f"the start task of the pool {pool_id} failed, so no node can take a "
                    "task; " + self._node_failure(pool_id)
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"the pool {pool_id} had no usable task slot after {timeout:.0f} s "
                    f"(nodes: {dict(info.node_states) or 'none yet'}); raise pool_timeout= "
                    "or check the pool in the Azure portal"
                )
            time.sleep(max(self._poll_interval, 0.05))

    def _node_failure(self, pool_id: str, *, tail_bytes: int = 4096) -> str:
        """What went wrong on the first failed node: its start task's exit code or failure,
        its errors (an image that cannot be pulled), and the tail of the start task's stderr.

        Used to explain a failure, so it never raises: a second error would hide the first.
        """
        try:
            nodes = list(
                self._client.list_nodes(pool_id, select=["id", "state", "startTaskInfo", "errors"])
            )
        except AzureError as e:
            _log.debug("could not list the nodes of %s: %s", pool_id, e)
            return "check the start task and the container image"
        failed = [
            n for n in nodes if _enum_text(n.state) in ("starttaskfailed", "unusable", "offline")
        ]
        if not failed:
            return "check the start task and the container image"
        node = failed[0]
        parts = [f"on the node {node.id} ({_enum_text(node.state)})"]
        info = node.start_task_info
        if info is not None:
            if info.failure_info is not None:
                fi = info.failure_info
                parts.append(f"the start task failed with {fi.code}: {fi.message}")
            elif info.exit_code is not None:
                parts.append(f"the start task exited with code {info.exit_code}")
        for err in node.errors or ():
            if err is not None:
                parts.append(f"node error {err.code}: {err.message}")
        text = ", ".join(parts) + "."
        tail = self._read_node_file(pool_id, str(node.id), "startup/stderr.txt", tail_bytes)
        # The environment's installer ends with one line that says what failed: put it first.
        verdict = [ln for ln in tail.splitlines() if ln.startswith("[joblib-azurebatch bootstrap]")]
        if verdict:
            text = f"{verdict[-1]}; {text}"
        if tail.strip():
            text += "\n--- tail of the start task's stderr.txt ---\n" + tail
        return text

    def _read_node_file(self, pool_id: str, node_id: str, path: str, tail_bytes: int) -> str:
        return _file_tail(
            lambda: self._client.get_node_file_properties(pool_id, node_id, path),
            lambda span: self._client.download_node_file(pool_id, node_id, path, ocp_range=span),
            tail_bytes=tail_bytes,
            where=f"{path} of the node {pool_id}/{node_id}",
        )

    def delete_pool(self, pool_id: str) -> None:
        """Start deleting the pool (the service finishes it in the background)."""
        with self._call(
            f"delete the pool {pool_id}",
            ok_codes=("PoolBeingDeleted", "PoolNotFound"),
            missing_ok=True,
        ):
            # The SDK polls from a thread it starts: one that takes no SIGTERM.
            shutdown.call_quietly(
                lambda: self._client.begin_delete_pool(pool_id, polling_interval=5)
            )

    def enable_autoscale(self, pool_id: str, formula: str) -> None:
        """Give the pool ``formula``, evaluated every 5 minutes and, by the service, at once.

        This is how a run wakes a pool that drained while idle (:mod:`.idle`): the formula
        with a fresh wake time sizes the pool up immediately instead of at its next
        evaluation.

        The service refuses the call for a pool more than once every 30 seconds
        (``TooManyEnableAutoScaleRequests``, status 503, in Microsoft's table of Batch error
        codes). That refusal means another run woke the pool moments ago with an equivalent
        formula, so it counts as done. azure-core would retry that 503 by itself until the
        30 seconds are over, so the SDK's retries are off for this call; throttling and
        transient failures (408, 429, another 503, 5xx, a dropped connection) are retried
        here instead, for at most 30 seconds: a wake that does not happen only delays the
        pool until its formula sees the run's pending tasks.
        """
        what = f"enable autoscale on the pool {pool_id}"
        options = bm.BatchPoolEnableAutoScaleOptions(
            auto_scale_formula=formula,
            auto_scale_evaluation_interval=_dt.timedelta(minutes=5),
        )
        attempts = retries.RetryBudget(
            seconds=min(self._retry_budget, 30.0), clock=time.monotonic
        ).start()
        while True:
            try:
                with self._call(what, ok_codes=("TooManyEnableAutoScaleRequests",)):
                    self._client.enable_pool_auto_scale(pool_id, options, retry_total=0)
                return
            except ServiceError as e:
                status = e.status_code
                if status is not None and status not in retries.RETRY_STATUSES:
                    raise
                cause = e.__cause__
                asked = _retry_after(cause) if isinstance(cause, HttpResponseError) else None
                wait = attempts.next_wait(asked, reason=f"{status} while trying to {what}")
                if wait is None:
                    raise
                time.sleep(wait)

    # ---- jobs

    def create_job(
        self, job_id: str, pool_id: str, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        """One job per Parallel call; it stays active after its tasks finish (noaction).

        ``metadata`` becomes the job's name/value metadata. ``JobExists`` is success: job
        ids are unique per run, so an existing one can only be this call's own, made by an
        attempt whose answer was lost (the retry policy resends a POST that got no answer).

        A reached account quota (``ActiveJobAndScheduleQuotaReached``: every job that is not
        completed counts) frees up as other runs end, so it is waited out, with one warning
        per wait, until the retry budget is spent; then a :class:`QuotaError` names the
        quota and what frees it.
        """
        options = bm.BatchJobCreateOptions(
            id=job_id,
            pool_info=bm.BatchPoolInfo(pool_id=pool_id),
            uses_task_dependencies=False,
            all_tasks_complete_mode="noaction",
            metadata=_metadata_items(metadata or {}),
        )
        what = f"create the job {job_id} on the pool {pool_id}"
        attempts = retries.RetryBudget(
            seconds=self._retry_budget,
            backoff_first=QUOTA_WAIT_FIRST,
            backoff_max=QUOTA_WAIT_MAX,
            warn_after=None,  # every wait has its own warning below
            clock=time.monotonic,
        ).start()
        while True:
            try:
                with self._call(what, ok_codes=("JobExists",)):
                    self._client.create_job(options)
                return
            except QuotaError as e:
                quota = _QUOTA_NAMES.get(e.error_code, e.error_code)
                cause = e.__cause__
                asked = _retry_after(cause) if isinstance(cause, HttpResponseError) else None
                wait = attempts.next_wait(asked, reason=f"{e.error_code} while trying to {what}")
                if wait is None:
                    raise QuotaError(
                        f"could not {what}: the Batch account {self._account} has reached its "
                        f"quota of {quota} ({e.error_code}), and it stayed reached for "
                        f"{attempts.spent:.0f} s (retry_budget is {self._retry_budget:g} s). "
                        "Jobs that are not completed count against it: delete the finished "
                        "ones (`joblib-azurebatch cleanup` deletes this library's jobs; run it "
                        "when no computation is running), or ask for a higher quota on the "
                        "Batch account's Quotas page in the Azure portal.",
                        e.status_code,
                        e.error_code,
                        what,
                    ) from cause
                _log.warning(
                    "the Batch account %s has reached its quota of %s (%s); waiting %.1f s "
                    "before trying to %s again (%.0f s of retry_budget left)",
                    self._account,
                    quota,
                    e.error_code,
                    wait,
                    what,
                    self._retry_budget - attempts.spent,
                )
                time.sleep(wait)

    @staticmethod
    def _job_info(j: bm.BatchJob) -> JobInfo:
        execution = j.execution_info
        return JobInfo(
            job_id=j.id or "",
            pool_id=j.pool_info.pool_id if j.pool_info is not None else None,
            state=_enum_text(j.state),
            creation_time=j.creation_time,
            metadata=_metadata(j.metadata),
            terminate_reason=(execution.termination_reason or "") if execution is not None else "",
        )

    def list_jobs(self, *, pool_id: str | None = None) -> list[JobInfo]:
        """Every job of the account, or those of one pool (filtered here: ``poolInfo`` is
        not a filterable property)."""
        with self._call("list the jobs"):
            jobs = [self._job_info(j) for j in self._client.list_jobs(select=list(_JOB_FIELDS))]
        return [j for j in jobs if pool_id is None or j.pool_id == pool_id]

    def get_job(self, job_id: str) -> JobInfo | None:
        """The job, or None if there is none (deleted, or never created)."""
        job: bm.BatchJob | None = None
        with self._call(f"read the job {job_id}", missing_ok=True):
            job = self._client.get_job(job_id, select=list(_JOB_FIELDS), retry_total=POLL_RETRIES)
        return None if job is None else self._job_info(job)

    def set_job_metadata(self, job_id: str, metadata: Mapping[str, str]) -> None:
        """Replace the job's metadata (a PATCH: nothing else of the job changes)."""
        with self._call(f"update the metadata of the job {job_id}"):
            self._client.update_job(
                job_id,
                bm.BatchJobUpdateOptions(metadata=_metadata_items(metadata) or []),
                retry_total=POLL_RETRIES,  # a heartbeat: the next one comes soon
            )

    def terminate_job(self, job_id: str, reason: str, *, wait: float = 60.0) -> None:
        """Terminate the job: running tasks are killed, active ones never start.

        Waits up to ``wait`` seconds for the job to leave the terminating state, so that no
        task keeps running (and billing) after this returns.
        """
        options = BatchJobTerminateOptions(termination_reason=reason or "Terminated")
        poller: LROPoller[None] | None = None
        with self._call(
            f"terminate the job {job_id}",
            ok_codes=("JobCompleted", "JobBeingTerminated", "JobBeingDeleted"),
            missing_ok=True,
        ):
            # The SDK polls from a thread it starts: one that takes no SIGTERM.
            poller = shutdown.call_quietly(
                lambda: self._client.begin_terminate_job(
                    job_id, options, polling_interval=self._lro_interval
                )
            )
        if poller is None:
            return
        if wait > 0:
            try:
                poller.result(timeout=wait)
            except AzureError as e:
                _log.debug("waiting for job %s to terminate: %s", job_id, e)

    def delete_job(self, job_id: str) -> None:
        """Start deleting the job and its tasks (the service finishes in the background)."""
        with self._call(
            f"delete the job {job_id}",
            ok_codes=("JobBeingDeleted", "JobNotFound"),
            missing_ok=True,
        ):
            # The SDK polls from a thread it starts: one that takes no SIGTERM.
            shutdown.call_quietly(
                lambda: self._client.begin_delete_job(job_id, polling_interval=self._lro_interval)
            )

    # ---- tasks

    @staticmethod
    def _task_options(spec: TaskSpec) -> bm.BatchTaskCreateOptions:
        wall = (
            _dt.timedelta(seconds=spec.max_wall_clock) if spec.max_wall_clock is not None else None
        )
        return bm.BatchTaskCreateOptions(
            id=spec.task_id,
            command_line=spec.command_line,
            container_settings=bm.BatchTaskContainerSettings(image_name=spec.image),
            resource_files=[_resource_file(r) for r in spec.resource_files] or None,
            environment_settings=[
                bm.EnvironmentSetting(name=k, value=v) for k, v in spec.environment.items()
            ],
            constraints=bm.BatchTaskConstraints(
                max_task_retry_count=spec.max_retries, max_wall_clock_time=wall
            ),
        )

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=SUBMIT_CONCURRENCY,
                    thread_name_prefix="azurebatch-add",
                    initializer=shutdown.hold_signals,
                )
            return self._executor

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> None:
        """Add tasks in chunks of ≤100 (and ≤~900 kB), several chunks in flight.

        Every per-task status is read case-insensitively. ``TaskExists`` counts as success:
        task ids are unique within a run, so an existing id can only come from an earlier
        attempt of this same submission (a resend of a request whose response was lost).

        Throttling (429, 503), timeouts (408), other server errors (5xx), connection errors
        and per-task server errors are retried until the retry budget is spent, waiting as
        the service's ``Retry-After`` asks (at most ``RETRY_AFTER_MAX`` at a time) or else
        with a jittered exponential back-off; a resend carries only the tasks not added yet.
        Any other per-task error raises a :class:`ServiceError` naming the task.
        """
        options = [self._task_options(t) for t in tasks]
        chunks = list(_chunks(options))
        if not chunks:
            return
        if len(chunks) == 1:
            self._add_chunk(job_id, chunks[0])
            return
        futures = [self._pool().submit(self._add_chunk, job_id, c) for c in chunks]
        first_error: BaseException | None = None
        for fut in futures:
            try:
                fut.result()
            except BaseException as e:
                if first_error is None:
                    first_error = e
        if first_error is not None:
            raise first_error

    def _add_chunk(self, job_id: str, chunk: list[bm.BatchTaskCreateOptions]) -> None:
        pending = {t.id: t for t in chunk}
        started = time.monotonic()
        attempts = 0
        # What the last retried failure said, for the error if the budget runs out.
        last_problem = ""
        last_status: int | None = None
        last_code = ""
        while True:
            attempts += 1
            self.submit_calls += 1
            wait: float | None = None  # the service's Retry-After, when it sent one
            try:
                # retry_total=0: this loop is the only retry, so the SDK's RetryPolicy (and
                # its own count and waits) does not multiply the attempts of this one.
                result = self._client.create_task_collection(
                    job_id, bm.BatchTaskGroup(task_values=list(pending.values())), retry_total=0
                )
            except HttpResponseError as e:
                code = _error_code(e)
                status = e.status_code or 0
                if code == "RequestBodyTooLarge" and len(pending) > 1:
                    items = list(pending.values())
                    half = len(items) // 2
                    self._add_chunk(job_id, items[:half])
                    self._add_chunk(job_id, items[half:])
                    return
                if not (status >= 500 or status in (408, 429)):
                    raise self._translate(e, f"add {len(pending)} tasks to the job {job_id}") from e
                last_problem = f"{status} {code}: {_error_message(e)}"
                last_status, last_code = status, code
                wait = _retry_after(e)
            except (ServiceRequestError, ServiceResponseError) as e:
                last_problem = _error_message(e)
                last_status, last_code = None, ""
            except AzureError as e:
                raise self._translate(e, f"add {len(pending)} tasks to the job {job_id}") from e
            else:
                self._settle(job_id, pending, result)
                if not pending:
                    return
                last_problem, last_status, last_code = self._last_server_error(result)
            delay = min(wait, RETRY_AFTER_MAX) if wait is not None else _backoff(attempts)
            spent = time.monotonic() - started
            if spent + delay > self._retry_budget:
                break
            _log.debug(
                "adding %d tasks to the job %s failed (%s), retrying in %.1f s",
                len(pending),
                job_id,
                last_problem,
                delay,
            )
            time.sleep(delay)
        raise service_error(
            f"could not add the tasks {', '.join(sorted(pending)[:5])}"
            f"{' ...' if len(pending) > 5 else ''} to the job {job_id}: the Batch service still "
            f"failed after {attempts} attempts in {spent:.0f} s (retry_budget is "
            f"{self._retry_budget:g} s): {last_problem}",
            last_status,
            last_code,
            f"add {len(pending)} tasks to the job {job_id}",
        )

    @staticmethod
    def _settle(
        job_id: str,
        pending: dict[str, bm.BatchTaskCreateOptions],
        result: bm.BatchCreateTaskCollectionResult,
    ) -> None:
        """Drop the tasks the answer says were added from ``pending``; raise for a refusal.

        A per-task server error leaves the task pending (it is resent); so does a task the
        answer does not mention.
        """
        for item in result.result_values or ():
            status_text = _enum_text(item.status)
            code = (item.error.code or "") if item.error is not None else ""
            msg = item.error.message.value if item.error and item.error.message else ""
            if status_text == "success" or code == "TaskExists":
                pending.pop(item.task_id, None)
            elif status_text != "servererror":
                details = ""
                if item.error is not None and item.error.error_values:
                    details = (
                        " ("
                        + ", ".join(f"{d.key}={d.value}" for d in item.error.error_values)
                        + ")"
                    )
                raise service_error(
                    f"the Batch service refused the task {item.task_id} of the job "
                    f"{job_id}: {code}: {msg}{details}",
                    None,
                    code,
                    f"add the task {item.task_id} to the job {job_id}",
                )

    @staticmethod
    def _last_server_error(
        result: bm.BatchCreateTaskCollectionResult,
    ) -> tuple[str, int | None, str]:
        """``(problem, status, code)`` of the last per-task server error in the answer."""
        problem, code = "", ""
        for item in result.result_values or ():
            if _enum_text(item.status) == "servererror":
                code = (item.error.code or "") if item.error is not None else ""
                msg = item.error.message.value if item.error and item.error.message else ""
                problem = f"task {item.task_id}: {code} {msg}".strip()
        return problem or "some tasks were missing from the answer", None, code

    def task_counts(self, job_id: str) -> TaskCounts:
        with self._call(f"read the task counts of the job {job_id}"):
            counts = self._client.get_job_task_counts(job_id, retry_total=POLL_RETRIES).task_counts
        return TaskCounts(
            active=counts.active,
            running=counts.running,
            completed=counts.completed,
            succeeded=counts.succeeded,
            failed=counts.failed,
        )

    def completed_tasks(
        self, job_id: str, *, since: _dt.datetime | None = None
    ) -> list[TaskOutcome]:
        """Tasks that reached the completed state at or after ``since`` (all if None).

        One filtered, ``$select``-ed listing (paged by the SDK) instead of a GET per task.
        """
        query = "state eq 'completed'"
        if since is not None:
            query += f" and stateTransitionTime ge datetime'{_odata_datetime(since)}'"
        outcomes: list[TaskOutcome] = []
        with self._call(f"list the completed tasks of the job {job_id}"):
            for task in self._client.list_tasks(
                job_id,
                filter=query,
                select=["id", "state", "stateTransitionTime", "executionInfo", "nodeInfo"],
                max_results=1000,
                retry_total=POLL_RETRIES,
            ):
                outcomes.append(self._outcome(task))
        return outcomes

    def list_tasks(self, job_id: str) -> list[TaskOutcome]:
        """Every task of the job, in whatever state (for ``joblib-azurebatch logs``)."""
        with self._call(f"list the tasks of the job {job_id}"):
            return [
                self._outcome(task)
                for task in self._client.list_tasks(
                    job_id,
                    select=["id", "state", "stateTransitionTime", "executionInfo", "nodeInfo"],
                    max_results=1000,
                )
            ]

    @staticmethod
    def _outcome(task: bm.BatchTask) -> TaskOutcome:
        info = task.execution_info
        failure = None
        exit_code = None
        result = None
        retry_count = requeue_count = 0
        start = end = None
        if info is not None:
            exit_code = info.exit_code
            retry_count = info.retry_count or 0
            requeue_count = info.requeue_count or 0
            start, end = info.start_time, info.end_time
            result = _enum_text(info.result) or None
            if info.failure_info is not None:
                fi = info.failure_info
                failure = f"{fi.code or _enum_text(fi.category)}: {fi.message or ''}".strip()
        node = task.node_info.node_id if task.node_info is not None else None
        return TaskOutcome(
            task_id=task.id,
            state=_enum_text(task.state),
            transition_time=task.state_transition_time,
            exit_code=exit_code,
            failure=failure,
            result=result,
            retry_count=retry_count,
            requeue_count=requeue_count,
            start_time=start,
            end_time=end,
            node_id=node,
        )

    def read_task_file(
        self, job_id: str, task_id: str, path: str, *, tail_bytes: int = 4096
    ) -> str:
        """The last ``tail_bytes`` of a task file, or "" if it is absent or unreadable.

        Used to explain a failure, so it never raises: a second error would hide the first.
        """
        return _file_tail(
            lambda: self._client.get_task_file_properties(job_id, task_id, path),
            lambda span: self._client.download_task_file(job_id, task_id, path, ocp_range=span),
            tail_bytes=tail_bytes,
            where=f"{path} of the task {job_id}/{task_id}",
        )


def _file_tail(
    properties: Callable[[], Any],
    download: Callable[[str], Iterable[bytes]],
    *,
    tail_bytes: int,
    where: str,
) -> str:
    """The last ``tail_bytes`` of a task or node file, or "" if absent or unreadable: it
    explains a failure, so it never raises (a second error would hide the first)."""
    try:
        size = int(properties().content_length or 0)
        if size <= 0:
            return ""
        start = max(0, size - tail_bytes)
        data = b"".join(download(f"bytes={start}-{size - 1}"))
    except AzureError as e:
        _log.debug("could not read %s: %s", where, e)
        return ""
    return data.decode("utf-8", errors="replace")

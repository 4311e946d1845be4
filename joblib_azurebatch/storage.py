"""The Azure Blob Storage SDK's one door: payloads, shared objects and results go through here.

Two sides use it. The client holds an account credential (a key, a connection string or an
Entra ID token credential) in a `BlobStore`, uploads what tasks read, and signs SAS URLs
scoped to one blob, one permission set and an expiry. A node never sees that credential:
the worker only calls `download_url` and `upload_url` on the SAS URLs it was given (from
:mod:`joblib_azurebatch.sasurl`, the standard library only, re-exported here), or, when
the pool's user-assigned managed identity grants the nodes access (``BatchConfig.node_identity``),
reads and writes blobs by name through a `NodeContainer` signed in as that identity.

Every request is retried for a time budget, waiting as ``Retry-After`` asks
(:mod:`joblib_azurebatch.retries`): ``BatchConfig.retry_budget`` on the client, a few minutes
on a node. Every Azure SDK error is translated at this boundary into the project's errors
with ``raise ... from e``: a refused credential or SAS becomes `CredentialError`, a missing
blob `FileNotFoundError`, anything else that is still failing when the budget is spent
`ServiceError` (`ThrottledError` for a 429 or 503), with the HTTP status, the service's
error code and the operation as fields. Messages name the account, container and blob,
never a key or a SAS signature.

Every client sends a user agent that names this library and its version, in front of the
SDK's own, so that the account's logs tell its requests apart.
"""

from __future__ import annotations

import base64
import hmac
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobSasPermissions,
    BlobServiceClient,
    ContainerClient,
    ContainerSasPermissions,
    ExponentialRetry,
    UserDelegationKey,
    generate_blob_sas,
    generate_container_sas,
)

from joblib_azurebatch import retries, shutdown
from joblib_azurebatch.config import _package_version
from joblib_azurebatch.credentials import CredentialLease, lease_credential
from joblib_azurebatch.errors import ConfigError, CredentialError, ServiceError, service_error
from joblib_azurebatch.sasurl import download_url, redact_url, upload_url

if TYPE_CHECKING:
    from joblib_azurebatch.config import BatchConfig, TokenCredentialLike

__all__ = ["BlobStore", "NodeContainer", "download_url", "redact_url", "upload_url"]

_CLIENT_KWARGS: dict[str, Any] = {
    "user_agent": f"joblib-azurebatch/{_package_version()}",
    "connection_timeout": 20,
    "read_timeout": 120,
    "max_single_put_size": 8 * 1024 * 1024,
    "max_block_size": 8 * 1024 * 1024,
}
_MAX_CONCURRENCY = 4
# A blob batch request deletes at most 256 blobs; a few such requests run at once.
_DELETE_CHUNK = 256
_DELETE_WORKERS = 4
# Blobs at least this large are checked with a HEAD before an upload_if_absent, so that a
# second writer does not send megabytes only to be told that the blob exists.
_HEAD_FIRST_BYTES = 1024 * 1024
# A SAS is valid from a little earlier than now, so that a node whose clock runs behind
# the client's does not see a token that is "not yet valid".
_CLOCK_SKEW = timedelta(minutes=5)
_MAX_DELEGATION = timedelta(days=7)


class _BudgetBlobRetry(ExponentialRetry):
    """azure-storage-blob's retry policy, retrying for a time budget instead of a count,
    and waiting as ``Retry-After`` asks (its own waits ignore the header).

    The SDK's loop sends the attempts and decides which answers are worth one: 408 and
    every 5xx but 501 and 505 (Azure Storage throttles with 503 ``ServerBusy`` and 500
    ``OperationTimedOut``, never 429), and connection errors. :mod:`.retries` decides how
    long to wait and when to stop. A per-call ``retry_total=0`` still turns retries off.
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

    def configure_retries(self, request: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().configure_retries(request)
        settings["attempts"] = self._budget.start()
        settings["wait"] = 0.0
        return settings

    def increment(
        self,
        settings: dict[str, Any],
        request: Any,
        response: Any = None,
        error: AzureError | None = None,
    ) -> bool:
        if isinstance(error, ClientAuthenticationError):
            # A credential that could not get a token (a node whose pool lacks the identity,
            # a sign-in that is not set up) does not get one by waiting.
            return False
        if not super().increment(settings, request, response=response, error=error):
            return False
        # The path only: a SAS signature never reaches a log line.
        what = f"{request.method} {urlsplit(str(request.url)).path}"
        if response is not None:
            reason = f"{what} answered {response.status_code}"
            asked = retries.retry_after(response.headers)
            # Read the refusal (a short XML body) so that its connection goes back to the
            # pool: a download's answer is streamed, and would otherwise stay unread and
            # hold its connection until it is garbage-collected.
            with suppress(Exception):
                response.body()
        else:
            reason = f"{what} failed ({type(error).__name__})"
            asked = None
        wait = settings["attempts"].next_wait(asked, reason=reason)
        if wait is None:
            return False
        settings["wait"] = wait
        return True

    def sleep(self, settings: dict[str, Any], transport: Any) -> None:
        if settings["wait"] > 0:
            transport.sleep(settings["wait"])


def _client_kwargs(
    ca_bundle: str | None = None, *, retry_budget: float = retries.DEFAULT_RETRY_BUDGET
) -> dict[str, Any]:
    kwargs = {
        **_CLIENT_KWARGS,
        "retry_policy": _BudgetBlobRetry(retries.RetryBudget(seconds=retry_budget)),
    }
    if ca_bundle:
        kwargs["connection_verify"] = ca_bundle
    return kwargs


def _describe(e: AzureError) -> str:
    if isinstance(e, HttpResponseError):
        code = getattr(e, "error_code", None) or (e.reason or "")
        return f"HTTP {e.status_code} {code}".rstrip()
    return type(e).__name__


def _status(e: AzureError) -> int | None:
    status = getattr(e, "status_code", None)
    return status if isinstance(status, int) else None


def _error_code(e: AzureError) -> str:
    """The service's error code (``x-ms-error-code``) as plain text, "" without one."""
    code = getattr(e, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _operation(what: str, where: str) -> str:
    return f"{what[:1].lower()}{what[1:]} at {where}"


def _default_credential() -> TokenCredentialLike:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


@contextmanager
def _translated(
    what: str, *, where: str, sas: bool = False, identity: str | None = None
) -> Iterator[None]:
    """Turn SDK errors raised inside the block into the project's own errors, with the
    status, the error code and the operation as fields."""
    operation = _operation(what, where)
    try:
        yield
    except ResourceNotFoundError as e:
        raise FileNotFoundError(f"{what}: {where} does not exist ({_describe(e)})") from e
    except ClientAuthenticationError as e:
        raise _auth_error(what, where, e, sas=sas, identity=identity) from e
    except HttpResponseError as e:
        if e.status_code == 403:
            raise _auth_error(what, where, e, sas=sas, identity=identity) from e
        raise service_error(
            f"{what} failed at {where}: {_describe(e)}", _status(e), _error_code(e), operation
        ) from e
    except (ServiceRequestError, ServiceResponseError) as e:
        raise ServiceError(
            f"{what} failed: cannot reach the blob endpoint {where} ({type(e).__name__}); "
            "check the storage URL and the network, the SDK already retried",
            None,
            "",
            operation,
        ) from e
    except AzureError as e:
        raise ServiceError(f"{what} failed at {where}: {_describe(e)}", None, "", operation) from e


def _auth_error(
    what: str, where: str, e: AzureError, *, sas: bool, identity: str | None = None
) -> CredentialError:
    fields = (_status(e), _error_code(e), _operation(what, where))
    if identity is not None:
        if not isinstance(e, HttpResponseError) or e.status_code is None:
            # No answer from storage: the node's metadata endpoint gave no token.
            return CredentialError(
                f"{what}: the node could not get a token for the managed identity {identity} "
                f"({e.message}). The pool must have this user-assigned identity "
                "(BatchConfig.node_identity; see docs/security.md, Closing it: node identity)",
                *fields,
            )
        return CredentialError(
            f"{what}: Azure Storage refused the managed identity {identity} at {where} "
            f"({_describe(e)}); grant it Storage Blob Data Contributor on the container",
            *fields,
        )
    if sas:
        return CredentialError(
            f"{what}: the SAS URL for {where} was refused ({_describe(e)}); it has expired or "
            "lacks the permission. Raise BatchConfig(sas_expiry=...) for long runs.",
            *fields,
        )
    return CredentialError(
        f"{what}: Azure Storage refused the credential at {where} ({_describe(e)}). Check "
        "STORAGE_ACCOUNT_NAME and STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_CONNECTION_STRING), "
        "or the role assignments of the Entra ID identity (Storage Blob Data Contributor).",
        *fields,
    )


class BlobStore:
    """One blob container of one storage account, seen by the client.

    Thread-safe: the backend's submitter and tracker threads share one instance, and the
    SDK clients it holds are safe to share.
    """

    def __init__(
        self,
        service: BlobServiceClient,
        container: str,
        *,
        account_key: str | None = None,
        token_credential: Any = None,
        credential_lease: CredentialLease | None = None,
        node_identity: str | None = None,
    ) -> None:
        self._service = service
        self._node_identity = node_identity
        # Released by close(): a credential this library created is closed by the last
        # client that holds it (see joblib_azurebatch.credentials).
        self._credential_lease = credential_lease
        self._container = service.get_container_client(container)
        self._container_name = container
        self._account_key = account_key
        self._token_credential = token_credential
        self._lock = threading.Lock()
        self._bytes_uploaded = 0
        self._delegation_key: UserDelegationKey | None = None
        self._delegation_expiry: datetime | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: BatchConfig) -> BlobStore:
        """Connect with the first credential the config has.

        Order: connection string (Azurite, or an account key in one string), account key,
        token credential, and else ``DefaultAzureCredential`` for accounts whose keys are
        disabled; with a token, SAS URLs are signed with a user delegation key. A
        ``DefaultAzureCredential`` is shared with the config's
        :class:`~joblib_azurebatch.batch.BatchService` and closed with the last of them; the
        config's own ``storage_credential`` is used as given and never closed. Call
        :meth:`close` when done.
        """
        if cfg.storage_connection_string:
            try:
                service = BlobServiceClient.from_connection_string(
                    cfg.storage_connection_string,
                    **_client_kwargs(cfg.ca_bundle, retry_budget=cfg.retry_budget),
                )
            except (ValueError, AzureError) as e:
                raise CredentialError(
                    "storage_connection_string (AZURE_STORAGE_CONNECTION_STRING) could not "
                    f"be used: {type(e).__name__}. Copy it again from the portal or "
                    "`az storage account show-connection-string`."
                ) from None
            credential = service.credential
            key = getattr(credential, "account_key", None)
            return cls(service, cfg.container, account_key=key, node_identity=cfg.node_identity)
        url = cfg.blob_url
        if url is None:
            raise CredentialError(
                "No storage account: set STORAGE_ACCOUNT_NAME and STORAGE_ACCOUNT_KEY, or "
                "AZURE_STORAGE_CONNECTION_STRING, or pass storage_account= / storage_url="
            )
        if cfg.storage_key:
            if not cfg.storage_account:
                raise CredentialError(
                    "A storage key needs the account name: set STORAGE_ACCOUNT_NAME "
                    "(or AZURE_STORAGE_ACCOUNT), or pass storage_account="
                )
            service = BlobServiceClient(
                account_url=url,
                credential={"account_name": cfg.storage_account, "account_key": cfg.storage_key},
                **_client_kwargs(cfg.ca_bundle, retry_budget=cfg.retry_budget),
            )
            return cls(
                service,
                cfg.container,
                account_key=cfg.storage_key,
                node_identity=cfg.node_identity,
            )
        lease = lease_credential(cfg, cfg.storage_credential, _default_credential)
        token = lease.credential
        try:
            service = BlobServiceClient(
                account_url=url,
                credential=token,
                **_client_kwargs(cfg.ca_bundle, retry_budget=cfg.retry_budget),
            )
        except BaseException:
            lease.release()
            raise
        return cls(
            service,
            cfg.container,
            token_credential=token,
            credential_lease=lease,
            node_identity=cfg.node_identity,
        )

    def close(self) -> None:
        """Release the HTTP connections, and the credential if this library created it.

        Safe to call more than once. A ``DefaultAzureCredential`` shared with the config's
        Batch client is closed once both are closed; the user's own credential never is.
        """
        try:
            self._service.close()
        finally:
            if self._credential_lease is not None:
                self._credential_lease.release()

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ properties

    @property
    def container(self) -> str:
        """The name of the blob container every blob name is relative to."""
        return self._container_name

    @property
    def container_url(self) -> str:
        """The container's URL, without any SAS."""
        return str(self._container.url)

    @property
    def node_identity(self) -> str | None:
        """How nodes are given the blobs of this container: None, by SAS URLs this store
        signs; else the ARM resource id of the pool's managed identity, as which they read
        and write blobs named to them (``BatchConfig.node_identity``)."""
        return self._node_identity

    def blob_url(self, name: str) -> str:
        """A blob's URL without any SAS: a name, not a capability."""
        return str(self._container.get_blob_client(name).url)

    @property
    def bytes_uploaded(self) -> int:
        """Bytes of blob content this store has uploaded so far (tests and benchmarks)."""
        with self._lock:
            return self._bytes_uploaded

    def _where(self, name: str | None = None) -> str:
        base = f"{self._service.account_name}/{self._container_name}"
        return f"{base}/{name}" if name else base

    def _count(self, n: int) -> None:
        with self._lock:
            self._bytes_uploaded += n

    # ------------------------------------------------------------------ operations

    def ensure_container(self) -> None:
        """Create the container unless it exists (a race with another client is fine)."""
        with (
            _translated("Creating the blob container", where=self._where()),
            suppress(ResourceExistsError),
        ):
            self._container.create_container()

    def upload(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        """Write a blob. With ``overwrite=False`` an existing blob raises `FileExistsError`."""
        with _translated("Uploading a blob", where=self._where(name)):
            try:
                self._container.upload_blob(
                    name, data, overwrite=overwrite, max_concurrency=_MAX_CONCURRENCY
                )
            except ResourceExistsError as e:
                raise FileExistsError(f"{self._where(name)} already exists") from e
        self._count(len(data))

    def upload_if_absent(self, name: str, data: bytes) -> bool:
        """Write a content-addressed blob once; True if this call wrote it.

        The service's create-only condition (``overwrite=False``) decides, so two clients
        racing on one name both succeed and the content is stored once.
        """
        if len(data) >= _HEAD_FIRST_BYTES and self.exists(name):
            return False
        try:
            self.upload(name, data, overwrite=False)
        except FileExistsError:
            return False
        return True

    def download(self, name: str) -> bytes:
        """Read a whole blob; `FileNotFoundError` if it does not exist."""
        with _translated("Downloading a blob", where=self._where(name)):
            stream = self._container.download_blob(name, max_concurrency=_MAX_CONCURRENCY)
            return stream.readall()

    def exists(self, name: str) -> bool:
        """Whether the blob exists (one HEAD request)."""
        with _translated("Checking a blob", where=self._where(name)):
            return bool(self._container.get_blob_client(name).exists())

    def list_names(self, prefix: str) -> list[str]:
        """Names of the blobs under a prefix, sorted."""
        with _translated("Listing blobs", where=self._where(prefix + "*")):
            return sorted(
                str(name) for name in self._container.list_blob_names(name_starts_with=prefix)
            )

    def derived_secret(self, purpose: str) -> bytes | None:
        """A secret for ``purpose`` that only holders of the storage account key can
        compute (HMAC-SHA256 of the container and ``purpose`` under the key), or None when
        this client signs in without the key (Entra ID). Whoever may merely read or write
        the container's blobs, or holds a SAS URL, cannot derive it."""
        if not self._account_key:
            return None
        key = base64.b64decode(self._account_key)
        message = f"joblib-azurebatch {purpose} {self._container_name}".encode()
        return hmac.new(key, message, "sha256").digest()

    def names_older_than(self, prefix: str, seconds: float) -> list[str]:
        """Names of the blobs under a prefix last written at least ``seconds`` ago, sorted
        (for expiring stored results)."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=seconds)
        with _translated("Listing blobs", where=self._where(prefix + "*")):
            return sorted(
                str(blob.name)
                for blob in self._container.list_blobs(name_starts_with=prefix)
                if blob.last_modified is not None and blob.last_modified <= cutoff
            )

    def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under a prefix; returns how many were deleted.

        Lists the names, then deletes them as `delete_blobs` does (batch requests, a few in
        parallel); a blob that vanished meanwhile (a concurrent cleanup) is not an error.
        """
        if not prefix:
            raise ValueError(
                "delete_prefix needs a non-empty prefix; it never empties the container"
            )
        return self._delete_names(self.list_names(prefix), self._where(prefix + "*"))

    def delete_blobs(self, names: Sequence[str]) -> int:
        """Delete the named blobs; returns how many were deleted.

        One batch request per ``_DELETE_CHUNK`` names, up to ``_DELETE_WORKERS`` of them at
        once (a job's 200,000 blobs are 782 requests, not one after the other). A blob that
        does not exist is not an error: the end-of-run sweep and a task's own deletion may
        meet. A refused credential raises `CredentialError`; another failure of a chunk
        raises once the chunks already started have ended.
        """
        if not names:
            return 0
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        return self._delete_names(names, self._where(names[0]) + more)

    def _delete_names(self, names: Sequence[str], where: str) -> int:
        """`delete_blobs` with the place named in errors (a prefix, or the first name)."""
        chunks = [list(names[i : i + _DELETE_CHUNK]) for i in range(0, len(names), _DELETE_CHUNK)]
        if len(chunks) <= 1:
            return sum(self._delete_chunk(chunk, where) for chunk in chunks)
        todo = list(reversed(chunks))
        lock = threading.Lock()
        deleted = 0
        errors: list[BaseException] = []

        def work() -> None:
            nonlocal deleted
            while True:
                with lock:
                    if not todo or errors:
                        return
                    chunk = todo.pop()
                try:
                    n = self._delete_chunk(chunk, where)
                except BaseException as e:  # handed to the caller below
                    with lock:
                        errors.append(e)
                    return
                with lock:
                    deleted += n

        # Plain daemon threads, not an executor: this also runs at interpreter exit, when an
        # executor no longer accepts work.
        threads = [
            threading.Thread(target=work, name="azurebatch-delete", daemon=True)
            for _ in range(min(_DELETE_WORKERS, len(chunks)))
        ]
        for thread in threads:
            shutdown.start(thread)
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return deleted

    def _delete_chunk(self, chunk: list[str], where: str) -> int:
        """One blob batch request (at most 256 names); returns how many were deleted."""
        deleted = 0
        with _translated("Deleting blobs", where=where):
            for response in self._container.delete_blobs(*chunk, raise_on_any_failure=False):
                if response.status_code in (200, 202):
                    deleted += 1
                elif response.status_code == 403:
                    raise CredentialError(
                        f"Deleting blobs in {where} was refused (HTTP 403): "
                        "the credential may not delete blobs in this container",
                        403,
                        str(response.headers.get("x-ms-error-code") or ""),
                        _operation("Deleting blobs", where),
                    )
        return deleted

    # ------------------------------------------------------------------ SAS URLs

    def sas_url(
        self, name: str, *, read: bool = False, write: bool = False, expiry: timedelta
    ) -> str:
        """A URL for one blob that grants only what a task needs, until ``expiry`` from now.

        ``write=True`` grants create and write (a result blob); ``read=True`` grants read.
        """
        if not (read or write):
            raise ValueError("a SAS URL needs read=True or write=True")
        permission = BlobSasPermissions(read=read, write=write, create=write)
        start, end = self._validity(expiry)
        blob = self._container.get_blob_client(name)
        token = generate_blob_sas(
            account_name=self._service.account_name or "",
            container_name=self._container_name,
            blob_name=name,
            permission=permission,
            start=start,
            expiry=end,
            **self._signing(end),
        )
        return f"{blob.url}?{token}"

    def container_sas_url(
        self,
        *,
        read: bool = False,
        write: bool = False,
        listing: bool = False,
        expiry: timedelta,
    ) -> str:
        """A URL for the whole container (Batch output files need one)."""
        if not (read or write or listing):
            raise ValueError("a container SAS URL needs read, write or list")
        permission = ContainerSasPermissions(read=read, write=write, create=write, list=listing)
        start, end = self._validity(expiry)
        token = generate_container_sas(
            account_name=self._service.account_name or "",
            container_name=self._container_name,
            permission=permission,
            start=start,
            expiry=end,
            **self._signing(end),
        )
        return f"{self.container_url}?{token}"

    def _validity(self, expiry: timedelta) -> tuple[datetime, datetime]:
        if expiry <= timedelta(0):
            raise ValueError("a SAS expiry must be positive")
        now = datetime.now(timezone.utc)
        return now - _CLOCK_SKEW, now + expiry

    def _signing(self, end: datetime) -> dict[str, Any]:
        if self._account_key:
            return {"account_key": self._account_key}
        if self._token_credential is None:
            raise ConfigError(
                "This storage credential cannot sign SAS URLs (a SAS connection string): give "
                "the account key (STORAGE_ACCOUNT_KEY) or an Entra ID credential"
            )
        return {"user_delegation_key": self._user_delegation_key(end)}

    def _user_delegation_key(self, end: datetime) -> UserDelegationKey:
        with self._lock:
            if (
                self._delegation_key is not None
                and self._delegation_expiry is not None
                and self._delegation_expiry >= end
            ):
                return self._delegation_key
            now = datetime.now(timezone.utc)
            if end - now > _MAX_DELEGATION:
                raise ConfigError(
                    "With an Entra ID credential a SAS URL lasts at most 7 days: lower "
                    "BatchConfig(sas_expiry=...)"
                )
            key_end = min(now + _MAX_DELEGATION, end + timedelta(hours=1))
            with _translated("Getting a user delegation key", where=self._where()):
                key = self._service.get_user_delegation_key(now - _CLOCK_SKEW, key_end)
            self._delegation_key, self._delegation_expiry = key, key_end
            return key


# ---------------------------------------------------------------------- worker side


# download_url and upload_url, the reads and writes through a SAS URL, are sasurl.py's
# (imported above): they need no SDK, and the worker imports them from there so that a
# task with SAS URLs never loads it. A node's budget is retries.worker_retry_budget().


class NodeContainer:
    """The container as a node sees it when the pool's managed identity grants access.

    Nothing in the task's definition is a capability: the worker gets the container's URL,
    blob names and the identity's resource id, and asks the node's metadata endpoint (IMDS,
    or what ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` names) for a token of that identity. A
    pool without the identity gets no token: every call then fails at once with a
    `CredentialError` saying so, instead of being retried.
    """

    def __init__(self, container_url: str, *, identity: str) -> None:
        # Only a node in node-identity mode needs azure-identity's managed identity client.
        from azure.identity import ManagedIdentityCredential

        self.identity = identity
        self._where = redact_url(container_url)
        self._credential = ManagedIdentityCredential(identity_config={"resource_id": identity})
        kwargs = _client_kwargs(retry_budget=retries.worker_retry_budget())
        try:
            self._container = ContainerClient.from_container_url(
                container_url, credential=self._credential, **kwargs
            )
        except ValueError as e:
            self._credential.close()
            raise ValueError(f"not a blob container URL: {self._where}") from e

    def download(self, name: str) -> bytes:
        """Read a whole blob; `FileNotFoundError` if it does not exist."""
        where = f"{self._where}/{name}"
        with _translated("Downloading", where=where, identity=self.identity):
            stream = self._container.download_blob(name, max_concurrency=_MAX_CONCURRENCY)
            return stream.readall()

    def upload(self, name: str, data: bytes) -> None:
        """Write a blob, replacing it (a retried task rewrites its result)."""
        where = f"{self._where}/{name}"
        with _translated("Uploading", where=where, identity=self.identity):
            self._container.upload_blob(
                name, data, overwrite=True, max_concurrency=_MAX_CONCURRENCY
            )

    def close(self) -> None:
        """Release the connections and the credential."""
        try:
            self._container.close()
        finally:
            self._credential.close()

    def __enter__(self) -> NodeContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

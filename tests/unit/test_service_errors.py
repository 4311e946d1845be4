"""Service errors carry their fields through pickling, and the SDKs' errors are translated
into them at the two boundaries (the real SDK clients against a canned local server)."""

from __future__ import annotations

import base64
import pickle
import socket
from collections.abc import Callable
from typing import Any

import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from azure.storage.blob import BlobServiceClient

from joblib_azurebatch.batch import BatchService, PoolSpec
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.errors import (
    AzureBatchError,
    ConfigError,
    CredentialError,
    QuotaError,
    ServiceError,
    ThrottledError,
    is_quota_code,
    service_error,
)
from joblib_azurebatch.storage import BlobStore, download_url
from tests.unit.canned_http import Answer, batch_error, canned_server, storage_error

KEY = base64.b64encode(b"k" * 32).decode()
ACCOUNT = "acct"
CONTAINER = "box"

# ---------------------------------------------------------------------- the error classes


@pytest.mark.parametrize("cls", [ServiceError, ThrottledError, QuotaError, CredentialError])
def test_fields_survive_pickling_and_the_message_stays_the_message(cls: type[Exception]) -> None:
    message = "could not create the job j on the pool p: the Batch service answered 409"
    error = cls(message, 409, "SomeCode", "create the job j on the pool p")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is cls
    assert (clone.status_code, clone.error_code, clone.operation) == (
        409,
        "SomeCode",
        "create the job j on the pool p",
    )
    assert str(clone) == str(error) == message


@pytest.mark.parametrize("cls", [ServiceError, CredentialError])
def test_a_message_alone_still_works(cls: type[Exception]) -> None:
    error = cls("the pool p is sized to zero nodes")
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == "the pool p is sized to zero nodes"
    assert clone.status_code is None
    assert clone.error_code == ""
    assert clone.operation == ""


def test_the_tree_keeps_its_shape() -> None:
    assert issubclass(CredentialError, ConfigError)
    assert issubclass(CredentialError, ValueError)
    assert not issubclass(CredentialError, ServiceError)
    for cls in (ThrottledError, QuotaError):
        assert issubclass(cls, ServiceError)
        assert issubclass(cls, AzureBatchError)


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (429, "TooManyRequests", ThrottledError),
        (503, "ServerBusy", ThrottledError),
        (409, "ActiveJobAndScheduleQuotaReached", QuotaError),
        (403, "PoolQuotaReached", QuotaError),
        (None, "AccountCoreQuotaReached", QuotaError),
        (409, "SomeFutureQuotaExceeded", QuotaError),
        (409, "JobExists", ServiceError),
        (500, "InternalError", ServiceError),
        (None, "", ServiceError),
    ],
)
def test_service_error_picks_the_class_from_the_answer(
    status: int | None, code: str, expected: type[ServiceError]
) -> None:
    error = service_error("message", status, code, "do something")
    assert type(error) is expected
    assert (error.status_code, error.error_code, error.operation) == (status, code, "do something")
    assert is_quota_code(code) == (expected is QuotaError)


# ---------------------------------------------------------------------- Batch


def _batch_config(url: str, **fields: Any) -> BatchConfig:
    return BatchConfig(batch_url=url, batch_account=ACCOUNT, batch_key=KEY, pool_id="p", **fields)


def _answering(answer: Answer) -> Callable[[str, str], Answer]:
    return lambda method, path: answer


def test_a_missing_pool_is_none_and_a_missing_job_is_already_deleted() -> None:
    with canned_server(_answering(batch_error(404, "PoolNotFound"))) as server:
        svc = BatchService.from_config(_batch_config(server.url))
        try:
            assert svc.get_pool("p") is None
            svc.delete_job("j")
            svc.delete_pool("p")
            svc.terminate_job("j", "done")
        finally:
            svc.close()
        seen = [(r.method, r.path.split("?")[0]) for r in server.requests()]
    assert seen == [
        ("GET", "/pools/p"),
        ("DELETE", "/jobs/j"),
        ("DELETE", "/pools/p"),
        ("POST", "/jobs/j/terminate"),
    ]


@pytest.mark.parametrize(
    ("code", "call"),
    [
        ("PoolExists", lambda svc, cfg: svc.create_pool(PoolSpec.from_config(cfg))),
        ("PoolBeingDeleted", lambda svc, cfg: svc.delete_pool("p")),
        ("JobBeingDeleted", lambda svc, cfg: svc.delete_job("j")),
        ("JobCompleted", lambda svc, cfg: svc.terminate_job("j", "done")),
    ],
)
def test_a_conflict_that_means_done_is_not_an_error(
    code: str, call: Callable[[BatchService, BatchConfig], None]
) -> None:
    with canned_server(_answering(batch_error(409, code))) as server:
        cfg = _batch_config(server.url)
        svc = BatchService.from_config(cfg)
        try:
            call(svc, cfg)  # returns without raising
        finally:
            svc.close()
        assert len(server.requests()) == 1


def test_a_conflict_that_is_not_listed_is_a_service_error_with_its_fields() -> None:
    with canned_server(_answering(batch_error(409, "PoolBeingDeleted"))) as server:
        cfg = _batch_config(server.url)
        svc = BatchService.from_config(cfg)
        try:
            # PoolBeingDeleted is fine for a delete, not for a create.
            with pytest.raises(ServiceError) as info:
                svc.create_pool(PoolSpec.from_config(cfg))
        finally:
            svc.close()
    error = info.value
    assert type(error) is ServiceError
    assert (error.status_code, error.error_code) == (409, "PoolBeingDeleted")
    assert error.operation == "create the pool p"
    assert isinstance(error.__cause__, HttpResponseError)
    assert str(error).startswith("could not create the pool p: the Batch service answered 409")


def test_a_reached_job_quota_is_a_quota_error() -> None:
    answer = batch_error(409, "ActiveJobAndScheduleQuotaReached")
    with canned_server(_answering(answer)) as server:
        # A reached quota is waited out for the retry budget; this one is too short to wait.
        svc = BatchService.from_config(_batch_config(server.url, retry_budget=0.5))
        try:
            with pytest.raises(QuotaError) as info:
                svc.create_job("j", "p")
        finally:
            svc.close()
    assert info.value.error_code == "ActiveJobAndScheduleQuotaReached"
    assert info.value.operation == "create the job j on the pool p"
    assert info.value.status_code == 409


def test_a_refused_key_is_a_credential_error_with_its_fields() -> None:
    with canned_server(_answering(batch_error(403, "AuthenticationFailed"))) as server:
        svc = BatchService.from_config(_batch_config(server.url))
        try:
            with pytest.raises(CredentialError, match="BATCH_ACCOUNT_KEY") as info:
                svc.get_pool("p")
        finally:
            svc.close()
    assert (info.value.status_code, info.value.error_code) == (403, "AuthenticationFailed")
    assert info.value.operation == "read the pool p"
    pickled = pickle.loads(pickle.dumps(info.value))
    assert pickled.status_code == 403
    assert str(pickled) == str(info.value)


def test_throttling_that_outlasts_the_retries_is_a_throttled_error() -> None:
    # retry-after-ms keeps the waits to milliseconds, and the retry budget to half a second.
    answer = batch_error(429, "TooManyRequests", **{"retry-after-ms": "20"})
    with canned_server(_answering(answer)) as server:
        svc = BatchService.from_config(_batch_config(server.url, retry_budget=0.5))
        try:
            with pytest.raises(ThrottledError) as info:
                svc.get_pool("p")
        finally:
            svc.close()
        attempts = len(server.requests())
    assert attempts > 1  # the SDK retried before giving up
    assert (info.value.status_code, info.value.error_code) == (429, "TooManyRequests")
    assert info.value.operation == "read the pool p"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_no_answer_is_a_service_error_without_a_status() -> None:
    client = BatchClient(
        endpoint=f"http://127.0.0.1:{_closed_port()}",
        credential=AzureNamedKeyCredential(ACCOUNT, KEY),
        retry_total=0,
    )
    svc = BatchService(client, account=ACCOUNT, uses_key=True)
    try:
        with pytest.raises(ServiceError, match="did not answer") as info:
            svc.get_pool("p")
    finally:
        svc.close()
    assert type(info.value) is ServiceError
    assert info.value.status_code is None
    assert info.value.error_code == ""
    assert info.value.operation == "read the pool p"
    assert isinstance(info.value.__cause__, ServiceRequestError)


# ---------------------------------------------------------------------- Storage


def _storage_config(url: str) -> BatchConfig:
    return BatchConfig(
        storage_account=ACCOUNT,
        storage_url=f"{url}/{ACCOUNT}",
        storage_key=KEY,
        container=CONTAINER,
    )


def test_a_refused_storage_key_is_a_credential_error_with_its_fields() -> None:
    with (
        canned_server(_answering(storage_error(403, "AuthenticationFailed"))) as server,
        BlobStore.from_config(_storage_config(server.url)) as store,
        pytest.raises(CredentialError, match="STORAGE_ACCOUNT_KEY") as info,
    ):
        store.exists("x")
    assert (info.value.status_code, info.value.error_code) == (403, "AuthenticationFailed")
    assert info.value.operation == f"checking a blob at {ACCOUNT}/{CONTAINER}/x"


def test_a_refused_sas_is_a_credential_error_with_its_fields() -> None:
    answer = storage_error(403, "AuthorizationPermissionMismatch")
    with canned_server(_answering(answer)) as server:
        url = f"{server.url}/{ACCOUNT}/{CONTAINER}/x?sv=2024-01-01&sig=secret"
        with pytest.raises(CredentialError, match="SAS") as info:
            download_url(url)
    assert info.value.status_code == 403
    assert info.value.error_code == "AuthorizationPermissionMismatch"
    assert info.value.operation.startswith("downloading at ")
    assert "secret" not in str(info.value)
    assert "secret" not in info.value.operation


def test_a_busy_storage_account_is_a_throttled_error() -> None:
    with canned_server(_answering(storage_error(503, "ServerBusy"))) as server:
        service = BlobServiceClient(
            f"{server.url}/{ACCOUNT}",
            credential={"account_name": ACCOUNT, "account_key": KEY},
            retry_total=0,
        )
        with (
            BlobStore(service, CONTAINER, account_key=KEY) as store,
            pytest.raises(ThrottledError) as info,
        ):
            store.download("x")
    assert (info.value.status_code, info.value.error_code) == (503, "ServerBusy")
    assert info.value.operation == f"downloading a blob at {ACCOUNT}/{CONTAINER}/x"


def test_another_storage_error_keeps_its_code() -> None:
    answer = storage_error(400, "InvalidBlobOrBlock")
    with (
        canned_server(_answering(answer)) as server,
        BlobStore.from_config(_storage_config(server.url)) as store,
        pytest.raises(ServiceError) as info,
    ):
        store.upload("x", b"data")
    assert type(info.value) is ServiceError
    assert (info.value.status_code, info.value.error_code) == (400, "InvalidBlobOrBlock")
    assert info.value.operation == f"uploading a blob at {ACCOUNT}/{CONTAINER}/x"

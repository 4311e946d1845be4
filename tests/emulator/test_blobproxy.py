"""The blob proxy in front of Azurite: what it forwards is what Azurite sees (signatures
stay valid, bodies arrive byte for byte), and what it refuses looks like Azure Storage
throttling, which the library's blob clients wait out as asked."""

from __future__ import annotations

import http.client
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import urlsplit

import pytest

from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.emulator.azurite import Azurite
from joblib_azurebatch.emulator.blobproxy import BlobProxy, blob_operation
from joblib_azurebatch.errors import CredentialError, ThrottledError
from joblib_azurebatch.storage import BlobStore, download_url, upload_url
from tests.helpers.accounts import azurite_config


@pytest.fixture(scope="module")
def proxy(azurite: Azurite) -> Iterator[BlobProxy]:
    origin = urlsplit(azurite.blob_url)
    with BlobProxy(f"{origin.scheme}://{origin.netloc}") as running:
        yield running


@pytest.fixture
def store(azurite: Azurite, proxy: BlobProxy) -> Iterator[BlobStore]:
    """A store that reaches Azurite through the proxy (Shared Key), on a container of its own."""
    cfg = azurite_config(azurite, storage_url=f"{proxy.url}/{azurite.account_name}")
    with BlobStore.from_config(cfg) as blob_store:
        blob_store.ensure_container()
        yield blob_store
    proxy.faults.clear()


def test_requests_pass_through_byte_for_byte_with_their_signatures(
    proxy: BlobProxy, store: BlobStore
) -> None:
    data = bytes(range(256)) * 4099  # every byte value, 1 MB: one PutBlob
    big = bytes(reversed(range(256))) * 40_000  # 10 MB: blocks of 8 MB, then a block list
    store.upload("jobs/j/tasks/t 1/payload", data)  # a space: a percent-encoded path
    store.upload("jobs/j/objects/big", big)
    assert store.download("jobs/j/tasks/t 1/payload") == data
    assert store.download("jobs/j/objects/big") == big
    assert store.exists("jobs/j/objects/big")
    assert not store.exists("jobs/j/objects/none")
    assert store.list_names("jobs/j/") == ["jobs/j/objects/big", "jobs/j/tasks/t 1/payload"]
    # SAS URLs, as a node uses them: read, write, and a read-only one refused.
    read = store.sas_url("jobs/j/objects/big", read=True, expiry=timedelta(minutes=5))
    write = store.sas_url("jobs/j/tasks/t 1/result", write=True, expiry=timedelta(minutes=5))
    assert urlsplit(read).netloc == urlsplit(proxy.url).netloc
    assert download_url(read) == big
    upload_url(write, data)
    assert store.download("jobs/j/tasks/t 1/result") == data
    with pytest.raises(CredentialError):
        upload_url(read, b"not allowed")
    assert store.delete_prefix("jobs/j/") == 3
    seen = {r.operation_id for r in proxy.requests()}
    assert {"PutBlob", "PutBlock", "PutBlockList", "GetBlob", "GetBlobProperties"} <= seen
    assert {"ListBlobs", "BlobBatch", "CreateContainer"} <= seen
    auths = {r.auth for r in proxy.requests()}
    assert {"SharedKey", "SAS"} <= auths


def test_a_throttled_request_is_answered_as_azure_storage_does(proxy: BlobProxy) -> None:
    proxy.throttle("GetBlob", times=1, status=503, retry_after=2)
    address = urlsplit(proxy.url)
    conn = http.client.HTTPConnection(address.hostname or "", address.port)
    try:
        conn.request(
            "GET",
            "/devstoreaccount1/c/b",
            headers={"x-ms-version": "2026-10-06", "x-ms-client-request-id": "abc"},
        )
        answer = conn.getresponse()
        body = answer.read()
    finally:
        conn.close()
    assert answer.status == 503
    assert answer.getheader("x-ms-error-code") == "ServerBusy"
    assert answer.getheader("Retry-After") == "2"
    assert answer.getheader("x-ms-client-request-id") == "abc"
    assert answer.getheader("x-ms-version") == "2026-10-06"
    assert answer.getheader("x-ms-request-id")
    assert answer.getheader("Content-Type") == "application/xml"
    assert body.startswith(b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>')
    assert b"<Message>The server is currently unable to receive requests." in body
    (record,) = proxy.requests("GetBlob")[-1:]
    assert (record.status, record.fault) == (503, "injected 503")


def test_throttled_blob_requests_are_waited_out_as_asked(
    proxy: BlobProxy, store: BlobStore
) -> None:
    store.upload("x", b"payload")
    before = len(proxy.requests())
    proxy.throttle("GetBlob", times=2, status=503, retry_after=0.3)
    started = time.monotonic()
    assert store.download("x") == b"payload"
    elapsed = time.monotonic() - started
    statuses = [(r.operation_id, r.status) for r in proxy.requests()[before:]]
    assert statuses == [("GetBlob", 503), ("GetBlob", 503), ("GetBlob", 206)]  # a ranged GET
    assert 0.6 <= elapsed < 3.0  # two waits of 0.3 s, honoured


def test_throttling_that_outlasts_the_budget_is_a_throttled_error(
    azurite: Azurite, proxy: BlobProxy
) -> None:
    cfg = azurite_config(
        azurite, storage_url=f"{proxy.url}/{azurite.account_name}", retry_budget=0.5
    )
    with BlobStore.from_config(cfg) as short:
        short.ensure_container()
        proxy.throttle("PutBlob", times=1000, status=503, retry_after=0.1)
        try:
            with pytest.raises(ThrottledError) as info:
                short.upload("x", b"data")
        finally:
            proxy.faults.clear()
    assert (info.value.status_code, info.value.error_code) == (503, "ServerBusy")


def test_a_share_of_requests_is_refused(proxy: BlobProxy, store: BlobStore) -> None:
    store.upload("x", b"payload")
    before = len(proxy.requests("GetBlob"))
    proxy.throttle_share(0.5, "GetBlob", times=4, status=503, retry_after=0.05, seed=3)
    for _ in range(10):
        assert store.download("x") == b"payload"
    statuses = [r.status for r in proxy.requests("GetBlob")[before:]]
    assert statuses.count(503) == 4
    assert statuses.count(206) == 10  # ranged GETs


def test_the_node_agent_is_never_refused(proxy: BlobProxy, store: BlobStore) -> None:
    store.upload("resource.txt", b"resource")
    url = store.sas_url("resource.txt", read=True, expiry=timedelta(minutes=5))
    proxy.throttle("*", times=10, status=503)
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # as the node agent fetches
            assert answer.read() == b"resource"
    finally:
        proxy.faults.clear()


@pytest.mark.parametrize(
    ("method", "path", "query", "name"),
    [
        ("GET", "/acct/c/b", "", "GetBlob"),
        ("HEAD", "/acct/c/b/c", "", "GetBlobProperties"),
        ("PUT", "/acct/c/b", "", "PutBlob"),
        ("PUT", "/acct/c/b", "comp=block&blockid=AAA", "PutBlock"),
        ("PUT", "/acct/c/b", "comp=blocklist", "PutBlockList"),
        ("DELETE", "/acct/c/b", "", "DeleteBlob"),
        ("GET", "/acct/c", "restype=container&comp=list&prefix=jobs", "ListBlobs"),
        ("PUT", "/acct/c", "restype=container", "CreateContainer"),
        ("POST", "/acct/c", "restype=container&comp=batch", "BlobBatch"),
        ("POST", "/acct", "restype=service&comp=userdelegationkey", "GetUserDelegationKey"),
        ("GET", "/acct", "comp=list", "ListContainers"),
    ],
)
def test_requests_are_named_after_the_blob_service_operations(
    method: str, path: str, query: str, name: str
) -> None:
    assert blob_operation(method, path, query) == name


def test_a_proxy_forwards_only_to_plain_http() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        BlobProxy(f"https://127.0.0.1:1/{uuid.uuid4().hex}")


def test_local_batch_offers_blob_faults_only_when_asked() -> None:
    with pytest.raises(ValueError, match="tls=False"):
        LocalBatch(blob_faults=True, tls=True)
    plain = LocalBatch()
    with pytest.raises(RuntimeError, match=r"LocalBatch\(blob_faults=True\)"):
        plain.blob_faults  # noqa: B018

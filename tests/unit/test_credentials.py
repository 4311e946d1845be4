"""One credential per config for both clients, closed with the last of them, never the
user's; and every client names this library in its user agent."""

from __future__ import annotations

import base64
import gc
import time
import weakref
from importlib import metadata
from typing import Any

import azure.identity
import pytest
from azure.core.credentials import AccessToken
from azure.storage.blob import BlobServiceClient

from joblib_azurebatch import credentials
from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.credentials import lease_credential
from joblib_azurebatch.storage import BlobStore, download_url, upload_url
from tests.unit.canned_http import Answer, Seen, batch_error, canned_server, storage_error

KEY = base64.b64encode(b"k" * 32).decode()
ACCOUNT = "acct"


class FakeCredential:
    """Stands in for a token credential: hands out tokens and counts how often it is closed."""

    def __init__(self, **kwargs: Any) -> None:
        self.closed = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("token", int(time.time()) + 3600)

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[FakeCredential]:
    """Every ``DefaultAzureCredential`` the library creates, in order."""
    made: list[FakeCredential] = []

    def default_credential(**kwargs: Any) -> FakeCredential:
        made.append(FakeCredential(**kwargs))
        return made[-1]

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", default_credential)
    return made


def _token_config(**changes: Any) -> BatchConfig:
    values: dict[str, Any] = {
        "batch_url": "https://acct.westeurope.batch.azure.com",
        "storage_account": ACCOUNT,
    }
    values.update(changes)
    return BatchConfig(**values)


# ---------------------------------------------------------------------- one credential


def test_both_clients_share_one_default_credential_closed_once_with_the_last(
    created: list[FakeCredential],
) -> None:
    cfg = _token_config()
    svc = BatchService.from_config(cfg)
    store = BlobStore.from_config(cfg)
    assert len(created) == 1
    credential = created[0]
    svc.close()
    assert credential.closed == 0  # the blob client still uses it
    store.close()
    assert credential.closed == 1
    svc.close()
    store.close()
    assert credential.closed == 1


def test_the_order_of_closing_does_not_matter(created: list[FakeCredential]) -> None:
    cfg = _token_config()
    store = BlobStore.from_config(cfg)
    svc = BatchService.from_config(cfg)
    store.close()
    assert created[0].closed == 0
    svc.close()
    assert [c.closed for c in created] == [1]


def test_a_closed_credential_is_not_handed_out_again(created: list[FakeCredential]) -> None:
    cfg = _token_config()
    with BlobStore.from_config(cfg):
        pass
    assert [c.closed for c in created] == [1]
    svc = BatchService.from_config(cfg)
    try:
        assert len(created) == 2
        assert created[1].closed == 0
    finally:
        svc.close()
    assert [c.closed for c in created] == [1, 1]


def test_each_config_object_gets_its_own(created: list[FakeCredential]) -> None:
    first, second = _token_config(), _token_config()
    assert first == second
    assert first is not second
    stores = [BlobStore.from_config(first), BlobStore.from_config(second)]
    assert len(created) == 2
    stores[0].close()
    assert [c.closed for c in created] == [1, 0]
    stores[1].close()
    assert [c.closed for c in created] == [1, 1]


def test_the_users_credentials_are_used_and_never_closed(created: list[FakeCredential]) -> None:
    batch_credential, storage_credential = FakeCredential(), FakeCredential()
    cfg = _token_config(batch_credential=batch_credential, storage_credential=storage_credential)
    svc = BatchService.from_config(cfg)
    store = BlobStore.from_config(cfg)
    svc.close()
    store.close()
    assert created == []
    assert (batch_credential.closed, storage_credential.closed) == (0, 0)


def test_a_user_credential_on_one_side_leaves_the_other_side_its_default(
    created: list[FakeCredential],
) -> None:
    mine = FakeCredential()
    cfg = _token_config(batch_credential=mine)
    svc = BatchService.from_config(cfg)
    store = BlobStore.from_config(cfg)
    assert len(created) == 1
    store.close()
    assert created[0].closed == 1
    svc.close()
    assert mine.closed == 0
    assert created[0].closed == 1


def test_account_keys_need_no_token_credential(created: list[FakeCredential]) -> None:
    cfg = BatchConfig(
        batch_url="https://acct.westeurope.batch.azure.com",
        batch_account=ACCOUNT,
        batch_key=KEY,
        storage_account=ACCOUNT,
        storage_key=KEY,
    )
    BatchService.from_config(cfg).close()
    BlobStore.from_config(cfg).close()
    assert created == []


def test_a_config_that_is_gone_does_not_pass_its_credential_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new config may get the ``id`` of one that was garbage-collected while its clients
    were never closed: it must not inherit that config's credential."""
    made: list[FakeCredential] = []

    def make() -> FakeCredential:
        made.append(FakeCredential())
        return made[-1]

    gone = _token_config()
    dead = weakref.ref(gone)
    del gone
    gc.collect()
    assert dead() is None
    cfg = _token_config()
    leftover = FakeCredential()
    # What the collected config left behind, under the id the new config now has.
    monkeypatch.setitem(credentials._shared, id(cfg), credentials._Shared(id(cfg), dead, leftover))
    lease = lease_credential(cfg, None, make)
    assert lease.credential is made[0]
    assert lease.credential is not leftover
    lease.release()
    assert made[0].closed == 1
    assert leftover.closed == 0  # it belongs to the clients that were never closed
    assert id(cfg) not in credentials._shared


# ---------------------------------------------------------------------- user agent


def _user_agent(request: Seen) -> str:
    return next(v for k, v in request.headers.items() if k.lower() == "user-agent")


def _ours() -> str:
    return f"joblib-azurebatch/{metadata.version('joblib-azurebatch')} "


def test_the_batch_client_names_this_library() -> None:
    with canned_server(lambda method, path: batch_error(404, "PoolNotFound")) as server:
        cfg = BatchConfig(batch_url=server.url, batch_account=ACCOUNT, batch_key=KEY)
        svc = BatchService.from_config(cfg)
        try:
            assert svc.get_pool("p") is None
        finally:
            svc.close()
        (request,) = server.requests()
    agent = _user_agent(request)
    assert agent.startswith(_ours())
    assert "azsdk-python-batch/" in agent  # the SDK's own part is kept


def _blob_answer(method: str, path: str) -> Answer:
    if method == "PUT":
        return Answer(
            201, headers={"ETag": '"0x1"', "Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"}
        )
    return storage_error(404, "BlobNotFound")


def test_every_blob_client_names_this_library() -> None:
    with canned_server(_blob_answer) as server:
        endpoint = f"{server.url}/{ACCOUNT}"
        with BlobStore.from_config(
            BatchConfig(storage_account=ACCOUNT, storage_url=endpoint, storage_key=KEY)
        ) as store:
            assert store.exists("by-key") is False
        connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={endpoint};"
        )
        with BlobStore.from_config(
            BatchConfig(storage_connection_string=connection_string)
        ) as store:
            assert store.exists("by-connection-string") is False
        with pytest.raises(FileNotFoundError):
            download_url(f"{endpoint}/joblib-azurebatch/by-sas?sv=2024-01-01&sig=x")
        upload_url(f"{endpoint}/joblib-azurebatch/by-sas?sv=2024-01-01&sig=x", b"data")
        requests = server.requests()
    assert [r.method for r in requests] == ["HEAD", "HEAD", "GET", "PUT"]
    for request in requests:
        agent = _user_agent(request)
        assert agent.startswith(_ours()), (request.method, request.path, agent)
    # The client's own requests go through the SDK; a node's SAS transfers use the standard
    # library (the worker imports no blob SDK), so only the former name the SDK.
    assert ["azsdk-python-storage-blob/" in _user_agent(r) for r in requests] == [
        True,
        True,
        False,
        False,
    ]


def test_a_plain_blob_client_does_not_name_it() -> None:
    """The check above would pass vacuously if the SDK sent the name by itself."""
    with canned_server(_blob_answer) as server:
        service = BlobServiceClient(
            f"{server.url}/{ACCOUNT}", credential={"account_name": ACCOUNT, "account_key": KEY}
        )
        with service:
            service.get_blob_client("c", "x").exists()
        (request,) = server.requests()
    assert "joblib-azurebatch" not in _user_agent(request)

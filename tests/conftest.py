"""Fixtures shared by the whole suite: the local account's services, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import BlobServiceClient

from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.emulator.azurite import Azurite
from joblib_azurebatch.storage import BlobStore
from tests.helpers.accounts import azurite_config


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """A blob-only Azurite on a free port, for tests that need storage but no Batch emulator."""
    with Azurite() as running:
        yield running


@pytest.fixture
def store(azurite: Azurite) -> Iterator[BlobStore]:
    """A BlobStore on a new container of the session's Azurite, so tests never share blobs."""
    with BlobStore.from_config(azurite_config(azurite)) as blob_store:
        blob_store.ensure_container()
        yield blob_store


@pytest.fixture(scope="session")
def local() -> Iterator[LocalBatch]:
    """One local account (Azurite + Batch emulator) for the session: 2 nodes x 2 slots."""
    with LocalBatch(nodes=2, slots_per_node=2) as running:
        yield running


@pytest.fixture(scope="session")
def batch_client(local: LocalBatch) -> BatchClient:
    """The real azure-batch client, signed with the local account's shared key."""
    return BatchClient(
        local.batch_url, AzureNamedKeyCredential(local.batch_account, local.batch_key)
    )


@pytest.fixture(scope="session")
def blob_service(local: LocalBatch) -> BlobServiceClient:
    """The real azure-storage-blob client for the local account's Azurite."""
    return BlobServiceClient.from_connection_string(local.storage_connection_string)

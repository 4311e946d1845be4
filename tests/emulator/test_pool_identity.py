"""Pools with user-assigned managed identities, as Batch has them.

Only the management plane can give a pool an identity; the data plane reads it back as the
pool's ``identity``. A node's processes get that identity's tokens from the node's metadata
endpoint (IMDS), and a node without the identity gets IMDS's refusal. Resource files that
name the identity in ``identityReference`` are fetched with its token, and refused
(``BlobAccessDenied``) on a pool that does not have it.
"""

from __future__ import annotations

import json
import shlex
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.rest import HttpRequest
from azure.storage.blob import BlobClient, BlobServiceClient

from joblib_azurebatch.config import DEFAULT_IMAGE
from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.emulator.errors import BatchServiceError
from joblib_azurebatch.emulator.models import ManagedIdentity
from joblib_azurebatch.emulator.schema import response_errors
from tests.helpers.waiting import unique, vm, wait_for

API = "api-version=2025-06-01"


@pytest.fixture(scope="module")
def local() -> Iterator[LocalBatch]:
    """Azurite takes Entra ID tokens only over https: the account runs with TLS."""
    with LocalBatch(tls=True, nodes=1) as running:
        yield running


@pytest.fixture(scope="module")
def client(local: LocalBatch) -> Iterator[BatchClient]:
    with BatchClient(
        local.batch_url,
        AzureNamedKeyCredential(local.batch_account, local.batch_key),
        connection_verify=local.batch_ca_cert,
    ) as batch:
        yield batch


@pytest.fixture(scope="module")
def nodes_identity(local: LocalBatch) -> ManagedIdentity:
    return local.managed_identity("nodes")


@pytest.fixture(scope="module")
def identity_pool(local: LocalBatch, client: BatchClient, nodes_identity: ManagedIdentity) -> str:
    """A pool given ``nodes_identity`` through the management plane, its node idle."""
    pool_id = unique("with-identity")
    local.add_identity_pool(local.config(pool_id=pool_id), identity=nodes_identity)
    _idle(client, pool_id)
    return pool_id


@pytest.fixture(scope="module")
def plain_pool(client: BatchClient) -> str:
    """A pool made through the data plane: it has no identity."""
    pool_id = unique("plain")
    client.create_pool(
        m.BatchPoolCreateOptions(
            id=pool_id,
            vm_size="standard_d2s_v3",
            target_dedicated_nodes=1,
            virtual_machine_configuration=vm([DEFAULT_IMAGE]),
        )
    )
    _idle(client, pool_id)
    return pool_id


@pytest.fixture(scope="module")
def blob(local: LocalBatch) -> str:
    """The URL (no SAS) of a private blob, written with the account key."""
    service = BlobServiceClient(
        local.blob_url,
        credential={"account_name": local.storage_account, "account_key": local.storage_key},
        connection_verify=local.batch_ca_cert,
    )
    container = service.create_container(unique("identity"))
    container.upload_blob("input.txt", b"read as the pool's identity")
    return f"{container.url}/input.txt"


def _idle(client: BatchClient, pool_id: str) -> None:
    wait_for(
        f"an idle node in {pool_id}",
        lambda: any(n.state == m.BatchNodeState.IDLE for n in client.list_nodes(pool_id)),
    )


def _raw(client: BatchClient, path: str) -> dict[str, Any]:
    response = client.send_request(HttpRequest("GET", f"{client._config.endpoint}{path}?{API}"))
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def _metadata_host(local: LocalBatch, pool_id: str) -> str:
    """What the node's processes find in AZURE_POD_IDENTITY_AUTHORITY_HOST."""
    (node,) = local.emulator.account.pools[pool_id].nodes.values()
    return f"{local.batch_url}/_imds/{node.metadata_token}"


def _ask(
    local: LocalBatch, host: str, *, metadata: bool = True, **selector: str
) -> tuple[int, dict[str, Any]]:
    query = urlencode(
        {"api-version": "2018-02-01", "resource": "https://storage.azure.com/", **selector}
    )
    request = urllib.request.Request(
        f"{host}/metadata/identity/oauth2/token?{query}",
        headers={"Metadata": "true"} if metadata else {},
    )
    context = ssl.create_default_context(cafile=local.batch_ca_cert)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _run(
    client: BatchClient, pool_id: str, command: str, files: list[m.ResourceFile] | None = None
) -> m.BatchTask:
    job_id = unique("job")
    client.create_job(
        m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id))
    )
    client.create_task(
        job_id,
        m.BatchTaskCreateOptions(
            id="t",
            command_line=command,
            container_settings=m.BatchTaskContainerSettings(image_name=DEFAULT_IMAGE),
            resource_files=files,
        ),
    )
    return wait_for(
        "the task to complete",
        lambda: (
            t if (t := client.get_task(job_id, "t")).state == m.BatchTaskState.COMPLETED else None
        ),
    )


def _stdout(client: BatchClient, task: m.BatchTask) -> str:
    job_id = task.url.split("/jobs/", 1)[1].split("/", 1)[0]
    return b"".join(client.download_task_file(job_id, task.id, "stdout.txt")).decode()


# ---------------------------------------------------------------------- the pool


def test_the_pool_reads_back_with_its_identity(
    client: BatchClient, identity_pool: str, plain_pool: str, nodes_identity: ManagedIdentity
) -> None:
    body = _raw(client, f"/pools/{identity_pool}")
    assert body["identity"] == {
        "type": "UserAssigned",
        "userAssignedIdentities": [
            {
                "resourceId": nodes_identity.resource_id,
                "clientId": nodes_identity.client_id,
                "principalId": nodes_identity.principal_id,
            }
        ],
    }
    assert response_errors("Pools_GetPool", 200, body) == []
    listed = _raw(client, "/pools")
    assert response_errors("Pools_ListPools", 200, listed) == []
    read = client.get_pool(identity_pool).identity
    assert read is not None
    assert read.user_assigned_identities[0].client_id == nodes_identity.client_id
    assert "identity" not in _raw(client, f"/pools/{plain_pool}")


def test_only_identities_that_exist_can_be_given(local: LocalBatch) -> None:
    body = {
        "id": unique("p"),
        "vmSize": "standard_d2s_v3",
        "virtualMachineConfiguration": {
            "imageReference": {"publisher": "p", "offer": "o", "sku": "s"},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04",
        },
    }
    missing = local.managed_identity("x").resource_id.replace("/x", "/never-made")
    with pytest.raises(ValueError, match="does not exist"):
        local.emulator.create_pool_with_identity(body, [missing])
    with pytest.raises(BatchServiceError) as e:
        local.emulator.create_pool_with_identity({"id": "no-size"}, [local.managed_identity("x")])
    assert e.value.status == 400


def test_the_same_name_is_the_same_identity(local: LocalBatch) -> None:
    first = local.managed_identity("again")
    assert local.managed_identity("again") == first
    assert first.resource_id.endswith(
        "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/again"
    )


# ---------------------------------------------------------------------- the metadata endpoint


def test_a_node_gets_tokens_of_its_pools_identity(
    local: LocalBatch, identity_pool: str, nodes_identity: ManagedIdentity, blob: str
) -> None:
    host = _metadata_host(local, identity_pool)
    for selector in (
        {"msi_res_id": nodes_identity.resource_id},
        {"client_id": nodes_identity.client_id},
        {"object_id": nodes_identity.principal_id},
        {},  # the pool's only identity
    ):
        status, answer = _ask(local, host, **selector)
        assert status == 200, (selector, answer)
        assert answer["client_id"] == nodes_identity.client_id
        assert answer["token_type"] == "Bearer"
        assert int(answer["expires_in"]) > 3600
    # Azurite takes the token, as Azure Storage takes a managed identity's.
    token = _ask(local, host)[1]["access_token"]
    reader = BlobClient.from_blob_url(
        blob, credential=_Token(token), connection_verify=local.batch_ca_cert
    )
    assert reader.download_blob().readall() == b"read as the pool's identity"


def test_imds_refuses_what_the_node_does_not_have(
    local: LocalBatch, identity_pool: str, plain_pool: str
) -> None:
    other = local.managed_identity("not-on-the-pool")
    host = _metadata_host(local, identity_pool)
    for selector in ({"msi_res_id": other.resource_id}, {"client_id": other.client_id}):
        assert _ask(local, host, **selector) == (
            400,
            {"error": "invalid_request", "error_description": "Identity not found"},
        )
    assert _ask(local, _metadata_host(local, plain_pool)) == (
        400,
        {"error": "invalid_request", "error_description": "Identity not found"},
    )
    status, answer = _ask(local, host, metadata=False)
    assert status == 400
    assert "metadata header" in answer["error_description"]
    assert _ask(local, f"{local.batch_url}/_imds/not-a-node")[0] == 404


def test_task_processes_reach_their_nodes_endpoint(
    client: BatchClient, identity_pool: str, nodes_identity: ManagedIdentity
) -> None:
    """azure-identity on the node finds the endpoint through the variable it reads."""
    code = (
        "import os; from azure.identity import ManagedIdentityCredential as C; "
        f"c = C(identity_config={{'resource_id': {nodes_identity.resource_id!r}}}); "
        "print(os.environ['AZURE_POD_IDENTITY_AUTHORITY_HOST'].split('/_imds/')[0]); "
        "print(c.get_token('https://storage.azure.com/.default').token[:3])"
    )
    task = _run(client, identity_pool, f"{sys.executable} -c {shlex.quote(code)}")
    assert task.execution_info.exit_code == 0, _stdout(client, task)
    assert _stdout(client, task).split() == [client._config.endpoint.rstrip("/"), "eyJ"]


# ---------------------------------------------------------------------- resource files


def test_resource_files_are_fetched_as_the_pools_identity(
    client: BatchClient, identity_pool: str, nodes_identity: ManagedIdentity, blob: str
) -> None:
    file = m.ResourceFile(
        http_url=blob,
        file_path="input.txt",
        identity_reference=m.BatchNodeIdentityReference(resource_id=nodes_identity.resource_id),
    )
    task = _run(client, identity_pool, "cat input.txt", [file])
    assert task.execution_info.exit_code == 0
    assert _stdout(client, task) == "read as the pool's identity"


@pytest.mark.parametrize("pool", ["plain", "other identity", "no identity named"])
def test_a_resource_file_the_node_may_not_read_fails_the_task(
    local: LocalBatch,
    client: BatchClient,
    identity_pool: str,
    plain_pool: str,
    nodes_identity: ManagedIdentity,
    blob: str,
    pool: str,
) -> None:
    rid = nodes_identity.resource_id
    pool_id = identity_pool
    if pool == "plain":
        pool_id = plain_pool
    elif pool == "other identity":
        rid = local.managed_identity("not-on-the-pool").resource_id
    reference = (
        None if pool == "no identity named" else m.BatchNodeIdentityReference(resource_id=rid)
    )
    file = m.ResourceFile(http_url=blob, file_path="input.txt", identity_reference=reference)
    task = _run(client, pool_id, "cat input.txt", [file])
    info = task.execution_info
    assert info.exit_code is None  # the command never ran
    assert info.failure_info is not None
    assert info.failure_info.category == m.BatchErrorSourceCategory.USER_ERROR
    assert info.failure_info.code == "BlobAccessDenied"


class _Token:
    """A credential that hands out one token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self._token, 2**31 - 1)

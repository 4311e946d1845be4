"""Node-identity mode without a network: the config field, the task settings the payload
writer makes (names, never capabilities), the environment staging, the pool check, and the
SDK bodies of resource files that name an identity."""

from __future__ import annotations

import threading
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from azure.batch import models as bm
from joblib._parallel_backends import SequentialBackend
from joblib.parallel import BatchedCalls

from joblib_azurebatch import bootstrap, identity, payload, provision
from joblib_azurebatch.batch import BatchService, PoolInfo, ResourceFile, TaskSpec
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.errors import ConfigError
from joblib_azurebatch.payload import (
    CONTAINER_URL_ENV,
    KEY_BLOB_ENV,
    NODE_IDENTITY_ENV,
    PAYLOAD_BLOB_ENV,
    RESULT_BLOB_ENV,
    PayloadWriter,
    decode_task,
    key_blob,
)
from tests.fakes import MemoryStore

RID = (
    "/subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/science/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/joblib-nodes"
)
OTHER = RID.replace("joblib-nodes", "someone-else")
KEY = bytes(range(32))
CONTAINER = "https://acct.blob.core.windows.net/joblib-azurebatch"


class IdentityStore(MemoryStore):
    """`payload.NodeIdentityStore` in memory; signing a SAS URL is a test failure."""

    def __init__(self, node_identity: str | None = RID) -> None:
        super().__init__()
        self.node_identity = node_identity
        self.container_url = CONTAINER

    def blob_url(self, name: str) -> str:
        return f"{CONTAINER}/{name}"

    def sas_url(
        self, name: str, *, read: bool = False, write: bool = False, expiry: timedelta
    ) -> str:
        if self.node_identity is not None:
            pytest.fail(f"a SAS URL was signed for {name} in node-identity mode")
        return f"{CONTAINER}/{name}?sp={'r' if read else 'cw'}&sig=abc"


def calls(*items: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> BatchedCalls:
    return BatchedCalls(list(items), (SequentialBackend(), 1))


def add(a: int, b: int = 0) -> int:
    return a + b


# ---------------------------------------------------------------------- the config


def test_node_identity_takes_the_resource_id_of_a_user_assigned_identity() -> None:
    cfg = BatchConfig(node_identity=RID)
    assert cfg.node_identity == RID
    assert "node_identity=" in repr(cfg)  # an id, not a secret
    lower = BatchConfig(
        node_identity=RID.replace("Microsoft.ManagedIdentity", "microsoft.managedidentity")
    )
    assert lower.node_identity is not None


def test_node_identity_is_read_from_its_variable() -> None:
    assert BatchConfig.ENV_VARS["node_identity"] == ("JOBLIB_AZUREBATCH_NODE_IDENTITY",)
    cfg = BatchConfig.from_env(environ={"JOBLIB_AZUREBATCH_NODE_IDENTITY": f'"{RID}"'})
    assert cfg.node_identity == RID
    assert BatchConfig.from_env(environ={}).node_identity is None


@pytest.mark.parametrize(
    "value",
    [
        "5d2c6b5e-1111-2222-3333-444455556666",  # a client id: identityReference needs the ARM id
        "joblib-nodes",
        RID.replace("userAssignedIdentities", "systemAssignedIdentities"),
        RID + "/extra",
        RID.replace("Microsoft.ManagedIdentity", "Microsoft.Storage"),
        "",
        42,
    ],
)
def test_node_identity_refuses_what_is_not_a_user_assigned_identity(value: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"node_identity \(JOBLIB_AZUREBATCH_NODE_IDENTITY\)"
    ) as e:
        BatchConfig(node_identity=value)
    assert "az identity show" in str(e.value)


# ---------------------------------------------------------------------- the payload writer


def test_prepare_names_blobs_and_grants_nothing() -> None:
    store = IdentityStore()
    writer = PayloadWriter(store, job_id="job1", signing_key=KEY, inline_threshold=16)
    big = b"x" * 64
    task = writer.prepare("task-1", calls((add, (1, 2), {}), (len, (big,), {})))
    assert task.environment == {
        CONTAINER_URL_ENV: CONTAINER,
        PAYLOAD_BLOB_ENV: "jobs/job1/tasks/task-1/payload",
        RESULT_BLOB_ENV: "jobs/job1/tasks/task-1/result",
        KEY_BLOB_ENV: "jobs/job1/key",
        NODE_IDENTITY_ENV: RID,
    }
    for value in task.environment.values():
        assert "sig=" not in value
        assert KEY.hex() not in value
    # The key is a blob, the payload verifies with it, and its object table holds names.
    assert store.blobs[key_blob("job1")] == KEY
    envelope = decode_task(store.blobs[task.payload_blob], store.blobs[key_blob("job1")])
    assert envelope.task_id == "task-1"
    (sha,) = task.objects
    assert envelope.objects == {sha: f"jobs/job1/objects/{sha}"}
    assert f"jobs/job1/objects/{sha}" in store.blobs


def test_the_key_blob_is_written_once_per_job() -> None:
    store = IdentityStore()
    writer = PayloadWriter(store, job_id="job1", signing_key=KEY)
    threads = [
        threading.Thread(target=writer.prepare, args=(f"task-{i}", calls((add, (i,), {}))))
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.uploads.count(key_blob("job1")) == 1
    assert len([n for n in store.uploads if n.endswith("/payload")]) == 8


def test_without_an_identity_the_writer_signs_sas_urls_as_before() -> None:
    store = IdentityStore(node_identity=None)
    task = PayloadWriter(store, job_id="job1", signing_key=KEY).prepare("t", calls((add, (1,), {})))
    assert set(task.environment) == {
        payload.PAYLOAD_URL_ENV,
        payload.RESULT_URL_ENV,
        payload.SIGNING_KEY_ENV,
    }
    assert key_blob("job1") not in store.blobs


def test_the_node_identity_variable_is_the_same_for_bootstrap_and_worker() -> None:
    """bootstrap.py imports nothing of the package, so it spells the name itself."""
    assert bootstrap.NODE_IDENTITY_ENV == payload.NODE_IDENTITY_ENV
    assert bootstrap.IMDS_HOST_ENV == "AZURE_POD_IDENTITY_AUTHORITY_HOST"


# ---------------------------------------------------------------------- the environment


def test_staging_gives_resource_files_an_identity_and_signs_nothing() -> None:
    store = IdentityStore()
    environment = SimpleNamespace(
        env_id="0123456789abcdef", bundle=lambda: b"zip", versions=("joblib==1.6.0",)
    )
    setup = provision.stage(
        environment,  # type: ignore[arg-type]
        store,  # type: ignore[arg-type]
        image="python:3.11-slim",
        task_expiry=timedelta(hours=1),
    )
    bundle = f"{CONTAINER}/envs/0123456789abcdef/bundle.zip"
    script = ResourceFile(
        http_url=f"{CONTAINER}/envs/0123456789abcdef/bootstrap.py",
        file_path="bootstrap.py",
        identity_reference=RID,
    )
    for files, settings in (
        (setup.resource_files, setup.environment),
        (setup.start_task.resource_files, setup.start_task.environment),
    ):
        assert files == (script,)
        assert dict(settings) == {bootstrap.BUNDLE_ENV: bundle, NODE_IDENTITY_ENV: RID}


# ---------------------------------------------------------------------- the pool check


class OnePool:
    """The one Batch call the check makes."""

    def __init__(self, pool: PoolInfo | None) -> None:
        self.pool = pool
        self.reads = 0

    def get_pool(self, pool_id: str) -> PoolInfo | None:
        self.reads += 1
        return self.pool


def _pool(*identities: str, state: str = "active") -> PoolInfo:
    return PoolInfo(
        pool_id="cv-pool",
        state=state,
        allocation_state="steady",
        vm_size="standard_d2s_v3",
        target_dedicated_nodes=1,
        target_spot_nodes=0,
        current_dedicated_nodes=1,
        current_spot_nodes=0,
        task_slots_per_node=1,
        identities=identities,
    )


def test_the_check_sends_nothing_without_an_identity() -> None:
    svc = OnePool(None)
    assert identity.check_pool(svc, BatchConfig(pool_id="cv-pool")) is None  # type: ignore[arg-type]
    assert svc.reads == 0


def test_a_missing_pool_is_a_config_error_that_names_the_fix() -> None:
    cfg = BatchConfig(pool_id="cv-pool", node_identity=RID)
    with pytest.raises(ConfigError) as e:
        identity.check_pool(OnePool(None), cfg)  # type: ignore[arg-type]
    text = str(e.value)
    assert "does not exist" in text
    assert "cv-pool" in text
    assert RID in text
    assert "az deployment group create" in text
    assert "docs/security.md" in text
    assert "Nothing was created" in text


def test_a_pool_being_deleted_counts_as_missing() -> None:
    cfg = BatchConfig(pool_id="cv-pool", node_identity=RID)
    with pytest.raises(ConfigError, match="is being deleted"):
        identity.check_pool(OnePool(_pool(RID, state="deleting")), cfg)  # type: ignore[arg-type]


def test_a_pool_without_the_identity_is_a_config_error() -> None:
    cfg = BatchConfig(pool_id="cv-pool", node_identity=RID)
    with pytest.raises(ConfigError, match="does not have the managed identity") as e:
        identity.check_pool(OnePool(_pool(OTHER)), cfg)  # type: ignore[arg-type]
    assert OTHER in str(e.value)
    with pytest.raises(ConfigError, match=r"identities: none"):
        identity.check_pool(OnePool(_pool()), cfg)  # type: ignore[arg-type]


def test_a_pool_with_the_identity_passes_whatever_the_case_of_its_id() -> None:
    pool = _pool(OTHER, RID.upper())
    cfg = BatchConfig(pool_id="cv-pool", node_identity=RID)
    assert identity.check_pool(OnePool(pool), cfg) is pool  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the SDK bodies


def test_a_resource_file_names_its_identity_in_the_request_body() -> None:
    spec = TaskSpec(
        task_id="t",
        command_line="python bootstrap.py run 0123456789abcdef",
        image="python:3.11-slim",
        resource_files=(
            ResourceFile(
                http_url=f"{CONTAINER}/envs/x/bootstrap.py",
                file_path="bootstrap.py",
                identity_reference=RID,
            ),
            ResourceFile(http_url=f"{CONTAINER}/a?sig=s", file_path="a"),
        ),
    )
    body = BatchService._task_options(spec).as_dict()
    with_identity, with_sas = body["resourceFiles"]
    assert with_identity["identityReference"] == {"resourceId": RID}
    assert "identityReference" not in with_sas


def test_a_pool_read_back_lists_its_identities() -> None:
    pool = bm.BatchPool(
        {
            "id": "cv-pool",
            "state": "active",
            "allocationState": "steady",
            "vmSize": "standard_d2s_v3",
            "identity": {
                "type": "UserAssigned",
                "userAssignedIdentities": [
                    {"resourceId": RID, "clientId": "c", "principalId": "p"},
                ],
            },
        }
    )
    assert BatchService._pool_info(pool).identities == (RID,)
    del pool["identity"]
    assert BatchService._pool_info(pool).identities == ()

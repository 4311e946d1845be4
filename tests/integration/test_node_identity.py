"""Node-identity mode end to end: tasks name blobs, the pool's identity reads them.

``BatchConfig(node_identity=...)`` runs on a pool that has the user-assigned managed
identity (made here as the management plane would, ``LocalBatch.add_identity_pool``). The
task definitions then carry the container's URL, blob names and the identity's resource id,
and nothing that grants access: a reader of the Batch account's tasks learns names. The
nodes get tokens from their metadata endpoint, and Azurite (on https, with OAuth) takes
them as Azure Storage takes a managed identity's.

What is checked: the results; the task definitions as the Batch API returns them (no SAS
signature, no key); a reader of those definitions refused by storage; a storage writer
without the job's key refused by the client (``PayloadError``, nothing unpickled); a run
whose pool is missing stopped before anything is created; and a node without the identity
failing its task at once with a line that says so.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import joblib
import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch import identity, payload, worker
from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.config import DEFAULT_IMAGE, BatchConfig
from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.emulator.models import ManagedIdentity
from joblib_azurebatch.errors import ConfigError, PayloadError
from joblib_azurebatch.storage import BlobStore
from tests.helpers.waiting import vm, wait_for

# The worker runs in another process that cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

IDENTITY_SETTINGS = {
    payload.CONTAINER_URL_ENV,
    payload.PAYLOAD_BLOB_ENV,
    payload.RESULT_BLOB_ENV,
    payload.KEY_BLOB_ENV,
    payload.NODE_IDENTITY_ENV,
}


def square(x: int) -> int:
    return x * x


class Detonator:
    """A value whose unpickling leaves a file behind: proof that it was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def local() -> Iterator[LocalBatch]:
    """Azurite takes Entra ID tokens only over https: the account runs with TLS."""
    with LocalBatch(tls=True, nodes=1, slots_per_node=2) as running:
        yield running


@pytest.fixture(scope="module")
def nodes(local: LocalBatch) -> ManagedIdentity:
    return local.managed_identity("joblib-nodes")


@pytest.fixture(scope="module")
def client(local: LocalBatch) -> Iterator[BatchClient]:
    """The test's own look at the account: a Batch-API reader's view."""
    with BatchClient(
        local.batch_url,
        AzureNamedKeyCredential(local.batch_account, local.batch_key),
        connection_verify=local.batch_ca_cert,
    ) as batch:
        yield batch


def _config(local: LocalBatch, pool_id: str, rid: str, **changes: Any) -> BatchConfig:
    name = f"{pool_id}-{secrets.token_hex(3)}"
    return local.config(
        pool_id=pool_id,
        job_id=name,
        container=f"nid-{secrets.token_hex(4)}",
        node_identity=rid,
        ca_bundle=local.batch_ca_cert,
        progress=False,
        **changes,
    )


@pytest.fixture(scope="module")
def image_pool(local: LocalBatch, nodes: ManagedIdentity) -> str:
    """A pool with the identity that runs the worker image."""
    local.add_identity_pool(_config(local, "nid-image", nodes.resource_id), identity=nodes)
    return "nid-image"


@pytest.fixture(scope="module")
def bare_pool(local: LocalBatch, nodes: ManagedIdentity) -> str:
    """A pool with the identity on the default path's public image (no start task)."""
    cfg = _config(local, "nid-default", nodes.resource_id, image=None)
    local.add_identity_pool(cfg, identity=nodes)
    return "nid-default"


def _job(client: BatchClient, cfg: BatchConfig) -> str:
    (job,) = [j.id for j in client.list_jobs() if j.id.startswith(f"{cfg.job_id}-")]
    return job


def _everything_readable(task: m.BatchTask) -> list[str]:
    """What a reader of the account's tasks sees of one task, as text."""
    seen = [task.command_line or ""]
    seen += [f"{s.name}={s.value}" for s in task.environment_settings or []]
    for file in task.resource_files or []:
        seen.append(str(file.as_dict()))
    return seen


def _finish(client: BatchClient, store: BlobStore, job_id: str) -> None:
    client.begin_delete_job(job_id, polling_interval=0.1).result()  # type: ignore[arg-type]
    store.delete_prefix(payload.job_prefix(job_id))


# ---------------------------------------------------------------------- runs


def test_a_run_gets_its_results_and_its_tasks_carry_names_only(
    local: LocalBatch, client: BatchClient, nodes: ManagedIdentity, image_pool: str
) -> None:
    cfg = _config(local, image_pool, nodes.resource_id, keep_job=True, keep_blobs=True)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1, batch_size=1)(delayed(square)(x) for x in range(6))
    assert out == [x * x for x in range(6)]

    job_id = _job(client, cfg)
    with BlobStore.from_config(cfg) as store:
        key = store.download(payload.key_blob(job_id))
        try:
            tasks = list(client.list_tasks(job_id))
            assert len(tasks) == 6
            for task in tasks:
                settings = {s.name: s.value or "" for s in task.environment_settings or []}
                assert set(settings) == IDENTITY_SETTINGS
                assert settings[payload.NODE_IDENTITY_ENV] == nodes.resource_id
                assert settings[payload.CONTAINER_URL_ENV] == store.container_url
                for text in _everything_readable(task):
                    assert "sig=" not in text
                    assert key.hex() not in text
                    assert local.storage_key not in text
                    assert local.batch_key not in text
            assert client.get_pool(image_pool).start_task is None
        finally:
            _finish(client, store, job_id)
    assert local.emulator.metadata_requests[200] >= 6  # a token per task process


def test_the_default_path_installs_the_environment_as_the_identity(
    local: LocalBatch, client: BatchClient, nodes: ManagedIdentity, bare_pool: str
) -> None:
    cfg = _config(local, bare_pool, nodes.resource_id, image=None, keep_job=True)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1, batch_size=1)(delayed(square)(x) for x in range(3))
    assert out == [0, 1, 4]
    job_id = _job(client, cfg)
    with BlobStore.from_config(cfg) as store:
        try:
            for task in client.list_tasks(job_id):
                (script,) = task.resource_files or []
                assert script.file_path == "bootstrap.py"
                assert "?" not in (script.http_url or "")
                assert script.identity_reference is not None
                assert script.identity_reference.resource_id == nodes.resource_id
                for text in _everything_readable(task):
                    assert "sig=" not in text
        finally:
            _finish(client, store, job_id)


# ---------------------------------------------------------------------- who can forge


def test_a_reader_of_the_tasks_cannot_act_as_the_node(
    local: LocalBatch, client: BatchClient, nodes: ManagedIdentity, image_pool: str
) -> None:
    """Everything a task's definition says, used without a credential of one's own."""
    cfg = _config(local, image_pool, nodes.resource_id, keep_job=True, keep_blobs=True)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        assert Parallel(n_jobs=-1, batch_size=1)(delayed(square)(x) for x in (5, 6)) == [25, 36]
    job_id = _job(client, cfg)
    with BlobStore.from_config(cfg) as store:
        try:
            task = next(iter(client.list_tasks(job_id)))
            settings = {s.name: s.value or "" for s in task.environment_settings or []}
            container = settings[payload.CONTAINER_URL_ENV]

            def anonymous(name: str) -> BlobClient:
                return BlobClient.from_blob_url(
                    f"{container}/{name}", connection_verify=local.batch_ca_cert
                )

            forged = payload.encode_result(
                job_id=job_id, task_id=task.id, key=secrets.token_bytes(32), value=[0]
            )
            with pytest.raises(HttpResponseError) as wrote:
                anonymous(settings[payload.RESULT_BLOB_ENV]).upload_blob(forged, overwrite=True)
            assert wrote.value.status_code in (401, 403)
            for name in (settings[payload.KEY_BLOB_ENV], settings[payload.PAYLOAD_BLOB_ENV]):
                with pytest.raises(HttpResponseError) as read:
                    anonymous(name).download_blob().readall()
                assert read.value.status_code in (401, 403)
            # The result the node wrote is still the one that verifies.
            key = store.download(payload.key_blob(job_id))
            result = store.download(settings[payload.RESULT_BLOB_ENV])
            assert payload.read_result(result, key, job_id=job_id, task_id=task.id).ok
        finally:
            _finish(client, store, job_id)


def test_a_result_forged_without_the_jobs_key_is_refused_not_unpickled(
    local: LocalBatch,
    nodes: ManagedIdentity,
    image_pool: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storage writer (the account key) who does not know the job's key replaces the
    result the node wrote, after the node wrote it and before the client reads it."""
    cfg = _config(local, image_pool, nodes.resource_id)
    marker = tmp_path / "unpickled"
    real_download = BlobStore.download
    lock = threading.Lock()
    forged: list[str] = []

    def download(self: BlobStore, blob: str) -> bytes:
        if blob.endswith("/result"):
            with lock:
                if not forged:
                    job_id, task_id = blob.split("jobs/", 1)[1].split("/tasks/")
                    envelope = payload.encode_result(
                        job_id=job_id,
                        task_id=task_id.split("/")[0],
                        key=secrets.token_bytes(32),  # made up: the writer lacks the job's
                        value=[Detonator(marker)],
                    )
                    self.upload(blob, envelope)
                    forged.append(blob)
        return real_download(self, blob)

    monkeypatch.setattr(BlobStore, "download", download)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(PayloadError, match="failed signature verification"),
    ):
        Parallel(n_jobs=-1, batch_size=1)(delayed(square)(x) for x in (7,))
    assert forged
    assert not marker.exists()


# ---------------------------------------------------------------------- the pool


def test_the_pool_check_against_the_account(
    local: LocalBatch, client: BatchClient, nodes: ManagedIdentity, image_pool: str
) -> None:
    cfg = _config(local, image_pool, nodes.resource_id)
    service = BatchService.from_config(cfg)
    try:
        pool = identity.check_pool(service, cfg)
        assert pool is not None
        assert pool.identities == (nodes.resource_id,)
        stranger = local.managed_identity("not-on-the-pool").resource_id
        with pytest.raises(ConfigError, match="does not have the managed identity"):
            identity.check_pool(service, cfg.replace(node_identity=stranger))
        with pytest.raises(ConfigError, match="does not exist"):
            identity.check_pool(service, cfg.replace(pool_id="nid-never-made"))
    finally:
        service.close()


def test_a_missing_pool_stops_the_run_before_anything_is_created(
    local: LocalBatch, client: BatchClient, nodes: ManagedIdentity
) -> None:
    cfg = _config(local, f"nid-missing-{secrets.token_hex(3)}", nodes.resource_id)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(ConfigError, match="must already exist") as e,
    ):
        Parallel(n_jobs=-1, batch_size=1)(delayed(square)(x) for x in range(2))
    assert "Nothing was created" in str(e.value)
    assert cfg.pool_id not in [p.id for p in client.list_pools()]
    assert not [j.id for j in client.list_jobs() if j.id.startswith(f"{cfg.job_id}-")]
    with BlobStore.from_config(cfg) as store:
        assert not store._container.exists()


def test_a_node_without_the_identity_fails_its_task_at_once(
    local: LocalBatch, client: BatchClient, nodes: ManagedIdentity
) -> None:
    """The worker of a task on a pool without the identity gets no token: it exits with
    a line that says so, and Batch sees a failure, rather than a task that hangs."""
    pool_id = f"nid-plain-{secrets.token_hex(3)}"
    client.create_pool(
        m.BatchPoolCreateOptions(
            id=pool_id,
            vm_size="standard_d2s_v3",
            target_dedicated_nodes=1,
            virtual_machine_configuration=vm([DEFAULT_IMAGE]),
        )
    )
    job_id = f"{pool_id}-job"
    client.create_job(
        m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id))
    )
    cfg = _config(local, pool_id, nodes.resource_id)
    container = BlobStore.from_config(cfg).container_url
    settings = {
        payload.CONTAINER_URL_ENV: container,
        payload.PAYLOAD_BLOB_ENV: payload.payload_blob(job_id, "t"),
        payload.RESULT_BLOB_ENV: payload.result_blob(job_id, "t"),
        payload.KEY_BLOB_ENV: payload.key_blob(job_id),
        payload.NODE_IDENTITY_ENV: nodes.resource_id,
    }
    started = time.monotonic()
    client.create_task(
        job_id,
        m.BatchTaskCreateOptions(
            id="t",
            command_line="python -m joblib_azurebatch.worker",
            container_settings=m.BatchTaskContainerSettings(image_name=DEFAULT_IMAGE),
            environment_settings=[
                m.EnvironmentSetting(name=k, value=v) for k, v in settings.items()
            ],
        ),
    )
    task = wait_for(
        "the task to complete",
        lambda: (
            t if (t := client.get_task(job_id, "t")).state == m.BatchTaskState.COMPLETED else None
        ),
        timeout=60,
    )
    assert time.monotonic() - started < 30
    assert task.execution_info.exit_code == worker.EXIT_DOWNLOAD_FAILED
    stderr = b"".join(client.download_task_file(job_id, "t", "stderr.txt")).decode()
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("[joblib-azurebatch worker] error: downloading the job's key failed")
    assert f"could not get a token for the managed identity {nodes.resource_id}" in line
    assert "Identity not found" in line
    client.begin_delete_pool(pool_id, polling_interval=0.1)  # type: ignore[arg-type]

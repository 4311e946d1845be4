"""Container images are pulled from a registry: an image nobody publishes fails as on Batch.

The emulator's registry is its image table (reference → local interpreter). A task whose
image is not in it completes with ``ContainerInvalidImage`` and never runs; a pool that
prefetches such an image gets ``unusable`` nodes with a node error; the default table
still serves the project's worker image and ``python:X.Y-slim``.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.batch.models._models import BatchNodeRebootOptions  # not re-exported by 15.1
from azure.core.exceptions import HttpResponseError

from joblib_azurebatch.config import default_image
from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.emulator.images import parse_reference, resolve, slim_image
from joblib_azurebatch.emulator.schema import response_errors
from tests.helpers.waiting import FAST, unique, vm, wait_for

SLIM = slim_image()
NO_SUCH_IMAGE = "myregistry.azurecr.io/never-pushed:1.0"


class Wire:
    """A raw-response hook that keeps every JSON answer: (url, status, body)."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, int, Any]] = []

    def __call__(self, pipeline_response: Any) -> None:
        response = pipeline_response.http_response
        if "json" in response.headers.get("Content-Type", ""):
            response.read()
            self.bodies.append((response.request.url, response.status_code, response.json()))


@pytest.fixture
def pool(batch_client: BatchClient) -> Iterator[str]:
    """A one-node pool that prefetches ``python:X.Y-slim``, deleted afterwards."""
    pool_id = unique("img-pool")
    batch_client.create_pool(
        m.BatchPoolCreateOptions(
            id=pool_id,
            vm_size="standard_d2s_v3",
            target_dedicated_nodes=1,
            task_slots_per_node=2,
            virtual_machine_configuration=vm([SLIM]),
        )
    )
    wait_for(
        "an idle node", lambda: [n for n in batch_client.list_nodes(pool_id) if n.state == "idle"]
    )
    yield pool_id
    batch_client.begin_delete_pool(pool_id, polling_interval=FAST)


@pytest.fixture
def job(batch_client: BatchClient, pool: str) -> Iterator[str]:
    job_id = unique("img-job")
    batch_client.create_job(
        m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool))
    )
    yield job_id
    batch_client.begin_delete_job(job_id, polling_interval=FAST)


def completed(client: BatchClient, job_id: str, task_id: str) -> m.BatchTask:
    wait_for(
        f"task {task_id} to complete",
        lambda: client.get_task(job_id, task_id).state == m.BatchTaskState.COMPLETED,
    )
    return client.get_task(job_id, task_id)


def in_image(task_id: str, image: str, command: str) -> m.BatchTaskCreateOptions:
    return m.BatchTaskCreateOptions(
        id=task_id,
        command_line=command,
        container_settings=m.BatchTaskContainerSettings(image_name=image),
    )


# --- the registry itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "canonical"),
    [
        ("python:3.11-slim", "docker.io/library/python:3.11-slim"),
        ("docker.io/library/python:3.11-slim", "docker.io/library/python:3.11-slim"),
        ("index.docker.io/library/python:3.11-slim", "docker.io/library/python:3.11-slim"),
        ("library/python", "docker.io/library/python:latest"),
        ("myorg/worker:2", "docker.io/myorg/worker:2"),
        ("localhost:5000/worker", "localhost:5000/worker:latest"),
        ("myregistry.azurecr.io/team/worker:1", "myregistry.azurecr.io/team/worker:1"),
        ("ghcr.io/o/w@sha256:abc", "ghcr.io/o/w@sha256:abc"),
    ],
)
def test_references_are_read_as_docker_pull_reads_them(image: str, canonical: str) -> None:
    assert parse_reference(image).canonical == canonical


def test_resolve_matches_tags_exactly_and_repositories_by_prefix() -> None:
    table = {
        "python:3.11-slim": "/slim",
        "myregistry.azurecr.io/worker": "/any-tag",
        "myregistry.azurecr.io/worker:2": "/two",
        "ghcr.io/o/w@sha256:abc": "/pinned",
    }
    assert resolve(table, "docker.io/library/python:3.11-slim") == "/slim"
    assert resolve(table, "python:3.12-slim") is None
    assert resolve(table, "python") is None  # python:latest is another image
    assert resolve(table, "Python:3.11-slim") is None  # Docker refuses upper case
    assert resolve(table, "myregistry.azurecr.io/worker:2") == "/two"
    assert resolve(table, "myregistry.azurecr.io/worker:7") == "/any-tag"
    assert resolve(table, "myregistry.azurecr.io/other:7") is None
    assert resolve(table, "ghcr.io/o/w@sha256:abc") == "/pinned"
    assert resolve(table, "ghcr.io/o/w@sha256:def") is None
    assert resolve(table, "") is None


def test_the_default_table_serves_the_worker_image_and_python_slim(local: LocalBatch) -> None:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert local.images[default_image(version)] == sys.executable
    assert local.images[f"python:{version}-slim"] == sys.executable
    assert local.bare_python is None


# --- tasks --------------------------------------------------------------------------------------


def test_a_task_in_an_unknown_image_fails_to_pull(batch_client: BatchClient, job: str) -> None:
    marker = f"ran-{uuid.uuid4().hex[:6]}"
    batch_client.create_task(job, in_image("ghost", NO_SUCH_IMAGE, f"echo {marker}"))
    batch_client.create_task(job, in_image("slim", SLIM, f"echo {marker}"))

    ghost = completed(batch_client, job, "ghost").execution_info
    assert ghost.result == m.BatchTaskExecutionResult.FAILURE
    assert ghost.failure_info.category == m.BatchErrorSourceCategory.USER_ERROR
    assert ghost.failure_info.code == "ContainerInvalidImage"
    details = {d.name: d.value for d in ghost.failure_info.details}
    assert details["ContainerImage"] == NO_SUCH_IMAGE
    assert ghost.exit_code is None  # the command never ran
    assert ghost.retry_count == 0  # a pre-processing error is not retried
    names = {f.name for f in batch_client.list_task_files(job, "ghost", recursive=True)}
    assert "stdout.txt" not in names

    slim = completed(batch_client, job, "slim").execution_info
    assert slim.result == m.BatchTaskExecutionResult.SUCCESS
    out = b"".join(batch_client.download_task_file(job, "slim", "stdout.txt")).decode()
    assert out.strip() == marker


def test_a_pull_failure_is_not_retried(batch_client: BatchClient, job: str) -> None:
    task = in_image("ghost-retried", NO_SUCH_IMAGE, "true")
    task.constraints = m.BatchTaskConstraints(max_task_retry_count=3)
    batch_client.create_task(job, task)
    info = completed(batch_client, job, "ghost-retried").execution_info
    assert (info.failure_info.code, info.retry_count) == ("ContainerInvalidImage", 0)


@pytest.mark.parametrize("image", [SLIM, f"docker.io/library/{SLIM}"])
def test_python_slim_runs_this_python(batch_client: BatchClient, job: str, image: str) -> None:
    task_id = unique("which")
    code = "import sys; print(sys.version_info[0], sys.version_info[1])"
    batch_client.create_task(job, in_image(task_id, image, f"python -c '{code}'"))
    info = completed(batch_client, job, task_id).execution_info
    assert info.exit_code == 0
    out = b"".join(batch_client.download_task_file(job, task_id, "stdout.txt")).decode()
    assert out.split() == [str(sys.version_info[0]), str(sys.version_info[1])]


# --- pools that prefetch images -----------------------------------------------------------------


def test_a_pool_prefetching_an_unknown_image_gets_unusable_nodes(
    batch_client: BatchClient,
) -> None:
    pool_id = unique("bad-image")
    wire = Wire()
    batch_client.create_pool(
        m.BatchPoolCreateOptions(
            id=pool_id,
            vm_size="standard_d2s_v3",
            target_dedicated_nodes=2,
            virtual_machine_configuration=vm([SLIM, NO_SUCH_IMAGE]),
        )
    )
    try:
        wait_for(
            "two unusable nodes",
            lambda: [n.state for n in batch_client.list_nodes(pool_id)] == ["unusable"] * 2,
        )
        nodes = list(batch_client.list_nodes(pool_id, raw_response_hook=wire))
        assert {n.state for n in nodes} == {m.BatchNodeState.UNUSABLE}
        for node in nodes:
            (error,) = node.errors
            assert error.code == "ContainerInvalidImage"
            details = {d.name: d.value for d in error.error_details}
            assert details["ContainerImage"] == NO_SUCH_IMAGE
        got = batch_client.get_node(pool_id, nodes[0].id, raw_response_hook=wire)
        assert got.errors[0].code == "ContainerInvalidImage"
        assert [
            problem
            for url, status, body in wire.bodies
            for problem in response_errors(
                "Nodes_GetNode" if "/nodes/" in url.split("?")[0] else "Nodes_ListNodes",
                status,
                body,
            )
        ] == []
        assert batch_client.get_pool(pool_id).allocation_state == m.AllocationState.STEADY
        with pytest.raises(HttpResponseError) as refused:
            batch_client.begin_reboot_node(
                pool_id, nodes[0].id, BatchNodeRebootOptions(node_reboot_kind="requeue")
            )
        assert refused.value.error is not None
        assert refused.value.error.code == "NodeStateUnusable"

        # No task is ever scheduled on an unusable node, and Batch does not recover it.
        job_id = unique("stuck")
        batch_client.create_job(
            m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id))
        )
        batch_client.create_task(job_id, m.BatchTaskCreateOptions(id="t", command_line="true"))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert batch_client.get_task(job_id, "t").state == m.BatchTaskState.ACTIVE
            assert {n.state for n in batch_client.list_nodes(pool_id)} == {"unusable"}
            time.sleep(0.1)
        batch_client.begin_delete_job(job_id, polling_interval=FAST)
    finally:
        batch_client.begin_delete_pool(pool_id, polling_interval=FAST)


def test_a_pool_prefetching_known_images_starts(batch_client: BatchClient) -> None:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    pool_id = unique("good-image")
    batch_client.create_pool(
        m.BatchPoolCreateOptions(
            id=pool_id,
            vm_size="standard_d2s_v3",
            target_dedicated_nodes=1,
            virtual_machine_configuration=vm([default_image(version), f"docker.io/library/{SLIM}"]),
        )
    )
    try:
        (node,) = wait_for(
            "an idle node",
            lambda: [n for n in batch_client.list_nodes(pool_id) if n.state == "idle"],
        )
        assert not node.errors
    finally:
        batch_client.begin_delete_pool(pool_id, polling_interval=FAST)

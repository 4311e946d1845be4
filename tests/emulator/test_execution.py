"""Tasks really run: scheduling onto slots, the node layout, AZ_BATCH_* variables, files.

Every test drives the emulator with the real azure-batch SDK (and azure-storage-blob for
Azurite), the way the backend will.
"""

from __future__ import annotations

import datetime as dt
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import ContainerSasPermissions, generate_container_sas

from joblib_azurebatch.emulator import BatchEmulator

POOL = "exec-pool"


def _vm() -> m.VirtualMachineConfiguration:
    return m.VirtualMachineConfiguration(
        image_reference=m.BatchVmImageReference(
            publisher="microsoft-dsvm", offer="ubuntu-hpc", sku="2204"
        ),
        node_agent_sku_id="batch.node.ubuntu 22.04",
    )


def wait_for(check: Callable[[], bool], *, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``check`` until it holds; fail with a clear message when time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def wait_completed(
    client: BatchClient, job_id: str, task_id: str, timeout: float = 20.0
) -> m.BatchTask:
    wait_for(
        lambda: client.get_task(job_id, task_id).state == m.BatchTaskState.COMPLETED,
        timeout=timeout,
    )
    return client.get_task(job_id, task_id)


@pytest.fixture(scope="module")
def pool(batch_client: BatchClient) -> str:
    batch_client.create_pool(
        m.BatchPoolCreateOptions(
            id=POOL,
            vm_size="standard_d2s_v3",
            target_dedicated_nodes=2,
            task_slots_per_node=2,
            virtual_machine_configuration=_vm(),
        )
    )
    wait_for(lambda: batch_client.get_pool(POOL).allocation_state == m.AllocationState.STEADY)
    return POOL


@pytest.fixture
def job(batch_client: BatchClient, pool: str) -> Iterator[str]:
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    batch_client.create_job(
        m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool))
    )
    yield job_id
    batch_client.begin_delete_job(job_id, polling_interval=0.05).result()


def test_task_runs_with_batch_environment_and_layout(batch_client: BatchClient, job: str) -> None:
    batch_client.create_task(
        job,
        m.BatchTaskCreateOptions(
            id="env",
            command_line=(
                "echo task=$AZ_BATCH_TASK_ID job=$AZ_BATCH_JOB_ID pool=$AZ_BATCH_POOL_ID "
                "node=$AZ_BATCH_NODE_ID dedicated=$AZ_BATCH_NODE_IS_DEDICATED "
                "custom=$MY_SETTING wd=$(pwd) wdvar=$AZ_BATCH_TASK_WORKING_DIR "
                "shared=$AZ_BATCH_NODE_SHARED_DIR; echo oops >&2; "
                'test -z "$PYTEST_CURRENT_TEST" && echo clean-env'
            ),
            environment_settings=[m.EnvironmentSetting(name="MY_SETTING", value="42")],
        ),
    )
    task = wait_completed(batch_client, job, "env")
    assert task.execution_info.exit_code == 0
    assert task.execution_info.result == m.BatchTaskExecutionResult.SUCCESS
    assert task.execution_info.start_time <= task.execution_info.end_time
    out = b"".join(batch_client.download_task_file(job, "env", "stdout.txt")).decode()
    fields = dict(part.split("=", 1) for part in out.split("\n")[0].split())
    assert fields["task"] == "env"
    assert fields["job"] == job
    assert fields["pool"] == POOL
    assert fields["node"] == task.node_info.node_id
    assert fields["dedicated"] == "true"
    assert fields["custom"] == "42"
    assert fields["wd"] == fields["wdvar"]
    assert fields["wd"].endswith(f"/workitems/{job}/job-1/env/wd")
    assert fields["shared"].endswith(f"/{task.node_info.node_id}/shared")
    assert "clean-env" in out
    err = b"".join(batch_client.download_task_file(job, "env", "stderr.txt"))
    assert err == b"oops\n"
    names = {f.name for f in batch_client.list_task_files(job, "env")}
    assert {"stdout.txt", "stderr.txt", "wd"} <= names


def test_slots_cap_concurrency(batch_client: BatchClient, job: str) -> None:
    # 2 nodes x 2 slots = 4 slots; 6 tasks of 1 slot and 0.6 s: at most 4 run at once.
    tasks = [m.BatchTaskCreateOptions(id=f"s{i}", command_line="sleep 0.6") for i in range(6)]
    result = batch_client.create_task_collection(job, m.BatchTaskGroup(task_values=tasks))
    assert all(r.status == m.BatchTaskAddStatus.SUCCESS for r in result.result_values)
    peak = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        counts = batch_client.get_job_task_counts(job)
        peak = max(peak, counts.task_counts.running)
        if counts.task_counts.completed == 6:
            break
        time.sleep(0.05)
    assert counts.task_counts.succeeded == 6
    assert peak == 4


def test_required_slots_respected(batch_client: BatchClient, job: str) -> None:
    tasks = [
        m.BatchTaskCreateOptions(id=f"big{i}", command_line="sleep 0.5", required_slots=2)
        for i in range(3)
    ]
    batch_client.create_task_collection(job, m.BatchTaskGroup(task_values=tasks))
    peak_slots = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        counts = batch_client.get_job_task_counts(job)
        peak_slots = max(peak_slots, counts.task_slot_counts.running)
        assert counts.task_counts.running <= 2
        if counts.task_counts.completed == 3:
            break
        time.sleep(0.05)
    assert counts.task_slot_counts.completed == 6
    assert peak_slots == 4


def _container_sas(local, blob_service, name: str, permission: str) -> str:
    sas = generate_container_sas(
        account_name=local.storage_account,
        container_name=name,
        account_key=local.storage_key,
        permission=ContainerSasPermissions.from_string(permission),
        expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
    )
    return f"{blob_service.url.rstrip('/')}/{name}?{sas}"


def test_resource_files_in_and_output_files_out(
    local, blob_service, batch_client: BatchClient, job: str
) -> None:
    name = f"io-{uuid.uuid4().hex[:8]}"
    container = blob_service.create_container(name)
    container.upload_blob("inputs/a.txt", b"alpha")
    container.upload_blob("inputs/b.txt", b"beta")
    container.upload_blob("single.txt", b"one file")
    read_url = _container_sas(local, blob_service, name, "rl")
    write_url = _container_sas(local, blob_service, name, "rwc")
    single_url = read_url.replace(f"/{name}?", f"/{name}/single.txt?")
    batch_client.create_task(
        job,
        m.BatchTaskCreateOptions(
            id="io",
            command_line=(
                "mkdir -p out && cat data/inputs/a.txt data/inputs/b.txt > out/joined.txt "
                "&& cp one.txt out/copy.txt && echo done"
            ),
            resource_files=[
                m.ResourceFile(
                    storage_container_url=read_url, blob_prefix="inputs/", file_path="data"
                ),
                m.ResourceFile(http_url=single_url, file_path="one.txt"),
            ],
            output_files=[
                m.OutputFile(
                    file_pattern="out/*.txt",
                    destination=m.OutputFileDestination(
                        container=m.OutputFileBlobContainerDestination(
                            container_url=write_url, path="results"
                        )
                    ),
                    upload_options=m.OutputFileUploadConfiguration(
                        upload_condition=m.OutputFileUploadCondition.TASK_SUCCESS
                    ),
                ),
                m.OutputFile(
                    file_pattern="../stdout.txt",
                    destination=m.OutputFileDestination(
                        container=m.OutputFileBlobContainerDestination(
                            container_url=write_url, path="logs/stdout.txt"
                        )
                    ),
                    upload_options=m.OutputFileUploadConfiguration(
                        upload_condition=m.OutputFileUploadCondition.TASK_COMPLETION
                    ),
                ),
                m.OutputFile(
                    file_pattern="out/*.txt",
                    destination=m.OutputFileDestination(
                        container=m.OutputFileBlobContainerDestination(
                            container_url=write_url, path="on-failure"
                        )
                    ),
                    upload_options=m.OutputFileUploadConfiguration(
                        upload_condition=m.OutputFileUploadCondition.TASK_FAILURE
                    ),
                ),
            ],
        ),
    )
    task = wait_completed(batch_client, job, "io")
    assert task.execution_info.exit_code == 0
    assert task.execution_info.failure_info is None
    names = sorted(b.name for b in container.list_blobs())
    assert "results/joined.txt" in names
    assert "results/copy.txt" in names
    assert "logs/stdout.txt" in names
    assert not [n for n in names if n.startswith("on-failure/")]
    assert container.download_blob("results/joined.txt").readall() == b"alphabeta"
    assert container.download_blob("results/copy.txt").readall() == b"one file"
    assert container.download_blob("logs/stdout.txt").readall() == b"done\n"


def test_output_upload_failure_fails_the_task(
    local, blob_service, batch_client: BatchClient, job: str
) -> None:
    name = f"ro-{uuid.uuid4().hex[:8]}"
    blob_service.create_container(name)
    read_only = _container_sas(local, blob_service, name, "rl")
    batch_client.create_task(
        job,
        m.BatchTaskCreateOptions(
            id="upload-refused",
            command_line="echo result > result.txt",
            output_files=[
                m.OutputFile(
                    file_pattern="result.txt",
                    destination=m.OutputFileDestination(
                        container=m.OutputFileBlobContainerDestination(container_url=read_only)
                    ),
                    upload_options=m.OutputFileUploadConfiguration(
                        upload_condition=m.OutputFileUploadCondition.TASK_COMPLETION
                    ),
                )
            ],
        ),
    )
    info = wait_completed(batch_client, job, "upload-refused").execution_info
    assert info.exit_code == 0
    assert info.result == m.BatchTaskExecutionResult.FAILURE
    assert info.failure_info.code == "FileUploadAuthenticationError"
    assert info.failure_info.category == m.BatchErrorSourceCategory.USER_ERROR


def test_missing_resource_file_fails_before_the_command(
    local, blob_service, batch_client: BatchClient, job: str
) -> None:
    name = f"missing-{uuid.uuid4().hex[:8]}"
    blob_service.create_container(name)
    url = _container_sas(local, blob_service, name, "r").replace(f"/{name}?", f"/{name}/nope?")
    batch_client.create_task(
        job,
        m.BatchTaskCreateOptions(
            id="no-input",
            command_line="touch ran.txt",
            resource_files=[m.ResourceFile(http_url=url, file_path="in.bin")],
        ),
    )
    info = wait_completed(batch_client, job, "no-input").execution_info
    assert info.result == m.BatchTaskExecutionResult.FAILURE
    assert info.failure_info.code == "BlobNotFound"
    assert info.exit_code is None  # the command never ran
    names = {f.name for f in batch_client.list_task_files(job, "no-input", recursive=True)}
    assert "wd/ran.txt" not in names


def test_container_image_maps_to_a_local_interpreter(tmp_path) -> None:
    # A stand-in "image": a bin dir whose python announces itself, then runs the real one.
    bindir = tmp_path / "worker-venv" / "bin"
    bindir.mkdir(parents=True)
    python = bindir / "python"
    python.write_text(f'#!/bin/sh\necho "image-python $0"\nexec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    with BatchEmulator(images={"myregistry.azurecr.io/worker:1": str(python)}) as emu:
        client = BatchClient(emu.url, AzureNamedKeyCredential(emu.account_name, emu.key))
        client.create_pool(
            m.BatchPoolCreateOptions(
                id="c",
                vm_size="standard_d2s_v3",
                target_dedicated_nodes=1,
                virtual_machine_configuration=m.VirtualMachineConfiguration(
                    image_reference=m.BatchVmImageReference(
                        publisher="microsoft-dsvm", offer="ubuntu-hpc", sku="2204"
                    ),
                    node_agent_sku_id="batch.node.ubuntu 22.04",
                    container_configuration=m.BatchContainerConfiguration(
                        type=m.ContainerType.DOCKER_COMPATIBLE,
                        container_image_names=["myregistry.azurecr.io/worker:1"],
                    ),
                ),
            )
        )
        pool = client.get_pool("c")
        assert pool.virtual_machine_configuration.container_configuration.container_image_names == [
            "myregistry.azurecr.io/worker:1"
        ]
        client.create_job(m.BatchJobCreateOptions(id="j", pool_info=m.BatchPoolInfo(pool_id="c")))
        client.create_task(
            "j",
            m.BatchTaskCreateOptions(
                id="in-image",
                command_line="python -c 'import sys; print(sys.version_info[0])'",
                container_settings=m.BatchTaskContainerSettings(
                    image_name="myregistry.azurecr.io/worker:1"
                ),
            ),
        )
        wait_for(lambda: client.get_task("j", "in-image").state == m.BatchTaskState.COMPLETED)
        out = b"".join(client.download_task_file("j", "in-image", "stdout.txt")).decode()
        assert out.splitlines() == [f"image-python {python}", "3"]


def test_start_task_runs_once_per_node_before_tasks() -> None:
    with BatchEmulator() as emu:
        client = BatchClient(emu.url, AzureNamedKeyCredential(emu.account_name, emu.key))
        client.create_pool(
            m.BatchPoolCreateOptions(
                id="st",
                vm_size="standard_d2s_v3",
                target_dedicated_nodes=2,
                start_task=m.BatchStartTask(
                    command_line="sleep 0.3; echo prepared > $AZ_BATCH_NODE_SHARED_DIR/ready",
                    wait_for_success=True,
                ),
            )
        )
        assert {n.state for n in client.list_nodes("st")} == {
            m.BatchNodeState.WAITING_FOR_START_TASK
        }
        client.create_job(m.BatchJobCreateOptions(id="j", pool_info=m.BatchPoolInfo(pool_id="st")))
        client.create_task(
            "j",
            m.BatchTaskCreateOptions(id="t", command_line="cat $AZ_BATCH_NODE_SHARED_DIR/ready"),
        )
        wait_for(lambda: client.get_task("j", "t").state == m.BatchTaskState.COMPLETED)
        assert b"".join(client.download_task_file("j", "t", "stdout.txt")) == b"prepared\n"
        nodes = list(client.list_nodes("st"))
        assert all(n.start_task_info.exit_code == 0 for n in nodes)
        assert all(n.start_task_info.state == m.BatchStartTaskState.COMPLETED for n in nodes)
        assert client.get_pool("st").allocation_state == m.AllocationState.STEADY


def test_dependent_task_waits_for_its_dependencies(batch_client: BatchClient, pool: str) -> None:
    job_id = f"deps-{uuid.uuid4().hex[:8]}"
    batch_client.create_job(
        m.BatchJobCreateOptions(
            id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool), uses_task_dependencies=True
        )
    )
    tasks = [
        m.BatchTaskCreateOptions(id="1", command_line="sleep 0.4"),
        m.BatchTaskCreateOptions(id="2", command_line="sleep 0.6"),
        m.BatchTaskCreateOptions(
            id="after",
            command_line="true",
            depends_on=m.BatchTaskDependencies(task_id_ranges=[m.BatchTaskIdRange(start=1, end=2)]),
        ),
    ]
    batch_client.create_task_collection(job_id, m.BatchTaskGroup(task_values=tasks))
    time.sleep(0.2)
    assert batch_client.get_task(job_id, "after").state == m.BatchTaskState.ACTIVE
    after = wait_completed(batch_client, job_id, "after")
    assert after.execution_info.exit_code == 0
    for dep in ("1", "2"):
        done = wait_completed(batch_client, job_id, dep)
        assert after.execution_info.start_time >= done.execution_info.end_time
    batch_client.begin_delete_job(job_id, polling_interval=0.05).result()

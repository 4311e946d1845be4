"""Tasks really run: scheduling onto slots, the node layout, AZ_BATCH_* variables, files.

Every test drives the emulator with the real azure-batch SDK (and azure-storage-blob for
Azurite), the way the backend will.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from azure.batch import BatchClient
from azure.batch import models as m

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

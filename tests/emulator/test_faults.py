"""Failures, as Batch has them: retries, wall-clock kills, termination, preemption, throttling,
lost responses and refused signatures, each observed through the real azure-batch SDK.
"""

from __future__ import annotations

import base64
import datetime as dt
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.batch.models._models import BatchJobTerminateOptions  # not re-exported by 15.1
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError

from joblib_azurebatch.emulator import BatchEmulator, LocalBatch

FAST = 0.05


def wait_for(check: Callable[[], bool], *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def completed(client: BatchClient, job_id: str, task_id: str, timeout: float = 20.0) -> m.BatchTask:
    wait_for(
        lambda: client.get_task(job_id, task_id).state == m.BatchTaskState.COMPLETED,
        timeout=timeout,
    )
    return client.get_task(job_id, task_id)


@pytest.fixture(scope="module")
def pool(batch_client: BatchClient) -> str:
    pool_id = "faults-pool"
    batch_client.create_pool(
        m.BatchPoolCreateOptions(
            id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=1, task_slots_per_node=4
        )
    )
    wait_for(lambda: batch_client.get_pool(pool_id).allocation_state == m.AllocationState.STEADY)
    return pool_id


@pytest.fixture
def job(batch_client: BatchClient, pool: str) -> Iterator[str]:
    job_id = f"faults-{uuid.uuid4().hex[:8]}"
    batch_client.create_job(
        m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool))
    )
    yield job_id
    batch_client.begin_delete_job(job_id, polling_interval=FAST).result()


def test_failing_task_is_retried_until_retries_run_out(batch_client: BatchClient, job: str) -> None:
    # Each attempt appends a line to a file in the node's shared dir, so the test can count runs.
    batch_client.create_task(
        job,
        m.BatchTaskCreateOptions(
            id="flaky",
            command_line=f"echo run >> $AZ_BATCH_NODE_SHARED_DIR/{job}.runs; exit 3",
            constraints=m.BatchTaskConstraints(max_task_retry_count=2),
        ),
    )
    task = completed(batch_client, job, "flaky")
    info = task.execution_info
    assert info.exit_code == 3
    assert info.retry_count == 2
    assert info.result == m.BatchTaskExecutionResult.FAILURE
    assert info.failure_info.category == m.BatchErrorSourceCategory.USER_ERROR
    assert info.last_retry_time is not None
    node = task.node_info.node_id
    runs = b"".join(
        batch_client.download_node_file("faults-pool", node, f"shared/{job}.runs")
    ).decode()
    assert runs.count("run") == 3
    counts = batch_client.get_job_task_counts(job).task_counts
    assert (counts.failed, counts.succeeded) == (1, 0)


def test_retry_that_succeeds_ends_in_success(batch_client: BatchClient, job: str) -> None:
    marker = f"$AZ_BATCH_NODE_SHARED_DIR/{job}.second"
    batch_client.create_task(
        job,
        m.BatchTaskCreateOptions(
            id="second-time",
            command_line=f"if [ -e {marker} ]; then exit 0; else touch {marker}; exit 1; fi",
            constraints=m.BatchTaskConstraints(max_task_retry_count=3),
        ),
    )
    info = completed(batch_client, job, "second-time").execution_info
    assert (info.exit_code, info.retry_count) == (0, 1)
    assert info.result == m.BatchTaskExecutionResult.SUCCESS
    assert info.failure_info is None


def test_wall_clock_limit_kills_the_task(batch_client: BatchClient, job: str) -> None:
    started = time.monotonic()
    batch_client.create_task(
        job,
        m.BatchTaskCreateOptions(
            id="slow",
            command_line="sleep 30",
            constraints=m.BatchTaskConstraints(
                max_wall_clock_time=dt.timedelta(seconds=0.5), max_task_retry_count=3
            ),
        ),
    )
    info = completed(batch_client, job, "slow", timeout=10).execution_info
    assert time.monotonic() - started < 8
    assert info.result == m.BatchTaskExecutionResult.FAILURE
    assert info.failure_info.code == "MaxWallClockTimeExpiry"
    assert info.retry_count == 0
    assert info.exit_code != 0


def test_terminate_job_kills_running_and_leaves_active_unrun(
    batch_client: BatchClient, pool: str
) -> None:
    job_id = f"term-{uuid.uuid4().hex[:8]}"
    batch_client.create_job(
        m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool))
    )
    # Four slots: four tasks run, the fifth waits.
    tasks = [
        m.BatchTaskCreateOptions(id=f"t{i}", command_line=f"touch ran-{i}; sleep 30")
        for i in range(5)
    ]
    batch_client.create_task_collection(job_id, m.BatchTaskGroup(task_values=tasks))
    wait_for(lambda: batch_client.get_job_task_counts(job_id).task_counts.running == 4)
    batch_client.begin_terminate_job(
        job_id,
        options=BatchJobTerminateOptions(termination_reason="enough"),
        polling_interval=FAST,
    ).result()
    job = batch_client.get_job(job_id)
    assert job.state == m.BatchJobState.COMPLETED
    assert job.execution_info.termination_reason == "enough"
    states = {t.id: t for t in batch_client.list_tasks(job_id)}
    ran = [t for t in states.values() if t.state == m.BatchTaskState.COMPLETED]
    waiting = [t for t in states.values() if t.state == m.BatchTaskState.ACTIVE]
    assert len(ran) == 4
    assert len(waiting) == 1
    assert all(t.execution_info.failure_info.code == "TaskEnded" for t in ran)
    time.sleep(0.3)  # the active task must never start
    assert batch_client.get_task(job_id, waiting[0].id).state == m.BatchTaskState.ACTIVE
    assert batch_client.get_job_task_counts(job_id).task_counts.running == 0
    batch_client.begin_delete_job(job_id, polling_interval=FAST).result()


def test_throttling_is_retried_by_the_sdk_after_retry_after(
    local: LocalBatch, batch_client: BatchClient, pool: str
) -> None:
    emu = local.emulator
    before = len(emu.requests("Pools_GetPool"))
    emu.throttle("Pools_GetPool", times=2, status=429, retry_after=0.3)
    started = time.monotonic()
    assert batch_client.get_pool(pool).id == pool
    elapsed = time.monotonic() - started
    records = emu.requests("Pools_GetPool")[before:]
    assert [r.status for r in records] == [429, 429, 200]
    assert elapsed >= 0.55  # two Retry-After waits of 0.3 s, honoured
    emu.throttle("Jobs_ListJobs", times=1, status=503, retry_after=0.2)
    list(batch_client.list_jobs())
    assert [r.status for r in emu.requests("Jobs_ListJobs")][-2:] == [503, 200]


def test_lost_task_collection_response_is_seen_as_task_exists(
    local: LocalBatch, batch_client: BatchClient, job: str
) -> None:
    emu = local.emulator
    emu.fail_after_commit("Tasks_CreateTaskCollection", times=1, status=500)
    tasks = [m.BatchTaskCreateOptions(id=f"c{i}", command_line="true") for i in range(3)]
    result = batch_client.create_task_collection(job, m.BatchTaskGroup(task_values=tasks))
    # The SDK retried the 500; the retry met the tasks the first call had created.
    statuses = emu.requests("Tasks_CreateTaskCollection")[-2:]
    assert [r.status for r in statuses] == [500, 200]
    assert {r.task_id for r in result.result_values} == {"c0", "c1", "c2"}
    assert all(r.status == m.BatchTaskAddStatus.CLIENT_ERROR for r in result.result_values)
    assert all(r.error.code == "TaskExists" for r in result.result_values)
    assert len(list(batch_client.list_tasks(job))) == 3


def test_wrong_key_is_refused_and_changes_nothing(local: LocalBatch) -> None:
    wrong = BatchClient(
        local.batch_url,
        AzureNamedKeyCredential(local.batch_account, base64.b64encode(b"x" * 64).decode()),
    )
    with pytest.raises(HttpResponseError) as info:
        wrong.create_pool(m.BatchPoolCreateOptions(id="never", vm_size="standard_d2s_v3"))
    assert info.value.status_code == 403
    assert info.value.error.code == "AuthenticationFailed"
    right = BatchClient(
        local.batch_url, AzureNamedKeyCredential(local.batch_account, local.batch_key)
    )
    assert "never" not in {p.id for p in right.list_pools()}


def test_missing_and_stale_signatures_are_refused(local: LocalBatch) -> None:
    url = f"{local.batch_url}/pools?api-version=2025-06-01"
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(url)
    assert unsigned.value.code == 403
    stale = BatchClient(
        local.batch_url, AzureNamedKeyCredential(local.batch_account, local.batch_key)
    )
    with pytest.raises(HttpResponseError) as old:
        list(stale.list_pools(ocp_date=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)))
    assert old.value.status_code == 403
    assert old.value.error.code == "AuthenticationFailed"


def test_preempted_spot_node_requeues_its_tasks_without_charging_retries() -> None:
    with BatchEmulator() as emu:
        client = BatchClient(emu.url, AzureNamedKeyCredential(emu.account_name, emu.key))
        client.create_pool(
            m.BatchPoolCreateOptions(
                id="spot", vm_size="standard_d2s_v3", target_low_priority_nodes=1,
                task_slots_per_node=2,
            )
        )  # fmt: skip
        client.create_job(
            m.BatchJobCreateOptions(id="j", pool_info=m.BatchPoolInfo(pool_id="spot"))
        )
        # First run: note the attempt in the shared dir and sleep long; the rerun finishes.
        cmd = (
            "if [ -e $AZ_BATCH_NODE_SHARED_DIR/$AZ_BATCH_TASK_ID ]; then echo second; exit 0; fi; "
            "touch $AZ_BATCH_NODE_SHARED_DIR/$AZ_BATCH_TASK_ID; sleep 30"
        )
        client.create_task_collection(
            "j",
            m.BatchTaskGroup(
                task_values=[
                    m.BatchTaskCreateOptions(id=f"p{i}", command_line=cmd) for i in range(2)
                ]
            ),
        )
        wait_for(lambda: client.get_job_task_counts("j").task_counts.running == 2)
        (node_id,) = [n.id for n in client.list_nodes("spot")]

        def both_started() -> bool:
            files = {f.name for f in client.list_node_files("spot", node_id, recursive=True)}
            return {"shared/p0", "shared/p1"} <= files

        wait_for(both_started)
        assert emu.preempt_node("spot", recover_after=0.3) == node_id
        node = client.get_node("spot", node_id)
        assert node.state == m.BatchNodeState.PREEMPTED
        assert node.is_dedicated is False
        assert client.get_job_task_counts("j").task_counts.active == 2
        for i in range(2):
            task = completed(client, "j", f"p{i}")
            assert task.execution_info.exit_code == 0
            assert task.execution_info.retry_count == 0
            assert task.execution_info.requeue_count == 1
            assert task.execution_info.last_requeue_time is not None
            assert b"".join(client.download_task_file("j", f"p{i}", "stdout.txt")) == b"second\n"
        assert client.get_node("spot", node_id).state == m.BatchNodeState.IDLE


def test_killed_node_requeues_tasks_onto_another_node() -> None:
    with BatchEmulator() as emu:
        client = BatchClient(emu.url, AzureNamedKeyCredential(emu.account_name, emu.key))
        client.create_pool(
            m.BatchPoolCreateOptions(id="two", vm_size="standard_d2s_v3", target_dedicated_nodes=2)
        )
        client.create_job(m.BatchJobCreateOptions(id="j", pool_info=m.BatchPoolInfo(pool_id="two")))
        client.create_task("j", m.BatchTaskCreateOptions(id="t", command_line="sleep 0.5"))
        wait_for(lambda: client.get_task("j", "t").state == m.BatchTaskState.RUNNING)
        first = client.get_task("j", "t").node_info.node_id
        killed = emu.kill_node("two", first)
        assert client.get_node("two", killed).state == m.BatchNodeState.UNUSABLE
        task = completed(client, "j", "t")
        assert task.node_info.node_id != killed
        assert task.execution_info.exit_code == 0


def test_a_share_of_requests_is_throttled_until_its_answers_are_used_up(
    local: LocalBatch, batch_client: BatchClient, pool: str
) -> None:
    emu = local.emulator
    before = len(emu.requests("Pools_GetPool"))
    emu.throttle_share(0.5, "Pools_GetPool", times=3, status=503, retry_after=0.05, seed=1)
    try:
        for _ in range(12):
            assert batch_client.get_pool(pool).id == pool
    finally:
        emu.faults.clear()
    statuses = [r.status for r in emu.requests("Pools_GetPool")[before:]]
    # Some requests, not the next few in a row, and never more than the three asked for.
    assert statuses.count(503) == 3
    assert statuses.count(200) == 12
    first, last = statuses.index(503), len(statuses) - 1 - statuses[::-1].index(503)
    assert 200 in statuses[first:last]

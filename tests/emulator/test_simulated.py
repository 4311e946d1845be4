"""Simulated execution: tasks are timers on slots, joblib calls run in the emulator's process.

The real azure-batch SDK drives an emulator started with ``execution="simulated"``: tasks
must keep every rule of the process mode (slots, node and task states, counts, wall-clock
limits, terminate, requeue) while no process starts; listings filtered by time and the
scheduler must cost what they return, not what the job holds; and a real ``Parallel`` run
must get back the results the in-process worker wrote.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
import uuid
from collections.abc import Iterator

import cloudpickle
import joblib
import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.batch.models._models import BatchJobTerminateOptions  # not re-exported by 15.1
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ResourceNotFoundError

from joblib_azurebatch.emulator import BatchEmulator, LocalBatch
from joblib_azurebatch.emulator.command import build_parser
from joblib_azurebatch.payload import PAYLOAD_URL_ENV
from joblib_azurebatch.worker import EXIT_BAD_ENVIRONMENT
from tests.helpers.waiting import vm, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DURATION = 0.4
POOL = "sim-pool"


@pytest.fixture(scope="module")
def emulator() -> Iterator[BatchEmulator]:
    with BatchEmulator(execution="simulated", task_duration=DURATION) as running:
        yield running


@pytest.fixture(scope="module")
def client(emulator: BatchEmulator) -> BatchClient:
    return BatchClient(emulator.url, AzureNamedKeyCredential(emulator.account_name, emulator.key))


def _pool(client: BatchClient, pool_id: str, *, nodes: int, slots: int) -> str:
    client.create_pool(
        m.BatchPoolCreateOptions(
            id=pool_id,
            vm_size="standard_d2s_v3",
            target_dedicated_nodes=nodes,
            task_slots_per_node=slots,
            virtual_machine_configuration=vm(),
        )
    )
    wait_for(
        "the pool to be steady",
        lambda: client.get_pool(pool_id).allocation_state == m.AllocationState.STEADY,
    )
    return pool_id


@pytest.fixture(scope="module")
def pool(client: BatchClient) -> str:
    return _pool(client, POOL, nodes=2, slots=2)


def _job(client: BatchClient, pool_id: str) -> str:
    job_id = f"sim-{uuid.uuid4().hex[:8]}"
    client.create_job(
        m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id))
    )
    return job_id


def _add(client: BatchClient, job_id: str, ids: list[str], **options: object) -> None:
    for start in range(0, len(ids), 100):
        group = [
            m.BatchTaskCreateOptions(id=i, command_line="exit 3", **options)
            for i in ids[start : start + 100]
        ]
        result = client.create_task_collection(job_id, m.BatchTaskGroup(task_values=group))
        assert all(r.status == m.BatchTaskAddStatus.SUCCESS for r in result.result_values)


def _counts(client: BatchClient, job_id: str) -> m.BatchTaskCounts:
    return client.get_job_task_counts(job_id).task_counts


def test_tasks_hold_their_slots_for_the_duration_and_never_exceed_them(
    emulator: BatchEmulator, client: BatchClient, pool: str
) -> None:
    job_id = _job(client, pool)
    ids = [f"t{i}" for i in range(10)]
    started = time.monotonic()
    _add(client, job_id, ids)
    peak_tasks = peak_slots = 0
    while True:
        counts = _counts(client, job_id)
        assert counts.active + counts.running + counts.completed == 10
        running = list(client.list_tasks(job_id, filter="state eq 'running'", select=["id"]))
        nodes = list(client.list_nodes(pool))
        peak_tasks = max(peak_tasks, counts.running, len(running))
        peak_slots = max(peak_slots, *(n.running_task_slots_count for n in nodes))
        assert emulator.process_ids() == []
        if counts.completed == 10:
            break
        assert time.monotonic() - started < 30, "the tasks did not complete"
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert (peak_tasks, peak_slots) == (4, 2)
    # 10 tasks on 4 slots take three rounds of the duration.
    assert elapsed >= 3 * DURATION
    tasks = list(client.list_tasks(job_id))
    intervals = []
    for task in tasks:
        info = task.execution_info
        assert task.state == m.BatchTaskState.COMPLETED
        assert info.exit_code == 0
        assert info.result == m.BatchTaskExecutionResult.SUCCESS
        assert (info.end_time - info.start_time).total_seconds() >= DURATION - 0.02
        intervals.append((info.start_time, info.end_time))
    # At no moment were more than 4 tasks between their start and their end.
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    live = most = 0
    for _, step in edges:
        live += step
        most = max(most, live)
    assert most <= 4
    # Nothing ran: the command line ("exit 3") was never executed, no file was written.
    with pytest.raises(ResourceNotFoundError):
        b"".join(client.download_task_file(job_id, "t0", "stdout.txt"))
    counts = _counts(client, job_id)
    assert (counts.succeeded, counts.failed) == (10, 0)
    listed = {
        state: len(list(client.list_tasks(job_id, filter=f"state eq '{state}'", select=["id"])))
        for state in ("active", "running", "completed")
    }
    assert listed == {"active": 0, "running": 0, "completed": 10}


def test_wall_clock_terminate_and_requeue_behave_as_with_processes(
    emulator: BatchEmulator, client: BatchClient, pool: str
) -> None:
    job_id = _job(client, pool)
    short = m.BatchTaskConstraints(max_wall_clock_time=dt.timedelta(seconds=0.1))
    _add(client, job_id, ["limited"], constraints=short)
    limited = wait_for(
        "the wall-clock limit",
        lambda: (t := client.get_task(job_id, "limited")).state == m.BatchTaskState.COMPLETED and t,
    )
    assert limited.execution_info.failure_info.code == "MaxWallClockTimeExpiry"
    assert limited.execution_info.exit_code == 137
    took = limited.execution_info.end_time - limited.execution_info.start_time
    assert took.total_seconds() < DURATION

    emulator.executor.task_duration = 30.0
    try:
        _add(client, job_id, ["ended", "moved"])
        wait_for("two running tasks", lambda: _counts(client, job_id).running == 2)
        client.terminate_task(job_id, "ended")
        ended = client.get_task(job_id, "ended")
        assert ended.state == m.BatchTaskState.COMPLETED
        assert ended.execution_info.failure_info.code == "TaskEnded"
        node = client.get_task(job_id, "moved").node_info.node_id
        emulator.executor.task_duration = DURATION
        emulator.kill_node(pool, node, recover_after=0.2)
        moved = wait_for(
            "the requeued task to complete",
            lambda: (
                (t := client.get_task(job_id, "moved")).state == m.BatchTaskState.COMPLETED and t
            ),
        )
    finally:
        emulator.executor.task_duration = DURATION
    assert moved.execution_info.requeue_count == 1
    assert moved.execution_info.retry_count == 0
    assert moved.execution_info.exit_code == 0
    counts = _counts(client, job_id)
    assert (counts.completed, counts.succeeded, counts.failed) == (3, 1, 2)


def test_the_scheduler_leaves_the_queue_alone_while_the_pool_is_full(
    emulator: BatchEmulator, client: BatchClient
) -> None:
    small = _pool(client, "sim-full", nodes=1, slots=2)
    job_id = _job(client, small)
    emulator.executor.task_duration = 60.0
    try:
        _add(client, job_id, [f"q{i}" for i in range(300)])
        wait_for("two running tasks", lambda: _counts(client, job_id).running == 2)
        index = emulator.account.jobs[job_id].index
        popped = index.popped
        for _ in range(20):  # wake the executor: each wake is a scheduling pass
            with emulator.account.lock:
                emulator.account.notify()
            time.sleep(0.02)
        assert index.popped == popped
        counts = _counts(client, job_id)
        assert (counts.active, counts.running) == (298, 2)
    finally:
        emulator.executor.task_duration = DURATION
        client.begin_terminate_job(
            job_id,
            options=BatchJobTerminateOptions(termination_reason="done"),
            polling_interval=0.05,
        ).result()


def test_a_listing_filtered_by_time_costs_what_it_returns(
    emulator: BatchEmulator, client: BatchClient
) -> None:
    wide = _pool(client, "sim-wide", nodes=1, slots=250)
    job_id = _job(client, wide)
    emulator.executor.task_duration = 0.0
    try:
        _add(client, job_id, [f"a{i}" for i in range(1500)])
        wait_for("1,500 completed tasks", lambda: _counts(client, job_id).completed == 1500)
        since = dt.datetime.now(dt.timezone.utc)
        time.sleep(0.01)
        _add(client, job_id, ["late0", "late1", "late2"])
        wait_for("1,503 completed tasks", lambda: _counts(client, job_id).completed == 1503)
    finally:
        emulator.executor.task_duration = DURATION
    index = emulator.account.jobs[job_id].index
    stamp = since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    query = f"state eq 'completed' and stateTransitionTime ge datetime'{stamp}'"
    before = index.examined
    late = [t.id for t in client.list_tasks(job_id, filter=query, select=["id"])]
    assert late == ["late0", "late1", "late2"]
    assert index.examined - before <= 4
    # Without a time bound the listing reads every completed task, 100 a page, each once
    # and in submission order.
    before = index.examined
    every = [
        t.id
        for t in client.list_tasks(
            job_id, filter="state eq 'completed'", select=["id"], max_results=100
        )
    ]
    assert every == [f"a{i}" for i in range(1500)] + ["late0", "late1", "late2"]
    assert index.examined - before <= 1503 + 16


def test_a_worker_task_runs_in_process_and_leaves_its_stderr(
    emulator: BatchEmulator, client: BatchClient, pool: str
) -> None:
    job_id = _job(client, pool)
    # The payload URL makes it a joblib task; the rest of the worker's environment is missing.
    setting = m.EnvironmentSetting(name=PAYLOAD_URL_ENV, value="http://127.0.0.1:9/nowhere")
    _add(client, job_id, ["w"], environment_settings=[setting])
    task = wait_for(
        "the worker task",
        lambda: (t := client.get_task(job_id, "w")).state == m.BatchTaskState.COMPLETED and t,
    )
    assert task.execution_info.exit_code == EXIT_BAD_ENVIRONMENT
    assert task.execution_info.failure_info.code == "FailureExitCode"
    err = b"".join(client.download_task_file(job_id, "w", "stderr.txt")).decode()
    assert "lacks" in err
    assert "JOBLIB_AZUREBATCH_RESULT_URL" in err
    emulator.executor.simulated_worker = "none"
    try:
        _add(client, job_id, ["quiet"], environment_settings=[setting])
        quiet = wait_for(
            "the task that calls nothing",
            lambda: (
                (t := client.get_task(job_id, "quiet")).state == m.BatchTaskState.COMPLETED and t
            ),
        )
    finally:
        emulator.executor.simulated_worker = "inline"
    assert quiet.execution_info.exit_code == 0


def test_the_command_takes_the_simulation_options() -> None:
    args = build_parser().parse_args(
        [
            "--execution", "simulated",
            "--task-duration", "0.5",
            "--simulated-worker", "main",
            "--worker-threads", "3",
        ]
    )  # fmt: skip
    assert (args.execution, args.task_duration, args.simulated_worker, args.worker_threads) == (
        "simulated",
        0.5,
        "main",
        3,
    )
    defaults = build_parser().parse_args([])
    assert (defaults.execution, defaults.simulated_worker) == ("processes", "inline")
    with pytest.raises(ValueError, match="execution"):
        BatchEmulator(execution="threads")
    with pytest.raises(ValueError, match="simulated_worker"):
        BatchEmulator(execution="simulated", simulated_worker="fork")


# -------------------------------------------------------------------- the real client


def double(x: int) -> int:
    if x == 7:
        raise ValueError("seven is refused")
    return 2 * x


@pytest.fixture(scope="module")
def local() -> Iterator[LocalBatch]:
    with LocalBatch(
        nodes=2, slots_per_node=3, execution="simulated", task_duration=0.05
    ) as running:
        yield running


@pytest.mark.parametrize("worker", ["inline", "main"])
def test_parallel_gets_the_results_the_in_process_worker_wrote(
    local: LocalBatch, worker: str
) -> None:
    local.emulator.executor.simulated_worker = worker
    cfg = local.config(pool_id="sim-parallel", keep_pool=True, keep_job=True, job_id=worker)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = joblib.Parallel(n_jobs=-1, batch_size=1)(
            joblib.delayed(double)(i) for i in range(12) if i != 7
        )
        with pytest.raises(ValueError, match="seven is refused"):
            joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(double)(i) for i in (6, 7))
    assert out == [2 * i for i in range(12) if i != 7]
    assert local.emulator.process_ids() == []
    with local.emulator.account.lock:
        jobs = [j for j in local.emulator.account.jobs.values() if j.id.startswith(worker)]
        sizes = sorted(len(j.tasks) for j in jobs)
        first = next(j for j in jobs if len(j.tasks) == 11)
        outcomes = {(t.state, t.exit_code, t.failure is None) for t in first.tasks.values()}
    # One Batch task per call: 11, then the two of the run that raised; the user's exception
    # is a result (the worker exited 0), not a task failure.
    assert sizes == [2, 11]
    assert outcomes == {("completed", 0, True)}

"""joblib end to end: Parallel -> AzureBatchBackend -> the emulator -> the worker -> back.

Everything runs on the session's local account (Azurite + the Batch emulator, 2 nodes x 2
slots) through the real SDKs; each test uses its own pool and job ids.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)

# The worker runs in another process that cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x):
    return x * x


def slow_square(x, delay=0.3):
    time.sleep(delay)
    return x * x


def logged_square(x, folder, delay):
    with open(os.path.join(folder, str(x)), "a") as log:
        log.write(f"ran on {os.environ.get('AZ_BATCH_NODE_ID', '')}\n")
    time.sleep(delay)
    return x * x


def where_am_i(x):
    return x, os.environ.get("AZ_BATCH_TASK_ID", ""), os.environ.get("AZ_BATCH_JOB_ID", "")


def inner_sum(n):
    # Runs on a node: the nested backend is a local one, not Azure Batch.
    return sum(Parallel(n_jobs=2)(delayed(square)(i) for i in range(n)))


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


@pytest.fixture
def cfg(local, request):
    name = unique(request.node.name.replace("_", "-")[5:25].strip("-"))
    return local.config(pool_id=name, job_id=name)


def our_jobs(batch_client, prefix: str) -> list:
    return [j for j in batch_client.list_jobs() if j.id.startswith(prefix + "-")]


def test_list_input(cfg):
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1)([delayed(square)(x) for x in range(30)])
    assert out == [x * x for x in range(30)]


def test_generator_input_runs_in_batch_tasks(cfg):
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1, batch_size=3)(delayed(where_am_i)(x) for x in iter(range(12)))
    assert [x for x, _, _ in out] == list(range(12))
    task_ids = {t for _, t, _ in out}
    job_ids = {j for _, _, j in out}
    # Really remote: every call ran inside a Batch task of one job made for this call.
    assert "" not in task_ids
    assert len(task_ids) <= 12
    assert len(job_ids) == 1
    assert job_ids.pop().startswith(cfg.job_id + "-")


def test_parallel_backend_keyword_passes_config_to_configure(cfg):
    out = Parallel(n_jobs=2, backend="azurebatch", config=cfg)(delayed(square)(x) for x in [3, 4])
    assert out == [9, 16]


def test_return_as_generator_yields_in_order(cfg):
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        gen = Parallel(n_jobs=-1, return_as="generator")(
            delayed(slow_square)(x, 0.05 * (6 - x)) for x in range(6)
        )
        assert not isinstance(gen, list)
        assert list(gen) == [x * x for x in range(6)]


def test_return_as_generator_unordered_yields_everything_once(cfg):
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        gen = Parallel(n_jobs=-1, return_as="generator_unordered")(
            delayed(slow_square)(x, 0.4 if x == 0 else 0.0) for x in range(8)
        )
        out = list(gen)
    assert sorted(out) == [x * x for x in range(8)]
    assert len(out) == 8


def test_n_jobs_one_creates_nothing(local, cfg):
    # The account is shared by the session: an earlier test's pool may still be deleting in
    # the background, so look for requests about this config's pool and job, and for any
    # request that creates something, rather than comparing every counter.
    seen = len(local.emulator.requests())
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=1)(delayed(where_am_i)(x) for x in range(3))
    assert [x for x, _, _ in out] == [0, 1, 2]
    assert {t for _, t, _ in out} == {os.environ.get("AZ_BATCH_TASK_ID", "")}
    during = local.emulator.requests()[seen:]
    assert [r for r in during if cfg.pool_id in r.path or cfg.job_id in r.path] == []
    assert [r for r in during if r.method in ("POST", "PUT", "PATCH")] == []


def test_sequential_calls_under_one_config_get_one_job_each(cfg, batch_client):
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        first = Parallel(n_jobs=-1)(delayed(where_am_i)(x) for x in range(4))
        second = Parallel(n_jobs=-1)(delayed(where_am_i)(x) for x in range(4))
    jobs_first = {j for _, _, j in first}
    jobs_second = {j for _, _, j in second}
    assert len(jobs_first) == len(jobs_second) == 1
    assert jobs_first != jobs_second
    deadline = time.monotonic() + 15
    while our_jobs(batch_client, cfg.job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert our_jobs(batch_client, cfg.job_id) == []  # both deleted at the end of their call


def test_nested_parallel_calls_keep_their_own_jobs(cfg):
    """An inner Parallel on the shared backend instance finishes (and terminates) while the
    outer one is still yielding: the outer run must survive it."""
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        outer = Parallel(n_jobs=-1, return_as="generator")(
            delayed(slow_square)(x, 0.2) for x in range(2)
        )
        results = []
        for value in outer:
            inner = Parallel(n_jobs=-1)(delayed(square)(y) for y in range(value % 3 + 1))
            results.append((value, sum(inner)))
    assert [v for v, _ in results] == [x * x for x in range(2)]
    assert [s for _, s in results] == [sum(y * y for y in range(x * x % 3 + 1)) for x in range(2)]


def test_parallel_inside_a_task_uses_a_local_backend(cfg):
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=2)(delayed(inner_sum)(n) for n in (3, 5))
    assert out == [sum(i * i for i in range(3)), sum(i * i for i in range(5))]


def test_many_small_calls_are_packed_into_few_tasks(local, cfg, batch_client):
    cfg = cfg.replace(keep_job=True)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1)(delayed(square)(x) for x in range(120))
    assert out == [x * x for x in range(120)]
    (job,) = our_jobs(batch_client, cfg.job_id)
    try:
        tasks = list(batch_client.list_tasks(job.id))
        # 120 calls from a generator in far fewer tasks, yet at least one task per slot
        # (joblib alone would cut the tail into 40 one-call batches).
        assert 4 <= len(tasks) <= 25
        assert all(str(t.state).lower().endswith("completed") for t in tasks)
    finally:
        batch_client.begin_delete_job(job.id, polling_interval=1).result()


def test_batch_requests_per_task(local, cfg, batch_client):
    """Progress is tracked from task counts and filtered listings, never a GET per task, and
    the polling stays within its budget (a burst of 5, then 1.5 requests per poll interval)."""
    cfg = cfg.replace(keep_job=True, poll_interval=1.0)
    before = local.emulator.counters.copy()
    started = time.monotonic()
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1, batch_size=1)(delayed(slow_square)(x, 0.1) for x in range(8))
    wall = time.monotonic() - started
    assert out == [x * x for x in range(8)]
    used = local.emulator.counters.copy()
    used.subtract(before)
    (job,) = our_jobs(batch_client, cfg.job_id)
    try:
        n_tasks = len(list(batch_client.list_tasks(job.id)))
    finally:
        batch_client.begin_delete_job(job.id, polling_interval=1).result()
    assert n_tasks == 8
    assert used["Tasks_GetTask"] == 0
    assert 1 <= used["Tasks_CreateTaskCollection"] <= n_tasks
    polls = used["Tasks_ListTasks"] + used["Jobs_GetJobTaskCounts"]
    assert polls <= 5 + 1.5 * wall / cfg.poll_interval, (polls, wall)
    # Every request the run made, per task: submission, counts, listings, job and pool.
    total = sum(v for k, v in used.items() if v > 0)
    print(f"\nBatch requests: {total} for {n_tasks} tasks = {total / n_tasks:.1f} per task")
    print({k: v for k, v in sorted(used.items()) if v > 0})
    assert total / n_tasks < 15


def test_throttling_and_lost_responses_neither_drop_nor_duplicate(local, cfg, batch_client):
    cfg = cfg.replace(keep_job=True)
    local.emulator.throttle("Jobs_GetJobTaskCounts", times=3, status=429, retry_after=0.2)
    local.emulator.throttle("Tasks_ListTasks", times=1, status=503, retry_after=0.2)
    # The first submission is carried out but its answer is lost: the retry meets TaskExists.
    local.emulator.fail_after_commit("Tasks_CreateTaskCollection", times=1)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1, batch_size=1)(delayed(square)(x) for x in range(10))
    assert out == [x * x for x in range(10)]
    (job,) = our_jobs(batch_client, cfg.job_id)
    try:
        tasks = list(batch_client.list_tasks(job.id))
        assert len(tasks) == len({t.id for t in tasks}) == 10
    finally:
        batch_client.begin_delete_job(job.id, polling_interval=1).result()


def test_preempted_spot_node_loses_no_result(local, cfg, batch_client, tmp_path):
    cfg = cfg.replace(dedicated_nodes=0, spot_nodes=2, keep_job=True)
    preempted: list[str] = []

    def preempt_when_running() -> None:
        # As soon as a call is inside the user's function, take its node away.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for log in tmp_path.iterdir():
                text = log.read_text()
                if text.endswith("\n") and len(text.split()) >= 3:
                    node = text.split()[-1]
                    preempted.append(
                        local.emulator.preempt_node(cfg.pool_id, node, recover_after=0.3)
                    )
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=preempt_when_running, daemon=True)
    watcher.start()
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1, batch_size=1)(
            delayed(logged_square)(x, str(tmp_path), 1.0) for x in range(6)
        )
    watcher.join(5)
    assert out == [x * x for x in range(6)]
    assert preempted
    runs = {x: (tmp_path / str(x)).read_text().count("ran") for x in range(6)}
    assert max(runs.values()) >= 2  # a call was cut off by the preemption and ran again
    (job,) = our_jobs(batch_client, cfg.job_id)
    try:
        tasks = list(batch_client.list_tasks(job.id))
        assert len(tasks) == 6
    finally:
        batch_client.begin_delete_job(job.id, polling_interval=1).result()

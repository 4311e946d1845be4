"""Blobs swapped between tasks are refused, not run or returned as the other task's.

Someone who may write to the blob container, but holds no job key, can still move a job's
signed blobs around: every payload and every result of a job is signed with the same key.
The envelopes name their task, so a payload in another task's blob stops that task (the
worker compares it with ``AZ_BATCH_TASK_ID``) and a result in another task's blob stops
the client, and the caller gets an error that names both tasks instead of wrong values.

Both swaps are made at a point where the outcome cannot depend on timing: the payloads
before Batch ever sees the tasks (``add_tasks`` holds the first task until the second
exists), the results after both tasks uploaded theirs and before the client reads either.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import threading
from collections.abc import Callable, Sequence

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch.batch import BatchService, TaskSpec
from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.errors import PayloadError, TaskFailedError
from joblib_azurebatch.payload import payload_blob
from joblib_azurebatch.storage import BlobStore
from tests.helpers.waiting import wait_for

# The worker runs in another process that cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def _swap(store: BlobStore, first: str, second: str, *, read: Callable[..., bytes]) -> None:
    """What a storage writer without the key can do: exchange two blobs' contents."""
    one, two = read(store, first), read(store, second)
    store.upload(first, two)
    store.upload(second, one)


def test_swapped_payloads_fail_both_tasks_instead_of_running_each_others_calls(
    local: LocalBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"integrity-payload-{secrets.token_hex(3)}"
    cfg = local.config(pool_id=name, job_id=name, max_task_retries=0)
    real_add_tasks = BatchService.add_tasks
    held: list[TaskSpec] = []
    swapped: list[tuple[str, str, str]] = []

    def add_tasks(self: BatchService, job_id: str, tasks: Sequence[TaskSpec]) -> None:
        # Both payloads are stored before either task exists in Batch: hold the first task
        # back until the second arrives, swap their payload blobs, then add both.
        held.extend(tasks)
        if len(held) < 2:
            return
        first, second = held[0].task_id, held[1].task_id
        with BlobStore.from_config(cfg) as store:
            _swap(
                store,
                payload_blob(job_id, first),
                payload_blob(job_id, second),
                read=BlobStore.download,
            )
        swapped.append((job_id, first, second))
        pending = list(held)
        held.clear()
        real_add_tasks(self, job_id, pending)

    monkeypatch.setattr(BatchService, "add_tasks", add_tasks)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(TaskFailedError) as info,
    ):
        Parallel(n_jobs=2, batch_size=1)(delayed(square)(x) for x in (3, 4))

    assert len(swapped) == 1
    job, first, second = swapped[0]
    error = info.value
    assert error.job_id == job
    assert error.task_id in (first, second)
    other = second if error.task_id == first else first
    # The worker's one line, in the stderr tail the error carries: both ids, and why.
    assert (
        f"[joblib-azurebatch worker] error: The task payload was written for task {other} "
        f"of job {job}, but this is task {error.task_id} of job {job}"
    ) in str(error)
    assert "replaced with another task's payload" in str(error)
    assert "(exit code 7)" in str(error)


def test_swapped_results_are_refused_instead_of_returned_as_each_others(
    local: LocalBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"integrity-result-{secrets.token_hex(3)}"
    cfg = local.config(pool_id=name, job_id=name)
    real_download = BlobStore.download
    lock = threading.Lock()
    swapped: list[tuple[str, str]] = []

    def download(self: BlobStore, blob: str) -> bytes:
        # The client's first result download waits until both tasks uploaded theirs, then
        # the two result blobs are exchanged; every later download sees the swap.
        if blob.endswith("/result"):
            with lock:
                if not swapped:
                    tasks_prefix = blob.rsplit("/tasks/", 1)[0] + "/tasks/"

                    def both() -> list[str]:
                        found = [n for n in self.list_names(tasks_prefix) if n.endswith("/result")]
                        return found if len(found) == 2 else []

                    first, second = wait_for("both tasks' results", both, timeout=120)
                    _swap(self, first, second, read=real_download)
                    swapped.append((first, second))
        return real_download(self, blob)

    monkeypatch.setattr(BlobStore, "download", download)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(PayloadError) as info,
    ):
        Parallel(n_jobs=2, batch_size=1)(delayed(square)(x) for x in (3, 4))

    assert len(swapped) == 1
    message = str(info.value)
    found = re.search(
        r"The result read for task (\S+) of job (\S+) was written by task (\S+) of job (\S+):",
        message,
    )
    assert found is not None, message
    read_as, job, written_by, written_job = found.groups()
    assert job == written_job
    assert read_as != written_by
    tasks = {blob.split("/tasks/")[1].split("/")[0] for blob in swapped[0]}
    assert {read_as, written_by} == tasks
    assert "replaced with another task's result" in message


def slow_cube(x):
    import time

    time.sleep(3)
    return x**3


def test_tasks_whose_urls_expire_in_the_queue_run_again_with_fresh_ones(local, caplog):
    """One slot, 3 s calls, URLs valid 8 s: the later tasks start (or finish) after their
    URLs expired; each is submitted again with fresh URLs and every result comes back."""
    name = f"expiring-{secrets.token_hex(3)}"
    cfg = local.config(
        pool_id=name,
        job_id=name,
        dedicated_nodes=1,
        task_slots_per_node=1,
        sas_expiry=8.0,
        max_task_retries=0,
    )
    with (
        caplog.at_level(logging.INFO, logger="joblib_azurebatch.run"),
        joblib.parallel_config(backend="azurebatch", config=cfg),
    ):
        out = Parallel(n_jobs=-1, batch_size=1)(delayed(slow_cube)(x) for x in range(4))
    assert out == [x**3 for x in range(4)]
    again = [r for r in caplog.records if "submitted again as" in r.getMessage()]
    assert again, "no task was submitted again with fresh URLs"

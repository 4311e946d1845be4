"""The run's life cycle and the submitter's rules, against the in-memory fake Batch service.

No emulator, no socket: a JobRun with a FakeBatch and a dict of blobs, so that the order in
which a run creates and releases what it holds is checked in milliseconds.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from datetime import timedelta

import pytest

from joblib_azurebatch import _joblib_compat as compat
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.errors import PayloadError, ServiceError, TaskFailedError
from joblib_azurebatch.payload import PreparedTask, encode_result, job_prefix, result_blob
from joblib_azurebatch.pools import PoolRegistry
from joblib_azurebatch.run import Account, Held, JobRun, RunState, TransitionError
from joblib_azurebatch.sizing import BatchSizer
from joblib_azurebatch.submitter import Part, Submitter, Task, TaskTemplate, split_parts
from tests.fakes import Calls, FakeBatch


class MemoryStore:
    """The blob container as a dict, logging the calls a run's ordering depends on."""

    def __init__(self, log: list[str]) -> None:
        self.blobs: dict[str, bytes] = {}
        self.log = log
        self.lock = threading.Lock()

    def ensure_container(self) -> None:
        self.log.append("ensure_container")

    def upload(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        with self.lock:
            self.blobs[name] = data

    def upload_if_absent(self, name: str, data: bytes) -> bool:
        with self.lock:
            if name in self.blobs:
                return False
            self.blobs[name] = data
            return True

    def download(self, name: str) -> bytes:
        with self.lock:
            if name not in self.blobs:
                raise FileNotFoundError(name)
            return self.blobs[name]

    def sas_url(self, name: str, *, read=False, write=False, expiry: timedelta) -> str:
        return f"memory://{name}?r={int(read)}&w={int(write)}"

    def delete_prefix(self, prefix: str) -> int:
        self.log.append("delete_prefix")
        with self.lock:
            gone = [n for n in self.blobs if n.startswith(prefix)]
            for name in gone:
                del self.blobs[name]
        return len(gone)


class LoggedBatch(FakeBatch):
    """A FakeBatch that also records the order of the operations called."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def _enter(self, operation: str) -> None:
        self.log.append(operation)
        super()._enter(operation)


@pytest.fixture
def log() -> list[str]:
    return []


@pytest.fixture
def batch(log) -> LoggedBatch:
    return LoggedBatch(log)


@pytest.fixture
def store(log) -> MemoryStore:
    return MemoryStore(log)


def make_run(batch, store, **changes) -> JobRun:
    # The pool goes with the run (no linger for a next one), as the order tests expect.
    changes.setdefault("pool_linger", 0.0)
    cfg = BatchConfig(poll_interval=0.005, progress=False, **changes)
    return JobRun(
        Account(cfg=cfg, service=batch, store=store),  # type: ignore[arg-type]
        n_jobs=2,
        sizer=BatchSizer(n_jobs=2, min_duration=2.0, max_duration=60.0),
        scheduling_latency=1.0,
        features=compat.Features(None),
        pools=PoolRegistry(),
    )


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def finish(batch, store, run: JobRun, task_id: str, value) -> None:
    """What a worker and Batch do for one task: a signed result, then completed."""
    store.upload(
        result_blob(run.job_id, task_id),
        encode_result(job_id=run.job_id, task_id=task_id, key=run._key, value=value),
    )
    batch.complete(run.job_id, task_id, exit_code=0)


def test_a_run_moves_through_its_states_and_releases_what_it_holds_in_order(batch, store, log):
    run = make_run(batch, store)
    assert run.state is RunState.NEW
    assert run.held == frozenset()
    future = run.submit(Calls(1, 2), None)
    assert run.state is RunState.RUNNING
    assert run.held == {Held.BLOBS, Held.POOL_LEASE, Held.JOB}
    # The Batch credential is read before anything is created; the job (which tells other
    # clients that the pool is in use) before the pool is taken.
    assert log.index("get_pool") < log.index("create_job") < log.index("ensure_pool")
    assert log.index("ensure_container") < log.index("ensure_pool")
    wait_for(lambda: batch.added)
    finish(batch, store, run, "task-000000", [2, 4])
    assert future.result(timeout=5) == [2, 4]
    run.close()
    assert run.state is RunState.CLOSED
    assert run.held == frozenset()
    ending = [
        op for op in log if op in ("terminate_job", "delete_job", "delete_prefix", "delete_pool")
    ]
    # Nothing may still run, so no terminate; the job goes before its blobs, the pool last.
    assert ending == ["delete_job", "delete_prefix", "delete_pool"]
    assert not [n for n in store.blobs if n.startswith(job_prefix(run.job_id))]


def test_abort_terminates_the_tasks_first_and_cancels_what_was_not_sent(batch, store, log):
    run = make_run(batch, store)
    first = run.submit(Calls(1), None)
    wait_for(lambda: batch.added)
    run.abort()
    assert run.state is RunState.ABORTED
    late = run.submit(Calls(2), None)
    assert late.cancelled()
    assert log.count("terminate_job") == 1
    run.close()
    assert first.cancelled()
    ending = [
        op for op in log if op in ("terminate_job", "delete_job", "delete_prefix", "delete_pool")
    ]
    # Aborting already terminated the job: close deletes it without a second terminate.
    assert ending == ["terminate_job", "delete_job", "delete_prefix", "delete_pool"]
    assert batch.terminated[0][0] == run.job_id


def test_close_with_tasks_left_terminates_before_deleting(batch, store, log):
    run = make_run(batch, store)
    pending = run.submit(Calls(1), None)
    wait_for(lambda: batch.added)
    run.close()
    assert pending.cancelled()
    ending = [
        op for op in log if op in ("terminate_job", "delete_job", "delete_prefix", "delete_pool")
    ]
    assert ending == ["terminate_job", "delete_job", "delete_prefix", "delete_pool"]


def test_an_unpicklable_first_batch_creates_nothing_in_batch(batch, store, log):
    run = make_run(batch, store)
    lock = threading.Lock()
    with pytest.raises(PayloadError):
        run.submit(lambda: lock, None)  # a lock does not pickle
    assert run.state is RunState.ABORTED
    assert "ensure_pool" not in log
    assert "create_job" not in log
    assert run.held == {Held.BLOBS}
    run.close()
    assert run.held == frozenset()
    assert "delete_prefix" in log
    assert "delete_pool" not in log


def test_a_failed_job_creation_takes_no_pool(batch, store, log):
    batch.fail("create_job", ServiceError("quota"))
    run = make_run(batch, store)
    with pytest.raises(ServiceError):
        run.submit(Calls(1), None)
    assert run.held == {Held.BLOBS}
    assert "ensure_pool" not in log
    run.close()
    assert "delete_job" not in log
    assert "delete_pool" not in log


def test_a_failed_pool_creation_gives_back_the_job(batch, store, log):
    batch.fail("ensure_pool", ServiceError("no cores"))
    run = make_run(batch, store)
    with pytest.raises(ServiceError):
        run.submit(Calls(1), None)
    assert run.held == {Held.BLOBS, Held.JOB}
    run.close()
    assert "delete_job" in log
    assert "delete_pool" not in log


def test_keep_pool_keeps_the_pool(batch, store, log):
    run = make_run(batch, store, keep_pool=True)
    run.submit(Calls(1), None)
    run.close()
    assert "delete_pool" not in log
    assert "delete_job" in log


def test_illegal_transitions_raise():
    batch, store = FakeBatch(), MemoryStore([])
    run = make_run(batch, store)
    with pytest.raises(TransitionError):
        run._move(RunState.RUNNING)  # NEW -> RUNNING skips STARTING
    run.close()
    with pytest.raises(TransitionError):
        run._move(RunState.ABORTED)  # nothing leaves CLOSED


# ------------------------------------------------------------------------------ submitter


def parts(*sizes: int) -> list[Part]:
    return [Part(Future(), None, n, Calls(*range(n))) for n in sizes]


def test_split_parts_balances_calls_and_keeps_order():
    given = parts(1, 1, 1, 1, 4, 1, 1)
    groups = split_parts(given, 3)
    assert [sum(p.size for p in g) for g in groups] == [4, 4, 2]
    assert [p for g in groups for p in g] == given
    assert len(split_parts(parts(1, 1), 5)) == 2


def make_submitter(batch, *, prepare=None, failed=None, n_jobs=2):
    ids = iter(range(1000))
    registered: list[str] = []
    failed = failed if failed is not None else {}
    batch.add_job("job")

    def default_prepare(task_id, calls):
        return PreparedTask(task_id, "p", "r", {"K": task_id}, 1, ())

    submitter = Submitter(
        batch,
        "job",
        prepare=prepare or default_prepare,
        template=TaskTemplate(image="img", max_retries=2, max_wall_clock=None),
        n_jobs=n_jobs,
        new_task_id=lambda: f"t{next(ids)}",
        register=lambda tasks: registered.extend(t.task_id for t in tasks),
        fail=lambda task_id, error: failed.setdefault(task_id, error),
        is_open=lambda: True,
    )
    return submitter, registered, failed


def test_a_group_of_pulled_parts_becomes_one_bundle_per_slot():
    submitter, _, _ = make_submitter(FakeBatch(), n_jobs=2)
    single, pulled = parts(3), parts(1, 1, 1, 1)
    tasks = submitter.tasks_of([single, pulled])
    assert [(len(t.parts), t.bundled) for t in tasks] == [(1, False), (2, True), (2, True)]


def test_a_task_that_does_not_prepare_fails_alone():
    def prepare(task_id, calls):
        if task_id == "t1":
            raise PayloadError("cannot pickle")
        return PreparedTask(task_id, "p", "r", {}, 1, ())

    batch = FakeBatch()
    submitter, registered, failed = make_submitter(batch, prepare=prepare)
    tasks = [Task(f"t{i}", parts(1), bundled=False) for i in range(3)]
    submitter.flush(tasks)
    assert registered == ["t0", "t1", "t2"]  # watched before they are added
    assert list(failed) == ["t1"]
    assert isinstance(failed["t1"], PayloadError)
    assert batch.added == [["t0", "t2"]]
    assert submitter.tasks_submitted == 2


def test_a_refused_submission_fails_every_task_of_the_flush():
    batch = FakeBatch()
    submitter, _, failed = make_submitter(batch)
    batch.fail("add_tasks", ServiceError("refused"))
    submitter.flush([Task(f"t{i}", parts(1), bundled=False) for i in range(3)])
    assert sorted(failed) == ["t0", "t1", "t2"]
    assert all(isinstance(e, ServiceError) for e in failed.values())


def test_drain_cancels_what_was_queued():
    submitter, _, _ = make_submitter(FakeBatch())
    queued = parts(1, 2)
    submitter.put([queued[0]])
    submitter.put([queued[1]])
    submitter.drain()
    assert all(p.future.cancelled() for p in queued)


def test_a_task_whose_urls_expired_runs_again_under_a_new_id_with_fresh_urls(batch, store, log):
    run = make_run(batch, store, max_task_retries=0)
    future = run.submit(Calls(3, 4), None)
    wait_for(lambda: batch.added)
    (first,) = batch.added[0]
    old_env = dict(batch.task(run.job_id, first).spec.environment)
    batch.complete(run.job_id, first, exit_code=75)  # the worker's EXIT_URLS_EXPIRED
    wait_for(lambda: len(batch.added) == 2)
    (second,) = batch.added[1]
    assert second != first
    new_env = batch.task(run.job_id, second).spec.environment
    # Fresh URLs for the new task's own blobs; the calls were not pickled again.
    assert new_env != old_env
    assert second in new_env["JOBLIB_AZUREBATCH_PAYLOAD_URL"]
    assert not future.done()
    finish(batch, store, run, second, [6, 8])
    assert future.result(timeout=5) == [6, 8]
    run.close()


def test_urls_that_keep_expiring_fail_the_task_after_three_refreshes(batch, store, log):
    run = make_run(batch, store, max_task_retries=0)
    future = run.submit(Calls(1), None)
    for attempt in range(4):
        wait_for(lambda n=attempt: len(batch.added) == n + 1)
        (task_id,) = batch.added[attempt]
        batch.complete(run.job_id, task_id, exit_code=75)
    with pytest.raises(TaskFailedError, match="sas_expiry"):
        future.result(timeout=5)
    assert len(batch.added) == 4
    run.close()


def test_the_end_of_a_run_logs_what_it_used(batch, store, log, caplog):
    run = make_run(batch, store)
    with caplog.at_level("INFO", logger="joblib_azurebatch.run"):
        future = run.submit(Calls(5), None)
        wait_for(lambda: batch.added)
        finish(batch, store, run, "task-000000", [10])
        assert future.result(timeout=5) == [10]
        run.close()
    (line,) = [r.getMessage() for r in caplog.records if "node-hours" in r.getMessage()]
    assert f"job {run.job_id} on pool" in line
    assert "1 task (0 retried, 0 requeued), 1 dedicated + 0 spot nodes" in line

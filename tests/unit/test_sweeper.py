"""Blob deletion in the background: per task after its callback, in parallel, and a run's
end that does not wait for it. A JobRun against the fake Batch service and an in-memory
blob store whose deletions take as long as a test says."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from joblib_azurebatch import _joblib_compat as compat
from joblib_azurebatch import sweeper as sweeper_module
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.payload import encode_result, job_prefix, payload_blob, result_blob
from joblib_azurebatch.pools import PoolRegistry
from joblib_azurebatch.run import Account, JobRun
from joblib_azurebatch.sizing import BatchSizer
from joblib_azurebatch.sweeper import SWEEPER, Sweeper
from tests.fakes import Calls, FakeBatch, MemoryStore


class SlowStore(MemoryStore):
    """The in-memory store with the deletions a run uses, each taking ``delay`` seconds;
    records every deletion request and how many ran at once."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.requests: list[list[str]] = []
        self.prefixes: list[str] = []
        self.running = self.most_at_once = 0
        #: Called with the names of each deletion, before anything is deleted.
        self.before_delete: Callable[[list[str]], None] = lambda names: None

    def ensure_container(self) -> None:
        pass

    def download(self, name: str) -> bytes:
        with self.lock:
            if name not in self.blobs:
                raise FileNotFoundError(name)
            return self.blobs[name]

    def _deleting(self) -> None:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1

    def delete_blobs(self, names: Sequence[str]) -> int:
        self.before_delete(list(names))
        with self.lock:
            self.requests.append(list(names))
        self._deleting()
        with self.lock:
            return sum(1 for n in names if self.blobs.pop(n, None) is not None)

    def delete_prefix(self, prefix: str) -> int:
        with self.lock:
            self.prefixes.append(prefix)
        self._deleting()
        with self.lock:
            gone = [n for n in self.blobs if n.startswith(prefix)]
            for name in gone:
                del self.blobs[name]
        return len(gone)


def make_run(batch: FakeBatch, store: SlowStore, **changes: object) -> JobRun:
    # A worker image: the nodes hold everything, nothing to analyse and stage per run.
    cfg = BatchConfig(image="worker:1", poll_interval=0.005, progress=False, **changes)  # type: ignore[arg-type]
    return JobRun(
        Account(cfg=cfg, service=batch, store=store),  # type: ignore[arg-type]
        n_jobs=2,
        sizer=BatchSizer(n_jobs=2, min_duration=2.0, max_duration=60.0),
        scheduling_latency=1.0,
        features=compat.Features(None),
        pools=PoolRegistry(),
    )


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def finish(batch: FakeBatch, store: SlowStore, run: JobRun, task_id: str, value: object) -> None:
    """What a worker and Batch do for one task: a signed result, then completed."""
    store.upload(
        result_blob(run.job_id, task_id),
        encode_result(job_id=run.job_id, task_id=task_id, key=run._key, value=value),
    )
    batch.complete(run.job_id, task_id, exit_code=0)


@pytest.fixture(autouse=True)
def _quiet_sweeper() -> Iterator[None]:
    """Every test starts and ends with nothing left to delete in the process's sweeper."""
    assert SWEEPER.wait(10)
    yield
    assert SWEEPER.wait(10)


def test_a_tasks_blobs_are_deleted_after_its_callback_while_the_run_goes_on() -> None:
    batch, store = FakeBatch(), SlowStore()
    called: list[str] = []
    deleted_after_callback: list[bool] = []
    run = make_run(batch, store)
    store.before_delete = lambda names: deleted_after_callback.append(
        all(any(f"/{t}/" in n for t in called) for n in names)
    )
    first = run.submit(Calls(1), lambda f: called.append("task-000000"))
    wait_for(lambda: batch.added)
    payload = payload_blob(run.job_id, "task-000000")
    assert payload in store.blobs
    finish(batch, store, run, "task-000000", [2])
    assert first.result(timeout=5) == [2]
    wait_for(lambda: payload not in store.blobs)  # the callback ran first: see below
    assert result_blob(run.job_id, "task-000000") not in store.blobs
    assert deleted_after_callback == [True]
    assert run.state.value == "running"  # the run is not over: this was the task's own
    run.close()


def test_a_task_that_never_completed_keeps_its_blobs_until_the_run_ends() -> None:
    batch, store = FakeBatch(), SlowStore()
    run = make_run(batch, store)
    run.submit(Calls(1), None)
    wait_for(lambda: batch.added)
    run.submit(Calls(2), None)
    wait_for(lambda: len(batch.added) == 2)
    (second,) = batch.added[1]
    finish(batch, store, run, "task-000000", [2])
    wait_for(lambda: run.calls_completed == 1)
    assert SWEEPER.wait(5)
    assert payload_blob(run.job_id, second) in store.blobs  # still pending (or retried)
    run.close()
    assert SWEEPER.wait(5)
    assert not [n for n in store.blobs if n.startswith(job_prefix(run.job_id))]


def test_close_does_not_wait_for_a_slow_sweep_and_the_sweep_still_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sweeper_module, "SWEEP_GRACE", 0.1)
    batch, store = FakeBatch(), SlowStore()
    run = make_run(batch, store)
    future = run.submit(Calls(1), None)
    wait_for(lambda: batch.added)
    finish(batch, store, run, "task-000000", [2])
    assert future.result(timeout=5) == [2]
    wait_for(lambda: payload_blob(run.job_id, "task-000000") not in store.blobs)
    shared = job_prefix(run.job_id) + "objects/" + "0" * 64  # a large shared argument
    store.upload(shared, b"x")
    store.delay = 1.5  # the end-of-run sweep is slow
    started = time.monotonic()
    run.close()
    took = time.monotonic() - started
    assert took < 1.0
    assert batch.deleted_jobs == [run.job_id]  # the job (what bills) went first, at once
    assert shared in store.blobs  # being swept
    assert store.prefixes == [job_prefix(run.job_id)]
    assert SWEEPER.wait(10)
    assert not [n for n in store.blobs if n.startswith(job_prefix(run.job_id))]


def test_an_aborted_run_waits_for_its_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """After Ctrl-C or a signal the process may end right after close: nothing is left to
    a background thread."""
    monkeypatch.setattr(sweeper_module, "SWEEP_GRACE", 0.05)
    batch, store = FakeBatch(), SlowStore(delay=0.3)
    run = make_run(batch, store)
    run.submit(Calls(1), None)
    wait_for(lambda: batch.added)
    run.abort()
    run.close()
    assert not [n for n in store.blobs if n.startswith(job_prefix(run.job_id))]


def test_keep_blobs_deletes_nothing() -> None:
    batch, store = FakeBatch(), SlowStore()
    run = make_run(batch, store, keep_blobs=True)
    future = run.submit(Calls(1), None)
    wait_for(lambda: batch.added)
    finish(batch, store, run, "task-000000", [2])
    assert future.result(timeout=5) == [2]
    run.close()
    assert SWEEPER.wait(5)
    assert store.requests == []
    assert store.prefixes == []
    assert payload_blob(run.job_id, "task-000000") in store.blobs


# ------------------------------------------------------------------------------ the sweeper


def test_discarded_names_are_deleted_in_parallel_batches() -> None:
    store = SlowStore(delay=0.05)
    for i in range(2000):
        store.upload(f"jobs/j/tasks/t{i}/result", b"x")
    sweeper = Sweeper(workers=4, chunk=256)
    for i in range(2000):
        sweeper.discard(store, [f"jobs/j/tasks/t{i}/result"])
    assert sweeper.wait(10)
    assert store.blobs == {}
    assert sweeper.deleted == 2000
    assert store.most_at_once > 1  # several requests at once
    assert max(len(r) for r in store.requests) <= 256
    assert len(store.requests) < 2000  # names that piled up went in one request


def test_a_sweep_takes_over_the_names_of_its_prefix_still_waiting() -> None:
    store = SlowStore()
    for name in ("jobs/a/tasks/t1/result", "jobs/b/tasks/t1/result", "jobs/b/objects/o"):
        store.upload(name, b"x")
    started, release = threading.Event(), threading.Event()

    def hold(names: list[str]) -> None:
        started.set()
        assert release.wait(5)

    store.before_delete = hold
    sweeper = Sweeper(workers=1)
    sweeper.discard(store, ["jobs/a/tasks/t1/result"])
    assert started.wait(5)  # the one worker is busy with this
    sweeper.discard(store, ["jobs/b/tasks/t1/result"])
    sweep = sweeper.sweep(store, "jobs/b/", label="the job b")
    release.set()
    assert sweep.wait(5)
    assert sweeper.wait(5)
    assert sweep.deleted == 2
    assert store.requests == [["jobs/a/tasks/t1/result"]]  # b's name went with the sweep
    assert store.blobs == {}


def test_at_exit_the_sweeper_waits_a_bounded_time_then_sweeps_in_the_callers_thread() -> None:
    store = SlowStore(delay=1.0)
    store.upload("jobs/a/x", b"x")
    store.upload("jobs/b/x", b"x")
    sweeper = Sweeper()
    sweeper.sweep(store, "jobs/a/", label="the job a")
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="cleanup"):
        assert not sweeper.finish(0.1)
    assert time.monotonic() - started < 0.9
    late = sweeper.sweep(store, "jobs/b/", label="the job b")  # a run closed at exit
    assert late.done  # done in this thread, nothing would wait for a thread
    assert "jobs/b/x" not in store.blobs
    sweeper.discard(store, ["jobs/a/y"])  # left to the sweep of its run
    assert sweeper.wait(5)


def test_a_failed_deletion_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Refusing(SlowStore):
        def delete_blobs(self, names: Sequence[str]) -> int:
            raise PermissionError("refused")

        def delete_prefix(self, prefix: str) -> int:
            raise PermissionError("refused")

    store = Refusing()
    sweeper = Sweeper()
    sweeper.discard(store, ["jobs/a/x"])
    sweep = sweeper.sweep(store, "jobs/b/", label="the job b")
    assert sweeper.wait(5)
    assert isinstance(sweep.error, PermissionError)
    assert "could not delete the blobs of the job b" in caplog.text
    assert "joblib-azurebatch cleanup" in caplog.text


def test_idle_workers_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweeper_module, "IDLE_SECONDS", 0.05)
    sweeper = Sweeper()
    sweeper.discard(SlowStore(), ["x"])
    assert sweeper.wait(5)
    assert sweeper.threads >= 1
    wait_for(lambda: sweeper.threads == 0)

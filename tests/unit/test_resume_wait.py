"""`Resumer.wait_for_earlier`: the job of an earlier run of the same calls whose client died
is waited for, within bounds, then deleted with its blobs; any other job is left alone.

Everything runs against the in-memory fakes: the sleep handed to the code under test moves
a `FakeClock` and, where a test needs it, the earlier job's tasks.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from joblib_azurebatch.liveness import ClientRecord
from joblib_azurebatch.payload import job_prefix
from joblib_azurebatch.resume import RESUME_METADATA, Resumer
from tests.fakes import FakeBatch, FakeClock, MemoryStore

KEY = "a" * 64
OTHER_KEY = "b" * 64
ORPHAN = "joblib-20260101T000000-0123abcd"
#: An id that starts with ORPHAN's: its blobs must survive ORPHAN's cleanup.
NEIGHBOUR = ORPHAN + "x"
POLL = 5.0


class Store(MemoryStore):
    """A `MemoryStore` that can also delete by prefix, recording each prefix deleted."""

    def __init__(self) -> None:
        super().__init__()
        self.deleted_prefixes: list[str] = []

    def list_names(self, prefix: str) -> list[str]:
        with self.lock:
            return sorted(n for n in self.blobs if n.startswith(prefix))

    def delete_prefix(self, prefix: str) -> int:
        assert prefix, "delete_prefix never empties the container"
        with self.lock:
            self.deleted_prefixes.append(prefix)
            gone = [n for n in self.blobs if n.startswith(prefix)]
            for name in gone:
                del self.blobs[name]
        return len(gone)


class RecordingBatch(FakeBatch):
    """A `FakeBatch` that records the order of the operations called in ``ops`` (which the
    test's sleep appends to as well), so the test sees what came before the deletion."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.ops: list[str] = []

    def _enter(self, operation: str) -> None:
        self.ops.append(operation)
        super()._enter(operation)


@pytest.fixture(scope="module")
def dead() -> dict[str, str]:
    """The client record of a process of this host that has exited (one per module: a
    process start is the slowest thing here)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    record = ClientRecord.of_this_process()
    return replace(record, pid=child.pid, process_started=1.0).to_metadata()


@pytest.fixture
def live() -> dict[str, str]:
    return ClientRecord.of_this_process().to_metadata()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def batch(clock: FakeClock) -> RecordingBatch:
    batch = RecordingBatch(clock)
    batch.add_pool("pool")
    return batch


@pytest.fixture
def store() -> Store:
    store = Store()
    for job_id in (ORPHAN, NEIGHBOUR):
        store.upload(f"{job_prefix(job_id)}tasks/t-0/payload", b"payload")
        store.upload(f"{job_prefix(job_id)}objects/0f0f", b"object")
    store.upload(f"results/{KEY}", b"record")
    return store


@pytest.fixture
def resumer(store: Store) -> Iterator[Resumer]:
    resumer = Resumer(store, image="", any_environment=False, sas_expiry=3600.0)
    yield resumer
    resumer.close()


def make_job(
    batch: FakeBatch,
    job_id: str,
    metadata: dict[str, str],
    *,
    key: str | None = KEY,
    pool_id: str = "pool",
    running: int = 2,
    active: int = 1,
) -> None:
    """A job with ``running`` running and ``active`` queued tasks, ``t-0``, ``t-1``, ..."""
    if key is not None:
        metadata = {**metadata, RESUME_METADATA: key}
    batch.create_job(job_id, pool_id, metadata=metadata)
    for n in range(running + active):
        batch.add_task(job_id, f"t-{n}")
        if n < running:
            batch.start(job_id, f"t-{n}")


def unfinished(batch: FakeBatch, job_id: str) -> list[str]:
    return [t.task_id for t in batch.jobs[job_id].tasks.values() if t.state != "completed"]


def wait(
    resumer: Resumer,
    batch: FakeBatch,
    clock: FakeClock,
    log: list[str],
    *,
    stalled_after: float = 600.0,
    on_sleep: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """`wait_for_earlier` on fake time; ``on_sleep(n)`` runs after the ``n``-th sleep (from 1).
    ``batch.ops`` then holds only what the wait did."""
    if isinstance(batch, RecordingBatch):
        batch.ops.clear()

    def sleep(seconds: float) -> None:
        if isinstance(batch, RecordingBatch):
            batch.ops.append("sleep")
        clock.sleep(seconds)
        on_sleep(len(clock.sleeps))

    return resumer.wait_for_earlier(
        batch,
        KEY,
        poll_interval=POLL,
        stalled_after=stalled_after,
        clock=clock.monotonic,
        sleep=sleep,
        log=log.append,
    )


def test_a_dead_clients_job_is_waited_for_then_deleted_with_its_blobs(
    resumer, batch, store, clock, dead
):
    """On the way, its tasks are all queued (a preempted node gave them back), then all
    running: neither is the end, only none queued and none running is."""
    make_job(batch, ORPHAN, dead)
    job = batch.jobs[ORPHAN]

    def move_on(n: int) -> None:
        for task_id in unfinished(batch, ORPHAN):
            task = batch.task(ORPHAN, task_id)
            if n == 1 and task.state == "running":
                batch.requeue(ORPHAN, task_id)
            elif n == 2:
                batch.start(ORPHAN, task_id)
            elif n == 3:
                batch.complete(ORPHAN, task_id)

    log: list[str] = []
    assert wait(resumer, batch, clock, log, on_sleep=move_on) == [ORPHAN]

    assert batch.ops == [
        "list_jobs",
        "get_pool",
        "task_counts",
        "sleep",
        "task_counts",
        "sleep",
        "task_counts",
        "sleep",
        "task_counts",
        "delete_job",
    ]
    assert all(t.state == "completed" for t in job.tasks.values())
    assert batch.deleted_jobs == [ORPHAN]
    assert clock.sleeps == [POLL] * 3
    assert store.deleted_prefixes == [f"jobs/{ORPHAN}/"]
    assert sorted(store.blobs) == [
        f"jobs/{NEIGHBOUR}/objects/0f0f",
        f"jobs/{NEIGHBOUR}/tasks/t-0/payload",
        f"results/{KEY}",
    ]
    assert len(log) == 1
    assert ORPHAN in log[0]
    assert "3 tasks" in log[0]
    assert "waiting" in log[0]


def assert_left_alone(resumer: Resumer, batch: FakeBatch, store: Store, clock: FakeClock) -> None:
    """`wait_for_earlier` neither waits for, nor deletes, ORPHAN, and touches no blob."""
    before = dict(store.blobs)
    log: list[str] = []
    assert wait(resumer, batch, clock, log) == []
    assert ORPHAN in batch.jobs
    assert batch.deleted_jobs == []
    assert batch.calls["task_counts"] == 0
    assert clock.sleeps == []
    assert store.blobs == before
    assert store.deleted_prefixes == []
    assert log == []


def test_a_live_clients_job_is_neither_waited_for_nor_deleted(resumer, batch, store, clock, live):
    """Its client is still sending and collecting: it is another run going on, not an
    earlier one to take over from."""
    make_job(batch, ORPHAN, live)
    assert_left_alone(resumer, batch, store, clock)


@pytest.mark.parametrize(
    ("key", "extra"),
    [
        pytest.param(OTHER_KEY, {}, id="another-key"),
        pytest.param(None, {}, id="no-resume-metadata"),
        pytest.param(None, {"joblib-azurebatch-resume-other": KEY}, id="key-under-another-name"),
    ],
)
def test_a_dead_clients_job_of_other_calls_is_left_alone(
    resumer, batch, store, clock, dead, key, extra
):
    make_job(batch, ORPHAN, {**dead, **extra}, key=key)
    assert_left_alone(resumer, batch, store, clock)


def test_a_job_without_a_client_record_is_left_alone(resumer, batch, store, clock):
    """Without a record nothing says its client is gone: it may be another tool's job."""
    make_job(batch, ORPHAN, {})
    assert_left_alone(resumer, batch, store, clock)


def test_only_the_dead_clients_job_of_the_same_calls_goes(resumer, batch, store, clock, dead, live):
    make_job(batch, ORPHAN, dead, running=0, active=0)
    make_job(batch, NEIGHBOUR, live)
    make_job(batch, "other-calls", dead, key=OTHER_KEY)

    assert wait(resumer, batch, clock, []) == [ORPHAN]

    assert batch.deleted_jobs == [ORPHAN]
    assert sorted(batch.jobs) == sorted([NEIGHBOUR, "other-calls"])
    assert store.deleted_prefixes == [f"jobs/{ORPHAN}/"]


def test_a_job_whose_pool_is_gone_is_deleted_at_once(resumer, batch, store, clock, dead):
    """No node is left to run its tasks: waiting for them would only wait out the stall."""
    make_job(batch, ORPHAN, dead, pool_id="deleted-pool")

    log: list[str] = []
    assert wait(resumer, batch, clock, log) == [ORPHAN]

    assert batch.ops == ["list_jobs", "get_pool", "delete_job"]
    assert batch.calls["task_counts"] == 0
    assert clock.sleeps == []
    assert batch.deleted_jobs == [ORPHAN]
    assert store.deleted_prefixes == [f"jobs/{ORPHAN}/"]
    assert not any(n.startswith(f"jobs/{ORPHAN}/") for n in store.blobs)
    assert log == []


def test_a_job_that_makes_no_progress_is_given_up_after_stalled_after(
    resumer, batch, store, clock, dead
):
    """Its three tasks wait for nodes that never come: nothing runs, nothing ends."""
    make_job(batch, ORPHAN, dead, running=0, active=3)
    start = clock.monotonic()
    stalled_after = 12.0
    deleted_at: list[float] = []
    logged_at: list[float] = []

    def delete_job(job_id: str) -> None:
        deleted_at.append(clock.monotonic())
        FakeBatch.delete_job(batch, job_id)

    batch.delete_job = delete_job  # type: ignore[method-assign]
    log: list[str] = []

    def record(line: str) -> None:
        logged_at.append(clock.monotonic() - start)
        log.append(line)

    assert resumer.wait_for_earlier(
        batch,
        KEY,
        poll_interval=POLL,
        stalled_after=stalled_after,
        clock=clock.monotonic,
        sleep=clock.sleep,
        log=record,
    ) == [ORPHAN]

    waited = deleted_at[0] - start
    assert stalled_after < waited <= stalled_after + POLL
    assert clock.sleeps == [POLL] * 3
    assert len(log) == 2
    assert "waiting" in log[0]
    assert logged_at[0] == 0.0
    assert logged_at[1] > stalled_after
    assert ORPHAN in log[1]
    assert "has run for 12 s" in log[1]
    assert "3 unfinished tasks" in log[1]
    assert batch.deleted_jobs == [ORPHAN]
    assert store.deleted_prefixes == [f"jobs/{ORPHAN}/"]


def test_progress_resets_the_stall_timer(resumer, batch, store, clock, dead):
    """Five tasks finish one every other poll (10 s apart): the whole wait (50 s) is far
    longer than ``stalled_after`` (15 s), each gap shorter, so the job is waited out."""
    make_job(batch, ORPHAN, dead, running=2, active=3)
    job = batch.jobs[ORPHAN]

    def one_every_other(n: int) -> None:
        left = unfinished(batch, ORPHAN)
        if n % 2 == 0 and left:
            batch.complete(ORPHAN, left[0])

    log: list[str] = []
    start = clock.monotonic()
    assert wait(resumer, batch, clock, log, stalled_after=15.0, on_sleep=one_every_other) == [
        ORPHAN
    ]

    assert all(t.state == "completed" for t in job.tasks.values())
    assert clock.monotonic() - start == 50.0
    assert batch.ops[-2:] == ["task_counts", "delete_job"]
    assert len(log) == 1
    assert "waiting" in log[0]
    assert batch.deleted_jobs == [ORPHAN]


def test_a_job_deleted_while_waited_for_ends_the_wait(resumer, batch, store, clock, dead):
    """Someone else (cleanup, another re-run that gave up on it) deleted the job: its calls
    are as finished as they will get, and the re-run goes on instead of failing."""
    make_job(batch, ORPHAN, dead)
    log: list[str] = []
    gone = wait(resumer, batch, clock, log, on_sleep=lambda n: batch.delete_job(ORPHAN))
    assert gone == [ORPHAN]
    assert len(clock.sleeps) == 1


def test_long_running_tasks_are_waited_for_however_long_they_take(
    resumer, batch, store, clock, dead
):
    """Calls longer than ``stalled_after``: the counts stay the same while tasks run, and
    giving up would kill them and compute their calls again."""
    make_job(batch, ORPHAN, dead, running=2, active=0)

    def finish_late(n: int) -> None:
        if n == 10:
            for task_id in unfinished(batch, ORPHAN):
                batch.complete(ORPHAN, task_id)

    log: list[str] = []
    assert wait(resumer, batch, clock, log, stalled_after=12.0, on_sleep=finish_late) == [ORPHAN]
    assert len(clock.sleeps) == 10
    assert len(log) == 1
    assert "waiting" in log[0]

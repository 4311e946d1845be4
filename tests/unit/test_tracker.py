"""The tracker's rules, one poll at a time, against an in-memory Batch and a hand-moved clock.

Each test calls ``poll_once()`` itself, so what happens between two polls is decided by the
test and nothing depends on thread timing: a poll returns only after every download it
started has finished and every callback it owes has fired.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from joblib_azurebatch import tracker as tracker_module
from joblib_azurebatch.errors import CredentialError, ServiceError, TaskFailedError
from joblib_azurebatch.tracker import (
    DEFAULT_RETRY_BUDGET,
    RELIST_EVERY,
    RESULT_ATTEMPTS,
    RESULT_RETRY_DELAY,
    TaskDone,
    Tracker,
)
from tests.fakes import FakeBatch, FakeBlobs, FakeClock

JOB = "job-1"
OVERLAP = dt.timedelta(seconds=5)


class Done:
    """Records every callback: what it got and in which thread, and whether two overlapped."""

    def __init__(self) -> None:
        self.got: dict[str, list[TaskDone]] = {}
        self.threads: set[int] = set()
        self.busy = False
        self.overlapped = False
        self._lock = threading.Lock()

    def __call__(self, done: TaskDone) -> None:
        with self._lock:
            if self.busy:
                self.overlapped = True
            self.busy = True
        self.threads.add(threading.get_ident())
        self.got.setdefault(done.task_id, []).append(done)
        with self._lock:
            self.busy = False

    def one(self, task_id: str) -> TaskDone:
        (done,) = self.got[task_id]
        return done


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def batch(clock: FakeClock) -> FakeBatch:
    fake = FakeBatch(clock)
    fake.add_job(JOB)
    return fake


@pytest.fixture
def blobs() -> FakeBlobs:
    return FakeBlobs()


@pytest.fixture
def done() -> Done:
    return Done()


@pytest.fixture
def tracker(batch: FakeBatch, blobs: FakeBlobs, clock: FakeClock) -> Iterator[Tracker]:
    t = Tracker(
        batch, JOB, fetch=blobs, poll_interval=1.0, overlap=OVERLAP.total_seconds(), clock=clock
    )
    yield t
    t.stop()


def watch(tracker: Tracker, batch: FakeBatch, done: Done, *task_ids: str) -> None:
    for task_id in task_ids:
        tracker.watch(task_id, done)
        batch.add_task(JOB, task_id)


def succeed(batch: FakeBatch, blobs: FakeBlobs, task_id: str, **kwargs: Any) -> None:
    """Complete ``task_id`` with exit code 0 and its result blob in place."""
    blobs.put(task_id, f"result of {task_id}".encode())
    batch.complete(JOB, task_id, **kwargs)


# ----------------------------------------------------------------------------- when to list


def test_nothing_watched_makes_no_request(tracker: Tracker, batch: FakeBatch) -> None:
    tracker.poll_once()
    assert sum(batch.calls.values()) == 0
    assert (tracker.count_polls, tracker.list_polls) == (0, 0)


def test_the_first_poll_lists_every_completed_task(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done
) -> None:
    """A task that completed before the tracker looked (a reattached run) is found at once."""
    watch(tracker, batch, done, "t1")
    batch.freeze_counts(JOB)  # the counts show no completion: only the first look lists
    succeed(batch, blobs, "t1", at=batch.clock.now() - dt.timedelta(hours=1))
    tracker.poll_once()
    assert batch.listings == [None]
    assert done.one("t1").data == b"result of t1"


def test_lists_only_when_the_completed_count_grows(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    watch(tracker, batch, done, "t1", "t2")
    tracker.poll_once()
    assert (tracker.count_polls, tracker.list_polls) == (1, 1)  # the first look

    clock.advance(1)
    tracker.poll_once()
    batch.start(JOB, "t1")
    clock.advance(1)
    tracker.poll_once()  # running is not completed: counts moved, no listing
    assert (tracker.count_polls, tracker.list_polls) == (3, 1)
    assert done.got == {}

    succeed(batch, blobs, "t1")
    clock.advance(1)
    tracker.poll_once()
    assert (tracker.count_polls, tracker.list_polls) == (4, 2)
    assert done.one("t1").data == b"result of t1"
    assert tracker.pending() == ["t2"]
    assert batch.calls["task_counts"] == tracker.count_polls
    assert batch.calls["completed_tasks"] == tracker.list_polls


def test_listings_after_the_first_reach_back_only_the_overlap(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    """A task that completed before the newest one seen, but shows up late, is still found."""
    watch(tracker, batch, done, "c", "a", "b", "d")
    succeed(batch, blobs, "c")
    newest_c = batch.task(JOB, "c").transition_time
    tracker.poll_once()
    assert list(done.got) == ["c"]

    clock.advance(1)
    succeed(batch, blobs, "a", hidden_listings=1)  # completed first, listed late
    clock.advance(1)
    succeed(batch, blobs, "b")
    newest_b = batch.task(JOB, "b").transition_time
    tracker.poll_once()
    assert batch.listings[-1] == newest_c - OVERLAP
    assert set(done.got) == {"c", "b"}

    clock.advance(1)
    succeed(batch, blobs, "d")
    tracker.poll_once()
    assert batch.listings[-1] == newest_b - OVERLAP  # a window, not a full listing
    assert set(done.got) == {"c", "a", "b", "d"}
    assert done.one("a").data == b"result of a"


def test_counts_ahead_of_two_listings_in_a_row_list_everything(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    """A completion that fell outside the overlap window is found by one full listing."""
    watch(tracker, batch, done, "c", "old")
    succeed(batch, blobs, "c")
    newest = batch.task(JOB, "c").transition_time
    tracker.poll_once()

    clock.advance(1)
    succeed(batch, blobs, "old", at=newest - 2 * OVERLAP)
    tracker.poll_once()  # counts say 2, the window misses it
    assert "old" not in done.got
    assert batch.listings == [None, newest - OVERLAP]

    clock.advance(1)
    tracker.poll_once()  # counts still ahead of what the last listing showed: full listing
    assert batch.listings == [None, newest - OVERLAP, None]
    assert done.one("old").data == b"result of old"


def test_counts_ahead_of_one_listing_do_not_list_everything(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    watch(tracker, batch, done, "c", "late", "e")
    succeed(batch, blobs, "c")
    tracker.poll_once()
    clock.advance(1)
    succeed(batch, blobs, "late", hidden_listings=1)
    tracker.poll_once()
    clock.advance(1)
    succeed(batch, blobs, "e")  # the count grew again since the last listing
    tracker.poll_once()
    assert batch.listings[1] is not None
    assert batch.listings[2] is not None
    assert set(done.got) == {"c", "late", "e"}


def test_stale_listing_every_relist_every_seconds_even_if_counts_lag(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    watch(tracker, batch, done, "t1")
    tracker.poll_once()
    assert tracker.list_polls == 1
    batch.freeze_counts(JOB)  # the counts will not show the completion
    succeed(batch, blobs, "t1")

    clock.advance(RELIST_EVERY)
    tracker.poll_once()
    assert tracker.list_polls == 1  # not stale yet: exactly RELIST_EVERY is not over it
    assert done.got == {}

    clock.advance(0.5)
    tracker.poll_once()
    assert tracker.list_polls == 2
    assert batch.listings[-1] is None  # a stale listing looks at every completed task
    assert done.one("t1").data == b"result of t1"


# ----------------------------------------------------------------------------- delivery


def test_a_task_listed_twice_is_delivered_once(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    watch(tracker, batch, done, "t1", "t2")
    tracker.poll_once()
    succeed(batch, blobs, "t1")
    t1_time = batch.task(JOB, "t1").transition_time
    clock.advance(1)
    tracker.poll_once()
    clock.advance(1)
    succeed(batch, blobs, "t2")
    tracker.poll_once()
    since = batch.listings[-1]
    assert since is not None
    assert since <= t1_time  # the last listing did return t1 again
    assert len(done.got["t1"]) == 1
    assert len(done.got["t2"]) == 1
    assert blobs.fetches["t1"] == 1


def test_a_watched_or_delivered_task_cannot_be_watched_again(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done
) -> None:
    watch(tracker, batch, done, "t1")
    with pytest.raises(ValueError, match="already watched"):
        tracker.watch("t1", done)
    succeed(batch, blobs, "t1")
    tracker.poll_once()
    with pytest.raises(ValueError, match="already watched"):
        tracker.watch("t1", done)


def test_result_missing_at_first_is_fetched_again(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    watch(tracker, batch, done, "t1")
    blobs.put("t1", b"late", missing_first=1)
    batch.complete(JOB, "t1")
    tracker.poll_once()
    got = done.one("t1")
    assert (got.data, got.error) == (b"late", None)
    assert got.outcome is not None
    assert got.outcome.task_id == "t1"
    assert blobs.fetches["t1"] == 2
    assert clock.sleeps == [RESULT_RETRY_DELAY]


class Flaky:
    """A fetch that fails with a storage error ``failures`` times, then answers."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self, task_id: str) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return b"result"


def test_a_storage_outage_while_downloading_costs_time_not_the_result(
    batch: FakeBatch, done: Done, clock: FakeClock
) -> None:
    fetch = Flaky(4, ServiceError("503 ServerBusy"))
    tracker = Tracker(batch, JOB, fetch=fetch, poll_interval=1.0, clock=clock)
    watch(tracker, batch, done, "t1")
    batch.complete(JOB, "t1")
    tracker.poll_once()
    got = done.one("t1")
    assert (got.data, got.error) == (b"result", None)
    assert fetch.calls == 5
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0]  # backing off, on the tracker's clock
    tracker.stop()


def test_a_storage_outage_longer_than_the_budget_fails_the_task_and_a_refused_key_at_once(
    batch: FakeBatch, done: Done, clock: FakeClock
) -> None:
    endless = Flaky(10**6, ServiceError("503 ServerBusy"))
    tracker = Tracker(batch, JOB, fetch=endless, poll_interval=1.0, clock=clock)
    watch(tracker, batch, done, "t1")
    batch.complete(JOB, "t1")
    tracker.poll_once()
    assert isinstance(done.one("t1").error, ServiceError)
    assert sum(clock.sleeps) <= tracker_module.DOWNLOAD_BUDGET
    tracker.stop()

    refused = Flaky(10**6, CredentialError("403"))
    other = Tracker(batch, JOB, fetch=refused, poll_interval=1.0, clock=clock)
    watch(other, batch, done, "t2")
    batch.complete(JOB, "t2")
    other.poll_once()
    assert isinstance(done.one("t2").error, CredentialError)
    assert refused.calls == 1
    other.stop()


def test_result_missing_after_every_attempt_fails_with_the_stderr_tail(
    tracker: Tracker, batch: FakeBatch, done: Done, blobs: FakeBlobs, clock: FakeClock
) -> None:
    watch(tracker, batch, done, "t1")
    batch.complete(JOB, "t1", stderr="Traceback ...\nMemoryError\n", node_id="tvm-3")
    tracker.poll_once()
    error = done.one("t1").error
    assert isinstance(error, TaskFailedError)
    assert (error.job_id, error.task_id) == (JOB, "t1")
    assert "exited with code 0 but uploaded no result" in str(error)
    assert error.stderr_tail == "Traceback ...\nMemoryError\n"
    assert str(error).endswith("MemoryError\n")
    assert blobs.fetches["t1"] == RESULT_ATTEMPTS
    assert clock.sleeps == [RESULT_RETRY_DELAY] * (RESULT_ATTEMPTS - 1)


def test_failure_info_fails_the_task_naming_the_node(
    tracker: Tracker, batch: FakeBatch, done: Done, blobs: FakeBlobs
) -> None:
    watch(tracker, batch, done, "t1")
    batch.complete(
        JOB,
        "t1",
        exit_code=None,
        failure="ContainerPullFailed: the image was not found",
        node_id="tvm-7",
        retry_count=3,
    )
    tracker.poll_once()
    error = done.one("t1").error
    assert isinstance(error, TaskFailedError)
    message = str(error)
    assert "it failed with ContainerPullFailed: the image was not found" in message
    assert "after 4 attempts on the node tvm-7" in message
    assert "exit code" not in message
    assert blobs.fetches["t1"] == 0  # a failed task's result is not looked for


def test_non_zero_exit_fails_the_task_and_names_a_missing_worker(
    tracker: Tracker, batch: FakeBatch, done: Done
) -> None:
    watch(tracker, batch, done, "t1")
    batch.complete(
        JOB, "t1", exit_code=1, stderr="ModuleNotFoundError: No module named 'joblib_azurebatch'"
    )
    tracker.poll_once()
    error = done.one("t1").error
    assert isinstance(error, TaskFailedError)
    assert "it exited with code 1, after 1 attempt on the node node-1" in str(error)
    assert "joblib-azurebatch is not installed in the task's image" in str(error)


def test_an_environment_that_does_not_install_is_named_with_the_fix(
    tracker: Tracker, batch: FakeBatch, done: Done
) -> None:
    watch(tracker, batch, done, "t1")
    batch.complete(
        JOB,
        "t1",
        exit_code=97,
        stderr="pip noise\n[joblib-azurebatch bootstrap] error: pip could not install environment "
        "abc (exit code 1): ERROR: No matching distribution found for nope==1\n",
    )
    tracker.poll_once()
    error = done.one("t1").error
    assert isinstance(error, TaskFailedError)
    assert "The node could not install the environment:" in str(error)
    assert "No matching distribution found for nope==1" in str(error).split("---")[0]
    assert "packages=" in str(error)


# ----------------------------------------------------------------------------- service errors


def test_polls_failing_for_less_than_the_budget_fail_nothing(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    watch(tracker, batch, done, "t1")
    # Many failed polls, however many, spread over less than the budget.
    batch.fail("task_counts", ServiceError("503 ServerBusy"), times=20)
    for _ in range(20):
        tracker.poll_once()
        clock.advance(DEFAULT_RETRY_BUDGET / 20 - 1)
    tracker.poll_once()  # a good poll starts the budget afresh
    batch.fail("completed_tasks", ServiceError("503 ServerBusy"), times=2)
    succeed(batch, blobs, "t1")
    tracker.poll_once()
    clock.advance(DEFAULT_RETRY_BUDGET - 1)
    tracker.poll_once()
    assert done.got == {}
    assert tracker.pending() == ["t1"]
    tracker.poll_once()
    assert done.one("t1").data == b"result of t1"


def test_polls_failing_for_the_whole_budget_fail_every_pending_task(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    watch(tracker, batch, done, "t1", "t2", "t3")
    succeed(batch, blobs, "t3")
    tracker.poll_once()
    assert list(done.got) == ["t3"]
    broken = ServiceError("the Batch account did not answer")
    batch.fail("task_counts", broken, times=3)
    tracker.poll_once()  # the first failure starts the clock
    clock.advance(DEFAULT_RETRY_BUDGET - 0.5)
    tracker.poll_once()
    assert set(done.got) == {"t3"}
    clock.advance(0.5)
    tracker.poll_once()
    assert done.one("t1").error is broken
    assert done.one("t2").error is broken
    assert len(done.got["t3"]) == 1
    assert tracker.pending() == []


def test_the_budget_is_the_trackers_own(
    batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    t = Tracker(batch, JOB, fetch=blobs, poll_interval=1.0, clock=clock, retry_budget=10.0)
    try:
        watch(t, batch, done, "t1")
        broken = ServiceError("503 ServerBusy")
        batch.fail("task_counts", broken, times=2)
        t.poll_once()
        clock.advance(10.0)
        t.poll_once()
        assert done.one("t1").error is broken
    finally:
        t.stop()


def test_a_refused_credential_fails_every_pending_task_at_once(
    tracker: Tracker, batch: FakeBatch, done: Done
) -> None:
    watch(tracker, batch, done, "t1", "t2")
    refused = CredentialError("the Batch account key was refused")
    batch.fail("task_counts", refused)
    tracker.poll_once()
    assert {task_id: done.one(task_id).error for task_id in ("t1", "t2")} == {
        "t1": refused,
        "t2": refused,
    }


def test_an_unexpected_error_fails_every_pending_task(
    tracker: Tracker, batch: FakeBatch, done: Done
) -> None:
    watch(tracker, batch, done, "t1")
    bug = RuntimeError("a bug")
    batch.fail("completed_tasks", bug)
    tracker.poll_once()
    assert done.one("t1").error is bug


# ----------------------------------------------------------------------------- callbacks


def test_deliver_fires_in_the_polling_thread_not_the_caller(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done
) -> None:
    watch(tracker, batch, done, "t1", "t2")
    error = ServiceError("could not add the task")
    other = threading.Thread(target=tracker.deliver, args=("t1", error))
    other.start()
    other.join()
    assert done.got == {}  # queued, not fired, in the other thread
    succeed(batch, blobs, "t1")  # completed too: still delivered once, as the error
    tracker.poll_once()
    assert done.one("t1").error is error
    assert done.threads == {threading.get_ident()}
    assert tracker.pending() == ["t2"]


def test_deliver_fires_even_when_nothing_else_is_watched(
    tracker: Tracker, batch: FakeBatch, done: Done
) -> None:
    watch(tracker, batch, done, "t1")
    tracker.deliver("t1", ServiceError("refused"))
    tracker.deliver("never-watched", ServiceError("ignored"))
    tracker.poll_once()
    assert list(done.got) == ["t1"]
    assert sum(batch.calls.values()) == 0


def test_a_raising_callback_does_not_stop_the_others(
    tracker: Tracker,
    batch: FakeBatch,
    blobs: FakeBlobs,
    done: Done,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(_: TaskDone) -> None:
        raise RuntimeError("callback bug")

    tracker.watch("bad", explode)
    batch.add_task(JOB, "bad")
    watch(tracker, batch, done, "t1", "t2")
    for task_id in ("bad", "t1", "t2"):
        succeed(batch, blobs, task_id)
    with caplog.at_level(logging.ERROR, logger=tracker_module.__name__):
        tracker.poll_once()
    assert set(done.got) == {"t1", "t2"}
    assert tracker.pending() == []
    assert "the completion callback of task bad raised" in caplog.text


def test_callbacks_run_one_at_a_time_in_one_thread(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done
) -> None:
    ids = [f"t{i}" for i in range(40)]
    watch(tracker, batch, done, *ids)
    for task_id in ids:
        succeed(batch, blobs, task_id)
    tracker.poll_once()
    assert set(done.got) == set(ids)
    assert done.threads == {threading.get_ident()}
    assert not done.overlapped


def test_the_started_thread_fires_every_callback_from_itself(
    batch: FakeBatch, blobs: FakeBlobs, clock: FakeClock
) -> None:
    """The same rules through the real loop: ``start()`` polls in a thread of its own."""
    seen: list[bool] = []
    finished = threading.Event()
    t = Tracker(batch, JOB, fetch=blobs, poll_interval=0.001, clock=clock)

    def on_done(_: TaskDone) -> None:
        seen.append(t.in_tracker_thread)
        if len(seen) == 10:
            finished.set()

    try:
        for i in range(10):
            t.watch(f"t{i}", on_done)
            succeed(batch, blobs, f"t{i}")
        t.start()
        assert finished.wait(10), "the tracker thread did not resolve every task"
    finally:
        t.stop()
    assert seen == [True] * 10


def test_no_callback_fires_after_stop(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done
) -> None:
    watch(tracker, batch, done, "t1", "t2")
    blobs.put("t1", b"one")
    batch.complete(JOB, "t1")
    tracker.stop()
    tracker.deliver("t2", ServiceError("late"))
    tracker.poll_once()
    assert done.got == {}

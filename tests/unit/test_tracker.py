"""The tracker's rules, one poll at a time, against an in-memory Batch and a hand-moved clock.

Each test calls ``poll_once()`` itself, so what happens between two polls is decided by the
test and nothing depends on thread timing: a poll returns only after every download it
started has finished and every callback it owes has fired.
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from joblib_azurebatch import tracker as tracker_module
from joblib_azurebatch.batch import TaskOutcome
from joblib_azurebatch.errors import CredentialError, ServiceError, TaskFailedError
from joblib_azurebatch.liveness import ClientRecord
from joblib_azurebatch.tracker import (
    BURST,
    DEFAULT_RETRY_BUDGET,
    EAGER_INTERVALS,
    RELIST_EVERY,
    RESULT_ATTEMPTS,
    RESULT_RETRY_DELAY,
    TaskDone,
    Tracker,
)
from joblib_azurebatch.watch import Watchdog
from tests.fakes import EPOCH, FakeBatch, FakeBlobs, FakeClock

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
    # The rules of when and how far back to list, without the spells of short waits (those
    # have tests of their own below).
    t = Tracker(
        batch,
        JOB,
        fetch=blobs,
        poll_interval=1.0,
        overlap=OVERLAP.total_seconds(),
        clock=clock,
        eager_for=0,
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


def at(seconds: float) -> dt.datetime:
    """The service time of the fake clock's ``seconds``."""
    return EPOCH + dt.timedelta(seconds=seconds)


def test_counts_ahead_of_two_listings_in_a_row_look_back_to_the_oldest_pending_task(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    """A completion the windows missed (its listing lagged more than the overlap) is found
    by one wider look, which reaches back to the creation of the oldest pending task, not to
    the start of the job."""
    start = clock.monotonic()
    watch(tracker, batch, done, "c")
    succeed(batch, blobs, "c")
    tracker.poll_once()
    clock.advance(1)
    watch(tracker, batch, done, "late", "d")  # created now: the oldest pending tasks
    created = clock.monotonic()
    succeed(batch, blobs, "late", hidden_listings=1)  # completed, listed late
    clock.advance(7)
    succeed(batch, blobs, "d")
    tracker.poll_once()  # the window holds "late", but it is hidden
    # From c less the overlap, or from the floor (the oldest pending task's creation, less
    # the overlap) where that is later, as here.
    assert batch.listings[-1] == max(at(start), at(created)) - OVERLAP
    assert "late" not in done.got

    clock.advance(1)
    succeed(batch, blobs, "e_unwatched", at=at(clock.monotonic()))  # moves the counts on
    tracker.poll_once()  # counts moved: an incremental listing, from d less the overlap
    assert batch.listings[-1] == at(created + 7) - OVERLAP
    assert "late" not in done.got  # "late" (at created) is before that window

    clock.advance(1)
    tracker.poll_once()  # counts still ahead of what the last listing showed: the wider look
    assert batch.listings[-1] == at(created) - OVERLAP  # the floor, never None
    assert done.one("late").data == b"result of late"
    assert len(batch.listings) == 4


def test_completions_that_the_wider_look_cannot_explain_do_not_bring_it_back(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    """A completed task that is no pending task's (one whose submission failed here, then
    ran) keeps the counts ahead of what the windows show: one wider look, then quiet."""
    watch(tracker, batch, done, "a", "b")
    succeed(batch, blobs, "a")
    tracker.poll_once()
    clock.advance(1)
    batch.complete(JOB, "stranger", at=at(clock.monotonic() - 60))  # before any window
    for _ in range(2):
        tracker.poll_once()
        clock.advance(1)
    listings = len(batch.listings)
    assert batch.listings[-1] is not None
    for _ in range(10):  # RELIST_EVERY is not reached: no listing at all
        tracker.poll_once()
        clock.advance(1)
    assert len(batch.listings) == listings
    succeed(batch, blobs, "b")  # a real completion is still news
    tracker.poll_once()
    assert done.one("b").data == b"result of b"


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
    assert batch.listings[-1] is None  # nothing completed was ever seen: nothing to skip
    assert done.one("t1").data == b"result of t1"


def test_the_safety_listing_is_incremental_once_completions_were_seen(
    tracker: Tracker, batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    """It reaches back RELIST_EVERY seconds more than the overlap, never to the job's start
    (a 100,000-task job would list 100,000 tasks twice a minute), and never before the
    creation of the oldest pending task."""
    start = clock.monotonic()
    watch(tracker, batch, done, "straggler", "a")
    clock.advance(100)
    succeed(batch, blobs, "a")
    tracker.poll_once()
    newest = clock.monotonic()
    clock.advance(10)
    watch(tracker, batch, done, "b")
    batch.freeze_counts(JOB)
    clock.advance(10)
    succeed(batch, blobs, "b")
    clock.advance(RELIST_EVERY + 0.5)
    tracker.poll_once()
    since = batch.listings[-1]
    assert since == at(newest - RELIST_EVERY) - OVERLAP
    assert since > at(start)  # the straggler is older: the window does not reach it
    assert done.one("b").data == b"result of b"

    # With only young tasks pending, the floor (their creation) is the nearer bound.
    batch.unfreeze_counts(JOB)
    succeed(batch, blobs, "straggler")
    clock.advance(1)
    tracker.poll_once()
    assert done.one("straggler").data == b"result of straggler"
    watch(tracker, batch, done, "young")
    batch.freeze_counts(JOB)
    created = clock.monotonic()
    clock.advance(RELIST_EVERY + 1)
    succeed(batch, blobs, "young")
    clock.advance(RELIST_EVERY + 1)
    tracker.poll_once()
    assert batch.listings[-1] == at(created) - OVERLAP
    assert done.one("young").data == b"result of young"


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
    tracker = Tracker(batch, JOB, fetch=fetch, poll_interval=1.0, clock=clock, eager_for=0)
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
    tracker = Tracker(batch, JOB, fetch=endless, poll_interval=1.0, clock=clock, eager_for=0)
    watch(tracker, batch, done, "t1")
    batch.complete(JOB, "t1")
    tracker.poll_once()
    assert isinstance(done.one("t1").error, ServiceError)
    assert sum(clock.sleeps) <= tracker_module.DOWNLOAD_BUDGET
    tracker.stop()

    refused = Flaky(10**6, CredentialError("403"))
    other = Tracker(batch, JOB, fetch=refused, poll_interval=1.0, clock=clock, eager_for=0)
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
    t = Tracker(
        batch, JOB, fetch=blobs, poll_interval=1.0, clock=clock, retry_budget=10.0, eager_for=0
    )
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
    # (The fake clock stands still here: no spell of short waits, which go by its time.)
    t = Tracker(batch, JOB, fetch=blobs, poll_interval=0.001, clock=clock, eager_for=0)

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


# ------------------------------------------------------------------- requests and reaction


class TimedBatch(FakeBatch):
    """A FakeBatch that records when each request was made."""

    #: What an operation costs in requests on the real service (``pool_status`` reads the
    #: pool and lists its nodes).
    WEIGHT: ClassVar[dict[str, int]] = {"pool_status": 2}

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.times: list[float] = []

    def _enter(self, operation: str) -> None:
        self.times.extend([self.clock.monotonic()] * self.WEIGHT.get(operation, 1))
        super()._enter(operation)


def simulate(
    tracker: Tracker,
    clock: FakeClock,
    *,
    until: float,
    step: Callable[[float], None],
) -> None:
    """The tracker's own loop on the fake clock: poll, then wait what it asks for."""
    while clock.monotonic() < until:
        step(clock.monotonic())
        tracker.poll_once()
        clock.advance(max(tracker.next_wait(), 1e-3))


def test_a_long_run_of_many_tasks_stays_under_one_request_a_second(clock: FakeClock) -> None:
    """An hour of 3,000 tasks, 200 pending at a time, with the run's watchdog looking at the
    job and its pool and beating its heartbeat, at the default 2 s interval: under one Batch
    request a second over every minute, and no listing ever asks for every completed task
    once results were delivered, only for those since the oldest pending task was created."""
    batch = TimedBatch(clock)
    batch.add_pool("pool")
    batch.add_job(JOB, "pool")
    blobs = FakeBlobs()
    dog = Watchdog(
        batch, job_id=JOB, pool_id="pool", clock=clock, record=ClientRecord.of_this_process()
    )
    tracker = Tracker(batch, JOB, fetch=blobs, poll_interval=2.0, clock=clock, watchdog=dog)
    rng = random.Random(7)
    ends: dict[str, float] = {}  # task id -> when it completes
    created: dict[str, dt.datetime] = {}
    delivered: list[str] = []
    total, pending_at_once = 3000, 200
    next_id = iter(range(total))

    def add_one() -> None:
        task_id = f"t{next(next_id):05d}"
        tracker.watch(task_id, lambda d: delivered.append(d.task_id))
        batch.add_task(JOB, task_id)
        created[task_id] = clock.now()
        ends[task_id] = clock.monotonic() + rng.uniform(5, 400)
        blobs.put(task_id, b"x")

    for _ in range(pending_at_once):
        add_one()
    real_listing = batch.completed_tasks
    floors: list[tuple[dt.datetime | None, dt.datetime]] = []

    def listing(job_id: str, *, since: dt.datetime | None = None) -> list[TaskOutcome]:
        pending = tracker.pending()
        if delivered and pending:
            floors.append((since, min(created[t] for t in pending)))
        return real_listing(job_id, since=since)

    batch.completed_tasks = listing  # type: ignore[method-assign]

    def step(now: float) -> None:
        for task_id, end in list(ends.items()):
            if end <= now:
                del ends[task_id]
                batch.complete(JOB, task_id, at=EPOCH + dt.timedelta(seconds=end))
        while len(tracker.pending()) < pending_at_once and len(created) < total:
            add_one()

    start = clock.monotonic()
    simulate(tracker, clock, until=start + 3600, step=step)
    simulate(tracker, clock, until=clock.monotonic() + 600, step=step)  # the tail
    tracker.stop()
    assert sorted(delivered) == sorted(created)  # every task, once
    times = batch.times
    span = times[-1] - start
    assert len(times) / span <= 1.0
    # Every minute-long window, not only the average.
    worst = max(bisect.bisect_left(times, t + 60) - i for i, t in enumerate(times))
    assert worst <= 60
    assert floors  # listings happened while tasks were pending
    for since, oldest in floors:
        assert since is not None  # never every completed task once results came
        assert since >= oldest - dt.timedelta(seconds=6)  # the overlap (3 x 2 s)


def test_early_in_a_run_a_finished_task_is_seen_well_before_the_poll_interval(
    batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    """Four calls of half a second: each is delivered within a quarter of a second of its
    end, not at the next 2 s poll, on the request budget."""
    t = Tracker(batch, JOB, fetch=blobs, poll_interval=2.0, clock=clock)
    start = clock.monotonic()
    ends = {"t1": 0.5, "t2": 0.55, "t3": 0.6, "t4": 0.7}
    delivered_at: dict[str, float] = {}

    def on_done(d: TaskDone) -> None:
        delivered_at[d.task_id] = clock.monotonic()

    for task_id in ends:
        t.watch(task_id, on_done)
        batch.add_task(JOB, task_id)

    def step(now: float) -> None:
        for task_id, end in ends.items():
            if start + end <= now and batch.task(JOB, task_id).state != "completed":
                succeed(batch, blobs, task_id, at=at(start + end))

    simulate(t, clock, until=start + 2.0, step=step)
    assert set(delivered_at) == set(ends)
    assert max(delivered_at[k] - (start + end) for k, end in ends.items()) <= 0.25
    assert len(batch.listings) + batch.calls["task_counts"] <= BURST + 2 * 1.5 / 2.0 + 1
    t.stop()


def test_the_short_waits_end_after_a_spell_and_come_back_for_the_last_few_tasks(
    batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    t = Tracker(batch, JOB, fetch=blobs, poll_interval=2.0, clock=clock)
    ids = [f"t{i}" for i in range(8)]
    watch(t, batch, done, *ids)
    assert t.eager()
    assert t.next_wait() == 0.25  # an eighth of the interval at first ...
    clock.advance(2.0)
    assert t.next_wait() == pytest.approx(0.8)  # ... growing with the spell's age
    clock.advance(EAGER_INTERVALS * 2.0 - 2.0)
    assert not t.eager()
    assert t.next_wait() == 2.0
    for i, task_id in enumerate(ids[:6]):
        succeed(batch, blobs, task_id)
        t.poll_once()
        assert list(done.got) == ids[: i + 1]
        # Two left, a quarter of the most pending: the next may end any moment.
        assert t.eager() == (i == 5)
        assert t.next_wait() == (max(0.25, t.budget.wait_time()) if i == 5 else 2.0)
        clock.advance(3.0)
    t.stop()


def test_no_poll_goes_over_the_request_budget(
    batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    """However often the thread is woken, polls wait for the budget: a burst, then the rate."""
    t = Tracker(batch, JOB, fetch=blobs, poll_interval=2.0, clock=clock)
    watch(t, batch, done, "t1")
    t.poll_once()
    assert sum(batch.calls.values()) == 0  # the task was just added: too soon to look
    clock.advance(0.25)
    for _ in range(50):
        t.poll_once()  # no time passes: woken again and again
    assert sum(batch.calls.values()) <= BURST + 1  # the last poll's listing may overdraw
    assert t.next_wait() > 0.25
    clock.advance(100)
    for _ in range(400):
        t.poll_once()
        clock.advance(0.25)
    assert sum(batch.calls.values()) <= 2 * BURST + 1.5 / 2.0 * 200


def test_a_listing_costs_a_request_per_page(
    batch: FakeBatch, blobs: FakeBlobs, done: Done, clock: FakeClock
) -> None:
    t = Tracker(batch, JOB, fetch=blobs, poll_interval=2.0, clock=clock, eager_for=0)
    ids = [f"t{i:04d}" for i in range(3500)]
    watch(t, batch, done, *ids)
    for task_id in ids:
        succeed(batch, blobs, task_id)
    t.poll_once()
    assert len(done.got) == 3500
    assert t.budget.charged == 1 + 4  # the counts, then four pages of 1,000
    assert not t.budget.ready()  # the burst is spent: the next poll waits
    assert t.budget.wait_time() == pytest.approx(1 / (1.5 / 2.0))  # a token at 0.75/s
    t.stop()


def test_results_are_downloaded_in_a_bounded_window_and_let_go_after_their_callback(
    batch: FakeBatch, clock: FakeClock
) -> None:
    """Forty results, callbacks slower than downloads: at most ``window`` results are in
    hand at once, and when a callback runs, no earlier result is still held."""
    window = 4
    lock = threading.Lock()
    in_hand = most = 0

    def fetch(task_id: str) -> bytes:
        nonlocal in_hand, most
        with lock:
            in_hand += 1
            most = max(most, in_hand)
        return f"result of {task_id}".encode()

    refs: list[weakref.ref[TaskDone]] = []
    alive: list[int] = []

    def on_done(d: TaskDone) -> None:
        nonlocal in_hand
        alive.append(sum(1 for r in refs if r() is not None))
        refs.append(weakref.ref(d))
        time.sleep(0.002)  # slower than a download
        with lock:
            in_hand -= 1

    t = Tracker(
        batch,
        JOB,
        fetch=fetch,
        poll_interval=1.0,
        clock=clock,
        download_workers=2,
        window=window,
        eager_for=0,
    )
    ids = [f"t{i:02d}" for i in range(40)]
    for task_id in ids:
        t.watch(task_id, on_done)
        batch.complete(JOB, task_id)
    t.poll_once()
    t.stop()
    assert len(refs) == 40
    assert most <= window
    assert alive == [0] * 40
    assert all(r() is None for r in refs)

"""The one thread that turns Batch task states into finished results.

Each run (one Batch job) has one :class:`Tracker`. Its thread polls the job's task counts,
which is one cheap request, and only when more tasks have completed than it has seen does
it list the newly completed ones (``stateTransitionTime`` at or after the last one seen,
minus a small overlap for listings that lag, de-duplicated by task id). For each finished
task it downloads the result blob (a few downloads run in parallel, and at most ``window``
results are in flight or waiting for their callback at once) and then calls the task's
``on_done`` from this one thread; nothing keeps a result once its callback ran.

Every listing is incremental, by state and time, never "every completed task" once one
was seen. The tracker knows where the service's clock stands against its own (each listing
shows completions no later than the moment it returned), so it can name the service time
before which no pending task can have completed: the creation of the oldest pending task
(a task is watched before it is added), less the overlap. That is the *floor*.

- Counts ahead of two listings in a row mean a completion fell outside the overlap window
  (a listing lagged more): one wider look, from the floor. What even that look cannot show
  is not a pending task's completion; it is accepted, so that it does not bring the look back.
- The counts are eventually consistent and may lag the listing: after ``RELIST_EVERY``
  seconds without a listing, a safety listing reaches back ``RELIST_EVERY`` seconds more
  than the overlap (to the floor, while a gap is accepted), never before the floor.

Requests are bounded whatever the number of tasks: they go through a token bucket of
``REQUESTS_PER_INTERVAL`` requests per ``poll_interval`` on average (0.75 a second at the
default 2 s, leaving room for the watchdog's few requests: together under one a second) and
``BURST`` at once; every page of a listing and every stderr read is one request. Within
that budget the tracker looks often while tasks are expected to end soon: in the first
``EAGER_INTERVALS`` poll intervals of the run, and as long after each completion while only
the last few tasks (a quarter of the most ever pending) are left. Then each look is a
listing (the counts are read once per spell), and the waits between looks start at
``poll_interval / 8`` and grow with the spell's age (``EAGER_AGE_SHARE`` of it), so that a
task is seen soon after it ended and the budget lasts the whole spell. Otherwise the tracker
reads the counts every ``poll_interval``.

One thread matters: joblib 1.6 returns a silently truncated list when completion callbacks
race each other. It also matters that a result is fully downloaded before its callback
fires, because joblib may terminate the backend as soon as the last callback ran.

Nothing is dropped or duplicated: a preempted or requeued task is simply not completed
yet; a task id is delivered at most once; a completed task is delivered whatever its
state, as a result, a :class:`~joblib_azurebatch.errors.TaskFailedError` (non-zero exit,
failure info, or no result blob), or the service error that stopped the polling.

Between polls the thread also asks the run's watchdog (:mod:`joblib_azurebatch.watch`)
whether the job or its pool went away; if so, every pending task fails with the error it
gives, instead of waiting for tasks that can never run.

The thread only calls :meth:`Tracker.poll_once` between waits of :meth:`Tracker.next_wait`
seconds, and every reading of the time and every pause inside it goes through a
:class:`~joblib_azurebatch.service.Clock`, so a test drives the same rules step by step,
against a fake service and a clock it moves itself, without threads or waiting.
"""

from __future__ import annotations

import _thread
import collections
import datetime as _dt
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

from . import shutdown
from .batch import TaskOutcome
from .errors import AzureBatchError, CredentialError, TaskFailedError
from .service import BatchApi, Clock
from .worker import EXIT_URLS_EXPIRED


class Watch(Protocol):
    """What the tracker asks between polls (a :class:`~joblib_azurebatch.watch.Watchdog`):
    an error once the run is lost, which fails every pending task."""

    def __call__(self, *, pending: bool) -> BaseException | None: ...

    def look_now(self) -> BaseException | None:
        """Look at once (a task was ended by someone: was it the whole job?)."""
        ...


__all__ = ["RequestBudget", "TaskDone", "Tracker", "Watch"]

_log = logging.getLogger(__name__)

#: Listings reach back this far before the newest completion seen, because the service
#: may show a task that completed at time T after one that completed later.
DEFAULT_OVERLAP = 5.0
#: List completed tasks at least this often even when the counts did not move (the counts
#: are eventually consistent and may lag the listing).
RELIST_EVERY = 30.0
#: The polling's requests per ``poll_interval`` on average (0.75 a second at the default
#: 2 s: with the watchdog's three requests per 30 s and a heartbeat a minute, the run stays
#: under one request a second), and how many may go at once after a quiet spell.
REQUESTS_PER_INTERVAL = 1.5
BURST = 5
#: A listing returns at most this many tasks per request (page).
LISTING_PAGE = 1000
#: Short waits while tasks are expected to end soon: for this many poll intervals after the
#: first task, and after each completion among the last few tasks ...
EAGER_INTERVALS = 5.0
#: ... "the last few" being at most this share of the most tasks ever pending at once ...
TAIL_SHARE = 0.25
#: ... the waits growing with the spell's age (this share of it), from this share of
#: ``poll_interval`` (never under ``EAGER_MIN_WAIT``) up to ``poll_interval``: a task seen
#: at most 40% of its age late, and the budget lasts the whole spell ...
EAGER_AGE_SHARE = 0.4
EAGER_WAIT_SHARE = 1 / 8
EAGER_MIN_WAIT = 0.05
#: ... and the counts read only every ``EAGER_INTERVALS`` poll intervals meanwhile (a
#: listing each time tells more, for one request).
#: Seconds polls may keep failing (each already retried by the SDK) before pending tasks
#: fail, unless the tracker is given another budget (``BatchConfig.retry_budget``).
DEFAULT_RETRY_BUDGET = 600.0
#: A result blob missing right after its task completed is looked for again this often.
RESULT_ATTEMPTS = 3
RESULT_RETRY_DELAY = 0.5
#: Seconds a result download is retried through storage errors before its task fails.
DOWNLOAD_BUDGET = 300.0
STDERR_TAIL_BYTES = 4096


@dataclass(frozen=True, kw_only=True)
class TaskDone:
    """What ``on_done`` receives: the result bytes, or the error that replaces them."""

    task_id: str
    outcome: TaskOutcome | None = None
    data: bytes | None = None
    error: BaseException | None = None
    #: The task was replaced by a new one (its URLs had expired): nothing to deliver.
    replaced: bool = False


OnDone = Callable[[TaskDone], None]


class SystemClock:
    """The process's monotonic clock and a real sleep: what a tracker uses unless told."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class RequestBudget:
    """A token bucket: ``rate`` requests a second on average, at most ``burst`` at once.

    Every request is charged after it was decided (a listing's pages are only known once it
    returned), so the balance may go below zero; no new poll starts until it is back at one
    token. Over any span of ``t`` seconds at most ``burst + rate * t`` requests start, plus
    the pages of the one listing that overdrew. Safe to charge from several threads.
    """

    def __init__(self, *, rate: float, burst: float, clock: Clock) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a request budget needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock.monotonic()
        self._lock = threading.Lock()
        #: Requests charged, for tests and benchmarks.
        self.charged = 0

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def ready(self) -> bool:
        """Whether a request may start now."""
        with self._lock:
            self._refill()
            return self._tokens >= 1

    def charge(self, requests: int = 1) -> None:
        with self._lock:
            self._refill()
            self._tokens -= requests
            self.charged += requests

    def wait_time(self) -> float:
        """Seconds until a request may start."""
        with self._lock:
            self._refill()
            return max(0.0, (1 - self._tokens) / self.rate)


class Tracker:
    """Polls one job and resolves the tasks it was asked to watch.

    ``fetch(task_id)`` returns the task's result blob and raises ``FileNotFoundError`` when
    there is none; the tracker never interprets the bytes. ``service`` is anything with the
    Batch operations of :class:`~joblib_azurebatch.service.BatchApi` and ``clock`` anything
    with ``monotonic()`` and ``sleep()``, so that tests can hand in fakes of both.

    ``rate`` and ``burst`` size the request budget (by default ``REQUESTS_PER_INTERVAL`` per
    ``poll_interval`` and ``BURST``), ``eager_for`` the spells of short waits (by default
    ``EAGER_INTERVALS`` poll intervals; 0 turns them off), ``window`` how many results may
    be downloading or waiting for their callback at once (by default twice the downloads).
    """

    def __init__(
        self,
        service: BatchApi,
        job_id: str,
        *,
        fetch: Callable[[str], bytes],
        poll_interval: float,
        max_task_retries: int = 3,
        overlap: float = DEFAULT_OVERLAP,
        download_workers: int = 8,
        clock: Clock | None = None,
        retry_budget: float = DEFAULT_RETRY_BUDGET,
        watchdog: Watch | None = None,
        replace: Callable[[str], bool] | None = None,
        rate: float | None = None,
        burst: int = BURST,
        eager_for: float | None = None,
        window: int | None = None,
    ) -> None:
        self._service = service
        self._watchdog = watchdog
        #: ``replace(task_id)`` submits a task again under a new id with fresh URLs, and
        #: says whether it did; asked for a task whose worker found its URLs expired.
        self._replace = replace
        self._retry_budget = retry_budget
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._job_id = job_id
        self._fetch = fetch
        self._poll_interval = poll_interval
        self._max_task_retries = max_task_retries
        self._overlap = _dt.timedelta(seconds=max(overlap, 3 * poll_interval))
        #: Every Batch request of the polling is charged here (not the watchdog's).
        self.budget = RequestBudget(
            rate=rate if rate is not None else REQUESTS_PER_INTERVAL / poll_interval,
            burst=burst,
            clock=self._clock,
        )
        self._eager_for = eager_for if eager_for is not None else EAGER_INTERVALS * poll_interval
        self._eager_wait = min(poll_interval, max(EAGER_MIN_WAIT, poll_interval * EAGER_WAIT_SHARE))
        self._eager_until = -math.inf
        self._eager_since = -math.inf  # when the spell began
        self._window = window if window is not None else 2 * download_workers
        self._lock = threading.Lock()
        self._watched: dict[str, OnDone] = {}
        #: Clock time each pending task was watched, oldest first (the same keys).
        self._watched_at: dict[str, float] = {}
        self._peak = 0  # the most tasks ever pending at once
        self._delivered: set[str] = set()
        self._seen_completed: set[str] = set()
        self._newest: _dt.datetime | None = None
        #: The service's time at this clock's zero, never later than the truth: each
        #: listing shows completions no later than the moment it returned.
        self._anchor: _dt.datetime | None = None
        # Polling state carried from one poll to the next.
        self._failing_since: float | None = None  # clock time of the first failed poll in a row
        self._last_listing: float | None = None  # clock time; None lists at the first poll
        self._counts_due = -math.inf  # clock time at which the counts are read again
        self._listed_count = -1
        #: Completions the counts show that a wider look could not find: not a pending
        #: task's, so they do not count as news.
        self._unexplained = 0
        self._inbox: queue.SimpleQueue[TaskDone] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._downloads = ThreadPoolExecutor(
            max_workers=download_workers,
            thread_name_prefix=f"azurebatch-fetch-{job_id}",
            initializer=shutdown.hold_signals,
        )
        self._thread = threading.Thread(
            target=self._run, name=f"azurebatch-tracker-{job_id}", daemon=True
        )
        self._started = False
        #: Requests made, for tests and benchmarks.
        self.count_polls = 0
        self.list_polls = 0

    # ---------------------------------------------------------------- public

    def start(self) -> None:
        if not self._started:
            self._started = True
            shutdown.start(self._thread)

    def watch(self, task_id: str, on_done: OnDone) -> None:
        """Resolve ``task_id`` through ``on_done`` once it completes. Call before adding it:
        the time it is watched is taken as no later than the task's creation."""
        now = self._clock.monotonic()
        with self._lock:
            if task_id in self._watched or task_id in self._delivered:
                raise ValueError(f"task {task_id} is already watched")
            idle = not self._watched
            self._watched[task_id] = on_done
            self._watched_at[task_id] = now
            self._peak = max(self._peak, len(self._watched))
            if self._eager_until == -math.inf:  # the run's first task: look often for a while
                self._eager_since, self._eager_until = now, now + self._eager_for
                self._counts_due = now + self._eager_for
        if idle:  # the thread may be in a long wait with nothing to do: start polling now
            self._wake.set()

    def deliver(self, task_id: str, error: BaseException) -> None:
        """Resolve a watched task with ``error`` from the tracker's thread (never this one).

        For failures found before the task reached Batch (an upload or submission error),
        so that every callback still comes from the one thread.
        """
        self._inbox.put(TaskDone(task_id=task_id, error=error))
        self._wake.set()

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._watched)

    @property
    def in_tracker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self, *, wait: float = 10.0) -> None:
        """Stop polling; callbacks not yet fired never fire."""
        self._stopping.set()
        self._wake.set()
        if self._started and not self.in_tracker_thread:
            self._thread.join(wait)
        self._downloads.shutdown(wait=False, cancel_futures=True)

    def eager(self) -> bool:
        """Whether tasks are expected to end soon (short waits, a listing each time)."""
        return self._clock.monotonic() < self._eager_until

    def next_wait(self) -> float:
        """Seconds the thread waits before the next poll: while :meth:`eager`, a wait that
        grows with the spell's age (``poll_interval / 8`` at first), ``poll_interval``
        otherwise, and never before the request budget allows a request."""
        now = self._clock.monotonic()
        wait = self._poll_interval
        if now < self._eager_until:
            age = now - self._eager_since
            wait = min(wait, max(self._eager_wait, EAGER_AGE_SHARE * age))
        return max(wait, self.budget.wait_time())

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.poll_once()
            self._sleep()

    def poll_once(self) -> None:
        """One turn of the tracker's loop: fire what :meth:`deliver` queued, then poll.

        Nothing is asked while nothing is watched, nor while the request budget is spent.
        The counts are read at every turn (once per spell while :meth:`eager`); the
        completed tasks are listed when the counts show more completions than seen, after
        ``RELIST_EVERY`` seconds without a listing, and, while eager, at every other turn.
        Callbacks fire in the calling thread, which is the tracker's own thread once
        :meth:`start` ran (tests call this directly instead).
        """
        self._drain_inbox()
        pending = bool(self.pending())
        if self._watchdog is not None:
            try:
                lost = self._watchdog(pending=pending)
            except Exception as e:  # a refused credential, or a bug: never a silent hang
                _log.exception("watching the job %s failed", self._job_id)
                lost = e
            if lost is not None:
                # Tasks that finished before the job or pool went have their results in
                # blobs: hand those over first, then fail only what can never finish.
                try:
                    self._list_and_resolve(self._floor())
                except Exception as e:
                    _log.debug("the last listing of the job %s failed: %s", self._job_id, e)
                self._fail_all(lost)
                return
        if not pending or not self.budget.ready():
            return
        now = self._clock.monotonic()
        if self.eager() and now - self._eager_since < self._eager_wait:
            return  # the spell just began (a task was just added, or just seen): too soon
        try:
            if self.eager() and now < self._counts_due:
                self._list_and_resolve(self._incremental_since())
            else:
                self._poll_counts(now)
            self._failing_since = None
        except CredentialError as e:
            self._fail_all(e)
        except AzureBatchError as e:
            # A throttled or unreachable service costs time, not the run: the tasks keep
            # running and their results wait in blobs, so only an outage that outlasts the
            # budget fails what is pending.
            now = self._clock.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            failing = now - self._failing_since
            _log.warning(
                "polling the job %s failed (failing for %.0f s of a %g s budget): %s",
                self._job_id,
                failing,
                self._retry_budget,
                e,
            )
            if failing >= self._retry_budget:
                self._fail_all(e)
                self._failing_since = None
        except Exception as e:  # a bug must not leave the caller waiting forever
            _log.exception("the tracker of the job %s failed", self._job_id)
            self._fail_all(e)

    def _poll_counts(self, now: float) -> None:
        self.budget.charge()
        self._counts_due = now + max(self._poll_interval, self._eager_for)
        counts = self._service.task_counts(self._job_id)
        self.count_polls += 1
        seen = len(self._seen_completed) + self._unexplained
        stale = self._last_listing is None or now - self._last_listing > RELIST_EVERY
        if counts.completed > seen:
            # Counts ahead of two listings in a row: a completion fell outside the overlap
            # window; look back once to the floor, where every pending task's completion is.
            wider = self._listed_count == counts.completed
            self._list_and_resolve(self._floor() if wider else self._incremental_since())
            self._listed_count = counts.completed
            if wider:
                self._unexplained = max(0, counts.completed - len(self._seen_completed))
        elif stale:
            self._list_and_resolve(self._safety_since())
        # Completions that showed up since they were accepted as unexplained are explained.
        self._unexplained = min(
            self._unexplained, max(0, counts.completed - len(self._seen_completed))
        )

    def _sleep(self) -> None:
        self._wake.wait(self.next_wait())
        self._wake.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                done = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._fire(done)

    # ---------------------------------------------------------------- how far back to list

    def _floor(self) -> _dt.datetime | None:
        """The service time before which no pending task can have completed (the creation
        of the oldest pending task, less the overlap); None before any completion was seen
        (the listing is then of every completed task, which are few or none)."""
        if self._anchor is None:
            return None
        with self._lock:
            oldest = next(iter(self._watched_at.values()), None)
        if oldest is None:
            return None
        return self._anchor + _dt.timedelta(seconds=oldest) - self._overlap

    def _incremental_since(self) -> _dt.datetime | None:
        """The newest completion seen less the overlap, and never before the floor."""
        if self._newest is None:
            return None
        since = self._newest - self._overlap
        floor = self._floor()
        return since if floor is None else max(since, floor)

    def _safety_since(self) -> _dt.datetime | None:
        """``RELIST_EVERY`` seconds more than the overlap (the floor while a gap stands)."""
        floor = self._floor()
        if self._newest is None or self._unexplained > 0:
            return floor
        since = self._newest - _dt.timedelta(seconds=RELIST_EVERY) - self._overlap
        return since if floor is None else max(since, floor)

    # ---------------------------------------------------------------- listing and delivering

    def _list_and_resolve(self, since: _dt.datetime | None) -> None:
        self.budget.charge()  # before: a listing that fails costs a request too
        outcomes = self._service.completed_tasks(self._job_id, since=since)
        listed_at = self._clock.monotonic()
        self.budget.charge(max(0, math.ceil(len(outcomes) / LISTING_PAGE) - 1))
        self.list_polls += 1
        self._last_listing = listed_at
        fresh: collections.deque[TaskOutcome] = collections.deque()
        for outcome in outcomes:
            self._seen_completed.add(outcome.task_id)
            if self._newest is None or outcome.transition_time > self._newest:
                self._newest = outcome.transition_time
            with self._lock:
                if outcome.task_id in self._watched and outcome.task_id not in self._delivered:
                    fresh.append(outcome)
        if outcomes:
            latest = max(o.transition_time for o in outcomes)
            anchor = latest - _dt.timedelta(seconds=listed_at)
            if self._anchor is None or anchor > self._anchor:
                self._anchor = anchor
        del outcomes
        # At most ``window`` results downloading or waiting for their callback at once, and
        # none kept once its callback ran: memory does not grow with a listing's length.
        running: dict[Future[TaskDone], str] = {}
        while fresh or running:
            while fresh and len(running) < self._window:
                outcome = fresh.popleft()
                running[self._downloads.submit(self._collect, outcome)] = outcome.task_id
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            while finished:
                if self._stopping.is_set():
                    return
                fut = finished.pop()
                task_id = running.pop(fut)
                try:
                    done = fut.result()
                except BaseException as e:
                    done = TaskDone(task_id=task_id, error=e)
                del fut
                self._fire(done)
                del done
                self._drain_inbox()

    def _download(self, task_id: str) -> bytes | None:
        """The result blob, or None if it is still missing after ``RESULT_ATTEMPTS`` looks.

        A storage error that outlived the SDK's own retries (throttling, an outage) is
        retried for up to ``DOWNLOAD_BUDGET`` seconds: the result is safe in the blob, and
        failing the task for a passing outage would lose it. A refused credential is not
        retried: it will not pass.
        """
        missing = 0
        deadline = self._clock.monotonic() + DOWNLOAD_BUDGET
        delay = RESULT_RETRY_DELAY
        while True:
            try:
                return self._fetch(task_id)
            except FileNotFoundError:
                missing += 1
                if missing >= RESULT_ATTEMPTS:
                    return None
                self._clock.sleep(RESULT_RETRY_DELAY)
            except CredentialError:
                raise
            except AzureBatchError as e:
                if self._stopping.is_set() or self._clock.monotonic() + delay > deadline:
                    raise
                _log.warning(
                    "downloading the result of task %s failed, retrying in %.1f s: %s",
                    task_id,
                    delay,
                    e,
                )
                self._clock.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _collect(self, outcome: TaskOutcome) -> TaskDone:
        """Download a finished task's result, or explain why there is none (worker thread)."""
        if outcome.succeeded:
            data = self._download(outcome.task_id)
            if data is not None:
                return TaskDone(task_id=outcome.task_id, outcome=outcome, data=data)
            reason = "it exited with code 0 but uploaded no result"
        elif (
            outcome.exit_code == EXIT_URLS_EXPIRED
            and self._replace is not None
            and self._replace(outcome.task_id)
        ):
            return TaskDone(task_id=outcome.task_id, outcome=outcome, replaced=True)
        elif outcome.failure:
            if self._watchdog is not None and outcome.failure.startswith("TaskEnded"):
                # Ended by request, and not by this run: terminating the job from outside
                # ends its tasks so. Say that, rather than blame the task.
                lost = self._watchdog.look_now()
                if lost is not None:
                    return TaskDone(task_id=outcome.task_id, outcome=outcome, error=lost)
            reason = f"it failed with {outcome.failure}"
            if outcome.exit_code is not None:
                reason += f" (exit code {outcome.exit_code})"
        else:
            reason = f"it exited with code {outcome.exit_code}"
        self.budget.charge()
        tail = self._service.read_task_file(
            self._job_id, outcome.task_id, "stderr.txt", tail_bytes=STDERR_TAIL_BYTES
        )
        tries = outcome.retry_count + 1
        message = (
            f"the Batch task {outcome.task_id} of the job {self._job_id} failed outside "
            f"your code: {reason}, after {tries} attempt{'s' if tries != 1 else ''}"
            + (f" on the node {outcome.node_id}" if outcome.node_id else "")
            + ". Batch retries such a task up to max_task_retries times "
            f"({self._max_task_retries}); the node's files stay readable while the job exists "
            "(keep_job=True keeps it)."
            + _image_hint(tail, outcome.exit_code)
            + (
                " Its SAS URLs expired before it could run or finish, also after it was "
                "prepared again with fresh ones: raise sas_expiry= above the time a task "
                "waits in the queue plus its run time."
                if outcome.exit_code == EXIT_URLS_EXPIRED
                else ""
            )
        )
        return TaskDone(
            task_id=outcome.task_id,
            outcome=outcome,
            error=TaskFailedError(message, self._job_id, outcome.task_id, tail),
        )

    def _fail_all(self, error: BaseException) -> None:
        for task_id in self.pending():
            self._fire(TaskDone(task_id=task_id, error=error))

    def _fire(self, done: TaskDone) -> None:
        if self._stopping.is_set():
            # stop() promises that no callback fires after it: the run has cancelled what
            # was left, and an error here (the download pool already shut down) is not news.
            return
        with self._lock:
            on_done = self._watched.pop(done.task_id, None)
            if on_done is None:
                return
            self._watched_at.pop(done.task_id, None)
            self._delivered.add(done.task_id)
            tail = len(self._watched) <= max(1, int(self._peak * TAIL_SHARE))
        if tail:  # the last few tasks: the next may end any moment, look often again
            now = self._clock.monotonic()
            self._eager_since, self._eager_until = now, now + self._eager_for
        if done.replaced:
            return  # its calls are now the new task's, watched under its own id
        try:
            on_done(done)
        except KeyboardInterrupt:
            # The input generator of a Parallel call raised it while the callback was
            # pulling the next batch: hand it to the thread the user is waiting in.
            _thread.interrupt_main()
        except BaseException:
            _log.exception("the completion callback of task %s raised", done.task_id)


#: How bootstrap.py starts the one line that says why it failed.
_BOOTSTRAP_ERROR = "[joblib-azurebatch bootstrap] error:"


def _image_hint(stderr_tail: str, exit_code: int | None) -> str:
    """Name the usual cause when the task never reached the worker: an image without it.

    A custom image that was not built ``FROM`` the standard one (or a venv mapped as an
    image locally) fails every task the same way, and the stderr tail alone does not say
    what to change.
    """
    verdict = [ln for ln in stderr_tail.splitlines() if ln.startswith(_BOOTSTRAP_ERROR)]
    if verdict:
        # The default path: the node could not install the client's environment.
        return (
            f" The node could not install the environment: {verdict[-1][len(_BOOTSTRAP_ERROR) :]}"
            " Check packages=, requirements_file= and the index URLs in your BatchConfig "
            "(docs/troubleshooting.md, 'The start task failed')."
        )
    if (
        "No module named 'joblib_azurebatch'" in stderr_tail
        or "No module named joblib_azurebatch" in stderr_tail
    ):
        missing = "joblib-azurebatch is not installed in the task's image"
    elif exit_code == 127 or "python: not found" in stderr_tail:
        missing = "the task's image has no `python` on its PATH"
    else:
        return ""
    return (
        f" It looks like {missing}: build your image FROM the standard worker image "
        "(docker/README.md) or `pip install joblib-azurebatch` in it, and set "
        "BatchConfig(image=...)."
    )

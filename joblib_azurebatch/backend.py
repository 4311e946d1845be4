"""The joblib backend: ``Parallel`` batches become Azure Batch tasks.

Contract (joblib's modern one, as in its own ``_dask.py``): :meth:`AzureBatchBackend.submit`
returns a :class:`concurrent.futures.Future` and the callback joblib passes is always called
once the result (or the error that replaces it) is in hand, from one thread per run, never
concurrently (joblib 1.6 returns a silently truncated list when callbacks race).

Per-call state: joblib shares one backend instance between every ``Parallel`` under a
``parallel_config`` (a GridSearchCV inside a loop calls ``terminate()`` on the same instance
as the outer loop). So the instance keeps a :class:`JobRun` per ``Parallel`` call, found from
the ``parallel`` that joblib hands to ``configure`` and to every callback, and ends only the
runs whose ``Parallel`` has stopped running.

A run is one Batch job. On its first batch it checks the Batch credential (a read of the
pool), creates the blob container, the pool if absent (an existing pool is never changed,
only compared and warned about), waits for the first usable slot with a progress line,
and creates the job. With ``BatchConfig.progress`` (on by default on a terminal) the run
then draws one line of its own (:mod:`joblib_azurebatch.progress`) from the task counts
the tracker polls. Batches are prepared (pickled, uploaded) and added by a submitter
thread in ``create_task_collection`` chunks, so ``submit`` returns at once. A tracker thread
(:mod:`joblib_azurebatch.tracker`) resolves them. At the end the job is terminated (if
anything may still run) and deleted, its blobs deleted, and the pool deleted if this
process created it and ``keep_pool`` is false: also on Ctrl-C, on an exception in the
caller, on ``timeout=`` and at interpreter exit.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import queue
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from joblib.parallel import (
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
    ThreadingBackend,
)

from .batch import BatchService, PoolInfo, PoolSpec, TaskCounts, TaskSpec, pool_differences
from .bundle import Bundle
from .config import BatchConfig
from .errors import AzureBatchError, ConfigError, TaskFailedError
from .payload import (
    PayloadWriter,
    PreparedTask,
    RemoteTraceback,
    job_prefix,
    new_signing_key,
    read_result,
    result_blob,
)
from .progress import CallProgress, progress_enabled
from .storage import BlobStore
from .tracker import TaskDone, Tracker

__all__ = ["AzureBatchBackend", "BatchSizer", "JobRun", "PoolDifferenceWarning"]

_log = logging.getLogger(__name__)

#: What every task runs inside the worker image.
WORKER_COMMAND = "python -m joblib_azurebatch.worker"


class PoolDifferenceWarning(UserWarning):
    """An existing pool differs from the config; it is used as it is."""


# --------------------------------------------------------------------------- batch sizing


class BatchSizer:
    """How many calls to pack into one Batch task, learned from finished tasks.

    Batch takes seconds to schedule and start a task, so one call per task would spend
    most of the time in scheduling. From each finished task the sizer learns the run time
    per call (from the result envelope) and the overhead per task (the task's time on the
    node beyond the calls, plus the service's scheduling latency), and aims at batches that
    run ``overhead_ratio`` times longer than their overhead, clamped to
    ``[min_duration, max_duration]`` seconds.

    It never takes calls away from idle slots: with the number of calls left known, a batch
    holds at most ``remaining / n_jobs`` of them, and joblib keeps ``pre_dispatch`` (two
    per slot by default) batches in flight. It grows at most ``max_growth`` times per
    decision, so one fast first call cannot put the whole input into a handful of tasks,
    and never past ``max_size`` calls (joblib holds ``size x n_jobs`` calls in memory).
    """

    def __init__(
        self,
        *,
        n_jobs: int,
        min_duration: float,
        max_duration: float,
        overhead_ratio: float = 5.0,
        max_growth: int = 8,
        max_size: int = 4096,
        smoothing: float = 0.3,
    ) -> None:
        self.n_jobs = max(1, n_jobs)
        self.max_size = max(1, max_size)
        self.min_duration = min_duration
        self.max_duration = max(max_duration, min_duration)
        self.overhead_ratio = overhead_ratio
        self.max_growth = max(2, max_growth)
        self.smoothing = smoothing
        self.size = 1
        self.per_call: float | None = None
        self.overhead: float | None = None
        self.samples = 0
        self._lock = threading.Lock()

    def record(self, *, batch_size: int, run_seconds: float, overhead_seconds: float) -> None:
        """Learn from one finished task that ran ``batch_size`` calls."""
        if batch_size <= 0:
            return
        per_call = max(run_seconds, 0.0) / batch_size
        overhead = max(overhead_seconds, 0.0)
        with self._lock:
            self.per_call = self._smooth(self.per_call, per_call)
            self.overhead = self._smooth(self.overhead, overhead)
            self.samples += 1

    def _smooth(self, old: float | None, new: float) -> float:
        """An exponential moving average, so one slow node does not swing the batch size."""
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def target_duration(self) -> float:
        overhead = self.overhead or 0.0
        return min(max(overhead * self.overhead_ratio, self.min_duration), self.max_duration)

    def initial_size(self, *, total: int | None, all_at_once: bool) -> int:
        """The size before any task finished: 1, unless joblib dispatches everything now.

        With ``pre_dispatch="all"`` no completion will ever come back to resize batches, so
        the known number of calls is spread over about four tasks per slot.
        """
        if all_at_once and total:
            return max(1, math.ceil(total / (4 * self.n_jobs)))
        return 1

    def next_size(self, *, remaining: int | None = None) -> int:
        """The size of the next batch; ``remaining`` is the number of calls not yet sent."""
        with self._lock:
            if self.samples == 0 or self.per_call is None:
                return self.size
            ideal = self.target_duration() / max(self.per_call, 1e-6)
            size = max(1, min(int(ideal), self.size * self.max_growth, self.max_size))
            if remaining is not None and remaining > 0:
                size = min(size, max(1, math.ceil(remaining / self.n_jobs)))
            self.size = size
            return size


# --------------------------------------------------------------------------- pools


@dataclass
class _PoolLease:
    key: tuple[str, str]
    service: BatchService
    pool_id: str
    created: bool
    keep: bool
    holders: int = 0


class _PoolRegistry:
    """Which pools this process uses, so that concurrent or nested runs share one.

    The pool is deleted when the last run using it ends, if this process created it and
    no run asked to keep it. A pool that existed before is never changed or deleted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str], _PoolLease] = {}

    def acquire(self, service: BatchService, spec: PoolSpec, cfg: BatchConfig) -> _PoolLease:
        key = (str(cfg.batch_url), spec.pool_id)
        with self._lock:
            lease = self._leases.get(key)
            if lease is None:
                info, created = service.ensure_pool(spec)
                lease = _PoolLease(
                    key=key,
                    service=service,
                    pool_id=spec.pool_id,
                    created=created,
                    keep=cfg.keep_pool,
                )
                self._leases[key] = lease
                if not created:
                    _warn_differences(info, spec)
            lease.keep = lease.keep or cfg.keep_pool
            lease.holders += 1
            return lease

    def release(self, lease: _PoolLease) -> None:
        with self._lock:
            lease.holders -= 1
            if lease.holders > 0:
                return
            self._leases.pop(lease.key, None)
            delete = lease.created and not lease.keep
        if delete:
            lease.service.delete_pool(lease.pool_id)


_POOLS = _PoolRegistry()


def _warn_differences(info: PoolInfo, spec: PoolSpec) -> None:
    diffs = pool_differences(info, spec)
    if diffs:
        warnings.warn(
            f"The existing pool {spec.pool_id} is used as it is, though it differs from the "
            f"config: {'; '.join(diffs)}. Delete it or choose another pool_id to get the "
            "configured one.",
            PoolDifferenceWarning,
            stacklevel=6,
        )


@contextmanager
def _capacity_progress(pool_id: str) -> Iterator[Callable[[PoolInfo], None]]:
    """A tqdm line on stderr while the pool gets its nodes (only if there is a wait)."""
    bar: Any = None

    def show(info: PoolInfo) -> None:
        nonlocal bar
        if bar is None:
            if info.ready_slots > 0:
                return
            from tqdm.auto import tqdm

            bar = tqdm(
                total=max(info.target_slots, 1),
                desc=f"Azure Batch pool {pool_id}: usable slots",
                unit="slot",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        bar.n = info.ready_slots
        states = ", ".join(f"{n} {s}" for s, n in sorted(info.node_states.items()))
        bar.set_postfix_str(f"{info.allocation_state}; nodes: {states or 'none yet'}")
        bar.refresh()

    try:
        yield show
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- one run


@dataclass
class _Account:
    """The config and the two clients built from it, shared by the runs of a backend."""

    cfg: BatchConfig
    service: BatchService
    store: BlobStore


@dataclass
class _Part:
    """One joblib batch handed to ``submit``: its future and joblib's callback."""

    future: Future[Any]
    callback: Callable[[Any], Any] | None
    size: int
    calls: Any = None


@dataclass
class _Task:
    """One Batch task: one part, or a :class:`Bundle` of several tail parts."""

    task_id: str
    parts: list[_Part]
    bundled: bool
    prepared: PreparedTask | None = None


_current = threading.local()
_LIVE_RUNS: weakref.WeakSet[JobRun] = weakref.WeakSet()

#: Seconds the submitter waits for more batches before a flush, so that joblib's first
#: burst of ``pre_dispatch`` batches goes out in one request.
_LINGER = 0.02
_MAX_FLUSH = 500
_PREPARE_WORKERS = 8


def _split(parts: list[_Part], groups: int) -> list[list[_Part]]:
    """Consecutive groups of parts with about the same number of calls each."""
    groups = max(1, min(groups, len(parts)))
    total = sum(p.size for p in parts)
    out: list[list[_Part]] = []
    current: list[_Part] = []
    done = 0
    for part in parts:
        current.append(part)
        done += part.size
        if len(out) < groups - 1 and done >= total * (len(out) + 1) / groups:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


class JobRun:
    """One ``Parallel`` call: one Batch job, its submitter and its tracker."""

    def __init__(
        self,
        account: _Account,
        *,
        n_jobs: int,
        sizer: BatchSizer,
        scheduling_latency: float,
        parallel: Any = None,
    ) -> None:
        self.account = account
        self.cfg = account.cfg
        self.job_id = self.cfg.new_job_id()
        self.n_jobs = n_jobs
        self.sizer = sizer
        self._scheduling_latency = scheduling_latency
        self._parallel_ref = weakref.ref(parallel) if parallel is not None else None
        self._key = new_signing_key()
        self._writer = PayloadWriter(
            account.store,
            job_id=self.job_id,
            signing_key=self._key,
            inline_threshold=self.cfg.inline_threshold,
            sas_expiry=self.cfg.sas_expiry,
        )
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._tasks: dict[str, _Task] = {}
        self._queue: queue.Queue[list[_Task] | list[_Part] | None] = queue.Queue()
        self._pulled: list[_Part] | None = None
        self._state = "new"  # new -> started -> (aborted) -> closed
        self._lease: Any = None
        self._job_created = False
        self._may_have_blobs = False
        self._tracker: Tracker | None = None
        self._submitter: threading.Thread | None = None
        self._prepare_pool: ThreadPoolExecutor | None = None
        #: Counters for tests and benchmarks.
        self.tasks_submitted = 0
        self.calls_submitted = 0
        self.calls_completed = 0
        self.bundles_submitted = 0
        self._progress: CallProgress | None = None
        _LIVE_RUNS.add(self)

    # ---------------------------------------------------------------- state

    @property
    def started(self) -> bool:
        return self._state != "new"

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    @property
    def parallel(self) -> Any:
        return self._parallel_ref() if self._parallel_ref is not None else None

    def _new_task_id(self) -> str:
        return f"task-{next(self._ids):06d}"

    # ---------------------------------------------------------------- starting

    def _start(self, first: _Task, calls: Any) -> None:
        """Everything Azure needs before the first task, in an order that creates nothing
        in Batch when something is wrong: a read of the pool checks the Batch key, the
        container checks the storage credential, the first batch is pickled (an unpicklable
        function fails here) and stored, and only then are the pool and the job created."""
        cfg, svc, store = self.cfg, self.account.service, self.account.store
        started = time.monotonic()
        spec = PoolSpec.from_config(cfg)
        svc.get_pool(spec.pool_id)
        store.ensure_container()
        self._may_have_blobs = True
        first.prepared = self._writer.prepare(first.task_id, calls)
        self._lease = _POOLS.acquire(svc, spec, cfg)
        with _capacity_progress(spec.pool_id) as progress:
            svc.wait_for_capacity(
                spec.pool_id, min_slots=1, timeout=cfg.pool_timeout, progress=progress
            )
        svc.create_job(self.job_id, spec.pool_id)
        self._job_created = True
        if progress_enabled(cfg.progress, sys.stderr):
            self._progress = CallProgress(
                label=f"Batch job {self.job_id}",
                done=lambda: self.calls_completed,
                dispatched=lambda: self.calls_submitted,
                file=sys.stderr,
                started=started,
            )
        self._tracker = Tracker(
            svc
            if self._progress is None
            else cast(BatchService, _CountsTap(svc, self._progress.counts)),
            self.job_id,
            fetch=lambda task_id: store.download(result_blob(self.job_id, task_id)),
            poll_interval=cfg.poll_interval,
            max_task_retries=cfg.max_task_retries,
        )
        self._tracker.start()
        self._prepare_pool = ThreadPoolExecutor(
            max_workers=_PREPARE_WORKERS, thread_name_prefix=f"azurebatch-prepare-{self.job_id}"
        )
        self._submitter = threading.Thread(
            target=self._submit_loop, name=f"azurebatch-submit-{self.job_id}", daemon=True
        )
        self._submitter.start()

    # ---------------------------------------------------------------- submitting

    def submit(self, calls: Any, callback: Callable[[Any], Any] | None) -> Future[Any]:
        """Queue one batch of calls; returns at once (after the first batch).

        The first batch is pickled here, before anything exists in Azure, so that an
        unpicklable function fails the call with nothing created.
        """
        future: Future[Any] = Future()
        size = len(calls) if hasattr(calls, "__len__") else 1
        part = _Part(future, callback, size, calls)
        with self._lock:
            if self._state == "new":
                self._state = "started"
                first = _Task(self._new_task_id(), [part], bundled=False)
                try:
                    self._start(first, calls)
                except BaseException:
                    self._state = "aborted"
                    raise
                part.calls = None
                self._queue.put([first])
            elif self._state != "started":
                future.cancel()
                return future
            elif self._pulled is not None:
                self._pulled.append(part)
            else:
                self._queue.put([part])
            self.calls_submitted += size
        return future

    def _submit_loop(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            deadline = time.monotonic() + _LINGER
            while len(items) < _MAX_FLUSH:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            if self._state != "started":
                return
            tasks: list[_Task] = []
            for group in items:
                if group and isinstance(group[0], _Task):
                    tasks.extend(t for t in group if isinstance(t, _Task))
                    continue
                parts = [p for p in group if isinstance(p, _Part)]
                if len(parts) == 1:
                    tasks.append(_Task(self._new_task_id(), parts, bundled=False))
                else:
                    for chunk in _split(parts, self.n_jobs):
                        tasks.append(_Task(self._new_task_id(), chunk, bundled=len(chunk) > 1))
            try:
                self._flush(tasks)
            except BaseException as e:  # never let the thread die with tasks unresolved
                for task in tasks:
                    self._fail(task.task_id, e)

    def _prepare(self, task: _Task) -> PreparedTask | BaseException:
        if task.prepared is not None:
            return task.prepared
        calls: Any = task.parts[0].calls
        if task.bundled:
            calls = Bundle([p.calls for p in task.parts])
        try:
            return self._writer.prepare(task.task_id, calls)
        except BaseException as e:
            return e
        finally:
            for part in task.parts:
                part.calls = None

    def _flush(self, tasks: list[_Task]) -> None:
        assert self._prepare_pool is not None
        assert self._tracker is not None
        with self._lock:
            for task in tasks:
                self._tasks[task.task_id] = task
                self._tracker.watch(task.task_id, self._on_done)
        prepared = list(self._prepare_pool.map(self._prepare, tasks))
        specs: list[TaskSpec] = []
        for task, result in zip(tasks, prepared, strict=True):
            if isinstance(result, BaseException):
                self._fail(task.task_id, result)
                continue
            specs.append(
                TaskSpec(
                    task_id=task.task_id,
                    command_line=WORKER_COMMAND,
                    image=self.cfg.image,
                    environment=result.environment,
                    max_retries=self.cfg.max_task_retries,
                    max_wall_clock=self.cfg.task_timeout,
                )
            )
            self.tasks_submitted += 1
            self.bundles_submitted += int(task.bundled)
        if not specs or self._state != "started":
            return
        try:
            self.account.service.add_tasks(self.job_id, specs)
        except BaseException as e:
            for spec in specs:
                self._fail(spec.task_id, e)

    def _fail(self, task_id: str, error: BaseException) -> None:
        if self._tracker is not None:
            self._tracker.deliver(task_id, error)

    # ---------------------------------------------------------------- results

    def _on_done(self, done: TaskDone) -> None:
        """Resolve a task's parts and run joblib's callbacks (in the tracker's thread)."""
        with self._lock:
            task = self._tasks.pop(done.task_id, None)
        if task is None:
            return
        calls = sum(p.size for p in task.parts)
        outcomes: list[tuple[bool, Any]] = []
        error = done.error
        if error is None:
            try:
                envelope = read_result(done.data or b"", self._key)
                self._learn(calls, envelope.timings, done)
                value = envelope.result()
                outcomes = [_part_outcome(o) for o in value] if task.bundled else [(True, value)]
            except BaseException as e:
                error = e
        if error is not None or len(outcomes) != len(task.parts):
            if error is None:
                error = TaskFailedError(
                    f"the Batch task {task.task_id} of the job {self.job_id} returned "
                    f"{len(outcomes)} results for {len(task.parts)} batches",
                    self.job_id,
                    task.task_id,
                )
            outcomes = [(False, error)] * len(task.parts)
        # Counted before the callbacks: the last one may let joblib end the call at once.
        self.calls_completed += calls
        if self._progress is not None:
            self._progress.refresh()
        _current.run = self
        try:
            for part, (ok, value) in zip(task.parts, outcomes, strict=True):
                if ok:
                    part.future.set_result(value)
                else:
                    part.future.set_exception(value)
                if part.callback is not None:
                    part.callback(part.future)
            self._pull_tail()
        finally:
            _current.run = None

    def _learn(self, calls: int, timings: dict[str, float], done: TaskDone) -> None:
        run = float(timings.get("run", 0.0))
        outcome = done.outcome
        if outcome is not None and outcome.start_time and outcome.end_time:
            on_node = (outcome.end_time - outcome.start_time).total_seconds()
        else:
            on_node = run + sum(float(timings.get(k, 0.0)) for k in ("download", "upload"))
        overhead = max(on_node - run, 0.0) + self._scheduling_latency + self.cfg.poll_interval / 2
        self.sizer.record(batch_size=calls, run_seconds=run, overhead_seconds=overhead)

    def _pull_tail(self) -> None:
        """Take joblib's waiting tail batches now and send them as a few bundles.

        joblib cuts the end of its input into ``10 x n_jobs`` small batches and releases
        them one per completion. When the batches waiting in its queue are much smaller
        than the sizer's size, that is the tail: pull them all (through joblib's own
        ``dispatch_next``, so its bookkeeping stays right) and bundle them, one task per
        slot. Only this thread dispatches at that point, so the queue cannot empty under us.
        """
        parallel = self.parallel
        ready = getattr(parallel, "_ready_batches", None)
        lock = getattr(parallel, "_lock", None)
        if ready is None or lock is None or not hasattr(parallel, "dispatch_next"):
            return
        with lock:
            if getattr(parallel, "_aborting", False) or self._state != "started":
                return
            waiting = list(getattr(ready, "queue", ()))
            if len(waiting) < 2:
                return
            largest = max(len(b) if hasattr(b, "__len__") else 1 for b in waiting)
            if largest * 2 > self.sizer.size:
                return
            with self._lock:
                self._pulled = []
            try:
                for _ in waiting:
                    parallel.dispatch_next()
            finally:
                with self._lock:
                    pulled, self._pulled = self._pulled or [], None
        if pulled:
            self._queue.put(pulled)

    # ---------------------------------------------------------------- ending

    def abort(self) -> None:
        """Stop everything now: queued batches are dropped, the job's tasks terminated."""
        with self._lock:
            if self._state != "started":
                return
            self._state = "aborted"
        self._drain_queue()
        if self._job_created:
            try:
                self.account.service.terminate_job(
                    self.job_id, "joblib-azurebatch: the Parallel call was aborted"
                )
            except AzureBatchError as e:
                _warn_cleanup(f"could not terminate the job {self.job_id}: {e}")
        if self._tracker is not None:
            self._tracker.stop(wait=0)
        if self._progress is not None:
            self._progress.close()

    def _drain_queue(self) -> None:
        """Drop what was not submitted yet (its futures are cancelled) and stop the submitter."""
        while True:
            try:
                group = self._queue.get_nowait()
            except queue.Empty:
                break
            for item in group or ():
                parts = item.parts if isinstance(item, _Task) else [item]
                for part in parts:
                    part.future.cancel()
        self._queue.put(None)

    def close(self) -> None:
        """End the run: job terminated if needed and deleted, blobs and pool released."""
        with self._lock:
            if self._state == "closed":
                return
            was = self._state
            self._state = "closed"
        _LIVE_RUNS.discard(self)
        if was == "new":
            return
        cfg, svc = self.cfg, self.account.service
        self._drain_queue()
        if self._submitter is not None and self._submitter is not threading.current_thread():
            self._submitter.join(10)
        if self._tracker is not None:
            self._tracker.stop()
        if self._prepare_pool is not None:
            self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            leftovers = [p for t in self._tasks.values() for p in t.parts]
            self._tasks.clear()
        for part in leftovers:
            part.future.cancel()
        if self._progress is not None:
            # Every task resolved means Batch reported every one completed.
            clean = not leftovers and was != "aborted"
            self._progress.close(
                postfix=f"tasks: {self.tasks_submitted} completed" if clean else None
            )
        if self._job_created:
            try:
                if (leftovers or cfg.keep_job) and was != "aborted":
                    svc.terminate_job(self.job_id, "joblib-azurebatch: the Parallel call ended")
                if not cfg.keep_job:
                    svc.delete_job(self.job_id)
            except AzureBatchError as e:
                _warn_cleanup(f"could not end the job {self.job_id}: {e}")
        if self._may_have_blobs and not cfg.keep_blobs:
            try:
                self.account.store.delete_prefix(job_prefix(self.job_id))
            except (AzureBatchError, OSError) as e:
                _warn_cleanup(f"could not delete the blobs of the job {self.job_id}: {e}")
        if self._lease is not None:
            lease, self._lease = self._lease, None
            try:
                _POOLS.release(lease)
            except AzureBatchError as e:
                _warn_cleanup(f"could not delete the pool {cfg.pool_id}: {e}")


class _CountsTap:
    """The Batch service as a run's tracker sees it: the task counts it polls anyway are
    also shown on the progress line, so the line costs no request of its own."""

    def __init__(self, service: BatchService, on_counts: Callable[[TaskCounts], None]) -> None:
        self._service = service
        self._on_counts = on_counts

    def task_counts(self, job_id: str) -> TaskCounts:
        counts = self._service.task_counts(job_id)
        try:
            self._on_counts(counts)
        except Exception:  # a broken terminal must not stop the polling
            _log.exception("the progress line of the job %s failed", job_id)
        return counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)


def _part_outcome(outcome: Any) -> tuple[bool, Any]:
    ok, value, text = outcome
    if ok:
        return True, value
    if isinstance(value, BaseException) and text:
        value.__cause__ = RemoteTraceback(text)
    return False, value


def _warn_cleanup(message: str) -> None:
    warnings.warn(
        f"joblib-azurebatch: {message}. Run `joblib-azurebatch cleanup` to remove what is left.",
        RuntimeWarning,
        stacklevel=3,
    )


@atexit.register
def _close_live_runs() -> None:
    """Nothing keeps running (and billing) after the interpreter exits mid-run."""
    for run in list(_LIVE_RUNS):
        try:
            run.abort()
            run.close()
        except Exception:  # pragma: no cover - best effort at exit
            _log.exception("closing the job %s at exit failed", run.job_id)


# --------------------------------------------------------------------------- the backend


class AzureBatchBackend(ParallelBackendBase):  # type: ignore[misc]
    """Run joblib batches as Azure Batch tasks.

    Use it through joblib: ``parallel_config(backend="azurebatch", config=cfg)`` (config
    given to the constructor) or ``Parallel(backend="azurebatch", config=cfg)`` (given to
    :meth:`configure`). Without a config, :meth:`BatchConfig.from_env` is used.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = False
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1

    #: Batch durations aimed at (seconds); see :class:`BatchSizer`.
    MIN_IDEAL_BATCH_DURATION = 2.0
    MAX_IDEAL_BATCH_DURATION = 60.0
    #: Seconds the service takes to put a queued task on a free slot (added to the overhead
    #: measured on the node).
    SCHEDULING_LATENCY = 1.0
    #: Batches run this many times longer than their overhead.
    OVERHEAD_RATIO = 5.0

    def __init__(
        self,
        *,
        config: BatchConfig | None = None,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if config is not None and not isinstance(config, BatchConfig):
            raise TypeError(
                f"config= must be a joblib_azurebatch.BatchConfig, not {type(config).__name__}"
            )
        self._config = config
        self._accounts: dict[int, _Account] = {}
        self._runs: dict[tuple[int, Any], tuple[Any, JobRun]] = {}
        self._lock = threading.RLock()
        self.parallel: Any = None

    # ---------------------------------------------------------------- config and sizing

    def _config_now(self) -> BatchConfig:
        if self._config is None:
            self._config = BatchConfig.from_env()
        return self._config

    def _account(self) -> _Account:
        cfg = self._config_now()
        with self._lock:
            account = self._accounts.get(id(cfg))
            if account is None or account.cfg is not cfg:
                account = _Account(
                    cfg=cfg,
                    service=BatchService.from_config(cfg),
                    store=BlobStore.from_config(cfg),
                )
                self._accounts[id(cfg)] = account
            return account

    def _capacity(self) -> int:
        try:
            return int(self._config_now().target_slots)
        except ConfigError:
            return 1

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """The pool's target capacity (nodes x slots) for -1 or None, from the config alone.

        Cheap (no request) and never 0. Only an explicit ``n_jobs=1`` gives 1, which joblib
        runs in-process; a one-slot pool still reports 2 for ``n_jobs=-1`` so that the work
        goes to the pool rather than silently running locally.
        """
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs == 1:
            return 1
        capacity = self._capacity()
        if n_jobs is None:
            wanted = capacity
        elif n_jobs < 0:
            wanted = capacity + 1 + n_jobs
        else:
            wanted = n_jobs
        return max(wanted, 2)

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        *,
        config: BatchConfig | None = None,
        **backend_kwargs: Any,
    ) -> int:
        """Check the config and return ``n_jobs``; nothing is created in Azure here.

        ``n_jobs=1`` falls back to joblib's sequential backend, so nothing is created at all.
        """
        if config is not None:
            if not isinstance(config, BatchConfig):
                raise TypeError(
                    f"config= must be a joblib_azurebatch.BatchConfig, not {type(config).__name__}"
                )
            self._config = config
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self._config_now().validate()
        self.parallel = parallel
        _current.parallel = parallel
        return n

    def start_call(self) -> None:
        # ``configure`` recorded the Parallel in a thread-local; ``self.parallel`` may have
        # been overwritten meanwhile by a Parallel configured in another thread.
        if getattr(_current, "parallel", None) is None and self.parallel is not None:
            _current.parallel = self.parallel

    def _sizer(self, n_jobs: int) -> BatchSizer:
        return BatchSizer(
            n_jobs=n_jobs,
            min_duration=self.MIN_IDEAL_BATCH_DURATION,
            max_duration=self.MAX_IDEAL_BATCH_DURATION,
            overhead_ratio=self.OVERHEAD_RATIO,
        )

    def _n_jobs_for(self, parallel: Any) -> int:
        cached = getattr(parallel, "_cached_effective_n_jobs", None)
        if isinstance(cached, int) and cached > 0:
            return cached
        return self.effective_n_jobs(-1)

    def compute_batch_size(self) -> int:
        """Calls per task for the next batch of the run joblib is dispatching for."""
        run: JobRun | None = getattr(_current, "run", None)
        parallel = getattr(_current, "parallel", None) or self.parallel
        if run is None:
            run = self._run_for(parallel, getattr(parallel, "_call_id", None))
        else:
            parallel = self._parallel_of(run)
        total = getattr(parallel, "n_tasks", None)
        dispatched = getattr(parallel, "n_dispatched_tasks", 0) or 0
        if run.sizer.samples == 0:
            all_at_once = getattr(parallel, "_pre_dispatch_amount", None) == 0
            return run.sizer.initial_size(total=total, all_at_once=all_at_once)
        remaining = total - dispatched if isinstance(total, int) else None
        return run.sizer.next_size(remaining=remaining)

    def batch_completed(self, batch_size: int, duration: float) -> None:
        """Unused: the sizer learns from the task's own timings, not from joblib's clock."""

    # ---------------------------------------------------------------- runs

    def _run_for(self, parallel: Any, call_id: Any) -> JobRun:
        key = (id(parallel), call_id)
        with self._lock:
            entry = self._runs.get(key)
            if entry is not None and not entry[1].closed:
                return entry[1]
            sizer = self._sizer(self._n_jobs_for(parallel))
            run = JobRun(
                self._account(),
                n_jobs=sizer.n_jobs,
                sizer=sizer,
                scheduling_latency=self.SCHEDULING_LATENCY,
                parallel=parallel,
            )
            ref = weakref.ref(parallel) if parallel is not None else None
            self._runs[key] = (ref, run)
            return run

    def _parallel_of(self, run: JobRun) -> Any:
        with self._lock:
            for ref, candidate in self._runs.values():
                if candidate is run:
                    return ref() if ref is not None else None
        return None

    def _finished_runs(self, *, aborting: bool = False) -> list[JobRun]:
        """Runs whose Parallel has stopped (or, for ``aborting``, is aborting)."""
        done: list[JobRun] = []
        with self._lock:
            for key, (ref, run) in list(self._runs.items()):
                parallel = ref() if ref is not None else None
                if aborting:
                    hit = parallel is None or bool(getattr(parallel, "_aborting", True))
                else:
                    hit = parallel is None or not getattr(parallel, "_running", False)
                if hit:
                    done.append(run)
                    if not aborting:
                        del self._runs[key]
        return done

    def submit(self, func: Any, callback: Any = None) -> Future[Any]:
        parallel = getattr(callback, "parallel", None)
        if parallel is None:
            parallel = getattr(_current, "parallel", None) or self.parallel
        call_id = getattr(callback, "parallel_call_id", getattr(parallel, "_call_id", None))
        return self._run_for(parallel, call_id).submit(func, callback)

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Terminate the remaining tasks of the run being aborted (its job stays until
        ``stop_call``/``terminate`` deletes it)."""
        for run in self._finished_runs(aborting=True):
            run.abort()

    def stop_call(self) -> None:
        self._close_finished()

    def terminate(self) -> None:
        self._close_finished()

    def _close_finished(self) -> None:
        for run in self._finished_runs():
            run.close()

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """A light local backend for Parallel calls made inside a task, never ``self``:
        joblib pickles it into every task, and this backend holds the account's secrets."""
        level = (self.nesting_level or 0) + 1
        if level > 1:
            return SequentialBackend(nesting_level=level), None
        return ThreadingBackend(nesting_level=level), None

    def __reduce__(self) -> Any:
        raise TypeError(
            "AzureBatchBackend holds account credentials and is never pickled; tasks get a "
            "local backend from get_nested_backend()"
        )

"""One ``Parallel`` call: one Batch job, its submitter, its tracker and its life cycle.

The life cycle is explicit (:class:`RunState` and the table ``_TRANSITIONS``)::

    NEW ──submit──► STARTING ──pool, job, threads up──► RUNNING ──abort──► ABORTED
     │                  │ start failed                     │                  │
     │                  └────────────► ABORTED             │                  │
     └──────────────────────────────────────close──────────┴──────close───────┴─► CLOSED

What the run holds in Azure is kept apart from its state, as the set of :class:`Held`
resources: the blobs under the job's prefix, the lease on the pool, the job. ``close``
releases exactly what is held, in the order that stops billing first: the job's tasks
(terminated), the job (deleted), its blobs, then the pool lease (the last holder deletes a
pool this process created).

Starting creates nothing in Batch when something is wrong: a read of the pool checks the
Batch credential, the container checks the storage credential, the first batch is pickled
(an unpicklable function fails here), and only then are the job and the pool created. The
first batch is stored with joblib's first burst of batches, once the job exists, so that
an argument they share is stored once rather than inlined in the first task and then
uploaded again. The job comes first, before the pool is taken and its nodes waited for: it
records this client (:mod:`joblib_azurebatch.liveness`), tells other clients that the pool
is in use, and is what `joblib-azurebatch cleanup` finds should this process die while
waiting. The reads of the pool, the container check and the wait for a usable slot are
skipped for a minute after a run of the same backend and config made them, on a pool that
no run deletes (:class:`~joblib_azurebatch.pools.PoolCheck`).

Nothing is left running when the process ends: ``close_live_runs`` runs at interpreter
exit and on SIGTERM and SIGHUP (:mod:`joblib_azurebatch.shutdown`); what a SIGKILL leaves,
`cleanup` removes once it sees that the client is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import itertools
import logging
import multiprocessing
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from . import identity, provision, shutdown, sweeper
from .batch import PoolInfo, PoolSpec, TaskCounts
from .errors import AzureBatchError, TaskFailedError
from .forks import after_fork
from .liveness import HEARTBEAT_EVERY, ClientRecord
from .payload import (
    PayloadWriter,
    RemoteTraceback,
    ResultEnvelope,
    job_prefix,
    new_signing_key,
    payload_blob,
    read_result,
)
from .payload import result_blob as _result_blob
from .pools import POOLS, ForgetOnLoss, PoolCheck, PoolLease, PoolRegistry, capacity_progress
from .progress import CallProgress, progress_enabled
from .resume import RESUME_METADATA, Resumer
from .sizing import BatchSizer
from .submitter import Part, Submitter, Task, TaskTemplate
from .tracker import SystemClock, TaskDone, Tracker
from .usage import Usage
from .watch import Watchdog

if TYPE_CHECKING:
    from ._joblib_compat import Features
    from .config import BatchConfig
    from .service import BatchApi
    from .storage import BlobStore

__all__ = [
    "Account",
    "Held",
    "JobRun",
    "RunState",
    "TransitionError",
    "close_live_runs",
    "current_run",
    "live_runs",
]

_log = logging.getLogger(__name__)


class RunState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    ABORTED = "aborted"
    CLOSED = "closed"


#: The legal transitions; anything else is a bug and raises :class:`TransitionError`.
_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.NEW: frozenset({RunState.STARTING, RunState.CLOSED}),
    RunState.STARTING: frozenset({RunState.RUNNING, RunState.ABORTED, RunState.CLOSED}),
    RunState.RUNNING: frozenset({RunState.ABORTED, RunState.CLOSED}),
    RunState.ABORTED: frozenset({RunState.CLOSED}),
    RunState.CLOSED: frozenset(),
}


class TransitionError(RuntimeError):
    """A run was asked to move between two states that the life cycle does not connect."""


class Held(enum.Enum):
    """What a run holds in Azure and must release when it closes."""

    BLOBS = "blobs"
    POOL_LEASE = "pool lease"
    JOB = "job"


@dataclass
class Account:
    """The config and the two clients built from it, shared by the runs of a backend."""

    cfg: BatchConfig
    service: BatchApi
    store: BlobStore


#: Seconds between wakes of an idle-formula pool while a run waits for its nodes (less
#: than the 5 idle minutes the formula allows at the least).
REWAKE_EVERY = 240.0
#: Times a task is prepared again with fresh URLs before it fails (see ``_replace_expired``).
MAX_URL_REFRESHES = 3

_LIVE_RUNS: weakref.WeakSet[JobRun] = weakref.WeakSet()
_current = threading.local()


def current_run() -> JobRun | None:
    """The run whose callbacks the current thread is running (joblib asks for the next
    batch size from inside a callback)."""
    return cast("JobRun | None", getattr(_current, "run", None))


class JobRun:
    """One ``Parallel`` call: one Batch job, its submitter and its tracker."""

    def __init__(
        self,
        account: Account,
        *,
        n_jobs: int,
        sizer: BatchSizer,
        scheduling_latency: float,
        features: Features,
        pools: PoolRegistry | None = None,
        pool_check: PoolCheck | None = None,
    ) -> None:
        self.account = account
        self.cfg = account.cfg
        self.job_id = self.cfg.new_job_id()
        self.n_jobs = n_jobs
        self.sizer = sizer
        self.features = features
        self._scheduling_latency = scheduling_latency
        self._pools = pools if pools is not None else POOLS
        #: What a run of the same backend and config found about the pool (shared with
        #: them; a private one checks every time).
        self._pool_check = pool_check if pool_check is not None else PoolCheck()
        self._key = new_signing_key()
        #: resume=True: the run's calls are keyed, and their stored results taken.
        self._resumer: Resumer | None = None
        #: Runs joblib's callbacks of the batches answered from stored results.
        self._resumed = ThreadPoolExecutor(
            1, thread_name_prefix="azurebatch-resumed", initializer=shutdown.hold_signals
        )
        self._callback_lock = threading.RLock()
        self._first_key: str | None = None
        if self.cfg.resume or self.cfg.cache:
            self._resumer = Resumer(
                account.store,
                image=self.cfg.node_image,
                any_environment=self.cfg.resume_any_environment,
                sas_expiry=self.cfg.sas_expiry,
                cache=self.cfg.cache,
            )
        self._writer = PayloadWriter(
            account.store,
            job_id=self.job_id,
            signing_key=self._key,
            inline_threshold=self.cfg.inline_threshold,
            sas_expiry=self.cfg.sas_expiry,
        )
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._tasks: dict[str, Task] = {}
        self._pulled: list[Part] | None = None
        #: Batches sent and not resolved yet (see ``dispatched``).
        self.in_flight = 0
        #: True while ``_pull_tail`` sends batches (it holds joblib's dispatch lock).
        self._feeding = False
        self._state = RunState.NEW
        self._held: set[Held] = set()
        self._lease: PoolLease | None = None
        self._tracker: Tracker | None = None
        self._watchdog: Watchdog | None = None

        def fail_unsent(task_id: str, error: BaseException) -> None:
            # A batch that did not reach Batch: whatever went wrong, the next run checks
            # the pool, the credentials and the container again.
            self._pool_check.forget()
            self._fail(task_id, error)

        self._submitter = Submitter(
            account.service,
            self.job_id,
            prepare=self._writer.prepare,
            template=TaskTemplate(
                image=self.cfg.node_image,
                max_retries=self.cfg.max_task_retries,
                max_wall_clock=self.cfg.task_timeout,
            ),
            n_jobs=n_jobs,
            new_task_id=self._new_task_id,
            register=self._register,
            fail=fail_unsent,
            is_open=lambda: self._state is RunState.RUNNING,
            on_dumped=lambda calls, nbytes: self.sizer.record_bytes(calls=calls, nbytes=nbytes),
        )
        #: Counters for tests and benchmarks.
        self.calls_resumed = 0
        self.calls_submitted = 0
        self.calls_completed = 0
        self._progress: CallProgress | None = None
        #: What the run used (tasks, retries, requeues, nodes), said in one line at its end.
        self.usage = Usage()
        #: On the default path, how the nodes get this run's environment.
        self.node_setup: provision.NodeSetup | None = None
        _LIVE_RUNS.add(self)

    # ---------------------------------------------------------------- state

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def held(self) -> frozenset[Held]:
        return frozenset(self._held)

    def _move(self, to: RunState) -> RunState:
        """Change state under the lock; returns the state left."""
        with self._lock:
            was = self._state
            if to not in _TRANSITIONS[was]:
                raise TransitionError(f"the run of the job {self.job_id} cannot go {was} -> {to}")
            self._state = to
            return was

    @property
    def started(self) -> bool:
        return self._state is not RunState.NEW

    @property
    def closed(self) -> bool:
        return self._state is RunState.CLOSED

    @property
    def tasks_submitted(self) -> int:
        return self._submitter.tasks_submitted

    @property
    def bundles_submitted(self) -> int:
        return self._submitter.bundles_submitted

    @property
    def tracker(self) -> Tracker | None:
        return self._tracker

    def _new_task_id(self) -> str:
        return f"task-{next(self._ids):06d}"

    # ---------------------------------------------------------------- starting

    def _start(self, first: Task, calls: Any) -> None:
        """Everything Azure needs before the first task (see the module docstring)."""
        cfg, svc, store = self.cfg, self.account.service, self.account.store
        started = time.monotonic()
        self.usage = Usage(started=started)
        check = self._pool_check
        # A run of this backend checked all this moments ago (pools.PoolCheck): the pool with
        # a usable slot, and with it both credentials and the container.
        known = check.fresh(cfg.pool_id)
        found = known
        if known is None:
            # node_identity: the pool must exist with the identity (ConfigError, nothing
            # created); otherwise a read of the pool checks the Batch credential.
            found = identity.check_pool(svc, cfg) or svc.get_pool(cfg.pool_id)
            store.ensure_container()
        self._held.add(Held.BLOBS)
        start_task = None
        if cfg.installs_environment:
            setup = provision.stage(
                provision.environment_of(calls, self._writer, cfg),
                store,
                image=cfg.node_image,
                task_expiry=timedelta(seconds=cfg.sas_expiry),
            )
            start_task = setup.start_task
            self.node_setup = setup
            self._submitter.template = replace(
                self._submitter.template,
                command_line=setup.command_line,
                resource_files=setup.resource_files,
                environment=setup.environment,
            )
        spec = PoolSpec.from_config(cfg, start_task=start_task)
        # Pickled now (an unpicklable call fails before the job exists), stored with the
        # first flush, so that joblib's first burst of batches is decided together.
        first.dumped = self._writer.dump(first.task_id, calls)
        self.sizer.record_bytes(calls=first.calls, nbytes=first.dumped.nbytes)
        shutdown.install(close_live_runs)
        # The job exists before the pool is taken (Batch accepts a job on a pool that does
        # not exist yet): it is what tells other clients that the pool is in use, so a
        # client that ends now cannot delete the pool under this run, and what `cleanup`
        # finds if this process dies while waiting for nodes.
        record = ClientRecord.of_this_process()
        metadata = record.to_metadata()
        if self._first_key is not None:
            # How a re-run of the same calls finds this job if this process dies.
            metadata[RESUME_METADATA] = self._first_key
        svc.create_job(self.job_id, spec.pool_id, metadata=metadata)
        self._held.add(Held.JOB)
        _log.info("created the job %s on the pool %s", self.job_id, spec.pool_id)
        self._lease = self._pools.acquire(
            svc,
            spec,
            account_url=str(cfg.batch_url),
            keep=cfg.keep_pool,
            idle_minutes=cfg.pool_idle_minutes,
            known=found,
        )
        self._held.add(Held.POOL_LEASE)
        self._watchdog = Watchdog(
            svc,
            job_id=self.job_id,
            pool_id=spec.pool_id,
            clock=SystemClock(),
            interval=cfg.watch_interval,
            capacity_timeout=cfg.capacity_timeout,
            record=record,
            metadata=metadata,
            heartbeat_every=min(HEARTBEAT_EVERY, cfg.watch_interval * 2),
            ending=lambda: self._state is not RunState.RUNNING,
        )
        watchdog = self._watchdog
        ready = known
        if ready is None:
            with capacity_progress(spec.pool_id) as show:
                lease = self._lease
                woken = time.monotonic()

                def progress(info: PoolInfo) -> None:
                    nonlocal woken
                    show(info)
                    watchdog.heartbeat()
                    if time.monotonic() - woken > REWAKE_EVERY:
                        woken = time.monotonic()
                        lease.wake()

                ready = svc.wait_for_capacity(
                    spec.pool_id, min_slots=1, timeout=cfg.pool_timeout, progress=progress
                )
            check.record(ready)
        self.usage.nodes(dedicated=ready.current_dedicated_nodes, spot=ready.current_spot_nodes)
        if progress_enabled(cfg.progress, sys.stderr):
            self._progress = CallProgress(
                label=f"Batch job {self.job_id}",
                done=lambda: self.calls_completed,
                dispatched=lambda: self.calls_submitted,
                file=sys.stderr,
                started=started,
            )
        if self.closed:  # a SIGTERM handler ended the run while it waited for nodes
            raise AzureBatchError(f"the run of the job {self.job_id} was closed while starting")
        self._tracker = Tracker(
            svc
            if self._progress is None
            else cast("BatchApi", _CountsTap(svc, self._progress.counts)),
            self.job_id,
            fetch=lambda task_id: store.download(_result_blob(self.job_id, task_id)),
            poll_interval=cfg.poll_interval,
            max_task_retries=cfg.max_task_retries,
            retry_budget=cfg.retry_budget,
            watchdog=ForgetOnLoss(watchdog, check),
            replace=self._replace_expired,
        )
        self._tracker.start()
        self._submitter.start()

    # ---------------------------------------------------------------- submitting

    def submit(self, calls: Any, callback: Callable[[Any], Any] | None) -> Future[Any]:
        """Queue one batch of calls; returns at once (after the first batch).

        With ``resume=True`` the batch's stored results are looked up first: a batch that
        has them all is answered without a task, any other is sent as a `Memo` of the
        calls that lack one (see :mod:`joblib_azurebatch.resume`).
        """
        if self._resumer is None:
            return self._submit(calls, callback)
        return self._submit_resumable(self._resumer, calls, callback)

    def _submit_resumable(
        self, resumer: Resumer, calls: Any, callback: Callable[[Any], Any] | None
    ) -> Future[Any]:
        """`submit` for a resumable run.

        joblib sends its later batches from the thread that ran the callback of an earlier
        one, and has queued a batch's tracker before it calls ``submit``: an exception
        raised there would leave that tracker pending and the ``Parallel`` call waiting
        forever. So after the first batch a failure (an argument ``joblib.hash`` cannot
        hash, the run that could not start) becomes the batch's result, and joblib raises
        it as it raises a call's error. Every callback of the run holds
        ``_callback_lock``: the batches answered from the store call theirs from a thread
        of the run's own, and joblib 1.6 loses results when callbacks race.
        """
        outer: Future[Any] = Future()
        first = self._state is RunState.NEW and self._first_key is None
        try:
            keys = resumer.keys(calls)
            with self._lock:
                if self._state is RunState.NEW and self._first_key is None:
                    # Here, in the thread that called Parallel: the run may start later,
                    # from a callback's thread, where signal handlers cannot be installed.
                    shutdown.install(close_live_runs)
                    self.account.store.ensure_container()
                    self._key = resumer.signing_key(self.job_id)
                    self._writer.use_key(self._key)
                    self._first_key = keys[0] if keys else None
                    resumer.run = self._first_key or ""
                    if self._first_key is not None:
                        resumer.wait_for_earlier(
                            self.account.service,
                            self._first_key,
                            poll_interval=self.cfg.poll_interval,
                            stalled_after=self.cfg.capacity_timeout,
                        )
            if self._state in (RunState.ABORTED, RunState.CLOSED):
                outer.cancel()
                return outer
            plan = resumer.plan(keys)
            if plan.complete:
                outer.set_result(plan.values())
                self.calls_resumed += len(plan)
                self.calls_submitted += len(plan)
                self.calls_completed += len(plan)
                if callback is not None:
                    # After submit has returned, as a task's results come.
                    self._resumed.submit(self._call_back, callback, outer)
                return outer
            self.calls_resumed += len(plan.found)

            def landed(inner: Future[Any]) -> None:
                if inner.cancelled():
                    outer.cancel()
                else:
                    try:
                        outer.set_result(plan.merge(inner.result()))
                    except BaseException as e:
                        outer.set_exception(e)
                if callback is not None:
                    self._call_back(callback, outer)

            inner = self._submit(resumer.wrap(calls, plan), landed)
            if inner.cancelled():
                outer.cancel()
            return outer
        except BaseException as e:
            # The first batch is sent by the thread that called Parallel: raised there.
            if first or outer.done():
                raise
            outer.set_exception(e)
            if callback is not None:
                self._resumed.submit(self._call_back, callback, outer)
            return outer

    def _call_back(self, callback: Callable[[Any], Any], future: Future[Any]) -> None:
        with self._callback_lock:
            before = getattr(_current, "run", None)
            _current.run = self
            try:
                callback(future)
            finally:
                _current.run = before

    def _submit(self, calls: Any, callback: Callable[[Any], Any] | None) -> Future[Any]:
        """Queue one batch of calls (a joblib batch, or its `Memo`).

        The first batch is pickled here, before anything exists in Azure, so that an
        unpicklable function fails the call with nothing created; it is stored with the
        batches that follow it into the first flush. No batch's calls are kept once
        pickled.
        """
        future: Future[Any] = Future()
        size = len(calls) if hasattr(calls, "__len__") else 1
        part = Part(future, callback, size, calls)
        with self._lock:
            if self._state is RunState.NEW:
                self._move(RunState.STARTING)
                first = Task(self._new_task_id(), [part], bundled=False)
                try:
                    self._start(first, calls)
                except BaseException:
                    if not self.closed:  # a signal handler may have closed it already
                        self._move(RunState.ABORTED)
                    raise
                self._move(RunState.RUNNING)
                part.calls = None
                self._submitter.put([first])
            elif self._state is not RunState.RUNNING:
                future.cancel()
                return future
            elif self._pulled is not None:
                self._pulled.append(part)
            else:
                self._submitter.put([part])
            self.calls_submitted += size
        return future

    def _register(self, tasks: list[Task]) -> None:
        """Called by the submitter before it adds ``tasks``: the tracker watches them."""
        assert self._tracker is not None
        with self._lock:
            for task in tasks:
                self._tasks[task.task_id] = task
                self._tracker.watch(task.task_id, self._on_done)

    def _replace_expired(self, task_id: str) -> bool:
        """Submit a task whose URLs expired again, under a new id with fresh URLs.

        Called by the tracker (from a download thread) when the worker exited with
        ``EXIT_URLS_EXPIRED``: the task waited in the queue, or ran, past ``sas_expiry``.
        Batch cannot change a task's settings, so the stored payload is re-sealed for a
        new task (the calls are not pickled again) and the old task is left as it ended.
        At most ``MAX_URL_REFRESHES`` times per task; then the task fails, saying why.
        """
        with self._lock:
            task = self._tasks.get(task_id)
            if (
                task is None
                or self._state is not RunState.RUNNING
                or task.refreshes >= MAX_URL_REFRESHES
                or self._tracker is None
            ):
                return False
            new_id = self._new_task_id()
        try:
            prepared = self._writer.refresh(task_id, new_id)
        except (AzureBatchError, OSError) as e:
            _log.warning("could not prepare task %s again with fresh URLs: %s", task_id, e)
            return False
        with self._lock:
            if self._tasks.get(task_id) is not task or self._state is not RunState.RUNNING:
                return False
            del self._tasks[task_id]
            task.task_id, task.prepared = new_id, prepared
            task.refreshes += 1
            self._tasks[new_id] = task
            self._tracker.watch(new_id, self._on_done)
        try:
            self.account.service.add_tasks(self.job_id, [self._submitter.spec_of(prepared)])
        except AzureBatchError as e:
            self._fail(new_id, e)
        _log.info(
            "the URLs of task %s expired before it could run or finish: submitted again as %s",
            task_id,
            new_id,
        )
        return True

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
        if done.outcome is not None:
            self.usage.task(retries=done.outcome.retry_count, requeues=done.outcome.requeue_count)
        outcomes = self._outcomes(task, done)
        # Counted before the callbacks: the last one may let joblib end the call at once.
        self.calls_completed += task.calls
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
        if done.outcome is not None and not self.cfg.keep_blobs:
            # Batch reported the task completed (it never runs it again) and its callbacks
            # ran: its payload and result are of no more use. Deleted in the background; the
            # objects the job's tasks share go only with the run's end. A resumable run
            # keeps its payloads until its end: they name its calls' keys, which is how
            # `stored_results` finds them if this process dies.
            names = [_result_blob(self.job_id, task.task_id)]
            if self._resumer is None:
                names.append(payload_blob(self.job_id, task.task_id))
            sweeper.SWEEPER.discard(self.account.store, names)

    def _outcomes(self, task: Task, done: TaskDone) -> list[tuple[bool, Any]]:
        """One ``(ok, value or exception)`` per part of the task."""
        outcomes: list[tuple[bool, Any]] = []
        error = done.error
        if error is None:
            try:
                envelope = read_result(
                    done.data or b"", self._key, job_id=self.job_id, task_id=task.task_id
                )
                self._learn(task.calls, envelope.timings, done)
                self._forward(envelope)
                value = envelope.result()
                outcomes = [_part_outcome(o) for o in value] if task.bundled else [(True, value)]
            except BaseException as e:
                error = e
        if error is None and len(outcomes) == len(task.parts):
            return outcomes
        if error is None:
            error = TaskFailedError(
                f"the Batch task {task.task_id} of the job {self.job_id} returned "
                f"{len(outcomes)} results for {len(task.parts)} batches",
                self.job_id,
                task.task_id,
            )
        return [(False, error)] * len(task.parts)

    def _forward(self, envelope: ResultEnvelope) -> None:
        """What the task's calls printed, to this process's stdout and stderr (unless
        ``forward_output=False``), and their warnings, raised again here: the same as the
        calls would show with ``n_jobs=1``. Runs in the tracker's thread, before the
        task's callbacks, so output comes in the order tasks finish."""
        if self.cfg.forward_output:
            for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
                text = envelope.output.get(name, "")
                if text:
                    try:
                        stream.write(text if text.endswith("\n") else text + "\n")
                        stream.flush()
                    except (OSError, ValueError):  # a closed stream must not lose results
                        _log.debug("could not forward the %s of a task", name)
        try:
            envelope.reemit_warnings()
        except Exception as e:  # an "error" filter: the warning becomes the caller's error
            _log.debug("a warning of a task was turned into an error: %s", e)

    def _learn(self, calls: int, timings: dict[str, float], done: TaskDone) -> None:
        run = float(timings.get("run", 0.0))
        outcome = done.outcome
        if outcome is not None and outcome.start_time and outcome.end_time:
            on_node = (outcome.end_time - outcome.start_time).total_seconds()
        else:
            on_node = run + sum(float(timings.get(k, 0.0)) for k in ("download", "upload"))
        overhead = max(on_node - run, 0.0) + self._scheduling_latency + self.cfg.poll_interval / 2
        self.sizer.record(batch_size=calls, run_seconds=run, overhead_seconds=overhead)

    def dispatched(self, future: Future[Any]) -> None:
        """Count a batch that joblib just sent (the backend calls this after every
        ``submit``) as in flight until its future resolves, then keep the slots fed.

        The batches that :meth:`_pull_tail` itself makes joblib send come back here too:
        they are counted, and find the feeding under way.
        """
        with self._lock:
            self.in_flight += 1

        def landed(_: Future[Any]) -> None:
            with self._lock:
                self.in_flight -= 1

        future.add_done_callback(landed)
        self._pull_tail()

    def _pull_tail(self) -> None:
        """Keep every slot fed: send batches ahead, and take joblib's tail as a few bundles.

        Runs after every batch sent (:meth:`dispatched`) and every task finished. joblib
        sends a first slice of ``pre_dispatch`` calls, then one batch per batch finished:
        with batches of several calls that slice may not even give each slot a task, and a
        slot whose task ends waits while the client notices, sends the next one and Batch
        schedules it. So while fewer than ``sizer.in_flight_target()`` batches are in
        flight (one running and one queued per slot), more are sent through joblib's own
        ``dispatch_next``, which keeps its bookkeeping right and asks the backend for
        their size; never while the thread that called ``Parallel`` still takes the
        ``pre_dispatch`` slice (``Features.may_take_more``).

        joblib cuts the end of its input into ``10 x n_jobs`` small batches and releases
        them one per completion. When the batches waiting in its queue are much smaller
        than the sizer's size, past the ``pre_dispatch`` slice, that is the tail: pull them
        all and bundle them, one task per slot. Only this thread dispatches meanwhile (it
        holds joblib's lock), so the queue cannot empty under us.
        """
        features = self.features
        if not features.can_pull_tail():
            return
        pulled: list[Part] = []
        with features.dispatch_lock():
            # The batches this sends come back through ``dispatched`` in this thread.
            if self._feeding or features.is_aborting() or self._state is not RunState.RUNNING:
                return
            self._feeding = True
            try:
                dispatch = features.dispatcher()
                target = self.sizer.in_flight_target()
                while not features.is_aborting() and self._state is RunState.RUNNING:
                    waiting = features.waiting_batches()
                    sizes = [len(b) if hasattr(b, "__len__") else 1 for b in waiting]
                    tail = len(sizes) >= 2 and max(sizes) * 2 <= self.sizer.size
                    if tail and features.beyond_pre_dispatch():
                        with self._lock:
                            self._pulled = []
                        try:
                            for _ in waiting:
                                dispatch()
                        finally:
                            with self._lock:
                                pulled, self._pulled = self._pulled or [], None
                        break
                    if self.in_flight >= target or not features.may_take_more():
                        break
                    before = self.in_flight
                    dispatch()
                    if self.in_flight <= before:
                        break  # nothing was left to send (or a task just ended: next time)
            finally:
                self._feeding = False
        if pulled:
            self._submitter.put(pulled)

    # ---------------------------------------------------------------- ending

    def abort(self, *, why: str = "") -> None:
        """Stop everything now: queued batches are dropped, the job's tasks terminated.

        When calls are left unfinished (Ctrl-C, an exception in the caller, a signal), one
        line on stderr says what is being cancelled and cleaned up, since that can take a
        few seconds and the user should not wonder whether anything keeps running.
        """
        with self._lock:
            if self._state is not RunState.RUNNING:
                return
            self._move(RunState.ABORTED)
            unfinished = self.calls_submitted - self.calls_completed
        # A closed terminal (SIGHUP) must not stop the clean-up.
        if unfinished > 0:
            with contextlib.suppress(OSError, ValueError):
                print(
                    f"joblib-azurebatch: {why + ': ' if why else ''}cancelling the Batch job "
                    f"{self.job_id} ({unfinished} calls unfinished): terminating its tasks, "
                    "deleting the job and its blobs"
                    + ("" if self.cfg.keep_pool else ", releasing the pool"),
                    file=sys.stderr,
                    flush=True,
                )
        self._submitter.drain()
        if Held.JOB in self._held:
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

    def close(self) -> None:
        """End the run: job terminated if needed and deleted, blobs and pool released."""
        with self._lock:
            if self._state is RunState.CLOSED:
                return
            was = self._move(RunState.CLOSED)
        _LIVE_RUNS.discard(self)
        try:
            self._close(was)
        finally:
            if not _LIVE_RUNS and (not POOLS.lingering() or _in_a_worker()):
                shutdown.release()  # nothing left for a signal to clean up

    def _close(self, was: RunState) -> None:
        if self._resumer is not None:
            self._resumer.close()
            self._resumed.shutdown(wait=False)
            if self.calls_resumed:
                _log.info("resumed %d calls from their stored results", self.calls_resumed)
        if was is RunState.NEW:
            return
        self._submitter.stop()
        if self._tracker is not None:
            self._tracker.stop()
        with self._lock:
            leftovers = [p for t in self._tasks.values() for p in t.parts]
            self._tasks.clear()
        for part in leftovers:
            part.future.cancel()
        if self._progress is not None:
            # Every task resolved means Batch reported every one completed.
            clean = not leftovers and was is not RunState.ABORTED
            self._progress.close(
                postfix=f"tasks: {self.tasks_submitted} completed" if clean else None
            )
        if Held.JOB in self._held:
            line = self.usage.line(job_id=self.job_id, pool_id=self.cfg.pool_id)
            _log.info("%s", line)
            if self._progress is not None:
                with contextlib.suppress(OSError, ValueError):
                    print(line, file=sys.stderr, flush=True)
        self._release(unfinished=bool(leftovers), aborted=was is RunState.ABORTED)

    def _release(self, *, unfinished: bool, aborted: bool) -> None:
        """Release what the run holds: the job first (it bills), then blobs (a background
        sweep, waited for a short grace), then the pool."""
        cfg, svc = self.cfg, self.account.service
        if Held.JOB in self._held:
            try:
                if (unfinished or cfg.keep_job) and not aborted:
                    svc.terminate_job(self.job_id, "joblib-azurebatch: the Parallel call ended")
                if not cfg.keep_job:
                    svc.delete_job(self.job_id)
                    _log.info("deleted the job %s", self.job_id)
            except AzureBatchError as e:
                _warn_cleanup(f"could not end the job {self.job_id}: {e}")
            self._held.discard(Held.JOB)
        if Held.BLOBS in self._held:
            if not cfg.keep_blobs:
                # What the tasks' own deletions left (the shared objects, unfinished tasks),
                # in the background: a small run's sweep ends within the grace, a large one
                # goes on after close returns and the process waits for it at exit. An
                # aborted run waits longer: after a signal the process ends right away.
                sweep = sweeper.SWEEPER.sweep(
                    self.account.store, job_prefix(self.job_id), label=f"the job {self.job_id}"
                )
                if (
                    sweep.wait(sweeper.EXIT_WAIT if aborted else sweeper.SWEEP_GRACE)
                    and sweep.error is not None
                ):
                    _warn_cleanup(
                        f"could not delete the blobs of the job {self.job_id}: {sweep.error}"
                    )
            self._held.discard(Held.BLOBS)
        if Held.POOL_LEASE in self._held and self._lease is not None:
            lease, self._lease = self._lease, None
            self._held.discard(Held.POOL_LEASE)
            try:
                self._pools.release(lease, linger=0.0 if aborted else cfg.pool_linger)
            except AzureBatchError as e:
                _warn_cleanup(f"could not delete the pool {cfg.pool_id}: {e}")


class _CountsTap:
    """The Batch service as a run's tracker sees it: the task counts it polls anyway are
    also shown on the progress line, so the line costs no request of its own."""

    def __init__(self, service: BatchApi, on_counts: Callable[[TaskCounts], None]) -> None:
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


def live_runs() -> list[JobRun]:
    """The runs of this process that are not closed yet."""
    return list(_LIVE_RUNS)


def _in_a_worker() -> bool:
    """Whether this process is a ``multiprocessing`` worker (fork, spawn or loky).

    Its pool's ``terminate`` may signal it just as it starts to wait on the task queue's
    lock, where CPython can miss the signal and a Python handler never runs (see
    `shutdown.release`): such a process keeps no handler for a pool that lingers. Its
    pool goes at the worker's end (`PoolRegistry` flushes from a multiprocessing
    finalizer) or, if its pool terminates it, drains by its idle formula.
    """
    return multiprocessing.parent_process() is not None


def close_live_runs(*, why: str = "") -> None:
    """Abort and close every run still open (at interpreter exit, or on SIGTERM / SIGHUP):
    nothing keeps running, and billing, after the process is gone."""
    for run in list(_LIVE_RUNS):
        try:
            try:
                run.abort(why=why)
            finally:
                run.close()  # whatever abort met (a dead terminal), release what is held
        except Exception:  # pragma: no cover - best effort at exit
            _log.exception("closing the job %s at exit failed", run.job_id)
    POOLS.flush()  # pools kept for a next run (pool_linger) go with the process


atexit.register(close_live_runs)


def _forget_the_parents_runs() -> None:
    """A forked child aborts and closes none of its parent's runs (:mod:`.forks`)."""
    global _LIVE_RUNS
    _LIVE_RUNS = weakref.WeakSet()


after_fork(_forget_the_parents_runs)

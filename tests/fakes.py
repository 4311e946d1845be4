"""An in-memory Batch service and a clock that tests move by hand.

:class:`FakeBatch` implements :class:`~joblib_azurebatch.service.BatchApi` with the
project's own dataclasses, so the tracker, the submitter and the run can be tested in
milliseconds, step by step, with no thread, socket or real wait. It models what those
modules must cope with on the real service: task states that move only when a test says so,
completion times taken from the fake clock, task counts that lag the listing, a listing that
omits a completed task for a while, failures of any operation on demand, and a count of
every call made.

:class:`FakeClock` stands in for :class:`~joblib_azurebatch.service.Clock`: ``sleep()``
moves the time forward at once, so code that waits for something runs without waiting.

Every method of :class:`FakeBatch` is safe to call from several threads at once (the
tracker downloads results and reads stderr from a pool of threads).
"""

from __future__ import annotations

import datetime as dt
import hmac
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from joblib_azurebatch.batch import JobInfo, PoolInfo, PoolSpec, TaskCounts, TaskOutcome, TaskSpec
from joblib_azurebatch.errors import ServiceError

if TYPE_CHECKING:
    from joblib_azurebatch.service import BatchApi, Clock

__all__ = [
    "EPOCH",
    "FakeBatch",
    "FakeBlobs",
    "FakeClock",
    "FakeJob",
    "FakePool",
    "FakeTask",
    "MemoryStore",
    "pool_spec",
]

#: The wall-clock time of a :class:`FakeClock` at ``monotonic() == 0``.
EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


class FakeClock:
    """A monotonic clock that only moves when told to (or when something sleeps on it).

    ``sleeps`` lists every ``sleep()`` asked for, so a test can check how long code chose
    to wait without waiting itself.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += max(seconds, 0.0)

    def advance(self, seconds: float) -> None:
        """Move the time forward without recording a sleep."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        with self._lock:
            self._now += seconds

    def set(self, now: float) -> None:
        """Jump to ``now`` (never backwards)."""
        with self._lock:
            if now < self._now:
                raise ValueError("a monotonic clock does not go back")
            self._now = now

    def now(self) -> dt.datetime:
        """The UTC wall-clock time that matches :meth:`monotonic` (``EPOCH`` + seconds)."""
        return EPOCH + dt.timedelta(seconds=self.monotonic())


def pool_spec(pool_id: str = "pool", **overrides: object) -> PoolSpec:
    """A valid :class:`PoolSpec` with one dedicated node of two slots, for brevity."""
    values: dict[str, object] = {
        "pool_id": pool_id,
        "vm_size": "standard_d2s_v3",
        "dedicated_nodes": 1,
        "spot_nodes": 0,
        "task_slots_per_node": 2,
        "image": "worker:1",
        "node_image_publisher": "microsoft-dsvm",
        "node_image_offer": "ubuntu-hpc",
        "node_image_sku": "2204",
        "node_agent_sku_id": "batch.node.ubuntu 22.04",
    }
    values.update(overrides)
    return PoolSpec(**values)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- state


@dataclass
class FakePool:
    """A pool: its nodes are ``creating`` until ``ready_at`` (clock time), then ``idle``.

    With ``resize_errors`` the pool gets no node at all and its allocation is steady, which
    is how the service reports a quota or an unavailable VM size.
    """

    spec: PoolSpec
    state: str = "active"
    ready_at: float = 0.0
    resize_errors: tuple[str, ...] = ()
    #: Clock time at which a deleting pool is gone.
    gone_at: float | None = None

    def info(self, now: float, *, with_nodes: bool) -> PoolInfo:
        spec = self.spec
        nodes = spec.dedicated_nodes + spec.spot_nodes
        if self.resize_errors:
            dedicated = spot = 0
            allocation, node_states = "steady", {}
        elif now < self.ready_at:
            dedicated, spot = spec.dedicated_nodes, spec.spot_nodes
            allocation, node_states = "resizing", ({"creating": nodes} if nodes else {})
        else:
            dedicated, spot = spec.dedicated_nodes, spec.spot_nodes
            allocation, node_states = "steady", ({"idle": nodes} if nodes else {})
        return PoolInfo(
            pool_id=spec.pool_id,
            state=self.state,
            allocation_state=allocation,
            vm_size=spec.vm_size,
            target_dedicated_nodes=spec.dedicated_nodes,
            target_spot_nodes=spec.spot_nodes,
            current_dedicated_nodes=dedicated,
            current_spot_nodes=spot,
            task_slots_per_node=spec.task_slots_per_node,
            image_names=(spec.image,),
            resize_errors=self.resize_errors,
            node_states=node_states if with_nodes else {},
            metadata=dict(spec.metadata),
            auto_scale=spec.autoscale_formula is not None,
        )


@dataclass
class FakeTask:
    """One task. ``transition_time`` is when it entered its current state."""

    task_id: str
    transition_time: dt.datetime
    spec: TaskSpec | None = None
    state: str = "active"
    exit_code: int | None = None
    failure: str | None = None
    node_id: str | None = None
    retry_count: int = 0
    requeue_count: int = 0
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    #: Task files by name (``stderr.txt``, ``stdout.txt``), as text.
    files: dict[str, str] = field(default_factory=dict)
    #: Listings that still leave this task out although it is completed.
    hidden_listings: int = 0
    #: Clock time before which listings leave this task out although it is completed.
    hidden_until: float | None = None

    def outcome(self) -> TaskOutcome:
        result = None
        if self.state == "completed":
            result = "success" if self.failure is None and self.exit_code == 0 else "failure"
        return TaskOutcome(
            task_id=self.task_id,
            state=self.state,
            transition_time=self.transition_time,
            exit_code=self.exit_code,
            failure=self.failure,
            result=result,
            retry_count=self.retry_count,
            requeue_count=self.requeue_count,
            start_time=self.start_time,
            end_time=self.end_time,
            node_id=self.node_id,
        )


@dataclass
class FakeJob:
    job_id: str
    pool_id: str
    state: str = "active"
    termination_reason: str | None = None
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    #: What ``task_counts`` answers instead of the truth while set (see ``freeze_counts``).
    counts_override: TaskCounts | None = None

    def info(self) -> JobInfo:
        return JobInfo(
            job_id=self.job_id,
            pool_id=self.pool_id,
            state=self.state,
            metadata=dict(self.metadata),
            terminate_reason=self.termination_reason or "",
        )


# ------------------------------------------------------------------------------- service


class FakeBatch:
    """An in-memory Azure Batch account that implements ``BatchApi``.

    Nothing moves on its own: tasks stay ``active`` until a test calls :meth:`start`,
    :meth:`complete` or :meth:`requeue`, and pools come up when the clock reaches their
    ``ready_at``. The operations raise the project's :class:`ServiceError` where the real
    :class:`~joblib_azurebatch.batch.BatchService` would (a missing job, a refused id).

    Observation: ``calls`` counts every call per operation name (a call that was made to
    fail counts too), ``listings`` records the ``since`` of every ``completed_tasks`` call
    (``None`` for a full listing), ``added`` records the task ids of every ``add_tasks``
    call, ``terminated`` and ``deleted_jobs`` / ``deleted_pools`` what was ended.

    Failures: ``fail("task_counts", ServiceError("503"), times=2)`` makes the next two
    calls of that operation raise the error instead of answering.
    """

    def __init__(
        self,
        clock: FakeClock | None = None,
        *,
        boot_seconds: float = 0.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.clock = clock if clock is not None else FakeClock()
        #: How long a pool that ``ensure_pool`` creates takes to have idle nodes.
        self.boot_seconds = boot_seconds
        #: How long the waiting operations sleep (on the fake clock) between looks.
        self.poll_seconds = poll_seconds
        self.pools: dict[str, FakePool] = {}
        self.jobs: dict[str, FakeJob] = {}
        self.calls: Counter[str] = Counter()
        self.listings: list[dt.datetime | None] = []
        self.added: list[list[str]] = []
        self.terminated: list[tuple[str, str]] = []
        self.deleted_jobs: list[str] = []
        self.deleted_pools: list[str] = []
        #: Job id -> the metadata it was created or last updated with.
        self.job_metadata: dict[str, dict[str, str]] = {}
        #: Pool id -> the autoscale formula last enabled on it.
        self.autoscale: dict[str, str] = {}
        self._failures: dict[str, list[tuple[BaseException, int]]] = {}
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- test controls

    def fail(self, operation: str, error: BaseException, *, times: int = 1) -> None:
        """Make the next ``times`` calls of ``operation`` raise ``error``.

        Several rules for one operation apply one after the other, in the order given.
        """
        if not callable(getattr(self, operation, None)) or operation.startswith("_"):
            raise ValueError(f"FakeBatch has no operation {operation!r}")
        with self._lock:
            self._failures.setdefault(operation, []).append((error, times))

    def add_pool(
        self,
        spec: PoolSpec | str = "pool",
        *,
        state: str = "active",
        boot_seconds: float = 0.0,
        resize_errors: Iterable[str] = (),
    ) -> FakePool:
        """A pool that exists before the code under test runs (by spec or just by id)."""
        if isinstance(spec, str):
            spec = pool_spec(spec)
        pool = FakePool(
            spec=spec,
            state=state,
            ready_at=self.clock.monotonic() + boot_seconds,
            resize_errors=tuple(resize_errors),
        )
        with self._lock:
            self.pools[spec.pool_id] = pool
        return pool

    def add_job(self, job_id: str = "job", pool_id: str = "pool") -> FakeJob:
        """A job that exists before the code under test runs (its pool need not exist)."""
        with self._lock:
            job = self.jobs[job_id] = FakeJob(job_id=job_id, pool_id=pool_id)
        return job

    def add_task(self, job_id: str, task_id: str, *, spec: TaskSpec | None = None) -> FakeTask:
        """An ``active`` task, as if added through ``add_tasks``."""
        with self._lock:
            job = self._job(job_id)
            task = job.tasks[task_id] = FakeTask(
                task_id=task_id, transition_time=self.clock.now(), spec=spec
            )
        return task

    def task(self, job_id: str, task_id: str) -> FakeTask:
        with self._lock:
            return self._job(job_id).tasks[task_id]

    def start(self, job_id: str, task_id: str, *, node_id: str = "node-1") -> FakeTask:
        """``active`` -> ``running`` on ``node_id``, now."""
        with self._lock:
            task = self.task(job_id, task_id)
            now = self.clock.now()
            task.state, task.transition_time = "running", now
            task.node_id, task.start_time = node_id, now
        return task

    def complete(
        self,
        job_id: str,
        task_id: str,
        *,
        exit_code: int | None = 0,
        failure: str | None = None,
        node_id: str | None = "node-1",
        retry_count: int | None = None,
        stderr: str | None = None,
        at: dt.datetime | None = None,
        hidden_listings: int = 0,
        hidden_for: float | None = None,
    ) -> FakeTask:
        """Move a task to ``completed`` (adding it if the job does not have it yet).

        ``at`` is the completion time (default: the clock's now), ``failure`` the
        ``"code: message"`` of a failureInfo. ``hidden_listings`` / ``hidden_for`` make
        the listing leave the task out for that many listings / clock seconds while the
        counts already include it: the lag the service shows between the two.
        """
        with self._lock:
            job = self._job(job_id)
            task = job.tasks.get(task_id) or self.add_task(job_id, task_id)
            when = at if at is not None else self.clock.now()
            if task.start_time is None:
                task.start_time = when
            task.state, task.transition_time, task.end_time = "completed", when, when
            task.exit_code, task.failure = exit_code, failure
            task.node_id = node_id if node_id is not None else task.node_id
            if retry_count is not None:
                task.retry_count = retry_count
            if stderr is not None:
                task.files["stderr.txt"] = stderr
            task.hidden_listings = hidden_listings
            task.hidden_until = (
                self.clock.monotonic() + hidden_for if hidden_for is not None else None
            )
        return task

    def requeue(self, job_id: str, task_id: str) -> FakeTask:
        """Put a running task back in the queue, as a preempted node does (no retry charged)."""
        with self._lock:
            task = self.task(job_id, task_id)
            task.state, task.transition_time = "active", self.clock.now()
            task.node_id = task.start_time = None
            task.requeue_count += 1
        return task

    def set_file(self, job_id: str, task_id: str, path: str, text: str) -> None:
        """Give a task a file (``stdout.txt``, ``stderr.txt``) for ``read_task_file``."""
        with self._lock:
            self.task(job_id, task_id).files[path] = text

    def freeze_counts(self, job_id: str, counts: TaskCounts | None = None) -> None:
        """Make ``task_counts`` answer ``counts`` (default: the counts of now) until
        :meth:`unfreeze_counts`, whatever the tasks do: counts that lag the listing."""
        with self._lock:
            job = self._job(job_id)
            job.counts_override = counts if counts is not None else self._true_counts(job)

    def unfreeze_counts(self, job_id: str) -> None:
        with self._lock:
            self._job(job_id).counts_override = None

    # ---------------------------------------------------------------- internals

    def _enter(self, operation: str) -> None:
        """Count the call and raise the injected failure, if one is due."""
        with self._lock:
            self.calls[operation] += 1
            rules = self._failures.get(operation)
            if not rules:
                return
            error, left = rules[0]
            if left <= 1:
                rules.pop(0)
            else:
                rules[0] = (error, left - 1)
        raise error

    def _job(self, job_id: str) -> FakeJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise ServiceError(
                f"could not reach the job {job_id}: the Batch service answered 404 JobNotFound",
                404,
                "JobNotFound",
            )
        return job

    def _live_pool(self, pool_id: str) -> FakePool | None:
        pool = self.pools.get(pool_id)
        if pool is not None and pool.gone_at is not None and self.clock.monotonic() >= pool.gone_at:
            del self.pools[pool_id]
            return None
        return pool

    @staticmethod
    def _true_counts(job: FakeJob) -> TaskCounts:
        states = Counter(t.state for t in job.tasks.values())
        done = [t for t in job.tasks.values() if t.state == "completed"]
        succeeded = sum(1 for t in done if t.failure is None and t.exit_code == 0)
        return TaskCounts(
            active=states["active"],
            running=states["running"],
            completed=len(done),
            succeeded=succeeded,
            failed=len(done) - succeeded,
        )

    # ---------------------------------------------------------------- BatchApi: pools

    def get_pool(self, pool_id: str) -> PoolInfo | None:
        self._enter("get_pool")
        with self._lock:
            pool = self._live_pool(pool_id)
            return pool.info(self.clock.monotonic(), with_nodes=False) if pool else None

    def ensure_pool(self, spec: PoolSpec, *, timeout: float = 600.0) -> tuple[PoolInfo, bool]:
        self._enter("ensure_pool")
        deadline = self.clock.monotonic() + timeout
        while True:
            with self._lock:
                pool = self._live_pool(spec.pool_id)
                if pool is None:
                    pool = self.pools[spec.pool_id] = FakePool(
                        spec=spec, ready_at=self.clock.monotonic() + self.boot_seconds
                    )
                    return pool.info(self.clock.monotonic(), with_nodes=False), True
                if pool.state != "deleting":
                    return pool.info(self.clock.monotonic(), with_nodes=False), False
            if self.clock.monotonic() > deadline:
                raise ServiceError(
                    f"the pool {spec.pool_id} has been deleting for over {timeout:.0f} s"
                )
            self.clock.sleep(self.poll_seconds)

    def wait_for_capacity(
        self,
        pool_id: str,
        *,
        min_slots: int,
        timeout: float,
        progress: Callable[[PoolInfo], None],
    ) -> PoolInfo:
        self._enter("wait_for_capacity")
        deadline = self.clock.monotonic() + timeout
        while True:
            with self._lock:
                pool = self._live_pool(pool_id)
                if pool is None:
                    raise ServiceError(
                        f"the pool {pool_id} was deleted while waiting for its nodes"
                    )
                info = pool.info(self.clock.monotonic(), with_nodes=True)
            progress(info)
            if info.ready_slots >= min_slots:
                return info
            if info.allocation_state == "steady" and info.ready_nodes == 0:
                if info.resize_errors:
                    raise ServiceError(
                        f"the pool {pool_id} could not get nodes: " + "; ".join(info.resize_errors)
                    )
                if info.target_dedicated_nodes + info.target_spot_nodes == 0:
                    raise ServiceError(f"the pool {pool_id} is sized to zero nodes")
            if self.clock.monotonic() > deadline:
                raise ServiceError(
                    f"the pool {pool_id} had no usable task slot after {timeout:.0f} s"
                )
            self.clock.sleep(self.poll_seconds)

    def pool_status(self, pool_id: str) -> PoolInfo | None:
        self._enter("pool_status")
        with self._lock:
            pool = self._live_pool(pool_id)
            return pool.info(self.clock.monotonic(), with_nodes=True) if pool else None

    def list_pools(self) -> list[PoolInfo]:
        self._enter("list_pools")
        with self._lock:
            now = self.clock.monotonic()
            return [
                p.info(now, with_nodes=False)
                for p in self.pools.values()
                if self._live_pool(p.spec.pool_id) is not None
            ]

    def enable_autoscale(self, pool_id: str, formula: str) -> None:
        self._enter("enable_autoscale")
        with self._lock:
            self.autoscale[pool_id] = formula

    def delete_pool(self, pool_id: str) -> None:
        """Deleting lasts ``poll_seconds`` of clock time; a second delete is a no-op."""
        self._enter("delete_pool")
        with self._lock:
            pool = self._live_pool(pool_id)
            if pool is None or pool.state == "deleting":
                return
            pool.state = "deleting"
            pool.gone_at = self.clock.monotonic() + self.poll_seconds
            self.deleted_pools.append(pool_id)

    # ---------------------------------------------------------------- BatchApi: jobs

    def create_job(
        self, job_id: str, pool_id: str, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        self._enter("create_job")
        with self._lock:
            if job_id in self.jobs:
                raise ServiceError(
                    f"could not create the job {job_id}: the Batch service answered "
                    "409 JobExists: The specified job already exists."
                )
            self.jobs[job_id] = FakeJob(
                job_id=job_id, pool_id=pool_id, metadata=dict(metadata or {})
            )
            self.job_metadata[job_id] = dict(metadata or {})

    def list_jobs(self, *, pool_id: str | None = None) -> list[JobInfo]:
        self._enter("list_jobs")
        with self._lock:
            return [j.info() for j in self.jobs.values() if pool_id is None or j.pool_id == pool_id]

    def get_job(self, job_id: str) -> JobInfo | None:
        self._enter("get_job")
        with self._lock:
            job = self.jobs.get(job_id)
            return None if job is None else job.info()

    def set_job_metadata(self, job_id: str, metadata: Mapping[str, str]) -> None:
        self._enter("set_job_metadata")
        with self._lock:
            self._job(job_id).metadata = dict(metadata)
            self.job_metadata[job_id] = dict(metadata)

    def terminate_job(self, job_id: str, reason: str, *, wait: float = 60.0) -> None:
        """The job becomes ``completed``; its tasks are left as they are (tests move them)."""
        self._enter("terminate_job")
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None or job.state == "completed":
                return
            job.state, job.termination_reason = "completed", reason
            self.terminated.append((job_id, reason))

    def delete_job(self, job_id: str) -> None:
        self._enter("delete_job")
        with self._lock:
            if self.jobs.pop(job_id, None) is not None:
                self.deleted_jobs.append(job_id)

    # ---------------------------------------------------------------- BatchApi: tasks

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> None:
        """Adds every task as ``active``; an id already there is kept as it is, the way the
        real service answers ``TaskExists`` and ``BatchService`` counts that as added."""
        self._enter("add_tasks")
        with self._lock:
            job = self._job(job_id)
            if job.state != "active":
                raise ServiceError(
                    f"could not add {len(tasks)} tasks to the job {job_id}: the Batch service "
                    "answered 409 JobCompleted"
                )
            self.added.append([t.task_id for t in tasks])
            now = self.clock.now()
            for spec in tasks:
                if spec.task_id not in job.tasks:
                    job.tasks[spec.task_id] = FakeTask(
                        task_id=spec.task_id, transition_time=now, spec=spec
                    )

    def task_counts(self, job_id: str) -> TaskCounts:
        self._enter("task_counts")
        with self._lock:
            job = self._job(job_id)
            if job.counts_override is not None:
                return job.counts_override
            return self._true_counts(job)

    def completed_tasks(
        self, job_id: str, *, since: dt.datetime | None = None
    ) -> list[TaskOutcome]:
        """Completed tasks with ``transition_time >= since``, oldest first, less the hidden."""
        self._enter("completed_tasks")
        with self._lock:
            job = self._job(job_id)
            self.listings.append(since)
            now = self.clock.monotonic()
            out: list[TaskOutcome] = []
            for task in job.tasks.values():
                if task.state != "completed":
                    continue
                if task.hidden_listings > 0:
                    task.hidden_listings -= 1
                    continue
                if task.hidden_until is not None and now < task.hidden_until:
                    continue
                if since is None or task.transition_time >= since:
                    out.append(task.outcome())
            out.sort(key=lambda o: (o.transition_time, o.task_id))
            return out

    def read_task_file(
        self, job_id: str, task_id: str, path: str, *, tail_bytes: int = 4096
    ) -> str:
        """The last ``tail_bytes`` of the file, "" when there is none (the real one never
        raises either, unless a test injects a failure)."""
        self._enter("read_task_file")
        with self._lock:
            job = self.jobs.get(job_id)
            task = job.tasks.get(task_id) if job is not None else None
            text = task.files.get(path, "") if task is not None else ""
        data = text.encode("utf-8")[-tail_bytes:] if tail_bytes > 0 else b""
        return data.decode("utf-8", errors="replace")


class FakeBlobs:
    """Result blobs by task id, as the tracker's ``fetch`` callable sees them.

    ``put(task_id, data, missing_first=n)`` makes the first ``n`` fetches of that task
    raise ``FileNotFoundError`` before the blob shows up (an upload the listing got ahead
    of); a task never put is missing for good. ``fetches`` counts the calls per task.
    """

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.fetches: Counter[str] = Counter()
        self._missing: Counter[str] = Counter()
        self._lock = threading.Lock()

    def put(self, task_id: str, data: bytes, *, missing_first: int = 0) -> None:
        with self._lock:
            self.blobs[task_id] = data
            self._missing[task_id] = missing_first

    def __call__(self, task_id: str) -> bytes:
        with self._lock:
            self.fetches[task_id] += 1
            if self._missing[task_id] > 0:
                self._missing[task_id] -= 1
                raise FileNotFoundError(task_id)
            if task_id not in self.blobs:
                raise FileNotFoundError(task_id)
            return self.blobs[task_id]


if TYPE_CHECKING:

    def _conforms(batch: FakeBatch, clock: FakeClock) -> tuple[BatchApi, Clock]:
        """A type checker run over this file fails here when the fakes drift from the
        protocols they stand in for."""
        return batch, clock


class MemoryStore:
    """The `payload.ObjectStore` interface in memory, counting what is written; its SAS URLs
    are plain text that names the blob, the permission and the expiry."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.uploads: list[str] = []
        self.lock = threading.Lock()
        #: What `derived_secret` returns: None stands for a client without the account key.
        self.account_secret: bytes | None = None

    def derived_secret(self, purpose: str) -> bytes | None:
        if self.account_secret is None:
            return None
        return hmac.new(self.account_secret, purpose.encode(), "sha256").digest()

    def upload(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        with self.lock:
            if not overwrite and name in self.blobs:
                raise FileExistsError(name)
            self.blobs[name] = bytes(data)
            self.uploads.append(name)

    def download(self, name: str) -> bytes:
        """As `BlobStore.download`: `FileNotFoundError` for a blob that does not exist."""
        try:
            return self.blobs[name]
        except KeyError:
            raise FileNotFoundError(name) from None

    def upload_if_absent(self, name: str, data: bytes) -> bool:
        try:
            self.upload(name, data, overwrite=False)
        except FileExistsError:
            return False
        return True

    def sas_url(
        self, name: str, *, read: bool = False, write: bool = False, expiry: dt.timedelta
    ) -> str:
        assert read != write, "a task URL grants read or write, not both"
        return f"memory://{name}?{'r' if read else 'cw'}&se={expiry.total_seconds():.0f}"

    def object_uploads(self) -> list[str]:
        return [name for name in self.uploads if "/objects/" in name]


class Calls:
    """Stands in for joblib's BatchedCalls: callable, with a length."""

    def __init__(self, *xs: int) -> None:
        self.xs = xs

    def __len__(self) -> int:
        return len(self.xs)

    def __call__(self) -> list[int]:
        return [2 * x for x in self.xs]

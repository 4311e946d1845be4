"""The thread that prepares joblib batches and adds them to the job as Batch tasks.

``submit`` must return at once, yet each batch has to be pickled, signed, uploaded and
added to the job. So the run puts groups of batches on this submitter's queue and its one
thread does the rest: it waits a moment (``LINGER``) for more groups, so that joblib's first
burst of ``pre_dispatch`` batches goes out in one request, turns groups into tasks (one
batch per task, or a group of pulled tail batches split into one bundle per slot),
prepares them on a small thread pool and adds them with ``add_tasks`` (which chunks into
``create_task_collection`` calls of at most 100).

With a `PayloadWriter`'s ``prepare``, a flush is prepared in two phases on that pool: every
task is dumped (pickled), then the writer stores the flush at once, so that it sees which
large objects several calls share (stored once per job) and which one call alone uses
(sent inside that task's payload). A part's calls are dropped as soon as its task is
dumped: neither the submitter nor the writer keeps a user's object past that point.

Every task handed to the submitter is registered with the run (``register``) before it is
added, and every failure before the task reaches Batch (an unpicklable call, an upload or
submission error) is reported through ``fail``, so that every callback still comes from the
tracker's one thread and no future is left unresolved.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from . import shutdown
from .batch import ResourceFile, TaskSpec
from .bundle import Bundle
from .payload import DumpedTask, PayloadWriter, PreparedTask

if TYPE_CHECKING:
    from .service import BatchApi

__all__ = ["WORKER_COMMAND", "Part", "Submitter", "Task", "TaskTemplate", "split_parts"]

_log = logging.getLogger(__name__)

#: What every task runs inside the worker image.
WORKER_COMMAND = "python -m joblib_azurebatch.worker"

#: Seconds the submitter waits for more batches before a flush.
LINGER = 0.02
#: At most this many queued groups go into one flush.
MAX_FLUSH = 500
#: Tasks pickled and uploaded at once.
PREPARE_WORKERS = 8


@dataclass
class Part:
    """One joblib batch handed to ``submit``: its future and joblib's callback."""

    future: Future[Any]
    callback: Callable[[Any], Any] | None
    size: int
    calls: Any = None


@dataclass
class Task:
    """One Batch task: one part, or a :class:`Bundle` of several tail parts."""

    task_id: str
    parts: list[Part]
    bundled: bool
    prepared: PreparedTask | None = None
    #: Pickled but not stored yet (the first task: dumped before anything exists in Azure,
    #: stored with the first flush).
    dumped: DumpedTask | None = None
    #: How often the task was prepared again under a new id because its URLs expired.
    refreshes: int = 0

    @property
    def calls(self) -> int:
        return sum(p.size for p in self.parts)


@dataclass(frozen=True)
class TaskTemplate:
    """What every task of a job shares (from the config)."""

    image: str
    max_retries: int
    max_wall_clock: float | None
    command_line: str = WORKER_COMMAND
    #: Files and settings every task adds (on the default path: bootstrap.py and the
    #: environment bundle's URL).
    resource_files: tuple[ResourceFile, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)


#: A queued group: tasks already made (the first one), or parts to turn into tasks.
Group = list[Task] | list[Part]


def split_parts(parts: list[Part], groups: int) -> list[list[Part]]:
    """Consecutive groups of parts with about the same number of calls each."""
    groups = max(1, min(groups, len(parts)))
    total = sum(p.size for p in parts)
    out: list[list[Part]] = []
    current: list[Part] = []
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


class Submitter:
    """Owns the queue of batches not yet in Batch, and the thread that empties it.

    ``prepare`` turns one task's calls into a `PreparedTask`. When it is the ``prepare`` of
    a `PayloadWriter`, each flush is prepared through that writer in two phases instead
    (`PayloadWriter.dump`, then `PayloadWriter.store` for the whole flush).
    """

    def __init__(
        self,
        service: BatchApi,
        job_id: str,
        *,
        prepare: Callable[[str, Any], PreparedTask],
        template: TaskTemplate,
        n_jobs: int,
        new_task_id: Callable[[], str],
        register: Callable[[list[Task]], None],
        fail: Callable[[str, BaseException], None],
        is_open: Callable[[], bool],
        on_dumped: Callable[[int, int], None] | None = None,
    ) -> None:
        self._service = service
        #: ``on_dumped(calls, nbytes)`` after each task is pickled (the sizer's memory cap).
        self._on_dumped = on_dumped
        self._job_id = job_id
        self._prepare_calls = prepare
        owner = getattr(prepare, "__self__", None)
        self._writer = owner if isinstance(owner, PayloadWriter) else None
        self.template = template
        self._n_jobs = max(1, n_jobs)
        self._new_task_id = new_task_id
        self._register = register
        self._fail = fail
        self._is_open = is_open
        # SimpleQueue: put() is reentrant, so a signal handler that drains it cannot deadlock.
        self._queue: queue.SimpleQueue[Group | None] = queue.SimpleQueue()
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        #: Counters for tests and benchmarks.
        self.tasks_submitted = 0
        self.bundles_submitted = 0

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=PREPARE_WORKERS,
            thread_name_prefix=f"azurebatch-prepare-{self._job_id}",
            initializer=shutdown.hold_signals,
        )
        self._thread = threading.Thread(
            target=self.run_forever, name=f"azurebatch-submit-{self._job_id}", daemon=True
        )
        shutdown.start(self._thread)

    def put(self, group: Group) -> None:
        self._queue.put(group)

    def drain(self) -> None:
        """Drop what was not submitted yet (its futures are cancelled) and stop the thread."""
        while True:
            try:
                group = self._queue.get_nowait()
            except queue.Empty:
                break
            for item in group or ():
                parts = item.parts if isinstance(item, Task) else [item]
                for part in parts:
                    part.future.cancel()
        self._queue.put(None)

    def stop(self, *, wait: float = 10.0) -> None:
        """Drain, wait for the thread (unless called from it) and drop the prepare pool."""
        self.drain()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- the thread

    def run_forever(self) -> None:
        """Flush groups until ``None`` arrives or the run is no longer open."""
        while True:
            items, stop = self._collect()
            if items is None or not self._is_open():
                return
            tasks = self.tasks_of(items)
            try:
                self.flush(tasks)
            except BaseException as e:  # never let the thread die with tasks unresolved
                for task in tasks:
                    self._fail(task.task_id, e)
            if stop:
                return

    def _collect(self) -> tuple[list[Group] | None, bool]:
        """One group, plus whatever else arrives within ``LINGER`` (up to ``MAX_FLUSH``)."""
        item = self._queue.get()
        if item is None:
            return None, True
        items: list[Group] = [item]
        deadline = time.monotonic() + LINGER
        while len(items) < MAX_FLUSH:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                return items, True
            items.append(nxt)
        return items, False

    def tasks_of(self, groups: list[Group]) -> list[Task]:
        """Tasks from queued groups: one part is one task; a group of several parts (the
        pulled tail) becomes one bundle per slot."""
        tasks: list[Task] = []
        for group in groups:
            if group and isinstance(group[0], Task):
                tasks.extend(t for t in group if isinstance(t, Task))
                continue
            parts = [p for p in group if isinstance(p, Part)]
            if len(parts) == 1:
                tasks.append(Task(self._new_task_id(), parts, bundled=False))
            else:
                for chunk in split_parts(parts, self._n_jobs):
                    tasks.append(Task(self._new_task_id(), chunk, bundled=len(chunk) > 1))
        return tasks

    @staticmethod
    def _calls_of(task: Task) -> Any:
        """What the task runs: its one batch, or a `Bundle` of its parts' batches."""
        if task.bundled:
            return Bundle([p.calls for p in task.parts])
        return task.parts[0].calls

    def _prepare(self, task: Task) -> PreparedTask | BaseException:
        if task.prepared is not None:
            return task.prepared
        try:
            return self._prepare_calls(task.task_id, self._calls_of(task))
        except BaseException as e:
            return e
        finally:
            for part in task.parts:
                part.calls = None

    def _dump(self, writer: PayloadWriter, task: Task) -> PreparedTask | DumpedTask | BaseException:
        """Phase one of a flush: the task pickled (or as it already is)."""
        if task.prepared is not None:
            return task.prepared
        if task.dumped is not None:
            return task.dumped
        try:
            dumped = writer.dump(task.task_id, self._calls_of(task))
        except BaseException as e:
            return e
        else:
            if self._on_dumped is not None:
                self._on_dumped(task.calls, dumped.nbytes)
            return dumped
        finally:
            for part in task.parts:
                part.calls = None

    def prepare_all(self, tasks: list[Task]) -> list[PreparedTask | BaseException]:
        """Prepare the tasks of one flush, on the prepare pool; a result or error per task."""
        mapper: Any = self._pool.map if self._pool is not None else map
        writer = self._writer
        try:
            if writer is None:
                return list(mapper(self._prepare, tasks))
            dumped = list(mapper(partial(self._dump, writer), tasks))
            todo = [d for d in dumped if isinstance(d, DumpedTask)]
            stored = iter(writer.store(todo, map=mapper))
            return [next(stored) if isinstance(d, DumpedTask) else d for d in dumped]
        finally:
            for task in tasks:
                task.dumped = None
                for part in task.parts:
                    part.calls = None

    def spec_of(self, prepared: PreparedTask) -> TaskSpec:
        """The Batch task for a prepared payload, from the job's template."""
        return TaskSpec(
            task_id=prepared.task_id,
            command_line=self.template.command_line,
            image=self.template.image,
            environment={**self.template.environment, **prepared.environment},
            resource_files=self.template.resource_files,
            max_retries=self.template.max_retries,
            max_wall_clock=self.template.max_wall_clock,
        )

    def flush(self, tasks: list[Task]) -> None:
        """Register, prepare and add ``tasks``; a failure fails only the tasks it concerns."""
        self._register(tasks)
        prepared = self.prepare_all(tasks)
        specs: list[TaskSpec] = []
        for task, result in zip(tasks, prepared, strict=True):
            if isinstance(result, BaseException):
                self._fail(task.task_id, result)
                continue
            specs.append(self.spec_of(result))
            self.tasks_submitted += 1
            self.bundles_submitted += int(task.bundled)
        if not specs or not self._is_open():
            return
        try:
            self._service.add_tasks(self._job_id, specs)
        except BaseException as e:
            for spec in specs:
                self._fail(spec.task_id, e)

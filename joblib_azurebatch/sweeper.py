"""Deleting a run's blobs in the background, so that no callback and no ``close`` waits on it.

A task's payload and result blobs are of no more use once Batch reports the task completed
(it never runs a completed task again) and its callback ran: the run hands their names to
:meth:`Sweeper.discard` right then. A few worker threads delete them with blob batch requests
(:meth:`~joblib_azurebatch.storage.BlobStore.delete_blobs`, up to 256 names a request),
several requests at once. What piles up while a request is out goes into the next one, so a
busy run pays far fewer requests than it has tasks, and its end finds little left to delete.

At the end of a run, :meth:`Sweeper.sweep` deletes what is left under the job's prefix: the
shared objects (``jobs/{job}/objects/``, used by every task, so never deleted before), the
tasks whose callback never ran, the payloads of tasks that were prepared again under a new
id. The run waits for that sweep only a short grace (:data:`SWEEP_GRACE`): a small run
returns with nothing left, a large one returns at once and its sweep goes on here.

The process waits for the sweeps still under way when it exits, at most :data:`EXIT_WAIT`
seconds (an ``atexit`` function); once that wait has begun, a new sweep (a run closed by
``close_live_runs`` at exit) runs in the calling thread instead. Whatever is left anyway (a
process killed, an exit that gave up waiting) is found by `joblib-azurebatch cleanup`.

Deleting is best effort: a failure is logged, and for a sweep also warned, with the hint to
run `cleanup`; it is never raised into the run, whose results are all delivered by then.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Protocol

from . import shutdown
from .forks import after_fork

__all__ = ["EXIT_WAIT", "SWEEPER", "SWEEP_GRACE", "Deleter", "Sweep", "Sweeper"]

_log = logging.getLogger(__name__)

#: Seconds ``close`` waits for the end-of-run sweep before it returns and leaves the rest to
#: the background (a few requests: a small run is clean when its ``Parallel`` call returns).
SWEEP_GRACE = 1.0
#: Seconds the process waits at exit for the sweeps still under way.
EXIT_WAIT = 60.0
#: Deleting threads per process, and names per batch request.
WORKERS = 4
CHUNK = 256
#: Seconds an idle worker thread waits for work before it ends.
IDLE_SECONDS = 5.0


class Deleter(Protocol):
    """The two deletions of :class:`~joblib_azurebatch.storage.BlobStore` the sweeper uses."""

    def delete_blobs(self, names: Sequence[str]) -> int: ...

    def delete_prefix(self, prefix: str) -> int: ...


class Sweep:
    """One end-of-run sweep of a prefix: :meth:`wait` for it, then read ``deleted``/``error``."""

    def __init__(self, store: Deleter, prefix: str, *, label: str) -> None:
        self.store = store
        self.prefix = prefix
        #: Whose blobs, for the messages ("the job ...").
        self.label = label
        self.deleted = 0
        self.error: BaseException | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the sweep ended (well or not) within ``timeout`` seconds."""
        return self._done.wait(timeout)

    def run(self) -> None:
        """Delete what is under the prefix now, in the calling thread."""
        try:
            self.deleted = self.store.delete_prefix(self.prefix)
            _log.info("deleted %d blobs of %s", self.deleted, self.label)
        except Exception as e:  # reported, never raised: the run's results are delivered
            self.error = e
            _log.warning(
                "could not delete the blobs of %s: %s; run `joblib-azurebatch cleanup` to "
                "remove them",
                self.label,
                e,
            )
        finally:
            self._done.set()


class Sweeper:
    """A few daemon threads that delete blobs for every run of the process.

    ``workers`` threads at most, started when there is work and ending after
    :data:`IDLE_SECONDS` without any. Sweeps go before discarded names: ``close`` waits on
    them. Counters (``requests``, ``deleted``, ``most_at_once``) are for tests and benchmarks.
    """

    def __init__(self, *, workers: int = WORKERS, chunk: int = CHUNK) -> None:
        self._workers = workers
        self._chunk = chunk
        self._start_empty()

    def _start_empty(self) -> None:
        self._cond = threading.Condition()
        # Names waiting, per store (by identity: a store need not be hashable), in order.
        self._names: dict[int, tuple[Deleter, list[str]]] = {}
        self._sweeps: collections.deque[Sweep] = collections.deque()
        self._threads = 0
        self._busy = 0
        self._exiting = False
        self.requests = 0
        self.deleted = 0
        self.most_at_once = 0

    def forget_after_fork(self) -> None:
        """In a forked child: the names and sweeps queued are the parent's to delete, and
        the threads counted (and the lock one of them may have held) are not in this
        process; start empty (:mod:`joblib_azurebatch.forks`)."""
        self._start_empty()

    # ---------------------------------------------------------------- public

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        with self._cond:
            return self._threads

    def discard(self, store: Deleter, names: Iterable[str]) -> None:
        """Delete ``names`` soon, in the background (at exit: left to the run's sweep)."""
        names = list(names)
        if not names:
            return
        with self._cond:
            if self._exiting:
                return
            _, waiting = self._names.setdefault(id(store), (store, []))
            waiting.extend(names)
            self._start_worker()
            self._cond.notify()

    def sweep(self, store: Deleter, prefix: str, *, label: str) -> Sweep:
        """Delete everything under ``prefix`` in the background; names of that prefix still
        waiting are dropped (the sweep deletes them). Runs at once in this thread at exit."""
        job = Sweep(store, prefix, label=label)
        with self._cond:
            entry = self._names.get(id(store))
            if entry is not None:
                entry[1][:] = [n for n in entry[1] if not n.startswith(prefix)]
                if not entry[1]:
                    del self._names[id(store)]
            inline = self._exiting
            if not inline:
                self._sweeps.append(job)
                self._start_worker()
                self._cond.notify()
        if inline:
            job.run()
        return job

    def wait(self, timeout: float | None = None) -> bool:
        """Whether everything queued so far was deleted (or failed) within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(self._idle, timeout)

    def finish(self, timeout: float) -> bool:
        """At exit: wait up to ``timeout`` for what is queued; sweeps asked for from now on
        run in their caller's thread, since nothing would wait for a background one."""
        with self._cond:
            self._exiting = True
        started = time.monotonic()
        if self.wait(timeout):
            return True
        with self._cond:
            left = sum(len(names) for _, names in self._names.values())
            sweeps = [f"the blobs of {s.label}" for s in self._sweeps]
        message = (
            f"joblib-azurebatch: gave up after {time.monotonic() - started:.0f} s deleting "
            f"blobs at exit ({left} blobs of finished tasks"
            + (f"; {', '.join(sweeps)}" if sweeps else "")
            + " left). Run `joblib-azurebatch cleanup` to remove them."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return False

    # ---------------------------------------------------------------- the threads

    def _idle(self) -> bool:
        return not self._names and not self._sweeps and self._busy == 0

    def _start_worker(self) -> None:
        """Start threads while the work waiting (sweeps, chunks of names) outnumbers the
        free ones, up to ``workers`` (under the lock)."""
        work = len(self._sweeps) + sum(
            -(-len(names) // self._chunk) for _, names in self._names.values()
        )
        while self._threads < self._workers and self._threads - self._busy < work:
            self._threads += 1
            shutdown.start(
                threading.Thread(target=self._work, name="azurebatch-sweeper", daemon=True)
            )

    def _take(self) -> Sweep | tuple[Deleter, list[str]] | None:
        """The next piece of work (under the lock): a sweep, else up to ``chunk`` names."""
        if self._sweeps:
            return self._sweeps.popleft()
        for key, (store, names) in self._names.items():
            taken, names[:] = names[: self._chunk], names[self._chunk :]
            if not names:
                del self._names[key]
            return store, taken
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                item = self._take()
                while item is None:
                    woke = self._cond.wait(IDLE_SECONDS)
                    item = self._take()
                    if item is None and not woke:
                        self._threads -= 1
                        self._cond.notify_all()
                        return
                self._busy += 1
                self.most_at_once = max(self.most_at_once, self._busy)
            try:
                if isinstance(item, Sweep):
                    item.run()
                else:
                    self._delete(*item)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _delete(self, store: Deleter, names: list[str]) -> None:
        with self._cond:
            self.requests += 1
        try:
            deleted = store.delete_blobs(names)
        except Exception as e:  # the run's sweep deletes them at its end
            _log.warning(
                "could not delete %d blobs of finished tasks (the end of the run tries again): %s",
                len(names),
                e,
            )
            return
        with self._cond:
            self.deleted += deleted


#: The sweeper of this process's runs.
SWEEPER = Sweeper()


def _finish_at_exit() -> None:
    SWEEPER.finish(EXIT_WAIT)


atexit.register(_finish_at_exit)
after_fork(SWEEPER.forget_after_fork)

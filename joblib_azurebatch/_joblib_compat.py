"""Every read of joblib's private attributes, in one place, with safe defaults.

joblib's backend contract does not tell a backend which ``Parallel`` call a batch belongs
to, whether that call is still running or aborting, how many calls it holds, or what
batches wait in its queue. The backend needs those to keep concurrent and nested calls
apart, to size batches, to bundle the tail and to end each call's Batch job at the right
time, so it reads them from the ``Parallel`` object. Those names are private and may change
in any joblib release.

So they are read here only. :func:`probe` checks them once per ``Parallel`` (when the
backend is configured and again when its first batch arrives, since joblib sets some of
them only then). A missing one turns off the feature that needs it, with one warning per
process that names the joblib version, and the safe default holds: a run is never aborted
or closed because an attribute is missing. Without ``_running`` a run ends when its
``Parallel`` is garbage-collected or the interpreter exits, not at joblib's ``terminate``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import joblib

from .forks import ForkSafeLock

__all__ = ["Features", "JoblibCompatWarning", "probe"]


class JoblibCompatWarning(RuntimeWarning):
    """This joblib lacks an attribute the backend reads; a feature is off, results are not."""


#: Feature -> the Parallel attributes it needs, and what is lost without it.
_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "end_detection": (
        ("_running",),
        "the Batch job of a Parallel call is ended when the Parallel object is "
        "garbage-collected instead of as soon as the call returns",
    ),
    "abort_detection": (
        ("_aborting",),
        "the remaining tasks of a failing Parallel call are ended with the call, "
        "not as soon as the first error arrives",
    ),
    "call_identity": (
        ("_call_id",),
        "two calls of one reused Parallel object share a Batch job",
    ),
    "n_jobs": (
        ("_cached_effective_n_jobs",),
        "batch sizes are planned for the pool's capacity instead of n_jobs",
    ),
    "progress_counts": (
        ("n_tasks", "n_dispatched_tasks"),
        "batch sizes are not limited by the number of calls left",
    ),
    "pre_dispatch": (
        ("_pre_dispatch_amount",),
        'pre_dispatch="all" starts with one call per task',
    ),
    "tail_bundling": (
        ("_ready_batches", "_lock", "dispatch_next", "_aborting"),
        "the short batches at the end of a call are not bundled into fewer tasks",
    ),
    "dispatch_ahead": (
        (
            "_pre_dispatch_amount",
            "n_dispatched_tasks",
            "_ready_batches",
            "_lock",
            "dispatch_next",
            "_aborting",
        ),
        "batches are sent only as others finish, so a slot may wait for its next task",
    ),
}

#: Features whose attributes joblib may set only after ``configure``: in
#: ``Parallel.__call__``, which runs after ``configure`` when the backend is managed
#: (``with Parallel(...) as parallel:``, as scikit-learn's searches do).
_LATE = frozenset(set(_NEEDS) - {"end_detection"})

_warned: set[str] = set()
_warned_lock = ForkSafeLock()


def _warn_missing(feature: str, missing: Sequence[str]) -> None:
    with _warned_lock:
        if feature in _warned:
            return
        _warned.add(feature)
    _, lost = _NEEDS[feature]
    warnings.warn(
        f"joblib {joblib.__version__} has no Parallel.{', Parallel.'.join(missing)}, which "
        f"joblib-azurebatch reads: {lost}. Results are not affected; install a joblib "
        "version that joblib-azurebatch supports to get it back.",
        JoblibCompatWarning,
        stacklevel=4,
    )


class Features:
    """What one ``Parallel`` object lets the backend read; every getter has a safe default.

    Holds the ``Parallel`` weakly: the backend keeps features per ``Parallel`` and must not
    keep a finished call's objects alive.
    """

    def __init__(self, parallel: Any) -> None:
        self._ref: Callable[[], Any] = (
            weakref.ref(parallel) if parallel is not None else (lambda: None)
        )
        self.on: set[str] = set()
        self.checked: set[str] = set()

    @property
    def parallel(self) -> Any:
        return self._ref()

    def _has(self, feature: str) -> bool:
        return feature in self.on and self.parallel is not None

    # ------------------------------------------------------------------ life cycle

    def has_stopped(self) -> bool:
        """The call has returned (or its ``Parallel`` is gone). False when unknown: never
        end a run because an attribute is missing."""
        if self.parallel is None:
            return True
        if not self._has("end_detection"):
            return False
        return not bool(getattr(self.parallel, "_running", True))

    def is_aborting(self) -> bool:
        """The call is being aborted (an error or a timeout), or its ``Parallel`` is gone.
        False when unknown."""
        if self.parallel is None:
            return True
        if not self._has("abort_detection"):
            return False
        return bool(getattr(self.parallel, "_aborting", False))

    def call_id(self) -> Any:
        """What tells apart two calls of one reused ``Parallel`` object (None when unknown)."""
        return getattr(self.parallel, "_call_id", None) if self._has("call_identity") else None

    # ------------------------------------------------------------------ sizing

    def n_jobs(self) -> int | None:
        if not self._has("n_jobs"):
            return None
        cached = getattr(self.parallel, "_cached_effective_n_jobs", None)
        return cached if isinstance(cached, int) and cached > 0 else None

    def total_calls(self) -> int | None:
        if not self._has("progress_counts"):
            return None
        total = getattr(self.parallel, "n_tasks", None)
        return total if isinstance(total, int) else None

    def dispatched_calls(self) -> int:
        if not self._has("progress_counts"):
            return 0
        return int(getattr(self.parallel, "n_dispatched_tasks", 0) or 0)

    def taken_calls(self) -> int:
        """Calls taken from the input so far: dispatched, or cut into batches that wait in
        joblib's queue (call under :meth:`dispatch_lock` for an exact count)."""
        waiting = 0
        if self._has("tail_bundling"):
            waiting = sum(_length(b) for b in self.waiting_batches())
        return self.dispatched_calls() + waiting

    def dispatches_all_at_once(self) -> bool:
        """``pre_dispatch="all"``: no completion will come back to resize batches."""
        if not self._has("pre_dispatch"):
            return False
        return getattr(self.parallel, "_pre_dispatch_amount", None) == 0

    # ------------------------------------------------------------------ tail bundling

    def can_pull_tail(self) -> bool:
        return self._has("tail_bundling")

    def dispatch_lock(self) -> AbstractContextManager[Any]:
        lock: AbstractContextManager[Any] = self.parallel._lock
        return lock

    def batches_waiting(self) -> int:
        """How many batches wait in joblib's queue (safe without the lock; a moment's
        count). joblib asks for a batch size before every dispatch, but uses it only when
        its queue is empty and it cuts new batches from the input."""
        if not self._has("tail_bundling"):
            return 0
        ready = getattr(self.parallel, "_ready_batches", None)
        qsize = getattr(ready, "qsize", None)
        return int(qsize()) if callable(qsize) else len(getattr(ready, "queue", ()))

    def waiting_batches(self) -> list[Any]:
        """The batches waiting in joblib's queue (call under :meth:`dispatch_lock`)."""
        ready = getattr(self.parallel, "_ready_batches", None)
        return list(getattr(ready, "queue", ()))

    def dispatcher(self) -> Callable[[], Any]:
        dispatch: Callable[[], Any] = self.parallel.dispatch_next
        return dispatch

    # ------------------------------------------------------------------ dispatching ahead

    def can_dispatch_ahead(self) -> bool:
        """The backend may send batches before others finish (with ``pre_dispatch="all"``
        joblib sends everything itself)."""
        return self._has("dispatch_ahead") and not self.dispatches_all_at_once()

    def may_take_more(self) -> bool:
        """Whether :meth:`dispatcher` may be called now (under :meth:`dispatch_lock`):
        a batch waits in joblib's queue, or the input is not exhausted and joblib's
        ``pre_dispatch`` slice of it has been taken whole.

        joblib's ``dispatch_next`` reads the input itself; while the calling thread still
        takes the ``pre_dispatch`` slice, that slice would go on to yield later calls, and
        more batches than planned would go out. With no input left and no batch waiting it
        would record an error batch instead of doing nothing.
        """
        parallel = self.parallel
        if not self.can_dispatch_ahead() or parallel._aborting:
            return False
        if self.waiting_batches():
            return True
        # joblib sets it to None once the input is exhausted (and for pre_dispatch="all");
        # read with a default, so a joblib without it only sends the batches that wait.
        if getattr(parallel, "_original_iterator", None) is None:
            return False
        pre = getattr(parallel, "_pre_dispatch_amount", 0) or 0
        return self.taken_calls() >= pre

    def beyond_pre_dispatch(self) -> bool:
        """More calls were taken than joblib's ``pre_dispatch`` slice holds, so the input
        itself was read: batches cut short now are its end, not the slice's."""
        pre = getattr(self.parallel, "_pre_dispatch_amount", 0) or 0
        return self.taken_calls() > pre


def _length(batch: Any) -> int:
    return len(batch) if hasattr(batch, "__len__") else 1


def probe(parallel: Any, features: Features | None = None, *, late: bool = False) -> Features:
    """Check the attributes of ``parallel`` once and turn on what is there.

    ``late=False`` at ``configure`` (the attributes joblib sets before it), ``late=True``
    at the first batch of a call (the rest). A missing attribute warns once per process.
    """
    result = features if features is not None else Features(parallel)
    if parallel is None:
        return result
    for feature, (names, _) in _NEEDS.items():
        if feature in result.checked or (feature in _LATE) != late:
            continue
        result.checked.add(feature)
        missing = [n for n in names if not hasattr(parallel, n)]
        if missing:
            _warn_missing(feature, missing)
        else:
            result.on.add(feature)
    return result


def callback_parallel(callback: Any) -> tuple[Any, Any]:
    """The ``Parallel`` and the call id that joblib's completion callback was made for.

    joblib's ``BatchCompletionCallBack`` carries both; None for each when it does not.
    """
    return getattr(callback, "parallel", None), getattr(callback, "parallel_call_id", None)

"""The joblib backend: ``Parallel`` batches become Azure Batch tasks.

This module is the joblib contract only, like joblib's own ``_dask.py``: ``submit``
returns a :class:`concurrent.futures.Future` and the callback joblib passes is always
called once the result (or the error that replaces it) is in hand, from one thread per run,
never concurrently (joblib 1.6 returns a silently truncated list when callbacks race). The
work is done elsewhere: :mod:`~joblib_azurebatch.run` (one Batch job per ``Parallel`` call
and its life cycle), :mod:`~joblib_azurebatch.submitter`, :mod:`~joblib_azurebatch.tracker`,
:mod:`~joblib_azurebatch.sizing` and :mod:`~joblib_azurebatch.pools`; every read of joblib's
private attributes is in :mod:`~joblib_azurebatch._joblib_compat`.

Per-call state: joblib shares one backend instance between every ``Parallel`` under a
``parallel_config`` (a GridSearchCV inside a loop calls ``terminate()`` on the same instance
as the outer loop). So the instance keeps a :class:`~joblib_azurebatch.run.JobRun` per
``Parallel`` call, found from the ``parallel`` that joblib hands to ``configure`` and to
every callback, and ends only the runs whose ``Parallel`` has stopped running.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from joblib.parallel import (
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
    ThreadingBackend,
)

from . import _joblib_compat as compat
from . import shutdown
from .batch import BatchService
from .config import BatchConfig
from .errors import ConfigError
from .forks import after_fork
from .pools import POOLS, PoolCheck
from .run import Account, JobRun, current_run
from .sizing import BatchSizer
from .storage import BlobStore
from .sweeper import EXIT_WAIT, SWEEPER

__all__ = ["AzureBatchBackend"]

_current = threading.local()
#: Every backend of this process, for :func:`_forget_after_fork`.
_BACKENDS: weakref.WeakSet[AzureBatchBackend] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for backend in list(_BACKENDS):
        backend._forget_after_fork()


after_fork(_forget_after_fork)


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
    #: Batches run this many times longer than their overhead. A slot pays the overhead
    #: measured on the node for every task (the scheduling part is hidden by the task
    #: queued behind), so 10 keeps it near a twentieth of the slot's time.
    OVERHEAD_RATIO = 10.0

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
        self._accounts: dict[int, Account] = {}
        #: Per config: what the last run found about the pool, so that the next ``Parallel``
        #: calls of this context skip those requests for a while (pools.PoolCheck).
        self._pool_checks: dict[int, PoolCheck] = {}
        self._runs: dict[tuple[int, Any], JobRun] = {}
        self._features: weakref.WeakKeyDictionary[Any, compat.Features] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.RLock()
        self.parallel: Any = None
        # The clients hold connections (and maybe a credential); close them with the backend.
        weakref.finalize(self, _close_accounts, self._accounts)
        _BACKENDS.add(self)

    def _forget_after_fork(self) -> None:
        """In a forked child (a ``parallel_config`` block around a multiprocessing pool):
        the clients' connections are the parent's sockets and the runs are the parent's;
        this process makes its own (:mod:`joblib_azurebatch.forks`). Nothing is closed:
        the parent still uses them."""
        self._lock = threading.RLock()
        self._accounts.clear()  # the very dict the finalizer closes: nothing of the parent's
        self._pool_checks.clear()
        self._runs.clear()

    # ---------------------------------------------------------------- config and sizing

    def _config_now(self) -> BatchConfig:
        if self._config is None:
            self._config = BatchConfig.from_env()
        return self._config

    def _account(self) -> Account:
        cfg = self._config_now()
        with self._lock:
            account = self._accounts.get(id(cfg))
            if account is None or account.cfg is not cfg:
                if account is not None:
                    _close_accounts({0: account})
                account = Account(
                    cfg=cfg,
                    service=BatchService.from_config(cfg),
                    store=BlobStore.from_config(cfg),
                )
                self._accounts[id(cfg)] = account
                self._pool_checks[id(cfg)] = PoolCheck()
            return account

    def _pool_check(self, account: Account) -> PoolCheck:
        with self._lock:
            check = self._pool_checks.get(id(account.cfg))
            if check is None:
                check = self._pool_checks[id(account.cfg)] = PoolCheck()
            return check

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
        if parallel is not None:
            with self._lock:
                self._features[parallel] = compat.probe(parallel)
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

    def compute_batch_size(self) -> int:
        """Calls per task for the next batch of the run joblib is dispatching for.

        Before any task finished: a known number of calls is spread over a running and a
        queued task per slot (:meth:`BatchSizer.first_size`); an unknown one (a generator)
        starts with one call per task, a quick probe of the time per call;
        ``pre_dispatch="all"`` spreads the calls over four tasks per slot. Then the sizer's
        learned size, never more than the calls left can give every slot.
        """
        run = current_run()
        if run is None:
            parallel = getattr(_current, "parallel", None) or self.parallel
            run = self._run_for(parallel, self._features_of(parallel).call_id())
        features, sizer = run.features, run.sizer
        if features.batches_waiting():
            # joblib takes a waiting batch and ignores this answer: no decision (each one
            # may grow the size max_growth times).
            return sizer.size
        total = features.total_calls()
        remaining = max(total - features.taken_calls(), 0) if total is not None else None
        if sizer.samples == 0:
            all_at_once = features.dispatches_all_at_once()
            if remaining is None or all_at_once:
                return sizer.initial_size(total=total, all_at_once=all_at_once)
            return sizer.first_size(remaining=remaining, in_flight=run.in_flight)
        return sizer.next_size(remaining=remaining)

    def batch_completed(self, batch_size: int, duration: float) -> None:
        """Unused: the sizer learns from the task's own timings, not from joblib's clock."""

    # ---------------------------------------------------------------- runs

    def _features_of(self, parallel: Any) -> compat.Features:
        """The joblib features of ``parallel``, its late attributes checked on first use."""
        if parallel is None:
            return compat.Features(None)
        with self._lock:
            features = self._features.get(parallel)
            if features is None:
                features = compat.probe(parallel)
                self._features[parallel] = features
            return compat.probe(parallel, features, late=True)

    def _run_for(self, parallel: Any, call_id: Any) -> JobRun:
        key = (id(parallel), call_id)
        with self._lock:
            run = self._runs.get(key)
            if run is not None and not run.closed:
                return run
            features = self._features_of(parallel)
            sizer = self._sizer(features.n_jobs() or self.effective_n_jobs(-1))
            account = self._account()
            run = JobRun(
                account,
                n_jobs=sizer.n_jobs,
                sizer=sizer,
                scheduling_latency=self.SCHEDULING_LATENCY,
                features=features,
                pool_check=self._pool_check(account),
            )
            self._runs[key] = run
            return run

    def _finished_runs(self, *, aborting: bool = False) -> list[JobRun]:
        """Runs whose Parallel has stopped (or, for ``aborting``, is aborting)."""
        done: list[JobRun] = []
        with self._lock:
            for key, run in list(self._runs.items()):
                if run.features.is_aborting() if aborting else run.features.has_stopped():
                    done.append(run)
                    if not aborting:
                        del self._runs[key]
        return done

    def submit(self, func: Any, callback: Any = None) -> Future[Any]:
        parallel, call_id = compat.callback_parallel(callback)
        if parallel is None:
            parallel = getattr(_current, "parallel", None) or self.parallel
        if call_id is None:
            call_id = self._features_of(parallel).call_id()
        run = self._run_for(parallel, call_id)
        future = run.submit(func, callback)
        # Counted in flight; the run may send more batches from here (joblib holds its
        # dispatch lock while it calls submit, and the run takes it again).
        run.dispatched(future)
        return future

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Terminate the remaining tasks of the run being aborted (its job stays until
        ``stop_call``/``terminate`` deletes it)."""
        # joblib aborts from inside its exception handler: name a Ctrl-C in the run's line.
        why = "Ctrl-C" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else ""
        for run in self._finished_runs(aborting=True):
            run.abort(why=why)

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


def _close_accounts(accounts: dict[int, Account]) -> None:
    """Close the clients of a backend that is gone (their connections, their credential).

    This runs from a finalizer, in whatever thread the garbage collector happens to run
    in: the thread of an in-process HTTP server, or one that holds a lock this would need.
    So the closing itself happens in a thread of its own and nothing waits here. That
    thread first lets the blob deletions of the backend's last runs finish
    (:mod:`joblib_azurebatch.sweeper` uses the same store), then hands each client to
    `PoolRegistry.close_when_unused`, whose lock a run may hold while it creates a pool.
    """
    clients = [c for a in accounts.values() for c in (a.service, a.store)]
    accounts.clear()
    if not clients:
        return

    def close_all() -> None:
        SWEEPER.wait(EXIT_WAIT)
        for client in clients:
            close = getattr(client, "close", None)
            if close is not None:
                # A pool lingering for the next run is deleted through this client later.
                POOLS.close_when_unused(client, _quietly(close))

    shutdown.start(threading.Thread(target=close_all, name="azurebatch-close", daemon=True))


def _quietly(close: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with contextlib.suppress(Exception):  # best effort, maybe at exit
            close()

    return run

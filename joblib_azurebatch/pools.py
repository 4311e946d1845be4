"""Which pools this process uses, who may delete them, and the wait for their nodes.

Every run of this process that uses a pool holds a lease on it; concurrent and nested runs
share one lease per (account, pool). Across processes (the default ``pool_id`` is shared by
everyone on an account) the pool itself says who may delete it: a pool the library creates
carries metadata naming its creator (host, pid and a random token, so that a create whose
reply was lost and that was resent is still recognised as this process's) and whether it
may be deleted once idle (not with ``keep_pool=True``).

When the last lease of this process is released, such a pool is deleted only if no other
run still uses it: no other job on the pool is active, except jobs whose client is known
to be gone (:mod:`joblib_azurebatch.liveness`), which `joblib-azurebatch cleanup` removes.
Each run deletes its own job before it looks, so of several runs that end together the last
to look sees the others' jobs deleting and deletes the pool. A pool that the library did
not create, or that was created to be kept, is never changed or deleted, only compared with
the config and warned about.

A pool the library creates without ``keep_pool`` (or with ``pool_idle_minutes`` set) also
autoscales with a formula (:mod:`joblib_azurebatch.idle`) that drains it to zero nodes after
``pool_idle_minutes`` without a task: should every client die before deleting it, it stops
billing by itself. Each run that starts on such a pool wakes it (the formula is set again
with a fresh wake time, which the service evaluates at once).

What a run checks about its pool before it adds tasks (that it exists, that it has a usable
slot, and with it that the credentials and the container work) is kept for a short while by
a :class:`PoolCheck`, one per backend and config, so that a loop of short ``Parallel``
calls does not read the pool again for every call.
"""

from __future__ import annotations

import datetime as _dt
import logging
import multiprocessing.util
import os
import secrets
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import shutdown
from .batch import JobInfo, PoolInfo, PoolSpec, pool_differences
from .errors import AzureBatchError
from .forks import after_fork
from .idle import idle_formula
from .liveness import ClientRecord, client_gone

if TYPE_CHECKING:
    from .service import BatchApi
    from .tracker import Watch

__all__ = [
    "AUTO_DELETE",
    "CREATOR",
    "POOLS",
    "POOL_CHECK_SECONDS",
    "ForgetOnLoss",
    "PoolCheck",
    "PoolDifferenceWarning",
    "PoolLease",
    "PoolRegistry",
    "capacity_progress",
    "library_pool",
    "live_users",
]

#: Pool metadata: who created the pool (``host/pid/token``).
CREATOR = "joblib-azurebatch-creator"
#: Pool metadata: "true" when the library may delete the pool once no run uses it.
AUTO_DELETE = "joblib-azurebatch-auto-delete"
#: Pool metadata: "dedicated,spot,idle minutes" of the idle formula it was created with, so
#: that a run that wakes it sets the same formula (never its own config's sizes).
SHAPE = "joblib-azurebatch-idle-shape"
#: Idle minutes before a pool created without keep_pool drains (BatchConfig.pool_idle_minutes).
DEFAULT_IDLE_MINUTES = 15
#: Seconds for which a run's check of its pool holds for the next runs of the same backend
#: and config (see :class:`PoolCheck`).
POOL_CHECK_SECONDS = 60.0
#: Job states in which a job may still run tasks: its pool is in use.
_LIVE_JOB_STATES = frozenset({"active", "enabling", "disabling", "disabled", "terminating"})

_log = logging.getLogger(__name__)


class PoolDifferenceWarning(UserWarning):
    """An existing pool differs from the config; it is used as it is."""


@dataclass
class PoolLease:
    """The right of one or more runs to use a pool, and whether releasing it deletes it."""

    key: tuple[str, str]
    service: BatchApi
    pool_id: str
    created: bool
    keep: bool
    holders: int = 0
    #: The pool's metadata lets the library delete it once no run uses it.
    auto_delete: bool = False
    #: The pool's idle shape (``SHAPE``) when it autoscales with the library's formula.
    shape: str | None = None
    #: Set while no run holds the lease and the pool waits out ``pool_linger``.
    timer: threading.Timer | None = None
    #: Clients to close once the lease no longer uses them (see `close_when_unused`).
    to_close: list[Callable[[], None]] = field(default_factory=list)

    def wake(self) -> None:
        """Wake the pool again (its formula with a fresh wake time), if it has the idle
        formula: while a run waits for nodes its tasks are not queued yet, and a pool
        whose nodes take longer than its idle minutes would otherwise drain again."""
        if self.shape:
            _wake(self.service, self.pool_id, self.shape)


class PoolRegistry:
    """The leases of one process, so that concurrent or nested runs share one pool."""

    def __init__(self) -> None:
        # Reentrant: a SIGTERM handler that releases leases may run while this thread holds it.
        self._lock = threading.RLock()
        self._leases: dict[tuple[str, str], PoolLease] = {}
        self._flushes_at_exit_of: int | None = None  # the pid `_flush_at_process_exit` saw

    def forget_after_fork(self) -> None:
        """In a forked child: the leases are the parent's (a lingering pool is its to take
        back or delete, through its clients), and so may be the lock; start empty
        (:mod:`joblib_azurebatch.forks`)."""
        self._lock = threading.RLock()
        self._leases = {}

    def acquire(
        self,
        service: BatchApi,
        spec: PoolSpec,
        *,
        account_url: str,
        keep: bool,
        idle_minutes: int | None = None,
        known: PoolInfo | None = None,
    ) -> PoolLease:
        """Take a lease on the pool, creating it if it does not exist yet.

        A pool created here carries the ownership metadata and, unless ``keep``, the idle
        formula. An existing pool is compared with ``spec`` (:class:`PoolDifferenceWarning`)
        and, if it is one the library autoscales, woken. ``known`` is the pool as the run
        read it a moment ago: if it exists (and is not being deleted) it is not read again.
        """
        key = (account_url, spec.pool_id)
        with self._lock:
            lease = self._leases.get(key)
            if lease is not None and lease.holders == 0:
                # A pool left to linger by an earlier run: take it back if it is still there.
                self._stop_lingering(lease)
                read = known if known is not None and known.pool_id == spec.pool_id else None
                if read is not None and read.state != "deleting":
                    self._hand_over(lease, service)
                    _log.info("taking back the pool %s", spec.pool_id)
                    if lease.shape:
                        _wake(service, spec.pool_id, lease.shape)
                else:
                    self._leases.pop(key, None)
                    self._closed(lease)
                    lease = None
            if lease is None:
                read = known if known is not None and known.pool_id == spec.pool_id else None
                if read is not None and read.state != "deleting":
                    info, created = read, False
                else:
                    info, created = service.ensure_pool(_owned(spec, keep=keep, idle=idle_minutes))
                lease = PoolLease(
                    key=key,
                    service=service,
                    pool_id=spec.pool_id,
                    created=created,
                    keep=keep,
                    auto_delete=library_pool(info.metadata),
                    shape=info.metadata.get(SHAPE) if info.auto_scale else None,
                )
                self._leases[key] = lease
                if created:
                    _log.info("created the pool %s", spec.pool_id)
                else:
                    _log.info("using the existing pool %s", spec.pool_id)
                    warn_differences(info, spec)
                    if info.auto_scale and info.metadata.get(SHAPE):
                        _wake(service, spec.pool_id, info.metadata[SHAPE])
            lease.keep = lease.keep or keep
            lease.holders += 1
            return lease

    def release(self, lease: PoolLease, *, linger: float = 0.0) -> None:
        """Give a lease back; the last holder deletes a library pool no other run uses.

        With ``linger`` (``BatchConfig.pool_linger``) the deletion waits that many seconds
        for a run of this process to take the pool back (the next ``Parallel`` call of a
        loop); `flush` deletes what still lingers at exit.
        """
        with self._lock:
            lease.holders -= 1
            if lease.holders > 0:
                return
            delete = lease.auto_delete and not lease.keep
            if delete and linger > 0:
                lease.timer = threading.Timer(linger, self._expire, (lease,))
                lease.timer.name = f"azurebatch-linger-{lease.pool_id}"
                lease.timer.daemon = True
                shutdown.start(lease.timer)
                self._flush_at_process_exit()
                _log.info("keeping the pool %s for %g s for the next run", lease.pool_id, linger)
                return
            self._leases.pop(lease.key, None)
        try:
            if delete:
                self._delete(lease)
        finally:
            self._closed(lease)

    def _flush_at_process_exit(self) -> None:
        """Have `flush` run when this process ends, whichever way it ends normally.

        The interpreter's exit runs the ``atexit`` function that flushes (:mod:`.run`), but
        a ``multiprocessing`` worker (fork, spawn or loky) ends through ``os._exit`` once
        its pool is done with it: no ``atexit`` function runs there, and its linger timer
        dies with it, so a pool it left lingering would stay (drained to zero nodes by its
        idle formula, removed by ``cleanup`` later). Such a worker does run
        multiprocessing's exit finalizers, as every process that imported multiprocessing
        does at exit; one is registered per process (a forked child registers its own: its
        registry starts empty).
        """
        pid = os.getpid()
        if self._flushes_at_exit_of != pid:
            self._flushes_at_exit_of = pid
            multiprocessing.util.Finalize(None, self.flush, exitpriority=10)

    def lingering(self) -> bool:
        """Whether a pool waits for its next run, which `flush` would delete."""
        with self._lock:
            return any(lease.holders == 0 for lease in self._leases.values())

    def flush(self) -> None:
        """Delete every pool left lingering, now (at exit, on SIGTERM or SIGHUP)."""
        with self._lock:
            lingering = [lease for lease in self._leases.values() if lease.holders == 0]
            for lease in lingering:
                self._stop_lingering(lease)
                self._leases.pop(lease.key, None)
        for lease in lingering:
            try:
                self._delete(lease)
            except Exception as e:  # best effort at exit: cleanup finds what is left
                _warn_pool(lease, e)
            finally:
                self._closed(lease)

    def close_when_unused(self, service: object, close: Callable[[], None]) -> None:
        """Close ``service`` now, or once no lingering pool needs it to be deleted.

        A backend closes its clients when it is collected, which may be while a pool it
        created lingers for the next backend's run; that pool's deletion still needs them.
        """
        with self._lock:
            for lease in self._leases.values():
                if lease.service is service and lease.holders == 0:
                    lease.to_close.append(close)
                    return
        close()

    def _stop_lingering(self, lease: PoolLease) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None

    def _hand_over(self, lease: PoolLease, service: BatchApi) -> None:
        """The lingering lease is used through ``service`` from now on; the clients whose
        closing waited for it are closed."""
        if service is not lease.service:
            lease.service = service
            self._closed(lease)

    def _closed(self, lease: PoolLease) -> None:
        closes, lease.to_close = lease.to_close, []
        for close in closes:
            try:
                close()
            except Exception:  # best effort, like the backend's own close
                _log.debug("closing a client of the pool %s failed", lease.pool_id, exc_info=True)

    def _expire(self, lease: PoolLease) -> None:
        """The linger is over: delete the pool unless a run took it back meanwhile."""
        with self._lock:
            if self._leases.get(lease.key) is not lease or lease.holders > 0:
                return
            lease.timer = None
            self._leases.pop(lease.key, None)
        try:
            self._delete(lease)
        except Exception as e:
            _warn_pool(lease, e)
        finally:
            self._closed(lease)

    def _delete(self, lease: PoolLease) -> None:
        users = live_users(lease.service.list_jobs(pool_id=lease.pool_id))
        if users:
            _log.info(
                "leaving the pool %s to the %d other run(s) still using it (%s); the last "
                "to end deletes it",
                lease.pool_id,
                len(users),
                ", ".join(j.job_id for j in users[:5]),
            )
            return
        _log.info("deleting the pool %s", lease.pool_id)
        lease.service.delete_pool(lease.pool_id)


def _warn_pool(lease: PoolLease, error: BaseException) -> None:
    warnings.warn(
        f"joblib-azurebatch could not delete the pool {lease.pool_id}: {error}. Run "
        "`joblib-azurebatch cleanup` to remove it (its idle formula drains its nodes meanwhile)",
        RuntimeWarning,
        stacklevel=2,
    )


class PoolCheck:
    """What a run found about its pool before adding tasks, reused for ``seconds``.

    Before it creates anything, a run reads the pool (which checks the Batch credential and,
    in node-identity mode, the pool's identity) and makes sure of the container (the storage
    credential); once its job exists, it waits until the pool has a usable slot. A loop of
    short ``Parallel`` calls under one ``parallel_config`` would repeat those requests for
    every call (three reads of the pool, a listing of its nodes, a container request) for
    answers that do not change in seconds. So the backend keeps one check per config: a run
    that finds it fresh skips them all and takes the pool as it was found.

    Only a pool that no run of the library deletes is remembered (kept with ``keep_pool``,
    or made by the user), and only with a usable slot: a pool the library created to be
    deleted may go at the end of any run, of this process or another, and is read every
    time. A run whose watchdog finds its job or pool gone or without nodes forgets the check
    (:class:`ForgetOnLoss`), and so does a batch that fails before reaching Batch, so the
    next run checks again; a run that fails to start records nothing. What the check skips
    fails safely meanwhile: a credential that stopped working fails the job's creation,
    before anything exists; a pool deleted by hand fails the run through its watchdog.
    """

    def __init__(
        self,
        *,
        seconds: float = POOL_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pool: PoolInfo | None = None
        self._at = 0.0

    def fresh(self, pool_id: str) -> PoolInfo | None:
        """The pool as a run found it less than ``seconds`` ago, with a usable slot; None
        when there is no such check and the run must check for itself."""
        with self._lock:
            pool = self._pool
            if pool is None or pool.pool_id != pool_id:
                return None
            if self._clock() - self._at > self.seconds:
                self._pool = None
                return None
            return pool

    def record(self, pool: PoolInfo) -> None:
        """Remember a run's successful check: ``pool`` as its capacity wait returned it."""
        keep = pool.state == "active" and pool.ready_slots > 0 and not library_pool(pool.metadata)
        with self._lock:
            self._pool, self._at = (pool if keep else None), self._clock()

    def forget(self) -> None:
        """Something failed: the next run checks for itself."""
        with self._lock:
            self._pool = None


class ForgetOnLoss:
    """A run's watchdog as its tracker sees it: a look that finds the run lost (its job or
    pool gone, no usable node) also forgets the :class:`PoolCheck`, so the next run reads
    the pool again instead of trusting it."""

    def __init__(self, watch: Watch, check: PoolCheck) -> None:
        self._watch = watch
        self._check = check

    def _seen(self, error: BaseException | None) -> BaseException | None:
        if error is not None:
            self._check.forget()
        return error

    def __call__(self, *, pending: bool) -> BaseException | None:
        return self._seen(self._watch(pending=pending))

    def look_now(self) -> BaseException | None:
        return self._seen(self._watch.look_now())


def library_pool(metadata: Mapping[str, str]) -> bool:
    """Whether a pool's metadata lets the library delete it once no run uses it."""
    return metadata.get(AUTO_DELETE) == "true" and bool(metadata.get(CREATOR))


def live_users(jobs: list[JobInfo]) -> list[JobInfo]:
    """The jobs that still use their pool: not ended, and not of a client known to be gone.

    A job with no client record (made by something else) counts as a user.
    """
    users = []
    for job in jobs:
        if job.state not in _LIVE_JOB_STATES:
            continue
        record = ClientRecord.from_metadata(job.metadata)
        if record is not None and client_gone(record) is not None:
            continue
        users.append(job)
    return users


def _owned(spec: PoolSpec, *, keep: bool, idle: int | None) -> PoolSpec:
    """The spec with the metadata that records this process as the creator, and the idle
    formula: always without ``keep``, for a kept pool only if ``idle`` was given."""
    token = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(8)}"
    metadata = {**spec.metadata, CREATOR: token, AUTO_DELETE: "false" if keep else "true"}
    formula = None
    if not keep or idle is not None:
        shape = f"{spec.dedicated_nodes},{spec.spot_nodes},{idle or DEFAULT_IDLE_MINUTES}"
        metadata[SHAPE] = shape
        formula = _formula(shape)
    return replace(spec, metadata=metadata, autoscale_formula=formula)


def _formula(shape: str) -> str:
    dedicated, spot, idle = (int(v) for v in shape.split(","))
    return idle_formula(
        dedicated=dedicated,
        spot=spot,
        idle_minutes=idle,
        wake=_dt.datetime.now(_dt.timezone.utc),
    )


def _wake(service: BatchApi, pool_id: str, shape: str) -> None:
    """Set the pool's own idle formula again with a fresh wake time: a drained pool grows
    at once, to the sizes it was created with (a joining run never resizes it)."""
    try:
        formula = _formula(shape)
    except ValueError:
        _log.warning("the pool %s has an idle shape this release cannot read: %r", pool_id, shape)
        return
    try:
        service.enable_autoscale(pool_id, formula)
    except AzureBatchError as e:
        # The pool still has whatever nodes it has; waiting for capacity says the rest.
        _log.warning("could not wake the pool %s: %s", pool_id, e)


#: The process's leases: every backend instance shares them.
POOLS = PoolRegistry()
after_fork(POOLS.forget_after_fork)


def warn_differences(info: PoolInfo, spec: PoolSpec) -> None:
    diffs = pool_differences(info, spec)
    if diffs:
        warnings.warn(
            f"The existing pool {spec.pool_id} is used as it is, though it differs from the "
            f"config: {'; '.join(diffs)}. Delete it or choose another pool_id to get the "
            "configured one.",
            PoolDifferenceWarning,
            stacklevel=user_stacklevel(),
        )


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the caller's own line: the first frame
    outside this package, joblib and scikit-learn's parallel helpers (however deep the
    ``Parallel`` call that got here), so that the warning names the user's script."""
    import joblib

    skip = tuple(
        os.path.dirname(os.path.abspath(m.__file__ or ""))
        for m in (sys.modules[__name__.rpartition(".")[0]], joblib)
    )
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(skip) and "sklearn/utils/parallel" not in filename:
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 1


@contextmanager
def capacity_progress(pool_id: str) -> Iterator[Callable[[PoolInfo], None]]:
    """A tqdm line on stderr while the pool gets its nodes (only if there is a wait)."""
    bar: Any = None
    shown: tuple[int, str] | None = None

    def show(info: PoolInfo) -> None:
        nonlocal bar, shown
        states = ", ".join(f"{n} {s}" for s, n in sorted(info.node_states.items()))
        postfix = f"{info.allocation_state}; nodes: {states or 'none yet'}"
        if (info.ready_slots, postfix) == shown:
            return  # redraw only what changed: off a terminal every redraw is a new line
        shown = (info.ready_slots, postfix)
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
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    try:
        yield show
    finally:
        if bar is not None:
            bar.close()

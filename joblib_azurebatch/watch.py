"""The run's low-rate look at its job and pool, so that no call waits on something gone.

Batch does not fail a job's tasks when the job's pool is deleted, resized to zero or left
with only unusable nodes: they stay ``active`` forever, and a client that only polls task
counts waits with them. The tracker's thread therefore calls a :class:`Watchdog` between
its polls. At most once per ``interval`` (30 s by default, three requests: well under one
a second) it reads the job and the pool with its node states, and it answers with a
:class:`~joblib_azurebatch.errors.RunLostError` that names what happened when:

- the job was deleted, or terminated by someone other than this run;
- the pool was deleted (or is being deleted);
- the pool has had no usable node (idle or running) for ``capacity_timeout`` seconds: it
  was resized to zero, every node is unusable or its start task failed, or spot nodes were
  preempted and none came back.

The same look refreshes the run's heartbeat in the job's metadata (see
:mod:`joblib_azurebatch.liveness`), so that `joblib-azurebatch cleanup` on another machine
can tell a live run from a dead one.

A look that fails (throttled, an outage) is logged and skipped: the tracker's own polling
already fails the run when the service stays unreachable past the retry budget, and the
watchdog must not turn a hiccup into a lost run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from .batch import PoolInfo
from .errors import AzureBatchError, CredentialError, RunLostError
from .liveness import HEARTBEAT_EVERY, ClientRecord
from .service import BatchApi, Clock

__all__ = ["Watchdog"]

_log = logging.getLogger(__name__)

#: Job states that mean the job no longer runs tasks.
_ENDED_JOB_STATES = frozenset({"terminating", "completed", "deleting"})
_UNUSABLE_NODE_STATES = frozenset({"unusable", "starttaskfailed", "offline"})


class Watchdog:
    """Looks at one job and its pool now and then; see the module docstring."""

    def __init__(
        self,
        service: BatchApi,
        *,
        job_id: str,
        pool_id: str,
        clock: Clock,
        interval: float = 30.0,
        capacity_timeout: float = 900.0,
        record: ClientRecord | None = None,
        metadata: Mapping[str, str] | None = None,
        heartbeat_every: float = HEARTBEAT_EVERY,
        ending: Callable[[], bool] = lambda: False,
    ) -> None:
        self._service = service
        self._job_id = job_id
        self._pool_id = pool_id
        self._clock = clock
        self._interval = interval
        self._capacity_timeout = capacity_timeout
        self._record = record
        #: The job's other metadata, written again with each heartbeat (Batch replaces the
        #: whole list).
        self._metadata = dict(metadata or {})
        self._heartbeat_every = heartbeat_every
        #: True once the run itself is ending the job: its own termination is not news.
        self._ending = ending
        now = clock.monotonic()
        self._next_look = now + interval
        self._next_beat = now + heartbeat_every
        self._without_capacity_since: float | None = None
        self._lock = threading.Lock()
        #: Looks taken and heartbeats sent, for tests.
        self.looks = 0
        self.beats = 0

    def __call__(self, *, pending: bool) -> RunLostError | None:
        """Called by the tracker between polls; returns an error once the run is lost."""
        now = self._clock.monotonic()
        self.heartbeat()
        if not pending or now < self._next_look:
            return None
        self._next_look = now + self._interval
        return self.look_now()

    def look_now(self) -> RunLostError | None:
        """One look, whatever the interval (also asked by the tracker when a task was
        ended by request: terminating the job from outside ends its tasks that way)."""
        try:
            with self._lock:
                return self._look(self._clock.monotonic())
        except CredentialError:
            raise
        except AzureBatchError as e:
            _log.warning("could not look at the job %s and its pool: %s", self._job_id, e)
            return None

    def heartbeat(self) -> None:
        """Refresh the job's client record, at most once per ``heartbeat_every`` seconds
        (also called while the run waits for the pool's nodes, before the tracker runs)."""
        now = self._clock.monotonic()
        if self._record is None or now < self._next_beat:
            return
        self._next_beat = now + self._heartbeat_every
        self._record = self._record.beat()
        try:
            self._service.set_job_metadata(
                self._job_id, {**self._metadata, **self._record.to_metadata()}
            )
            self.beats += 1
        except AzureBatchError as e:
            _log.debug("the heartbeat of the job %s failed: %s", self._job_id, e)

    def _look(self, now: float) -> RunLostError | None:
        self.looks += 1
        job = self._service.get_job(self._job_id)
        if self._ending():
            return None
        if job is None:
            return RunLostError(
                f"the Batch job {self._job_id} was deleted while its calls were running (from "
                "the portal, the az CLI, or a `joblib-azurebatch cleanup` that judged its "
                "client gone): its unfinished calls are lost; run the Parallel call again",
                404,
                "JobDeleted",
                f"watch the job {self._job_id}",
            )
        if job.state in _ENDED_JOB_STATES:
            reason = f" (reason: {job.terminate_reason})" if job.terminate_reason else ""
            return RunLostError(
                f"the Batch job {self._job_id} was ended from outside this run: it is "
                f"{job.state}{reason}, so its unfinished calls will never run; run the "
                "Parallel call again",
                None,
                "JobTerminated",
                f"watch the job {self._job_id}",
            )
        pool = self._service.pool_status(self._pool_id)
        if pool is None or pool.state == "deleting":
            return RunLostError(
                f"the pool {self._pool_id} was deleted while the job {self._job_id} was "
                "running on it, so its unfinished calls can never run; run the Parallel call "
                "again (the pool is created anew) and check who deletes the pool (another "
                "client with keep_pool=False, the portal, an automation)",
                404,
                "PoolDeleted",
                f"watch the pool {self._pool_id}",
            )
        if pool.ready_nodes > 0:
            self._without_capacity_since = None
            return None
        if self._without_capacity_since is None:
            self._without_capacity_since = now
        waited = now - self._without_capacity_since
        if waited < self._capacity_timeout:
            return None
        return RunLostError(
            f"the pool {self._pool_id} has had no usable node for {waited:.0f} s: "
            f"{_why_no_capacity(pool)}. The unfinished calls of the job {self._job_id} fail "
            "rather than wait forever; resize the pool or fix its nodes and run the call "
            "again, or raise capacity_timeout= to wait longer",
            None,
            "NoCapacity",
            f"watch the pool {self._pool_id}",
        )


def _why_no_capacity(pool: PoolInfo) -> str:
    states = dict(pool.node_states)
    shown = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no node"
    if pool.target_dedicated_nodes + pool.target_spot_nodes == 0:
        return f"it was resized to zero nodes ({shown})"
    unusable = sum(n for s, n in states.items() if s in _UNUSABLE_NODE_STATES)
    if states and unusable == sum(states.values()):
        return f"every node is unusable or failed its start task ({shown})"
    if states.get("preempted"):
        return f"its spot nodes were preempted and no capacity came back ({shown})"
    if pool.resize_errors:
        return f"it cannot get nodes: {'; '.join(pool.resize_errors)}"
    return f"its nodes are {shown}"
